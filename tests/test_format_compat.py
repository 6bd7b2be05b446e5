"""Checkpoints in the version-1 layout still load, and compute what that layout means.

``tests/fixtures/format_v1/<kind>/`` keeps, as text, what commit 26f136d (the last before the
one-room-per-transform layout) wrote for one tiny checkpoint per kind: its ``config.json`` (layer
specs, interventions, recipe) and ``manifest.json``, the tensor names, dtypes and shapes of its
``model.safetensors``; ``snap``, added later, by the commit that added it. Weights are not
tracked: the test fills every tensor of the manifest with seeded random values, writes the
checkpoint as old code did, and compares what today's loaders compute with an **independent
dense reference**: a plain transformers Llama whose weights are the v1 factors multiplied out, and
whose interventions are written here from the v1 format's definitions, not taken from eigenpatch.
A layout change that renames a tensor, a layer kind or an intervention, or changes what one
computes, breaks this.

The reference was checked once against the logits the old code itself stored beside its weights
(max |diff| below 1e-6 on every kind) before those weights left git.
"""

from __future__ import annotations

import functools
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import eigenpatch

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"
KINDS = sorted(p.name for p in FIXTURES.iterdir() if (p / "manifest.json").is_file())
IDS = torch.arange(2 * 9).reshape(2, 9) * 13 % 300  # the ids make_fixtures.py used
DTYPES = {"F32": torch.float32}


@functools.cache
def manifest(kind: str) -> dict:
    return json.loads((FIXTURES / kind / "manifest.json").read_text())


def v1_tensors(kind: str) -> dict[str, torch.Tensor]:
    """Every tensor the manifest names, seeded by its name: norms near 1, the rest small Gaussians."""
    tensors = {}
    for name, entry in manifest(kind)["tensors"].items():
        g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{name}".encode()))
        values = torch.randn(entry["shape"], generator=g, dtype=DTYPES[entry["dtype"]])
        tensors[name] = 1 + 0.1 * values if name.endswith("norm.weight") else 0.3 * values
    return tensors


def write_v1(kind: str, folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint as the v1 writer laid it out: its config, and the manifest's tensors."""
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / kind / "config.json", folder / "config.json")
    tensors = v1_tensors(kind)
    save_file(tensors, str(folder / "model.safetensors"), manifest(kind)["metadata"])
    return tensors


