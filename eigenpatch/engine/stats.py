"""The statistics the engine computes for transforms: one Gram accumulator, one shared-input detector.

Every input statistic a transform reads is a Gram matrix of some Linear's inputs over the
calibration tokens: ``H = sum_t x_t x_t^T`` (a whitening, a second-order proxy), or the cross term
``X = sum_t x_t x'_t^T`` of the same tokens in the dense and the propagated stream. They are all
accumulated by :class:`Gram`: fp32 products per batch (the expensive part, at BLAS speed), fp64
running sums (so 65k tokens do not lose the small eigenvalues to rounding).

Linears that read the same input tensor (q/k/v, gate/up) share one Gram: that is both cheaper and
exactly what a fused layer (vLLM's ``qkv_proj`` / ``gate_up_proj``) sees. :class:`SharedInputs`
detects the sharing from a forward, by identity: a module shares its predecessor's input when it
receives the very same tensor object. Comparing addresses instead would be wrong: a freed input
(v_proj's) and the next one allocated in its place (o_proj's) would look shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from eigenpatch.engine.streams import LayerStep, call_layer


class Gram:
    """Running ``sum_t a_t b_t^T`` (``b = a`` by default) over tokens, in fp64, and the token count."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Add the tokens of ``a`` (``[..., dim]``), paired with the same tokens of ``b`` for a cross term."""
        a = a.detach().reshape(-1, a.shape[-1]).float()
        b = a if b is None else b.detach().reshape(-1, b.shape[-1]).float()
        product = (b.T @ a).double()  # fp32 product per batch, fp64 sum
        self.sum = product if self.sum is None else self.sum.add_(product)
        self.tokens += a.shape[0]

    @property
    def value(self) -> torch.Tensor:
        if self.sum is None:
            raise ValueError("an empty Gram: no tokens were added")
        return self.sum


class SharedInputs:
    """Which of ``names`` read the same input, seen during forwards run inside :meth:`watch`.

    ``leader[name]`` is the first module (in the order they ran) that received ``name``'s input;
    ``groups`` lists them in running order, each with its leader first. ``on_input(leader, x)``,
    when given, is called once per distinct input tensor, so a statistic of a shared input is
    computed once. Only the last input seen is kept alive, never a layer's worth.
    """

    def __init__(self, names: Iterable[str], on_input: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.names = list(names)
        self.on_input = on_input
        self.leader: dict[str, str] = {}
        self._last: tuple[str, torch.Tensor] | None = None

    @property
    def groups(self) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for name, leader in self.leader.items():
            groups.setdefault(leader, []).append(name)
        return list(groups.values())

    def _seen(self, name: str, x: torch.Tensor) -> None:
        if self._last is not None and self._last[1] is x:
            leader = self.leader.get(self._last[0], self._last[0])
        else:
            leader = name
            if self.on_input is not None:
                self.on_input(name, x)
        self.leader.setdefault(name, leader)
        self._last = (name, x)

    @contextmanager
    def watch(self, root: nn.Module, prefix: str = "") -> Iterator[SharedInputs]:
        """Hooks on ``root.get_submodule(name)`` for each name (minus ``prefix``) while the block runs."""
        handles = [
            root.get_submodule(name.removeprefix(prefix)).register_forward_pre_hook(
                lambda _m, args, name=name: self._seen(name, args[0])
            )
            for name in self.names
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._last = None  # a forward's tensors are not compared with the next one's


def input_groups(step: LayerStep, names: list[str]) -> list[list[str]]:
    """``names`` (relative to the layer) in the order the patched layer runs them, grouped by shared input."""
    shared = SharedInputs(names)
    with shared.watch(step.layer):
        call_layer(step.layer, step.inputs[0], step.kwargs[0])
    return shared.groups


def paired_grams(step: LayerStep, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H', X)`` of ``module``'s input (a name relative to the layer): the propagated input's Gram
    and its cross term with the dense input, ``X = sum_t x_t x'_t^T`` over the same tokens."""
    gram, cross = Gram(), Gram()
    for dense_x, x in step.paired_inputs(module):
        gram.add(x)
        cross.add(x, dense_x)
    return gram.value, cross.value
