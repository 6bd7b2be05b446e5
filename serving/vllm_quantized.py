"""Quantized Linears (``quantized``) in vLLM: the format's codes, run by the same module code as transformers.

A vLLM Linear whose HF shards are all quantized (``qkv_proj`` fuses q/k/v) holds, per shard, this
rank's slice of ``qweight`` / ``scales`` / ``zeros`` (:func:`eigenpatch.serving.sharding.slice_quantized`:
whole output rows in a column slot, whole groups of inputs in a row slot) in a
:class:`~eigenpatch.format.quantized.QuantizedLinear`, whose forward picks the kernel: PyTorch's
CPU int4 kernel for bf16 activations where it fits, dequantize-then-GEMM elsewhere (fp32), or
vLLM's own int4 kernel (:mod:`.vllm_int4`: Marlin / Machete on GPUs, ``cpu_gemm_wna16`` on CPUs
when asked for).
A quantized factor pair (``lowrank_quantized``) is placed like a factor pair: a column slot slices
``up``'s rows and replicates ``down``; a row slot slices ``down``'s input groups and replicates
``up``, whose partial outputs the all-reduce sums. A corrected quantized Linear
(``quantized_corrected``) slices its base like a quantized Linear and its correction like a factor pair.
:class:`~eigenpatch.serving.vllm_modules.ShardModulesMethod` does the loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import QKVParallelLinear

from eigenpatch.format import LOWRANK_QUANTIZED, QUANTIZED_CORRECTED
from eigenpatch.format.corrected import CorrectedQuantizedLinear
from eigenpatch.format.quantized import QuantizedLinear, QuantizedLowRankLinear
from eigenpatch.serving.sharding import (
    column_shard_rows,
    row_shard_columns,
    slice_quantized,
    slice_quantized_corrected,
    slice_quantized_pair,
)
from eigenpatch.serving.vllm_int4 import use_vllm_kernels
from eigenpatch.serving.vllm_modules import ShardModulesMethod


class QuantizedLinearMethod(ShardModulesMethod):
    """One vLLM Linear made of quantized shards (see the module docstring)."""

    def __init__(self, shard_names: list[str], specs: list[dict[str, Any]]) -> None:
        if len({(s["bits"], s["group"]) for s in specs}) > 1:
            raise ValueError(f"eigenpatch: {shard_names} fuse quantized Linears of different widths or groups")
        super().__init__(shard_names, specs)

    def local_modules(
        self, layer: Any, column: bool, tp_rank: int, tp_size: int, in_local: int, rows: list[int], dtype: Any
    ) -> list[nn.Module]:
        kv_replicas = getattr(layer, "num_kv_head_replicas", 1) if isinstance(layer, QKVParallelLinear) else 1
        self.slices, modules = [], []
        for i, spec in enumerate(self.specs):
            if column:
                self.slices.append(column_shard_rows(spec["out_features"], rows[i], tp_rank, kv_replicas if i else 1))
                shape = (spec["in_features"], rows[i])
            else:
                self.slices.append(row_shard_columns(spec["in_features"], in_local, tp_rank))
                shape = (in_local, spec["out_features"])
            if spec["kind"] == LOWRANK_QUANTIZED:
                modules.append(QuantizedLowRankLinear(*shape, spec["rank"], spec["bits"], spec["group"]))
            elif spec["kind"] == QUANTIZED_CORRECTED:
                factor_bits = spec.get("factor_bits", 16)
                modules.append(
                    CorrectedQuantizedLinear(*shape, spec["rank"], spec["bits"], spec["group"], factor_bits=factor_bits)
                )
            else:
                modules.append(QuantizedLinear(*shape, spec["bits"], spec["group"]))
        return modules

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        layer.eigenpatch_kernels = use_vllm_kernels(layer.eigenpatch_modules, self.params_dtype)

    def local_slice(self, i: int, pname: str, loaded: torch.Tensor) -> torch.Tensor:
        spec = self.specs[i]
        cut = {LOWRANK_QUANTIZED: slice_quantized_pair, QUANTIZED_CORRECTED: slice_quantized_corrected}
        return cut.get(spec["kind"], slice_quantized)(pname, loaded, spec, self.column, *self.slices[i])
