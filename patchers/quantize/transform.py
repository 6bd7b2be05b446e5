"""Weight-only quantization: group-wise int codes with scales and zero points, GPTQ or RTN.

It runs only in the layer-by-layer engine (:mod:`.layers`), so a model too big for memory
quantizes one decoder layer at a time, and after ``lowrank`` in one recipe the two share the
engine's passes.
"""

from __future__ import annotations

from torch import nn

from eigenpatch.patchers.quantize.config import Quantize
from eigenpatch.patchers.quantize.layers import QuantizeLayers
from eigenpatch.recipe import PatchContext, TransformResult, register_layer_transform, register_transform


@register_transform(Quantize)
def apply_quantize(model: nn.Module, config: Quantize, context: PatchContext) -> TransformResult:
    raise AssertionError("quantize is out_of_core: patch() runs it in the layer-by-layer engine")


register_layer_transform(Quantize)(QuantizeLayers)
