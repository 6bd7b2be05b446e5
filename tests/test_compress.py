"""Allocators x factorizers: budgets, exactness, calibration statistics, and the format on every family."""

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny

import eigenpatch
from eigenpatch.calibration import calibration_windows, collect_input_covariances, text_chunks, token_ids
from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.patchers import LowRank, parse_method
from eigenpatch.patchers.lowrank.factorize import factorize, fisher_weighting, whitening
from eigenpatch.patchers.lowrank.oneshot import collect_output_fisher
from eigenpatch.patchers.lowrank.ranks import factorized_params, loss_ranks, welore_ranks
from eigenpatch.patchers.targets import find_linears
from eigenpatch.zoo import resolve_text

# SmolLM2-135M's decoder Linears: 30 layers of q, k, v, o, gate, up, down.
SMOL_SHAPES = {
    f"l{i}.{n}": s
    for i in range(30)
    for n, s in {
        "q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
        "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536),
    }.items()
}  # fmt: skip


def _spectra(seed: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed spectra of varying decay, as real weights have."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in SMOL_SHAPES.items():
        decay = 0.002 + 0.02 * torch.rand(1, generator=gen).item()
        out[name] = torch.exp(-decay * torch.arange(min(m, n), dtype=torch.float64)) + 0.01
    return out


@pytest.mark.parametrize("allocate", [welore_ranks, loss_ranks])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.5])
def test_allocator_meets_parameter_budget(allocate, ratio):
    dense = sum(m * n for m, n in SMOL_SHAPES.values())
    ranks = allocate(SMOL_SHAPES, ratio, _spectra(0))
    kept = factorized_params(SMOL_SHAPES, ranks) / dense
    assert 1 - ratio - 0.005 <= kept <= 1 - ratio
    for name, rank in ranks.items():  # every factor pair saves parameters; the rest stays dense
        m, n = SMOL_SHAPES[name]
        assert rank is None or rank * (m + n) < m * n


def test_welore_gives_heavy_tailed_matrices_fewer_ranks():
    shapes = {"heavy": (256, 256), "flat": (256, 256)}
    idx = torch.arange(256, dtype=torch.float64)
    spectra = {"heavy": torch.exp(-idx / 10), "flat": 1.0 - idx / 512}
    ranks = welore_ranks(shapes, 0.5, spectra)
    assert ranks["heavy"] is not None and (ranks["flat"] is None or ranks["heavy"] < ranks["flat"])


def test_whitening_reproduces_the_dense_layer_at_full_rank():
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    x = torch.randn(64, 500, dtype=torch.float64) * torch.linspace(0.01, 10, 64, dtype=torch.float64)[:, None]
    up, down = factorize(w, 48, whitening(x @ x.T))
    rel = torch.linalg.matrix_norm((up @ down - w) @ x) / torch.linalg.matrix_norm(w @ x)
    assert rel < 1e-4


def test_whitening_minimizes_output_error_not_weight_error():
    torch.manual_seed(0)
    w = torch.randn(64, 64, dtype=torch.float64)
    x = torch.randn(64, 2000, dtype=torch.float64) * torch.logspace(-2, 1, 64, dtype=torch.float64)[:, None]
    plain = factorize(w, 16)
    white = factorize(w, 16, whitening(x @ x.T))
    out_err = [torch.linalg.matrix_norm((u @ d - w) @ x) for u, d in (plain, white)]
    assert out_err[1] < 0.9 * out_err[0]


def test_fwsvd_with_uniform_fisher_equals_plain_svd():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    plain = factorize(w, 7)
    weighted = factorize(w, 7, fisher_weighting(torch.full((30,), 3.7)))
    assert torch.allclose(plain[0] @ plain[1], weighted[0] @ weighted[1], atol=1e-5)


def test_fwhiten_with_uniform_output_weights_equals_whiten():
    torch.manual_seed(0)
    w, x = torch.randn(40, 30), torch.randn(30, 200)
    scaling = whitening((x @ x.T).double())
    a = factorize(w, 9, scaling)
    b = factorize(w, 9, scaling, torch.full((40,), 0.3, dtype=torch.float64))
    assert torch.allclose(a[0] @ a[1], b[0] @ b[1], atol=1e-5)


def test_calibration_text_shorter_than_one_window_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(UsageError, match="shorter than one window"):
        calibration_windows(tiny_tokenizer, "too short to calibrate", n_windows=4, seq_len=512)


