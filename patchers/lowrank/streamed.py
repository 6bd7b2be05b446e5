"""Low-rank compression one decoder layer at a time: the path that runs out of core.

Every pass goes through a :class:`~eigenpatch.sequential.LayerSource`, so the same code compresses
a model held in memory and one whose layers are read from its shards one at a time
(:mod:`eigenpatch.lazy`). The allocation stays global:

1. *Scores.* For ``loss`` ranks the output Fisher is streamed backward through the layers
   (:mod:`eigenpatch.layer_fisher`); a read-only pass over the dense stream then gives each
   matrix's input covariance and its scaled spectrum, and only the spectra are kept. ``welore``
   needs the weights alone.
2. *Ranks* from all spectra at once, as in the one-shot path.
3. *Factor pairs*: layer by layer on propagated inputs (:mod:`.propagate`) for whitening
   factorizers, or plain truncated SVDs for the data-free ``svd``, each layer written out as
   soon as it is final.

The plan (ranks and output scales) and the engine's streams are checkpointed in the run's state
folder, so a killed run resumes after its last finished layer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.calibration import calibration_windows
from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.layer_fisher import stream_output_fisher
from eigenpatch.memory import release_freed_memory
from eigenpatch.patchers.lowrank.config import LowRank
from eigenpatch.patchers.lowrank.factorize import factorize, output_weighting, scaled_spectrum, whitening
from eigenpatch.patchers.lowrank.propagate import factorize_layer, input_groups, refine_layer
from eigenpatch.patchers.lowrank.ranks import ALLOCATORS, Ranks
from eigenpatch.patchers.targets import replace_module
from eigenpatch.recipe import PatchContext
from eigenpatch.sequential import LayerSource, LayerStep, Resume, layer_prefix, layer_source, run_layers


@dataclass
class LayerNames:
    """The targeted Linears grouped by decoder layer (names relative to it), and those outside any layer."""

    prefixes: list[str]
    inside: dict[int, list[str]]
    outside: list[str]

    @classmethod
    def of(cls, model: nn.Module, source: LayerSource, names: list[str]) -> LayerNames:
        prefixes = [layer_prefix(model, i) for i in range(len(source))]
        inside: dict[int, list[str]] = defaultdict(list)
        outside = []
        for name in names:
            index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
            if index is None:
                outside.append(name)
            else:
                inside[index].append(name.removeprefix(prefixes[index]))
        return cls(prefixes, dict(inside), outside)


def _windows(config: LowRank, context: PatchContext) -> torch.Tensor:
    if context.calib_text is None or context.tokenizer is None:
        raise UsageError(f"--method {config.allocator}+{config.factorizer} needs calibration text and a tokenizer")
    c = config
    return calibration_windows(context.tokenizer, context.calib_text, c.calib_windows, c.calib_seq_len, c.seed)


def _fingerprint(config: LowRank, windows: torch.Tensor | None) -> str:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    if windows is not None:
        digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:16]


class Plan:
    """Ranks and output scales of a run, kept in its state folder so a resumed run skips the scoring passes."""

    def __init__(self, folder: Path | None, key: str) -> None:
        self.folder, self.key = folder, key

    def load(self) -> tuple[Ranks, dict[str, torch.Tensor]] | None:
        if self.folder is None or not (self.folder / "plan.json").is_file():
            return None
        plan = json.loads((self.folder / "plan.json").read_text())
        if plan.get("key") != self.key:
            return None
        scales = self.folder / "output_scales.safetensors"
        return plan["ranks"], load_file(str(scales)) if scales.is_file() else {}

    def save(self, ranks: Ranks, scales: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if scales:
            save_file({k: v.contiguous() for k, v in scales.items()}, str(self.folder / "output_scales.safetensors"))
        (self.folder / "plan.json").write_text(json.dumps({"key": self.key, "ranks": ranks}))


def _scores(
    model: nn.Module,
    source: LayerSource,
    names: LayerNames,
    config: LowRank,
    windows: torch.Tensor,
    context: PatchContext,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(spectra, output scales)``: what the allocator and the ``fwhiten`` factorizer read, streamed."""
    kind = ALLOCATORS[config.allocator][1]
    scales: dict[str, torch.Tensor] = {}
    if kind == "loss" or config.factorizer == "fwhiten":
        fisher = stream_output_fisher(
            model,
            names.inside,
            windows[: config.fisher_windows],
            source=source,
            scratch=context.state_dir,
            show_progress=context.show_progress,
        )
        scales = {n: output_weighting(f) for n, f in fisher.items()}
    spectra: dict[str, torch.Tensor] = {}
    if kind == "loss":

        def visit(step: LayerStep) -> None:
            groups = input_groups(step, names.inside.get(step.index, []))
            grams: dict[str, torch.Tensor] = {}

            def add(name: str, x: torch.Tensor) -> None:
                flat = x.reshape(-1, x.shape[-1]).float()
                g = (flat.T @ flat).double()  # fp32 product per batch, fp64 sum
                grams[name] = grams[name] + g if name in grams else g

            step.dense_pass({g[0]: lambda x, n=g[0]: add(n, x) for g in groups})  # its outputs: the next stream
            for group in groups:
                scaling = whitening(grams.pop(group[0]))
                for name in group:
                    full = step.prefix + name
                    spectra[full] = scaled_spectrum(step.layer.get_submodule(name).weight, scaling, scales[full])

        run_layers(
            model, windows, visit, source=source, propagate=False, show_progress=context.show_progress, desc="spectra"
        )
    elif kind is not None:
        spectra = _weight_spectra(model, source, names, context)
    return spectra, scales


