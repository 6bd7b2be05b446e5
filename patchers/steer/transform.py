"""``steer``: bake steering vectors into the checkpoint (static steering).

Each layer ``L`` of the vector file gets ``h' = h + strength * v_L`` on what decoder layer ``L``
returns (every position from ``start`` on), as a :class:`eigenpatch.format.interventions.HiddenShift`
stored in the checkpoint (``model.layers.L.steer_out.vector``), so the steered model loads in
transformers, serves in vLLM and exports to ONNX like any other patch.

Why a module and not a bias: the shift is exactly an extra bias on the layer's ``down_proj``
only when that Linear is dense and the architecture has an MLP-bias switch (Llama's
``mlp_bias``), which would also add zero biases to every gate/up/down Linear of the model and
does not exist for factorized or structured FFNs. One vector add per token per steered layer costs
nothing measurable, and it works for every FFN form and runtime alike.

Applied twice (two ``steer`` steps), shifts at the same layer add up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import HiddenShift, attach, decoder_layers
from eigenpatch.format.quantized import reference_parameter
from eigenpatch.format.steering import SteeringVectors
from eigenpatch.patchers.steer.config import Steer
from eigenpatch.patchers.steer.vectors import parse_layers
from eigenpatch.recipe import PatchContext, TransformResult, register_transform


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@register_transform(Steer)
def apply_steer(model: nn.Module, config: Steer, context: PatchContext) -> TransformResult:
    vectors = SteeringVectors.load(config.vectors)
    vectors.check_model(model, f"steering vectors {config.vectors}")
    digest = file_sha256(config.vectors)
    if config.sha256 and config.sha256 != digest:
        raise UsageError(f"{config.vectors} changed since the recipe was written (sha256 {digest[:12]}...)")
    config.sha256 = digest
    blocks = decoder_layers(model)
    chosen = parse_layers(config.layers, len(blocks)) if config.layers else vectors.layers
    missing = sorted(set(chosen) - set(vectors.layers))
    if missing:
        raise UsageError(f"{config.vectors} has no vector for layer(s) {missing}; it has {vectors.layers}")
    norms = {}
    for index in chosen:
        layer = blocks[index]
        ref = reference_parameter(layer)
        shift = config.strength * vectors.vectors[index].to(ref.device, torch.float64)
        old = getattr(layer, "steer_out", None)
        if isinstance(old, HiddenShift) and old.start == config.start:
            shift = shift + old.vector.double()
        attach(layer, HiddenShift.from_vector(shift.to(ref.dtype), hook="post", start=config.start))
        norms[index] = round(float(shift.norm()), 4)
    return TransformResult(details={"layers": chosen, "shift_norms": norms, "sha256": digest})
