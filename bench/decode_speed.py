"""Decode speed of dense and patched checkpoints in every runtime, side by side in one run.

    python bench/decode_speed.py --patched patched/smollm2-135m-loss-fwhiten-c0.5
    python bench/decode_speed.py --patched P05 P03 --runtimes transformers onnx --repeats 5
    python bench/decode_speed.py --patched Q4 --runtimes vllm --vllm-int4 torch vllm   # int4 kernels in vLLM

Runtimes: ``transformers`` (eager, fp32, as ``eigenpatch.load`` gives it; ``transformers-bf16``
the same in bf16, where quantized Linears run PyTorch's int4 kernel), ``onnx`` (the fp32
graph ``eigenpatch export`` writes, in ONNX Runtime's CPU provider) and ``vllm`` (``eigenpatch
serve``, bf16, the OpenAI endpoint, which compiles its model with ``torch.compile``). transformers
under ``torch.compile`` is not a row: its warm-up (a 256-token prefill, batch-1 and batch-16 decode
through the dynamic KV cache) had not finished after 9 minutes on the 2-core machine.
Per runtime and model: prefill tokens/s (one 256-token prompt), batch-1 decode tokens/s (64
greedy tokens after a 128-token prompt), 16-sequence decode tokens/s (one batch of 16 in the
in-process runtimes, 16 concurrent HTTP requests in vLLM) and the peak RSS of the process (vLLM:
the server's process tree) that ran it.

Batch-1 decode reads every weight once per token, so the most a compressed model can gain there
is the **bytes limit**: dense weight bytes / patched weight bytes. The table prints it and the
fraction of it each runtime reaches. Every model of a runtime is loaded at once (one worker
process each, so each has its own peak RSS) and the repeats are interleaved across them, so
drift in machine load hits every variant alike; medians are kept. Quote the ratios: these
machines are noisy. Writes ``bench/results/decode_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from results_io import RESULTS, peak_rss_bytes, write_result

from eigenpatch.table import fmt_bytes, fmt_float, format_table
from eigenpatch.zoo import resolve_model, resolve_text

RUNTIMES = ("transformers", "transformers-bf16", "onnx", "vllm")
DEFAULT_RUNTIMES = ("transformers", "onnx", "vllm")


def weight_bytes(folder: Path) -> int:
    """Bytes of the checkpoint's safetensors: what one batch-1 decode step streams (the tied head
    reads the whole embedding table, so nothing on disk is skipped)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` disjoint ``length``-token windows of the held-out wiki text: real text, the same for every variant."""
    ids = tokenizer(resolve_text("wiki", split="eval")[:400_000], add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        raise SystemExit(f"wiki:eval has {len(ids)} tokens; {count} prompts of {length} need more")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


# ---------------------------------------------------------------- in-process runtimes (workers)


class TorchRunner:
    """transformers through its KV cache, in fp32 or bf16 (where quantized Linears run the int4 kernel)."""

    def __init__(self, folder: Path, bf16: bool = False) -> None:
        import torch

        import eigenpatch

        torch.set_grad_enabled(False)
        self.torch = torch
        self.model = eigenpatch.load(folder, dtype=torch.bfloat16 if bf16 else torch.float32).eval()

    def step(self, ids: Any, cache: Any) -> Any:
        logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    def prefill(self, batch: list[list[int]]) -> tuple[Any, Any]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        return self.step(self.torch.tensor(batch), cache), cache

    def decode(self, token: Any, cache: Any) -> tuple[Any, Any]:
        return self.step(token, cache), cache


class OnnxRunner:
    """The exported fp32 graph in ONNX Runtime's CPU provider."""

    def __init__(self, folder: Path) -> None:
        import numpy as np

        from eigenpatch.export.runtime import OnnxCausalLM

        self.np = np
        self.runner = OnnxCausalLM(folder, provider="CPU")

    def prefill(self, batch: list[list[int]]) -> tuple[Any, Any]:
        ids = self.np.asarray(batch, dtype=self.np.int64)
        logits, past = self.runner.step(ids, self.np.ones_like(ids), self.runner.empty_past(len(batch)))
        return logits[:, -1:].argmax(-1), (past, ids.shape[1])

    def decode(self, token: Any, state: Any) -> tuple[Any, Any]:
        past, length = state
        mask = self.np.ones((token.shape[0], length + 1), dtype=self.np.int64)
        logits, past = self.runner.step(token, mask, past)
        return logits[:, -1:].argmax(-1), (past, length + 1)


def measure_in_process(runner: Any, work: dict[str, Any]) -> dict[str, float]:
    """Prefill, batch-1 and batch-16 decode tokens/s of one runner (one repeat)."""
    out = {}
    start = time.perf_counter()
    runner.prefill(work["prefill"])
    out["prefill_tok_s"] = len(work["prefill"][0]) / (time.perf_counter() - start)
    for key, batch in (("batch1_tok_s", work["decode"][:1]), ("batch16_tok_s", work["decode"])):
        token, state = runner.prefill(batch)
        start = time.perf_counter()
        for _ in range(work["steps"]):
            token, state = runner.decode(token, state)
        out[key] = len(batch) * work["steps"] / (time.perf_counter() - start)
    return out


def worker(runtime: str, folder: Path) -> None:
    """Load one model, then answer each line of stdin (a JSON work order) with one measurement."""
    runner = OnnxRunner(folder) if runtime == "onnx" else TorchRunner(folder, bf16=runtime == "transformers-bf16")
    print("ready", flush=True)
    for line in sys.stdin:
        work = json.loads(line)
        if work.get("quit"):
            break
        print(json.dumps(measure_in_process(runner, work) | {"peak_rss": peak_rss_bytes()}), flush=True)


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, runtime: str, folder: Path) -> None:
        command = [sys.executable, __file__, "--worker", runtime, str(folder)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = False

    def ask(self, work: dict[str, Any]) -> dict[str, Any]:
        if not self.ready:  # wait for the load here, so workers load in parallel with each other
            if self.process.stdout.readline().strip() != "ready":
                raise SystemExit(f"worker {self.process.args} failed to start (see above)")
            self.ready = True
        self.process.stdin.write(json.dumps(work) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.process.args} died (see above)")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"quit": True}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


# ---------------------------------------------------------------- vLLM (servers)


#: Seconds between one server's measurements and the next server's.
SETTLE_S = 3.0


def measure_vllm(servers: dict[str, Any], work: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One repeat over every server: the same token-id prompts as the in-process runtimes."""
    from serve_throughput import post

    def complete(url: str, name: str, ids: list[int], max_tokens: int) -> int:
        payload = {"model": name, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        return post(f"{url}/v1/completions", payload)["usage"]["completion_tokens"]

    out = {}
    for label, (url, name, _, _) in servers.items():
        # vLLM's engine keeps polling for a while after its last request: started at once, the next
        # server's first phase (the prefill) shared the cores with it and measured 0.2x (docs/benchmarks.md)
        time.sleep(SETTLE_S)
        row = {}  # the servers run without a prefix cache, so every repeat computes its prefill
        start = time.perf_counter()  # prefill: a one-token completion of the long prompt
        complete(url, name, work["prefill"][0], 1)
        row["prefill_tok_s"] = len(work["prefill"][0]) / (time.perf_counter() - start)
        # decode excludes prefill: the time of 1 + steps tokens minus that of 1 token on the same prompt
        start = time.perf_counter()
        complete(url, name, work["decode"][1], 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        complete(url, name, work["decode"][2], work["steps"] + 1)
        row["batch1_tok_s"] = work["steps"] / (time.perf_counter() - start - first)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(work["decode"])) as pool:
            n = len(work["decode"])
            done = list(pool.map(complete, [url] * n, [name] * n, work["decode"], [work["steps"]] * n))
        row["batch16_tok_s"] = sum(done) / (time.perf_counter() - start)
        out[label] = row
    return out


# ---------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("RUNTIME", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help="the dense model (zoo name or folder)")
    parser.add_argument("--patched", nargs="+", required=False, default=[], help="patched checkpoint folder(s)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(DEFAULT_RUNTIMES),
                        help="transformers-bf16: eigenpatch.load(dtype=bfloat16), where quantized Linears run "
                        "PyTorch's int4 kernel (not a default row)")  # fmt: skip
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-dtype", default="bfloat16")
    parser.add_argument(
        "--vllm-int4",
        nargs="+",
        default=[],
        metavar="KERNEL",
        help="serve each patched checkpoint once per EIGENPATCH_VLLM_INT4 value (auto, vllm, torch): "
        "which int4 kernel its quantized Linears run in vLLM (docs/quantize.md)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_speed.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    if not args.patched:
        parser.error("--patched: give at least one patched checkpoint (patch-model --compress 0.5 writes one)")

    from transformers import AutoTokenizer

    models = {"dense": Path(resolve_model(args.model))}
    for folder in map(Path, args.patched):
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} is not a checkpoint folder (no config.json)")
        models[folder.name] = folder
    tokenizer = AutoTokenizer.from_pretrained(models["dense"])
    windows = prompts(tokenizer, args.concurrency + 1, max(args.decode_prompt, args.prefill_tokens))
    work = {
        "prefill": [windows[-1][: args.prefill_tokens]],
        "decode": [w[: args.decode_prompt] for w in windows[: args.concurrency]],
        "steps": args.decode_steps,
    }
    if args.vllm_int4:  # one row per kernel: the same folder served with each EIGENPATCH_VLLM_INT4
        models = {"dense": models["dense"]} | {
            f"{label} [{k}]": folder for label, folder in models.items() if label != "dense" for k in args.vllm_int4
        }
    sizes = {label: weight_bytes(folder) for label, folder in models.items()}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="eigenpatch-decode-bench-") as tmp:
        for runtime in args.runtimes:
            print(f"== {runtime}", flush=True)
            rows[runtime] = run_runtime(runtime, models, work, args, Path(tmp))
    report(rows, sizes, args)


def export_fp32(folder: Path, out: Path) -> Path:
    """The fp32 ONNX graph of ``folder``, as ``eigenpatch export`` writes it (parity verified)."""
    from transformers import AutoTokenizer

    import eigenpatch
    from eigenpatch.export.onnx import export_onnx

    model = eigenpatch.load(folder)
    export_onnx(model, out, tokenizer=AutoTokenizer.from_pretrained(folder), precision="float32")
    del model
    return out


def run_runtime(
    runtime: str, models: dict[str, Path], work: dict[str, Any], args: argparse.Namespace, tmp: Path
) -> dict[str, dict[str, Any]]:
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in models}
    if runtime == "vllm":
        peaks = measure_servers(models, work, args, samples)
    else:
        folders = models if runtime != "onnx" else {k: export_fp32(v, tmp / f"onnx-{k}") for k, v in models.items()}
        workers = {label: Worker(runtime, folder) for label, folder in folders.items()}
        peaks = {}
        try:
            for w in workers.values():  # warm-up (allocates arenas and caches); not kept
                w.ask(work | {"steps": 4})
            for r in range(args.repeats):
                for label, w in workers.items():
                    result = w.ask(work)
                    peaks[label] = result.pop("peak_rss")
                    samples[label].append(result)
                print(f"  repeat {r + 1}/{args.repeats}", flush=True)
        finally:
            for w in workers.values():
                w.close()
    return {
        label: {key: statistics.median(s[key] for s in runs) for key in runs[0]} | {"peak_rss": peaks[label]}
        for label, runs in samples.items()
    }


def measure_servers(
    models: dict[str, Path], work: dict[str, Any], args: argparse.Namespace, samples: dict[str, list]
) -> dict[str, int]:
    """Every model behind its own server, all up at once (an idle vLLM server waits on a socket)."""
    from serve_throughput import PeakSampler, free_port

    from eigenpatch.serving.launcher import serve, stop

    servers: dict[str, Any] = {}
    try:
        for label, folder in models.items():
            port = free_port()
            # no prefix cache: the repeats send the same prompts, and a cached prefill is no prefill
            extra = ["--dtype", args.vllm_dtype, "--max-model-len", "1024", "--no-enable-prefix-caching"]
            kernel = label.rpartition(" [")[2].rstrip("]") if label.endswith("]") else None
            if kernel:
                os.environ["EIGENPATCH_VLLM_INT4"] = kernel  # the server's environment is a copy of ours
            process = serve(folder, port=port, extra=extra, foreground=False)
            os.environ.pop("EIGENPATCH_VLLM_INT4", None)
            sampler = PeakSampler(process.pid)
            sampler.start()
            servers[label] = (f"http://127.0.0.1:{port}", folder.name, process, sampler)
            print(f"  {label} serving on port {port}", flush=True)
        measure_vllm(servers, work | {"steps": 4})  # warm-up
        for r in range(args.repeats):
            for label, row in measure_vllm(servers, work).items():
                samples[label].append(row)
            print(f"  repeat {r + 1}/{args.repeats}", flush=True)
    finally:
        for _, _, process, sampler in servers.values():
            sampler.running = False
            stop(process)
    return {label: sampler.peak for label, (_, _, _, sampler) in servers.items()}


def report(rows: dict[str, dict[str, dict[str, Any]]], sizes: dict[str, int], args: argparse.Namespace) -> None:
    table = []
    for runtime, by_model in rows.items():
        dense = by_model["dense"]
        for label, r in by_model.items():
            limit = sizes["dense"] / sizes[label]
            speedup = r["batch1_tok_s"] / dense["batch1_tok_s"]
            r |= {"bytes_limit": limit, "batch1_x_dense": speedup, "fraction_of_limit": speedup / limit}
            table.append(
                [
                    runtime,
                    label,
                    fmt_bytes(sizes[label]),
                    fmt_float(r["prefill_tok_s"], 0),
                    fmt_float(r["prefill_tok_s"] / dense["prefill_tok_s"]),
                    fmt_float(r["batch1_tok_s"], 1),
                    fmt_float(speedup),
                    fmt_float(limit),
                    fmt_float(speedup / limit),
                    fmt_float(r["batch16_tok_s"], 1),
                    fmt_float(r["batch16_tok_s"] / dense["batch16_tok_s"]),
                    fmt_bytes(r["peak_rss"]),
                ]
            )
    headers = ["runtime", "model", "weights", "prefill tok/s", "x dense", "batch-1 tok/s", "x dense"]
    headers += ["bytes limit", "of limit", f"{args.concurrency}-seq tok/s", "x dense", "peak RSS"]
    print(format_table(headers, table))
    result = {
        "bench": "decode_speed",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "weights_bytes": sizes,
        "prefill_tokens": args.prefill_tokens,
        "decode_prompt_tokens": args.decode_prompt,
        "decode_steps": args.decode_steps,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "threads": os.cpu_count(),
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
