"""Outputs appear whole or not at all, with ordinary file modes, and a hard kill leaves nothing a
later run trips over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eigenpatch
from eigenpatch.atomic import PARTIAL, atomic_output_dir
from eigenpatch.cli import patch_model_main


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_saved_checkpoint_and_vectors_have_the_modes_save_pretrained_gives(umask_022, tmp_path, tiny_tokenizer):
    from conftest import make_tiny

    from eigenpatch.format.steering import SteeringVectors

    model = make_tiny("llama")
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    out = eigenpatch.save(model, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    modes = _modes(out)
    assert "model.safetensors" in modes
    assert modes == {name: 0o755 if (out / name).is_dir() else 0o644 for name in modes}, modes
    vec = SteeringVectors({0: torch.ones(128)}).save(tmp_path / "v.safetensors")
    assert vec.stat().st_mode & 0o777 == 0o644


def test_a_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert _modes(tmp_path / "out") == {".": 0o700, "f": 0o600}


_SLOW_SAVE = """
import sys, time
import eigenpatch.out_of_core
from eigenpatch.cli import patch_model_main

verify = eigenpatch.out_of_core.verify_checkpoint

def verify_then_hang(folder):  # the shards, index and config are in place; the folder is not yet renamed
    verify(folder)
    print("written", flush=True)
    time.sleep(120)

eigenpatch.out_of_core.verify_checkpoint = verify_then_hang
sys.exit(patch_model_main(sys.argv[1:]))
"""


def test_patch_model_killed_during_the_save_leaves_no_output_and_the_next_run_cleans_up(umask_022, tiny_dir, tmp_path):
    out = tmp_path / "compressed"
    argv = [str(tiny_dir), "--compress", "0.5", "--method", "svd", "-o", str(out), "-q"]
    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(60)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(tmp_path.glob(f".compressed{PARTIAL}{child.pid}-*"))
    assert leftovers and all(p.is_dir() for p in leftovers)  # obviously unfinished, named by its process

    assert patch_model_main(argv) == 0  # the next run replaces nothing and removes the dead run's folder
    assert not list(tmp_path.glob(f".compressed{PARTIAL}*"))
    shards = list(out.glob("model-*.safetensors"))
    assert shards and all(p.stat().st_mode & 0o777 == 0o644 for p in shards)
    eigenpatch.load(out)


def test_a_live_runs_partial_output_is_left_alone(tmp_path):
    live = tmp_path / f".out{PARTIAL}{os.getpid()}-abc"
    live.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert live.is_dir()  # this process is alive: its output may still be in the making
