"""The table and lines ``patch-model`` prints when it is done, each room contributing its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eigenpatch.cli.pieces import piece_for, ratio_of
from eigenpatch.table import fmt_bytes, fmt_count, fmt_float, format_table


def summarize_patch(report: dict[str, Any], out: Path) -> str:
    """Before/after table (each step's rows, then the whole model, bytes and perplexity), then a
    line per step."""
    steps = [(step, piece_for(step["transform"])) for step in report["steps"]]
    rows = [row for step, piece in steps if piece is not None for row in piece.summary_rows(step)]
    mb, ma = report["model_params_before"], report["model_params_after"]
    rows.append(["whole model params", fmt_count(mb), fmt_count(ma), ratio_of(mb, ma)])
    bb, ba = report.get("input_weights_bytes"), report.get("weights_bytes")
    rows.append(["weights on disk", fmt_bytes(bb), fmt_bytes(ba), ratio_of(bb, ba)])
    if "perplexity" in report:
        p = report["perplexity"]
        b, a = p["before"]["ppl"], p["after"]["ppl"]
        rows.append(
            [f"perplexity ({p['before']['scored_tokens']:,} tokens)", fmt_float(b), fmt_float(a), ratio_of(b, a)]
        )
    lines = [
        f"eigenpatch: {report['base_model']} -> {out}",
        "",
        format_table(["", "before", "after", "after/before"], rows),
    ]
    for step, piece in steps:
        lines.extend(piece.summary_lines(step) if piece is not None else [f"{step['transform']}: {step['seconds']} s"])
    if "engine" in report:
        passes = ", ".join(f"{name} {_duration(s)}" for name, s in report["engine"]["passes"].items())
        lines.append(f"layer-by-layer engine: {passes}")
    if "peak_rss_bytes" in report:
        device = f", device {fmt_bytes(report['peak_device_bytes'])}" if "peak_device_bytes" in report else ""
        how = " (layer by layer from the shards)" if report.get("out_of_core") else " (whole model in memory)"
        lines.append(f"peak memory: RSS {fmt_bytes(report['peak_rss_bytes'])}{device}{how}")
    lines.append(f"total {report['seconds']} s. Load it with: eigenpatch.load({str(out)!r})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
