"""Modules that the eigenpatch checkpoint format stores.

They live in the core (not in ``patchers``) because every runtime that reads a patched
checkpoint needs them, while none of those runtimes needs the transforms that made them. The
parameter names are the format's (``eigenpatch.format.DOWN_NAME`` / ``UP_NAME``;
``tests/test_layout.py`` checks that they agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def factor_pair_saves(rank: int, in_features: int, out_features: int) -> bool:
    """A factor pair is worth storing only if ``r (m + n) < m n`` (otherwise the layer stays dense)."""
    return rank * (in_features + out_features) < in_features * out_features


def max_saving_rank(in_features: int, out_features: int) -> int:
    """Largest rank whose factor pair is still smaller than the dense matrix (``r* = mn/(m+n)``, exclusive)."""
    return (in_features * out_features - 1) // (in_features + out_features)


class LowRankLinear(nn.Module):
    """``y = up (down x) + b``: a Linear stored as two factors.

    ``down`` is ``[r, in]`` and ``up`` is ``[out, r]``, so the forward is two GEMMs of cost
    ``r (in + out)`` per token instead of ``in * out``. The attribute names ``in_features`` /
    ``out_features`` mirror ``nn.Linear`` so code that inspects shapes keeps working.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} is outside [1, min({in_features}, {out_features})]")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.lowrank_down = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lowrank_up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Build from ``up [out, r]`` and ``down [r, in]`` (copied, so the caller's tensors stay free)."""
        out_features, rank = up.shape
        if down.shape[0] != rank:
            raise ValueError(f"factor shapes do not chain: up {tuple(up.shape)}, down {tuple(down.shape)}")
        module = cls(down.shape[1], out_features, rank, bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            module.lowrank_up.copy_(up)
            module.lowrank_down.copy_(down)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lowrank_down), self.lowrank_up, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix this pair represents (for inspection and tests, never the hot path)."""
        return self.lowrank_up @ self.lowrank_down

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )
