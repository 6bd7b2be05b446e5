"""Calibration windows from several texts, and the quantile chosen by the worst text's cost.

Why the worst text and not the mean: a shield fitted on one kind of text drops directions that
kind rarely uses, and another kind may use them a lot (calibrated on Wikipedia alone, the
default cost +19 % perplexity on the Python docs and +3 % on Wikipedia). A user's traffic may be
any of the kinds they calibrated on, so the setting is judged by the one it hurts most.

The quantile decides how many candidate directions are dropped: a lower quantile drops more
(more protection, more cost). :func:`choose_quantile` walks :data:`QUANTILE_GRID` from the most
protective end and keeps the first setting whose cost on held-out windows of *every* calibration
text is at most ``max_cost``. The held-out windows are drawn from the same calibration split
but never used for the fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eigenpatch.calibration import calibration_windows
from eigenpatch.evaluate import perplexity
from eigenpatch.format.interventions import HiddenProjection, attach, detach
from eigenpatch.patchers.eigenshield.config import QUANTILE_GRID, EigenShield
from eigenpatch.zoo import resolve_text


@dataclass
class CalibrationSet:
    """Fit windows (all texts, concatenated) and each text's held-out check windows."""

    fit: torch.Tensor  # [n, seq_len]
    check: dict[str, torch.Tensor]  # text name -> [check_windows, seq_len]


def calibration_set(tokenizer: object, config: EigenShield, run_text: str | None) -> CalibrationSet:
    """Equal fit windows from each of ``config.calib`` (or the run's own text), plus held-out ones."""
    texts = {name: resolve_text(name, "calib") for name in config.calib} or {"calib": run_text}
    per_text = max(1, config.calib_windows // len(texts))
    fit, check = [], {}
    for name, text in texts.items():
        assert text is not None  # the caller checked that a run text exists when calib is empty
        n = per_text + config.check_windows
        windows = calibration_windows(tokenizer, text, n, config.calib_seq_len, config.seed)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
        # a text of a single window has nothing to hold out: it is fitted on and checked on that one
        held = min(config.check_windows, len(windows) - 1)
        fit.append(windows[order[held:]])
        check[name] = windows[order[:held]] if held else windows[order[:1]]
    return CalibrationSet(torch.cat(fit), check)


def mean_nll(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over ``windows`` (each scored on its own)."""
    return perplexity(model, windows.flatten(), seq_len=windows.shape[1], show_progress=False).nll


@dataclass
class QuantileChoice:
    """The quantile kept, every tried one's cost per text, and whether ``max_cost`` was met."""

    quantile: float
    costs: dict[float, dict[str, float]]  # quantile -> text -> perplexity ratio - 1
    met: bool

    def details(self) -> dict[str, object]:
        worst = {q: max(c.values()) for q, c in self.costs.items()}
        return {
            "quantile": self.quantile,
            "quantile_chosen": True,
            "max_cost_met": self.met,
            "check_costs": {str(q): {t: round(v, 4) for t, v in c.items()} for q, c in self.costs.items()},
            "worst_check_cost": round(worst[self.quantile], 4),
        }


def choose_quantile(
    model: nn.Module,
    layer: nn.Module,
    projection_at: Callable[[float], HiddenProjection],
    check: dict[str, torch.Tensor],
    max_cost: float,
) -> QuantileChoice:
    """The lowest quantile of the grid whose worst held-out cost is at most ``max_cost``; when none
    is, the highest (fewest directions dropped) with ``met=False``, so the caller can warn."""
    base = {name: mean_nll(model, w) for name, w in check.items()}
    costs: dict[float, dict[str, float]] = {}
    for q in sorted(QUANTILE_GRID):
        projection = projection_at(q)
        attach(layer, projection)
        try:
            costs[q] = {name: math.exp(mean_nll(model, w) - base[name]) - 1 for name, w in check.items()}
        finally:
            detach(layer, projection.hook)
        if max(costs[q].values()) <= max_cost:
            return QuantileChoice(q, costs, True)
    return QuantileChoice(max(QUANTILE_GRID), costs, False)