def _cached_scores(
    model: nn.Module,
    source: LayerSource,
    names: LayerNames,
    config: LowRank,
    windows: torch.Tensor | None,
    context: PatchContext,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`_scores`, reused across patches of one base model that share a context cache (benchmarks)."""
    c = config
    key = ("lowrank-streamed", c.allocator, c.factorizer, c.calib_windows, c.calib_seq_len, c.fisher_windows, c.seed)
    key += tuple(names.outside) + tuple((i, *n) for i, n in sorted(names.inside.items()))
    if key not in context.cache:
        if windows is not None:
            context.cache[key] = _scores(model, source, names, config, windows, context)
        else:
            data_free = _weight_spectra(model, source, names, context) if ALLOCATORS[c.allocator][1] else {}
            context.cache[key] = (data_free, {})
    return context.cache[key]


def _weight_spectra(
    model: nn.Module, source: LayerSource, names: LayerNames, context: PatchContext
) -> dict[str, torch.Tensor]:
    spectra = {n: scaled_spectrum(model.get_submodule(n).weight) for n in names.outside}
    for i in tqdm(range(len(source)), desc="spectra", unit="layer", disable=not context.show_progress):
        layer = source.load(i)
        for name in names.inside.get(i, []):
            spectra[names.prefixes[i] + name] = scaled_spectrum(layer.get_submodule(name).weight)
        source.drop(i)
    return spectra


def compress_by_layer(
    model: nn.Module, config: LowRank, context: PatchContext, shapes: dict[str, tuple[int, int]]
) -> tuple[Ranks, dict[str, Any]]:
    """Ranks and details of a layer-by-layer compression of ``model`` through ``context.layers``."""
    source = layer_source(model, context.layers)
    names = LayerNames.of(model, source, list(shapes))
    windows = _windows(config, context) if config.needs_data else None
    release_freed_memory()  # tokenizing the whole calibration text peaks at ~0.4 GB (SmolLM2, wiki)
    key = _fingerprint(config, windows)
    state = context.state_dir / config.name if context.state_dir is not None else None
    plan = Plan(state, key)
    saved = plan.load()
    if saved is not None:
        ranks, scales = saved
    else:
        spectra, scales = _cached_scores(model, source, names, config, windows, context)
        ranks = ALLOCATORS[config.allocator][0](shapes, config.ratio, spectra)
        plan.save(ranks, scales)
    if config.propagates:
        if names.outside and any(ranks[n] for n in names.outside):
            raise UsageError(f"{names.outside[0]} is not inside a decoder layer; compress it with sequential=False")
        return ranks, _fit_sequentially(model, source, ranks, scales, windows, config, context, state, key)
    seconds = _factorize_each_layer(model, source, names, ranks, context)
    return ranks, {"layer_by_layer": {"layer_seconds": [round(t, 2) for t in seconds]}}


def _fit_sequentially(
    model: nn.Module,
    source: LayerSource,
    ranks: Ranks,
    scales: dict[str, torch.Tensor],
    windows: torch.Tensor,
    config: LowRank,
    context: PatchContext,
    state: Path | None,
    key: str,
) -> dict[str, Any]:
    """Factor pairs fitted layer by layer on propagated inputs (:mod:`.propagate`), at the global ranks."""

    def visit(step: LayerStep) -> dict[str, float] | None:
        mine = {n.removeprefix(step.prefix): r for n, r in ranks.items() if n.startswith(step.prefix) and r}
        out = {n: scales[step.prefix + n] if config.factorizer == "fwhiten" else None for n in mine}
        factorize_layer(step, mine, out, config.damp)
        if config.refine_steps and mine:
            return refine_layer(step, config.refine_steps, config.refine_lr)
        return None

    resume = Resume(state / "engine", key) if state is not None else None
    report = run_layers(
        model, windows, visit, source=source, resume=resume, show_progress=context.show_progress, desc=config.factorizer
    )
    return {"layer_by_layer": {**report.as_dict(), "refined": [r for r in report.records if r is not None]}}


def _factorize_each_layer(
    model: nn.Module, source: LayerSource, names: LayerNames, ranks: Ranks, context: PatchContext
) -> list[float]:
    """Data-free factor pairs (truncated SVD of each weight), one layer at a time; seconds per layer."""

    def replace(module_name: str, linear: nn.Linear, rank: int | None) -> None:
        if rank is not None:
            up, down = factorize(linear.weight, rank)
            replace_module(model, module_name, LowRankLinear.from_factors(up, down, linear.bias))

    for name in names.outside:
        replace(name, model.get_submodule(name), ranks[name])
    seconds = []
    for i in tqdm(range(len(source)), desc="svd", unit="layer", disable=not context.show_progress):
        start = time.perf_counter()
        layer = source.load(i)
        for name in names.inside.get(i, []):
            full = names.prefixes[i] + name
            replace(full, layer.get_submodule(name), ranks[full])
        source.done(i)
        seconds.append(time.perf_counter() - start)
    return seconds
