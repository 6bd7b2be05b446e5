"""A quantized Linear with a low-rank correction: ``y = Q(W) x + up (down x) + b``.

Rounding a weight to a few bits leaves an error ``E = W - Q(W)`` whose effect on the outputs,
``E x``, is concentrated in a few directions of the inputs the layer really sees. A rank-``k``
pair fitted to that error in the whitened input space (``patchers/quantize/correct.py``) takes
most of it back for ``k (in + out)`` extra values: ZeroQuant-V2's LoRC, LQER, QERA and EoRA are
variations of the same idea. The correction is stored beside the quantized Linear's codes as
``correction_down [k, in]`` and ``correction_up [out, k]``, at ``factor_bits``:

- 8 (what ``quantize`` writes): int8 codes, symmetric per row, with one fp16 scale per row
  (``correction_down_scale [k]``, ``correction_up_scale [out]``): ``k (in + out) + 2 (k + out)``
  bytes. ``bench/correction_bits.py`` measured the rounding as free (GPTQ int2 g32, rank 16:
  83.88 wiki either way), so at equal bytes 8 bits buys twice the rank;
- 16 (checkpoints of format v1): fp16, ``2 k (in + out)`` bytes.

Every runtime computes ``Q(W) x`` with its int kernel and adds the pair as two small GEMMs in the
activations' dtype, from a copy of the factors in that dtype made once (:meth:`factors`).
Training (block-local refinement, healing) and export want plain float factors: inside
:func:`float_factors` they are fp32 Parameters, rounded back to their stored form on the way out.

The quantized part is a :class:`~eigenpatch.format.quantized.QuantizedLinear` held as ``base``
(its tensors are stored as ``base.qweight`` ...), not a subclass: a runtime that does not know
this kind must not mistake it for a plain quantized Linear and drop the correction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eigenpatch.format.quantized import QuantizedLinear, ranked_repr, ranked_spec

#: The dtype of 16-bit factors and of 8-bit factors' row scales: fixed (not the model's), so their
#: bytes are the same in every checkpoint and a bf16 cast of the model does not round them again.
CORRECTION_DTYPE = torch.float16
#: Widths the correction factors are stored at (module docstring).
FACTOR_BITS = (8, 16)
#: The largest int8 code: symmetric rows use -127..127 (no -128, so negation is exact).
INT8_MAX = 127
#: The scale tensors an 8-bit pair adds to the format's ``quantized_corrected`` tensors.
SCALE_NAMES = ("correction_down_scale", "correction_up_scale")
#: Every tensor a pair may hold: the two factors (or their codes), then an 8-bit pair's scales.
PAIR_NAMES = ("correction_down", "correction_up", *SCALE_NAMES)


def pair_bytes(out_features: int, in_features: int, rank: int, factor_bits: int) -> int:
    """Stored bytes of a rank-``rank`` correction of an ``[out, in]`` Linear (codes and row scales)."""
    values = rank * (out_features + in_features)
    if factor_bits == 16:
        return 2 * values
    return values + CORRECTION_DTYPE.itemsize * (rank + out_features)


def round_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as symmetric int8 codes per row and the rows' fp16 scales. The codes are taken against
    the scale as stored (fp16), so ``codes * scale`` is what every reader gets back."""
    amax = t.detach().float().abs().amax(dim=1)
    scale = (amax / INT8_MAX).clamp(2.0**-24, torch.finfo(CORRECTION_DTYPE).max).to(CORRECTION_DTYPE)
    codes = (t.detach().float() / scale.float()[:, None]).round().clamp(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


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
        factor_bits: int = 16,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"correction rank {rank} must be positive")
        if factor_bits not in FACTOR_BITS:
            raise ValueError(
                f"correction factors are stored at {' or '.join(map(str, FACTOR_BITS))} bits, not {factor_bits}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group, self.factor_bits = bits, group, factor_bits
        self.base = QuantizedLinear(in_features, out_features, bits, group, device=device)
        stored = CORRECTION_DTYPE if factor_bits == 16 else torch.int8
        frozen = factor_bits == 8  # integer codes take no gradient; float factors train as they are

        def factor(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=stored, device=device), requires_grad=not frozen)

        self.correction_down, self.correction_up = factor(rank, in_features), factor(out_features, rank)
        for name, size in zip(SCALE_NAMES, (rank, out_features), strict=True):
            scale = torch.ones(size, dtype=CORRECTION_DTYPE, device=device)
            self.register_parameter(name, nn.Parameter(scale, requires_grad=False) if frozen else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._cast: tuple | None = None  # the factors in the activations' dtype (see :meth:`factors`)

    @classmethod
    def from_parts(
        cls,
        base: QuantizedLinear,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None = None,
        factor_bits: int = 16,
    ) -> CorrectedQuantizedLinear:
        """Wrap a quantized Linear (taken as it is) and a float correction pair ``up [out, k]``,
        ``down [k, in]``, stored at ``factor_bits``."""
        if base.bias is not None:
            raise ValueError("the base of a corrected Linear holds no bias; pass it as bias=")
        if up.shape != (base.out_features, down.shape[0]) or down.shape[1] != base.in_features:
            raise ValueError(
                f"correction {tuple(up.shape)} x {tuple(down.shape)} does not fit a "
                f"{base.in_features}->{base.out_features} Linear"
            )
        kw = {"device": base.qweight.device, "dtype": None if bias is None else bias.dtype}
        module = cls(
            base.in_features, base.out_features, down.shape[0], base.bits, base.group, bias is not None,
            factor_bits=factor_bits, **kw,
        )  # fmt: skip
        module.base = base
        module.set_factors(down, up)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module

    # -- the pair's two states: stored (fp16, or int8 rows with scales) and float (training, export) --

    @property
    def is_float(self) -> bool:
        """Whether the pair is in its float state (inside :func:`float_factors`)."""
        return self.correction_down.dtype not in (CORRECTION_DTYPE, torch.int8)

    def float_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` in fp32 as the stored form gives them back (codes times their row scales)."""
        down, up = self.correction_down.detach().float(), self.correction_up.detach().float()
        if self.correction_down.dtype == torch.int8:
            down = down * self.correction_down_scale.float()[:, None]
            up = up * self.correction_up_scale.float()[:, None]
        return down, up

    def set_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Store a float pair in this module's form: fp16, or int8 rows (:func:`round_rows`)."""
        device = self.correction_down.device
        if self.factor_bits == 16:
            self.correction_down = nn.Parameter(down.detach().to(device, CORRECTION_DTYPE).clone())
            self.correction_up = nn.Parameter(up.detach().to(device, CORRECTION_DTYPE).clone())
        else:
            for name, scale_name, t in zip(("correction_down", "correction_up"), SCALE_NAMES, (down, up), strict=True):
                codes, scale = round_rows(t.to(device))
                setattr(self, name, nn.Parameter(codes, requires_grad=False))
                setattr(self, scale_name, nn.Parameter(scale, requires_grad=False))
        self._cast = None

    def to_float(self) -> None:
        """The pair as trainable fp32 Parameters (the scales of an 8-bit pair are folded in)."""
        if self.is_float:
            return
        down, up = self.float_pair()
        self.correction_down, self.correction_up = nn.Parameter(down), nn.Parameter(up)
        for name in SCALE_NAMES:
            self.register_parameter(name, None)
        self._cast = None

    def to_stored(self) -> None:
        """Back from :meth:`to_float`: the trained pair rounded to its stored form."""
        if self.is_float:
            grad = self.correction_down.requires_grad
            self.set_factors(self.correction_down.data, self.correction_up.data)
            if self.factor_bits == 16:
                self.correction_down.requires_grad_(grad)
                self.correction_up.requires_grad_(grad)

    def stored_tensors(self) -> list[torch.Tensor]:
        """The pair's tensors as they are now (codes or factors, and an 8-bit pair's scales)."""
        return [t for t in (getattr(self, n) for n in PAIR_NAMES) if t is not None]

    def correction_bytes(self) -> int:
        """What the pair costs stored: :func:`pair_bytes` at this module's ``factor_bits``."""
        return pair_bytes(self.out_features, self.in_features, self.rank, self.factor_bits)

    def stored_bytes(self) -> int:
        """What the weight costs: the base's codes, scales and zero points, and the correction pair."""
        return self.base.stored_bytes() + self.correction_bytes()

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair in ``dtype``, to run. Stored as fp16 or int8 codes, it runs in the activations'
        dtype: a bf16 model would otherwise convert both factors on every call (two or four more ops
        per Linear and token, which at batch 1 cost about what the GEMMs do). The copy is kept while
        the stored tensors stay as they are (same storage, same in-place version) and never made
        where gradients may flow to the factors."""
        down, up = self.correction_down, self.correction_up
        trains = torch.is_grad_enabled() and (down.requires_grad or up.requires_grad)
        if self.is_float or dtype == down.dtype or trains:  # float factors (int8 codes never train)
            return down.to(dtype), up.to(dtype)
        if torch.compiler.is_compiling():  # vLLM built the copy before compiling: no Python checks in the trace
            cast = self._cast
            return (cast[1], cast[2]) if cast is not None and cast[0][0] == dtype else self._convert(dtype)
        key = (dtype, *((t.data_ptr(), t._version) for t in self.stored_tensors()))
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, *self._convert(dtype))
        return self._cast[1], self._cast[2]

    def _convert(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        down, up = self.float_pair()
        return down.to(dtype), up.to(dtype)

    def resident_bytes(self) -> int:
        """The pair in memory now: stored, plus its activation-dtype copy once a forward made it (the
        base's codes and kernel copy are the base's own :meth:`QuantizedLinear.resident_bytes`)."""
        copy = sum(t.numel() * t.element_size() for t in self._cast[1:]) if self._cast is not None else 0
        return sum(t.numel() * t.element_size() for t in self.stored_tensors()) + copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors(x.dtype)
        y = self.base(x) + F.linear(F.linear(x, down), up)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix the module stands for (inspection and tests, never the hot path)."""
        down, up = self.float_pair()
        return self.base.dequantized() + up @ down

    def _apply(self, fn: Any, recurse: bool = True) -> CorrectedQuantizedLinear:
        """A cast of the model moves the pair but keeps its dtypes (codes, fp16 factors and scales)."""
        stored = [(t.data, t.dtype) for t in self.stored_tensors()]
        self._cast = None
        out = super()._apply(fn, recurse)
        for t, (data, dtype) in zip(self.stored_tensors(), stored, strict=True):
            if t.dtype != dtype:
                t.data = data.to(t.device)
        return out

    def spec(self) -> dict[str, Any]:
        from eigenpatch.format import QUANTIZED_CORRECTED

        return {**ranked_spec(self, QUANTIZED_CORRECTED), "factor_bits": self.factor_bits}

    def extra_repr(self) -> str:
        return f"{ranked_repr(self)}, factor_bits={self.factor_bits}"


@contextmanager
def float_factors(model: nn.Module, trained: bool = True) -> Iterator[list[CorrectedQuantizedLinear]]:
    """Within the block every correction pair of ``model`` is a pair of fp32 Parameters (to train or
    trace). On the way out each trained pair is rounded back to its stored form (fp16, or int8 rows);
    with ``trained=False`` (a trace) the stored tensors are put back as they were, bit for bit.
    Yields the corrected modules."""
    modules = [m for m in model.modules() if isinstance(m, CorrectedQuantizedLinear)]
    kept = [{n: getattr(m, n) for n in PAIR_NAMES} for m in modules]
    for m in modules:
        m.to_float()
    try:
        yield modules
    finally:
        for m, stored in zip(modules, kept, strict=True):
            if trained:
                m.to_stored()
            else:
                for name, tensor in stored.items():
                    m.register_parameter(name, tensor)
                m._cast = None
