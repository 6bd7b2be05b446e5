"""Perplexity against bits per weight: every way eigenpatch makes a model smaller, on one plot.

    python bench/pareto.py                                   # SmolLM2-135M, every point below
    python bench/pareto.py --model qwen2.5-coder-0.5b --points gptq:3:64 gptq:b3.25 --calib-windows 16
    python bench/pareto.py --plot bench/results/pareto.json  # redraw the PNG from a results file

In one process, from one dense model, each point is patched from a fresh copy and scored by the
same code on the same tokens (``--max-tokens`` of ``wiki:eval`` and ``news:eval``):

- the anchors, uniform RTN and uniform GPTQ at 2, 3, 4 and 8 bits (groups of 64; 2 bits also at 32);
- GPTQ plus a rank-16 correction of each Linear's rounding error (``--bits N --correct 16``);
- ``--budget B`` at 2.5, 3, 3.25, 4, 4.25 and 4.5 bits per weight (its default ladder and refinement;
  the budgets share one scoring pass, as ``patch-model`` runs on one model would through the cache);
- ``+heal300``: the budgets of the acceptance (2.5, 3.25, 4.25) and uniform GPTQ int3, their fp16
  scales distilled from the dense model end to end (``--heal 300``; no byte added);
- ``--compress 0.5`` (patch-model's default recipe), alone and with its factors at 4 bits.

A point's specification is ``bench/quantize.py``'s (``METHOD:BITS:GROUP[:rK]``, ``METHOD:bB``,
``cR+...``), plus ``cR`` for compression alone. Its x is the bits per targeted weight, everything
counted: codes, fp16 scales, zero points and correction factors; a factor pair counts its
parameters at bf16, as it is deployed. Dense is the line at 16 bits.

The real models here were dequantized from GGUF files: SmolLM2-135M from Q4_1 (groups of 32, a
float scale and minimum), Qwen2.5-Coder-0.5B from an AWQ-scaled Q4_K_M file (mostly Q5_0). A
quantizer at 4 bits and above can land partly back on those grids, so there the "dense"
reference flatters every quantizer; at 3 bits and below it cannot. The plot says so.

Writes ``bench/results/pareto[-MODEL].json`` and the PNG beside it after every point. The whole list
takes hours on a 2-core CPU: ``--resume`` keeps the points a stopped run measured and measures the
rest, after checking that the dense model scores exactly what the file recorded (same weights, same
tokens, same eval code).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from quantize import recipe
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import Heal, LowRank
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text

POINTS = (  # the acceptance points first, then one of each series: a run stopped early keeps what it needs
    "rtn:4:64",
    "gptq:4:64",
    "rtn:3:64",
    "gptq:3:64",
    "rtn:2:64",
    "gptq:2:64",
    "gptq:b3.25:refine0+heal300",
    "gptq:b2.5:refine0+heal300",
    "gptq:b4.25:refine0+heal300",
    "rtn:8:64",
    "gptq:3:64:r16",
    "c0.5",
    "gptq:b3.25",
    "gptq:b2.5",
    "c0.5+gptq:4:64",
    "gptq:b4.5",
    "gptq:b4",
    "gptq:b3",
    "gptq:b4.25",
    "gptq:8:64",
    "gptq:3:64+heal300",
    "rtn:2:32",
    "gptq:2:32",
    "gptq:2:32:r16",
)
#: Plot series: (label, marker) by the kind of point.
SERIES = {
    "rtn": ("uniform RTN", "v"),
    "gptq": ("uniform GPTQ", "o"),
    "corrected": ("GPTQ + rank-16 correction", "s"),
    "budget": ("--budget B", "*"),
    "compress": ("--compress 0.5 (+ int4)", "D"),
    "healed": ("+ --heal N (scales distilled end to end)", "P"),
}
GRID_NOTE = (
    "SmolLM2 was dequantized from Q4_1 and Qwen2.5-Coder from AWQ-scaled Q4_K_M (mostly Q5_0): at 4 bits "
    "and above a quantizer can land back on the source grid, so there dense flatters every quantizer."
)


def kind(spec: str) -> str:
    if "+heal" in spec:
        return "healed"
    if spec.startswith("c"):
        return "compress"
    method, width, *rest = spec.split(":")
    if width.startswith("b"):
        return "budget"
    return "corrected" if any(r.startswith("r") and r[1:].isdigit() for r in rest) else method


def configs(spec: str, calib_windows: int) -> list:
    """The recipe of one point: ``cR`` alone is patch-model's ``--compress R``; ``...+healN`` ends with
    ``--heal N`` (distillation into the factor pairs, or the quantized scales); the rest is bench/quantize's."""
    if "+heal" in spec:
        spec, steps = spec.rsplit("+heal", 1)
        return [*configs(spec, calib_windows), Heal(steps=int(steps))]
    if "+" not in spec and spec.startswith("c"):
        ratio = float(spec[1:])
        return [LowRank(ratio=ratio, allocator="loss", factorizer="fwhiten", sequential=True, refine_steps=64,
                        calib_windows=calib_windows)]  # fmt: skip
    return recipe(spec, calib_windows)


def bits_per_weight(report: dict) -> float:
    """Bits per targeted weight of a patch report: the quantized bytes, or a factor pair's bf16 parameters."""
    steps = [s for s in report["steps"] if s.get("transform") != "heal"]  # healing adds no byte
    first, last = steps[0], steps[-1]
    if "bytes_after" in last:
        weights = first.get("targeted_params_before") or last["bf16_bytes_before"] / 2
        return 8 * last["bytes_after"] / weights
    return 16 * last["targeted_params_after"] / last["targeted_params_before"]


