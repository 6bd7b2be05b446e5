"""Propagated-input factorization: each matrix fitted to the dense outputs on the compressed model's inputs.

Run in the layer-by-layer engine's fit pass (:mod:`eigenpatch.engine`). Within a decoder layer the
Linears are taken in the order they run, grouped by shared input (q/k/v, then o, then gate/up,
then down), so o_proj is fitted on the outputs of the already-compressed q/k/v, and down_proj
on those of the compressed gate/up.

For a Linear ``W`` whose input is ``x`` in the dense stream and ``x'`` in the propagated one
(the same token after the compressed layers before it), the factor pair ``B = up @ down`` of rank
``r`` minimizes

    sum_t ||C (W x_t - B x'_t)||^2 + lam ||C (W - B) ||_F^2

(``C = diag(output scale)`` for ``fwhiten``, ``I`` for ``whiten``). With ``H' = sum x' x'^T`` and
the cross term ``X = sum x x'^T``, its unconstrained minimizer is

    B* = W (X + lam I) (H' + lam I)^-1,

and because the residual of ``B*`` is orthogonal to every ``B x'``, the error of any ``B`` is that
of ``B*`` plus ``||C (B* - B) R||_F^2`` with ``R R^T = H' + lam I``. So the best rank-``r`` pair is
today's whitening factorizer applied to ``B*`` instead of ``W``: whitening with the *propagated*
covariance and the closed-form least-squares refit against the *original* outputs, in one exact
step (SVD-LLM v2 and AA-SVD fit the same objective in two). ``lam`` (a fraction ``damp`` of
``H'``'s mean diagonal, as GPTQ damps its Hessian) pulls ``B*`` towards ``W`` in directions the
calibration tokens barely excite, instead of towards zero; with ``x' = x`` and ``lam = 0`` it is
exactly today's ``whiten``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from eigenpatch.engine import LayerStep, input_groups, paired_grams, refine_parameters
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.patchers.lowrank.factorize import InputScaling, pair_of_scaled, whitening
from eigenpatch.patchers.targets import replace_module

#: ``lam = DAMP * mean(diag(H'))``: the ridge towards the dense weight (see the module docstring).
DAMP = 0.1
#: Adam's learning rate for block-local refinement of the factor pairs.
REFINE_LR = 1e-4


def damped_whitening(gram: torch.Tensor, damp: float = DAMP) -> tuple[InputScaling, float]:
    """``(R, lam)``: the whitening of ``H' + lam I`` (full rank, so its inverse is exact), shared by
    every Linear that reads the same input, and the ridge ``lam``."""
    lam = damp * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    damped = gram.clone()
    damped.diagonal().add_(lam)
    return whitening(damped), float(lam)


def refit(
    weight: torch.Tensor,
    rank: int,
    gram: torch.Tensor,
    cross: torch.Tensor,
    out_scale: torch.Tensor | None = None,
    damp: float = DAMP,
    whitened: tuple[InputScaling, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of rank ``rank`` minimizing the propagated-input objective (module docstring);
    ``whitened``: :func:`damped_whitening` of ``gram``, when the caller already has it."""
    w = weight.detach().to(torch.float64)
    scaling, lam = whitened if whitened is not None else damped_whitening(gram, damp)
    # B* R = W (X + lam I) (H' + lam I)^-1 R = W (X + lam I) R^-T, since R R^T = H' + lam I: the
    # factorizer's input, without forming B*, an identity or an inverse of the d x d Gram.
    target = w @ cross
    target.add_(w, alpha=lam)
    scaled = target @ scaling.inverse.T
    del target
    return pair_of_scaled(scaled, rank, scaling, out_scale, weight.dtype)


def refine_layer(step: LayerStep, steps: int, lr: float = REFINE_LR) -> dict[str, float]:
    """Block-local refinement of the layer's factor pairs (nothing else) towards the dense stream's
    next hidden states (:func:`eigenpatch.engine.refine_parameters`)."""
    factors = [p for m in step.layer.modules() if isinstance(m, LowRankLinear) for p in (m.lowrank_up, m.lowrank_down)]
    return refine_parameters(step, factors, steps, lr)


def factorize_layer(
    step: LayerStep,
    ranks: Mapping[str, int],
    out_scales: Mapping[str, torch.Tensor | None],
    damp: float = DAMP,
) -> None:
    """Replace each Linear of ``ranks`` (names relative to the layer) in ``step.layer`` by its refitted pair."""
    for group in input_groups(step, list(ranks)):
        gram, cross = paired_grams(step, group[0])  # the group shares one input, and one whitening
        whitened = damped_whitening(gram, damp)
        for name in group:
            linear: nn.Linear = step.layer.get_submodule(name)
            up, down = refit(linear.weight, ranks[name], gram, cross, out_scales.get(name), damp, whitened)
            replace_module(step.layer, name, LowRankLinear.from_factors(up, down, linear.bias))
