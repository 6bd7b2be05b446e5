"""Checkpoints written by older eigenpatch code still load, with the logits they had when written.

``tests/fixtures/format_v1/`` holds one tiny checkpoint per kind (low-rank, both structured
layouts, shield projection, steering shift) written by commit 26f136d, the last commit before the
one-room-per-transform layout, with ``make_fixtures.py`` beside them, plus the logits that code
computed; ``snap``, added later, by the commit that added it. A layout change that renames a
tensor, a layer kind or an intervention breaks this.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import eigenpatch

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
KINDS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def test_every_kind_has_a_fixture():
    assert KINDS == ["lowrank", "shield", "snap", "steer", "structured_blockshuffle", "structured_lowrank"]


@pytest.mark.parametrize("kind", KINDS)
def test_old_checkpoint_loads_with_identical_logits(kind):
    """The stored logits were computed on another CPU, whose GEMM kernels round differently (AVX2 vs
    AVX-512/AMX differ by ~1e-7 here): equal within 1e-5, far below what a renamed, missing or
    re-initialized tensor does (order 1). Both load paths agree bit for bit on one machine."""
    expected = load_file(str(FIXTURES / kind / "expected_logits.safetensors"))
    outputs = []
    for model in (eigenpatch.load(FIXTURES / kind), AutoModelForCausalLM.from_pretrained(FIXTURES / kind)):
        with torch.no_grad():
            outputs.append(model.eval()(input_ids=expected["input_ids"]).logits)
        torch.testing.assert_close(outputs[-1], expected["logits"], rtol=1e-5, atol=1e-5, msg=kind)
        if "inputs_embeds" in expected:  # a kind that acts on embeddings passed in (snap)
            with torch.no_grad():
                logits = model(inputs_embeds=expected["inputs_embeds"]).logits
            torch.testing.assert_close(logits, expected["logits_embeds"], rtol=1e-5, atol=1e-5, msg=kind)
    assert torch.equal(outputs[0], outputs[1]), kind


@pytest.mark.parametrize("kind", KINDS)
def test_old_recipes_without_versions_replay_as_version_1(kind):
    from eigenpatch.recipe import recipe_of

    recipe = recipe_of(FIXTURES / kind)
    assert recipe and all(type(c).version == 1 for c in recipe)


def test_newer_recipe_entries_and_steering_files_are_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    from eigenpatch.errors import UsageError
    from eigenpatch.format.steering import SteeringVectors
    from eigenpatch.recipe import config_from_dict

    with pytest.raises(UsageError, match="upgrade"):
        config_from_dict({"transform": "svd", "version": 99, "ratio": 0.5})
    path = tmp_path / "future.safetensors"
    save_file({"layers.0": torch.ones(4)}, str(path), {"eigenpatch": '{"format": "eigenpatch-steer", "version": 2}'})
    with pytest.raises(UsageError, match="upgrade"):
        SteeringVectors.load(path)
