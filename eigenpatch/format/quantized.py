"""Quantized Linears: group-wise integer codes, each group with a scale and a zero point.

A weight ``W [N, K]`` (N outputs, K inputs) is cut into groups of ``group`` consecutive inputs per
output (K padded with zeros to a whole group). Each group stores ``bits``-bit codes ``q``, one fp16
scale ``s`` and one integer zero point ``z``, and stands for ``(q - z) * s``. Zero points matter at
4 bits and below: a group's values are rarely centred, and an asymmetric grid spends every level
on the range the group uses.

The bytes are ONNX Runtime's ``MatMulNBits`` layout, so the export maps a stored Linear to that
operator without rounding again, and the same codes serve every runtime:

- ``qweight`` ``uint8 [N, K_pad * bits / 8]``: codes packed along K, low bits first;
- ``scales`` ``float16 [N, K_pad / group]``;
- ``zeros`` ``uint8 [N, ceil(groups * bits / 8)]``: zero points packed the same way.

At 4 bits, group 32 that is ``0.5 + 2.5 / 32`` bytes per weight: 0.29x bf16.

How a runtime computes with them (:meth:`QuantizedLinear.forward`): in transformers on a CPU with
bf16 activations, 4-bit codes with a group of 32 to 256 and N a multiple of 16 run PyTorch's own
int4 kernel (``aten._weight_int4pack_mm_for_cpu``, the op torchao calls), and so do 2- and 3-bit
codes, which are valid 4-bit codes (``KERNEL_BITS``); everything else (fp32 activations, where that
kernel is 40x slower than a dense GEMM; 8 bits) dequantizes the weight for each call and runs
``F.linear``: correct everywhere, memory-light, and slow.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The widths a quantized Linear stores. 3-bit codes pack 8 to 3 bytes; no runtime here has a 3-bit
#: kernel, so they compute as 4-bit codes (the same values, a wider container): see ``KERNEL_BITS``.
BITS = (2, 3, 4, 8)
#: The width whose kernels a stored width runs on. 2- and 3-bit codes are valid 4-bit codes, and
#: every runtime's 4-bit kernel is fast where its 2-bit path (if any) is not: PyTorch has none (a
#: dequantize per call, 0.18x dense decode), ONNX Runtime 1.32's 2-bit ``MatMulNBits`` measured
#: 35-55x slower than its 4-bit one at batch 1 on a 576 x 1536 weight. So they run widened, and
#: cost 4-bit codes in memory (:func:`widening_bytes`); on disk they stay at their width.
KERNEL_BITS = {2: 4, 3: 4, 4: 4, 8: 8}
#: Group sizes PyTorch's CPU int4 kernel takes along K.
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
#: Whether this PyTorch has that kernel (looked up once, not on every forward).
HAS_INT4_CPU_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def padded_k(in_features: int, group: int) -> int:
    """K rounded up to a whole number of groups."""
    return -(-in_features // group) * group


def _unit(bits: int) -> tuple[int, int]:
    """``(values, bytes)`` of the smallest whole-byte run of ``bits``-bit values: (2, 1) at 4 bits,
    (8, 3) at 3 bits."""
    values = 8 // math.gcd(8, bits)
    return values, values * bits // 8


def packed_bytes(m: int, bits: int) -> int:
    """Bytes :func:`pack` gives ``m`` values of ``bits`` bits (a partial run is padded)."""
    values, size = _unit(bits)
    return -(-m // values) * size


def quantized_bytes(out_features: int, in_features: int, bits: int, group: int) -> int:
    """Stored bytes of an ``[out, in]`` weight at ``bits`` bits in groups of ``group``: codes, fp16
    scales and zero points, as :class:`QuantizedLinear` holds them (the budget plans with it)."""
    groups = padded_k(in_features, group) // group
    return out_features * (groups * group * bits // 8 + 2 * groups + packed_bytes(groups, bits))


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8 [N, M]`` values (each ``< 2**bits``) along the last axis, low bits first: each run of
    :func:`_unit` values is one little-endian integer of whole bytes (one byte except at 3 bits)."""
    per_run, size = _unit(bits)
    n, m = values.shape
    padded = -(-m // per_run) * per_run
    v = torch.zeros(n, padded, dtype=torch.int32, device=values.device)
    v[:, :m] = values.to(torch.int32)
    v = v.view(n, -1, per_run)
    word = torch.zeros(v.shape[:2], dtype=torch.int32, device=values.device)
    for j in range(per_run):
        word |= v[:, :, j] << (bits * j)
    out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(size)], dim=-1)
    return out.reshape(n, -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """The first ``m`` values of each row of :func:`pack`'s output, as ``uint8 [N, m]``."""
    per_run, size = _unit(bits)
    runs = packed.to(torch.int32).view(packed.shape[0], -1, size)
    word = torch.zeros(runs.shape[:2], dtype=torch.int32, device=packed.device)
    for b in range(size):
        word |= runs[:, :, b] << (8 * b)
    mask = (1 << bits) - 1
    parts = [(word >> (bits * j)) & mask for j in range(per_run)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)[:, :m].to(torch.uint8)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``[N, K]`` weight that ``(qweight, scales, zeros)`` stand for, in ``dtype``."""
    groups = scales.shape[1]
    codes = unpack(qweight, bits, groups * group).to(dtype).view(-1, groups, group)
    z = unpack(zeros, bits, groups).to(dtype)
    w = (codes - z[..., None]) * scales.to(dtype)[..., None]
    return w.view(w.shape[0], -1)[:, :in_features]


def widening_bytes(module: nn.Module) -> int:
    """Bytes ``module``'s quantized Linears gain when each one's codes and zero points widen to the
    width its kernels run (``KERNEL_BITS``: 2 and 3 -> 4): stored bytes plus this is what a runtime that
    unpacks at load holds (ONNX Runtime's ``MatMulNBits`` graph). 0 unless a Linear stores 2 or 3 bits."""
    return sum(
        quantized_bytes(m.out_features, m.in_features, KERNEL_BITS[m.bits], m.group)
        - quantized_bytes(m.out_features, m.in_features, m.bits, m.group)
        for m in module.modules()
        if isinstance(m, QuantizedLinear)
    )


def resident_bytes(model: nn.Module) -> int:
    """Bytes every quantized Linear of ``model`` holds in memory now (:meth:`QuantizedLinear.resident_bytes`),
    with the correction pairs of corrected ones (``CorrectedQuantizedLinear.resident_bytes``)."""
    from eigenpatch.format.corrected import CorrectedQuantizedLinear  # it imports this module

    kinds = (QuantizedLinear, CorrectedQuantizedLinear)
    return sum(m.resident_bytes() for m in model.modules() if isinstance(m, kinds))


def reference_parameter(module: nn.Module) -> torch.Tensor | None:
    """The first parameter of ``module`` that says its compute dtype and device: floating point and
    not a quantized Linear's (whose codes are uint8 and scales fp16 whatever the model computes in)."""
    for sub in module.modules():
        if isinstance(sub, QuantizedLinear):
            continue
        for p in sub.parameters(recurse=False):
            if p.is_floating_point():
                return p
    return None


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as group-wise ``bits``-bit codes (see the module docstring).

    The codes, scales and zero points are frozen parameters (``requires_grad=False``): the format's
    checks and transformers' loader see every stored tensor of a module as a parameter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits={bits}: quantized Linears store {', '.join(map(str, BITS))} bits")
        if group <= 0 or group % _unit(bits)[0]:
            raise ValueError(f"group={group} must be a positive multiple of {_unit(bits)[0]} at {bits} bits")
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        k = padded_k(in_features, group)
        groups = k // group

        def frozen(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)

        self.qweight = frozen(out_features, k * bits // 8, dtype=torch.uint8)
        self.scales = frozen(out_features, groups, dtype=torch.float16)
        self.zeros = frozen(out_features, packed_bytes(groups, bits), dtype=torch.uint8)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._int4: tuple[torch.Tensor, torch.Tensor] | None = None  # the kernel's packing, made on first use

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """Build from unpacked ``codes [N, K_pad]``, ``scales`` and integer ``zeros`` ``[N, groups]``."""
        n = codes.shape[0]
        module = cls(in_features, n, bits, group, bias is not None, codes.device, None if bias is None else bias.dtype)
        with torch.no_grad():
            module.qweight.copy_(pack(codes, bits))
            module.scales.copy_(scales.to(torch.float16))
            module.zeros.copy_(pack(zeros, bits))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors the format stores for the weight: codes, scales, zero points (not the bias)."""
        return (self.qweight, self.scales, self.zeros)

    def stored_bytes(self) -> int:
        """What the weight costs: codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in self.stored())

    def scales_changed(self) -> None:
        """Drop the kernel's packed copy after the scales were written in place (healing trains
        them): it holds the old ones, and the next bf16 forward packs it again."""
        self._int4 = None

    def resident_bytes(self) -> int:
        """What the weight holds in memory now: the stored bytes, plus the int4 kernel's packed copy
        once a bf16 forward built it. 2- and 3-bit codes run as that 4-bit copy, so in memory such a
        Linear costs its own codes *and* 4-bit ones: the disk saving is not a memory saving."""
        copy = sum(t.numel() * t.element_size() for t in self._int4) if self._int4 is not None else 0
        return self.stored_bytes() + copy

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[out, in]`` weight the codes stand for."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group, self.in_features, dtype)

    def kernel(self, x: torch.Tensor) -> str:
        """Which computation :meth:`forward` uses for ``x``: ``"int4pack"`` or ``"dequantize"``."""
        return self._kernel_for(x.dtype, x.device.type)

    def prepare(self, dtype: torch.dtype) -> str:
        """Build the kernel's packed copy now for activations of ``dtype`` (on the codes' device), not
        on the first forward: a compiled forward (vLLM's ``torch.compile``) must find it built, or it
        traces the packing into every call. Returns the kernel that will run."""
        kernel = self._kernel_for(dtype, self.qweight.device.type)
        if kernel == "int4pack":
            self._int4pack()
        return kernel

    def _kernel_for(self, dtype: torch.dtype, device_type: str) -> str:
        fits = (
            not self.scales.requires_grad  # training the scales (heal): the kernel has no backward
            and KERNEL_BITS[self.bits] == 4
            and dtype == torch.bfloat16
            and device_type == "cpu"
            and self.group in INT4_KERNEL_GROUPS
            and self.out_features % 16 == 0
            and self.in_features % self.group == 0
            and HAS_INT4_CPU_KERNEL
        )
        return "int4pack" if fits else "dequantize"

    def _int4pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PyTorch's CPU int4 packing and its ``[groups, N, 2]`` bf16 scales and float zero points.

        The kernel means ``(q - 8) * s + m``; ours is ``(q - z) * s``, so ``m = (8 - z) s``. The
        table holds ``m`` in bf16, whose rounding is relative to ``m``: for codes narrower than 4
        bits each group's codes are moved up by ``8 - z`` first (``q + 8 - z`` stays in [1, 15]),
        which makes ``m`` exactly 0, so a 2-bit weight keeps the 4-bit one's accuracy (2.5e-3
        relative, not 2e-2).
        """
        if self._int4 is None:
            codes = unpack(self.qweight, self.bits, self.in_features).to(torch.int32)
            s = self.scales.float()
            z = unpack(self.zeros, self.bits, s.shape[1]).to(torch.int32)
            if self.bits < 4:
                codes = codes + (8 - z).repeat_interleave(self.group, dim=1)
                z = torch.full_like(z, 8)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            table = torch.stack([s.T, ((8 - z.float()) * s).T], dim=-1).to(torch.bfloat16).contiguous()
            self._int4 = (packed, table)
        return self._int4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel(x) == "int4pack":
            packed, table = self._int4pack()
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), packed, self.group, table)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        self._int4 = None  # moved or cast: the kernel's copy is rebuilt from the codes
        stored = self.scales.data
        out = super()._apply(fn, recurse)
        if self.scales.dtype not in (torch.float16, torch.float32, torch.float64):
            self.scales.data = stored.to(self.scales.device)  # ``model.to(bf16)`` must not round the scales
        return out

    def spec(self) -> dict[str, Any]:
        from eigenpatch.format import QUANTIZED

        return {
            "kind": QUANTIZED,
            "bits": self.bits,
            "group": self.group,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group={self.group}, bias={self.bias is not None}"
        )


class QuantizedLowRankLinear(nn.Module):
    """A factor pair ``y = up (down x) + b`` whose two factors are :class:`QuantizedLinear` s.

    ``down`` is ``[r, in]`` (groups along the inputs), ``up`` is ``[out, r]`` (groups along the
    rank), each with its own codes, scales and zero points; the bias stays in the compute dtype
    beside them. Each factor picks its kernel as a quantized Linear does, so a pair runs as two
    int4 GEMMs when both fit PyTorch's kernel: a rank that is a multiple of the group and of 16,
    which ``--compress`` with ``--bits`` plans for.
    """

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
        if rank <= 0:  # a tensor-parallel slice may hold fewer rows than the rank: no upper bound
            raise ValueError(f"rank {rank} must be positive")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group = bits, group
        self.lowrank_down = QuantizedLinear(in_features, rank, bits, group, device=device)
        self.lowrank_up = QuantizedLinear(rank, out_features, bits, group, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(
        cls, down: QuantizedLinear, up: QuantizedLinear, bias: torch.Tensor | None = None
    ) -> QuantizedLowRankLinear:
        """Wrap two quantized factors (taken as they are, not copied)."""
        if (down.out_features, down.bits, down.group) != (up.in_features, up.bits, up.group):
            raise ValueError(
                f"factors do not chain: down {down.in_features}->{down.out_features} int{down.bits} g{down.group}, "
                f"up {up.in_features}->{up.out_features} int{up.bits} g{up.group}"
            )
        kw = {"device": down.qweight.device, "dtype": None if bias is None else bias.dtype}
        pair = cls(down.in_features, up.out_features, down.out_features, down.bits, down.group, bias is not None, **kw)
        pair.lowrank_down, pair.lowrank_up = down, up
        if bias is not None:
            with torch.no_grad():
                pair.bias.copy_(bias)
        return pair

    def stored_bytes(self) -> int:
        return self.lowrank_down.stored_bytes() + self.lowrank_up.stored_bytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lowrank_up(self.lowrank_down(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix the pair stands for (inspection and tests, never the hot path)."""
        return self.lowrank_up.dequantized() @ self.lowrank_down.dequantized()

    def spec(self) -> dict[str, Any]:
        from eigenpatch.format import LOWRANK_QUANTIZED

        return ranked_spec(self, LOWRANK_QUANTIZED)

    def extra_repr(self) -> str:
        return ranked_repr(self)


def ranked_spec(module: nn.Module, kind: str) -> dict[str, Any]:
    """The ``layers`` entry of a quantized module with a rank (a quantized pair, a corrected Linear)."""
    return {
        "kind": kind,
        "rank": module.rank,
        "bits": module.bits,
        "group": module.group,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }


def ranked_repr(module: nn.Module) -> str:
    return (
        f"in_features={module.in_features}, out_features={module.out_features}, rank={module.rank}, "
        f"bits={module.bits}, group={module.group}, bias={module.bias is not None}"
    )
