"""Quantization inside the layer-by-layer engine: GPTQ on the propagated inputs, or plain rounding.

The engine (:mod:`eigenpatch.engine`) hands each decoder layer over once, between its two
streams. GPTQ rounds each Linear against the Gram of the inputs it sees in the *propagated*
stream, the one the layers before it (already quantized) produce, so each layer's rounding also
absorbs what the earlier layers' rounding changed; llm-compressor's sequential GPTQ does the
same. Within a layer the Linears are taken in the order they run, grouped by shared input
(q/k/v, then o, then gate/up, then down): o_proj is rounded on what the quantized q/k/v give it.
Linears that share an input share one Gram. ``rtn`` needs no data, so the fit pass then carries
no streams at all.

A factor pair (``--compress`` before ``--bits``) becomes two quantized factors. ``down`` is rounded
by GPTQ against the pair's input Gram ``G``. Then ``up`` is refitted to what the rounded ``down``
gives it, ``U' = U D G D_q^T (D_q G D_q^T)^-1`` (least squares on ``U D x``, an ``r x r`` solve),
and rounded by GPTQ against ``D_q G D_q^T``, the Gram of its own inputs: so ``up`` absorbs
``down``'s rounding instead of adding its own to it. No second pass over the data is needed.

With ``correction_rank`` each dense Linear also gets a low-rank correction of its rounding error
(:mod:`.correct`), fitted on the same Gram right after it is rounded, so the Linears after it in
the layer are rounded against inputs the corrected Linear gives. Factor pairs get none: their
rank is already where a correction would go.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eigenpatch.engine import (
    Calibration,
    Gram,
    LayerStats,
    LayerStep,
    LayerTransform,
    Needs,
    Plan,
    input_groups,
    layer_prefixes,
    refine_parameters,
)
from eigenpatch.errors import UsageError
from eigenpatch.format.corrected import CORRECTION_DTYPE, CorrectedQuantizedLinear
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.format.quantized import QuantizedLinear, QuantizedLowRankLinear
from eigenpatch.patchers.lowrank.factorize import output_weighting
from eigenpatch.patchers.quantize.config import Quantize
from eigenpatch.patchers.quantize.correct import correction
from eigenpatch.patchers.targets import find_linears, replace_module
from eigenpatch.quantizer import BlockQuant, quantize_gptq, quantize_rtn
from eigenpatch.recipe import PatchContext

#: What a dense weight costs in the reference deployment dtype, per value (bytes are reported against bf16).
BF16_BYTES = 2
#: Ridge of the ``up`` refit's solve, as a fraction of its Gram's mean diagonal.
REFIT_DAMP = 1e-4


class QuantizeLayers(LayerTransform):
    """``Quantize`` as the engine runs it (see the module docstring)."""

    def __init__(self, model: nn.Module, config: Quantize, context: PatchContext) -> None:
        self.config, self.context = config, context
        self.name = f"{config.method} int{config.bits}"
        stored = (QuantizedLinear, QuantizedLowRankLinear, CorrectedQuantizedLinear)
        if any(isinstance(m, stored) for m in model.modules()):
            raise UsageError("this checkpoint is already quantized; quantize the unquantized model instead")
        prefixes = layer_prefixes(model)
        self.inside: dict[int, list[str]] = {}
        for name in find_linears(model, config.targets):
            index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
            if index is not None:
                self.inside.setdefault(index, []).append(name.removeprefix(prefixes[index]))

        self.out_scales: dict[str, torch.Tensor] = {}  # the output Fisher's weights, per full name
        self._restored = False

    def needs(self) -> Needs:
        c = self.config
        return Needs(
            calibration=Calibration(c.calib_windows, c.calib_seq_len, c.seed) if c.needs_data else None,
            output_fisher=dict(self.inside) if c.needs_fisher else {},
            fisher_windows=c.fisher_windows if c.needs_fisher else 0,
            score_windows=c.fisher_windows,
            scores=c.needs_fisher,
        )

    @property
    def planned(self) -> bool:
        return self._restored

    def plan(self) -> Plan:
        """The output Fisher's weights, kept in the run state so a resumed run skips the Fisher pass."""
        return Plan({"correction_rank": self.config.correction_rank}, dict(self.out_scales))

    def restore(self, plan: Plan) -> None:
        self.out_scales, self._restored = dict(plan.tensors), True

    def score(self, step: LayerStep, stats: LayerStats) -> None:
        for name, fisher in stats.fisher.items():
            if name.startswith(step.prefix) and name.removeprefix(step.prefix) in self.inside.get(step.index, ()):
                self.out_scales[name] = output_weighting(fisher)

    def _round(self, weight: torch.Tensor, gram: torch.Tensor | None) -> BlockQuant:
        c = self.config
        grid = {"fp16_scales": True, "symmetric": c.symmetric}
        if gram is None or c.method == "rtn":
            return quantize_rtn(weight, c.bits, c.group, **grid)
        return quantize_gptq(weight, gram, c.bits, c.group, act_order=c.act_order, **grid)

    def fit(self, step: LayerStep) -> dict[str, Any] | None:
        names = self.inside.get(step.index, [])
        for name in names:
            module = step.layer.get_submodule(name)
            if not isinstance(module, (nn.Linear, LowRankLinear)):
                raise UsageError(
                    f"{step.prefix}{name} is a {type(module).__name__}; --bits quantizes dense Linears and "
                    "factor pairs, not structured FFNs"
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
                module = step.layer.get_submodule(name)
                bias = None if module.bias is None else module.bias.detach()
                if isinstance(module, LowRankLinear):
                    quantized: nn.Module = self._round_pair(module, gram, bias)
                    before += (module.lowrank_down.numel() + module.lowrank_up.numel()) * BF16_BYTES
                else:
                    quantized = self._round_dense(module.weight, gram, bias, step.prefix + name)
                    before += module.weight.numel() * BF16_BYTES
                replace_module(step.layer, name, quantized.to(next(module.parameters()).device))
                after += quantized.stored_bytes()
        record: dict[str, Any] = {"matrices": len(names), "bf16_bytes": before, "bytes": after}
        if self.config.refine_steps and self.config.needs_data:
            record["refine"] = self._refine(step)
        return record

    def _refine(self, step: LayerStep) -> dict[str, float] | None:
        """Block-local refinement of the layer's corrections, in fp32, stored back in fp16."""
        corrected = [m for m in step.layer.modules() if isinstance(m, CorrectedQuantizedLinear)]
        if not corrected:
            return None
        params = [p for m in corrected for p in (m.correction_down, m.correction_up)]
        for p in params:
            p.data = p.data.float()
        try:
            return refine_parameters(step, params, self.config.refine_steps, self.config.refine_lr)
        finally:
            for p in params:
                p.data = p.data.to(CORRECTION_DTYPE)

    def _round_dense(
        self, weight: torch.Tensor, gram: torch.Tensor | None, bias: torch.Tensor | None, full_name: str
    ) -> nn.Module:
        """A dense Linear's codes, and with ``correction_rank`` its correction (:mod:`.correct`)."""
        rounded = self._round(weight, gram)
        rank = self.config.correction_rank_of(full_name)
        if not rank:
            return rounded.module(bias)
        error = weight.detach().float() - torch.from_numpy(rounded.dequantize())
        up, down = correction(error, rank, gram, self.out_scales.get(full_name))
        return CorrectedQuantizedLinear.from_parts(rounded.module(), up, down, bias)

    def _round_pair(
        self, pair: LowRankLinear, gram: torch.Tensor | None, bias: torch.Tensor | None, refit: bool = True
    ) -> QuantizedLowRankLinear:
        """Both factors of a pair, ``up`` refitted to the rounded ``down`` (see the module docstring;
        ``refit=False`` rounds ``up`` as it is, for the test that measures what the refit gains)."""
        down, up = pair.lowrank_down.detach(), pair.lowrank_up.detach()
        qdown = self._round(down, gram)
        if gram is None:
            return QuantizedLowRankLinear.from_factors(qdown.module(), self._round(up, None).module(), bias)
        g = gram.double()
        d, dq = down.double(), torch.from_numpy(qdown.dequantize()).double()
        gz = dq @ g @ dq.T  # the Gram of what the rounded down gives up
        ridge = REFIT_DAMP * gz.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gz), dtype=gz.dtype)
        target = torch.linalg.solve(gz + ridge, (up.double() @ d @ g @ dq.T).T).T if refit else up
        qup = self._round(target.to(up.dtype), gz.to(gram.dtype))
        return QuantizedLowRankLinear.from_factors(qdown.module(), qup.module(), bias)

    def details(self, records: list[Any]) -> dict[str, Any]:
        done = [r for r in records if r]
        c = self.config
        return {
            "bits": c.bits,
            "group": c.group,
            "method": c.method,
            "correction_rank": c.correction_rank,
            "quantized": sum(r["matrices"] for r in done),
            "bf16_bytes_before": sum(r["bf16_bytes"] for r in done),
            "refine_error_ratio": _ratio([r["refine"] for r in done if r.get("refine")]),
            "bytes_after": sum(r["bytes"] for r in done),
        }


def _ratio(refined: list[dict[str, float]]) -> float | None:
    """Mean over layers of the refined layer's output error over the closed form's (None: no refinement)."""
    if not refined:
        return None
    return round(sum(r["after"] / max(r["before"], 1e-30) for r in refined) / len(refined), 4)
