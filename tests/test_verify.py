"""A damaged checkpoint is refused by every loader, with one line naming the tensor or layer and the
fix, and nothing is produced: no freshly initialized factor, no NaN logits, no half-written output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import eigenpatch
from eigenpatch.cli import main
from eigenpatch.errors import EXIT_USAGE
from eigenpatch.format.checkpoint import verify_checkpoint
from eigenpatch.format.verify import CheckpointError

FACTOR = "model.layers.0.mlp.gate_proj.lowrank_up"
PAIR_CODES = "model.layers.1.mlp.down_proj.lowrank_down.qweight"
SHIFT = "model.layers.1.steer_out.vector"
CODES = "model.layers.1.self_attn.q_proj.qweight"
SCALES = "model.layers.0.self_attn.o_proj.scales"
QLAYER = "model.layers.0.self_attn.k_proj"
CORRECTION = "model.layers.1.self_attn.v_proj.correction_up"
CORRECTED_CODES = "model.layers.0.self_attn.v_proj.base.qweight"


def _drop(w: dict, name: str) -> None:
    del w[name]


def _nan(w: dict, name: str) -> None:
    w[name].view(-1)[0] = float("nan")


def _narrow(w: dict, name: str) -> None:
    w[name] = w[name][..., :-1].contiguous()


def _five_bits(c: dict) -> None:
    c["quantization_config"]["layers"][QLAYER]["bits"] = 5


def _extra_layer(c: dict) -> None:
    layers = c["quantization_config"]["layers"]
    layers["model.layers.99.mlp.up_proj"] = layers["model.layers.0.mlp.up_proj"]


# (weights edit, config edit, what the one-line error must name)
DAMAGE = {
    "missing factor": (lambda w: _drop(w, FACTOR), None, FACTOR),
    "nan factor": (lambda w: _nan(w, FACTOR), None, FACTOR),
    "nan steering shift": (lambda w: _nan(w, SHIFT), None, SHIFT),
    "misshapen factor": (lambda w: _narrow(w, FACTOR), None, FACTOR),
    "missing codes": (lambda w: _drop(w, CODES), None, CODES),
    "missing codes of a quantized factor": (lambda w: _drop(w, PAIR_CODES), None, PAIR_CODES),
    "misshapen codes": (lambda w: _narrow(w, CODES), None, CODES),
    "missing correction": (lambda w: _drop(w, CORRECTION), None, CORRECTION),
    "nan correction scale": (lambda w: _nan(w, CORRECTION + "_scale"), None, CORRECTION + "_scale"),
    "missing codes of a corrected Linear": (lambda w: _drop(w, CORRECTED_CODES), None, CORRECTED_CODES),
    "nan scale": (lambda w: _nan(w, SCALES), None, SCALES),
    "unstorable bit width": (None, _five_bits, QLAYER),
    "layer that does not exist": (None, _extra_layer, "model.layers.99.mlp.up_proj"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with factor pairs, quantized Linears, quantized factor pairs (``down_proj``),
    corrected quantized Linears (``v_proj``) and a steering shift (tensors of five kinds to damage)."""
    from conftest import make_tiny

    from eigenpatch.format.steering import SteeringVectors
    from eigenpatch.patchers import SVD, Quantize, Steer
    from eigenpatch.zoo import resolve_text

    model = make_tiny("llama")
    folder = tmp_path_factory.mktemp("verify")
    vec = SteeringVectors({1: torch.ones(128)}).save(folder / "v.safetensors")
    mlp, attention = ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")
    quantized = Quantize(method="rtn", group=32, targets=(*attention, "down_proj"), calib_windows=4, calib_seq_len=64)
    quantized.correction_rank, quantized.correction_targets, quantized.fisher_windows = 4, ("v_proj",), 2
    recipe = [SVD(ratio=0.5, targets=mlp), quantized, Steer(vectors=str(vec))]
    text = resolve_text("news", "calib")
    eigenpatch.patch(model, recipe, tokenizer=tiny_tokenizer, calib_text=text, show_progress=False)
    return eigenpatch.save(model, folder / "good", tokenizer=tiny_tokenizer)


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, good, tmp_path) -> tuple[Path, str]:
    edit_weights, edit_config, names = DAMAGE[request.param]
    out = tmp_path / "damaged"
    shutil.copytree(good, out)
    if edit_weights:
        weights = load_file(out / "model.safetensors")
        edit_weights(weights)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    return out, names


def test_the_intact_checkpoint_passes(good):
    verify_checkpoint(good)
    assert torch.isfinite(eigenpatch.load(good)(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("loader", ["transformers", "eigenpatch.load", "verify_checkpoint"])
def test_python_loaders_raise_a_value_error_naming_the_tensor(damaged, loader):
    folder, names = damaged
    load = {
        "transformers": lambda p: AutoModelForCausalLM.from_pretrained(p),
        "eigenpatch.load": eigenpatch.load,
        "verify_checkpoint": verify_checkpoint,
    }[loader]
    with pytest.raises(ValueError, match="re-run patch-model") as error:
        load(folder)
    assert isinstance(error.value, CheckpointError)
    assert names in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("command", ["eval", "export", "serve"])
def test_cli_commands_exit_2_with_one_line_and_write_nothing(damaged, command, tmp_path, capsys):
    folder, names = damaged
    out = tmp_path / "out"
    argv = {
        "eval": ["eval", str(folder), "--max-tokens", "64", "--json", str(out)],
        "export": ["export", str(folder), "--onnx", str(out)],
        "serve": ["serve", str(folder)],
    }[command]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # (transformers' progress bar may precede it)
    assert len(errors) == 1 and names in errors[0] and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]
