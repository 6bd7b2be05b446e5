"""Where a batch-1 decode step goes, dense vs patched: the profile behind bench/decode_speed.py.

    python bench/decode_profile.py --patched patched/smollm2-135m-loss-fwhiten-c0.5

A compressed model can decode at most ``dense bytes / patched bytes`` faster (the bytes limit),
and only if a step were nothing but weight streaming. This bench splits each runtime's step into
the part weight bytes set and the rest, and from that gives the best the patched model could do:

* ``vllm``: each model in its own in-process ``vllm.LLM`` (bf16, compiled, as ``eigenpatch serve``
  runs it), one model per subprocess. The step time is (a 65-token request − a 1-token one) / 64,
  median of 5; then ``torch.profiler`` over one request gives the GEMM ops' time and call count
  per step. Two models, two equations: ``gemm = a·calls + bytes/bw`` gives the per-call cost
  ``a`` and the streaming rate. The **bound** is the patched step if its GEMMs were as few as the
  dense ones and streamed its bytes at the dense rate, with the rest of the step unchanged.
* ``onnx``: the fp32 graphs ``eigenpatch export`` writes. Their weight MatMuls (every MatMul with
  a constant weight: the same nodes, shapes and weights) are run alone in a graph of their own,
  against the full decode step through the KV cache; the bound is the patched step if its
  MatMuls streamed at the dense MatMuls' rate.

Prints a table and writes ``bench/results/decode_profile.json``. Quote the ratios.
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
from pathlib import Path
from typing import Any

from decode_speed import OnnxRunner, export_fp32, weight_bytes
from results_io import RESULTS, write_result

from eigenpatch.table import fmt_float, format_table
from eigenpatch.zoo import resolve_model

#: the GEMM ops of vLLM's CPU linear layers (packed oneDNN, sgl, or the plain fallback)
GEMM_OPS = ("_C::onednn_mm", "_C::weight_packed_linear", "aten::mm", "aten::addmm", "aten::linear")
STEPS = 64


def vllm_profile(folder: str) -> dict[str, float]:
    """In this (sub)process: one model's decode step time, and its GEMM time and calls per step."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model runs here, where the profiler is
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    import eigenpatch  # noqa: F401  (registers the plugin)

    llm = LLM(model=folder, dtype="bfloat16", max_model_len=1024, enable_prefix_caching=False)
    prompt = "The history of the city begins in the year " * 12
    full = SamplingParams(max_tokens=STEPS + 1, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([prompt], full, use_tqdm=False)  # warm-up
    times: dict[str, list[float]] = {"full": [], "one": []}
    for _ in range(5):
        for key, params in (("one", one), ("full", full)):
            start = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            times[key].append(time.perf_counter() - start)
    step = (statistics.median(times["full"]) - statistics.median(times["one"])) / STEPS
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([prompt], full, use_tqdm=False)
    gemm = [e for e in prof.key_averages() if e.key in GEMM_OPS]
    return {
        "step_ms": step * 1e3,
        "gemm_ms": sum(e.self_cpu_time_total for e in gemm) / 1e3 / (STEPS + 1),
        "gemm_calls": sum(e.count for e in gemm) / (STEPS + 1),
    }


def run_vllm(models: dict[str, Path]) -> dict[str, dict[str, float]]:
    rows = {}
    for label, folder in models.items():  # one model per process: a vLLM engine owns its process
        out = subprocess.run(
            [sys.executable, __file__, "--vllm-worker", str(folder)], capture_output=True, text=True, check=True
        ).stdout
        rows[label] = json.loads(out.strip().splitlines()[-1])
        print(f"  vllm {label}: {rows[label]}", flush=True)
        time.sleep(3.0)  # the engine's poller winds down (docs/benchmarks.md)
    return rows


def vllm_bound(dense: dict[str, float], patched: dict[str, float], byte_ratio: float) -> dict[str, float]:
    """Solve ``gemm = a·calls + b·bytes`` on the two models; the best patched step keeps the rest
    of its step, makes the dense model's calls and streams its own bytes at the dense rate."""
    a = (patched["gemm_ms"] - byte_ratio * dense["gemm_ms"]) / (
        patched["gemm_calls"] - byte_ratio * dense["gemm_calls"]
    )
    streaming = dense["gemm_ms"] - a * dense["gemm_calls"]  # the dense bytes, at the dense rate
    rest = dense["step_ms"] - dense["gemm_ms"]
    best = rest + a * dense["gemm_calls"] + byte_ratio * streaming
    return {"per_call_us": a * 1e3, "rest_ms": rest, "rest_share": rest / dense["step_ms"], "best_step_ms": best}


def matmul_only(folder: Path) -> tuple[Any, dict[str, Any], int, int]:
    """A graph of ``folder``'s weight MatMuls alone (one input per inner width), its feeds, count, bytes."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    weights = {t.name: t for t in model.graph.initializer}
    # a tied head reads the embedding table through a Transpose (ONNX Runtime folds it at load)
    transposed = {
        n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights
    }
    nodes, outputs, widths, used = [], [], set(), {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or (node.input[1] not in weights and node.input[1] not in transposed):
            continue
        name = transposed.get(node.input[1], node.input[1])
        tensor = weights[name]
        width = tensor.dims[1] if name != node.input[1] else tensor.dims[0]
        if name != node.input[1]:
            nodes.append(helper.make_node("Transpose", [name], [node.input[1]]))
        widths.add(width)
        used[name] = tensor
        nodes.append(helper.make_node("MatMul", [f"x{width}", node.input[1]], [f"y{len(nodes)}"]))
        outputs.append(helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, 1, k]) for k in sorted(widths)]
    graph = helper.make_graph(nodes, "weight_matmuls", inputs, outputs, list(used.values()))
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=model.ir_version)
    onnx.save(probe, str(folder / "matmuls.onnx"))  # beside model.onnx: its external data resolves
    session = ort.InferenceSession(str(folder / "matmuls.onnx"), providers=["CPUExecutionProvider"])
    feeds = {f"x{k}": np.random.default_rng(0).random((1, 1, k), dtype=np.float32) for k in widths}
    calls = sum(n.op_type == "MatMul" for n in nodes)
    return session, feeds, calls, sum(int(np.prod(t.dims)) * 4 for t in used.values())


def onnx_step_ms(runner: OnnxRunner) -> float:
    """One batch-1 decode step through the KV cache (64 steps after a 128-token prompt), with the
    runner ``bench/decode_speed.py`` measures."""
    token, state = runner.prefill([[1_000 + i * 37 % 40_000 for i in range(128)]])
    start = time.perf_counter()
    for _ in range(STEPS):
        token, state = runner.decode(token, state)
    return (time.perf_counter() - start) / STEPS * 1e3


def run_onnx(models: dict[str, Path], tmp: Path, repeats: int) -> dict[str, dict[str, float]]:
    graphs = {label: export_fp32(folder, tmp / f"onnx-{label}") for label, folder in models.items()}
    probes = {label: matmul_only(folder) for label, folder in graphs.items()}
    runners = {label: OnnxRunner(folder) for label, folder in graphs.items()}  # loaded once, as the probes
    samples: dict[str, dict[str, list[float]]] = {label: {"step": [], "matmul": []} for label in graphs}
    for _ in range(repeats):  # interleaved
        for label, (session, feeds, _, _) in probes.items():
            samples[label]["step"].append(onnx_step_ms(runners[label]))
            for _ in range(5):
                session.run(None, feeds)
            start = time.perf_counter()
            for _ in range(30):
                session.run(None, feeds)
            samples[label]["matmul"].append((time.perf_counter() - start) / 30 * 1e3)
    return {
        label: {
            "step_ms": statistics.median(samples[label]["step"]),
            "matmul_ms": statistics.median(samples[label]["matmul"]),
            "matmul_calls": probes[label][2],
            "matmul_bytes": probes[label][3],
        }
        for label in graphs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help="the dense model (zoo name or folder)")
    parser.add_argument("--patched", type=Path, help="the patched checkpoint folder")
    parser.add_argument("--runtimes", nargs="+", choices=("vllm", "onnx"), default=["vllm", "onnx"])
    parser.add_argument("--repeats", type=int, default=7, help="ONNX Runtime: interleaved repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_profile.json")
    args = parser.parse_args()
    if args.vllm_worker:
        print(json.dumps(vllm_profile(args.vllm_worker)))
        return
    if args.patched is None or not (args.patched / "config.json").is_file():
        parser.error("--patched: a patched checkpoint folder (patch-model --compress 0.5 writes one)")
    models = {"dense": Path(resolve_model(args.model)), "patched": args.patched}
    byte_ratio = weight_bytes(models["patched"]) / weight_bytes(models["dense"])
    limit = 1 / byte_ratio
    result: dict[str, Any] = {"bench": "decode_profile", "patched": str(args.patched), "bytes_limit": limit}
    table = []
    if "vllm" in args.runtimes:
        rows = run_vllm(models)
        bound = vllm_bound(rows["dense"], rows["patched"], byte_ratio)
        result["vllm"] = {**rows, "bound": bound}
        measured = rows["dense"]["step_ms"] / rows["patched"]["step_ms"]
        best = rows["dense"]["step_ms"] / bound["best_step_ms"]
        for label, r in rows.items():
            reached = "" if label == "dense" else measured / limit
            table.append(
                ["vllm", label, r["step_ms"], r["gemm_ms"], r["gemm_calls"], r["step_ms"] - r["gemm_ms"], reached]
            )
        table.append(
            ["vllm", "bound", bound["best_step_ms"], "", rows["dense"]["gemm_calls"], bound["rest_ms"], best / limit]
        )
        print(
            f"vLLM: {bound['per_call_us']:.1f} us per GEMM call; the rest is {bound['rest_share']:.0%} of a dense step"
        )
    if "onnx" in args.runtimes:
        with tempfile.TemporaryDirectory(prefix="eigenpatch-decode-profile-") as tmp:
            rows = run_onnx(models, Path(tmp), args.repeats)
        dense, patched = rows["dense"], rows["patched"]
        rate = dense["matmul_bytes"] / dense["matmul_ms"]  # bytes per ms, the dense MatMuls' streaming rate
        best_step = patched["step_ms"] - patched["matmul_ms"] + patched["matmul_bytes"] / rate
        result["onnx"] = {**rows, "best_step_ms": best_step}
        for label, r in rows.items():
            reached = "" if label == "dense" else dense["step_ms"] / r["step_ms"] / limit
            rest = r["step_ms"] - r["matmul_ms"]
            table.append(["onnx", label, r["step_ms"], r["matmul_ms"], r["matmul_calls"], rest, reached])
            print(f"ONNX Runtime {label}: weight MatMuls stream {r['matmul_bytes'] / r['matmul_ms'] / 1e6:.1f} GB/s")
        bound_row = ["onnx", "bound", best_step, patched["matmul_bytes"] / rate, patched["matmul_calls"]]
        table.append([*bound_row, patched["step_ms"] - patched["matmul_ms"], dense["step_ms"] / best_step / limit])
    headers = ["runtime", "model", "step ms", "GEMM ms", "GEMM calls", "rest ms", "of limit"]
    print(format_table(headers, [[c if isinstance(c, str) else fmt_float(c, 2) for c in row] for row in table]))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
