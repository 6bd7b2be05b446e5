"""Plain-text tables for summaries (no terminal library needed; they also read well in CI logs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt_count(n: int | float | None) -> str:
    return "-" if n is None else f"{int(n):,}"


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def fmt_float(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)  # nan / inf are reported as such
    return f"{x:,.{digits}f}" if abs(x) < 1e6 else f"{x:.3e}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-align the first column, right-align the others."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
