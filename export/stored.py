"""Quantized Linears a checkpoint stores, exported as ``MatMulNBits`` reading their own codes.

The graph is traced with each :class:`~eigenpatch.format.quantized.QuantizedLinear` standing in
as a plain Linear holding the weight its codes mean (exact in fp32), so the trace and its fused
norms are those of any model. Each MatMul whose weight is exactly one of those is then replaced
by ``MatMulNBits`` on the stored codes, scales and zero points: the two formats share one byte
layout, so nothing is rounded again and the file holds the checkpoint's bytes. The parity check
runs on the mapped graph. ``MatMulNBits`` takes 4 and 8 bits fast (its 2-bit path measured 35-55x
slower than 4-bit at batch 1; it has no 3-bit one): 2- and 3-bit codes are mapped as 4-bit ones
(the same values, repacked), so the file holds half a byte per weight for them. A corrected
quantized Linear's base is mapped the same way; its correction pair (fp16, or int8 rows with
their scales) is traced as two fp32 MatMuls beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eigenpatch.export.weight_only import nbits_node, save_rewritten, targets
from eigenpatch.format.corrected import CorrectedQuantizedLinear, float_factors
from eigenpatch.format.quantized import KERNEL_BITS, QuantizedLinear
from eigenpatch.quantizer import BlockQuant


def _key(weight_nk: np.ndarray) -> str:
    """Identifies a ``[N, K]`` fp32 weight by its bytes."""
    return hashlib.sha1(np.ascontiguousarray(weight_nk, dtype=np.float32).tobytes()).hexdigest()


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def stored_dtype_tensors(model: nn.Module) -> set[int]:
    """Ids of the tensors whose dtype the format fixes whatever the model computes in (codes,
    scales, zero points, correction pairs): not a sign that the model was loaded in another dtype."""
    ids = {id(t) for m in quantized_modules(model).values() for t in m.stored()}
    for m in model.modules():
        if isinstance(m, CorrectedQuantizedLinear):
            ids |= {id(t) for t in m.stored_tensors()}
    return ids


@contextmanager
def dequantized_linears(model: nn.Module) -> Iterator[dict[str, BlockQuant]]:
    """Within the block each quantized Linear is an fp32 ``nn.Linear`` of the weight it stands for
    and each correction pair two fp32 factors; yields the stored codes keyed by that weight's bytes.
    The modules and the pairs' stored tensors are put back after, as they were."""
    codes: dict[str, BlockQuant] = {}
    with float_factors(model, trained=False), _plain_linears(model, codes):
        yield codes


@contextmanager
def _plain_linears(model: nn.Module, codes: dict[str, BlockQuant]) -> Iterator[None]:
    swapped: list[tuple[nn.Module, str, QuantizedLinear]] = []
    try:
        for name, module in quantized_modules(model).items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            weight = module.dequantized(torch.float32).detach()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias.detach().float())
            codes[_key(weight.numpy())] = BlockQuant.of_module(module)
            setattr(parent, child, linear)
            swapped.append((parent, child, module))
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def map_stored(folder: Path, model_file: str, codes: dict[str, BlockQuant]) -> dict[str, Any]:
    """Replace every MatMul of ``folder / model_file`` whose weight is a stored quantized Linear's by
    ``MatMulNBits`` on its codes (staged, then swapped in). Returns what was mapped."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / model_file), load_external_data=False)
    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t, base_dir=str(folder)) for t in graph.initializer}
    replaced: dict[int, list[Any]] = {}
    bits: dict[str, int] = {}
    found = targets(graph, initializers)  # kept alive: nodes are matched below by id()
    for i, target in enumerate(found):
        q = codes.get(_key(target.weight))
        if q is not None:
            q = dataclasses.replace(q, bits=KERNEL_BITS[q.bits])  # 2/3-bit codes run as 4-bit ones (same values)
            replaced[id(target.node)] = [nbits_node(graph, target, q, f"stored{i}")]
            bits[f"int{q.bits}"] = bits.get(f"int{q.bits}", 0) + 1
    if len(replaced) < len(codes):
        raise AssertionError(f"{len(codes)} quantized Linears, {len(replaced)} found in the traced graph")
    save_rewritten(model, replaced, initializers, folder, model_file, "stored")
    return {"matmuls_by_bits": bits}
