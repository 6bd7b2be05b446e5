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

Under ``--budget`` a unit may instead be replaced by quantized factor pairs (:mod:`.budget`, low-rank
replacement): each Linear is factorized by ``fwhiten`` (the ``C W R`` SVD of ``--compress``) on the
propagated Gram at the option's rank, and the pair is rounded like one of ``--compress``'s.
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
from eigenpatch.format.corrected import CorrectedQuantizedLinear, float_factors
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.format.quantized import QuantizedLinear, QuantizedLowRankLinear, quantized_bytes, widening_bytes
from eigenpatch.patchers.lowrank.factorize import factorize, output_weighting, whitening
from eigenpatch.patchers.quantize.budget import (
    Option,
    Unit,
    allocate,
    describe,
    pair_rank,
    rank_losses,
    residual_energies,
)
from eigenpatch.patchers.quantize.config import Quantize
from eigenpatch.patchers.quantize.correct import DAMP, correction
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
        # --budget: the ladder, the units scored so far, and the option each Linear got (full names)
        self.ladder = config.budget_options() if config.budget is not None else []
        self.units: list[Unit] = []
        self.options: dict[str, Option] = {}
        self.plan_summary: dict[str, Any] = {}
        if config.budget is not None:
            self.name = f"{config.method} budget {config.budget:g} bits"
            self._check_budget(model, prefixes)
            # Scores reused by budgets of one base model that share a context cache (the benchmarks).
            c = config
            ladder = (c.budget_widths, c.budget_ranks, c.correction_bits, c.budget_pairs)
            scoring = (c.method, c.symmetric, c.act_order, ladder, c.correction_targets)
            data = (c.calib_windows, c.calib_seq_len, c.fisher_windows, c.seed, sorted(self.inside.items()))
            self._cache_key = repr(("quantize-budget", scoring, data))
            if self._cache_key in context.cache:
                self.units, self.out_scales = context.cache[self._cache_key]
                self._allocate()
                self._restored = True

    def _check_budget(self, model: nn.Module, prefixes: list[str]) -> None:
        """One line, before any pass, for a budget below what the cheapest option of every matrix costs."""
        c, weights, cheapest = self.config, 0, 0
        for index, names in self.inside.items():
            for name in names:
                module = model.get_submodule(prefixes[index] + name)
                if isinstance(module, LowRankLinear):
                    raise UsageError("--budget with --compress: choose one (--compress R --bits N quantizes pairs)")
                out, inp = module.weight.shape
                weights += out * inp
                cheapest += min(quantized_bytes(out, inp, o.bits, o.group) for o in self.ladder if not o.pair)
        if weights and 8 * cheapest / weights > c.budget:
            raise UsageError(
                f"--budget {c.budget:g}: the cheapest option of every matrix already costs "
                f"{8 * cheapest / weights:.2f} bits per weight (codes, scales and zero points); ask for more, "
                "or add a cheaper width to --budget-widths"
            )

    def needs(self) -> Needs:
        c = self.config
        return Needs(
            calibration=Calibration(c.calib_windows, c.calib_seq_len, c.seed) if c.needs_data else None,
            output_fisher=dict(self.inside) if c.needs_fisher else {},
            fisher_windows=c.fisher_windows if c.needs_fisher else 0,
            dense_grams=dict(self.inside) if c.budget is not None else {},
            score_windows=c.fisher_windows,  # the Grams on the Fisher's windows: scored inside its pass
            scores=c.needs_fisher,
        )

    @property
    def planned(self) -> bool:
        return self._restored

    def plan(self) -> Plan:
        """The output Fisher's weights and, with a budget, each Linear's option: kept in the run state,
        so a resumed run skips the Fisher and scoring passes."""
        meta: dict[str, Any] = {"correction_rank": self.config.correction_rank}
        if self.config.budget is not None and not self._restored:
            self.context.cache[self._cache_key] = (self.units, self.out_scales)
            self._allocate()
        if self.options:
            meta["options"] = {n: [o.bits, o.group, o.rank, o.factor_bits, o.pair] for n, o in self.options.items()}
            meta["budget"] = self.plan_summary
        return Plan(meta, dict(self.out_scales))

    def _allocate(self) -> None:
        """Each Linear's option from the scored units (``budget.py``)."""
        weights = sum(u.weights() for u in self.units)
        allocation = allocate(self.units, self.config.budget * weights / 8)
        for unit, option in zip(self.units, allocation.choice, strict=True):
            self.options.update(dict.fromkeys(unit.names, option))
        self.plan_summary = describe(self.units, allocation)

    def restore(self, plan: Plan) -> None:
        self.out_scales, self._restored = dict(plan.tensors), True
        self.options = {n: Option(*o) for n, o in plan.meta.get("options", {}).items()}
        self.plan_summary = plan.meta.get("budget", {})

    def score(self, step: LayerStep, stats: LayerStats) -> None:
        mine = self.inside.get(step.index, [])
        for name, fisher in stats.fisher.items():
            if name.startswith(step.prefix) and name.removeprefix(step.prefix) in mine:
                self.out_scales[name] = output_weighting(fisher)
        if self.config.budget is None:
            return
        members: dict[str, list[str]] = {}
        for name in mine:
            members.setdefault(stats.leader[name], []).append(name)
        for leader, names in members.items():
            self.units.append(self._score_unit(step, names, stats.gram(leader)))

    def _score_unit(self, step: LayerStep, names: list[str], gram: torch.Tensor) -> Unit:
        """Every ladder option's estimated loss for one unit (``budget.py``): one rounding per width,
        one built pair per replacement worth building."""
        c = self.config
        scaling = whitening(_damped(gram))
        full = [step.prefix + n for n in names]
        weights = [step.layer.get_submodule(n).weight.detach().float() for n in names]
        unit = Unit(full, [tuple(w.shape) for w in weights], [c.corrects(n) for n in names])
        ladder = [o for o in self.ladder if not o.pair]
        ranks = tuple(sorted({o.rank for o in ladder}))
        for bits, group in sorted({(o.bits, o.group) for o in ladder}):
            per_rank = dict.fromkeys(ranks, 0.0)
            for name, w, takes in zip(full, weights, unit.corrected, strict=True):
                dequantized = torch.from_numpy(self._round(w, gram, bits, group).dequantize())
                energies = residual_energies(w, dequantized, scaling.scale, self.out_scales.get(name))
                losses = rank_losses(energies, (0, *ranks))
                for k in ranks:
                    per_rank[k] += losses[k if takes else 0]
            for option in ladder:
                if (option.bits, option.group) == (bits, group):
                    unit.losses[option] = per_rank[option.rank]
        self._score_pairs(unit, weights, gram, scaling)
        return unit

    def _score_pairs(self, unit: Unit, weights: list[torch.Tensor], gram: torch.Tensor, scaling: Any) -> None:
        """The replacement options' losses, measured on built pairs, where worth building: a pair's loss
        is at least its truncation's, ``1/2 sum_{i > r} s_i^2`` of ``C W R`` (any rank-``r`` matrix
        leaves that much), so a pair whose truncation alone loses more than the unit's cheapest width
        is left out, unbuilt: it could only save a fraction of a bit at a loss int2 codes beat."""
        pairs = [o for o in self.ladder if o.pair]
        if not pairs:
            return
        cheapest = min(unit.losses, key=lambda o: (o.bytes(unit.shapes, unit.corrected), unit.losses[o]))
        floor = unit.losses[cheapest]  # the cheapest width's loss
        spectra = [  # of C W R: what a rank-r truncation leaves is the sum beyond r
            residual_energies(w, torch.zeros_like(w), scaling.scale, self.out_scales.get(n))
            for n, w in zip(unit.names, weights, strict=True)
        ]
        for option in pairs:
            ranks = [pair_rank(*w.shape, option.pair, option.group) for w in weights]
            if not all(ranks):
                continue  # a Linear narrower than one group: no pair
            bound = sum(rank_losses(s, (r,))[r] for s, r in zip(spectra, ranks, strict=True))
            if bound >= floor:
                continue
            unit.losses[option] = 0.0
            for name, w in zip(unit.names, weights, strict=True):
                pair = self._replace(w, gram, None, option, self.out_scales.get(name), scaling)
                energies = residual_energies(w, pair.dense_weight(), scaling.scale, self.out_scales.get(name))
                unit.losses[option] += 0.5 * float(energies.sum())

    def _round(self, weight: torch.Tensor, gram: torch.Tensor | None, bits: int, group: int) -> BlockQuant:
        c = self.config
        grid = {"fp16_scales": True, "symmetric": c.symmetric}
        if gram is None or c.method == "rtn":
            return quantize_rtn(weight, bits, group, **grid)
        return quantize_gptq(weight, gram, bits, group, act_order=c.act_order, **grid)

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
        before = after = widened = 0
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
                widened += quantized.stored_bytes() + widening_bytes(quantized)
        record: dict[str, Any] = {
            "matrices": len(names),
            "bf16_bytes": before,
            "bytes": after,
            "kernel_width_bytes": widened,
        }
        if self.config.refine_steps and self.config.needs_data:
            record["refine"] = self._refine(step)
        return record

    def _refine(self, step: LayerStep) -> dict[str, float] | None:
        """Block-local refinement of the layer's corrections and, with ``refine_scales``, of its
        quantized Linears' scales (codes and zero points fixed): in fp32, then stored back (the
        corrections at ``correction_bits``, the scales in fp16)."""
        scales = []
        if self.config.refine_scales:
            scales = [m.scales for m in step.layer.modules() if isinstance(m, QuantizedLinear)]
        with float_factors(step.layer) as corrected:
            params = [p for m in corrected for p in (m.correction_down, m.correction_up)]
            if not params and not scales:
                return None
            for p in scales:
                p.data = p.data.float()
            try:
                return refine_parameters(step, params, self.config.refine_steps, self.config.refine_lr, scaled=scales)
            finally:
                for p in scales:
                    p.data = p.data.to(torch.float16)

    def _round_dense(
        self, weight: torch.Tensor, gram: torch.Tensor | None, bias: torch.Tensor | None, full_name: str
    ) -> nn.Module:
        """A dense Linear's codes, and with ``correction_rank`` its correction (:mod:`.correct`)."""
        c = self.config
        option = self.options.get(full_name, Option(c.bits, c.group, c.correction_rank, c.correction_bits))
        if option.pair:
            return self._replace(weight, gram, bias, option, self.out_scales.get(full_name))
        rounded = self._round(weight, gram, option.bits, option.group)
        rank = option.rank if c.corrects(full_name) else 0
        if not rank:
            return rounded.module(bias)
        error = weight.detach().float() - torch.from_numpy(rounded.dequantize())
        up, down = correction(error, rank, gram, self.out_scales.get(full_name))
        return CorrectedQuantizedLinear.from_parts(rounded.module(), up, down, bias, option.factor_bits)

    def _round_pair(
        self, pair: LowRankLinear, gram: torch.Tensor | None, bias: torch.Tensor | None, refit: bool = True
    ) -> QuantizedLowRankLinear:
        """Both factors of a pair, ``up`` refitted to the rounded ``down`` (see the module docstring;
        ``refit=False`` rounds ``up`` as it is, for the test that measures what the refit gains)."""
        return self._round_factors(
            pair.lowrank_down.detach(), pair.lowrank_up.detach(), gram, bias, self.config.bits, self.config.group, refit
        )

    def _replace(
        self,
        weight: torch.Tensor,
        gram: torch.Tensor,
        bias: torch.Tensor | None,
        option: Option,
        out_scale: Any,
        scaling: Any = None,
    ) -> QuantizedLowRankLinear:
        """A dense Linear replaced by a quantized factor pair (``budget.py``, low-rank replacement): the
        ``fwhiten`` factorization at the option's rank, its factors rounded as a pair's are
        (``scaling``: the whitening of ``gram``, when the caller has it)."""
        rank = pair_rank(*weight.shape, option.pair, option.group)
        scaling = scaling if scaling is not None else whitening(_damped(gram))
        up, down = factorize(weight.detach().float(), rank, scaling, out_scale)
        return self._round_factors(down, up, gram, bias, option.bits, option.group)

    def _round_factors(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        gram: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        group: int,
        refit: bool = True,
    ) -> QuantizedLowRankLinear:
        qdown = self._round(down, gram, bits, group)
        if gram is None:
            qup = self._round(up, None, bits, group)
            return QuantizedLowRankLinear.from_factors(qdown.module(), qup.module(), bias)
        g = gram.double()
        d, dq = down.double(), torch.from_numpy(qdown.dequantize()).double()
        gz = dq @ g @ dq.T  # the Gram of what the rounded down gives up
        ridge = REFIT_DAMP * gz.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gz), dtype=gz.dtype)
        target = torch.linalg.solve(gz + ridge, (up.double() @ d @ g @ dq.T).T).T if refit else up
        qup = self._round(target.to(up.dtype), gz.to(gram.dtype), bits, group)
        return QuantizedLowRankLinear.from_factors(qdown.module(), qup.module(), bias)

    def details(self, records: list[Any]) -> dict[str, Any]:
        done = [r for r in records if r]
        c = self.config
        return {
            "bits": c.bits,
            "group": c.group,
            "method": c.method,
            "correction_rank": c.correction_rank,
            "budget": c.budget,
            "plan": self.plan_summary or None,
            "quantized": sum(r["matrices"] for r in done),
            "bf16_bytes_before": sum(r["bf16_bytes"] for r in done),
            "refine_error_ratio": _ratio([r["refine"] for r in done if r.get("refine")]),
            "bytes_after": sum(r["bytes"] for r in done),
            "kernel_width_bytes_after": sum(r.get("kernel_width_bytes", r["bytes"]) for r in done),
        }


def _ratio(refined: list[dict[str, float]]) -> float | None:
    """Mean over layers of the refined layer's output error over the closed form's (None: no refinement)."""
    if not refined:
        return None
    return round(sum(r["after"] / max(r["before"], 1e-30) for r in refined) / len(refined), 4)


def _damped(gram: torch.Tensor) -> torch.Tensor:
    """``H + lam I`` in fp64, ``lam`` :data:`~.correct.DAMP` of the mean diagonal (whitening's input)."""
    damped = gram.double().clone()
    damped.diagonal().add_(DAMP * damped.diagonal().mean().clamp_min(1e-30))
    return damped
