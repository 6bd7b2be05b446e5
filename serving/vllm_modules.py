"""A vLLM linear method that runs each HF shard as one of the format's own modules.

The block-structured kinds (:mod:`.vllm_structured`) and quantized Linears (:mod:`.vllm_quantized`)
are served the same way: per shard, an empty module of the format with this rank's shapes; per
stored tensor name, one flat vLLM parameter whose loader slices the checkpoint tensor for this
rank and copies it into the shard's place; after loading, the flat buffers move into the modules,
which then run with the code transformers runs. A dotted name (a quantized factor pair's
``lowrank_down.qweight``) gets a holder submodule on the vLLM layer, so vLLM's loader, which looks
parameters up by their checkpoint names, finds it. Column slots concatenate the shards' outputs; a
row slot returns this rank's partial sum, which the layer's all-reduce completes. vLLM adds the
bias as it does for dense layers. A subclass says which modules and how a tensor is sliced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import Parameter
from vllm.model_executor.layers.linear import ColumnParallelLinear, LinearMethodBase, RowParallelLinear

from eigenpatch.serving.vllm_method import _shard_index


class ShardModulesMethod(LinearMethodBase):
    """One vLLM Linear made of format modules, one per HF shard (see the module docstring)."""

    def __init__(self, shard_names: list[str], specs: list[dict[str, Any]]) -> None:
        self.shard_names = shard_names
        self.specs = specs

    def local_modules(
        self, layer: Any, column: bool, tp_rank: int, tp_size: int, in_local: int, rows: list[int], dtype: Any
    ) -> list[nn.Module]:
        """Empty modules with this rank's shapes, one per shard."""
        raise NotImplementedError

    def local_slice(self, i: int, pname: str, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's part of shard ``i``'s checkpoint tensor ``pname``."""
        raise NotImplementedError

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
        self.column, self.tp_rank, self.tp_size, self.params_dtype = column, tp_rank, tp_size, params_dtype
        rows = list(output_partition_sizes)
        modules = self.local_modules(layer, column, tp_rank, tp_size, input_size_per_partition, rows, params_dtype)
        if column and [m.out_features for m in modules] != rows:
            raise ValueError(
                f"eigenpatch: {self.shard_names} give rows {[m.out_features for m in modules]}, vLLM expects {rows}"
            )
        layer.eigenpatch_pending = modules  # filled by the loaders, installed after loading
        for pname in self.tensor_names(modules):
            sizes = [m.get_parameter(pname).numel() if _has(m, pname) else 0 for m in modules]
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            dtype = next(m.get_parameter(pname).dtype for m in modules if _has(m, pname))
            flat = Parameter(torch.empty(sum(sizes), dtype=dtype), requires_grad=False)
            flat.weight_loader = self._loader(pname, modules, offsets)
            owner, leaf = _owner(layer, pname)
            owner.register_parameter(leaf, flat)

    @staticmethod
    def tensor_names(modules: list[nn.Module]) -> list[str]:
        """Every stored tensor name of the shards, in order (fused shards may be of different kinds:
        q/k corrected beside a plain v; a name then lives only in the shards that store it)."""
        names = [n for m in modules for n, _ in m.named_parameters() if n != "bias"]
        return list(dict.fromkeys(names))

    def _loader(self, pname: str, modules: list[nn.Module], offsets: list[int]) -> Any:
        def load(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            i = _shard_index(shard_id)
            target = modules[i].get_parameter(pname)
            piece = self.local_slice(i, pname, loaded)
            # floats are cast on copy (a fp32 checkpoint served in bf16); integer codes must be stored as such
            if piece.shape != target.shape or (not target.is_floating_point() and piece.dtype != target.dtype):
                raise ValueError(
                    f"eigenpatch: {self.shard_names[i]}.{pname} slice is {piece.dtype} {tuple(piece.shape)}, "
                    f"expected {target.dtype} {tuple(target.shape)}"
                )
            param.data[offsets[i] : offsets[i] + target.numel()].copy_(piece.reshape(-1))

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        modules = layer.eigenpatch_pending
        for pname in self.tensor_names(modules):
            flat, offset = layer.get_parameter(pname), 0
            for m in (m for m in modules if _has(m, pname)):
                target = m.get_parameter(pname)
                target.data = flat.data[offset : offset + target.numel()].view_as(target).clone()
                target.requires_grad_(False)
                offset += target.numel()
            owner, leaf = _owner(layer, pname)
            setattr(owner, leaf, Parameter(torch.empty(0, dtype=flat.dtype), requires_grad=False))
        layer.eigenpatch_modules = nn.ModuleList(modules)
        del layer.eigenpatch_pending

    def forward_shard(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        outputs = [self.forward_shard(m, x) for m in layer.eigenpatch_modules]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y if bias is None else y + bias


def _has(module: nn.Module, pname: str) -> bool:
    try:
        module.get_parameter(pname)
    except AttributeError:
        return False
    return True


def _owner(layer: nn.Module, pname: str) -> tuple[nn.Module, str]:
    """The module that holds parameter ``pname`` of ``layer`` (holders made on first use) and its leaf name."""
    *path, leaf = pname.split(".")
    owner = layer
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    return owner, leaf
