"""EigenShield: random-matrix fit on synthetic spiked covariances, scores, the projector, the format."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_onnx_parity_and_effect, make_tiny

import eigenpatch
from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import HiddenProjection, attach, decoder_layers, detach
from eigenpatch.patchers.eigenshield.config import EigenShield
from eigenpatch.patchers.eigenshield.rmt import (
    debias_spike,
    estimate_noise,
    fit_spectrum,
    mp_edges,
    mp_median,
    spike_overlap,
)
from eigenpatch.patchers.eigenshield.stats import SiteStats
from eigenpatch.patchers.eigenshield.transform import fit_subspace
from eigenpatch.patchers.hidden_states import parse_site

N, D, SIGMA2 = 6000, 240, 2.0
THETAS = (40.0, 25.0, 15.0, 10.0, 6.0)  # all above the BBP threshold sigma^2 sqrt(d/n) = 0.4


def spiked(n: int = N, d: int = D, thetas=THETAS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of covariance ``sigma^2 I + sum theta_k u_k u_k^T`` and the planted ``u`` [d, k]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, len(thetas), generator=g, dtype=torch.float64))[0]
    x = math.sqrt(SIGMA2) * torch.randn(n, d, generator=g, dtype=torch.float64)
    x += torch.randn(n, len(thetas), generator=g, dtype=torch.float64) * torch.tensor(thetas).sqrt() @ u.T
    return x, u


def stats_of(x: torch.Tensor, chunks: int = 8) -> SiteStats:
    stats = SiteStats(x.shape[1], chunks)
    for c, part in enumerate(x.chunk(chunks)):
        stats.add(c, part)
    return stats


def test_marchenko_pastur_median_matches_pure_noise():
    for n, d in ((4000, 400), (500, 1000)):
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        values = torch.linalg.eigvalsh(x.T @ x / n).flip(0)  # d of them, d - n zero when d > n
        assert float(values[: min(n, d)].median()) == pytest.approx(mp_median(d / n), rel=0.02)
        assert estimate_noise(values, n) == pytest.approx(1.0, rel=0.02)


def test_bulk_edge_within_5_percent_and_spikes_recovered():
    x, u = spiked()
    cov = torch.cov(x.T, correction=0)
    spectrum = fit_spectrum(cov, N)
    theory = mp_edges(SIGMA2, D / N)[1]
    assert spectrum.edge == pytest.approx(theory, rel=0.05)
    assert spectrum.spikes == len(THETAS)
    # each planted direction is found, with the overlap random-matrix theory predicts
    for k, theta in enumerate(THETAS):
        overlap = float((spectrum.eigenvectors[:, k] @ u[:, k]) ** 2)
        ell = debias_spike(float(spectrum.eigenvalues[k]), spectrum.sigma2, D / N)
        assert ell == pytest.approx(1 + theta / SIGMA2, rel=0.1)
        assert overlap == pytest.approx(spike_overlap(1 + theta / SIGMA2, D / N), abs=0.03)
        assert overlap > 0.9


def test_iterated_noise_estimate_agrees_with_median():
    x, _ = spiked()
    values = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    assert estimate_noise(values, N, "iterate") == pytest.approx(SIGMA2, rel=0.03)


def test_perturbation_score_marks_the_planted_sensitive_direction_correlational():
    x, u = spiked()
    stats = stats_of(x)
    g = torch.Generator().manual_seed(2)
    # perturbations that move hidden states mostly along planted direction 1 (a strong spike)
    delta = 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    delta += 3.0 * torch.randn(N, 1, generator=g, dtype=torch.float64) * u[:, 1]
    stats.add_delta(delta)
    sub = fit_subspace(stats, EigenShield(score="perturbation", standardize=False))
    planted = int((sub.spectrum.eigenvectors[:, : sub.spectrum.spikes].T @ u[:, 1]).abs().argmax())
    assert int(sub.scores.argmax()) == planted
    assert planted in sub.correlational.tolist() and planted not in sub.causal.tolist()


def test_deficit_below_the_lower_edge_is_found_and_scored_only_as_an_outlier():
    x, u = spiked(thetas=(40.0, 25.0))
    # a direction clean data barely varies in (variance 0.05 against sigma^2 = 2): a deficit
    g = torch.Generator().manual_seed(4)
    w = torch.linalg.qr(torch.cat([u, torch.randn(D, 1, generator=g, dtype=torch.float64)], 1))[0][:, -1]
    x -= torch.outer(x @ w, w) * (1 - math.sqrt(0.05 / SIGMA2))
    stats = stats_of(x)
    # perturbations mostly along that direction, as a gradient attacker's would be
    delta = 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    delta += 1.0 * torch.randn(N, 1, generator=g, dtype=torch.float64) * w
    stats.add_delta(delta)
    outliers = fit_subspace(stats, EigenShield(standardize=False, candidates="outliers"))
    s = outliers.spectrum
    assert s.lower_edge == pytest.approx(mp_edges(SIGMA2, D / N)[0], rel=0.05)
    assert s.spikes == 2 and s.deficits >= 1
    wide = fit_spectrum(torch.cov(x[:100].T, correction=0), 100)  # d > n: d - n zeros by rank, not deficits
    assert wide.lower_edge == 0 and wide.deficits == 0
    assert float((s.eigenvectors[:, -1] @ w) ** 2) > 0.99  # the smallest eigenvalue is the planted one
    assert int(outliers.candidates[outliers.scores.argmax()]) == D - 1
    assert outliers.correlational.tolist() == [D - 1]  # default quantile: just the one
    assert outliers.projection("drop", "post").rank == 1
    spikes = fit_subspace(stats, EigenShield(standardize=False, candidates="spikes"))
    assert spikes.candidates.tolist() == [0, 1] and D - 1 not in spikes.correlational.tolist()
    # the resampling score is defined on deficits too (against the held-out bottom subspace)
    resampled = fit_subspace(stats, EigenShield(standardize=False, score="resample", candidates="outliers"))
    assert resampled.scores.shape == outliers.scores.shape and bool((resampled.scores >= 0).all())


def test_resample_score_marks_a_direction_carried_by_few_samples_correlational():
    x, u = spiked(thetas=(40.0, 25.0, 15.0, 10.0))
    # a fifth spike that exists only in the first chunk's samples: not a property of the data
    g = torch.Generator().manual_seed(3)
    bad = torch.linalg.qr(torch.cat([u, torch.randn(D, 1, generator=g, dtype=torch.float64)], 1))[0][:, -1]
    x[: N // 8] += torch.randn(N // 8, 1, generator=g, dtype=torch.float64) * math.sqrt(8 * 12.0) * bad
    sub = fit_subspace(stats_of(x), EigenShield(score="resample", standardize=False))
    assert sub.spectrum.spikes == 5
    planted = int((sub.spectrum.eigenvectors[:, :5].T @ bad).abs().argmax())
    assert int(sub.scores.argmax()) == planted
    assert planted in sub.correlational.tolist()


def test_projection_algebra_keep_drop_and_start():
    d, k = 16, 4
    basis = torch.linalg.qr(torch.randn(d, k))[0]
    mu = torch.randn(d)
    h = torch.randn(2, 5, d)
    keep = HiddenProjection.from_bases(mu, basis.T, basis, mode="keep")
    drop = HiddenProjection.from_bases(mu, basis.T, basis, mode="drop")
    proj = (h - mu) @ basis @ basis.T
    torch.testing.assert_close(keep(h), mu + proj)
    torch.testing.assert_close(drop(h), h - proj)
    torch.testing.assert_close(keep(h) + drop(h) - mu, h)  # complementary
    late = HiddenProjection.from_bases(mu, basis.T, basis, mode="drop", start=2)
    out = late(h, torch.arange(5)[None])
    torch.testing.assert_close(out[:, :2], h[:, :2])
    torch.testing.assert_close(out[:, 2:], drop(h)[:, 2:])


def test_standardized_projector_is_an_oblique_projection():
    x, _ = spiked()
    x = x * torch.linspace(0.1, 10, D, dtype=torch.float64)  # wildly different scales per dimension
    stats = stats_of(x)
    stats.add_delta(torch.randn(N, D, dtype=torch.float64))
    sub = fit_subspace(stats, EigenShield(standardize=True, quantile=0.5))
    p = sub.projection("drop", "post")
    m = p.basis_out.double() @ p.basis_in.double()
    torch.testing.assert_close(m @ m, m, atol=1e-5, rtol=1e-5)  # idempotent
    assert p.rank == sub.correlational.numel() >= 1


@pytest.mark.parametrize("hook", ["pre", "post"])
def test_attached_projection_changes_outputs_survives_deepcopy_and_detaches(hook):
    model = make_tiny("llama")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    d = model.config.hidden_size
    basis = torch.linalg.qr(torch.randn(d, 8))[0]
    layer = decoder_layers(model)[0]
    attach(layer, HiddenProjection.from_bases(torch.zeros(d), basis.T, basis, mode="drop", hook=hook))
    shielded = model(ids).logits
    assert (shielded - before).abs().max() > 1e-3
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(ids).logits, shielded)
    assert detach(decoder_layers(twin)[0], hook) is not None
    torch.testing.assert_close(twin(ids).logits, before)  # the copy's hook went with it
    torch.testing.assert_close(model(ids).logits, shielded)  # and the original kept its own


@pytest.mark.parametrize("site", ["embed", "layer:0", "layer:-1"])
def test_transform_round_trips_through_save_and_load(site, tiny_tokenizer, tmp_path):
    from eigenpatch.zoo import resolve_text

    model = make_tiny("llama")
    config = EigenShield(site=site, calib_windows=16, calib_seq_len=64, chunks=4)
    report = eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, calib_text=resolve_text("news", "calib"))
    step = report["steps"][0]
    assert step["spikes"] >= 1 and step["rank"] == step["correlational"]
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    eigenpatch.save(model, tmp_path / "out")
    loaded = eigenpatch.load(tmp_path / "out")
    assert loaded.config.quantization_config.interventions == model.config.quantization_config.interventions
    torch.testing.assert_close(loaded(ids).logits, expected)
    plain = make_tiny("llama")(ids).logits
    assert (expected - plain).abs().max() > 1e-4  # the stored projection is really applied


def test_bad_options_and_sites_are_clear_errors():
    with pytest.raises(UsageError, match="mode"):
        EigenShield(mode="both")
    with pytest.raises(UsageError, match="score"):
        EigenShield(score="vibes")
    with pytest.raises(UsageError, match="candidates"):
        EigenShield(candidates="bulk")
    with pytest.raises(UsageError, match="site"):
        parse_site("layer:9", 2)
    with pytest.raises(UsageError, match="site"):
        parse_site("pooled", 2)
    model = make_tiny("llama")
    with pytest.raises(UsageError, match="calibration text"):
        eigenpatch.patch(model, EigenShield())


def test_patch_model_shield_cli_and_shield_spectrum_plot(tmp_path, tiny_tokenizer, capsys):
    import json

    from eigenpatch.cli import main, patch_model_main
    from eigenpatch.errors import EXIT_USAGE

    src = tmp_path / "tiny"
    make_tiny("qwen2").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    argv = [str(src), "--shield", "layer:1", "--shield-mode", "keep", "--shield-calib", "news", "-o", str(out), "-q"]
    assert patch_model_main(argv) == 0
    printed = capsys.readouterr().out
    assert "eigenshield @layer:1 (keep)" in printed and "causal" in printed and "chosen: worst cost" in printed
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [step["transform"] for step in qconfig["recipe"]] == ["eigenshield"]
    ((name, spec),) = qconfig["interventions"].items()
    assert name == "model.layers.1.project_out" and spec["mode"] == "keep" and spec["hook"] == "post"
    assert isinstance(decoder_layers(eigenpatch.load(out))[1].project_out, HiddenProjection)

    plot = tmp_path / "spectrum.png"
    assert main(["inspect", str(src), "--shield-spectrum", "embed", "--calib", "news", "--plot", str(plot), "-q"]) == 0
    assert "spikes" in capsys.readouterr().out and plot.stat().st_size > 10_000

    bad = [str(src), "--shield", "layer:7", "--calib", "news", "-o", str(tmp_path / "bad"), "-q"]
    assert patch_model_main(bad) == EXIT_USAGE
    assert "'layer:L' with L in [-2, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_calibration_set_takes_equal_windows_per_text_and_holds_some_out(tiny_tokenizer):
    from eigenpatch.patchers.eigenshield.select import calibration_set

    config = EigenShield(calib=("news", "wiki"), calib_windows=8, calib_seq_len=32, check_windows=3)
    windows = calibration_set(tiny_tokenizer, config, None)
    assert windows.fit.shape == (8, 32) and list(windows.check) == ["news", "wiki"]
    fit_rows = {tuple(row.tolist()) for row in windows.fit}
    for held in windows.check.values():
        assert held.shape == (3, 32)
        assert not fit_rows & {tuple(row.tolist()) for row in held}  # never fitted on
    with pytest.raises(UsageError, match="max_cost"):
        EigenShield(max_cost=0)


@pytest.mark.parametrize("max_cost", [1e9, 1e-6])
def test_quantile_is_the_most_protective_one_within_the_worst_texts_cost(max_cost, tiny_tokenizer):
    import warnings

    from eigenpatch.patchers.eigenshield.config import QUANTILE_GRID

    model = make_tiny("llama")
    config = EigenShield(calib=("news", "wiki"), calib_windows=16, calib_seq_len=64, chunks=4, max_cost=max_cost)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, show_progress=False)["steps"][0]
    assert step["calib_texts"] == ["news", "wiki"] and step["quantile_chosen"]
    worst = {float(q): max(costs.values()) for q, costs in step["check_costs"].items()}
    tried = sorted(worst)
    assert tried == sorted(QUANTILE_GRID)[: len(tried)]  # from the most protective end, in order
    assert all(worst[q] > max_cost for q in tried[:-1])  # every more protective one cost too much
    if step["max_cost_met"]:
        assert step["quantile"] == tried[-1] and worst[tried[-1]] <= max_cost
    else:
        assert step["quantile"] == max(QUANTILE_GRID) and len(tried) == len(QUANTILE_GRID)
        assert any("no quantile in the grid" in str(w.message) for w in caught)
    if max_cost == 1e9:
        assert step["quantile"] == min(QUANTILE_GRID) and len(tried) == 1


# The default (embed, drop) is exported by the registry contract test (test_contract.py).
@pytest.mark.parametrize("site,mode", [("layer:1", "keep")])
def test_shielded_checkpoint_exports_to_onnx_with_parity(site, mode, tiny_tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from eigenpatch.zoo import resolve_text

    model = make_tiny("llama")
    config = EigenShield(site=site, mode=mode, calib_windows=16, calib_seq_len=64, chunks=4)
    calib = resolve_text("news", "calib")
    eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, calib_text=calib, show_progress=False)
    eigenpatch.save(model, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    assert_onnx_parity_and_effect(tmp_path / "ckpt", tiny_tokenizer, tmp_path / "onnx", make_tiny("llama"))
