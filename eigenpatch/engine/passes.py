"""The engine: the passes over the decoder layers that every layer-by-layer transform shares.

:func:`run_engine` runs a group of :class:`~eigenpatch.engine.transform.LayerTransform` s:

1. **Fisher** (if any transform declared ``output_fisher``): the output Fisher of every declared
   module, walked backward one layer at a time (:mod:`eigenpatch.engine.fisher`);
2. **scores** (if any transform has a score step): the declared input Grams, each shared input
   once, and every transform's score step on them. When every scorer's Grams read the Fisher's
   windows, this happens inside the Fisher's backward walk, in the forward each layer's backward
   step reruns anyway: no pass of its own. Otherwise it is one read-only pass over the dense
   stream, one forward per layer;
3. **plan**: each transform's global step, stored in the run state;
4. **fit**: one pass between the two streams; in each layer, each transform fits in recipe
   order, then both streams advance and the layer is final.

Passes 1–3 are skipped for transforms whose plan is known (an interrupted run's, restored from
the state). Each pass loads each layer once. Every pass's seconds go into the report.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.calibration import calibration_windows
from eigenpatch.engine.fisher import stream_output_fisher
from eigenpatch.engine.memory import release_freed_memory
from eigenpatch.engine.shards import LayerSource, layer_source
from eigenpatch.engine.state import RunState
from eigenpatch.engine.stats import Gram, SharedInputs
from eigenpatch.engine.streams import LayerStep, call_layer, layer_prefix, record_batches, stream_block
from eigenpatch.engine.transform import Calibration, LayerStats, LayerTransform, Needs
from eigenpatch.errors import UsageError

#: Calibration windows per batch as they go through a layer.
BATCH_SIZE = 4


@dataclass
class StreamReport:
    """What a pass over the layers cost and what its visitor recorded per layer."""

    stream_bytes: int = 0
    layer_seconds: list[float] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    resumed_at: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stream_bytes": self.stream_bytes,
            "layer_seconds": [round(s, 2) for s in self.layer_seconds],
        }
        if self.resumed_at is not None:
            out["resumed_at_layer"] = self.resumed_at
        return out


#: A visitor patches (or only reads) ``step.layer``; what it returns is kept in ``StreamReport.records``
#: (JSON-serializable, so a resumed run has the records of the layers it skipped).
Visitor = Callable[[LayerStep], Any]


def run_layers(
    model: nn.Module,
    windows: torch.Tensor | None,
    visit: Visitor,
    *,
    source: LayerSource | None = None,
    propagate: bool = True,
    batch_size: int = BATCH_SIZE,
    state: RunState | None = None,
    show_progress: bool = True,
    desc: str = "layers",
) -> StreamReport:
    """Visit every decoder layer of ``model`` in order, between the dense and the propagated stream.

    Each stream holds ``len(windows) x seq_len x hidden`` values in the model's dtype on its
    device, as one block (:func:`stream_block`) that advances in place, reported as
    ``stream_bytes``: for SmolLM2-135M on 128 x 512 tokens, 2 x 151 MB in fp32. After ``visit``
    patches layer ``i``, the dense stream advances through a frozen copy of it and the propagated
    one through the patched layer, and the source is told it is ``done``. ``windows=None``
    carries no streams (a data-free pass: the visitor reads the weights only).

    ``propagate=False`` is a read-only pass: one (dense) stream, no copy, the visitor must not
    change the layer, and the source drops it. ``state`` (with a source whose finished layers
    persist) checkpoints both streams after each layer and, when it holds an earlier run's, starts
    after that run's last finished layer.
    """
    source = layer_source(model, source)
    if state is not None and not (propagate and source.persistent):
        state = None  # only finished layers on disk make a run resumable
    first, kwargs_of = record_batches(model, windows, batch_size) if windows is not None else ([], [])
    dense_in = stream_block(first) if first else []
    del first
    inputs = stream_block(dense_in) if propagate and dense_in else dense_in
    report = StreamReport(stream_bytes=(1 + propagate) * sum(h.numel() * h.element_size() for h in dense_in))
    start_at = 0
    if state is not None and (saved := state.load_streams(dense_in, inputs)) is not None:
        start_at, report.records, report.layer_seconds = saved
        report.resumed_at = start_at
    bar = tqdm(total=len(source), initial=start_at, desc=desc, unit="layer", disable=not show_progress)
    for i in range(start_at, len(source)):
        start = time.perf_counter()
        layer = source.load(i)
        frozen = copy.deepcopy(layer).requires_grad_(False) if propagate and dense_in else layer
        kwargs = [k[i] for k in kwargs_of]
        step = LayerStep(i, layer_prefix(model, i), layer, frozen, dense_in, inputs, kwargs)
        report.records.append(visit(step))
        if dense_in:
            step.dense_outputs()  # the dense stream advances in place
        if propagate:
            if dense_in:
                for b, kw in enumerate(kwargs):  # in place: one batch's output is the only extra copy
                    inputs[b].copy_(call_layer(layer, inputs[b], kw))
            source.done(i)
        else:
            source.drop(i)
        del frozen, step, layer
        report.layer_seconds.append(time.perf_counter() - start)
        if state is not None:
            state.save_streams(i + 1, dense_in, inputs, report.records, report.layer_seconds)
        bar.update()
    bar.close()
    return report


@dataclass
class EngineRun:
    """What :func:`run_engine` returns: each transform's report details, and the engine's own report."""

    details: list[dict[str, Any]]
    report: dict[str, Any]


def run_engine(
    model: nn.Module,
    transforms: Sequence[LayerTransform],
    *,
    source: LayerSource | None = None,
    tokenizer: Any = None,
    calib_text: str | None = None,
    state: RunState | None = None,
    show_progress: bool = True,
) -> EngineRun:
    """Run ``transforms`` (in recipe order) over ``model``'s decoder layers in shared passes (module docstring)."""
    source = layer_source(model, source)
    calibration = _shared_calibration(transforms)
    windows = None
    if calibration is not None:
        if calib_text is None or tokenizer is None:
            needy = next(t for t in transforms if t.needs().calibration is not None)
            raise UsageError(f"{needy.name} needs calibration text and a tokenizer")
        c = calibration
        windows = calibration_windows(tokenizer, calib_text, c.windows, c.seq_len, c.seed)
        release_freed_memory()  # tokenizing the whole calibration text peaks at ~0.4 GB (SmolLM2, wiki)
    passes = plan_transforms(model, transforms, windows, source=source, state=state, show_progress=show_progress)
    start = time.perf_counter()

    def fit(step: LayerStep) -> list[Any]:
        return [t.fit(step) for t in transforms]

    desc = " + ".join(t.name for t in transforms)
    walked = run_layers(model, windows, fit, source=source, state=state, show_progress=show_progress, desc=desc)
    passes["fit"] = time.perf_counter() - start
    records = walked.records
    details = [t.details([r[k] for r in records]) for k, t in enumerate(transforms)]
    report = {"passes": {k: round(v, 2) for k, v in passes.items()}, **walked.as_dict()}
    return EngineRun(details, report)


def plan_transforms(
    model: nn.Module,
    transforms: Sequence[LayerTransform],
    windows: torch.Tensor | None,
    *,
    source: LayerSource | None = None,
    state: RunState | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Passes 1-3 (module docstring): every transform ends with its plan. Returns each pass's seconds."""
    source = layer_source(model, source)
    if state is not None:
        for i, t in enumerate(transforms):
            if (plan := state.load_plan(i, t.name)) is not None:
                t.restore(plan)
    passes: dict[str, float] = {}
    pending = [(i, t, t.needs()) for i, t in enumerate(transforms) if not t.planned]
    fisher: dict[str, torch.Tensor] = {}
    modules = _union(n.output_fisher for _, _, n in pending)
    scorers = [(t, n) for _, t, n in pending if n.scores]
    n_fisher = max((n.fisher_windows for _, _, n in pending if n.output_fisher), default=0)
    # Scores whose Grams read the Fisher's windows are computed inside its backward walk.
    merged = bool(modules) and bool(scorers) and all(n.score_windows == n_fisher for _, n in scorers)
    if modules:
        assert windows is not None, "the output Fisher needs calibration windows"
        start = time.perf_counter()

        def score(index: int, layer: nn.Module, fisher: dict, grams: dict, leader: dict) -> None:
            step = LayerStep(index, layer_prefix(model, index), layer, layer, [], [], [])
            for t, _ in scorers:
                t.score(step, LayerStats(fisher, grams, leader))

        fisher = stream_output_fisher(
            model,
            modules,
            windows[:n_fisher],
            source=source,
            scratch=state.folder if state is not None else None,
            show_progress=show_progress,
            grams=_union(n.dense_grams for _, n in scorers) if merged else None,
            on_layer=score if merged else None,
        )
        passes["fisher + scores" if merged else "fisher"] = time.perf_counter() - start
    if scorers and not merged:
        start = time.perf_counter()
        if windows is not None and all(n.score_windows is not None for _, n in scorers):
            windows = windows[: max(n.score_windows or 0 for _, n in scorers)]
        _score_pass(model, scorers, fisher, windows, source, show_progress)
        passes["scores"] = time.perf_counter() - start
    for i, t, _ in pending:
        plan = t.plan()
        if state is not None:
            state.save_plan(i, t.name, plan)
    return passes


def _shared_calibration(transforms: Sequence[LayerTransform]) -> Calibration | None:
    """The one set of windows every data-aware transform of the pass fits on."""
    asked = [(t, t.needs().calibration) for t in transforms]
    asked = [(t, c) for t, c in asked if c is not None]
    for t, c in asked[1:]:
        if c != asked[0][1]:
            raise UsageError(
                f"{asked[0][0].name} and {t.name} run in one layer-by-layer pass and share its calibration "
                f"windows, but ask for different ones ({asked[0][1]} vs {c}); give them the same"
            )
    return asked[0][1] if asked else None


def _union(maps: Any) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for m in maps:
        for index, names in m.items():
            out.setdefault(index, [])
            out[index] += [n for n in names if n not in out[index]]
    return out


def _score_pass(
    model: nn.Module,
    scorers: list[tuple[LayerTransform, Needs]],
    fisher: dict[str, torch.Tensor],
    windows: torch.Tensor | None,
    source: LayerSource,
    show_progress: bool,
) -> None:
    """One read-only pass: per layer, one dense forward accumulates every declared input Gram
    (each shared input once), then each scorer reads the layer and its statistics."""
    wanted = _union(n.dense_grams for _, n in scorers)

    def visit(step: LayerStep) -> None:
        grams: dict[str, Gram] = {}
        shared = SharedInputs(wanted.get(step.index, []), lambda leader, x: grams.setdefault(leader, Gram()).add(x))
        if windows is not None and shared.names:
            with shared.watch(step.dense):
                step.dense_outputs()  # its outputs: the next layer's dense stream
        mine = {k: v for k, v in fisher.items() if k.startswith(step.prefix)}
        stats = LayerStats(mine, {k: g.value for k, g in grams.items()}, dict(shared.leader))
        for t, _ in scorers:
            t.score(step, stats)

    run_layers(model, windows, visit, source=source, propagate=False, show_progress=show_progress, desc="scores")
