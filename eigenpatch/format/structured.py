"""Structured feed-forward Linears the checkpoint format stores, and their pre-merge policy.

Three structures (StructuredFFN, arXiv 2406.16450; see ``docs/FORMAT.md`` for tensor names):

- **shared low-rank** (``kind = "lowrank_shared"``): the SwiGLU ``gate_proj`` and ``up_proj`` read
  the same input, so they share one input factor ``V [r, in]``: ``gate = U_g V x``, ``up = U_u V x``.
  The owner (``gate_proj``) stores ``lowrank_down`` and its ``lowrank_up``; the user (``up_proj``)
  stores only its ``lowrank_up`` and names the owner in ``down_from``. In vLLM this is exactly the
  fused ``gate_up_proj`` as one factor pair. ``down_proj`` of the same FFN is an owner without a
  partner (a plain factor pair that takes part in the pre-merge policy).
- **BlockDense** (``kind = "blockdense"``): ``y = U (V_b x)`` with ``V_b`` block-diagonal
  (``block_down [B, R/B, in/B]``) and ``U`` dense (``block_up [out, R]``): ``R (out + in/B)`` parameters.
- **BlockShuffle** (``kind = "blockshuffle"``, Monarch-style): two block-diagonal stages with a
  shuffle between them. Input block ``j`` sends ``s`` latent dims to each output block ``i``
  (``shuffle_in [B, B, s, in/B]`` indexed ``[j, i]``); output block ``i`` mixes what it received
  (``shuffle_out [B, out/B, B, s]`` indexed ``[i, :, j]``). Every ``(i, j)`` block of the dense
  equivalent is rank ``s``; ``B s (in + out)`` parameters.

**Pre-merge.** None of these has a nonlinearity inside, so the dense matrix ``W = U V`` is exact.
Which form is faster depends on how many tokens a call carries: at decode (a few tokens) both
are launch- and bandwidth-bound and the structured form pays extra kernels; with many tokens the
structured form does fewer FLOPs. Each module therefore has ``premerge_max_tokens``: calls with
at most that many tokens run the merged dense matrix, larger ones the structure (``None``: always
merged; ``0``: never). The threshold is measured at patch time on the patching machine and
stored per layer; :func:`set_premerge` overrides it. The merged matrix is built in memory when a
model is loaded (the checkpoint keeps only the structured tensors), so the memory cost is the
dense FFN's: turn it off (``set_premerge(model, enabled=False)`` or ``EIGENPATCH_PREMERGE=0``)
where memory, not latency, is the constraint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eigenpatch.format import BLOCKDENSE, BLOCKSHUFFLE, LOWRANK_SHARED

#: ``premerge_max_tokens`` value meaning "always run the merged matrix" (structured never won).
ALWAYS_MERGED = None


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class StructuredLinear(nn.Module):
    """Base of the structured Linears: the pre-merge switch and the ``nn.Linear``-like attributes."""

    kind: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, kw: dict[str, Any]) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.premerge_max_tokens: int | None = 0
        # Non-persistent: moves with ``.to()`` like the weights, never saved (the checkpoint stays small).
        self.register_buffer("merged", None, persistent=False)

    # -- the structured form -------------------------------------------------------------
    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix this structure represents (exact: no nonlinearity inside)."""
        eye = torch.eye(self.in_features, dtype=self._dtype(), device=self._device())
        bias, self.bias = self.bias, None
        try:
            return self.structured_forward(eye).T.contiguous()
        finally:
            self.bias = bias

    # -- pre-merge -------------------------------------------------------------------------
    def build_merged(self) -> None:
        with torch.no_grad():
            self.merged = self.dense_weight().detach()

    def use_merged(self, x: torch.Tensor) -> bool:
        if self.merged is None or self.premerge_max_tokens == 0:
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters(recurse=False)):
            return False  # training (healing) needs gradients of the structured tensors
        return self.premerge_max_tokens is ALWAYS_MERGED or _tokens(x) <= self.premerge_max_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_merged(x):
            return F.linear(x, self.merged, self.bias)
        return self.structured_forward(x)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "premerge_max_tokens": self.premerge_max_tokens,
        }

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "kind")


class SharedLowRankLinear(StructuredLinear):
    """One of two Linears sharing an input factor: ``y = up (down x) + b``, ``down`` owned by one of them.

    The owner computes ``h = down x`` and keeps ``(x, h)`` until its partner asks for the same
    ``x`` (identity, not equality: the partner reuses ``h`` only for the very tensor the owner
    saw; any other input is projected afresh, so the result is correct whatever the call order).
    HF's SwiGLU MLPs call ``gate_proj(x)`` then ``up_proj(x)``, so the shared GEMM runs once.
    """

    kind = LOWRANK_SHARED

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        owner: SharedLowRankLinear | None = None,
        down_from: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, kw)
        if not 0 < rank <= in_features:
            raise ValueError(f"rank {rank} is outside [1, {in_features}]")
        self.rank = rank
        self.down_from = down_from
        # The owner is referenced, not registered: its down factor must be saved once, under its name.
        self._owner = [owner] if owner is not None else []
        self._has_partner = False  # only an owner with a partner keeps its projection for reuse
        if owner is not None:
            owner._has_partner = True
        else:
            self.lowrank_down = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lowrank_up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def down(self) -> torch.Tensor:
        return self._owner[0].lowrank_down if self._owner else self.lowrank_down

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        if self._owner:
            owner = self._owner[0]
            memo, owner._memo = owner._memo, None
            if memo is not None and memo[0] is x:
                return memo[1]
            return F.linear(x, self.down)
        h = F.linear(x, self.lowrank_down)
        if self._has_partner:
            self._memo = (x, h)
        return h

    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.latent(x), self.lowrank_up, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.lowrank_up @ self.down

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank, "down_from": self.down_from}


