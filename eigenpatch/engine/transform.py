"""What a layer-by-layer transform declares and implements: the engine's step API.

The engine owns the passes; transforms hook into them (as llm-compressor's modifiers hook into
its sequential pipeline). A transform says what it needs (:class:`Needs`) and implements up to
three steps:

- :meth:`LayerTransform.score`, per layer in a read-only pass over the dense stream, with the
  statistics it declared (output Fisher, input Grams) computed once for all transforms. When the
  Grams read the Fisher's own windows, scoring happens inside the Fisher's backward walk (no pass
  of its own), so layers may come in any order;
- :meth:`LayerTransform.plan`, once, with every layer's scores seen (a global budget's allocation);
- :meth:`LayerTransform.fit`, per layer between the two streams, where it patches the layer.

The engine runs each pass once for every transform of the recipe and, within a layer, calls them
in recipe order: two transforms share one Fisher pass, one scoring pass and one fit pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eigenpatch.engine.state import Plan
from eigenpatch.engine.streams import LayerStep


@dataclass(frozen=True)
class Calibration:
    """The calibration windows a transform fits on: ``windows`` windows of ``seq_len`` tokens drawn with
    ``seed``. Every data-aware transform of one pass must ask for the same ones (they share the streams)."""

    windows: int
    seq_len: int
    seed: int


@dataclass
class Needs:
    """What a transform needs from the engine. Module names are relative to their decoder layer,
    keyed by the layer's index.

    - ``calibration``: the windows its streams carry; None for a data-free transform (the fit
      pass then loads and writes layers without streams);
    - ``output_fisher``: the modules whose diagonal output Fisher ``b_o = sum_t (dL/dy_o)^2`` its
      score step reads, over the first ``fisher_windows`` windows (one backward pass);
    - ``dense_grams``: the modules whose input Gram on the dense stream its score step reads,
      over the first ``score_windows`` windows (None: all of them);
    - ``scores``: whether it has a score step at all (a pass over the layers before the plan).
    """

    calibration: Calibration | None = None
    output_fisher: Mapping[int, Sequence[str]] = field(default_factory=dict)
    fisher_windows: int = 0
    dense_grams: Mapping[int, Sequence[str]] = field(default_factory=dict)
    score_windows: int | None = None
    scores: bool = False


@dataclass
class LayerStats:
    """The statistics of one layer that the score step reads, computed by the engine once for all.

    ``fisher``: the output Fisher of each declared module (full dotted names); ``grams``: the dense
    input Gram of each group's leader, and ``leader``: which module's Gram each declared one shares.
    """

    fisher: Mapping[str, torch.Tensor]
    grams: Mapping[str, torch.Tensor]
    leader: Mapping[str, str]

    def gram(self, module: str) -> torch.Tensor:
        """The dense input Gram of ``module`` (relative to the layer); shared inputs share one tensor."""
        return self.grams[self.leader[module]]


class LayerTransform:
    """Base of a transform that runs inside the engine. Override what it uses; every step is optional.

    ``name`` labels its progress bars and its entry in the run state.
    """

    name: str = "transform"

    def needs(self) -> Needs:
        return Needs()

    @property
    def planned(self) -> bool:
        """True when the plan is already known (restored, or cached by an earlier run): no scoring."""
        return False

    def score(self, step: LayerStep, stats: LayerStats) -> None:
        """Read layer ``step.layer`` (unchanged) and its statistics; keep what :meth:`plan` needs."""

    def plan(self) -> Plan:
        """The global decision, from every layer's scores; stored in the run state."""
        return Plan()

    def restore(self, plan: Plan) -> None:
        """Take a plan an earlier, interrupted run of the same command stored."""

    def fit(self, step: LayerStep) -> Any:
        """Patch ``step.layer`` in place. What it returns (JSON-able) is kept per layer for :meth:`details`."""
        return None

    def details(self, records: list[Any]) -> dict[str, Any]:
        """What goes into the run report's step for this transform, from the per-layer records."""
        return {}
