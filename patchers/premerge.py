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


def _time(fn, repeats: int, min_seconds: float) -> float:
    fn()  # warm-up: packing, allocator
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    return statistics.median(times)


@torch.no_grad()
def time_group(
    group: Sequence[StructuredLinear], tokens: int, merged: bool, repeats: int = 5, min_seconds: float = 0.02
) -> float:
    """Median seconds of calling every module of ``group`` on one ``[tokens, in]`` input (as the MLP does)."""
    first = group[0]
    x = torch.randn(tokens, first.in_features, dtype=first._dtype())
    saved = [(m.merged, m.premerge_max_tokens) for m in group]
    try:
        for m in group:
            if merged and m.merged is None:
                m.build_merged()
            m.premerge_max_tokens = ALWAYS_MERGED if merged else 0

        def call() -> None:
            for m in group:
                m(x)

        return _time(call, repeats, min_seconds)
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
    group: Sequence[StructuredLinear], grid: Sequence[int] = TOKEN_GRID
) -> tuple[int | None, dict[int, tuple[float, float]]]:
    """The threshold for ``group`` and the timings it came from (interleaved merged/structured)."""
    timings = {t: (time_group(group, t, merged=True), time_group(group, t, merged=False)) for t in grid}
    return crossover(timings), timings