def test_calibration_windows_are_deterministic_and_disjoint(tiny_tokenizer):
    text = resolve_text("news", split="calib")
    a = calibration_windows(tiny_tokenizer, text, n_windows=6, seq_len=64, seed=3)
    b = calibration_windows(tiny_tokenizer, text, n_windows=6, seq_len=64, seed=3)
    c = calibration_windows(tiny_tokenizer, text, n_windows=6, seq_len=64, seed=4)
    assert a.shape == (6, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_text_is_tokenized_in_chunks_to_the_ids_of_the_whole(tiny_tokenizer):
    """Cut before a line's newline, a byte-level BPE sees the pieces as it sees the whole text."""
    text = resolve_text("news", split="calib")
    pieces = list(text_chunks(text, size=4096))
    assert len(pieces) > 50 and "".join(pieces) == text
    whole = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert token_ids(tiny_tokenizer, text).tolist() == whole


def test_shared_inputs_share_one_covariance_equal_to_x_xt(tiny_tokenizer):
    model = make_tiny("llama")
    linears = find_linears(model)
    windows = calibration_windows(tiny_tokenizer, resolve_text("news", split="calib"), 3, 32)
    stats = collect_input_covariances(model, linears, windows, batch_size=2, show_progress=False)
    layer = "model.layers.1"
    attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
    assert stats[f"{attn}.q_proj"] is stats[f"{attn}.k_proj"] is stats[f"{attn}.v_proj"]
    assert stats[f"{mlp}.gate_proj"] is stats[f"{mlp}.up_proj"]
    assert stats[f"{attn}.o_proj"] is not stats[f"{attn}.q_proj"]
    assert len({id(s) for s in stats.values()}) == 4 * model.config.num_hidden_layers

    seen = []
    hook = linears[f"{mlp}.down_proj"].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 256)))
    with torch.no_grad():
        model.model(input_ids=windows)
    hook.remove()
    x = torch.cat(seen).double()
    assert torch.allclose(stats[f"{mlp}.down_proj"].value, x.T @ x, rtol=1e-4, atol=1e-6)
    assert stats[f"{mlp}.down_proj"].tokens == 3 * 32


def test_output_fisher_matches_autograd(tiny_tokenizer):
    model = make_tiny("qwen2")
    name = "model.layers.0.mlp.down_proj"
    lin = find_linears(model)[name]
    windows = calibration_windows(tiny_tokenizer, resolve_text("news", split="calib"), 2, 16)
    fisher = collect_output_fisher(model, {name: lin}, windows, batch_size=2, show_progress=False)[name]
    captured = {}
    hook = lin.register_forward_hook(lambda m, a, out: captured.setdefault("y", out))
    model.zero_grad()
    logits = model(input_ids=windows).logits
    hook.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    (grad,) = torch.autograd.grad(loss, captured["y"])
    assert torch.allclose(fisher, grad.double().square().sum(dim=(0, 1)), rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # restored


@pytest.mark.parametrize("method", ["welore+whiten", "loss+fwhiten", "uniform+fwsvd"])
def test_data_aware_methods_roundtrip_on_every_family(method, tiny_family, tiny_tokenizer, tmp_path):
    model = make_tiny(tiny_family)
    config = LowRank(ratio=0.4, calib_windows=4, calib_seq_len=32, fisher_windows=2, **parse_method(method))
    report = eigenpatch.patch(
        model, config, tokenizer=tiny_tokenizer, calib_text=resolve_text("news", split="calib"), show_progress=False
    )
    step = report["steps"][0]
    assert 0.595 <= step["targeted_params_after"] / step["targeted_params_before"] <= 0.6
    ids = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.isfinite(expected).all()
    reloaded = eigenpatch.load(eigenpatch.save(model, tmp_path / "m"))
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == step["factorized"]
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() <= 1e-5


def test_data_aware_method_without_calibration_text_is_refused():
    with pytest.raises(UsageError, match="calibration text"):
        eigenpatch.patch(make_tiny("llama"), LowRank(ratio=0.5, factorizer="whiten"), show_progress=False)


@pytest.mark.parametrize("method", ["whiten", "magic+whiten", "uniform+magic", "uniform+"])
def test_unknown_method_names_are_refused(method):
    with pytest.raises(UsageError, match="unknown --method"):
        parse_method(method)
