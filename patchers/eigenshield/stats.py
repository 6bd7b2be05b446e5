"""Streaming statistics of hidden states at a site, clean and under small input perturbations.

A *site* is a point of the residual stream (:mod:`eigenpatch.patchers.hidden_states`). Statistics
are fp64 running sums, so memory is ``chunks * d^2`` whatever the number of calibration tokens;
the calibration windows are split into ``chunks`` consecutive groups with one sum each, so
leave-one-chunk-out covariances (the resampling score) cost no second pass.

The perturbation statistics record how hidden states at the site move when every input
embedding is pushed by ``epsilon`` times the mean embedding norm: along the loss gradient
(``gradient``, one backward pass per batch: the direction an attacker would take first) or in a
random direction (``random``). ``delta_gram = sum (h~ - h)(h~ - h)^T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.errors import UsageError
from eigenpatch.patchers.hidden_states import capture

PERTURBATIONS = ("gradient", "random")


def mean_embedding_norm(model: nn.Module) -> float:
    """Mean L2 norm of the input embedding rows: the unit of perturbation and attack budgets."""
    return float(model.get_input_embeddings().weight.detach().float().norm(dim=1).mean())


@dataclass
class SiteStats:
    """Chunked first and second moments of hidden states at one site, plus perturbation moments."""

    dim: int
    chunks: int
    sums: torch.Tensor = field(init=False)
    grams: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)
    delta_gram: torch.Tensor = field(init=False)
    delta_count: int = 0

    def __post_init__(self) -> None:
        self.sums = torch.zeros(self.chunks, self.dim, dtype=torch.float64)
        self.grams = torch.zeros(self.chunks, self.dim, self.dim, dtype=torch.float64)
        self.counts = torch.zeros(self.chunks, dtype=torch.float64)
        self.delta_gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def add(self, chunk: int, h: torch.Tensor) -> None:
        flat = h.detach().reshape(-1, self.dim).float()
        self.sums[chunk] += flat.sum(0).double()
        self.grams[chunk] += (flat.T @ flat).double()
        self.counts[chunk] += flat.shape[0]

    def add_delta(self, delta: torch.Tensor) -> None:
        flat = delta.detach().reshape(-1, self.dim).float()
        self.delta_gram += (flat.T @ flat).double()
        self.delta_count += flat.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def moments(self, exclude: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(mean, covariance, n)`` over all chunks, or all but chunk ``exclude``."""
        keep = torch.ones(self.chunks, dtype=torch.bool)
        if exclude is not None:
            keep[exclude] = False
        n = float(self.counts[keep].sum())
        mean = self.sums[keep].sum(0) / n
        cov = self.grams[keep].sum(0) / n - torch.outer(mean, mean)
        return mean, (cov + cov.T) / 2, int(n)

    def delta_covariance(self) -> torch.Tensor | None:
        return self.delta_gram / self.delta_count if self.delta_count else None


def _perturbation(
    model: nn.Module, embeds: torch.Tensor, ids: torch.Tensor, kind: str, size: float, seed: int
) -> torch.Tensor:
    """Per-token perturbation of L2 norm ``size``: along the LM-loss gradient, or random."""
    if kind == "gradient":
        leaf = embeds.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = model(inputs_embeds=leaf, labels=ids, use_cache=False).loss
            (direction,) = torch.autograd.grad(loss, leaf)
    elif kind == "random":
        generator = torch.Generator().manual_seed(seed)
        direction = torch.randn(embeds.shape, generator=generator, dtype=torch.float32).to(embeds)
    else:
        raise UsageError(f"perturbation {kind!r} is not one of {PERTURBATIONS}")
    norms = direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(direction.dtype).tiny)
    return size * direction / norms


@torch.no_grad()
def collect_site_stats(
    model: nn.Module,
    sites: list[str],
    windows: torch.Tensor,
    chunks: int = 8,
    batch_size: int = 4,
    perturb: str | None = "gradient",
    epsilon: float = 0.1,
    start: int = 0,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, SiteStats]:
    """Statistics of ``sites`` over calibration ``windows`` (positions ``>= start`` only).

    ``perturb=None`` skips the perturbation pass (the resampling score does not need it).
    """
    n_batches = -(-len(windows) // batch_size)
    if n_batches < chunks:
        raise UsageError(f"{len(windows)} calibration windows make {n_batches} batches, fewer than {chunks} chunks")
    if start >= windows.shape[1]:
        raise UsageError(f"start position {start} leaves nothing of {windows.shape[1]}-token windows")
    dim = model.get_input_embeddings().weight.shape[1]
    stats = {site: SiteStats(dim, chunks) for site in sites}
    size = epsilon * mean_embedding_norm(model)
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    body = model.base_model
    clean: dict[str, torch.Tensor] = {}
    moved: dict[str, torch.Tensor] = {}
    batches = range(0, len(windows), batch_size)
    for b, i in enumerate(tqdm(batches, desc="shield calibration", unit="batch", disable=not show_progress)):
        ids = windows[i : i + batch_size].to(device)
        embeds = embed(ids)
        with capture(model, sites, clean):
            body(inputs_embeds=embeds, use_cache=False)
        chunk = b * chunks // n_batches
        for site in sites:
            stats[site].add(chunk, clean[site][:, start:])
        if perturb is None:
            continue
        delta = _perturbation(model, embeds, ids, perturb, size, seed + b)
        with capture(model, sites, moved):
            body(inputs_embeds=embeds + delta, use_cache=False)
        for site in sites:
            stats[site].add_delta((moved[site] - clean[site])[:, start:])
    return stats
