"""Block-structured FFN layers (``blockdense``, ``blockshuffle``) in vLLM, tensor-parallel by blocks.

A vLLM Linear whose HF shards are block-structured (``gate_up_proj`` fuses gate and up; each keeps
its own structure) holds, per shard, this rank's slice of the structured tensors
(:mod:`eigenpatch.serving.sharding`: whole blocks only) and runs them through the same module
code transformers uses (:mod:`eigenpatch.format.structured`: batched matmuls), so the math is written
once (:class:`~eigenpatch.serving.vllm_modules.ShardModulesMethod` does the loading).

Pre-merge (the dense form for few-token calls) is not used here: vLLM compiles the forward, and
a branch on the token count would specialize the graph; the structured form always runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eigenpatch.serving.sharding import local_block_module, slice_block_tensor
from eigenpatch.serving.vllm_modules import ShardModulesMethod


class BlockLinearMethod(ShardModulesMethod):
    """One vLLM Linear made of block-structured shards (see the module docstring)."""

    def local_modules(
        self, layer: Any, column: bool, tp_rank: int, tp_size: int, in_local: int, rows: list[int], dtype: Any
    ) -> list[nn.Module]:
        return [local_block_module(spec, column, tp_size, dtype) for spec in self.specs]

    def local_slice(self, i: int, pname: str, loaded: torch.Tensor) -> torch.Tensor:
        return slice_block_tensor(self.specs[i]["kind"], pname, loaded, self.column, self.tp_rank, self.tp_size)

    def forward_shard(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module.structured_forward(x)
