"""The ``eigenshield`` config: where the projection sits, what it removes, and how it is fitted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from eigenpatch.calibration import DEFAULT_SEED
from eigenpatch.errors import UsageError
from eigenpatch.format.interventions import PROJECT_MODES
from eigenpatch.patchers.eigenshield.stats import PERTURBATIONS
from eigenpatch.recipe import TransformConfig

SCORES = ("perturbation", "resample")


CANDIDATES = ("spikes", "outliers")

#: ``patch-model --shield``'s calibration: one text of each kind in the zoo's domain panel, equal
#: windows from each. Calibrated on Wikipedia alone, the shield cost +19 % perplexity on the Python
#: docs; on this mix every domain stays within a few percent (docs/eigenshield.md).
DEFAULT_CALIB = ("wiki", "news", "pydoc", "jargon")
#: Quantiles ``quantile=None`` tries, most protective (most directions dropped) first.
QUANTILE_GRID = (0.9, 0.92, 0.94, 0.96, 0.98, 0.99)
#: What a fit reports as causal / correlational when the quantile is chosen later (``inspect``).
DISPLAY_QUANTILE = 0.96


@dataclass
class EigenShield(TransformConfig):
    """Project the hidden states at ``site`` onto their causal subspace (or drop the correlational one)."""

    name = "eigenshield"
    site: str = "embed"
    mode: str = "drop"
    score: str = "perturbation"
    candidates: str = "outliers"
    perturb: str = "gradient"
    epsilon: float = 0.1
    #: None: the lowest of :data:`QUANTILE_GRID` (the most directions dropped) whose perplexity cost
    #: on held-out windows of every calibration text is at most ``max_cost``.
    quantile: float | None = None
    max_cost: float = 0.05
    #: Calibration texts (zoo names or ``.txt`` paths), equal windows from each; empty: the text
    #: the run was given (``patch(..., calib_text=...)``, ``--calib``).
    calib: tuple[str, ...] = ()
    #: Held-out windows per calibration text on which ``quantile=None`` measures the cost.
    check_windows: int = 4
    standardize: bool = True
    noise: str = "median"
    margin: float = 0.0
    start: int = 0
    calib_windows: int = 64
    calib_seq_len: int = 256
    chunks: int = 8
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.mode not in PROJECT_MODES:
            raise UsageError(f"shield mode {self.mode!r} is not one of {PROJECT_MODES}")
        if self.score not in SCORES:
            raise UsageError(f"shield score {self.score!r} is not one of {SCORES}")
        if self.candidates not in CANDIDATES:
            raise UsageError(f"shield candidates {self.candidates!r} is not one of {CANDIDATES}")
        if self.perturb not in PERTURBATIONS:
            raise UsageError(f"shield perturbation {self.perturb!r} is not one of {PERTURBATIONS}")
        if self.quantile is not None and not 0.0 <= self.quantile <= 1.0:
            raise UsageError(f"shield quantile must be in [0, 1] (or None: chosen by max_cost), got {self.quantile}")
        if self.max_cost <= 0:
            raise UsageError(f"shield max_cost must be > 0 (a perplexity ratio - 1), got {self.max_cost}")
        if self.check_windows < 1:
            raise UsageError(f"shield check_windows must be >= 1, got {self.check_windows}")
        if self.epsilon <= 0:
            raise UsageError(f"shield epsilon must be > 0, got {self.epsilon}")
        if self.chunks < 2:
            raise UsageError(f"shield needs at least 2 calibration chunks, got {self.chunks}")

    @property
    def needs_data(self) -> bool:
        return True

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """The default shield, fitted on a few short windows (a tiny model needs no more)."""
        return [cls(calib_windows=16, calib_seq_len=64, chunks=4, check_windows=2)]
