"""Dense vs patched SmolLM2 behind vLLM's OpenAI server, one after the other in the same run.

    python bench/serve_throughput.py --patched patched/smollm2-135m-loss-fwhiten-c0.5
    python bench/serve_throughput.py                     # patches --compress 0.5 itself (quick calibration)

Per model: startup time (process start -> /health 200), completion tokens/s at batch 1 (sequential
requests) and with 16 concurrent requests, and the peak RSS of the server's whole process tree
(API server + engine core + worker), sampled every 0.2 s. Greedy, ``ignore_eos`` so every request
generates exactly ``--max-tokens``. Needs the serve-cpu (or serve) extra. Prints a table and writes
``bench/results/serve_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from results_io import RESULTS, write_result

from eigenpatch.serving.launcher import serve, stop
from eigenpatch.table import fmt_bytes, fmt_float, format_table
from eigenpatch.zoo import resolve_model, resolve_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pgid: int) -> int:
    """Resident bytes of every process in the process group ``pgid`` (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: process group
                total += int(fields[21]) * 4096  # field 24: rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pgid: int) -> None:
        super().__init__(daemon=True)
        self.pgid, self.peak, self.running = pgid, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, tree_rss(self.pgid))
            time.sleep(0.2)


def post(url: str, payload: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """POST ``payload`` as JSON, return the JSON reply (HTTP errors raise)."""
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def complete(url: str, name: str, prompt: str, max_tokens: int, **extra: Any) -> int:
    """Completion tokens of one greedy ``ignore_eos`` request (``extra``: more body fields)."""
    payload = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    return post(f"{url}/v1/completions", payload | extra)["usage"]["completion_tokens"]


def measure(model: Path, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--dtype", args.dtype, "--max-model-len", "1024"]
    start = time.perf_counter()
    process = serve(model, port=port, extra=extra, foreground=False)
    startup = time.perf_counter() - start
    sampler = PeakSampler(process.pid)
    sampler.start()
    try:
        complete(url, model.name, prompts[0], 8)  # warm-up
        t = time.perf_counter()
        tokens = sum(complete(url, model.name, p, args.max_tokens) for p in prompts[: args.batch1_requests])
        batch1 = tokens / (time.perf_counter() - t)
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            done = pool.map(lambda p: complete(url, model.name, p, args.max_tokens), prompts[: args.concurrency])
            tokens = sum(done)
        concurrent = tokens / (time.perf_counter() - t)
    finally:
        sampler.running = False
        stop(process)
    return {
        "startup_seconds": startup,
        "batch1_tok_s": batch1,
        "concurrent_tok_s": concurrent,
        "peak_rss": sampler.peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patched", help="patched checkpoint (default: patch --compress 0.5 here)")
    parser.add_argument("--compress", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16", help="vLLM --dtype (bfloat16 is vLLM's fast CPU path)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch1-requests", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_throughput.json")
    args = parser.parse_args()

    dense = resolve_model(args.model)
    words = resolve_text("wiki", split="eval").split()
    prompts = [" ".join(words[i * 40 : i * 40 + 32]) for i in range(max(args.concurrency, args.batch1_requests))]
    with tempfile.TemporaryDirectory(prefix="eigenpatch-serve-bench-") as tmp:
        if args.patched:
            patched = Path(args.patched)
        else:
            import eigenpatch
            from eigenpatch.hf_io import load_model
            from eigenpatch.patchers import LowRank

            model, tokenizer, _ = load_model(args.model)
            config = LowRank(ratio=args.compress, calib_windows=32, fisher_windows=8)
            eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=resolve_text("wiki", split="calib"))
            patched = eigenpatch.save(model, Path(tmp) / f"{args.model}-c{args.compress}", tokenizer=tokenizer)
        rows = {"dense": measure(dense, prompts, args), "patched": measure(patched, prompts, args)}
    base = rows["dense"]
    table = [
        [
            name,
            fmt_float(r["startup_seconds"], 0),
            fmt_float(r["batch1_tok_s"], 1),
            fmt_float(r["batch1_tok_s"] / base["batch1_tok_s"]),
            fmt_float(r["concurrent_tok_s"], 1),
            fmt_float(r["concurrent_tok_s"] / base["concurrent_tok_s"]),
            fmt_bytes(r["peak_rss"]),
        ]
        for name, r in rows.items()
    ]
    headers = ["model", "startup s", "batch-1 tok/s", "x dense", f"{args.concurrency} concurrent tok/s", "x dense"]
    print(format_table([*headers, "peak RSS (tree)"], table))
    result = {
        "bench": "serve_throughput",
        "model": args.model,
        "patched": patched.name if args.patched else f"{args.model} --compress {args.compress} (quick calibration)",
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
