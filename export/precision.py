"""Reduced-precision variants of a verified fp32 export.

- ``int8`` / ``int4`` (``--weights``, CPU/edge): weight-only, ONNX Runtime's ``MatMulNBits``. Every
  MatMul with a constant weight (factor pairs included) stores it in blocks of ``block`` input rows,
  each with one fp32 scale (symmetric); activations stay fp32 (llama.cpp's Q4_0 / Q8_0 are the
  same idea: blocks of 32 weights with one scale).
- ``dynamic-int8`` (``--dynamic-int8``): ONNX Runtime's dynamic quantization, which quantizes the
  *activations* too, per call. Kept for comparison: on SmolLM2 it keeps few greedy tokens.
- ``float16`` (``--fp16``, GPU): weights, activations and the KV cache in fp16.

Each replaces the graph *after* the fp32 graph passed verification, so a failure of the export
itself is never hidden behind quantization noise. None can meet the fp32 logits bound, so their
parity is *reported* (max |Δlogits| and greedy steps agreeing with PyTorch per prompt), not
enforced: how far a 50 % low-rank model survives 4 bits is a measurement, not a given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eigenpatch.errors import UsageError
from eigenpatch.export.runtime import MODEL_FILE, OnnxCausalLM

#: Weight-only kinds and their bits (``MatMulNBits``).
WEIGHT_BITS = {"int8": 8, "int4": 4}
PRECISIONS = ("dynamic-int8", "float16", *WEIGHT_BITS)
#: Rows of the weight's input dimension sharing one scale (``MatMulNBits`` takes powers of 2 >= 16).
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK = 32


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


def check_block(block: int) -> None:
    """Refuse a block size ``MatMulNBits`` cannot take (before any work is done)."""
    if block not in BLOCK_SIZES:
        raise UsageError(f"--block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block}")


def quantize_weights(folder: Path, bits: int, block: int = DEFAULT_BLOCK, head: bool = True) -> dict[str, Any]:
    """Replace the fp32 graph in ``folder`` by its weight-only ``bits``-bit version (``MatMulNBits``).

    Symmetric blocks (one scale per ``block`` input rows, no zero point; ``block`` checked by
    :func:`check_block` in the caller, before any work). Measured on SmolLM2 at int4, zero points
    help (docs/benchmarks.md): the next step of issue 22.
    Compute stays fp32 (``accuracy_level`` unset), so only the weights' rounding differs from fp32.
    The embedding lookup (a ``Gather``) stays fp32. A *tied* output head reads that table through a
    ``Transpose``, which the quantizer passes over, so with ``head`` it gets its own transposed copy
    first: the largest matrix of a small model is then read at ``bits`` bits per decode step too
    (for SmolLM2, 113 MB fp32 -> 18 MB at int4 per token, for 18 MB more on disk). Returns what was
    done (``head``: "quantized" or "fp32").
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(folder / MODEL_FILE))
    head_state = _untie_head(model.graph) if head else "fp32"
    excluded = [] if head else [n.name for n in head_nodes(model.graph)]
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block, is_symmetric=True, op_types_to_quantize=("MatMul",),
        nodes_to_exclude=excluded,
    )  # fmt: skip
    quantizer.process()
    staging = folder / f"int{bits}"
    staging.mkdir()
    quantizer.model.save_model_to_file(str(staging / MODEL_FILE), use_external_data_format=True)
    replace_graph(folder, staging)
    return {"head": head_state}


def head_nodes(graph: Any) -> list[Any]:
    """The output head: the MatMul / Gemm that produces the graph's ``logits``."""
    return [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and "logits" in n.output]


def _untie_head(graph: Any) -> str:
    """Give the head ``MatMul(x, Transpose(table))`` a constant transposed copy of the table, so
    that it can be quantized; the ``Gather`` keeps the fp32 table. Returns the head's state."""
    from onnx import numpy_helper

    head = next((n for n in head_nodes(graph) if n.op_type == "MatMul"), None)
    if head is None:
        return "fp32"
    initializers = {t.name: t for t in graph.initializer}
    if head.input[1] in initializers:
        return "quantized"
    transpose = next((n for n in graph.node if n.op_type == "Transpose" and head.input[1] in n.output), None)
    if transpose is None or transpose.input[0] not in initializers:
        return "fp32"  # a head this code does not recognize is left as it is
    table = numpy_helper.to_array(initializers[transpose.input[0]])
    copy = numpy_helper.from_array(np.ascontiguousarray(table.T), name=f"{transpose.input[0]}.head_t")
    graph.initializer.append(copy)
    head.input[1] = copy.name
    if not any(transpose.output[0] in n.input for n in graph.node):
        graph.node.remove(transpose)
    return "quantized"


def quantize_dynamic_int8(folder: Path) -> None:
    """Replace the fp32 graph in ``folder`` by its dynamically quantized int8 version (weights and activations)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, staging = folder / MODEL_FILE, folder / "dynamic-int8"
    staging.mkdir()
    graph = onnx.load(str(fp32), load_external_data=False).graph
    head = [n.name for n in head_nodes(graph)]
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
