"""The two streams: the calibration hidden states carried from decoder layer to layer.

A one-shot compressor gathers every layer's input statistics from the dense model, so each layer
is fitted to inputs the patched model never produces: once the layers before it are patched its
real inputs differ, and the errors compound with depth. The engine carries the hidden states
from layer to layer in two streams, as llm-compressor's sequential pipeline and the
propagated-input compressors of the literature do:

- the *dense* stream runs through each layer as it was: it gives the outputs to match;
- the *propagated* stream runs through each layer as it was patched: it gives the inputs the
  patched model really sees at the next layer.

"Stream" means these hidden states and nothing else in the engine. A pass hands each layer to
the transforms between the two, as a :class:`LayerStep`.

How the layers are called: the model's own ``forward`` is run once per batch shape with every
decoder layer replaced by a recorder, which keeps the arguments the model passes each layer
(attention masks, rotary embeddings, per-layer-type masks as in Gemma3) and the first layer's
input. No layer computes in that pass, so it costs an embedding lookup. Windows carry no
padding, so every batch of one shape shares its arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


def layer_prefixes(model: nn.Module) -> list[str]:
    """The dotted name of every decoder layer of ``model``, in order, each with a trailing dot."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] + "." for layer in decoder_layers(model)]


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
            raise RuntimeError("the dense stream has advanced: read dense_in before dense_outputs()")
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