def plot(result: dict, png: Path) -> None:
    """Two panels (wiki, news): perplexity (log) against bits per weight, one series per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["config"] != "dense"]
    dense = next(r for r in result["rows"] if r["config"] == "dense")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for ax, text in zip(axes, ("wiki", "news"), strict=True):
        for key, (label, marker) in SERIES.items():
            pts = sorted((r["bits_per_weight"], r["ppl"][text], r["config"]) for r in rows if kind(r["config"]) == key)
            if not pts:
                continue
            xs, ys, _ = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=marker, linestyle="-" if key in ("rtn", "gptq", "budget") else "none",
                    label=label, markersize=9 if marker == "*" else 6)  # fmt: skip
            for x, y, name in pts:
                ax.annotate(name.split("gptq:")[-1], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        d = dense["ppl"][text]
        ax.axhline(d, color="k", linestyle="--", linewidth=1, label=f"dense ({d:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("bits per targeted weight (codes, scales, zeros, corrections)")
        ax.set_ylabel(f"perplexity, {text}:eval")
        ax.set_title(f"{result['model']}: {text}")
        ax.grid(True, which="both", alpha=0.3)
        lo = min(dense["ppl"][text] * 0.95, min(r["ppl"][text] for r in rows))
        ax.set_ylim(lo, min(max(r["ppl"][text] for r in rows) * 1.1, dense["ppl"][text] * 12))
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, GRID_NOTE, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(png, dpi=120)
    plt.close(fig)


def correction_storage(report: dict) -> dict[str, int]:
    """``{"correction_bits": 8 or 16}`` for a point whose quantize step may correct (a rank or a budget)."""
    step = next((s for s in report["steps"] if s.get("transform") == "quantize"), None)
    if step is None or not (step.get("correction_rank") or step.get("budget")):
        return {}
    return {"correction_bits": step["correction_bits"]}


def resumed(previous: dict, result: dict) -> list[dict]:
    """The rows of a stopped run, if it measured this model the same way; else stop with why."""
    same = all(previous.get(k) == result[k] for k in ("model", "calib_windows", "eval_tokens"))
    dense = next((r for r in previous.get("rows", []) if r["config"] == "dense"), None)
    if not same or dense is None or dense["ppl"] != result["rows"][0]["ppl"]:
        raise SystemExit(
            f"--resume: the results file measured something else (model, calibration, eval tokens or dense "
            f"perplexity differ: {dense and dense['ppl']} vs {result['rows'][0]['ppl']}); drop --resume or pick --out"
        )
    print(f"resuming: {len(previous['rows']) - 1} points kept", flush=True)
    for row in previous["rows"]:  # rows from before the field: their corrections were stored in fp16
        if "correction_bits" not in row and (":b" in row["config"] or ":r" in row["config"]):
            row["correction_bits"] = 16
    return previous["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a zoo name or a model folder")
    parser.add_argument("--points", nargs="+", default=list(POINTS), metavar="SPEC")
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--max-tokens", type=int, default=4096, help="eval tokens per text")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/pareto[-MODEL].json)")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only redraw the PNG of a results file")
    parser.add_argument("--resume", action="store_true", help="keep the points the results file already has")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    name = Path(args.model).name
    out = args.out or RESULTS / ("pareto.json" if name == "smollm2-135m" else f"pareto-{name}.json")

    base, tokenizer, _ = load_model(args.model)
    base.eval()
    texts = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.max_tokens) for t in ("wiki", "news")}
    calib = resolve_text("wiki", split="calib")

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        return {t: round(perplexity(model, x, show_progress=False).ppl, 2) for t, x in texts.items()}

    rows = [{"config": "dense", "bits_per_weight": 16.0, "ppl": ppl(base)}]
    print(rows[0], flush=True)
    result = {"model": name, "calib_windows": args.calib_windows, "eval_tokens": args.max_tokens, "rows": rows}
    if args.resume and out.exists():
        rows[:] = resumed(json.loads(out.read_text()), result)
    done = {r["config"] for r in rows}
    cache: dict = {}  # the budgets share one Fisher and scoring pass
    for spec in (s for s in args.points if s not in done):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = eigenpatch.patch(
            model,
            configs(spec, args.calib_windows),
            tokenizer=tokenizer,
            calib_text=calib,
            show_progress=False,
            calibration_cache=cache,
        )
        row = {
            "config": spec,
            "bits_per_weight": round(bits_per_weight(report), 4),
            "ppl": ppl(model.eval()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        plan = next((s["plan"] for s in report["steps"] if s.get("plan")), None)
        if plan:
            row["plan"] = plan
        row |= correction_storage(report)
        print(row, flush=True)
        rows.append(row)
        del model
        write_result(out, result)  # after every point: a long run stopped early keeps what it measured
        plot(result, out.with_suffix(".png"))
    table = [[r["config"], f"{r['bits_per_weight']:.3f}", r["ppl"]["wiki"], r["ppl"]["news"], r.get("seconds", "-")]
             for r in rows]  # fmt: skip
    print(format_table(["point", "bits / weight", "ppl wiki", "ppl news", "s"], table))
    print(GRID_NOTE)


if __name__ == "__main__":
    main()
