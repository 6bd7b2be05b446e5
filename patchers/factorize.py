"""Factorizers: how one matrix becomes a factor pair at a given rank."""

from __future__ import annotations

import torch


def factorize_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``W ~ (U_r S_r^1/2)(S_r^1/2 V_r^T)``: the best rank-r approximation in Frobenius norm.

    Computed in float64 (cheap at these sizes, and it keeps small singular values honest);
    returns ``(up [out, r], down [r, in])`` in ``weight``'s dtype. The singular values are split
    evenly between the factors (as WeLore's ``LowRankLayer`` does) so both have similar scale,
    which matters once the factors are fine-tuned or quantized.
    """
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    return up.to(weight.dtype), down.to(weight.dtype)


def normalized_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Singular values divided by the largest: the curve ``eigenpatch inspect`` draws."""
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return s / s[0].clamp_min(torch.finfo(torch.float64).tiny)
