"""Hidden-state capture at named points of the residual stream.

A *site* names a point of the residual stream: ``embed`` is what enters decoder layer 0 (the
input embeddings), ``layer:L`` what decoder layer ``L`` returns (negative ``L`` counts from the
end). EigenShield gathers its statistics there and steering reads its activations there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import decoder_layers


def parse_site(site: str, n_layers: int) -> tuple[int, str]:
    """``"embed"`` -> ``(0, "pre")``; ``"layer:L"`` -> ``(L, "post")`` with ``L`` made non-negative."""
    if site == "embed":
        return 0, "pre"
    head, _, index = site.partition(":")
    try:
        layer = int(index)
    except ValueError:
        layer = None
    if head != "layer" or layer is None or not -n_layers <= layer < n_layers:
        raise UsageError(f"site {site!r} is not 'embed' or 'layer:L' with L in [{-n_layers}, {n_layers - 1}]")
    return layer % n_layers, "post"


@contextmanager
def capture(model: nn.Module, sites: list[str], sink: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward stores the hidden states at each site in ``sink[site]``."""
    layers = decoder_layers(model)
    handles = []
    for site in sites:
        index, hook = parse_site(site, len(layers))

        def pre(module: nn.Module, args: tuple, kwargs: dict, site: str = site) -> None:
            sink[site] = args[0] if args else kwargs["hidden_states"]

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any, site: str = site) -> None:
            sink[site] = output[0] if isinstance(output, tuple) else output

        if hook == "pre":
            handles.append(layers[index].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(layers[index].register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
