"""The table and lines ``patch-model`` prints when it is done (kept apart from argument handling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _step_label(step: dict[str, Any]) -> str:
    return f"{step['allocator']}+{step['factorizer']}" if "allocator" in step else step["transform"]


def _premerge_words(threshold: int | None) -> str:
    if threshold is None:
        return "always merged"
    return "never merged" if threshold == 0 else f"merged up to {threshold} tokens"


def summarize_patch(report: dict[str, Any], out: Path) -> str:
    from eigenpatch.table import fmt_bytes, fmt_count, fmt_float, format_table

    def ratio(a: float | None, b: float | None) -> str:
        return f"{b / a:.3f}" if a and b is not None else "-"

    rows = []
    for step in report["steps"]:
        tb, ta = step.get("targeted_params_before"), step.get("targeted_params_after")
        if tb is None:
            continue
        rows.append([f"targeted Linears ({_step_label(step)})", fmt_count(tb), fmt_count(ta), ratio(tb, ta)])
    for step in report["steps"]:
        if step["transform"] == "structured_ffn":
            fb, fa = step["ffn_params_before"], step["ffn_params_after"]
            rows.append([f"FFN matrices ({step['structure']})", fmt_count(fb), fmt_count(fa), ratio(fb, fa)])
    mb, ma = report["model_params_before"], report["model_params_after"]
    rows.append(["whole model params", fmt_count(mb), fmt_count(ma), ratio(mb, ma)])
    bb, ba = report.get("input_weights_bytes"), report.get("weights_bytes")
    rows.append(["weights on disk", fmt_bytes(bb), fmt_bytes(ba), ratio(bb, ba)])
    if "perplexity" in report:
        p = report["perplexity"]
        b, a = p["before"]["ppl"], p["after"]["ppl"]
        rows.append([f"perplexity ({p['before']['scored_tokens']:,} tokens)", fmt_float(b), fmt_float(a), ratio(b, a)])
    lines = [
        f"eigenpatch: {report['base_model']} -> {out}",
        "",
        format_table(["", "before", "after", "after/before"], rows),
    ]
    for step in report["steps"]:
        if step["transform"] == "eigenshield":
            from eigenpatch.cli_shield import shield_summary

            lines.append(shield_summary(step))
        if step["transform"] == "steer":
            from eigenpatch.cli_steer import steer_summary

            lines.append(steer_summary(step))
        if step["transform"] == "heal":
            resumed = f", resumed at step {step['resumed_from_step']}" if step["resumed_from_step"] else ""
            lines.append(
                f"heal: {step['steps']} steps ({step['loss']}), {step['trainable_params']:,} trainable params, "
                f"loss {step['loss_first']:.3f} -> {step['loss_last']:.3f}, {step['tokens_per_second']:.0f} tok/s, "
                f"{step['seconds']} s{resumed}"
            )
        if step["transform"] == "structured_ffn":
            thresholds = ", ".join(
                f"{label}: {_premerge_words(v['premerge_max_tokens'])}"
                for label, v in step["premerge_thresholds"].items()
            )
            lines.append(
                f"structured_ffn: {step['ffn_blocks']} FFN blocks, {step['seconds']} s; pre-merge {thresholds}"
            )
        if "factorized" in step:
            lines.append(
                f"{_step_label(step)}: {step['factorized']} matrices factorized, {step['kept_dense']} kept dense, "
                f"{step['seconds']} s"
            )
    lines.append(f"total {report['seconds']} s. Load it with: eigenpatch.load({str(out)!r})")
    return "\n".join(lines)
