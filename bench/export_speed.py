"""Dense vs patched SmolLM2 in ONNX Runtime (CPU), each in every edge format, same process.

    python bench/export_speed.py                                    # patches with --compress 0.5 itself
    python bench/export_speed.py --patched patched/smollm2-135m-loss-fwhiten-c0.5   # reuse a checkpoint
    python bench/export_speed.py --patched ... --formats fp32 int4 --block 32

Formats: ``fp32`` (norms fused into ONNX Runtime ops, the default); ``portable`` (fp32, standard
ONNX ops only: ``eigenpatch export --portable``); ``int8`` / ``int4`` weight-only (``eigenpatch export --weights``,
``MatMulNBits`` in blocks of ``--block``); ``dynamic-int8`` (``--dynamic-int8``). Per variant:
the files' size, load time, prefill and batch-1 decode tokens/s, max |Δlogits| and greedy tokens
agreeing with PyTorch fp32, and perplexity on the held-out wiki text *run through ONNX Runtime*
(4,096 tokens in 512-token windows, as ``bench/compress_quality.py``). It answers "how small, how
fast and how good is my model in each format". Each variant is exported as a user would
(verification on: fp32 parity is part of export). Timings are interleaved across variants,
repeated, and the median is kept: these machines are noisy, quote the ratios. Prints a table and
writes ``bench/results/export_speed.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.export.onnx import export_onnx
from eigenpatch.export.precision import DEFAULT_BLOCK, onnx_bytes
from eigenpatch.export.runtime import OnnxCausalLM
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import LowRank
from eigenpatch.table import fmt_bytes, fmt_float, format_table
from eigenpatch.zoo import resolve_text


def prompt_tokens(tokenizer: Any, n: int) -> np.ndarray:
    """The first ``n`` tokens of the held-out wiki text: real text, identical for every variant."""
    ids = tokenizer(resolve_text("wiki", split="eval")[:20_000], add_special_tokens=False)["input_ids"]
    return np.asarray([ids[:n]], dtype=np.int64)


#: ``--formats`` name -> ``export_onnx`` arguments.
FORMATS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "float32"},
    "portable": {"precision": "float32", "portable": True},
    "int8": {"precision": "int8"},
    "int4": {"precision": "int4"},
    "dynamic-int8": {"precision": "dynamic-int8"},
}


def onnx_perplexity(runner: OnnxCausalLM, ids: list[int], window: int = 512) -> float:
    """Perplexity of the graph on ``ids``: non-overlapping windows, each from an empty cache (as
    :func:`eigenpatch.evaluate.perplexity` scores PyTorch), log-softmax in float64."""
    nll, scored = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = np.asarray([ids[start : start + window]], dtype=np.int64)
        if chunk.shape[1] < 2:
            break
        logits, _ = runner.step(chunk, np.ones_like(chunk), runner.empty_past(1))
        logits = logits[0, :-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        nll += float((logsumexp - logits[np.arange(len(logits)), chunk[0, 1:]]).sum())
        scored += chunk.shape[1] - 1
    return float(np.exp(nll / scored))


def time_load(folder: Path) -> float:
    start = time.perf_counter()
    OnnxCausalLM(folder, provider="CPU")
    return time.perf_counter() - start


def time_prefill(runner: OnnxCausalLM, ids: np.ndarray) -> float:
    """Prompt tokens per second for one forward over ``ids`` with an empty cache."""
    start = time.perf_counter()
    runner.step(ids, np.ones_like(ids), runner.empty_past(1))
    return ids.shape[1] / (time.perf_counter() - start)


def time_decode(runner: OnnxCausalLM, ids: np.ndarray, steps: int) -> float:
    """Batch-1 greedy decode tokens per second through the KV cache (the prompt's prefill excluded)."""
    logits, past = runner.step(ids, np.ones_like(ids), runner.empty_past(1))
    token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
    length = ids.shape[1]
    start = time.perf_counter()
    for _ in range(steps):
        length += 1
        logits, past = runner.step(token, np.ones((1, length), dtype=np.int64), past)
        token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patched", help="patched checkpoint to use (default: patch --compress 0.5 here)")
    parser.add_argument("--compress", type=float, default=0.5)
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=[f for f in FORMATS if f != "portable"])
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="rows per scale of int8 / int4 weights")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="wiki:eval tokens scored through ONNX Runtime")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "export_speed.json")
    args = parser.parse_args()

    dense, tokenizer, _ = load_model(args.model)
    if args.patched:
        patched, _, _ = load_model(args.patched)
        patched_from = Path(args.patched).name
    else:  # a quick calibration: this bench measures speed and size, compress_quality.py measures quality
        patched, _, _ = load_model(args.model)
        config = LowRank(ratio=args.compress, calib_windows=32, fisher_windows=8)
        eigenpatch.patch(patched, config, tokenizer=tokenizer, calib_text=resolve_text("wiki", split="calib"))
        method = f"{config.allocator}+{config.factorizer}"
        patched_from = f"{args.model} {method} ratio {args.compress} (32 calibration windows)"
    variants = [
        (name if fmt == "fp32" else f"{name} {fmt}", model, FORMATS[fmt])
        for fmt in args.formats
        for name, model in (("dense", dense), ("patched", patched))
    ]
    eval_ids = tokenizer(resolve_text("wiki", split="eval"), add_special_tokens=False)["input_ids"][: args.eval_tokens]

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="eigenpatch-export-bench-") as tmp:
        folders = {}
        for name, model, options in variants:
            folder = Path(tmp) / name.replace(" ", "-")
            meta = export_onnx(model, folder, tokenizer=tokenizer, block=args.block, **options)
            folders[name] = folder
            parity = meta.get("precision") or meta["parity"]
            rows[name] = {
                "fp32_of": name.split(" ")[0],
                "bytes": onnx_bytes(folder),
                "export_seconds": meta["export_seconds"],
                "max_abs_logit_diff": parity["max_abs_logit_diff"],
                "greedy": (
                    f"{meta['parity']['greedy_tokens_matched']}/{meta['parity']['greedy_tokens_matched']}"
                    if "precision" not in meta
                    else f"{sum(parity['greedy_steps_agreeing'])}/{parity['of'] * len(parity['greedy_steps_agreeing'])}"
                ),
            }
            rows[name]["ppl_wiki"] = onnx_perplexity(OnnxCausalLM(folder, provider="CPU"), eval_ids)
            print(f"exported {name}: {rows[name]['bytes'] / 1e6:.1f} MB, ppl {rows[name]['ppl_wiki']:.2f}", flush=True)
        runners = {name: OnnxCausalLM(folder, provider="CPU") for name, folder in folders.items()}
        prefill_ids = prompt_tokens(tokenizer, args.prefill_tokens)
        decode_ids = prompt_tokens(tokenizer, args.decode_prompt)
        samples: dict[str, dict[str, list[float]]] = {n: {"load": [], "prefill": [], "decode": []} for n in rows}
        for runner in runners.values():  # warm-up: first runs allocate arenas
            time_prefill(runner, prefill_ids)
        for r in range(args.repeats):  # interleaved so drift in machine load hits every variant alike
            for name, runner in runners.items():
                samples[name]["load"].append(time_load(folders[name]))
                samples[name]["prefill"].append(time_prefill(runner, prefill_ids))
                samples[name]["decode"].append(time_decode(runner, decode_ids, args.decode_steps))
            print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    for name, s in samples.items():
        rows[name].update(
            {
                "load_seconds": statistics.median(s["load"]),
                "prefill_tok_s": statistics.median(s["prefill"]),
                "decode_tok_s": statistics.median(s["decode"]),
            }
        )
    base = rows.get("dense") or next(iter(rows.values()))  # the ratios are to dense fp32 when it ran
    table = [
        [
            name,
            fmt_bytes(r["bytes"]),
            fmt_float(r["bytes"] / base["bytes"]),
            fmt_float(r["load_seconds"], 2),
            fmt_float(r["prefill_tok_s"], 0),
            fmt_float(r["prefill_tok_s"] / base["prefill_tok_s"]),
            fmt_float(r["decode_tok_s"], 1),
            fmt_float(r["decode_tok_s"] / base["decode_tok_s"]),
            f"{r['max_abs_logit_diff']:.1e}",
            r["greedy"],
            fmt_float(r["ppl_wiki"], 2),
            fmt_float(r["ppl_wiki"] / rows[r["fp32_of"]]["ppl_wiki"], 3) if r["fp32_of"] in rows else "-",
        ]
        for name, r in rows.items()
    ]
    headers = ["variant", "ONNX size", "x dense", "load s", "prefill tok/s", "x dense", "decode tok/s", "x dense"]
    print(format_table([*headers, "max |Δlogit|", "greedy = PyTorch", "ppl wiki (ORT)", "x fp32"], table))
    result = {
        "bench": "export_speed",
        "model": args.model,
        "patched": patched_from,
        "provider": "CPUExecutionProvider",
        "prefill_tokens": args.prefill_tokens,
        "decode_prompt_tokens": args.decode_prompt,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "block": args.block,
        "eval_tokens": len(eval_ids),
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
