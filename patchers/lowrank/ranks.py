"""Rank allocators: which rank each matrix keeps for a global parameter budget.

Allocation is separate from factorization: any allocator feeds any factorizer. Every
allocator returns ``None`` for a matrix that should stay dense, because at its rank a factor pair
would not be smaller (``r (m + n) >= m n``): WeLore's N-LRC ("non-low-rank component").

``welore`` and ``loss`` share one mechanism: give every singular value a score, keep those
scoring at least a global threshold ``tau``, and binary-search ``tau`` so the factorized
parameters meet the budget. They differ only in the score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import factor_pair_saves

Shape = tuple[int, int]  # (out_features, in_features), as nn.Linear.weight
Ranks = dict[str, int | None]


def check_ratio(ratio: float) -> float:
    """A compression ratio is the fraction of targeted parameters to remove: strictly inside (0, 1)."""
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"compression ratio {ratio} is outside (0, 1); e.g. --compress 0.5 removes half")
    return ratio


def _cost(rank: int | None, shape: Shape) -> int:
    out_f, in_f = shape
    return out_f * in_f if rank is None else rank * (out_f + in_f)


def factorized_params(shapes: Mapping[str, Shape], ranks: Mapping[str, int | None]) -> int:
    """Parameters of the targeted matrices after factorization (dense where the rank is ``None``)."""
    return sum(_cost(ranks[name], shape) for name, shape in shapes.items())


def rank_details(shapes: Mapping[str, Shape], ranks: Mapping[str, int | None]) -> dict[str, Any]:
    """What a compression reports: targeted parameters before and after, matrices factorized or kept dense."""
    return {
        "targeted_params_before": sum(m * n for m, n in shapes.values()),
        "targeted_params_after": factorized_params(shapes, ranks),
        "factorized": sum(r is not None for r in ranks.values()),
        "kept_dense": sum(r is None for r in ranks.values()),
        "ranks": dict(ranks),
    }


def _lrc(rank: int, shape: Shape, multiple: int = 1) -> int | None:
    """A rank, or ``None`` (stay dense) when the factor pair would not save parameters.

    ``multiple`` > 1 rounds the rank down to a multiple of it (at least one multiple): quantized
    factors run PyTorch's int4 kernel only when the rank is whole groups (``--bits`` plans for it).
    """
    out_f, in_f = shape
    if multiple > 1:
        rank = max(multiple, rank // multiple * multiple)
        if rank > min(out_f, in_f):
            return None
    return rank if factor_pair_saves(rank, in_f, out_f) else None


def uniform_ranks(
    shapes: Mapping[str, Shape],
    ratio: float,
    spectra: Mapping[str, torch.Tensor] | None = None,
    multiple: int = 1,
) -> Ranks:
    """Every matrix keeps the same fraction ``1 - ratio`` of its parameters (SVD-LLM's convention).

    ``r = floor((1 - ratio) m n / (m + n))``, at least 1; with ``multiple``, the nearest multiple.
    """
    check_ratio(ratio)
    ranks: Ranks = {}
    for name, (out_f, in_f) in shapes.items():
        rank = max(1, int((1.0 - ratio) * out_f * in_f // (out_f + in_f)))
        if multiple > 1:
            rank = round(rank / multiple) * multiple
        ranks[name] = _lrc(rank, (out_f, in_f), multiple)
    return ranks


def threshold_ranks(
    shapes: Mapping[str, Shape], ratio: float, scores: Mapping[str, torch.Tensor], multiple: int = 1
) -> Ranks:
    """Keep every singular value whose score is >= ``tau``; binary-search ``tau`` to the budget.

    ``scores[name]`` must be non-increasing (one per singular value). The result spends as much
    of the budget ``(1 - ratio) * sum(m n)`` as possible without exceeding it; a matrix whose
    kept count reaches its break-even rank stays dense. The cost is monotone in ``tau``
    (``min(r (m + n), m n)`` grows with ``r``), so bisection over the sorted scores is exact;
    ``multiple`` rounds each kept count down to whole multiples, which keeps it monotone.
    """
    check_ratio(ratio)
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes.values())
    names = list(shapes)
    ascending = {n: scores[n].flip(0).contiguous().to(torch.float64) for n in names}

    def ranks_at(tau: float) -> Ranks:
        out: Ranks = {}
        for name in names:
            kept = len(ascending[name]) - int(torch.searchsorted(ascending[name], tau, right=False))
            out[name] = _lrc(max(1, kept), shapes[name], multiple)
        return out

    candidates = torch.cat(list(ascending.values())).unique()  # sorted ascending
    lo, hi = 0, len(candidates) - 1  # cost(candidates[hi]) is the smallest
    if factorized_params(shapes, ranks_at(candidates[hi].item())) > budget:
        return ranks_at(float("inf"))  # even rank 1 everywhere is over budget: the most we can do
    while lo < hi:  # smallest index (largest spend) whose cost fits
        mid = (lo + hi) // 2
        if factorized_params(shapes, ranks_at(candidates[mid].item())) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(candidates[lo].item())


def welore_scores(spectrum: torch.Tensor) -> torch.Tensor:
    """WeLore (arXiv 2407.11239): min-max normalized singular values of the raw weight.

    ``s~ = (s - s_min) / (s_max - s_min)``; a heavy-tailed matrix has most of its mass near 0
    and loses many ranks at a given ``tau``, a flat one few. Scale-invariant per matrix.
    """
    spread = (spectrum[0] - spectrum[-1]).clamp_min(torch.finfo(spectrum.dtype).tiny)
    return (spectrum - spectrum[-1]) / spread


def loss_scores(spectrum: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Estimated loss increase of dropping each rank unit, per parameter that unit costs.

    ``spectrum`` are the singular values of ``C W R`` (``R R^T`` = input covariance, ``C^2`` =
    output Fisher): by the Fisher approximation of the Hessian, dropping ``s_i`` raises the
    calibration loss by about ``s_i^2 / 2``, in the same units for every matrix. Keeping the
    highest ``s_i^2 / (m + n)`` is the greedy solution of "least estimated loss increase for
    the parameter budget"; it accounts for how much each layer's output matters downstream,
    which a per-matrix relative error cannot.
    """
    return spectrum.square() / sum(shape)


def welore_ranks(
    shapes: Mapping[str, Shape], ratio: float, spectra: Mapping[str, torch.Tensor], multiple: int = 1
) -> Ranks:
    return threshold_ranks(shapes, ratio, {n: welore_scores(spectra[n]) for n in shapes}, multiple)


def loss_ranks(
    shapes: Mapping[str, Shape], ratio: float, spectra: Mapping[str, torch.Tensor], multiple: int = 1
) -> Ranks:
    return threshold_ranks(shapes, ratio, {n: loss_scores(spectra[n], shapes[n]) for n in shapes}, multiple)


#: ``(shapes, ratio, spectra, multiple) -> ranks``.
Allocator = Callable[..., Ranks]

#: name -> (function, which spectrum it reads: None, "raw" (of W) or "loss" (of C W R, needs calibration))
ALLOCATORS: dict[str, tuple[Allocator, str | None]] = {
    "uniform": (uniform_ranks, None),
    "welore": (welore_ranks, "raw"),
    "loss": (loss_ranks, "loss"),
}
