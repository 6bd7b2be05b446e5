"""Hidden-state interventions (``quantization_config.interventions``) in vLLM.

vLLM routes Linears through the quantization method, but nothing routes a decoder layer's
*output*, which is where a residual-stream projection acts. So the plugin wraps the model
loader's ``create_model`` (one place, every architecture): once the model skeleton exists and
before weights load, each listed intervention becomes a module on its decoder layer, named as in
the checkpoint (``model.layers.15.project_out``), so vLLM's own weight loader fills it, and a hook
applies it. Hooks registered before vLLM compiles the forward are traced into the graph.

vLLM decoder layers take and return ``(hidden, residual)`` with the residual stream being their
sum (the add is fused into the next RMSNorm). The projection acts on that sum and writes only
the change back into ``hidden``: ``hidden += proj(s) - s``, so the fused add of the next layer
sees exactly ``proj(s)``. Hidden states are replicated across tensor-parallel ranks, so every
rank applies the same full projection; a layer missing on this pipeline stage is skipped.

``snap`` (nearest vocabulary row of each input embedding) only matters when the server accepts
``prompt_embeds`` (``--enable-prompt-embeds``): token ids are rows already. Without that flag it
is switched off (no cost); with it, it needs the whole embedding table on one rank (TP 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from eigenpatch.format.interventions import (
    HiddenProjection,
    HiddenShift,
    Intervention,
    TokenSnap,
    build_interventions,
    input_embedding,
)


class VllmHooks(Intervention):
    """An intervention's hooks in vLLM's ``(positions, hidden, residual)`` calling convention."""

    def _on_stream(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: Any) -> torch.Tensor:
        stream = hidden if residual is None else hidden + residual
        return hidden + (self(stream, positions) - stream)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positions, hidden, residual = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("residual")
        return (positions, self._on_stream(hidden, residual, positions), *args[2:]), kwargs

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden, residual = output
        return self._on_stream(hidden, residual, args[0]), residual


class VllmHiddenProjection(VllmHooks, HiddenProjection):
    pass


class VllmHiddenShift(VllmHooks, HiddenShift):
    def _on_stream(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: Any) -> torch.Tensor:
        return self._late(hidden, hidden + self.vector, positions)  # a shift of the sum is a shift of either part


class VllmTokenSnap(VllmHooks, TokenSnap):
    def bind(self, model: nn.Module) -> None:
        """At TP > 1 each rank holds a slice of the table: bound anyway, refused only if switched on."""
        self._embedding[:] = [input_embedding(model)]

    def _on_stream(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: Any) -> torch.Tensor:
        if residual is None:  # layer 0: ``hidden`` is the embeddings, replaced outright (exact rows)
            return self(hidden, positions)
        return super()._on_stream(hidden, residual, positions)


VLLM_CLASSES: dict[str, type[Intervention]] = {
    c.kind: c for c in (VllmHiddenProjection, VllmHiddenShift, VllmTokenSnap)
}


def configure_snaps(model: nn.Module, prompt_embeds: bool, tensor_parallel: int) -> None:
    """Switch ``snap`` off where no caller can send embeddings; refuse it where the table is split."""
    for module in model.modules():
        if isinstance(module, TokenSnap):
            module.active = prompt_embeds
            if prompt_embeds and tensor_parallel > 1:
                raise ValueError(
                    "snap (nearest vocabulary row of each prompt embedding) needs the whole embedding table on "
                    f"one rank: serve with --enable-prompt-embeds at --tensor-parallel-size 1 (got {tensor_parallel})"
                )


def install() -> None:
    """Wrap ``BaseModelLoader.create_model`` once per process (idempotent)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from eigenpatch.format.checkpoint import verify_checkpoint
    from eigenpatch.serving.vllm_method import EigenpatchVllmConfig
    from eigenpatch.serving.vllm_steering import attach_request_steering

    original = BaseModelLoader.create_model
    if getattr(original, "_eigenpatch", False):
        return

    def create_model(self: Any, vllm_config: Any, model_config: Any, prefix: str = "") -> nn.Module:
        quant = vllm_config.quant_config
        if isinstance(quant, EigenpatchVllmConfig) and Path(str(model_config.model)).is_dir():
            verify_checkpoint(model_config.model)  # refuse missing / misshapen / non-finite factors
        model = original(self, vllm_config, model_config, prefix=prefix)
        if isinstance(quant, EigenpatchVllmConfig) and quant.interventions:
            build_interventions(model, quant.interventions, VLLM_CLASSES)
            tp = vllm_config.parallel_config.tensor_parallel_size
            configure_snaps(model, bool(getattr(model_config, "enable_prompt_embeds", False)), tp)
        attach_request_steering(model, vllm_config)  # per-request vectors of `serve --steer`, if any
        return model

    create_model._eigenpatch = True  # type: ignore[attr-defined]
    BaseModelLoader.create_model = create_model  # type: ignore[method-assign]
