"""Rank allocators: which rank each matrix keeps for a global parameter budget.

Allocation is separate from factorization (DESIGN): any allocator feeds any factorizer. An
allocator returns ``None`` for a matrix that should stay dense because no rank both meets its
share of the budget and saves parameters (``r (m + n) < m n``).
"""

from __future__ import annotations

from collections.abc import Mapping

from eigenpatch.errors import UsageError
from eigenpatch.modules import factor_pair_saves

Shape = tuple[int, int]  # (out_features, in_features), as nn.Linear.weight


def check_ratio(ratio: float) -> float:
    """A compression ratio is the fraction of targeted parameters to remove: strictly inside (0, 1)."""
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"compression ratio {ratio} is outside (0, 1); e.g. --compress 0.5 removes half")
    return ratio


def uniform_ranks(shapes: Mapping[str, Shape], ratio: float) -> dict[str, int | None]:
    """Every matrix keeps the same fraction ``1 - ratio`` of its parameters (SVD-LLM's convention).

    ``r = floor((1 - ratio) m n / (m + n))``, at least 1 (compression.md section 1).
    """
    check_ratio(ratio)
    ranks: dict[str, int | None] = {}
    for name, (out_f, in_f) in shapes.items():
        rank = max(1, int((1.0 - ratio) * out_f * in_f // (out_f + in_f)))
        ranks[name] = rank if factor_pair_saves(rank, in_f, out_f) else None
    return ranks


def factorized_params(shapes: Mapping[str, Shape], ranks: Mapping[str, int | None]) -> int:
    """Parameters of the targeted matrices after factorization (dense where the rank is ``None``)."""
    return sum(
        out_f * in_f if ranks[name] is None else ranks[name] * (out_f + in_f) for name, (out_f, in_f) in shapes.items()
    )


ALLOCATORS = {"uniform": uniform_ranks}
