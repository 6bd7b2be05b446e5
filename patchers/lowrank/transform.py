"""Low-rank compression: any rank allocator x any factorizer, one global parameter ratio.

``--method ALLOCATOR+FACTORIZER`` (e.g. ``loss+whiten``) selects the pair; ``svd`` is
``uniform+svd``. The flow is the same for all: select Linears -> the calibration statistics the
pair needs (gathered once, shared) -> spectra for the allocator -> ranks -> factor pairs.

Configs that run layer by layer (``out_of_core``) go to the engine as :class:`.layers.LowRankLayers`;
the handler below is the one-shot path, with the whole model in memory.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.patchers.lowrank.config import SVD, LowRank
from eigenpatch.patchers.lowrank.factorize import factorize, scaled_spectrum
from eigenpatch.patchers.lowrank.layers import LowRankLayers
from eigenpatch.patchers.lowrank.oneshot import calibration_stats
from eigenpatch.patchers.lowrank.ranks import ALLOCATORS, rank_details
from eigenpatch.patchers.targets import find_linears, replace_module
from eigenpatch.recipe import PatchContext, TransformResult, register_layer_transform, register_transform


@register_transform(LowRank)
def apply_lowrank(model: nn.Module, config: LowRank, context: PatchContext) -> TransformResult:
    linears = find_linears(model, config.targets)
    shapes = {name: tuple(lin.weight.shape) for name, lin in linears.items()}
    stats = calibration_stats(model, linears, config, context)
    allocate, spectrum_kind = ALLOCATORS[config.allocator]
    spectra: dict[str, torch.Tensor] = {}
    if spectrum_kind is not None:
        for name, lin in tqdm(linears.items(), desc="spectra", unit="matrix", disable=not context.show_progress):
            if spectrum_kind == "loss":
                spectra[name] = scaled_spectrum(lin.weight, stats.whitening[name], stats.output_scale[name])
            else:
                spectra[name] = scaled_spectrum(lin.weight)
    ranks = allocate(shapes, config.ratio, spectra, config.rank_multiple)
    for name, lin in tqdm(linears.items(), desc=config.factorizer, unit="matrix", disable=not context.show_progress):
        if ranks[name] is None:
            continue
        scaling, out_scale = stats.scalings(config.factorizer, name)
        up, down = factorize(lin.weight, ranks[name], scaling, out_scale)
        replace_module(model, name, LowRankLinear.from_factors(up, down, lin.bias))
    return TransformResult(details=rank_details(shapes, ranks))


@register_transform(SVD)
def apply_svd(model: nn.Module, config: SVD, context: PatchContext) -> TransformResult:
    return apply_lowrank(model, config, context)


# ``out_of_core`` configs (the layer-by-layer default and the data-free ``svd``) run in the engine.
register_layer_transform(LowRank)(LowRankLayers)
register_layer_transform(SVD)(LowRankLayers)
