"""The output Fisher of chosen Linears, computed one decoder layer at a time.

A whole-model backward pass (the one-shot path's) needs the whole model in memory. The same
numbers come out of a pass that holds one layer: run the layers forward once, keeping each
layer's input (its *boundary* activations) on disk; get the gradient of the loss at the last
hidden state from the head; then walk the layers backward, each time rerunning one layer
forward from its stored input and backpropagating the gradient of its output to the gradient
of its input. The gradient at each Linear's output is seen on the way, exactly as in the
whole-model backward pass.

Memory: one layer, one batch of activations with their autograd graph, and one gradient stream
(``windows x seq_len x hidden``). Disk: the boundaries, ``layers x windows x seq_len x hidden``
values (SmolLM2-135M, 32 x 512 tokens, fp32: 1.1 GB), in a temporary folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.calibration import trainable_only
from eigenpatch.engine.shards import LayerSource, layer_source
from eigenpatch.engine.stats import Gram, SharedInputs
from eigenpatch.engine.streams import call_layer, decoder_layers, layer_prefix, record_batches

#: ``on_layer(index, layer, fisher, grams, leader)``: see :func:`stream_output_fisher`.
LayerDone = Callable[[int, nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]], None]


class _Passthrough(nn.Module):
    """Stands in for a decoder layer while the head runs: hands its input on unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _head_gradient(model: nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``dL/dh`` at the last decoder layer's output ``last`` for windows ``ids`` (summed token loss).

    The model's own forward computes the head (final norm, ``lm_head``, Gemma's logit softcap):
    the embedding output is replaced by ``last`` and every decoder layer by a passthrough.
    """
    layers = decoder_layers(model)
    originals = list(layers)
    leaf = last.detach().requires_grad_(True)
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _a, _out: leaf)
    for i in range(len(layers)):
        layers[i] = _Passthrough()
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            # summed (not averaged) over tokens, so each token's gradient is its own sample's
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            loss.backward()
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    return leaf.grad


def stream_output_fisher(
    model: nn.Module,
    modules: Mapping[int, Sequence[str]],
    windows: torch.Tensor,
    *,
    source: LayerSource | None = None,
    batch_size: int = 4,
    scratch: Path | None = None,
    show_progress: bool = True,
    grams: Mapping[int, Sequence[str]] | None = None,
    on_layer: LayerDone | None = None,
) -> dict[str, torch.Tensor]:
    """``{"<layer prefix><module>": b}`` with ``b_o = sum_t (dL/dy_{t,o})^2``, the diagonal output
    Fisher of each ``modules[i]`` submodule (names relative to decoder layer ``i``), as a
    whole-model backward pass computes it.

    ``grams``: modules whose input Gram to accumulate on the way, from the forward that each layer's
    backward step reruns anyway (the dense stream on these windows, at no extra forward).
    ``on_layer(i, layer, fisher, grams, leader)`` is called as soon as layer ``i``'s statistics
    are complete (layers in reverse order), with the layer still loaded: scoring needs no pass of
    its own."""
    source = layer_source(model, source)
    hidden, kwargs_of = record_batches(model, windows, batch_size)
    device = hidden[0].device
    batches = [windows[i : i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    fisher: dict[str, torch.Tensor] = {}
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fisher-", dir=scratch) as tmp:
        boundary = Path(tmp)
        for i in tqdm(range(len(source)), desc="fisher: forward", unit="layer", disable=not show_progress):
            layer = source.load(i)
            save_file({str(b): h.contiguous().cpu() for b, h in enumerate(hidden)}, str(boundary / f"{i}.safetensors"))
            hidden = [call_layer(layer, h, kw[i]) for h, kw in zip(hidden, kwargs_of, strict=True)]
            source.drop(i)
        grads = [
            torch.cat([_head_gradient(model, ids[w : w + 1], h[w : w + 1]) for w in range(len(ids))])
            for ids, h in zip(batches, hidden, strict=True)
        ]
        del hidden
        for i in tqdm(
            reversed(range(len(source))),
            total=len(source),
            desc="fisher: backward",
            unit="layer",
            disable=not show_progress,
        ):
            layer = source.load(i)
            inputs = load_file(str(boundary / f"{i}.safetensors"), device=str(device))
            prefix = layer_prefix(model, i)
            sums: dict[str, Gram] = {}
            shared = SharedInputs((grams or {}).get(i, []), lambda n, x, s=sums: s.setdefault(n, Gram()).add(x))
            with shared.watch(layer):
                grads = _backward_layer(layer, prefix, modules.get(i, ()), inputs, grads, kwargs_of, i, fisher)
            if on_layer is not None:
                mine = {k: v for k, v in fisher.items() if k.startswith(prefix)}
                on_layer(i, layer, mine, {k: g.value for k, g in sums.items()}, dict(shared.leader))
            source.drop(i)
    return fisher


def _backward_layer(
    layer: nn.Module,
    prefix: str,
    names: Sequence[str],
    inputs: dict[str, torch.Tensor],
    grads: list[torch.Tensor],
    kwargs_of: list[list[dict[str, Any]]],
    index: int,
    fisher: dict[str, torch.Tensor],
) -> list[torch.Tensor]:
    """Backpropagate ``grads`` (at the layer's output) through ``layer``; accumulate the output
    Fisher of ``names`` into ``fisher``; return the gradients at the layer's input."""

    def hook_for(name: str):
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            def accumulate(grad: torch.Tensor) -> None:
                square = grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(dim=0).cpu()
                fisher[prefix + name] += square

            output.register_hook(accumulate)

        return hook

    for name in names:
        fisher[prefix + name] = torch.zeros(layer.get_submodule(name).out_features, dtype=torch.float64)
    handles = [layer.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    out_grads = []
    try:
        with trainable_only(layer, []), torch.enable_grad():
            for b, grad in enumerate(grads):
                x = inputs[str(b)].requires_grad_(True)
                out = layer(x, **kwargs_of[b][index])
                (out[0] if isinstance(out, tuple) else out).backward(grad)
                out_grads.append(x.grad)
    finally:
        for handle in handles:
            handle.remove()
    return out_grads