# -- the reference: v1 semantics, written out -------------------------------------------------------
def dense_weight(name: str, spec: dict, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """A v1 layer kind's weight ``W [out, in]``, multiplied out from its stored factors."""
    if spec["kind"] == "lowrank":  # y = up (down x)
        return t[f"{name}.lowrank_up"] @ t[f"{name}.lowrank_down"]
    if spec["kind"] == "lowrank_shared":  # the same, ``down`` read from ``down_from`` when set
        return t[f"{name}.lowrank_up"] @ t[f"{spec['down_from'] or name}.lowrank_down"]
    if spec["kind"] == "blockshuffle":
        # Monarch: input block j -> rank s per output block i, then output block i reads (j, s):
        # W[i, p, j, q] = sum_s out[i, p, j, s] in[j, i, s, q]  (in: [j, i, s, q], out: [i, p, j, s])
        w = torch.einsum("ipjs,jisq->ipjq", t[f"{name}.shuffle_out"], t[f"{name}.shuffle_in"])
        return w.reshape(spec["out_features"], spec["in_features"])
    raise AssertionError(f"no v1 reference for layer kind {spec['kind']!r}")


def reference_model(kind: str, t: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """A plain Llama with the v1 checkpoint's meaning: layers multiplied out, interventions as hooks."""
    config = json.loads((FIXTURES / kind / "config.json").read_text())
    q = config.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    state = {k: v for k, v in t.items() if k.endswith(".weight")}
    for name, spec in q["layers"].items():
        state[f"{name}.weight"] = dense_weight(name, spec, t)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    model.load_state_dict(state, strict=True)
    table = state["model.embed_tokens.weight"]
    for name, spec in q["interventions"].items():
        act = intervention(spec, {k[len(name) + 1 :]: v for k, v in t.items() if k.startswith(name + ".")}, table)
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        if spec["hook"] == "pre":
            layer.register_forward_pre_hook(on_input(act), with_kwargs=True)
        else:
            layer.register_forward_hook(on_output(act))
    return model


def on_input(act):
    """A decoder layer's pre-hook applying ``act`` to its hidden states (positional or keyword)."""

    def hook(module, args, kwargs):
        if args:
            return (act(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": act(kwargs["hidden_states"])}

    return hook


def on_output(act):
    """A decoder layer's hook applying ``act`` to the hidden states it returns."""

    def hook(module, args, output):
        return (act(output[0]), *output[1:]) if isinstance(output, tuple) else act(output)

    return hook


def intervention(spec: dict, p: dict[str, torch.Tensor], table: torch.Tensor):
    """``h -> h'`` of one v1 intervention kind, on positions ``>= start`` (the positions are 0..T-1)."""
    if spec["kind"] == "project":  # drop: h - B_out B_in (h - c); keep: c + B_out B_in (h - c)
        moved = lambda h: (h - p["center"]) @ p["basis_in"].T @ p["basis_out"].T  # noqa: E731
        fn = (lambda h: h - moved(h)) if spec["mode"] == "drop" else (lambda h: p["center"] + moved(h))
    elif spec["kind"] == "shift":
        fn = lambda h: h + p["vector"]  # noqa: E731
    elif spec["kind"] == "snap":  # the nearest row of scale * table, by Euclidean distance
        rows = spec["scale"] * table[: spec["vocab"]]
        fn = lambda h: rows[torch.cdist(h.reshape(-1, h.shape[-1]), rows).argmin(-1)].reshape(h.shape)  # noqa: E731
    else:
        raise AssertionError(f"no v1 reference for intervention kind {spec['kind']!r}")

    def act(h: torch.Tensor) -> torch.Tensor:
        out = fn(h)
        late = torch.arange(h.shape[-2]).reshape(-1, 1) >= spec["start"]
        return torch.where(late, out, h)

    return act


def perturbed_rows(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The embeddings of ``IDS`` moved 20 % of their norm in a random direction: snap's input."""
    rows = t["model.embed_tokens.weight"][IDS]
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    return rows + 0.2 * rows.norm(dim=-1, keepdim=True) * noise / noise.norm(dim=-1, keepdim=True)


# -- the tests ---------------------------------------------------------------------------------------
def test_every_kind_has_a_manifest():
    assert KINDS == ["lowrank", "shield", "snap", "steer", "structured_blockshuffle", "structured_lowrank"]


@pytest.mark.parametrize("kind", KINDS)
def test_v1_checkpoint_loads_and_computes_its_meaning(kind, tmp_path):
    """Both load paths (``eigenpatch.load`` and transformers with the plugin) against the reference,
    within 1e-5 (factors vs their product round differently), and bit for bit against each other.
    A tensor read under the wrong name, or a layer computed another way, is off by order 1."""
    t = write_v1(kind, tmp_path / kind)
    reference = reference_model(kind, t)
    outputs = []
    for model in (eigenpatch.load(tmp_path / kind), AutoModelForCausalLM.from_pretrained(tmp_path / kind)):
        with torch.no_grad():
            outputs.append(model.eval()(input_ids=IDS).logits)
            torch.testing.assert_close(outputs[-1], reference(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
            if kind == "snap":  # it acts on embeddings passed in, not on token ids
                embeds = perturbed_rows(t)
                expected = reference(inputs_embeds=embeds).logits
                torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected, rtol=1e-5, atol=1e-5)
                assert torch.allclose(expected, outputs[-1], atol=1e-5), "the rows snap back to the ids' own"
    assert torch.equal(outputs[0], outputs[1]), kind


def test_the_reference_sees_what_the_layout_carries(tmp_path):
    """The comparison has teeth: the steering shift and the shield's projection move the logits."""
    for kind in ("steer", "shield"):
        t = v1_tensors(kind)
        with torch.no_grad():
            shifted = reference_model(kind, t)(input_ids=IDS).logits
            t = {k: (torch.zeros_like(v) if "steer_" in k or "project_" in k else v) for k, v in t.items()}
            plain = reference_model(kind, t)(input_ids=IDS).logits
        assert (shifted - plain).abs().max() > 1e-2, kind


@pytest.mark.parametrize("kind", KINDS)
def test_old_recipes_without_versions_replay_as_version_1(kind):
    from eigenpatch.recipe import recipe_of

    recipe = recipe_of(FIXTURES / kind)
    assert recipe and all(type(c).version == 1 for c in recipe)


def test_newer_recipe_entries_and_steering_files_are_refused_with_the_fix(tmp_path):
    from eigenpatch.errors import UsageError
    from eigenpatch.format.steering import SteeringVectors
    from eigenpatch.recipe import config_from_dict

    with pytest.raises(UsageError, match="upgrade"):
        config_from_dict({"transform": "svd", "version": 99, "ratio": 0.5})
    path = tmp_path / "future.safetensors"
    save_file({"layers.0": torch.ones(4)}, str(path), {"eigenpatch": '{"format": "eigenpatch-steer", "version": 2}'})
    with pytest.raises(UsageError, match="upgrade"):
        SteeringVectors.load(path)
