"""Low-rank compression: any rank allocator x any factorizer, one global parameter ratio.

``--method ALLOCATOR+FACTORIZER`` (e.g. ``loss+whiten``) selects the pair; ``svd`` is
``uniform+svd``. The flow is the same for all: select Linears -> the calibration statistics the
pair needs (gathered once, shared) -> spectra for the allocator -> ranks -> factor pairs.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.calibration import (
    calibration_windows,
    collect_fisher,
    collect_input_covariances,
    collect_output_fisher,
)
from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.patchers.lowrank.config import SVD, LowRank
from eigenpatch.patchers.lowrank.factorize import (
    InputScaling,
    factorize,
    fisher_weighting,
    output_weighting,
    scaled_spectrum,
    whitening,
)
from eigenpatch.patchers.lowrank.ranks import ALLOCATORS, factorized_params
from eigenpatch.patchers.lowrank.streamed import compress_by_layer
from eigenpatch.patchers.targets import find_linears, replace_module
from eigenpatch.recipe import PatchContext, TransformResult, register_transform


class CalibrationStats:
    """Statistics of the unpatched model on calibration windows, each computed on first use.

    One object serves every allocator and factorizer of a run (and, through the context cache,
    every run on the same base model): the whitening of q/k/v is computed once, not three times.
    """

    def __init__(self, model: nn.Module, linears: dict[str, nn.Linear], config: LowRank, context: PatchContext):
        if context.calib_text is None or context.tokenizer is None:
            raise UsageError(f"--method {config.allocator}+{config.factorizer} needs calibration text and a tokenizer")
        self.model, self.linears, self.config, self.context = model, linears, config, context

    @cached_property
    def windows(self) -> torch.Tensor:
        c = self.config
        return calibration_windows(
            self.context.tokenizer, self.context.calib_text, c.calib_windows, c.calib_seq_len, c.seed
        )

    @cached_property
    def whitening(self) -> dict[str, InputScaling]:
        covariances = collect_input_covariances(
            self.model, self.linears, self.windows, show_progress=self.context.show_progress
        )
        missing = sorted(set(self.linears) - set(covariances))
        if missing:
            raise UsageError(f"calibration never reached {missing[0]} (and {len(missing) - 1} more); is it used?")
        roots: dict[int, InputScaling] = {}  # one eigendecomposition per shared input
        return {n: roots.setdefault(id(c), whitening(c.gram)) for n, c in covariances.items()}

    @cached_property
    def input_fisher(self) -> dict[str, InputScaling]:
        windows = self.windows[: self.config.fisher_windows]
        fisher = collect_fisher(self.model, self.linears, windows, show_progress=self.context.show_progress)
        return {n: fisher_weighting(f) for n, f in fisher.items()}

    @cached_property
    def output_scale(self) -> dict[str, torch.Tensor]:
        windows = self.windows[: self.config.fisher_windows]
        fisher = collect_output_fisher(self.model, self.linears, windows, show_progress=self.context.show_progress)
        return {n: output_weighting(f) for n, f in fisher.items()}

    def scalings(self, factorizer: str, name: str) -> tuple[InputScaling | None, torch.Tensor | None]:
        """The factorizer's ``(R, C)`` for one matrix."""
        if factorizer in ("whiten", "fwhiten"):
            return self.whitening[name], self.output_scale[name] if factorizer == "fwhiten" else None
        if factorizer == "fwsvd":
            return self.input_fisher[name], None
        return None, None


def calibration_stats(
    model: nn.Module, linears: dict[str, nn.Linear], config: LowRank, context: PatchContext
) -> CalibrationStats:
    """The run's statistics, reusing what an earlier patch of the same base model computed."""
    c = config
    key = ("lowrank", c.calib_windows, c.calib_seq_len, c.fisher_windows, c.seed, *linears)
    stats = context.cache.get(key)
    if stats is None:
        stats = context.cache[key] = CalibrationStats(model, linears, config, context)
    # Statistics not computed yet must come from *this* (still unpatched) model, not the one an
    # earlier patch already rewrote.
    stats.model, stats.linears, stats.context = model, linears, context
    return stats


@register_transform(LowRank)
def apply_lowrank(model: nn.Module, config: LowRank, context: PatchContext) -> TransformResult:
    linears = find_linears(model, config.targets)
    shapes = {name: tuple(lin.weight.shape) for name, lin in linears.items()}
    if config.streams:  # one layer at a time, in memory or from disk
        # A lazy source materializes these very modules one layer at a time; a reference held here
        # would keep every replaced dense weight alive to the end of the run.
        del linears
        ranks, details = compress_by_layer(model, config, context, shapes)
        return TransformResult(details={**_details(shapes, ranks), **details})
    stats = calibration_stats(model, linears, config, context)
    allocate, spectrum_kind = ALLOCATORS[config.allocator]
    spectra: dict[str, torch.Tensor] = {}
    if spectrum_kind is not None:
        for name, lin in tqdm(linears.items(), desc="spectra", unit="matrix", disable=not context.show_progress):
            if spectrum_kind == "loss":
                spectra[name] = scaled_spectrum(lin.weight, stats.whitening[name], stats.output_scale[name])
            else:
                spectra[name] = scaled_spectrum(lin.weight)
    ranks = allocate(shapes, config.ratio, spectra)
    for name, lin in tqdm(linears.items(), desc=config.factorizer, unit="matrix", disable=not context.show_progress):
        if ranks[name] is None:
            continue
        scaling, out_scale = stats.scalings(config.factorizer, name)
        up, down = factorize(lin.weight, ranks[name], scaling, out_scale)
        replace_module(model, name, LowRankLinear.from_factors(up, down, lin.bias))
    return TransformResult(details=_details(shapes, ranks))


def _details(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> dict[str, Any]:
    return {
        "targeted_params_before": sum(m * n for m, n in shapes.values()),
        "targeted_params_after": factorized_params(shapes, ranks),
        "factorized": sum(r is not None for r in ranks.values()),
        "kept_dense": sum(r is None for r in ranks.values()),
        "ranks": ranks,
    }


@register_transform(SVD)
def apply_svd(model: nn.Module, config: SVD, context: PatchContext) -> TransformResult:
    return apply_lowrank(model, config, context)
