"""Reduced-precision variants of a verified fp32 export: ``--int8`` (CPU/edge) and ``--fp16`` (GPU).

Both replace the graph *after* the fp32 graph passed verification, so a failure of the export
itself is never hidden behind quantization noise. Neither can meet the fp32 logits bound, so
their parity is *reported* (max |Δlogits| and greedy steps agreeing with PyTorch per prompt),
not enforced: how far a 50 % low-rank model survives int8 is a measurement, not a given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eigenpatch.export.runtime import MODEL_FILE, OnnxCausalLM

PRECISIONS = ("int8", "float16")


def onnx_bytes(folder: Path) -> int:
    """Bytes of the graph and its external data (tokenizer and metadata excluded)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(MODEL_FILE))


def replace_graph(folder: Path, staging: Path) -> None:
    """Swap the graph files in ``folder`` for those in the ``staging`` subfolder (same names)."""
    for f in folder.iterdir():
        if f.name.startswith(MODEL_FILE):
            f.unlink()
    for f in staging.iterdir():
        f.rename(folder / f.name)
    staging.rmdir()


def quantize_int8(folder: Path) -> None:
    """Replace the fp32 graph in ``folder`` by its int8-weight version (dynamic quantization)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, staging = folder / MODEL_FILE, folder / "int8"
    staging.mkdir()
    graph = onnx.load(str(fp32), load_external_data=False).graph
    head = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and "logits" in n.output]
    quantize_dynamic(
        fp32,
        staging / MODEL_FILE,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=True,  # measured: per-tensor scales lose greedy agreement within 0-2 steps on SmolLM2
        nodes_to_exclude=head,  # the output head decides every token; it stays fp32
    )
    replace_graph(folder, staging)


def first_divergence(got: list[int], reference: list[int]) -> int:
    """Number of leading greedy steps on which ``got`` agrees with ``reference``."""
    return next(
        (i for i, (a, b) in enumerate(zip(got, reference, strict=False)) if a != b), min(len(got), len(reference))
    )


@dataclass
class Reference:
    """PyTorch fp32's answers on the fixed prompts: computed once, checked against every graph."""

    prompts: list[list[int]]
    logits: list[np.ndarray]  # one forward per prompt, [1, len, vocab]
    greedy: list[list[int]]  # transformers.generate greedy continuations


def max_logit_diff(runner: OnnxCausalLM, reference: Reference) -> float:
    """Largest |logit difference| of the graph's prefill vs PyTorch over all reference prompts."""
    worst = 0.0
    for ids, expected in zip(reference.prompts, reference.logits, strict=True):
        ids_np = np.asarray([ids], dtype=np.int64)
        logits, _ = runner.step(ids_np, np.ones_like(ids_np), runner.empty_past(1))
        worst = max(worst, float(np.abs(logits.astype(np.float32) - expected).max()))
    return worst


def reduced_parity(folder: Path, reference: Reference, steps: int) -> dict[str, Any]:
    """How close a reduced-precision graph stays to PyTorch fp32: logits and greedy agreement per prompt."""
    runner = OnnxCausalLM(folder, provider="CPU")
    agreeing = [
        first_divergence(runner.generate(ids, max_new_tokens=steps), greedy)
        for ids, greedy in zip(reference.prompts, reference.greedy, strict=True)
    ]
    worst = max_logit_diff(runner, reference)
    return {"max_abs_logit_diff": worst, "greedy_steps_agreeing": agreeing, "of": steps, "min": min(agreeing)}
