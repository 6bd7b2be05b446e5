"""One-shot GPU check for the export path: TensorRT engine build, parity and tokens/s.

    python bench/gpu_check.py                   # SmolLM2-135M, SVD --compress 0.5 (no calibration: fast)
    python bench/gpu_check.py --tiny            # a tiny random Llama: plumbing only, no model download

Run it once on a machine with an NVIDIA GPU, ``onnxruntime-gpu`` and TensorRT (CI has no GPU:
these paths are only exercised here). Steps, each reported even when a later one fails:

1. export the patched model to ONNX (fp32, verified on CPU as always) and again ``--fp16``;
2. build TensorRT engines for both with ``export_onnx(..., tensorrt=True)``;
3. parity: greedy tokens from the CUDA EP and the TensorRT EP vs PyTorch (fp32: identical expected;
   fp16: agreement reported), max |Δlogits| on the fixed prompts;
4. batch-1 decode tokens/s on CPU EP, CUDA EP and TensorRT EP;
5. compression layer by layer on ``--device cuda`` (the CLI's default method on 16 windows), beside the
   same command on CPU: seconds, peak RSS and device memory, perplexity of both outputs.

Writes ``bench/results/gpu_check.json``; exit code 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.export.onnx import GREEDY_STEPS, export_onnx, prompt_ids, pytorch_reference
from eigenpatch.export.precision import first_divergence
from eigenpatch.export.runtime import OnnxCausalLM


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config).eval(), None


def decode_tok_s(runner: OnnxCausalLM, steps: int = 64) -> float:
    ids = np.arange(1, 33, dtype=np.int64)[None]
    logits, past = runner.step(ids, np.ones_like(ids), runner.empty_past(1))
    token, length = np.array([[int(logits[0, -1].argmax())]]), ids.shape[1]
    start = time.perf_counter()
    for _ in range(steps):
        length += 1
        logits, past = runner.step(token, np.ones((1, length), dtype=np.int64), past)
        token = np.array([[int(logits[0, -1].argmax())]])
    return steps / (time.perf_counter() - start)


def provider_parity(folder: Path, provider: str, prompts: list[list[int]], refs: list[list[int]]) -> dict[str, Any]:
    runner = OnnxCausalLM(folder, provider=provider)
    agreeing = [
        first_divergence(runner.generate(p, max_new_tokens=GREEDY_STEPS), r) for p, r in zip(prompts, refs, strict=True)
    ]
    return {
        "session_providers": runner.providers,
        "greedy_steps_agreeing": agreeing,
        "of": GREEDY_STEPS,
        "decode_tok_s": round(decode_tok_s(runner), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama instead of a real model")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()

    import onnxruntime as ort

    report: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "nvidia_smi": shutil.which("nvidia-smi"),
        "trtexec": shutil.which("trtexec"),
        "steps": {},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=2), flush=True)
    if args.tiny:
        model, tokenizer = tiny_llama()
    else:
        from eigenpatch.hf_io import load_model

        model, tokenizer, _ = load_model(args.model)
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    vocab = model.config.vocab_size
    prompts = prompt_ids(tokenizer, vocab)
    refs = pytorch_reference(model, prompts).greedy
    failed = False

    def step(name: str, fn: Any) -> Any:
        nonlocal failed
        start = time.perf_counter()
        try:
            value = fn()
            report["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - start, 1), "result": value}
        except Exception as exc:  # a GPU check reports every failure and goes on with the next step
            failed = True
            report["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
            value = None
        print(f"[{'ok' if report['steps'][name]['ok'] else 'FAILED'}] {name}", flush=True)
        return value

    with tempfile.TemporaryDirectory(prefix="eigenpatch-gpu-check-") as tmp:
        for precision in ("float32", "float16"):
            folder = Path(tmp) / precision
            meta = step(
                f"export {precision} + TensorRT engine",
                lambda f=folder, p=precision: _strip(export_onnx(model, f, tokenizer, precision=p, tensorrt=True)),
            )
            if meta is None:
                continue
            for provider in ("CPU", "CUDA", "Tensorrt"):
                step(f"{precision} on {provider}", lambda f=folder, pr=provider: provider_parity(f, pr, prompts, refs))
        if not args.tiny:
            step("compress layer by layer: cuda vs cpu", lambda: compress_on_devices(args.model, Path(tmp)))
    write_result(args.out, report)
    return 1 if failed else 0


def compress_on_devices(model: str, tmp: Path) -> dict[str, Any]:
    """``patch-model --compress 0.5 --device D`` for cuda and cpu, in child processes (each its own peaks)."""
    import subprocess
    import sys

    from eigenpatch.evaluate import perplexity, tokenize
    from eigenpatch.hf_io import load_tokenizer
    from eigenpatch.zoo import resolve_text

    result: dict[str, Any] = {}
    for device in ("cuda", "cpu"):
        out = tmp / f"compressed-{device}"
        cmd = [sys.executable, "-m", "eigenpatch.cli", "patch", model, "--compress", "0.5", "--device", device]
        cmd += ["--calib-windows", "16", "--fisher-windows", "8", "--refine-steps", "16", "-o", str(out), "-q"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = round(time.perf_counter() - start, 1)
        report = json.loads((out / "eigenpatch_report.json").read_text())
        patched = eigenpatch.load(out)
        ids = tokenize(load_tokenizer(out), resolve_text("wiki", split="eval"), 16384)
        result[device] = {
            "seconds": seconds,
            "peak_rss_bytes": report.get("peak_rss_bytes"),
            "peak_device_bytes": report.get("peak_device_bytes"),
            "ppl_wiki": perplexity(patched, ids, show_progress=False).ppl,
        }
    return result


def _strip(meta: dict[str, Any]) -> dict[str, Any]:
    """The report keeps parity and TensorRT facts, not the input/output name lists."""
    return {k: meta[k] for k in ("parity", "precision", "tensorrt", "export_seconds") if k in meta}


if __name__ == "__main__":
    raise SystemExit(main())