class BlockDenseLinear(StructuredLinear):
    """``y = U (V_b x) + b``: block-diagonal input stage (B blocks of ``in/B -> R/B``), dense output stage."""

    kind = BLOCKDENSE

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        blocks: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, kw)
        if in_features % blocks or rank % blocks:
            raise ValueError(f"blockdense needs in ({in_features}) and rank ({rank}) divisible by blocks ({blocks})")
        self.rank, self.blocks = rank, blocks
        self.block_down = nn.Parameter(torch.empty(blocks, rank // blocks, in_features // blocks, **kw))
        self.block_up = nn.Parameter(torch.empty(out_features, rank, **kw))

    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.blocks, self.in_features // self.blocks).transpose(0, 1)  # [B, T, in/B]
        h = torch.bmm(xb, self.block_down.transpose(1, 2))  # [B, T, R/B]
        h = h.transpose(0, 1).reshape(*lead, self.rank)
        return F.linear(h, self.block_up, self.bias)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank, "blocks": self.blocks}


class BlockShuffleLinear(StructuredLinear):
    """Monarch-style: block-diagonal in, shuffle, block-diagonal out; every dense ``(i, j)`` block is rank ``s``.

    Checkpoints are square (``blocks`` input and output blocks); ``out_blocks`` may differ so a
    tensor-parallel rank can hold a slice of the blocks (vLLM: its output blocks for a column
    layer, its input blocks for a row layer) and run the same code.
    """

    kind = BLOCKSHUFFLE

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_rank: int,
        blocks: int,
        bias: bool = False,
        out_blocks: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, kw)
        out_blocks = blocks if out_blocks is None else out_blocks
        if in_features % blocks or out_features % out_blocks:
            raise ValueError(
                f"blockshuffle needs in ({in_features}) % {blocks} == out ({out_features}) % {out_blocks} == 0"
            )
        self.block_rank, self.blocks, self.out_blocks = block_rank, blocks, out_blocks
        bi, bo, s = blocks, out_blocks, block_rank
        self.shuffle_in = nn.Parameter(torch.empty(bi, bo, s, in_features // bi, **kw))
        self.shuffle_out = nn.Parameter(torch.empty(bo, out_features // bo, bi, s, **kw))

    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        bi, bo, s = self.blocks, self.out_blocks, self.block_rank
        lead = x.shape[:-1]
        xb = x.reshape(-1, bi, self.in_features // bi).transpose(0, 1)  # [j, T, n]
        h = torch.bmm(xb, self.shuffle_in.reshape(bi, bo * s, -1).transpose(1, 2))  # [j, T, (i, s)]
        h = h.reshape(bi, -1, bo, s).permute(2, 1, 0, 3).reshape(bo, -1, bi * s)  # shuffle -> [i, T, (j, s)]
        y = torch.bmm(h, self.shuffle_out.reshape(bo, -1, bi * s).transpose(1, 2))  # [i, T, out/B]
        y = y.transpose(0, 1).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "block_rank": self.block_rank, "blocks": self.blocks}


#: The module class of each structured layer kind.
STRUCTURED_CLASSES: dict[str, type[StructuredLinear]] = {
    cls.kind: cls for cls in (SharedLowRankLinear, BlockDenseLinear, BlockShuffleLinear)
}


def module_from_spec(spec: dict[str, Any], model: nn.Module, kw: dict[str, Any]) -> StructuredLinear:
    """An empty structured module of the stored shape (``model``: to find a shared factor's owner)."""
    kind = spec["kind"]
    common = {"bias": spec["bias"], **kw}
    if kind == SharedLowRankLinear.kind:
        owner = model.get_submodule(spec["down_from"]) if spec.get("down_from") else None
        if owner is not None and not isinstance(owner, SharedLowRankLinear):
            raise ValueError(f"{spec['down_from']!r} must come before its partner in the checkpoint's layers")
        module: StructuredLinear = SharedLowRankLinear(
            spec["in_features"],
            spec["out_features"],
            spec["rank"],
            owner=owner,
            down_from=spec.get("down_from"),
            **common,
        )
    elif kind == BlockDenseLinear.kind:
        module = BlockDenseLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["blocks"], **common)
    elif kind == BlockShuffleLinear.kind:
        module = BlockShuffleLinear(
            spec["in_features"], spec["out_features"], spec["block_rank"], spec["blocks"], **common
        )
    else:
        raise ValueError(f"unknown structured kind {kind!r}")
    module.premerge_max_tokens = spec.get("premerge_max_tokens", 0)
    return module


def premerge_enabled_by_env() -> bool:
    return os.environ.get("EIGENPATCH_PREMERGE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_premerge(model: nn.Module, enabled: bool = True, max_tokens: int | str | None = "stored") -> int:
    """Build (or drop) the merged matrices of every structured Linear; returns how many have one.

    ``max_tokens``: ``"stored"`` keeps each layer's measured threshold; an int or ``None``
    (always merged) overrides it for all layers.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, StructuredLinear):
            continue
        if max_tokens != "stored":
            module.premerge_max_tokens = max_tokens
        if enabled and module.premerge_max_tokens != 0:
            module.build_merged()
            count += 1
        else:
            module.merged = None
    return count


@contextmanager
def structured_form(model: nn.Module) -> Iterator[None]:
    """Run every structured Linear in its structured form inside the block (graph export: one form,
    no Python-side branch on the token count), then put the merged copies back."""
    saved = [(m, m.merged) for m in model.modules() if isinstance(m, StructuredLinear)]
    for m, _ in saved:
        m.merged = None
    try:
        yield
    finally:
        for m, merged in saved:
            m.merged = merged
