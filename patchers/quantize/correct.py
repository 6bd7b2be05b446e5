"""Low-rank correction of the rounding error: ``W ~ Q(W) + U V``, fitted where the error matters.

After GPTQ rounds ``W`` to ``Q``, the error ``E = W - Q`` changes the outputs by ``E x``. We fit a
rank-``k`` pair to it by minimizing

    || C (E - U V) R ||_F,   R R^T = H + lam I,   C = diag(sqrt(b))

where ``H`` is the Gram of the inputs the Linear sees on the propagated stream (the one GPTQ
rounded against), ``lam`` a small ridge (:data:`DAMP` of its mean diagonal: directions the
calibration never excited stay unconstrained, not undefined) and ``b`` the output Fisher (the
diagonal of the loss's curvature in the Linear's outputs), so that ``||C (E - UV) R||^2`` is the
second-order estimate of the loss increase that is left. The minimizer is the top-``k`` SVD of
``C E R``, un-weighted on each side: exactly the ``fwhiten`` factorizer of ``--compress``, applied
to the residual instead of the weight. Without ``C`` it is QERA's closed form (and EoRA's
eigenspace projection); without ``R`` as well, LoRC's plain SVD (what ``rtn`` gets: no data).

Why it pays: GPTQ's error is spread over all directions of the weight but its *effect* sits in the
few input directions with large eigenvalues of ``H`` (and the few outputs the loss is sensitive to),
and a 2- or 3-bit grid cannot represent those corrections itself. The singular values of ``C E R``
say what each rank buys: the sum of the squares beyond ``k`` is the estimate that remains.
"""

from __future__ import annotations

import torch

from eigenpatch.patchers.lowrank.factorize import factorize, whitening

#: Ridge added to ``H`` before whitening, as a fraction of its mean diagonal.
DAMP = 0.01


def correction(
    error: torch.Tensor, rank: int, gram: torch.Tensor | None = None, out_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, k], down [k, in])`` minimizing ``||C (error - up down) R||_F`` (module docstring), fp32."""
    if rank <= 0:
        raise ValueError(f"correction rank {rank} must be positive")
    rank = min(rank, *error.shape)
    scaling = None
    if gram is not None:
        damped = gram.to(torch.float64).clone()
        damped.diagonal().add_(DAMP * damped.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
        scaling = whitening(damped)
    return factorize(error.to(torch.float32), rank, scaling, out_scale)


def remaining(error: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr((E - UV) H (E - UV)^T)``: the output error left on the calibration inputs (tests, reports)."""
    r = (error - up @ down).double()
    return float(torch.einsum("oi,ij,oj->", r, gram.double(), r))
