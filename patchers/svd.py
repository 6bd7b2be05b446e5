"""``svd``: truncated SVD of each targeted Linear, one global parameter ratio.

The baseline of every low-rank paper, and a collapse on real models at 50 % (SmolLM2-135M:
perplexity ~22 -> ~1e6, ``models_and_data.md`` 6.2); data-aware methods build on its plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from eigenpatch.modules import LowRankLinear
from eigenpatch.patchers.factorize import factorize_svd
from eigenpatch.patchers.ranks import ALLOCATORS, check_ratio, factorized_params
from eigenpatch.patchers.targets import DEFAULT_TARGETS, find_linears, replace_module
from eigenpatch.recipe import PatchContext, TransformConfig, TransformResult, register_transform


@dataclass
class SVD(TransformConfig):
    """Remove ``ratio`` of the targeted Linears' parameters by truncated SVD.

    ``allocator`` picks the rank of each matrix (``uniform``: same keep ratio everywhere).
    """

    name = "svd"
    ratio: float = 0.5
    targets: tuple[str, ...] = DEFAULT_TARGETS
    allocator: str = "uniform"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        self.targets = tuple(self.targets)
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {self.allocator!r}; known: {', '.join(ALLOCATORS)}")


@register_transform(SVD)
def apply_svd(model: nn.Module, config: SVD, context: PatchContext) -> TransformResult:
    linears = find_linears(model, config.targets)
    shapes = {name: tuple(lin.weight.shape) for name, lin in linears.items()}
    ranks = ALLOCATORS[config.allocator](shapes, config.ratio)
    for name, lin in tqdm(linears.items(), desc="svd", unit="matrix", disable=not context.show_progress):
        rank = ranks[name]
        if rank is None:
            continue
        up, down = factorize_svd(lin.weight, rank)
        replace_module(model, name, LowRankLinear.from_factors(up, down, lin.bias))
    before = sum(m * n for m, n in shapes.values())
    return TransformResult(
        details={
            "targeted_params_before": before,
            "targeted_params_after": factorized_params(shapes, ranks),
            "factorized": sum(r is not None for r in ranks.values()),
            "kept_dense": sum(r is None for r in ranks.values()),
            "ranks": ranks,
        }
    )
