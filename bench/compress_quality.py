"""Compression ratio vs perplexity: dense and each method side by side, in one process.

    python bench/compress_quality.py                      # SmolLM2-135M, svd at 0.1 0.2 0.3 0.5
    python bench/compress_quality.py --ratios 0.2 0.5 --max-tokens 16384

Prints a table and writes ``bench/results/compress_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import eigenpatch
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.hf_io import load_model
from eigenpatch.recipe import config_from_dict, count_parameters
from eigenpatch.table import fmt_count, fmt_float, format_table
from eigenpatch.zoo import resolve_text

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["svd"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--text", default="wiki")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "compress_quality.json")
    args = parser.parse_args()

    model, tokenizer, _ = load_model(args.model)
    ids = tokenize(tokenizer, resolve_text(args.text, split="eval"), args.max_tokens)
    dense = perplexity(model, ids, seq_len=args.seq_len, desc="dense")
    rows = [{"method": "dense", "ratio": 0.0, "params": count_parameters(model), **dense.as_dict()}]
    for method in args.methods:
        for ratio in args.ratios:
            model, _, _ = load_model(args.model)
            start = time.perf_counter()
            report = eigenpatch.patch(model, config_from_dict({"transform": method, "ratio": ratio}))
            seconds = time.perf_counter() - start
            step = report["steps"][0]
            ppl = perplexity(model, ids, seq_len=args.seq_len, desc=f"{method}@{ratio}")
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "params": report["model_params_after"],
                    "targeted_kept": step["targeted_params_after"] / step["targeted_params_before"],
                    "patch_seconds": round(seconds, 2),
                    **ppl.as_dict(),
                }
            )
    table = format_table(
        ["method", "ratio", "targeted kept", "model params", "vs dense", "perplexity", "ppl / dense"],
        [
            [
                r["method"],
                f"{r['ratio']:g}",
                f"{r.get('targeted_kept', 1.0):.3f}",
                fmt_count(r["params"]),
                f"{r['params'] / rows[0]['params']:.3f}",
                fmt_float(r["ppl"]),
                fmt_float(r["ppl"] / dense.ppl, 1),
            ]
            for r in rows
        ],
    )
    print(f"\n{args.model}, {dense.scored_tokens:,} scored tokens of '{args.text}' (eval split), seq {args.seq_len}\n")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "text": args.text,
        "scored_tokens": dense.scored_tokens,
        "seq_len": args.seq_len,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
