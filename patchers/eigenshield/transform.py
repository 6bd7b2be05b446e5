"""``eigenshield``: project hidden states onto their random-matrix "causal" subspace.

A **reconstruction** of EigenShield (arXiv 2502.14976; only its abstract is public). Every choice
is named here and exposed in the config; the defaults are the ones ``bench/shield_robustness.py`` measured best.

1. Calibration (``stats``): mean ``mu`` and covariance of the hidden states at the site on
   clean text, streamed in fp64 and chunked; optionally their response to small input
   perturbations.
2. ``standardize``: work in ``z = D^-1 (h - mu)``, ``D = diag(std)``. Residual streams have a few
   dimensions with huge variance; without it those *are* the spectrum and the isotropic-noise
   assumption behind Marchenko-Pastur is hopeless.
3. Marchenko-Pastur fit (``rmt``): ``sigma^2`` from the median eigenvalue (``noise``), bulk edge
   ``sigma^2 (1 + sqrt(d/n))^2 (1 + margin)``; eigenvalues above it are spikes (signal), the rest
   bulk (noise). ``n`` counts tokens; neighbouring tokens are correlated, so the true edge is
   somewhat higher (and the lower one lower); ``margin`` widens the bulk at both ends for that.
   ``candidates``: which eigenvectors the score ranks. ``spikes`` is the paper's reading (only the
   spikes are structure). ``outliers`` adds the *deficits*, eigenvalues below the lower edge
   ``sigma^2 (1 - sqrt(d/n))^2``: isotropic noise cannot produce them either, they are directions
   clean data is constrained in. They matter for a defence: clean inputs have almost no energy
   there, so removing them costs little, while an L2-bounded attacker is free to spend its budget
   there, and the model reads them (on SmolLM2's input embeddings the perturbation score of the
   deficits is over 600x the median; ``bench/shield_robustness.py``).
4. Robustness-based nonconformity score (RbNS) per candidate ``v_k`` (``score``):
   - ``perturbation``: ``s_k = v_k^T Sigma_delta v_k / lambda_k``, how far input perturbations move
     the hidden state along ``v_k`` relative to its natural spread (a direction where a small
     push moves a lot is one an attacker can use);
   - ``resample``: ``s_k = mean_g (1 - ||W_g^T v_k||^2)``, with ``W_g`` the spike (deficit)
     subspace of the covariance without calibration chunk ``g`` (a direction that depends on a
     few samples is not a property of the distribution).
5. Quantile threshold: candidates with ``s_k <= quantile_q(s)`` are **causal**, the other
   candidates **correlational**.
6. Projector (``mode``): ``keep`` maps ``h -> mu + P_C (h - mu)`` onto the causal candidates (the
   bulk is dropped too); ``drop`` maps ``h -> h - P_R (h - mu)``, removing only the correlational
   candidates. With standardization the projector is oblique in ``h``: ``P = D V V^T D^-1``.

The result is a :class:`eigenpatch.format.interventions.HiddenProjection` on the decoder layer of the
site, stored in the checkpoint (``interventions``). At ``embed`` it is not folded into the embedding
table: that fold is exact only for token-id inputs (embeddings passed in directly, the attack
surface, would bypass it) and would untie a tied ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import HiddenProjection, attach, decoder_layers
from eigenpatch.patchers.eigenshield.config import DISPLAY_QUANTILE, SCORES, EigenShield
from eigenpatch.patchers.eigenshield.rmt import Spectrum, fit_spectrum
from eigenpatch.patchers.eigenshield.select import CalibrationSet, calibration_set, choose_quantile
from eigenpatch.patchers.eigenshield.stats import SiteStats, collect_site_stats
from eigenpatch.patchers.hidden_states import parse_site
from eigenpatch.recipe import PatchContext, TransformResult, register_transform


@dataclass
class ShieldSubspace:
    """What calibration decided at one site: the fitted spectrum, the scores, causal vs correlational."""

    mean: torch.Tensor  # [d]
    scale: torch.Tensor  # [d] per-dimension std used to standardize (ones when not standardized)
    spectrum: Spectrum
    candidates: torch.Tensor  # indices of the scored eigenvectors (spikes, then deficits)
    scores: torch.Tensor  # one per candidate
    threshold: float
    causal: torch.Tensor  # indices into the eigenvectors
    correlational: torch.Tensor

    def projection(self, mode: str, hook: str, start: int = 0) -> HiddenProjection:
        """The projector of ``mode``: onto the causal candidates (``keep``) or away from the rest (``drop``)."""
        vectors = self.spectrum.eigenvectors[:, self.causal if mode == "keep" else self.correlational]
        return projection_from_basis(self.mean, self.scale, vectors, mode, hook, start)

    def at(self, quantile: float) -> ShieldSubspace:
        """The same fit split at another quantile of the scores (no new eigendecomposition)."""
        threshold = float(torch.quantile(self.scores, quantile))
        return dataclasses.replace(
            self,
            threshold=threshold,
            causal=self.candidates[self.scores <= threshold],
            correlational=self.candidates[self.scores > threshold],
        )

    def details(self) -> dict[str, Any]:
        s = self.spectrum
        return {
            "dim": s.eigenvalues.numel(),
            "tokens": s.n_samples,
            "gamma": round(s.gamma, 5),
            "sigma2": s.sigma2,
            "bulk_edge": s.edge,
            "spikes": s.spikes,
            "lower_edge": s.lower_edge,
            "deficits": s.deficits,
            "candidates": self.candidates.numel(),
            "causal": self.causal.numel(),
            "correlational": self.correlational.numel(),
            "threshold": self.threshold,
        }


def projection_from_basis(
    mean: torch.Tensor, scale: torch.Tensor, vectors: torch.Tensor, mode: str, hook: str, start: int = 0
) -> HiddenProjection:
    """``P = D V V^T D^-1`` for orthonormal ``vectors`` ``[d, k]`` found in standardized coordinates."""
    vectors = vectors.double()
    basis_out = scale.double()[:, None] * vectors
    basis_in = vectors.T / scale.double()[None, :]
    return HiddenProjection.from_bases(
        mean.float(), basis_in.float(), basis_out.float(), mode=mode, hook=hook, start=start
    )


def candidate_indices(spectrum: Spectrum, candidates: str) -> torch.Tensor:
    """Eigenvector indices the score ranks: the spikes, and for ``outliers`` also the deficits."""
    d = spectrum.eigenvalues.numel()
    spikes = torch.arange(spectrum.spikes)
    if candidates == "spikes":
        return spikes
    return torch.cat([spikes, torch.arange(d - spectrum.deficits, d)])


def robustness_scores(
    stats: SiteStats, spectrum: Spectrum, scale: torch.Tensor, score: str, indices: torch.Tensor
) -> torch.Tensor:
    """RbNS of the eigenvectors ``indices`` (higher = less robust = correlational)."""
    vectors = spectrum.eigenvectors[:, indices]
    if score == "perturbation":
        delta = stats.delta_covariance()
        if delta is None:
            raise UsageError("the perturbation score needs perturbation statistics (collected with perturb=...)")
        delta = delta / torch.outer(scale, scale)
        energy = torch.einsum("dk,de,ek->k", vectors, delta, vectors)
        return energy / spectrum.eigenvalues[indices].clamp_min(1e-12)
    if score == "resample":
        # a spike is compared with the top-k subspace of the held-out covariance, a deficit with
        # the bottom-m one: each is judged against the directions of its own end of the spectrum
        top = indices < spectrum.spikes
        k, m = int(top.sum()), int((~top).sum())
        loss = torch.zeros(indices.numel(), dtype=torch.float64)
        for chunk in range(stats.chunks):
            _, cov, _ = stats.moments(exclude=chunk)
            _, held = torch.linalg.eigh(cov / torch.outer(scale, scale))  # ascending
            if k:
                loss[top] += 1 - (held[:, -k:].T @ vectors[:, top]).square().sum(0)
            if m:
                loss[~top] += 1 - (held[:, :m].T @ vectors[:, ~top]).square().sum(0)
        return loss / stats.chunks
    raise UsageError(f"shield score {score!r} is not one of {SCORES}")


def fit_subspace(stats: SiteStats, config: EigenShield, quantile: float | None = None) -> ShieldSubspace:
    """Steps 2-5 of the module docstring on collected statistics, at ``quantile`` (default: the
    config's; when that is chosen later, :data:`DISPLAY_QUANTILE`)."""
    quantile = quantile if quantile is not None else config.quantile
    quantile = quantile if quantile is not None else DISPLAY_QUANTILE
    mean, cov, n = stats.moments()
    scale = cov.diagonal().clamp_min(1e-12).sqrt() if config.standardize else torch.ones_like(mean)
    spectrum = fit_spectrum(cov / torch.outer(scale, scale), n, config.noise, config.margin)
    candidates = candidate_indices(spectrum, config.candidates)
    if candidates.numel() == 0:
        raise UsageError(f"no {config.candidates} outside the Marchenko-Pastur bulk at this site: nothing to project")
    scores = robustness_scores(stats, spectrum, scale, config.score, candidates)
    empty = candidates[:0]
    return ShieldSubspace(mean, scale, spectrum, candidates, scores, float("nan"), empty, empty).at(quantile)


def shield_stats(
    model: nn.Module, config: EigenShield, context: PatchContext, sites: list[str]
) -> tuple[dict[str, SiteStats], CalibrationSet]:
    """Calibration statistics for ``sites`` and the windows they came from, cached in
    ``context.cache`` (benchmarks fit many configs)."""
    perturb = config.perturb if config.score == "perturbation" else None  # resampling needs no perturbed pass
    key = (
        "eigenshield",
        tuple(sites),
        config.calib,
        config.calib_windows,
        config.calib_seq_len,
        config.check_windows,
        config.chunks,
        perturb,
        config.epsilon,
        config.start,
        config.seed,
    )
    if key not in context.cache:
        if context.tokenizer is None or (context.calib_text is None and not config.calib):
            raise UsageError("eigenshield needs calibration text and a tokenizer (--calib)")
        windows = calibration_set(context.tokenizer, config, context.calib_text)
        stats = collect_site_stats(
            model,
            sites,
            windows.fit,
            chunks=config.chunks,
            perturb=perturb,
            epsilon=config.epsilon,
            start=config.start,
            seed=config.seed,
            show_progress=context.show_progress,
        )
        context.cache[key] = stats, windows
    return context.cache[key]


@register_transform(EigenShield)
def apply_eigenshield(model: nn.Module, config: EigenShield, context: PatchContext) -> TransformResult:
    layers = decoder_layers(model)
    index, hook = parse_site(config.site, len(layers))
    all_stats, windows = shield_stats(model, config, context, [config.site])
    stats = all_stats[config.site]
    ref = next(model.parameters())

    fitted = fit_subspace(stats, config)

    def projection_at(quantile: float) -> HiddenProjection:
        return fitted.at(quantile).projection(config.mode, hook, config.start).to(device=ref.device, dtype=ref.dtype)

    chosen: dict[str, Any] = {"quantile": config.quantile}
    if config.quantile is None:
        choice = choose_quantile(model, layers[index], projection_at, windows.check, config.max_cost)
        chosen = choice.details()
        if not choice.met:
            warnings.warn(
                f"eigenshield: no quantile in the grid keeps the perplexity cost within {config.max_cost:.0%} on "
                f"every calibration text; using {choice.quantile} (worst cost {chosen['worst_check_cost']:+.1%})",
                stacklevel=2,
            )
    subspace = fitted.at(chosen["quantile"])
    projection = projection_at(chosen["quantile"])
    attach(layers[index], projection)
    texts = list(windows.check)
    return TransformResult(
        {**subspace.details(), **chosen, "calib_texts": texts, "rank": projection.rank, "layer": index, "hook": hook}
    )
