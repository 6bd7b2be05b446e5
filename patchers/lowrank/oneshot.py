"""The one-shot path's statistics: hooks on whole-model forwards and backward passes (``--one-shot``).

Every statistic comes from the dense model, all layers at once, so the whole model must be in
memory; the layer-by-layer default (:mod:`.layers`) computes the same ones through the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.calibration import calibration_windows, collect_input_covariances, trainable_only, window_batches
from eigenpatch.errors import UsageError
from eigenpatch.patchers.lowrank.config import LowRank
from eigenpatch.patchers.lowrank.factorize import InputScaling, fisher_weighting, output_weighting, whitening
from eigenpatch.recipe import PatchContext


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
        return {n: roots.setdefault(id(c), whitening(c.value)) for n, c in covariances.items()}

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


def collect_fisher(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: torch.Tensor,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Empirical Fisher per *input column* of each Linear: ``I_j = sum_windows sum_i (dL/dW_ij)^2``.

    One window per backward pass, so each squared gradient is a per-sample gradient (the
    empirical Fisher), not the square of a batch mean. Only the targeted weights require grad.
    """
    fisher = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
    device = next(model.parameters()).device
    with trainable_only(model, [lin.weight for lin in linears.values()]):
        for window in tqdm(windows, desc="fisher", unit="window", disable=not show_progress):
            ids = window[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for name, lin in linears.items():
                fisher[name] += lin.weight.grad.detach().double().square().sum(dim=0).cpu()
                lin.weight.grad = None
    return fisher


def collect_output_fisher(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: torch.Tensor,
    batch_size: int = 4,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of each Linear's *output*: ``b_o = sum_t (dL/dy_{t,o})^2`` over calibration tokens.

    With it, ``0.5 * sum_t sum_o b_o dy_{t,o}^2`` estimates the loss increase a perturbation
    ``dy`` of that layer's output causes (Fisher approximation of the Hessian), in units that
    compare across layers. No parameter gradient is allocated: only the embedding output is
    made to require grad, so backward runs through activations alone.
    """
    fisher = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in linears.items()}

    def hook_for(name: str):
        def hook(module: nn.Linear, args: Any, output: torch.Tensor) -> None:
            def accumulate(grad: torch.Tensor) -> None:
                fisher[name] += grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(dim=0).cpu()

            output.register_hook(accumulate)

        return hook

    def grad_from_embeddings(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    handles = [lin.register_forward_hook(hook_for(name)) for name, lin in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(grad_from_embeddings))
    device = next(model.parameters()).device
    batches = tqdm(window_batches(windows, batch_size), desc="output fisher", unit="batch", disable=not show_progress)
    with trainable_only(model, []), _hooks(handles):
        for batch in batches:
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # summed (not averaged) over tokens, so each token's gradient is its own sample's
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            loss.backward()
    return fisher
