"""Steering vectors (build, spectral restriction, file format) and static steering (``--steer``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, tree_digest

import eigenpatch
from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import HiddenShift, decoder_layers
from eigenpatch.format.steering import SteeringVectors, model_fingerprint
from eigenpatch.patchers.gavish_donoho import gavish_donoho_rank
from eigenpatch.patchers.prompts import read_prompts
from eigenpatch.patchers.steer.config import Steer
from eigenpatch.patchers.steer.vectors import build_steering_vectors, contrast_direction, parse_layers

DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "steer"


def test_parse_layers():
    assert parse_layers("10-12", 30) == [10, 11, 12]
    assert parse_layers("4, 8,12", 30) == [4, 8, 12]
    assert parse_layers("-3--1", 30) == [27, 28, 29]
    assert parse_layers([0, -1], 4) == [0, 3]
    for bad in ("30", "a-b", "5-3", "", "-31"):
        with pytest.raises(UsageError, match="layers"):
            parse_layers(bad, 30)


def test_gavish_donoho_rank_recovers_a_planted_rank():
    g = torch.Generator().manual_seed(0)
    n, d, rank = 4000, 200, 7
    signal = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g).double()
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(0.3 * signal + noise)
    assert gavish_donoho_rank(s, n, d) == rank
    assert gavish_donoho_rank(torch.linalg.svdvals(noise), n, d) == 0  # pure noise: nothing above threshold


def test_contrast_directions_find_a_planted_direction():
    g = torch.Generator().manual_seed(1)
    d = 64
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    base = torch.randn(40, d, generator=g, dtype=torch.float64)
    pos = base + 3.0 * u + 0.1 * torch.randn(40, d, generator=g, dtype=torch.float64)
    neg = base - 3.0 * u + 0.1 * torch.randn(40, d, generator=g, dtype=torch.float64)
    for method in ("mean", "pca"):
        v = contrast_direction(pos, neg, method)
        assert float(v @ u) / float(v.norm()) > 0.99, method  # direction, with the right sign
        assert float(v.norm()) == pytest.approx(6.0, rel=0.05), method  # and the contrast's length
    with pytest.raises(UsageError, match="pairs"):
        contrast_direction(pos, neg[:-1], "pca")


@pytest.fixture(scope="module")
def tiny_vectors(tiny_tokenizer):
    from eigenpatch.calibration import calibration_windows
    from eigenpatch.zoo import resolve_text

    model = make_tiny("llama")
    windows = calibration_windows(tiny_tokenizer, resolve_text("news", "calib"), 16, 64)
    pos, neg = read_prompts(DATA / "positive.txt"), read_prompts(DATA / "negative.txt")
    spectral = build_steering_vectors(model, tiny_tokenizer, pos, neg, [0, 1], subspace="auto", calib_windows=windows)
    raw = build_steering_vectors(model, tiny_tokenizer, pos, neg, [0, 1])  # default: unrestricted
    assert "subspace" not in raw.meta
    rest = build_steering_vectors(model, tiny_tokenizer, pos, neg, [0, 1], subspace="complement", calib_windows=windows)
    for layer in (0, 1):  # the complement is exactly what the restriction removed
        torch.testing.assert_close(spectral.vectors[layer] + rest.vectors[layer], raw.vectors[layer], atol=1e-5, rtol=0)
    return spectral, raw


def test_spectral_vector_is_the_projection_of_the_raw_one(tiny_vectors):
    spectral, raw = tiny_vectors
    sub = spectral.meta["subspace"]
    for layer in (0, 1):
        v, r = spectral.vectors[layer].double(), raw.vectors[layer].double()
        rank = sub["ranks"][str(layer)]
        assert 1 <= rank < 128
        assert float(v.norm()) < float(r.norm())  # something was removed ...
        assert float((r - v) @ v) == pytest.approx(0.0, abs=1e-3 * float(r.norm()) ** 2)  # ... orthogonally
        assert sub["energy_kept"][str(layer)] == pytest.approx(float(v.norm() ** 2 / r.norm() ** 2), rel=1e-4)


def test_vector_file_round_trip_and_bad_files(tiny_vectors, tmp_path):
    spectral, _ = tiny_vectors
    path = spectral.save(tmp_path / "v.safetensors")
    back = SteeringVectors.load(path)
    assert back.layers == [0, 1] and back.meta["model"] == model_fingerprint(make_tiny("llama"))
    torch.testing.assert_close(back.vectors[1], spectral.vectors[1])
    with pytest.raises(UsageError, match="already exists"):
        spectral.save(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UsageError, match="not a safetensors file"):
        SteeringVectors.load(tmp_path / "junk.safetensors")
    with pytest.raises(UsageError, match="another model"):
        back.check_model(make_tiny("llama", seed=5))
    with pytest.raises(UsageError, match="hidden size"):
        SteeringVectors({0: torch.zeros(7)}).check_model(make_tiny("llama"))


def test_static_steering_adds_the_vector_and_round_trips(tiny_vectors, tmp_path):
    spectral, _ = tiny_vectors
    path = spectral.save(tmp_path / "v.safetensors")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = make_tiny("llama")
    model = make_tiny("llama")
    report = eigenpatch.patch(model, Steer(vectors=str(path), strength=2.5, layers="1", start=3))
    assert report["steps"][0]["layers"] == [1] and len(report["steps"][0]["sha256"]) == 64
    assert isinstance(decoder_layers(model)[1].steer_out, HiddenShift)
    assert not hasattr(decoder_layers(model)[0], "steer_out")
    torch.testing.assert_close(_layer_output(model, ids, 0), _layer_output(plain, ids, 0))  # layer 0 untouched
    shift = _layer_output(model, ids, 1) - _layer_output(plain, ids, 1)
    torch.testing.assert_close(shift[:, 3:], (2.5 * spectral.vectors[1]).expand_as(shift[:, 3:]), atol=1e-5, rtol=0)
    assert shift[:, :3].abs().max() == 0  # positions before start are untouched
    with torch.no_grad():
        out = model(ids)

    eigenpatch.save(model, tmp_path / "ckpt")
    spec = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["interventions"]
    assert spec == {"model.layers.1.steer_out": {"kind": "shift", "hook": "post", "dim": 128, "start": 3}}
    loaded = eigenpatch.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out.logits)


def _layer_output(model, ids, index):
    captured = {}
    layer = decoder_layers(model)[index]
    handle = layer.register_forward_hook(lambda m, a, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured["h"]


def test_strength_zero_is_exactly_the_unsteered_model_and_shifts_add_up(tiny_vectors, tmp_path):
    spectral, _ = tiny_vectors
    path = str(spectral.save(tmp_path / "v.safetensors"))
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = make_tiny("llama")(ids).logits
        zero = make_tiny("llama")
        eigenpatch.patch(zero, Steer(vectors=path, strength=0.0))
        assert torch.equal(zero(ids).logits, plain)
        twice, once = make_tiny("llama"), make_tiny("llama")
        eigenpatch.patch(twice, [Steer(vectors=path, strength=1.0), Steer(vectors=path, strength=1.5)])
        eigenpatch.patch(once, Steer(vectors=path, strength=2.5))
        torch.testing.assert_close(twice(ids).logits, once(ids).logits)
        assert (once(ids).logits - plain).abs().max() > 1e-3


def test_steer_build_and_patch_model_cli(tiny_tokenizer, tmp_path, capsys):
    from eigenpatch.cli import main, patch_model_main
    from eigenpatch.errors import EXIT_USAGE

    src = tmp_path / "tiny"
    make_tiny("qwen2").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    before = tree_digest(src)
    vec = tmp_path / "sent.safetensors"
    build = ["steer", "build", str(src), "--positive", str(DATA / "positive.txt"), "--negative"]
    build += [str(DATA / "negative.txt"), "--layers", "0-1", "--subspace", "auto", "--calib", "news"]
    build += ["--calib-windows", "8", "-o", str(vec)]
    assert main([*build, "-q"]) == 0
    assert "energy kept" in capsys.readouterr().out and vec.is_file()
    assert main(["steer", "show", str(vec)]) == 0 and '"method": "mean"' in capsys.readouterr().out

    out = tmp_path / "out"
    assert patch_model_main([str(src), "--steer", str(vec), "--strength", "-2", "-o", str(out), "-q"]) == 0
    assert "steer: " in capsys.readouterr().out
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [s["transform"] for s in qconfig["recipe"]] == ["steer"] and len(qconfig["interventions"]) == 2
    assert tree_digest(src) == before  # the input is never modified

    bad_pairs = [
        ([str(src), "--steer", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "b1"), "-q"], "does not exist"),
        ([str(src), "--steer", str(vec), "--steer-layers", "5", "-o", str(tmp_path / "b2"), "-q"], "layers"),
    ]
    for argv, message in bad_pairs:
        assert patch_model_main(argv) == EXIT_USAGE
        assert message in capsys.readouterr().err
        assert not Path(argv[-2]).exists()
    assert main([*build[:-1], str(tmp_path / "v2.safetensors"), "--layers", "4", "-q"]) == EXIT_USAGE
    assert "layers" in capsys.readouterr().err and not (tmp_path / "v2.safetensors").exists()
