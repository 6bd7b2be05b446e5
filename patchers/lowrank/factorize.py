"""Factorizers: how one matrix becomes a factor pair at a given rank.

All are one recipe with a different input-side scaling ``R`` and, for
``fwhiten``, an output-side scaling ``C``:

    A = C W R,   A ~ U_r S_r V_r^T,   up = C^-1 U_r S_r^1/2,   down = S_r^1/2 V_r^T R^-1

- ``svd``: ``R = I``: best rank-r approximation of ``W`` itself.
- ``fwsvd`` (Hsu et al. 2022): ``R = diag(d)``, ``d_j = sqrt(Fisher of input column j)``: the
  paper's ``W`` is ``[in, out]`` so its "rows" are input features; in PyTorch's ``[out, in]``
  layout that is a per-column weight, un-weighted on the input-side factor ``down``. Weighting
  inputs (not outputs) composes with activation whitening, which also acts on the input side.
- ``whiten`` (SVD-LLM): ``R`` is a square root of the input covariance ``H = X X^T`` (``R R^T = H``),
  so ``||(W - W') X||_F = ||(W - W') R||_F``: dropping singular value ``s_i`` of ``W R`` costs
  exactly ``s_i^2`` of output error on the calibration tokens. ``R`` comes from an fp64
  eigendecomposition (no Cholesky failures on a merely PSD ``H``), with a pseudo-inverse.
- ``fwhiten`` (ours; GFWSVD's Kronecker-factored Fisher with a diagonal output factor): whiten
  the input as above *and* weight each output channel by ``C = diag(sqrt(b))``, ``b`` the
  output Fisher, and un-weight ``up``. ``||C (W - W') R||_F^2`` is then the second-order estimate
  of the loss increase, not just the output error: output channels the loss is sensitive to
  are approximated first.

The singular values are split evenly between the factors, as WeLore's ``LowRankLayer`` does, so
both factors have similar scale (this matters once they are fine-tuned or quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Eigenvalues of H below this fraction of the largest are treated as zero (pseudo-inverse):
#: directions the calibration data never excites carry no information about the output error.
WHITEN_RCOND = 1e-10
#: Output weights below this fraction of the largest are raised to it before ``up`` is un-weighted.
OUT_SCALE_FLOOR = 1e-6
#: Added to the mean-normalized Fisher so columns with zero gradient keep a finite inverse weight.
FISHER_EPS = 1e-5
#: Matrices with both sides at least this long get their top-r singular triplets from a randomized
#: SVD at that rank (Halko, Martinsson & Tropp 2011) instead of a full one: a 4096 x 11008 matrix
#: costs seconds instead of minutes. Smaller ones (every SmolLM2 matrix) keep the exact SVD.
RANDOMIZED_MIN_DIM = 2048
#: Extra random directions beyond the rank, and power iterations (each sharpens the spectrum's decay).
OVERSAMPLE, POWER_ITERATIONS = 32, 2


@dataclass
class InputScaling:
    """``R`` and ``R^-1`` acting on the input side: a full matrix ``[in, in]`` or a diagonal ``[in]``."""

    scale: torch.Tensor
    inverse: torch.Tensor

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale if self.scale.dim() == 1 else weight @ self.scale

    def undo(self, down: torch.Tensor) -> torch.Tensor:
        return down * self.inverse if self.inverse.dim() == 1 else down @ self.inverse


def whitening(gram: torch.Tensor) -> InputScaling:
    """``R = Q L^1/2`` from ``H = Q L Q^T`` (so ``R R^T = H``), with ``R^-1 = L^-1/2 Q^T`` (pseudo-inverse)."""
    evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
    keep = evals > evals.max().clamp_min(0) * WHITEN_RCOND
    root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inv_root = torch.where(keep, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(evals))
    return InputScaling(scale=evecs * root, inverse=inv_root[:, None] * evecs.T)


def fisher_weighting(fisher: torch.Tensor) -> InputScaling:
    """``d = sqrt(I / mean(I) + eps)`` per input column (scale-free: only relative weights matter)."""
    normalized = fisher.to(torch.float64) / fisher.to(torch.float64).mean().clamp_min(torch.finfo(torch.float64).tiny)
    d = (normalized + FISHER_EPS).sqrt()
    return InputScaling(scale=d, inverse=1.0 / d)


def output_weighting(fisher: torch.Tensor) -> torch.Tensor:
    """``c = sqrt(b)`` per output channel from the output Fisher ``b`` (zeros stay zeros: no inverse needed
    for spectra). Unlike the input side it is *not* normalized: its absolute scale is what makes
    spectra of different matrices comparable in units of loss."""
    return fisher.to(torch.float64).clamp_min(0).sqrt()


def _scaled(weight: torch.Tensor, scaling: InputScaling | None, out_scale: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    if scaling is not None:
        w = scaling.apply(w)
    return w if out_scale is None else out_scale[:, None] * w


def scaled_spectrum(
    weight: torch.Tensor, scaling: InputScaling | None = None, out_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Singular values of ``C W R`` (descending, fp64): what truncation at each rank would cost."""
    return torch.linalg.svdvals(_scaled(weight, scaling, out_scale))


def top_singular(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, s_r, V_r^T)`` of ``a``: exact below :data:`RANDOMIZED_MIN_DIM` or when ``rank`` is most
    of the spectrum; otherwise a randomized range finder at ``rank + OVERSAMPLE`` in fp32 (its error
    is a small multiple of the first discarded singular value), returned in ``a``'s dtype."""
    small = min(a.shape)
    if small < RANDOMIZED_MIN_DIM or rank + OVERSAMPLE > small // 2:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same factors for the same matrix, run after run
    try:
        u, s, v = torch.svd_lowrank(a.float(), q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
    finally:
        torch.random.set_rng_state(generator_state)
    return u[:, :rank].to(a.dtype), s[:rank].to(a.dtype), v[:, :rank].T.to(a.dtype)


def factorize(
    weight: torch.Tensor, rank: int, scaling: InputScaling | None = None, out_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in])`` minimizing ``||C (W - up down) R||_F``, in ``weight``'s dtype.

    ``C = diag(out_scale)`` (``fwhiten``) is floored at ``OUT_SCALE_FLOOR`` of its largest entry so
    that un-weighting ``up`` stays finite for output channels the loss never looked at.
    """
    w = weight.detach().to(torch.float64)
    return pair_of_scaled(w if scaling is None else scaling.apply(w), rank, scaling, out_scale, weight.dtype)


def pair_of_scaled(
    a: torch.Tensor,
    rank: int,
    scaling: InputScaling | None,
    out_scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` from ``a = W R`` (input scaling already applied): the top-``rank`` SVD of
    ``C a``, with ``C`` (floored, see :func:`factorize`) and ``R`` undone on each side."""
    if out_scale is not None:
        out_scale = out_scale.clamp_min(out_scale.max() * OUT_SCALE_FLOOR)
        a = out_scale[:, None] * a
    u, s, vh = top_singular(a, rank)
    root = s.sqrt()
    up = u * root
    down = root[:, None] * vh
    if scaling is not None:
        down = scaling.undo(down)
    if out_scale is not None:
        up = up / out_scale[:, None]
    return up.to(dtype), down.to(dtype)
