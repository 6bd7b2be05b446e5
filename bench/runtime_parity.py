"""One checkpoint's greedy tokens in transformers, vLLM and ONNX Runtime, as a user runs each.

    python bench/runtime_parity.py patched/smollm2-135m-gptq-budget3.25-heal300

transformers: ``eigenpatch.load`` in fp32. vLLM: ``eigenpatch serve DIR --dtype float32`` on a
loopback port, greedy completions over HTTP. ONNX Runtime: ``eigenpatch export DIR`` (fp32, its own
parity check on), then ``OnnxCausalLM.generate`` (what ``eigenpatch run-onnx`` runs). For each of
``--prompts`` openings of ``wiki:eval`` articles, ``--tokens`` greedy tokens; the table counts the
tokens each runtime shares with transformers before the first difference. fp32 everywhere, so a
difference is a bug, not rounding. Writes ``bench/results/runtime_parity[-NAME].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.hf_io import load_tokenizer
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text


def prompts(tokenizer, n: int, length: int = 24) -> list[list[int]]:
    """The first ``length`` tokens of ``n`` eval articles (never seen in calibration)."""
    articles = [a for a in resolve_text("wiki", split="eval").split(" = \n") if len(a) > 400]
    return [tokenizer(a, add_special_tokens=False)["input_ids"][:length] for a in articles[1 : n + 1]]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def transformers_greedy(folder: Path, ids: list[list[int]], tokens: int) -> list[list[int]]:
    model = eigenpatch.load(folder).eval()
    out = []
    with torch.no_grad():
        for p in ids:
            seq = model.generate(torch.tensor([p]), max_new_tokens=tokens, do_sample=False, attention_mask=None)
            out.append(seq[0, len(p) :].tolist())
    return out


def vllm_greedy(folder: Path, ids: list[list[int]], tokens: int) -> list[list[int]]:
    """``eigenpatch serve`` in its own process group, asked over HTTP, stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "eigenpatch.cli", "serve", str(folder), "--port", str(port), "--dtype", "float32"]
    log = Path(tempfile.mkdtemp()) / "serve.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"eigenpatch serve did not come up; its log: {log}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        out = []
        for p in ids:
            body = {"model": folder.name, "prompt": p, "max_tokens": tokens, "temperature": 0.0}
            body |= {"logprobs": 1, "return_tokens_as_token_ids": True}
            request = urllib.request.Request(
                f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=300) as reply:
                choice = json.loads(reply.read())["choices"][0]
            out.append([int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]])
        return out
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


def onnx_greedy(folder: Path, tokenizer, ids: list[list[int]], tokens: int) -> tuple[list[list[int]], dict]:
    from eigenpatch.export.onnx import export_onnx
    from eigenpatch.export.runtime import OnnxCausalLM

    model = eigenpatch.load(folder).eval()
    with tempfile.TemporaryDirectory() as tmp:
        meta = export_onnx(model, Path(tmp) / "onnx", tokenizer, precision="float32", verify=True)
        runtime = OnnxCausalLM(Path(tmp) / "onnx", provider="CPU")
        out = [runtime.generate(p, max_new_tokens=tokens, stop_at_eos=False) for p in ids]
    return out, meta.get("parity", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runtimes", nargs="+", choices=("vllm", "onnx"), default=["vllm", "onnx"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    folder = args.checkpoint.resolve()
    tokenizer = load_tokenizer(folder)
    ids = prompts(tokenizer, args.prompts)
    reference = transformers_greedy(folder, ids, args.tokens)
    result: dict = {"checkpoint": folder.name, "tokens": args.tokens, "prompts": len(ids), "runtimes": {}}
    for runtime in args.runtimes:
        extra: dict = {}
        if runtime == "vllm":
            got = vllm_greedy(folder, ids, args.tokens)
        else:
            got, extra = onnx_greedy(folder, tokenizer, ids, args.tokens)
        shared = [common_prefix(r, g) for r, g in zip(reference, got, strict=True)]
        result["runtimes"][runtime] = {"matched": sum(shared), "of": sum(map(len, reference)), **extra}
        print(runtime, result["runtimes"][runtime], flush=True)
    table = [[k, f"{v['matched']} / {v['of']}"] for k, v in result["runtimes"].items()]
    print(format_table(["runtime", "greedy tokens equal to transformers'"], table))
    write_result(args.out or RESULTS / f"runtime_parity-{folder.name}.json", result)


if __name__ == "__main__":
    main()
