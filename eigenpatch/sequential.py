"""The layer-by-layer engine: run a decoder one layer at a time on calibration windows, in two streams.

A one-shot compressor gathers every layer's input statistics from the dense model, so each layer
is fitted to inputs the compressed model never produces: once the layers before it are
compressed its real inputs differ, and the errors compound with depth. Here the hidden states
are carried from layer to layer in two streams, as llm-compressor's sequential pipeline and
SVD-LLM v2 / AA-SVD do:

- the *dense* stream runs through each layer as it was: it gives the outputs to match;
- the *propagated* stream runs through each layer as it was patched: it gives the inputs the
  patched model really sees at the next layer.

:func:`run_layers` hands each layer to a visitor (a transform's per-layer step) between the two,
as a :class:`LayerStep`; the visitor patches ``step.layer`` in place, and the engine then
advances both streams. The engine knows nothing of what the visitor does.

How the layers are called: the model's own ``forward`` is run once per batch shape with every
decoder layer replaced by a recorder, which keeps the arguments the model passes each layer
(attention masks, rotary embeddings, per-layer-type masks as in Gemma3) and the first layer's
input. No layer computes in that pass, so it costs an embedding lookup. Windows carry no
padding, so every batch of one shape shares its arguments.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.errors import UsageError

#: Families whose base model keeps its decoder layers in ``.layers`` (an ``nn.ModuleList``).
SUPPORTED_FAMILIES = "Llama, Qwen2, Mistral, Gemma3 and other models whose base model lists its decoder layers"


class _Stop(Exception):
    """Raised by a recorder or a capture hook to end a forward pass early."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order; one line naming the architecture when there are none."""
    body = getattr(model, "base_model", model)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        arch = type(model).__name__
        raise UsageError(
            f"{arch} has no decoder-layer list the layer-by-layer engine understands "
            f"(expected {type(body).__name__}.layers); supported: {SUPPORTED_FAMILIES}"
        )
    return layers


def layer_prefix(model: nn.Module, index: int) -> str:
    """``"model.layers.3."``: the dotted name of layer ``index`` in ``model``, with a trailing dot."""
    layer = decoder_layers(model)[index]
    for name, module in model.named_modules():
        if module is layer:
            return name + "."
    raise AssertionError("a decoder layer that is not a submodule of its model")


class LayerSource:
    """Where the decoder layers live while an engine pass works through them.

    A pass calls :meth:`load` before it uses layer ``i`` and then either :meth:`drop` (it only
    read it) or :meth:`done` (it patched it; the layer is final). This base class serves a model
    that is already in memory, so every call is free; :class:`eigenpatch.lazy.CheckpointLayers`
    reads each layer from the safetensors shards and writes it out when it is done, so a pass
    never holds more than one layer. Transforms that go through a source run the same code in
    both cases.
    """

    #: Whether a finished layer survives the process (written to disk), so a run can resume after it.
    persistent = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = decoder_layers(model)

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int) -> nn.Module:
        """Layer ``index``, materialized on the model's device."""
        return self.layers[index]

    def drop(self, index: int) -> None:
        """The pass is done reading layer ``index`` (unchanged)."""

    def done(self, index: int) -> None:
        """Layer ``index`` is patched and final."""


def layer_source(model: nn.Module, source: LayerSource | None) -> LayerSource:
    """``source``, or the in-memory source of ``model``."""
    return source if source is not None else LayerSource(model)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's materialized parameters (a lazy skeleton keeps its layers on meta)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    raise AssertionError("a model without materialized parameters")


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: keeps its call's keyword arguments and passes the input on."""

    def __init__(self, index: int, last: int, sink: dict[int, Any]) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise UsageError("the layer-by-layer engine needs decoder layers called with keyword arguments")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink[self.index] = kwargs
        if self.index == self.last:
            raise _Stop  # the final norm and the head are not needed
        return hidden_states


