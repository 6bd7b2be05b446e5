"""The layer-by-layer engine: one set of passes over the decoder layers for every transform that runs in it.

Transforms (rooms under ``patchers/``) import from this package only, never from its modules:
what is listed in ``__all__`` is the step API. The rest of the core reaches the modules directly:

- :mod:`.streams`: the dense and propagated hidden states and :class:`LayerStep`;
- :mod:`.shards`: where layers live (:class:`~.shards.LayerSource`, the safetensors-backed
  :class:`~.shards.CheckpointLayers`);
- :mod:`.state`: one run state (fingerprint, folder, resume point);
- :mod:`.stats` and :mod:`.fisher`: the statistics the engine computes for transforms;
- :mod:`.refine`: block-local refinement of a layer's chosen tensors against the dense stream;
- :mod:`.passes`: the passes themselves (:func:`~.passes.run_engine`);
- :mod:`.memory`: peak memory, and handing freed memory back between layers.
"""

from eigenpatch.engine.refine import refine_parameters
from eigenpatch.engine.state import Plan
from eigenpatch.engine.stats import Gram, input_groups, paired_grams
from eigenpatch.engine.streams import LayerStep, call_layer, layer_prefixes
from eigenpatch.engine.transform import Calibration, LayerStats, LayerTransform, Needs

__all__ = [
    "Calibration",
    "Gram",
    "LayerStats",
    "LayerStep",
    "LayerTransform",
    "Needs",
    "Plan",
    "call_layer",
    "input_groups",
    "layer_prefixes",
    "paired_grams",
    "refine_parameters",
]
