"""Block-structured FFN layers (``blockdense``, ``blockshuffle``) in vLLM, tensor-parallel by blocks.

A vLLM Linear whose HF shards are block-structured (``gate_up_proj`` fuses gate and up; each keeps
its own structure) holds, per shard, this rank's slice of the structured tensors
(:mod:`eigenpatch.serving.sharding`: whole blocks only) and runs them through the same module
code transformers uses (:mod:`eigenpatch.format.structured`: batched matmuls), so the math is written
once. Column slots concatenate shard outputs; row slots (``down_proj``) return this rank's partial
sum, which the layer's all-reduce completes. vLLM adds the bias as it does for dense layers.

Pre-merge (the dense form for few-token calls) is not used here: vLLM compiles the forward, and
a branch on the token count would specialize the graph; the structured form always runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import Parameter
from vllm.model_executor.layers.linear import ColumnParallelLinear, LinearMethodBase, RowParallelLinear

from eigenpatch.serving.sharding import local_block_module, slice_block_tensor
from eigenpatch.serving.vllm_method import _shard_index


class BlockLinearMethod(LinearMethodBase):
    """One vLLM Linear made of block-structured shards (see the module docstring)."""

    def __init__(self, shard_names: list[str], specs: list[dict[str, Any]]) -> None:
        self.shard_names = shard_names
        self.specs = specs

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        column = not isinstance(layer, RowParallelLinear)
        parallel = isinstance(layer, ColumnParallelLinear | RowParallelLinear)  # ReplicatedLinear: whole layer
        tp_rank, tp_size = (layer.tp_rank, layer.tp_size) if parallel else (0, 1)
        modules = [local_block_module(spec, column, tp_size, params_dtype) for spec in self.specs]
        if column and [m.out_features for m in modules] != list(output_partition_sizes):
            raise ValueError(
                f"eigenpatch: {self.shard_names} give rows {[m.out_features for m in modules]}, "
                f"vLLM expects {list(output_partition_sizes)}"
            )
        layer.eigenpatch_pending = modules  # filled by the loaders, installed after loading
        for pname in (n for n, _ in modules[0].named_parameters() if n != "bias"):
            sizes = [getattr(m, pname).numel() for m in modules]
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            flat = Parameter(torch.empty(sum(sizes), dtype=params_dtype), requires_grad=False)
            flat.weight_loader = self._loader(pname, modules, offsets, column, tp_rank, tp_size)
            layer.register_parameter(pname, flat)

    def _loader(self, pname: str, modules: list[nn.Module], offsets: list[int], column: bool, rank: int, size: int):
        def load(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            i = _shard_index(shard_id)
            target = getattr(modules[i], pname)
            piece = slice_block_tensor(self.specs[i]["kind"], pname, loaded, column, rank, size)
            if piece.shape != target.shape:
                raise ValueError(
                    f"eigenpatch: {self.shard_names[i]}.{pname} slice {tuple(piece.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            param.data[offsets[i] : offsets[i] + target.numel()].copy_(piece.reshape(-1))

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        modules = layer.eigenpatch_pending
        for pname in (n for n, _ in modules[0].named_parameters() if n != "bias"):
            flat, offset = getattr(layer, pname), 0
            for m in modules:
                target = getattr(m, pname)
                target.data = flat.data[offset : offset + target.numel()].view_as(target).clone()
                target.requires_grad_(False)
                offset += target.numel()
            setattr(layer, pname, Parameter(torch.empty(0, dtype=flat.dtype), requires_grad=False))
        layer.eigenpatch_modules = nn.ModuleList(modules)
        del layer.eigenpatch_pending

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        outputs = [m.structured_forward(x) for m in layer.eigenpatch_modules]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y if bias is None else y + bias