def _capture_arguments(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The first layer's input for ``batch`` and the keyword arguments the model gives each layer."""
    layers = decoder_layers(model)
    originals = list(layers)
    sink: dict[Any, Any] = {}
    for i in range(len(layers)):
        layers[i] = _Recorder(i, len(layers) - 1, sink)
    try:
        model.base_model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return sink["hidden"], [sink[i] for i in range(len(layers))]


@dataclass
class LayerStep:
    """One decoder layer between the two streams, as a visitor sees it.

    ``layer`` is the model's own layer (patch it in place); ``dense`` is a frozen copy of it as it
    was. ``dense_in`` / ``inputs`` are the layer's inputs in the dense and the propagated stream,
    one ``[batch, seq, hidden]`` tensor per batch; ``kwargs[b]`` are the arguments for batch ``b``.

    The dense outputs are written over the dense inputs (the stream advances in place, one batch
    at a time, so no third stream-sized block is held): read what you need of ``dense_in`` (or
    of :meth:`module_inputs` in the dense stream) before :meth:`dense_outputs`; after it,
    ``dense_in`` raises.
    """

    index: int
    prefix: str
    layer: nn.Module
    dense: nn.Module
    _dense_in: list[torch.Tensor]
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    _dense_out: list[torch.Tensor] | None = None

    @property
    def dense_in(self) -> list[torch.Tensor]:
        if self._dense_out is not None:
            raise RuntimeError("the dense stream has advanced: read dense_in before dense_outputs()/dense_pass()")
        return self._dense_in

    def dense_outputs(self) -> list[torch.Tensor]:
        """The dense layer's outputs on the dense stream (the next layer's dense inputs), computed once."""
        if self._dense_out is None:
            self._dense_out = self._advance()
        return self._dense_out

    def _advance(self) -> list[torch.Tensor]:
        for h, kw in zip(self.dense_in, self.kwargs, strict=True):
            h.copy_(call_layer(self.dense, h, kw))
        return self._dense_in

    def dense_pass(self, observe: dict[str, Callable[[torch.Tensor], None]]) -> list[torch.Tensor]:
        """Run the dense layer once over the dense stream, calling ``observe[name](x)`` with the input
        of each submodule ``name`` as it goes; the outputs become :meth:`dense_outputs`. One forward
        serves every module, where :meth:`module_inputs` runs one (partial) forward per module."""
        handles = [
            self.dense.get_submodule(name).register_forward_pre_hook(lambda _m, args, f=f: f(args[0]))
            for name, f in observe.items()
        ]
        try:
            self._dense_out = self._advance()
        finally:
            for handle in handles:
                handle.remove()
        return self._dense_out

    def module_inputs(self, module: str, which: str = "propagated") -> Iterator[torch.Tensor]:
        """Per batch, the input of submodule ``module`` (a name relative to the layer) in one stream:
        ``"propagated"`` (the patched layer on its inputs) or ``"dense"`` (the frozen copy on the dense
        stream). Each forward stops as soon as the input is seen."""
        layer, hidden = (self.layer, self.inputs) if which == "propagated" else (self.dense, self.dense_in)
        for h, kw in zip(hidden, self.kwargs, strict=True):
            yield capture_input(layer, module, h, kw)

    def paired_inputs(self, module: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, ``(dense input, propagated input)`` of ``module``: the same tokens in both streams."""
        yield from zip(self.module_inputs(module, "dense"), self.module_inputs(module), strict=True)


@torch.no_grad()
def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder layer's output hidden states (transformers 5 returns a tensor; older layers a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def capture_input(layer: nn.Module, module: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The first positional input ``layer.<module>`` receives when ``layer`` runs on ``hidden``."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0])
        raise _Stop

    handle = layer.get_submodule(module).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise UsageError(f"calibration never reached {module} in its decoder layer; is it used?")
    return seen[0]


def record_batches(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Per batch of ``windows``: the first layer's input, and the arguments of every layer
    (``kwargs[batch][layer]``, one shared list per batch shape)."""
    device = model_device(model)
    by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    inputs: list[torch.Tensor] = []
    kwargs_of: list[list[dict[str, Any]]] = []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size].to(device)
            hidden, kwargs = _capture_arguments(model, batch)
            kwargs_of.append(by_shape.setdefault(tuple(batch.shape), kwargs))
            inputs.append(hidden)
    return inputs, kwargs_of


def stream_block(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of ``batches`` as per-batch views of one block.

    A stream is one allocation, not a tensor per batch: glibc maps a block that large on its own
    and unmaps it when it is freed, while batch-sized tensors (a few MB each) come from its heap
    once its self-raising mmap threshold has passed them. There, a stream replaced batch by batch
    between layer-sized temporaries leaves holes that RSS keeps (SmolLM2: +0.4 GB at peak).
    """
    sizes = [len(b) for b in batches]
    first = batches[0]
    block = torch.empty((sum(sizes), *first.shape[1:]), dtype=first.dtype, device=first.device)
    views = list(block.split(sizes))
    for view, b in zip(views, batches, strict=True):
        view.copy_(b)
    return views


@dataclass
class StreamReport:
    """What a layer-by-layer run cost and what its visitor recorded per layer."""

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


@dataclass
class Resume:
    """Checkpoints of a layer-by-layer run in ``folder``, valid only for a run with the same ``key``.

    After layer ``k`` both streams go to ``streams-<k>/`` (one safetensors file per batch and
    stream, so writing never holds more than one batch's copy), then ``progress.json`` names it;
    each is written beside its final name and renamed, so a run killed at any moment leaves the
    last complete pair. The finished layers themselves are the source's to keep.
    """

    folder: Path
    key: str

    @property
    def _progress(self) -> Path:
        return self.folder / "progress.json"

    def load(
        self, dense: list[torch.Tensor], propagated: list[torch.Tensor]
    ) -> tuple[int, list[Any], list[float]] | None:
        """Fill both streams (per-batch views) from an earlier run; ``(next layer, records, seconds)``, or None."""
        if not self._progress.is_file():
            return None
        state = json.loads(self._progress.read_text())
        streams = self.folder / state.get("streams", "")
        if state.get("key") != self.key or not streams.is_dir():
            return None
        for stream, views in (("dense", dense), ("propagated", propagated)):
            for b, view in enumerate(views):  # one batch's file in memory at a time
                view.copy_(load_file(str(streams / f"{stream}-{b}.safetensors"), device=str(view.device))["h"])
        return state["next"], state["records"], state["layer_seconds"]

    def save(
        self,
        next_layer: int,
        dense: list[torch.Tensor],
        propagated: list[torch.Tensor],
        records: list[Any],
        seconds: list[float],
    ) -> None:
        name = f"streams-{next_layer:05d}"
        tmp = self.folder / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for stream, tensors in (("dense", dense), ("propagated", propagated)):
            for b, t in enumerate(tensors):
                save_file({"h": t.detach().contiguous().cpu()}, str(tmp / f"{stream}-{b}.safetensors"))
        shutil.rmtree(self.folder / name, ignore_errors=True)
        os.replace(tmp, self.folder / name)
        state = {"key": self.key, "next": next_layer, "streams": name, "records": records, "layer_seconds": seconds}
        (self.folder / "progress.json.tmp").write_text(json.dumps(state))
        os.replace(self.folder / "progress.json.tmp", self._progress)
        for old in self.folder.glob("streams-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def run_layers(
    model: nn.Module,
    windows: torch.Tensor,
    visit: Visitor,
    *,
    source: LayerSource | None = None,
    propagate: bool = True,
    batch_size: int = 4,
    resume: Resume | None = None,
    show_progress: bool = True,
    desc: str = "layers",
) -> StreamReport:
    """Visit every decoder layer of ``model`` in order, between the dense and the propagated stream.

    Each stream holds ``len(windows) x seq_len x hidden`` values in the model's dtype on its
    device, as one block (:func:`stream_block`) that advances in place, reported as
    ``stream_bytes``: for SmolLM2-135M on 128 x 512 tokens, 2 x 151 MB in fp32. After ``visit``
    patches layer ``i``, the dense stream advances through a frozen copy of it and the propagated
    one through the patched layer, and the source is told it is ``done``.

    ``propagate=False`` is a read-only pass: one (dense) stream, no copy, the visitor must not
    change the layer, and the source drops it. ``resume`` (with a source whose finished
    layers persist) checkpoints both streams after each layer and, when its folder holds an
    earlier run of the same key, starts after that run's last finished layer.
    """
    source = layer_source(model, source)
    if resume is not None and not (propagate and source.persistent):
        resume = None  # only finished layers on disk make a run resumable
    first, kwargs_of = record_batches(model, windows, batch_size)
    dense_in = stream_block(first)
    del first
    inputs = stream_block(dense_in) if propagate else dense_in
    report = StreamReport(stream_bytes=(1 + propagate) * sum(h.numel() * h.element_size() for h in dense_in))
    start_at = 0
    if resume is not None and (saved := resume.load(dense_in, inputs)) is not None:
        start_at, report.records, report.layer_seconds = saved
        report.resumed_at = start_at
    bar = tqdm(total=len(source), initial=start_at, desc=desc, unit="layer", disable=not show_progress)
    for i in range(start_at, len(source)):
        start = time.perf_counter()
        layer = source.load(i)
        frozen = copy.deepcopy(layer).requires_grad_(False) if propagate else layer
        kwargs = [k[i] for k in kwargs_of]
        step = LayerStep(i, layer_prefix(model, i), layer, frozen, dense_in, inputs, kwargs)
        report.records.append(visit(step))
        step.dense_outputs()  # the dense stream advances in place
        if propagate:
            for b, kw in enumerate(kwargs):  # in place: one batch's output is the only extra copy
                inputs[b].copy_(call_layer(layer, inputs[b], kw))
            source.done(i)
        else:
            source.drop(i)
        del frozen, step, layer
        report.layer_seconds.append(time.perf_counter() - start)
        if resume is not None:
            resume.save(i + 1, dense_in, inputs, report.records, report.layer_seconds)
        bar.update()
    bar.close()
    return report
