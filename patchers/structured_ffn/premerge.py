"""Measure where a structured layer starts to beat its merged dense matrix (the pre-merge threshold).

The answer depends on the machine (cores, GEMM library, cache sizes) and on the shapes, so it is
measured, not assumed: for token counts ``1, 2, 4, ... 2048`` both forms of a layer group are
timed on random inputs (median of repeats, interleaved so drift hits both alike), each call
with a cold cache, as in a real forward where every other layer's weights pass through the cache
in between (a small layer timed alone would otherwise run from cache and favour the merged form).

The stored ``premerge_max_tokens`` ``T`` (merged for calls of at most ``T`` tokens) is the one
whose worst slowdown over the grid, against the faster form at each count, is smallest; among
choices within ``MARGIN`` of that, the one that merges least (``0``, i.e. no dense copy in memory,
first). ``None`` means always merged.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from eigenpatch.format.structured import ALWAYS_MERGED, StructuredLinear

TOKEN_GRID: tuple[int, ...] = tuple(2**k for k in range(12))  # 1 ... 2048
#: Thresholds whose worst slowdown is within this of the best one count as ties (noise guard).
MARGIN = 0.03


@functools.lru_cache(maxsize=1)
def _flush_buffer() -> torch.Tensor:
    """Twice the last-level cache (64 MiB when sysfs does not say)."""
    size = 32 << 20
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        break
    return torch.zeros(2 * size // 4, dtype=torch.float32)


def flush_cache() -> None:
    """Evict the CPU caches (read and write a buffer of twice the LLC): the next call starts cold."""
    _flush_buffer().add_(1.0)


@torch.no_grad()
def time_modes(
    group: Sequence[StructuredLinear], tokens: int, rounds: int = 15, min_seconds: float = 0.3
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
            flush_cache()
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
    """``premerge_max_tokens`` from ``{tokens: (merged_s, structured_s)}`` (module docstring's rule).

    Minimax rather than "where structured starts to win": on some runtimes the winner flips more
    than once along the grid, and one threshold must then choose which loss is smaller.
    """
    grid = sorted(timings)

    def worst(threshold: int | None) -> float:
        chosen = [timings[t][0 if threshold is None or t <= threshold else 1] for t in grid]
        return max(c / min(timings[t]) for c, t in zip(chosen, grid, strict=True))

    candidates = [0, *grid[:-1], ALWAYS_MERGED]  # grid[-1] as a threshold is "always merged" on the grid
    regrets = [worst(t) for t in candidates]
    best = min(regrets)
    return next(t for t, r in zip(candidates, regrets, strict=True) if r <= best * (1 + margin))


def measure_crossover(
    group: Sequence[StructuredLinear], grid: Sequence[int] = TOKEN_GRID, rounds: int = 15
) -> tuple[int | None, dict[int, tuple[float, float]]]:
    """The threshold for ``group`` and the timings it came from (interleaved merged/structured)."""
    timings = {t: time_modes(group, t, rounds) for t in grid}
    return crossover(timings), timings
