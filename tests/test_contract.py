"""The registry's contract: every registered transform passes the same checks on a tiny model.

For each transform, its config's ``example`` recipe patches a tiny Llama (vLLM-compatible shapes),
and then:

- every config of the recipe survives ``to_dict`` -> ``config_from_dict``, and the recipe stored in
  the checkpoint replays to the same configs (``recipe_of``);
- the saved checkpoint loads with the in-memory model's logits, and the patch changed them;
- the ONNX export matches PyTorch (logits and greedy tokens in ONNX Runtime);
- a real vLLM server on loopback gives transformers' greedy tokens.

A new transform gets these checks by registering itself; nothing here names one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import assert_onnx_parity_and_effect
from transformers import AutoModelForCausalLM
from vllm_server import Server, hf_greedy, served_tokens, tiny_config

import eigenpatch
from eigenpatch.recipe import config_from_dict, recipe_of, registered

TRANSFORMS = sorted(registered())
PROMPTS = ("The fire spread towards the town", "Police said the man")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=TRANSFORMS)
def patched(request, tmp_path_factory, tiny_tokenizer):
    """(recipe, patched model, the model before patching, saved checkpoint) for one transform."""
    from eigenpatch.zoo import resolve_text

    name = request.param
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    workdir = tmp_path_factory.mktemp(f"contract-{name}")
    recipe = registered()[name][0].example(workdir, model)
    assert recipe and recipe[-1].name == name, "example() must end with its own transform"
    plain = copy.deepcopy(model)
    calib = resolve_text("news", "calib")
    eigenpatch.patch(model, recipe, tokenizer=tiny_tokenizer, calib_text=calib, show_progress=False)
    out = eigenpatch.save(model.eval(), workdir / f"tiny-{name}", tokenizer=tiny_tokenizer)
    return recipe, model, plain, out


def test_config_round_trips_and_the_saved_recipe_replays(patched):
    recipe, _, _, out = patched
    for config in recipe:
        entry = config.to_dict()
        assert entry["version"] == type(config).version
        assert config_from_dict(entry) == config
    assert recipe_of(out) == recipe


def test_saved_checkpoint_loads_with_identical_logits(patched):
    _, model, plain, out = patched
    expected = _logits(model)
    assert (expected - _logits(plain)).abs().max() > 1e-4  # the transform did something
    assert (_logits(eigenpatch.load(out)) - expected).abs().max() <= 1e-5


def test_onnx_export_matches_pytorch(patched, tiny_tokenizer, tmp_path):
    _, _, plain, out = patched
    assert_onnx_parity_and_effect(out, tiny_tokenizer, tmp_path / "onnx", plain)


def test_vllm_serves_transformers_greedy_tokens(patched, tiny_tokenizer):
    pytest.importorskip("vllm", reason="serving checks need the serve-cpu extra")
    _, _, _, out = patched
    # Eager: this checks the format and the linear methods, not vLLM's compiler (test_serving does).
    server = Server(Path(out), "--max-model-len", "256", "--dtype", "float32", "--enforce-eager")
    try:
        for prompt in PROMPTS:
            served = served_tokens(server.complete(prompt, max_tokens=16))
            ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert served == hf_greedy(out, ids, len(served)), prompt
    finally:
        server.stop()
