"""``svd``: truncated SVD of each targeted Linear at one uniform keep ratio (``uniform+svd``).

The baseline of every low-rank paper, and a collapse on real models (SmolLM2-135M: perplexity
~22 -> ~1e6 at 50 %, ``models_and_data.md`` 6.2). Kept as its own name because it needs no
data and is what ``eigenpatch inspect`` and older recipes refer to.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from eigenpatch.patchers.compress import LowRank, apply_lowrank
from eigenpatch.recipe import PatchContext, TransformResult, register_transform


@dataclass
class SVD(LowRank):
    """``LowRank`` with data-free defaults: uniform ranks, plain SVD factors."""

    name = "svd"


@register_transform(SVD)
def apply_svd(model: nn.Module, config: SVD, context: PatchContext) -> TransformResult:
    return apply_lowrank(model, config, context)
