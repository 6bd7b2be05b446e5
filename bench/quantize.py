"""Quantized SmolLM2-135M: bytes, perplexity and decode speed of RTN and GPTQ at 8, 4 and 2 bits.

    python bench/quantize.py                       # the table in docs/quantize.md
    python bench/quantize.py --calib-windows 128   # GPTQ on README command 1's calibration

In one process, from one dense model: the dense fp32 model, then ``quantize`` at each
``METHOD:BITS:GROUP`` of ``--configs`` (every decoder Linear; head and embedding stay), each
patched from a fresh copy and saved, then reloaded through ``eigenpatch.load`` like any user's.
Each row reports:

- the bytes the quantized Linears take (codes, scales, zero points) against the same Linears in
  bf16, and the whole checkpoint's bytes on disk (the fp32 embedding is most of SmolLM2's);
- perplexity on ``--max-tokens`` of ``wiki:eval`` and ``news:eval`` (fp32 activations: the
  dequantizing path, so the numbers are those of the stored codes);
- the seconds ``patch()`` took (GPTQ: the engine's layer-by-layer pass on the propagated inputs);
- batch-1 greedy decode in transformers with bf16 activations (``--decode-tokens`` new tokens after
  a short prompt) against the dense model in bf16, and the kernel the 4-bit Linears ran.

SmolLM2's weights were dequantized from a Q4_1 GGUF (groups of 32 inputs, a scale and a minimum):
a 4-bit grid with groups of 32 can land back on those codes, groups of 64 and 128 cannot (each
spans 2 or 4 source groups with their own scales), and no 2-bit grid can. Writes
``bench/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.format.checkpoint import weights_bytes
from eigenpatch.format.quantized import QuantizedLinear
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import Quantize
from eigenpatch.table import fmt_bytes, format_table
from eigenpatch.zoo import resolve_text

MODEL = "smollm2-135m"
CONFIGS = (
    "rtn:8:64",
    "gptq:8:64",
    "rtn:4:32",
    "gptq:4:32",
    "rtn:4:64",
    "gptq:4:64",
    "rtn:4:128",
    "gptq:4:128",
    "rtn:2:32",
    "gptq:2:32",
)


def decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, repeats: int = 3) -> float:
    """Best of ``repeats``: seconds per new token of batch-1 greedy decoding (after one warm-up)."""
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompt, **kw)
            best = min(best, time.perf_counter() - start)
    return best / tokens


def kernels(model: torch.nn.Module) -> list[str]:
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    found = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            found.add(m.kernel(x.expand(1, m.in_features)))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="METHOD:BITS:GROUP")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096, help="eval tokens per text")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize.json")
    args = parser.parse_args()

    base, tokenizer, folder = load_model(MODEL)
    texts = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.max_tokens) for t in ("wiki", "news")}
    calib = resolve_text("wiki", split="calib")
    prompt = torch.tensor([tokenizer("The history of the city begins")["input_ids"]])

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        return {t: round(perplexity(model, x, show_progress=False).ppl, 2) for t, x in texts.items()}

    dense_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    dense_decode = decode_seconds(dense_bf16, prompt, args.decode_tokens)
    del dense_bf16
    rows = [
        {"config": "dense", "ppl": ppl(base), "disk_bytes": weights_bytes(folder), "decode_s_per_token": dense_decode}
    ]
    print(rows[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.configs:
            method, bits, group = spec.split(":")
            model = copy.deepcopy(base)
            config = Quantize(bits=int(bits), group=int(group), method=method, calib_windows=args.calib_windows)
            start = time.perf_counter()
            report = eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=calib, show_progress=False)
            seconds = time.perf_counter() - start
            out = eigenpatch.save(model, Path(tmp) / spec.replace(":", "-"), tokenizer=tokenizer)
            del model
            loaded = eigenpatch.load(out).eval()
            step = report["steps"][0]
            row = {
                "config": spec,
                "quantize_seconds": round(seconds, 1),
                "linear_bytes": step["bytes_after"],
                "linear_bf16_bytes": step["bf16_bytes_before"],
                "disk_bytes": weights_bytes(out),
                "ppl": ppl(loaded),
            }
            loaded = loaded.to(torch.bfloat16)
            row["decode_s_per_token"] = decode_seconds(loaded, prompt, args.decode_tokens)
            row["decode_vs_dense_bf16"] = round(dense_decode / row["decode_s_per_token"], 2)
            row["bf16_kernels"] = kernels(loaded)
            print(row, flush=True)
            rows.append(row)
    table = [
        [
            r["config"],
            fmt_bytes(r.get("linear_bytes")),
            f"{r['linear_bytes'] / r['linear_bf16_bytes']:.3f}" if "linear_bytes" in r else "-",
            fmt_bytes(r["disk_bytes"]),
            f"{r['ppl']['wiki']:.2f}",
            f"{r['ppl']['news']:.2f}",
            r.get("quantize_seconds", "-"),
            f"{r.get('decode_vs_dense_bf16', 1.0):.2f}",
            ",".join(r.get("bf16_kernels", [])) or "-",
        ]
        for r in rows
    ]
    header = ["config", "Linears", "x bf16", "on disk", "ppl wiki", "ppl news", "s", "decode x bf16", "bf16 kernel"]
    print(format_table(header, table))
    torch_threads = torch.get_num_threads()
    write_result(
        args.out,
        {"model": MODEL, "calib_windows": args.calib_windows, "threads": torch_threads, "rows": rows},
    )


if __name__ == "__main__":
    main()
