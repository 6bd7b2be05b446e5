"""A quantized Linear with a low-rank correction: ``y = Q(W) x + up (down x) + b``.

Rounding a weight to a few bits leaves an error ``E = W - Q(W)`` whose effect on the outputs,
``E x``, is concentrated in a few directions of the inputs the layer really sees. A rank-``k``
pair fitted to that error in the whitened input space (``patchers/quantize/correct.py``) takes
most of it back for ``k (in + out)`` extra values: ZeroQuant-V2's LoRC, LQER, QERA and EoRA are
variations of the same idea. The correction is stored as two fp16 matrices beside the quantized
Linear's codes, ``correction_down [k, in]`` and ``correction_up [out, k]``, and runs as two small
GEMMs in the activations' dtype: every runtime computes ``Q(W) x`` with its int kernel and adds
the pair.

The quantized part is a :class:`~eigenpatch.format.quantized.QuantizedLinear` held as ``base``
(its tensors are stored as ``base.qweight`` ...), not a subclass: a runtime that does not know
this kind must not mistake it for a plain quantized Linear and drop the correction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eigenpatch.format.quantized import QuantizedLinear, ranked_repr, ranked_spec

#: The correction factors' storage dtype: fixed (not the model's), so their bytes are the same in
#: every checkpoint and a bf16 cast of the model does not round them a second time.
CORRECTION_DTYPE = torch.float16


class CorrectedQuantizedLinear(nn.Module):
    """``y = base(x) + correction_up (correction_down x) + b`` (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bits: int,
        group: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"correction rank {rank} must be positive")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group = bits, group
        self.base = QuantizedLinear(in_features, out_features, bits, group, device=device)
        self.correction_down = nn.Parameter(torch.zeros(rank, in_features, dtype=CORRECTION_DTYPE, device=device))
        self.correction_up = nn.Parameter(torch.zeros(out_features, rank, dtype=CORRECTION_DTYPE, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._cast: tuple | None = None  # the factors in the activations' dtype (see :meth:`factors`)

    @classmethod
    def from_parts(
        cls, base: QuantizedLinear, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
    ) -> CorrectedQuantizedLinear:
        """Wrap a quantized Linear (taken as it is) and a correction pair ``up [out, k]``, ``down [k, in]``."""
        if base.bias is not None:
            raise ValueError("the base of a corrected Linear holds no bias; pass it as bias=")
        if up.shape != (base.out_features, down.shape[0]) or down.shape[1] != base.in_features:
            raise ValueError(
                f"correction {tuple(up.shape)} x {tuple(down.shape)} does not fit a "
                f"{base.in_features}->{base.out_features} Linear"
            )
        kw = {"device": base.qweight.device, "dtype": None if bias is None else bias.dtype}
        module = cls(base.in_features, base.out_features, down.shape[0], base.bits, base.group, bias is not None, **kw)
        module.base = base
        with torch.no_grad():
            module.correction_down.copy_(down)
            module.correction_up.copy_(up)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def correction_bytes(self) -> int:
        return (self.correction_down.numel() + self.correction_up.numel()) * self.correction_down.element_size()

    def stored_bytes(self) -> int:
        """What the weight costs: the base's codes, scales and zero points, and the correction pair."""
        return self.base.stored_bytes() + self.correction_bytes()

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair in ``dtype``. Stored in fp16, it runs in the activations' dtype: a bf16 model would
        otherwise cast both factors on every call (two more ops per Linear and token, which at batch 1
        cost about what the GEMMs do). The copy is kept while the factors stay as they are (same
        storage, same in-place version) and never where gradients may flow to them."""
        down, up = self.correction_down, self.correction_up
        if dtype == down.dtype or (torch.is_grad_enabled() and (down.requires_grad or up.requires_grad)):
            return down.to(dtype), up.to(dtype)
        if torch.compiler.is_compiling():  # vLLM built the copy before compiling: no Python checks in the trace
            cast = self._cast
            return (cast[1], cast[2]) if cast is not None and cast[0][0] == dtype else (down.to(dtype), up.to(dtype))
        key = (dtype, down.data_ptr(), down._version, up.data_ptr(), up._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, down.detach().to(dtype), up.detach().to(dtype))
        return self._cast[1], self._cast[2]

    def resident_bytes(self) -> int:
        """The pair in memory now: stored, plus its activation-dtype copy once a forward made it (the
        base's codes and kernel copy are the base's own :meth:`QuantizedLinear.resident_bytes`)."""
        copy = sum(t.numel() * t.element_size() for t in self._cast[1:]) if self._cast is not None else 0
        return self.correction_bytes() + copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors(x.dtype)
        y = self.base(x) + F.linear(F.linear(x, down), up)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix the module stands for (inspection and tests, never the hot path)."""
        return self.base.dequantized() + self.correction_up.float() @ self.correction_down.float()

    def _apply(self, fn: Any, recurse: bool = True) -> CorrectedQuantizedLinear:
        stored = (self.correction_down.data, self.correction_up.data)
        self._cast = None
        out = super()._apply(fn, recurse)
        if self.correction_down.dtype != CORRECTION_DTYPE:  # a cast of the model keeps the stored factors
            self.correction_down.data = stored[0].to(self.correction_down.device)
            self.correction_up.data = stored[1].to(self.correction_up.device)
        return out

    def spec(self) -> dict[str, Any]:
        from eigenpatch.format import QUANTIZED_CORRECTED

        return ranked_spec(self, QUANTIZED_CORRECTED)

    def extra_repr(self) -> str:
        return ranked_repr(self)
