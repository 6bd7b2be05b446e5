"""Quantization inside the layer-by-layer engine: GPTQ on the propagated inputs, or plain rounding.

The engine (:mod:`eigenpatch.engine`) hands each decoder layer over once, between its two
streams. GPTQ rounds each Linear against the Gram of the inputs it sees in the *propagated*
stream, the one the layers before it (already quantized) produce, so each layer's rounding also
absorbs what the earlier layers' rounding changed; llm-compressor's sequential GPTQ does the
same. Within a layer the Linears are taken in the order they run, grouped by shared input
(q/k/v, then o, then gate/up, then down): o_proj is rounded on what the quantized q/k/v give it.
Linears that share an input share one Gram. ``rtn`` needs no data, so the fit pass then carries
no streams at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eigenpatch.engine import Calibration, Gram, LayerStep, LayerTransform, Needs, input_groups, layer_prefixes
from eigenpatch.errors import UsageError
from eigenpatch.format.quantized import QuantizedLinear
from eigenpatch.patchers.quantize.config import Quantize
from eigenpatch.patchers.targets import find_linears, replace_module
from eigenpatch.quantizer import BlockQuant, quantize_gptq, quantize_rtn
from eigenpatch.recipe import PatchContext

#: What a dense weight costs in the reference deployment dtype, per value (bytes are reported against bf16).
BF16_BYTES = 2


class QuantizeLayers(LayerTransform):
    """``Quantize`` as the engine runs it (see the module docstring)."""

    def __init__(self, model: nn.Module, config: Quantize, context: PatchContext) -> None:
        self.config, self.context = config, context
        self.name = f"{config.method} int{config.bits}"
        if any(isinstance(m, QuantizedLinear) for m in model.modules()):
            raise UsageError("this checkpoint is already quantized; quantize the unquantized model instead")
        prefixes = layer_prefixes(model)
        self.inside: dict[int, list[str]] = {}
        for name in find_linears(model, config.targets):
            index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
            if index is not None:
                self.inside.setdefault(index, []).append(name.removeprefix(prefixes[index]))

    def needs(self) -> Needs:
        c = self.config
        return Needs(calibration=Calibration(c.calib_windows, c.calib_seq_len, c.seed) if c.needs_data else None)

    def _round(self, weight: torch.Tensor, gram: torch.Tensor | None) -> BlockQuant:
        c = self.config
        grid = {"fp16_scales": True, "symmetric": c.symmetric}
        if gram is None:
            return quantize_rtn(weight, c.bits, c.group, **grid)
        return quantize_gptq(weight, gram, c.bits, c.group, act_order=c.act_order, **grid)

    def fit(self, step: LayerStep) -> dict[str, Any] | None:
        names = self.inside.get(step.index, [])
        for name in names:
            module = step.layer.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise UsageError(
                    f"{step.prefix}{name} is a {type(module).__name__}, not a dense Linear: quantizing factor "
                    "pairs (--compress with --bits) is not supported yet"
                )
        if not names:
            return None
        groups = input_groups(step, names) if self.config.needs_data else [[n] for n in names]
        before = after = 0
        for group in groups:
            gram = None
            if self.config.needs_data:
                acc = Gram()
                for x in step.module_inputs(group[0]):
                    acc.add(x)
                gram = acc.value
            for name in group:
                linear: nn.Linear = step.layer.get_submodule(name)
                bias = None if linear.bias is None else linear.bias.detach()
                quantized = self._round(linear.weight, gram).module(bias).to(linear.weight.device)
                replace_module(step.layer, name, quantized)
                before += linear.weight.numel() * BF16_BYTES
                after += quantized.stored_bytes()
        return {"matrices": len(names), "bf16_bytes": before, "bytes": after}

    def details(self, records: list[Any]) -> dict[str, Any]:
        done = [r for r in records if r]
        c = self.config
        return {
            "bits": c.bits,
            "group": c.group,
            "method": c.method,
            "quantized": sum(r["matrices"] for r in done),
            "bf16_bytes_before": sum(r["bf16_bytes"] for r in done),
            "bytes_after": sum(r["bytes"] for r in done),
        }
