"""Reduced-precision variants of a verified fp32 export.

- ``int8`` / ``int4`` (``--weights``, CPU/edge): weight-only, ONNX Runtime's ``MatMulNBits``. Every
  MatMul with a constant weight (factor pairs included) stores it in blocks of ``block`` input rows,
  each with one fp32 scale and a zero point, GPTQ-rounded on calibration text; activations stay
  fp32 (llama.cpp's Q4_1 / Q8_0 are the same idea: blocks of 32 weights with a scale).
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

from eigenpatch.calibration import DEFAULT_SEQ_LEN
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


#: Calibration windows (of 512 tokens) for GPTQ: measured on SmolLM2 at int4, 32 -> 96 windows
#: is 100.1 -> 99.4 perplexity (fp32 90.3); 0 rounds to the nearest level instead.
DEFAULT_WEIGHT_WINDOWS = 96
WEIGHT_SEQ_LEN = DEFAULT_SEQ_LEN  # patch-model's calibration window


def quantize_weights(
    folder: Path,
    bits: int,
    block: int = DEFAULT_BLOCK,
    head: bool = True,
    windows: np.ndarray | None = None,
    embedding: bool = True,
    dense_bits: int | None = None,
) -> dict[str, Any]:
    """Replace the fp32 graph in ``folder`` by its weight-only ``bits``-bit version.

    Our quantizer (:mod:`eigenpatch.export.weight_only`), packed for ``MatMulNBits``:
    asymmetric blocks of ``block`` inputs (``check_block`` ran in the caller, before any work),
    GPTQ against each MatMul's own inputs when ``windows`` (token ids) are given, and factor pairs
    rescaled first so that ``up``'s blocks share their range fairly. Compute stays fp32.

    - ``head``: quantize the output head too (a tied head from the table, as it stands).
    - ``embedding``: the ``Gather`` reads an int8 table (``GatherBlockQuantized``; on SmolLM2 it
      changed perplexity by < 0.1 %), shared with the head where their codes are the same.
    - ``dense_bits``: bits for the MatMuls outside factor pairs in a compressed model, the
      Linears the allocator kept dense because they were the most sensitive; 32 leaves them
      fp32 MatMuls. On SmolLM2 (31 of 390 MatMuls, 96 windows), int4 everywhere costs +15 %
      perplexity, int8 for these +10 % (but ORT 1.32's 8-bit kernel is slow: decode drops to
      74 from 87 tok/s), fp32 +10 % at 17 MB more. A model without pairs is all ``bits``.
    """
    from eigenpatch.export.weight_only import Recipe, rewrite

    recipe = Recipe(bits, block, head=head, dense_bits=dense_bits, embedding_bits=8 if embedding else None)
    return rewrite(folder, MODEL_FILE, recipe, windows)


def head_nodes(graph: Any) -> list[Any]:
    """The output head: the MatMul / Gemm that produces the graph's ``logits``."""
    return [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and "logits" in n.output]


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
