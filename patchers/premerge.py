"""Measure where a structured layer starts to beat its merged dense matrix (the pre-merge threshold).

The answer depends on the machine (cores, GEMM library, cache sizes) and on the shapes, so it is
measured, not assumed: for token counts ``1, 2, 4, ... 2048`` both forms of a layer group are
timed on random inputs (median of repeats, interleaved so drift hits both alike). The stored
``premerge_max_tokens`` is the largest count below the point from which the structured form stays
faster; ``None`` if it never wins on the grid (always run merged), ``0`` if it always wins.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from eigenpatch.structured import ALWAYS_MERGED, StructuredLinear

TOKEN_GRID: tuple[int, ...] = tuple(2**k for k in range(12))  # 1 ... 2048
#: The structured form must be this much faster before a threshold moves (noise guard).
MARGIN = 0.03


@torch.no_grad()
def time_modes(
    group: Sequence[StructuredLinear], tokens: int, rounds: int = 7, min_seconds: float = 0.05
) -> tuple[float, float]:
    """Median seconds of one call of every module of ``group`` (as the MLP calls them) on one
    ``[tokens, in]`` input, merged and structured, *alternating* the two forms round by round so
    that the machine's drift (shared cores, frequency changes) hits both alike."""
    first = group[0]
    x = torch.randn(tokens, first.in_features, dtype=first._dtype())
    saved = [(m.merged, m.premerge_max_tokens) for m in group]
    try:
        for m in group:
            if m.merged is None:
                m.build_merged()

        def call(merged: bool) -> float:
            for m in group:
                m.premerge_max_tokens = ALWAYS_MERGED if merged else 0
            start = time.perf_counter()
            for m in group:
                m(x)
            return time.perf_counter() - start

        call(True), call(False)  # warm-up: packing, allocator
        times: tuple[list[float], list[float]] = ([], [])
        began = time.perf_counter()
        while len(times[0]) < rounds or (time.perf_counter() - began < min_seconds and len(times[0]) < 200):
            times[0].append(call(True))
            times[1].append(call(False))
        return statistics.median(times[0]), statistics.median(times[1])
    finally:
        for m, (w, t) in zip(group, saved, strict=True):
            m.merged, m.premerge_max_tokens = w, t


def crossover(timings: dict[int, tuple[float, float]], margin: float = MARGIN) -> int | None:
    """``premerge_max_tokens`` from ``{tokens: (merged_s, structured_s)}``."""
    grid = sorted(timings)
    wins = [timings[t][1] * (1 + margin) < timings[t][0] for t in grid]
    if not wins[-1]:
        return ALWAYS_MERGED
    first = len(wins)
    while first > 0 and wins[first - 1]:
        first -= 1
    return 0 if first == 0 else grid[first - 1]


def measure_crossover(
    group: Sequence[StructuredLinear], grid: Sequence[int] = TOKEN_GRID, rounds: int = 7
) -> tuple[int | None, dict[int, tuple[float, float]]]:
    """The threshold for ``group`` and the timings it came from (interleaved merged/structured)."""
    timings = {t: time_modes(group, t, rounds) for t in grid}
    return crossover(timings), timings
