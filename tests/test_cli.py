"""CLI behaviour users rely on: bad input -> one line, exit 2, nothing written; input untouched."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_folder, tree_digest
from safetensors.torch import load_file, save_file

from eigenpatch.cli import main, patch_model_main
from eigenpatch.errors import EXIT_USAGE


def _corrupt(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _nan_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[key][0, 0] = math.nan
    save_file(tensors, weights, metadata={"format": "pt"})


BAD_INPUTS = {
    "missing model folder": (["./no/such/model"], None, "not found"),
    "unknown model name": (["no-such-zoo-model"], None, "not found"),
    "ratio zero": (["{tiny}", "--compress", "0"], None, "outside (0, 1)"),
    "ratio above one": (["{tiny}", "--compress", "1.5"], None, "outside (0, 1)"),
    "ratio not a number": (["{tiny}", "--compress", "half"], None, "not a number"),
    "unsupported module names": (["{tiny}", "--targets", "c_attn"], None, "c_attn not in this model"),
    "unknown method": (["{tiny}", "--method", "magic"], None, "unknown --method"),
    "FFN taken twice": (["{tiny}", "--structured-ffn", "lowrank", "--targets", "up_proj"], None, "already replaces"),
    "unknown FFN structure": (["{tiny}", "--structured-ffn", "monarch"], None, "invalid choice"),
    "corrupt safetensors": (["{copy}"], _corrupt, "corrupt safetensors"),
    "NaN weights": (["{copy}"], _nan_weights, "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_exit_2_and_no_output(case, tiny_dir, tmp_path, capsys):
    argv, damage, needle = BAD_INPUTS[case]
    copy = copy_folder(tiny_dir, tmp_path / "copy") if damage else None
    if damage:
        damage(copy)
    out = tmp_path / "out"
    argv = [a.format(tiny=tiny_dir, copy=copy) for a in argv]
    if "--compress" not in argv:
        argv += ["--compress", "0.5"]
    if "--method" not in argv:
        argv += ["--method", "svd"]  # plumbing: the data-free method (the tiny folder has no tokenizer)
    with pytest.raises(SystemExit) as exc:  # argparse-level errors exit directly ...
        sys.exit(patch_model_main([*argv, "-o", str(out), "-q"]))
    assert exc.value.code == EXIT_USAGE  # ... and ours return the same code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert needle in err[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["copy"] if damage else [])


def test_existing_output_is_refused_without_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert patch_model_main([str(tiny_dir), "--compress", "0.5", "--method", "svd", "-o", str(out), "-q"]) == EXIT_USAGE
    assert "--force" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    assert (
        patch_model_main([str(tiny_dir), "--compress", "0.5", "--method", "svd", "-o", str(out), "-q", "--force"]) == 0
    )
    assert (out / "config.json").is_file()


def test_patch_leaves_input_byte_identical_and_reports_counts(tiny_dir, tmp_path, capsys):
    before = tree_digest(tiny_dir)
    out = tmp_path / "patched"
    assert patch_model_main([str(tiny_dir), "--compress", "0.5", "--method", "svd", "-o", str(out), "-q"]) == 0
    assert tree_digest(tiny_dir) == before
    report = json.loads((out / "eigenpatch_report.json").read_text())
    step = report["steps"][0]
    assert 0.49 <= step["targeted_params_after"] / step["targeted_params_before"] <= 0.5
    assert report["model_params_after"] < report["model_params_before"]
    assert report["weights_bytes"] < report["input_weights_bytes"]
    summary = capsys.readouterr().out
    assert (
        "targeted Linears (uniform+svd)" in summary and "whole model params" in summary and "weights on disk" in summary
    )


def test_console_script_exit_code_and_help(tiny_dir, tmp_path):
    bindir = Path(sys.executable).parent
    help_text = subprocess.run([bindir / "patch-model", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--compress" in help_text and "examples:" in help_text
    bad = subprocess.run(
        [bindir / "patch-model", str(tiny_dir), "--compress", "2", "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == EXIT_USAGE and "outside (0, 1)" in bad.stderr
    sub = subprocess.run([bindir / "eigenpatch", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(cmd in sub for cmd in ("patch", "eval", "inspect"))


def test_inspect_reports_ranks_and_draws_plot(tiny_dir, tmp_path, capsys):
    plot = tmp_path / "spectra.png"
    assert main(["inspect", str(tiny_dir), "--compress", "0.5", "--plot", str(plot), "-q"]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "break-even" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_patched_model_forward_is_finite(tiny_dir, tmp_path):
    import eigenpatch

    out = tmp_path / "p"
    assert patch_model_main([str(tiny_dir), "--compress", "0.5", "--method", "svd", "-o", str(out), "-q"]) == 0
    model = eigenpatch.load(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.fixture
def tiny_dir_with_tokenizer(tiny_dir, tiny_tokenizer, tmp_path):
    folder = copy_folder(tiny_dir, tmp_path / "tiny-tok")
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_calibration_text_shorter_than_a_window_exits_2(tiny_dir_with_tokenizer, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    out = tmp_path / "out"
    argv = [str(tiny_dir_with_tokenizer), "--compress", "0.5", "--method", "loss+whiten", "--calib", str(short)]
    assert patch_model_main([*argv, "-o", str(out), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shorter than one window" in err[0]
    assert not out.exists()


def test_data_aware_method_from_the_cli(tiny_dir_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(tiny_dir_with_tokenizer), "--compress", "0.3", "--method", "welore+whiten", "--calib", "news"]
    assert patch_model_main([*argv, "--calib-windows", "4", "--calib-seq-len", "32", "-o", str(out), "-q"]) == 0
    recipe = json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]
    assert recipe[0]["allocator"] == "welore" and recipe[0]["factorizer"] == "whiten"
    assert recipe[0]["calib_windows"] == 4
    assert recipe[0]["sequential"] and recipe[0]["refine_steps"] == 64  # layer by layer by default
    assert (out / "tokenizer.json").is_file()
    one_shot = tmp_path / "one-shot"
    assert (
        patch_model_main(
            [*argv, "--calib-windows", "4", "--calib-seq-len", "32", "--one-shot", "-o", str(one_shot), "-q"]
        )
        == 0
    )
    recipe = json.loads((one_shot / "config.json").read_text())["quantization_config"]["recipe"]
    assert not recipe[0]["sequential"] and recipe[0]["refine_steps"] == 0
