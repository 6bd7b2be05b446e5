"""Compression ratio vs perplexity for every allocator x factorizer, dense side by side, one process.

    python bench/compress_quality.py                           # SmolLM2-135M, R in {0.2, 0.4, 0.5}
    python bench/compress_quality.py --ratios 0.5 --methods svd loss+fwhiten --calib-windows 32
    python bench/compress_quality.py --ratios 0.4 0.5 --methods loss+fwhiten seq:loss+fwhiten --calib-windows 32

A ``seq:`` method fits its factor pairs layer by layer on propagated inputs and refines each layer
(``patch-model``'s default), ``seq0:`` without the refinement, at the same global ranks as the
one-shot method of the same name (``--one-shot``).

Calibration statistics are gathered once (timed separately) and shared by every method that
needs them. Per method: perplexity on two held-out texts (wiki, news), parameters, bytes on
disk, wall time and peak RSS of the compression. Prints a table and writes
``bench/results/compress_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from results_io import peak_rss_bytes, reset_peak_rss

import eigenpatch
from eigenpatch.calibration import DEFAULT_FISHER_WINDOWS, DEFAULT_WINDOWS
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.format.checkpoint import weights_bytes
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import LowRank, parse_method
from eigenpatch.patchers.lowrank.cli import DEFAULT_REFINE_STEPS
from eigenpatch.patchers.lowrank.oneshot import calibration_stats
from eigenpatch.patchers.targets import find_linears
from eigenpatch.recipe import PatchContext, count_parameters
from eigenpatch.table import fmt_bytes, fmt_count, fmt_float, format_table
from eigenpatch.zoo import resolve_text

RESULTS = Path(__file__).parent / "results"
METHODS = ["svd", "uniform+whiten", "welore+svd", "welore+fwsvd", "welore+whiten", "loss+whiten", "loss+fwhiten",
           "seq0:loss+fwhiten", "seq:loss+fwhiten"]  # fmt: skip
EVAL_TEXTS = ["wiki", "news"]


def evaluate(model: torch.nn.Module, ids: dict[str, torch.Tensor], label: str) -> dict[str, float]:
    return {t: perplexity(model, x, desc=f"{label} {t}").ppl for t, x in ids.items()}


def layer_by_layer(method: str, refine_steps: int) -> dict[str, object]:
    """``LowRank`` fields of a method name: ``seq:A+F`` is the layer-by-layer fit (closed form, then
    ``refine_steps`` of block-local refinement), ``seq0:A+F`` the closed form alone, ``A+F`` one-shot."""
    prefix, _, name = method.rpartition(":")
    if prefix not in ("", "seq", "seq0"):
        raise SystemExit(f"unknown method prefix {prefix!r}: use seq: or seq0:")
    fields: dict[str, object] = dict(parse_method(name))
    if prefix:
        fields.update(sequential=True, refine_steps=refine_steps if prefix == "seq" else 0)
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.5])
    parser.add_argument("--max-tokens", type=int, default=4096, help="eval tokens per text")
    parser.add_argument("--calib-windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--fisher-windows", type=int, default=DEFAULT_FISHER_WINDOWS)
    parser.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS, help="per layer, for seq: methods")
    parser.add_argument("--out", type=Path, default=RESULTS / "compress_quality.json")
    args = parser.parse_args()

    model, tokenizer, _ = load_model(args.model)
    ids = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.max_tokens) for t in EVAL_TEXTS}
    dense = {"method": "dense", "ratio": 0.0, "params": count_parameters(model), "ppl": evaluate(model, ids, "dense")}
    rows = [dense]

    # Gather calibration statistics once, timing each kind.
    calib_cfg = LowRank(calib_windows=args.calib_windows, fisher_windows=args.fisher_windows)
    context = PatchContext(tokenizer=tokenizer, calib_text=resolve_text("wiki", split="calib"))
    stats = calibration_stats(model, find_linears(model, calib_cfg.targets), calib_cfg, context)
    needed = {part for m in args.methods if m != "svd" for part in parse_method(m.rpartition(":")[2]).values()}
    calibration = {}
    for name, wanted in (("whitening", {"whiten", "fwhiten", "loss"}), ("input_fisher", {"fwsvd"}),
                         ("output_scale", {"fwhiten", "loss"})):  # fmt: skip
        if needed & wanted:
            reset_peak_rss()
            start = time.perf_counter()
            getattr(stats, name)
            calibration[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss": peak_rss_bytes()}

    for ratio in args.ratios:
        for method in args.methods:
            model, _, folder = load_model(args.model)
            config = LowRank(ratio=ratio, calib_windows=args.calib_windows, fisher_windows=args.fisher_windows,
                             **layer_by_layer(method, args.refine_steps))  # fmt: skip
            reset_peak_rss()
            start = time.perf_counter()
            report = eigenpatch.patch(
                model, config, tokenizer=tokenizer, calib_text=context.calib_text, calibration_cache=context.cache
            )
            seconds = time.perf_counter() - start
            rss = peak_rss_bytes()
            with tempfile.TemporaryDirectory() as tmp:
                size = weights_bytes(eigenpatch.save(model, Path(tmp) / "m"))
            step = report["steps"][0]
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "params": report["model_params_after"],
                    "targeted_kept": step["targeted_params_after"] / step["targeted_params_before"],
                    "kept_dense": step["kept_dense"],
                    "weights_bytes": size,
                    "patch_seconds": round(seconds, 1),
                    "patch_peak_rss": rss,
                    "ppl": evaluate(model, ids, f"{method}@{ratio}"),
                }
            )
            print(f"{method} @ {ratio}: {rows[-1]['ppl']}", flush=True)
    dense["weights_bytes"] = weights_bytes(folder)

    headers = ["R", "method", "kept", "dense", "model params", "on disk", *(f"ppl {t}" for t in EVAL_TEXTS),
               "s", "peak RSS"]  # fmt: skip
    table = format_table(
        headers,
        [
            [
                f"{r['ratio']:g}",
                r["method"],
                f"{r.get('targeted_kept', 1.0):.3f}",
                r.get("kept_dense", "-"),
                fmt_count(r["params"]),
                fmt_bytes(r["weights_bytes"]),
                *(fmt_float(r["ppl"][t]) for t in EVAL_TEXTS),
                r.get("patch_seconds", "-"),
                fmt_bytes(r.get("patch_peak_rss")),
            ]
            for r in rows
        ],
    )
    scored = {t: len(x) - (len(x) + 511) // 512 for t, x in ids.items()}
    print(f"\n{args.model}; eval tokens per text {scored}; calibration {args.calib_windows} x 512 wiki:calib tokens")
    print(f"(gradient statistics on the first {args.fisher_windows} windows); calibration cost: {calibration}\n")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "eval_texts": EVAL_TEXTS,
        "eval_tokens": args.max_tokens,
        "calib_windows": args.calib_windows,
        "fisher_windows": args.fisher_windows,
        "calibration": calibration,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
