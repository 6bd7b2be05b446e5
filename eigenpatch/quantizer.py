"""Block-wise N-bit weights: round-to-nearest and GPTQ, the one quantizer of eigenpatch.

The ``quantize`` transform (``patchers/quantize``) stores its results as quantized Linears
(:mod:`eigenpatch.format.quantized`, whose bytes these are), and ``eigenpatch export --weights
int4`` rounds an unquantized graph with the same functions: it lives in the core so that both
can use it (a runtime never imports a transform).

A weight ``W [N, K]`` (N outputs, K inputs) is cut into blocks of ``block`` consecutive inputs per
output; each block stores ``bits``-bit codes with one fp32 scale and one zero point, and means
``(code - zero) * scale``. Zero points matter at 4 bits: a block's values are rarely centred, and
an asymmetric grid spends all 16 levels on the range the block uses (measured on SmolLM2,
docs/export.md). ``MatMulNBits`` (the product) and ``GatherBlockQuantized`` (the embedding lookup)
read the same bytes: codes packed along K, low bits first, so a tied table is stored once.

GPTQ (Frantar et al., 2022) rounds one input column at a time and moves each column's rounding
error onto the columns not yet rounded, weighted by the inverse of the inputs' Gram
``H = X^T X``: it minimizes the error of ``X W^T`` on the calibration inputs, not of ``W``. For a
factor pair this is what makes 4 bits usable: the ``up`` factor's inputs (the rank-r codes) are
few, strongly scaled directions, exactly where plain rounding does worst.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eigenpatch.format.quantized import QuantizedLinear, pack, unpack

#: Columns GPTQ rounds before it propagates their error to the rest in one product (the paper's B).
GPTQ_CHUNK = 128
#: Dampening added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned
#: where calibration never excited an input direction.
GPTQ_DAMP = 0.01
#: Fractions of a block's min/max range tried by the grid search.
GRID_SHRINKS = tuple(1.0 - 0.025 * i for i in range(11))


#: fp16's smallest normal number: a stored scale below it would lose its mantissa.
FP16_TINY = float(torch.finfo(torch.float16).tiny)


@dataclass
class BlockQuant:
    """``bits``-bit codes of a ``[N, K]`` weight in blocks of ``block`` inputs (K padded to a whole block)."""

    codes: np.ndarray  # uint8 [N, k_blocks * block]
    scales: np.ndarray  # float32 [N, k_blocks]
    zeros: np.ndarray  # uint8 [N, k_blocks]
    bits: int
    block: int
    k: int

    def dequantize(self) -> np.ndarray:
        """The fp32 ``[N, K]`` weight these codes stand for."""
        zeros = np.repeat(self.zeros.astype(np.float32), self.block, axis=1)
        scales = np.repeat(self.scales, self.block, axis=1)
        return ((self.codes.astype(np.float32) - zeros) * scales)[:, : self.k]

    def packed_codes(self) -> np.ndarray:
        """``[N, k_blocks, block * bits / 8]`` uint8: ``MatMulNBits``' B (and, reshaped to
        ``[N, K_pad * bits / 8]``, ``GatherBlockQuantized``'s data)."""
        n, k_blocks = self.scales.shape
        return pack_np(self.codes, self.bits).reshape(n, k_blocks, self.block * self.bits // 8)

    def packed_zeros(self) -> np.ndarray:
        """``[N, ceil(k_blocks * bits / 8)]`` uint8, packed like the codes."""
        return pack_np(self.zeros, self.bits)

    @classmethod
    def of_module(cls, module: QuantizedLinear) -> BlockQuant:
        """The codes a stored quantized Linear holds (the export maps them without rounding again)."""
        groups = module.scales.shape[1]
        return cls(
            codes=unpack(module.qweight.detach().cpu(), module.bits, groups * module.group).numpy(),
            scales=module.scales.detach().cpu().float().numpy(),
            zeros=unpack(module.zeros.detach().cpu(), module.bits, groups).numpy(),
            bits=module.bits,
            block=module.group,
            k=module.in_features,
        )

    def module(self, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """The :class:`~eigenpatch.format.quantized.QuantizedLinear` that stores these codes."""
        return QuantizedLinear.from_codes(
            torch.from_numpy(self.codes),
            torch.from_numpy(self.scales),
            torch.from_numpy(self.zeros),
            self.bits,
            self.block,
            self.k,
            bias,
        )


def pack_np(values: np.ndarray, bits: int) -> np.ndarray:
    """:func:`eigenpatch.format.quantized.pack` on numpy arrays (the export's initializers)."""
    return pack(torch.from_numpy(np.ascontiguousarray(values, dtype=np.uint8)), bits).numpy()


def _grid(
    w: torch.Tensor, bits: int, search: bool = True, fp16_scales: bool = False, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid of each row of ``w [..., block]``: scale and integer zero point.

    The range always contains 0, so a zero weight (and padding) is exact. With ``search`` the
    range is also shrunk towards 0 by up to a quarter where that lowers the block's squared
    rounding error: clipping one outlier buys the other 31 weights a finer step. With
    ``fp16_scales`` each scale is rounded to the fp16 value a checkpoint stores before the codes
    are chosen, so the stored scales are the ones the codes (and GPTQ's error feedback) assumed.
    ``symmetric`` centres the range on 0 (zero point ``2**(bits-1)``), as GPTQ's symmetric mode.
    """
    top = (1 << bits) - 1
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    best_scale, best_zero, best_err = None, None, None
    shrinks = GRID_SHRINKS if search else (1.0,)
    work = torch.empty_like(w) if len(shrinks) > 1 else None  # one buffer, in-place ops: 8x faster on 7B widths
    for shrink in shrinks:
        scale = (hi - lo) * shrink / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if fp16_scales:
            scale = scale.clamp_min(FP16_TINY).to(torch.float16).to(scale.dtype)
        zero = torch.full_like(scale, float(1 << (bits - 1))) if symmetric else torch.round(-lo * shrink / scale)
        zero = zero.clamp(0, top)
        if work is None:
            return scale, zero  # one candidate: nothing to compare
        # the squared error of this grid: ((clamp(round(w / s) + z) - z) * s - w)^2, summed per block
        torch.div(w, scale[..., None], out=work)
        work.round_().add_(zero[..., None]).clamp_(0, top).sub_(zero[..., None]).mul_(scale[..., None])
        err = work.sub_(w).square_().sum(-1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)


def _padded(weight: np.ndarray | torch.Tensor, block: int) -> torch.Tensor:
    n, k = weight.shape
    w = torch.zeros(n, -(-k // block) * block, dtype=torch.float32)
    src = weight.detach() if isinstance(weight, torch.Tensor) else torch.from_numpy(np.array(weight, dtype=np.float32))
    w[:, :k] = src.to(device="cpu", dtype=torch.float32)
    return w


def quantize_rtn(
    weight: np.ndarray | torch.Tensor,
    bits: int,
    block: int,
    search: bool = True,
    fp16_scales: bool = False,
    symmetric: bool = False,
) -> BlockQuant:
    """Round each block to its own min/max grid (no calibration)."""
    n, k = weight.shape
    w = _padded(weight, block).view(n, -1, block)
    scale, zero = _grid(w, bits, search, fp16_scales, symmetric)
    codes = _round(w, scale, zero, bits).view(n, -1)
    return _pack_result(codes, scale, zero, bits, block, k)


def quantize_gptq(
    weight: np.ndarray | torch.Tensor,
    gram: np.ndarray | torch.Tensor,
    bits: int,
    block: int,
    act_order: bool = True,
    search: bool = True,
    fp16_scales: bool = False,
    symmetric: bool = False,
) -> BlockQuant:
    """GPTQ-round ``weight [N, K]`` against the Gram ``gram [K, K]`` of its inputs.

    With ``act_order`` the columns are rounded from the most to the least excited input (largest
    ``H_kk`` first), so the columns that matter most are rounded while the most others are left
    to absorb their error. The block grids are then fixed beforehand, from the weights as they
    are ("static groups"), because a block's columns are no longer rounded together; that keeps
    the blocks contiguous in K, the only layout ``MatMulNBits`` reads. Without ``act_order`` each
    grid is set when GPTQ reaches its block, from the weights as they stand by then.
    Inputs calibration never excited (zero diagonal) carry no information: their weights are
    rounded as they are and pass on no error.
    """
    n, k = weight.shape
    w = _padded(weight, block).double()
    kp = w.shape[1]
    h = torch.zeros(kp, kp, dtype=torch.float64)
    h[:k, :k] = torch.as_tensor(gram).detach().to(torch.float64)
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += torch.eye(kp, dtype=torch.float64) * (GPTQ_DAMP * torch.diagonal(h).mean())
    scales = torch.zeros(n, kp // block, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    if act_order:
        scales, zeros = _grid(w.view(n, -1, block), bits, search, fp16_scales, symmetric)
        order = torch.argsort(torch.diagonal(h), descending=True)
    else:
        order = torch.arange(kp)
    w, h = w[:, order], h[order][:, order]
    group = order // block  # the block (grid) of each column, in processing order
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, kp, dtype=torch.float64)
    chunk = max(block, GPTQ_CHUNK // block * block)  # whole blocks per chunk: a grid never spans two
    for c0 in range(0, kp, chunk):
        c1 = min(c0 + chunk, kp)
        w1 = w[:, c0:c1].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[c0:c1, c0:c1]
        for i in range(c1 - c0):
            b = int(group[c0 + i])
            if not act_order and i % block == 0:
                scales[:, b], zeros[:, b] = _grid(w1[:, i : i + block], bits, search, fp16_scales, symmetric)
            scale, zero = scales[:, b], zeros[:, b]
            q = _round(w1[:, i : i + 1], scale, zero, bits)[:, 0]
            codes[:, c0 + i] = q
            e = (w1[:, i] - (q - zero) * scale) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, c1:] -= err @ hinv[c0:c1, c1:]
    codes[:, order] = codes.clone()
    return _pack_result(codes, scales, zeros, bits, block, k)


def _pack_result(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, block: int, k: int
) -> BlockQuant:
    return BlockQuant(
        codes=codes.to(torch.uint8).numpy(),
        scales=scale.float().numpy(),
        zeros=zero.to(torch.uint8).numpy(),
        bits=bits,
        block=block,
        k=k,
    )
