"""TensorRT engines for an exported decoder: ONNX Runtime's TensorRT EP, or ``trtexec``.

GPU-only. Everything here is written against the documented interfaces (ORT TensorRT EP
provider options, ``trtexec`` flags) and exercised by ``bench/gpu_check.py`` on a GPU machine;
without a GPU and TensorRT, :func:`tensorrt_unavailable` explains why in one line and
``eigenpatch export --tensorrt`` stops before writing anything.

Two builders, in order of preference:

* **ORT TensorRT EP** (``onnxruntime-gpu`` + TensorRT libraries): the engine is built by opening
  a session with an engine cache under ``OUT/trt_engines`` and running one prefill and one decode
  step; :class:`~eigenpatch.export.runtime.OnnxCausalLM` reuses that cache (same profile), so
  ``run-onnx --provider Tensorrt`` starts without rebuilding.
* **trtexec** (TensorRT's CLI): writes ``OUT/model.plan`` for deployments that drive TensorRT
  directly; it is not used by the ONNX Runtime runner.

The optimization profile covers batch 1..``max_batch`` and 0..``max_context`` cached tokens;
dynamic KV-cache graphs need explicit profiles, TensorRT cannot infer them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

TRT_EP = "TensorrtExecutionProvider"
ENGINE_DIR = "trt_engines"
PLAN_FILE = "model.plan"
MAX_BATCH = 8
MAX_CONTEXT = 2048


class TensorRTFailed(Exception):
    """TensorRT was present but could not build or run the engine."""


def tensorrt_unavailable() -> str | None:
    """``None`` when an engine can be built here; otherwise the reason, as one sentence."""
    try:
        import onnxruntime as ort

        if TRT_EP in ort.get_available_providers():
            return None
    except ImportError:
        pass
    if shutil.which("trtexec"):
        return None
    return (
        "--tensorrt needs an NVIDIA GPU with TensorRT: install onnxruntime-gpu and TensorRT "
        "(pip install onnxruntime-gpu tensorrt) or put trtexec on PATH"
    )


def profile_shapes(meta: dict[str, Any], max_batch: int = MAX_BATCH, max_context: int = MAX_CONTEXT) -> dict[str, str]:
    """min/opt/max shapes for every input, in the ``name:AxBxC,...`` form both builders accept.

    ``opt`` is batch-1 decoding (one new token over a half-full cache): the shape that runs most.
    """
    heads, dim = meta["num_kv_heads"], meta["head_dim"]

    def shapes(batch: int, seq: int, past: int) -> str:
        parts = [f"input_ids:{batch}x{seq}", f"attention_mask:{batch}x{past + seq}", f"position_ids:{batch}x{seq}"]
        parts += [f"{name}:{batch}x{heads}x{past}x{dim}" for name in meta["past_names"]]
        return ",".join(parts)

    return {
        "min": shapes(1, 1, 0),
        "opt": shapes(1, 1, max_context // 2),
        "max": shapes(max_batch, max_context, max_context),
    }


def ep_options(folder: Path, profile: dict[str, str], fp16: bool) -> dict[str, str]:
    """ORT TensorRT EP provider options that build (or reuse) the engine cached under ``folder``."""
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(folder / ENGINE_DIR),
        "trt_timing_cache_enable": "True",
        "trt_fp16_enable": str(fp16),
        "trt_profile_min_shapes": profile["min"],
        "trt_profile_opt_shapes": profile["opt"],
        "trt_profile_max_shapes": profile["max"],
    }


def build_engine(folder: Path, meta: dict[str, Any], fp16: bool = False) -> dict[str, Any]:
    """Build a TensorRT engine for the graph in ``folder``; returns what goes under ``meta["tensorrt"]``."""
    profile = profile_shapes(meta)
    start = time.perf_counter()
    try:
        import onnxruntime as ort

        use_ep = TRT_EP in ort.get_available_providers()
    except ImportError:
        use_ep = False
    if use_ep:
        _build_with_ep(folder, meta, profile, fp16)
        info = {"builder": "onnxruntime-tensorrt-ep", "engine_dir": ENGINE_DIR}
    else:
        _build_with_trtexec(folder, profile, fp16)
        info = {"builder": "trtexec", "engine": PLAN_FILE}
    return {**info, "fp16": fp16, "profile": profile, "build_seconds": round(time.perf_counter() - start, 1)}


def _build_with_ep(folder: Path, meta: dict[str, Any], profile: dict[str, str], fp16: bool) -> None:
    import onnxruntime as ort

    (folder / ENGINE_DIR).mkdir(exist_ok=True)
    session = ort.InferenceSession(
        str(folder / "model.onnx"),
        providers=[(TRT_EP, ep_options(folder, profile, fp16)), "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    if session.get_providers()[0] != TRT_EP:  # ORT falls back silently when libnvinfer is missing
        raise TensorRTFailed(f"onnxruntime could not load TensorRT (session providers: {session.get_providers()})")
    dtype = np.float16 if meta.get("dtype") == "float16" else np.float32
    heads, dim = meta["num_kv_heads"], meta["head_dim"]
    past = {n: np.zeros((1, heads, 0, dim), dtype=dtype) for n in meta["past_names"]}
    ids = np.arange(1, 17, dtype=np.int64)[None]
    for step in range(2):  # prefill, then one decode step: both shapes go through the built engine
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, next(iter(past.values())).shape[2] + ids.shape[1]), dtype=np.int64),
            "position_ids": np.arange(16 * step, 16 * step + ids.shape[1], dtype=np.int64)[None],
            **past,
        }
        outputs = session.run(None, feed)
        past = dict(zip(meta["past_names"], outputs[1:], strict=True))
        ids = outputs[0][:, -1:].argmax(-1).astype(np.int64)


def _build_with_trtexec(folder: Path, profile: dict[str, str], fp16: bool) -> None:
    command = [
        "trtexec",
        f"--onnx={folder / 'model.onnx'}",
        f"--saveEngine={folder / PLAN_FILE}",
        f"--minShapes={profile['min']}",
        f"--optShapes={profile['opt']}",
        f"--maxShapes={profile['max']}",
        *(["--fp16"] if fp16 else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TensorRTFailed(f"trtexec failed (exit {done.returncode}): {last[0][:200]}")
