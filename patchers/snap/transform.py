"""``snap``: attach a :class:`~eigenpatch.format.interventions.TokenSnap` to layer 0's input.

The search itself lives in the format (:mod:`eigenpatch.format.snap`), because every runtime that
accepts embeddings runs it. Here the transform checks that layer 0 really reads rows of the
embedding table (times a scale, which Gemma applies), and reports the radius a perturbation of a
token's embedding must exceed before it can snap anywhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import TokenSnap, attach, decoder_layers, input_embedding
from eigenpatch.format.snap import half_gaps
from eigenpatch.patchers.snap.config import Snap
from eigenpatch.recipe import PatchContext, TransformResult, register_transform

#: Tokens whose layer-0 input is compared with their table rows.
PROBE_TOKENS = 64


def embedding_scale(model: nn.Module, layer: nn.Module, table: torch.Tensor) -> float:
    """The factor between a token's row and what layer 0 receives for it (1 for Llama, sqrt(d) for
    Gemma). Refuses a model whose layer 0 reads anything else (positions added, a norm, ...)."""
    ids = torch.linspace(0, table.shape[0] - 1, min(PROBE_TOKENS, table.shape[0])).long()
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            model(input_ids=ids[None].to(table.device), use_cache=False)
    finally:
        handle.remove()
    h, rows = seen[0][0].double(), table[ids.to(table.device)].double()
    scale = float((h * rows).sum() / rows.square().sum().clamp_min(1e-30))
    error = float((h - scale * rows).norm() / h.norm().clamp_min(1e-30))
    if not scale > 0 or error > 1e-3:
        raise UsageError(
            f"snap: this model's first decoder layer does not read rows of its embedding table "
            f"(relative error {error:.2g} after scaling by {scale:.3g}); it cannot be snapped"
        )
    return scale


@register_transform(Snap)
def apply_snap(model: nn.Module, config: Snap, context: PatchContext) -> TransformResult:
    layer = decoder_layers(model)[0]
    table = input_embedding(model).weight.detach()
    vocab, dim = table.shape
    scale = embedding_scale(model, layer, table)
    module = TokenSnap(dim, vocab, scale=scale)
    attach(layer, module)
    module.bind(model)
    _, gaps = half_gaps(table.float() * scale, config.sample_rows)
    mean_norm = float(table.float().norm(dim=-1).mean()) * scale
    levels = gaps.float().cpu().quantile(torch.tensor([0.0, 0.05, 0.5]))
    radius = {k: float(v) / mean_norm for k, v in zip(("min", "p5", "median"), levels, strict=True)}
    return TransformResult(
        {"vocab": vocab, "dim": dim, "scale": scale, "sampled_rows": gaps.numel(), "safe_radius": radius}
    )
