"""Do answers depend on server load? Dense vs patched SmolLM2 behind vLLM, one by one vs concurrent.

    python bench/batch_invariance.py --patched patched/smollm2-135m-loss-fwhiten-c0.5
    python bench/batch_invariance.py --patched DIR --dtypes bfloat16 float32 --eager

Per model and dtype, one server: ``--prompts`` prompts are sent one by one (greedy, ``--max-tokens``
tokens, the top-2 log-probabilities of each step), then ``--concurrency`` requests at once (each
prompt ``concurrency / prompts`` times). A prompt *agrees* when every concurrent copy returns the
one-by-one tokens.

It also measures what decides agreement:

- **noise**: the largest change of a chosen token's log-probability between the one-by-one and a
  concurrent run, over the steps before any divergence (what batching does to the numbers);
- **margin**: the gap between the top-2 log-probabilities at each one-by-one step (how much noise
  a step can take before greedy decoding picks another token), and at each first divergence.

Where the noise is alike for both models and the divergences sit at small margins, disagreement
comes from near-ties, not from the patched layers' kernels.

First, in this process, the **kernels**: for every matrix shape the two checkpoints store, the GEMM
vLLM's CPU dispatch picks for it on this machine (oneDNN, sgl-kernel or ``F.linear``: it depends
on the CPU's ISA and the matrix size, and factors are small matrices) and whether a row's output
is bit-identical when computed alone and inside batches of 2 to 512 rows. Prints the tables and
writes ``bench/results/batch_invariance.json``.
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from results_io import RESULTS, write_result
from safetensors import safe_open
from serve_throughput import free_port, post

from eigenpatch.serving.launcher import serve, stop
from eigenpatch.table import fmt_float, format_table
from eigenpatch.zoo import resolve_model, resolve_text

#: a step whose top-2 log-probabilities are closer than this is a near-tie
NEAR_TIE = 0.05
#: the CPU features that decide vLLM's CPU GEMM (oneDNN needs AVX-512 BF16 for bf16; AMX: sgl-kernel)
ISA = {
    "avx512": lambda: torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
    "avx512_bf16": torch.cpu._is_avx512_bf16_supported,
    "amx": torch.cpu._is_amx_tile_supported,
}


def greedy(url: str, name: str, prompt: str, max_tokens: int) -> tuple[list[int], list[float], list[float]]:
    """Tokens, their log-probabilities, and each step's top-1 minus top-2 log-probability."""
    payload = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    reply = post(f"{url}/v1/completions", payload | {"logprobs": 2, "return_tokens_as_token_ids": True})
    lp = reply["choices"][0]["logprobs"]
    tokens = [int(t.split(":")[1]) for t in lp["tokens"]]
    margins = []
    for top in lp["top_logprobs"]:
        best = [*sorted(top.values(), reverse=True), float("-inf")]
        margins.append(best[0] - best[1])
    return tokens, lp["token_logprobs"], margins


#: batch sizes a row's output is compared across
BATCHES = (2, 3, 8, 31, 64, 128, 512)


def stored_shapes(folder: Path) -> set[tuple[int, int]]:
    """(out, in) of every 2-D decoder-layer matrix in the checkpoint's safetensors."""
    shapes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = f.get_slice(name).get_shape()
                if ".layers." in name and len(shape) == 2:
                    shapes.add((shape[0], shape[1]))
    return shapes


