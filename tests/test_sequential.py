"""The layer-by-layer engine and propagated-input factorization: streams, exactness, the objective."""

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny
from transformers import AutoModelForCausalLM, GPT2Config

import eigenpatch
from eigenpatch.engine.passes import run_layers
from eigenpatch.engine.streams import decoder_layers
from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.patchers import LowRank
from eigenpatch.patchers.lowrank.factorize import factorize, whitening
from eigenpatch.patchers.lowrank.propagate import refit


def _windows(n: int, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


class _Tokens:
    """A tokenizer stand-in for random calibration ids (plumbing: the engine only sees token ids)."""

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": _windows(1, 64 * 16, seed=1)[0].tolist()}


def test_streams_carry_each_layers_true_input(tiny_family):
    """With a visitor that changes nothing, both streams hold exactly the hidden states the model's
    own forward gives each layer (masks, rotary embeddings and Gemma3's per-layer-type masks included)."""
    model = make_tiny(tiny_family)
    ids = _windows(3)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = []

    def visit(step):
        seen.append(step.index)
        assert step.prefix == f"model.layers.{step.index}."
        for stream in (step.inputs, step.dense_in):
            torch.testing.assert_close(torch.cat(stream), expected[step.index], rtol=1e-5, atol=1e-5)

    report = run_layers(model, ids, visit, batch_size=2, show_progress=False)  # batches of 2 and 1
    assert seen == list(range(len(decoder_layers(model))))
    assert report.stream_bytes == 2 * ids.numel() * model.config.hidden_size * 4


def test_refit_is_the_least_squares_optimum():
    """At full rank and no damping, the pair reproduces ``lstsq(X', X W^T)``: the best map from the
    propagated inputs to the dense outputs. For a ``W`` of rank 6, whitening reproduces ``W`` at
    rank 6 and keeps the error the changed inputs cause; the refit corrects it."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    drift = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=gen, dtype=torch.float64)
    x_prop = x @ drift + 0.01 * torch.randn(400, 16, generator=gen, dtype=torch.float64)  # what earlier layers did
    gram, cross = x_prop.T @ x_prop, x.T @ x_prop
    up, down = refit(w, 16, gram, cross, damp=0.0)
    torch.testing.assert_close(up @ down, torch.linalg.lstsq(x_prop, x @ w.T).solution.T)

    def error(b: torch.Tensor) -> float:
        return (x @ w.T - x_prop @ b.T).square().sum().item()

    up, down = refit(w, 6, gram, cross, damp=0.0)
    plain_up, plain_down = factorize(w, 6, whitening(gram))
    assert error(up @ down) < 0.01 * error(plain_up @ plain_down)


def test_refit_on_unchanged_inputs_is_plain_whitening():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    up, down = refit(w, 5, x.T @ x, x.T @ x, damp=0.0)
    plain_up, plain_down = factorize(w, 5, whitening(x.T @ x))
    torch.testing.assert_close(up @ down, plain_up @ plain_down)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sequential_fits_the_dense_outputs_better_on_its_calibration_tokens(family):
    """The objective it minimizes: the patched model's logits on the calibration windows are closer
    to the dense model's than one-shot whitening gets at the same ranks."""
    config = dict(ratio=0.3, allocator="uniform", factorizer="whiten", calib_windows=16, calib_seq_len=64)
    windows = torch.tensor(_Tokens()("")["input_ids"]).view(16, 64)
    dense = make_tiny(family)
    with torch.no_grad():
        reference = dense(input_ids=windows).logits
    errors = {}
    for sequential in (False, True):
        model = make_tiny(family)
        report = eigenpatch.patch(
            model, LowRank(**config, sequential=sequential), tokenizer=_Tokens(), calib_text="-", show_progress=False
        )
        assert all(isinstance(m, LowRankLinear) for n, m in model.named_modules() if n.endswith("_proj"))
        with torch.no_grad():
            errors[sequential] = (model(input_ids=windows).logits - reference).square().mean().item()
        if sequential:
            assert len(report["steps"][0]["layer_by_layer"]["layer_seconds"]) == model.config.num_hidden_layers
    assert errors[True] < 0.7 * errors[False]


def test_architecture_without_a_layer_list_is_one_line():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UsageError, match=r"GPT2LMHeadModel has no decoder-layer list .* supported: Llama"):
        decoder_layers(gpt2)


def test_refinement_lowers_each_layers_error_or_keeps_the_closed_form():
    model = make_tiny("llama")
    config = LowRank(ratio=0.5, allocator="uniform", factorizer="whiten", calib_windows=16, calib_seq_len=64,
                     sequential=True, refine_steps=32, refine_lr=1e-3)  # fmt: skip
    report = eigenpatch.patch(model, config, tokenizer=_Tokens(), calib_text="-", show_progress=False)
    refined = report["steps"][0]["layer_by_layer"]["refined"]
    assert len(refined) == model.config.num_hidden_layers
    assert all(r["after"] <= r["before"] for r in refined) and any(r["after"] < 0.95 * r["before"] for r in refined)
