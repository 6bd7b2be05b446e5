"""The registry's contract: every registered transform passes the same checks on a tiny model.

For each transform, its config's ``example`` recipe patches a tiny Llama (vLLM-compatible shapes),
and then:

- every config of the recipe survives ``to_dict`` -> ``config_from_dict``, and the recipe stored in
  the checkpoint replays to the same configs (``recipe_of``);
- the saved checkpoint loads with the in-memory model's logits, and the patch changed them;
- the ONNX export matches PyTorch (logits and greedy tokens in ONNX Runtime), and a real vLLM server
  on loopback gives transformers' greedy tokens and log-probabilities. A server costs about a
  minute and an export ten seconds, so these two run on stacks: as few models as can carry every
  example at once (no transform twice, no Linear touched by two; ``touched_linears``).

A new transform gets these checks by registering itself; nothing here names one.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import assert_onnx_parity_and_effect, pushed
from transformers import AutoModelForCausalLM
from vllm_server import IN_PROCESS_WORKER, Server, hf_greedy_logprobs, served_logprobs, served_tokens, tiny_config

import eigenpatch
from eigenpatch.format.interventions import token_identities_removed
from eigenpatch.recipe import config_from_dict, recipe_of, registered

TRANSFORMS = sorted(registered())
PROMPTS = ("The fire spread towards the town", "Police said the man")


def _tiny() -> torch.nn.Module:
    torch.manual_seed(7)
    return AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()


def _example(name: str, workdir: Path, model: torch.nn.Module) -> list:
    recipe = registered()[name][0].example(workdir, model)
    assert recipe and recipe[-1].name == name, "example() must end with its own transform"
    return recipe


@functools.cache
def _stacks() -> list[tuple[str, ...]]:
    """Transforms grouped greedily so one model carries each group's examples together (computed once:
    it builds each example)."""
    stacks: list[tuple[list[str], set[str], set[str]]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in TRANSFORMS:
            recipe = _example(name, Path(workdir), _tiny())
            names = {c.name for c in recipe}
            linears = {n for c in recipe for n in c.touched_linears()}
            for members, used_names, used_linears in stacks:
                if names.isdisjoint(used_names) and linears.isdisjoint(used_linears):
                    members.append(name)
                    used_names |= names
                    used_linears |= linears
                    break
            else:
                stacks.append(([name], names, linears))
    return [tuple(members) for members, _, _ in stacks]


def _logits(model: torch.nn.Module, embeds: bool = False) -> torch.Tensor:
    """Logits on fixed random token ids, or (``embeds``) on their embeddings plus small noise."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    with torch.no_grad():
        if not embeds:
            return model(input_ids=ids).logits
        rows = model.get_input_embeddings().weight[ids]
        noise = torch.randn(rows.shape, generator=g) * 0.05 * rows.norm(dim=-1).mean() / rows.shape[-1] ** 0.5
        return model(inputs_embeds=rows + noise).logits


@pytest.fixture(scope="module", params=TRANSFORMS)
def patched(request, tmp_path_factory, tiny_tokenizer):
    """(recipe, patched model, the model before patching, saved checkpoint) for one transform."""
    from eigenpatch.zoo import resolve_text

    name = request.param
    model = _tiny()
    workdir = tmp_path_factory.mktemp(f"contract-{name}")
    recipe = _example(name, workdir, model)
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
    recipe, model, plain, out = patched
    embeds = recipe[-1].identity_on_tokens  # its effect shows only on embeddings passed in
    expected = _logits(model, embeds)
    assert (expected - _logits(plain, embeds)).abs().max() > 1e-4  # the transform did something
    loaded = eigenpatch.load(out)
    assert (_logits(loaded, embeds) - expected).abs().max() <= 1e-5
    if embeds:
        assert (_logits(model) - _logits(plain)).abs().max() <= 1e-6  # and token ids pass unchanged


def test_every_transform_is_in_a_stack():
    stacks = _stacks()
    assert sorted(n for stack in stacks for n in stack) == TRANSFORMS
    assert len(stacks) < len(TRANSFORMS)  # the point of stacking: fewer servers than transforms


@pytest.fixture(scope="module", params=_stacks(), ids="+".join)
def stacked(request, tmp_path_factory, tiny_tokenizer):
    """(saved checkpoint, the model before patching) for one stack of examples."""
    from eigenpatch.zoo import resolve_text

    model = _tiny()
    plain = copy.deepcopy(model)
    workdir = tmp_path_factory.mktemp("contract-stack")
    recipe = [config for name in request.param for config in _example(name, workdir, model)]
    calib = resolve_text("news", "calib")
    eigenpatch.patch(model, recipe, tokenizer=tiny_tokenizer, calib_text=calib, show_progress=False)
    out = eigenpatch.save(model.eval(), workdir / ("tiny-" + "-".join(request.param)), tokenizer=tiny_tokenizer)
    assert [c.name for c in recipe_of(out)] == [c.name for c in recipe]
    return out, plain, any(c.identity_on_tokens for c in recipe)


def test_onnx_export_matches_pytorch(stacked, tiny_tokenizer, tmp_path):
    out, plain, _ = stacked
    assert_onnx_parity_and_effect(out, tiny_tokenizer, tmp_path / "onnx", plain)


def test_vllm_serves_transformers_greedy_tokens(stacked, tiny_tokenizer):
    pytest.importorskip("vllm", reason="serving checks need the serve-cpu extra")
    out, _, on_embeds = stacked
    reloaded = eigenpatch.load(out).eval()
    # Eager: this checks the format and the linear methods, not vLLM's compiler (test_serving does).
    args = ("--max-model-len", "256", "--dtype", "float32", "--enforce-eager")
    server = Server(Path(out), *args, *(("--enable-prompt-embeds",) if on_embeds else ()), env=IN_PROCESS_WORKER)
    try:
        replies = {prompt: server.complete(prompt, max_tokens=16) for prompt in PROMPTS}
        if on_embeds:  # a transform acting on embeddings sent in: vLLM must apply it to prompt_embeds too
            table = reloaded.get_input_embeddings().weight.detach()
            embedded = {p: pushed(table[tiny_tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in PROMPTS}
            by_embeds = {prompt: server.complete_embeds(e, max_tokens=16) for prompt, e in embedded.items()}
    finally:
        server.stop()
    for prompt, reply in replies.items():
        ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens, logprobs = hf_greedy_logprobs(reloaded, ids, 16)
        assert served_tokens(reply) == tokens, prompt
        assert served_logprobs(reply) == pytest.approx(logprobs, abs=1e-3), prompt
        if on_embeds:
            with torch.no_grad():
                expected = reloaded.generate(inputs_embeds=embedded[prompt][None], max_new_tokens=16, do_sample=False)
                with token_identities_removed(reloaded):  # what a server that ignored it would give
                    bare = reloaded.generate(inputs_embeds=embedded[prompt][None], max_new_tokens=16, do_sample=False)
            assert served_tokens(by_embeds[prompt]) == expected[0].tolist(), prompt
            assert bare[0].tolist() != expected[0].tolist(), "the perturbation is too small to show the transform"