def kernel_rows(shapes: set[tuple[int, int]], dtype: torch.dtype) -> list[dict[str, Any]]:
    """Per shape: the kernel vLLM's CPU dispatch gives it here, and whether it is batch-invariant."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    rows = []
    g = torch.Generator().manual_seed(0)
    for n, k in sorted(shapes):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter((torch.randn(n, k, generator=g) / k**0.5).to(dtype), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        names = layer.cpu_linear.__code__.co_names  # the dispatch's closures name the op they call
        kernel = next(
            (op for op in ("onednn_mm", "weight_packed_linear_cpu", "zentorch_linear_unary") if op in names), "F.linear"
        )
        x = torch.randn(max(BATCHES), k, generator=g).to(dtype)
        alone = torch.cat([layer.cpu_linear(x[i : i + 1], layer.weight, None) for i in range(0, max(BATCHES), 37)])
        variant = []
        for m in BATCHES:
            rows_in = list(range(0, m, 37))
            if not torch.equal(layer.cpu_linear(x[:m], layer.weight, None)[rows_in], alone[: len(rows_in)]):
                variant.append(m)
        rows.append({"shape": [n, k], "kernel": kernel, "batch_variant_at": variant})
    return rows


def measure(model: Path, dtype: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--dtype", dtype, "--max-model-len", "1024", *(["--enforce-eager"] if args.eager else [])]
    process = serve(model, port=port, extra=extra, foreground=False)
    try:
        greedy(url, model.name, prompts[0], 4)  # warm-up
        alone = [greedy(url, model.name, p, args.max_tokens) for p in prompts]
        copies = args.concurrency // len(prompts)
        jobs = [i for i in range(len(prompts)) for _ in range(copies)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda i: greedy(url, model.name, prompts[i], args.max_tokens), jobs))
    finally:
        stop(process)
    agree = [True] * len(prompts)
    noise, at_divergence = 0.0, []
    for i, (tokens, logprobs, _) in zip(jobs, together, strict=True):
        ref_tokens, ref_logprobs, ref_margins = alone[i]
        same = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
        noise = max([noise, *(abs(a - b) for a, b in zip(logprobs[:same], ref_logprobs[:same], strict=True))])
        if same < len(tokens):
            agree[i] = False
            at_divergence.append(ref_margins[same])
    margins = [m for _, _, ms in alone for m in ms]
    return {
        "prompts_identical": sum(agree),
        "prompts": len(prompts),
        "replies_identical": len(jobs) - len(at_divergence),
        "replies": len(jobs),
        "noise_max_abs_logprob": noise,
        "median_margin": statistics.median(margins),
        "near_tie_steps": sum(m < NEAR_TIE for m in margins) / len(margins),
        "margins_at_divergence": at_divergence,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the dense model (zoo name or folder)")
    parser.add_argument("--patched", type=Path, required=True, help="a patched checkpoint of --model")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="vLLM --dtype values to run")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--eager", action="store_true", help="serve with --enforce-eager (faster start)")
    parser.add_argument("--kernels-only", action="store_true", help="only the in-process kernel check")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("batch_invariance_kernels.json" if args.kernels_only else "batch_invariance.json")

    models = {"dense": resolve_model(args.model), "patched": args.patched}
    isa = {flag: bool(fn()) for flag, fn in ISA.items()}
    print("CPU:", ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in isa.items()))
    kernels = {}
    for dtype in args.dtypes:
        shapes = {name: stored_shapes(path) for name, path in models.items()}
        kernels[dtype] = kernel_rows(shapes["dense"] | shapes["patched"], getattr(torch, dtype))
        summary: dict[tuple[str, str], list[int]] = {}
        for r in kernels[dtype]:
            who = "dense" if tuple(r["shape"]) in shapes["dense"] else "patched only"
            count = summary.setdefault((who, r["kernel"]), [0, 0])
            count[0] += 1
            count[1] += bool(r["batch_variant_at"])
        table = [[who, kernel, str(n), str(bad)] for (who, kernel), (n, bad) in sorted(summary.items())]
        headers = [f"matrix shapes ({dtype})", "vLLM CPU kernel", "shapes", "batch-variant shapes"]
        print(format_table(headers, table))
    if args.kernels_only:
        write_result(args.out, {"bench": "batch_invariance", "isa": isa, "kernels": kernels})
        return
    words = resolve_text("wiki", split="eval").split()
    prompts = [" ".join(words[i * 40 : i * 40 + 32]) for i in range(args.prompts)]
    rows = {
        f"{name} {dtype}": measure(path, dtype, prompts, args) for dtype in args.dtypes for name, path in models.items()
    }
    table = [
        [
            name,
            f"{r['prompts_identical']}/{r['prompts']}",
            f"{r['replies_identical']}/{r['replies']}",
            fmt_float(r["noise_max_abs_logprob"], 4),
            fmt_float(r["median_margin"], 3),
            f"{100 * r['near_tie_steps']:.1f} %",
            fmt_float(max(r["margins_at_divergence"], default=float("nan")), 4),
        ]
        for name, r in rows.items()
    ]
    headers = ["model", "prompts identical", "replies identical", "noise (max |dlogp|)", "median margin"]
    headers += [f"steps with margin < {NEAR_TIE}", "largest margin at a divergence"]
    print(format_table(headers, table))
    result = {
        "bench": "batch_invariance",
        "model": args.model,
        "patched": args.patched.name,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "eager": args.eager,
        "isa": isa,
        "kernels": kernels,
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
