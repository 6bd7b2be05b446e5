"""Low-rank compression inside the layer-by-layer engine: the path that runs out of core.

The engine (:mod:`eigenpatch.engine`) owns the passes; this transform hooks into them, so the same
code compresses a model held in memory and one whose layers are read from its shards one at a
time. The allocation stays global:

1. *Scores* (the engine's Fisher and scoring passes). ``loss`` ranks read each matrix's output
   Fisher and its dense input Gram on all calibration windows, and keep only the scaled spectrum;
   ``welore`` reads the weights alone.
2. *Plan*: ranks from all spectra at once, as in the one-shot path; the ranks and the output scales
   are what a resumed run restores.
3. *Fit*: per layer, factor pairs on propagated inputs (:mod:`.propagate`) for whitening
   factorizers, or plain truncated SVDs for the data-free ``svd``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from eigenpatch.engine import Calibration, LayerStats, LayerStep, LayerTransform, Needs, Plan, layer_prefixes
from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.patchers.lowrank.config import LowRank
from eigenpatch.patchers.lowrank.factorize import factorize, output_weighting, scaled_spectrum, whitening
from eigenpatch.patchers.lowrank.propagate import factorize_layer, refine_layer
from eigenpatch.patchers.lowrank.ranks import ALLOCATORS, Ranks, rank_details
from eigenpatch.patchers.targets import find_linears, replace_module
from eigenpatch.recipe import PatchContext


class LowRankLayers(LayerTransform):
    """``LowRank`` as the engine runs it (see the module docstring)."""

    def __init__(self, model: nn.Module, config: LowRank, context: PatchContext) -> None:
        self.model, self.config, self.context = model, config, context
        self.name = f"{config.allocator}+{config.factorizer}" if config.name == "lowrank" else config.name
        self.shapes = {n: tuple(lin.weight.shape) for n, lin in find_linears(model, config.targets).items()}
        prefixes = layer_prefixes(model)
        self.inside: dict[int, list[str]] = defaultdict(list)
        self.outside: list[str] = []
        for name in self.shapes:
            index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
            if index is None:
                self.outside.append(name)
            else:
                self.inside[index].append(name.removeprefix(prefixes[index]))
        self.kind = ALLOCATORS[config.allocator][1]  # what the allocator scores: None, "raw" (weights) or "loss"
        self.spectra: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.ranks: Ranks | None = None
        # Scores reused across patches of one base model that share a context cache (benchmarks).
        c = config
        self._cache_key = ("lowrank-layers", c.allocator, c.factorizer, c.calib_windows, c.calib_seq_len)
        self._cache_key += (c.fisher_windows, c.seed, *sorted(self.shapes))
        if self._cache_key in context.cache:
            self.spectra, self.scales = context.cache[self._cache_key]
            self.ranks = self._allocate()

    @property
    def fitted_on_streams(self) -> bool:
        return self.config.propagates

    def needs(self) -> Needs:
        c = self.config
        calibration = Calibration(c.calib_windows, c.calib_seq_len, c.seed) if c.needs_data else None
        fisher = self.kind == "loss" or c.factorizer == "fwhiten"
        return Needs(
            calibration=calibration,
            output_fisher=dict(self.inside) if fisher else {},
            fisher_windows=c.fisher_windows,
            dense_grams=dict(self.inside) if self.kind == "loss" else {},
            # ``loss`` spectra read input Grams on all windows: on the Fisher's 32 only (scored inside
            # its pass, 3 min faster) README command 1 lost 11-13 % perplexity (docs/compression.md).
            # Without them the score step reads the Fisher alone, inside its pass.
            score_windows=None if self.kind == "loss" else c.fisher_windows,
            scores=self.kind is not None or fisher,  # fwhiten's output scales come from the Fisher
        )

    @property
    def planned(self) -> bool:
        return self.ranks is not None

    def score(self, step: LayerStep, stats: LayerStats) -> None:
        for name, fisher in stats.fisher.items():
            if name.startswith(step.prefix) and name.removeprefix(step.prefix) in self.inside.get(step.index, ()):
                self.scales[name] = output_weighting(fisher)
        if self.kind is None:
            return  # uniform ranks read no spectrum
        roots: dict[str, Any] = {}  # one eigendecomposition per shared input
        for name in self.inside.get(step.index, []):
            full = step.prefix + name
            weight = step.layer.get_submodule(name).weight
            if self.kind == "loss":
                leader = stats.leader[name]
                if leader not in roots:
                    roots[leader] = whitening(stats.gram(name))
                self.spectra[full] = scaled_spectrum(weight, roots[leader], self.scales[full])
            else:
                self.spectra[full] = scaled_spectrum(weight)

    def _allocate(self) -> Ranks:
        if self.kind == "raw":
            for name in self.outside:
                self.spectra.setdefault(name, scaled_spectrum(self.model.get_submodule(name).weight))
        c = self.config
        return ALLOCATORS[c.allocator][0](self.shapes, c.ratio, self.spectra, c.rank_multiple)

    def plan(self) -> Plan:
        if self.ranks is None:
            self.context.cache[self._cache_key] = (self.spectra, self.scales)
            self.ranks = self._allocate()
        if self.fitted_on_streams and any(self.ranks[n] for n in self.outside):
            raise UsageError(f"{self.outside[0]} is not inside a decoder layer; compress it with sequential=False")
        for name in self.outside:  # data-free pairs of matrices outside the layers: fitted here, once
            if self.ranks[name] is not None:
                self._replace(self.model, name, self.ranks[name])
        return Plan({"ranks": self.ranks}, dict(self.scales))

    def restore(self, plan: Plan) -> None:
        self.ranks, self.scales = plan.meta["ranks"], plan.tensors

    def _replace(self, root: nn.Module, name: str, rank: int) -> None:
        linear: nn.Linear = root.get_submodule(name)
        up, down = factorize(linear.weight, rank)
        replace_module(root, name, LowRankLinear.from_factors(up, down, linear.bias))

    def fit(self, step: LayerStep) -> dict[str, float] | None:
        assert self.ranks is not None
        mine = {n: self.ranks[step.prefix + n] for n in self.inside.get(step.index, [])}
        mine = {n: r for n, r in mine.items() if r}
        if not self.fitted_on_streams:
            for name, rank in mine.items():
                self._replace(step.layer, name, rank)
            return None
        fwhiten = self.config.factorizer == "fwhiten"
        out = {n: self.scales[step.prefix + n] if fwhiten else None for n in mine}
        factorize_layer(step, mine, out, self.config.damp)
        if self.config.refine_steps and mine:
            return refine_layer(step, self.config.refine_steps, self.config.refine_lr)
        return None

    def details(self, records: list[Any]) -> dict[str, Any]:
        assert self.ranks is not None
        out = rank_details(self.shapes, self.ranks)
        if self.fitted_on_streams:
            out["layer_by_layer"] = {"refined": [r for r in records if r is not None]}
        return out
