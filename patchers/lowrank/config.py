"""The ``lowrank`` and ``svd`` configs: which Linears, which ratio, which allocator and factorizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from eigenpatch.calibration import DEFAULT_FISHER_WINDOWS, DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from eigenpatch.errors import UsageError
from eigenpatch.patchers.lowrank.propagate import DAMP, REFINE_LR
from eigenpatch.patchers.lowrank.ranks import ALLOCATORS, check_ratio
from eigenpatch.patchers.targets import DEFAULT_TARGETS
from eigenpatch.recipe import TransformConfig

FACTORIZERS = ("svd", "fwsvd", "whiten", "fwhiten")


@dataclass
class LowRank(TransformConfig):
    """Remove ``ratio`` of the targeted Linears' parameters with ``allocator`` ranks and ``factorizer`` pairs.

    Calibration (``whiten``, ``fwsvd``, ``loss``): ``calib_windows`` windows of ``calib_seq_len``
    tokens drawn with ``seed`` from the calibration text; gradient statistics use at most
    ``fisher_windows`` of them (each needs a backward pass).
    """

    name = "lowrank"
    ratio: float = 0.5
    allocator: str = "uniform"
    factorizer: str = "svd"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    calib_windows: int = DEFAULT_WINDOWS
    calib_seq_len: int = DEFAULT_SEQ_LEN
    fisher_windows: int = DEFAULT_FISHER_WINDOWS
    seed: int = DEFAULT_SEED
    #: The one knob for *how* pairs are fitted (``--one-shot`` sets it false): true fits whitening
    #: factor pairs layer by layer in the engine, on the inputs the compressed layers before them
    #: produce, against the dense outputs (:mod:`eigenpatch.patchers.lowrank.propagate`). Only
    #: ``whiten`` and ``fwhiten`` read it; the allocation stays global either way.
    sequential: bool = False
    #: Sequential only: the ridge towards the dense weight, as a fraction of the input Gram's mean diagonal.
    damp: float = DAMP
    #: Sequential only: Adam steps per layer on its factor pairs so the layer's output matches the dense one.
    refine_steps: int = 0
    refine_lr: float = REFINE_LR
    #: Every rank a multiple of this. ``--bits`` sets it to the quantizer's group (and 16), so each
    #: quantized factor runs PyTorch's int4 kernel; 1 leaves the allocation as it is.
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        self.targets = tuple(self.targets)
        if self.allocator not in ALLOCATORS:
            raise UsageError(f"unknown allocator {self.allocator!r}; known: {', '.join(ALLOCATORS)}")
        if self.factorizer not in FACTORIZERS:
            raise UsageError(f"unknown factorizer {self.factorizer!r}; known: {', '.join(FACTORIZERS)}")
        if self.rank_multiple < 1:
            raise UsageError(f"rank_multiple must be 1 or more, got {self.rank_multiple}")

    @property
    def needs_data(self) -> bool:
        return self.factorizer != "svd" or ALLOCATORS[self.allocator][1] == "loss"

    @property
    def propagates(self) -> bool:
        """Derived from ``sequential``: the pairs are fitted on the propagated stream (a whitening factorizer)."""
        return self.sequential and self.factorizer in ("whiten", "fwhiten")

    @property
    def out_of_core(self) -> bool:
        """In the engine (and so out of core): the propagated fit, and the data-free ``svd`` factorizer."""
        return self.propagates or not self.needs_data

    def touched_linears(self) -> tuple[str, ...]:
        return self.targets

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """The CLI's default method (``loss+fwhiten``) on a few short windows, in the attention
        (the FFN's factor pairs are the ``svd`` example's), so it can share a model with an FFN transform."""
        attention = ("q_proj", "k_proj", "v_proj", "o_proj")
        return [
            cls(
                allocator="loss",
                factorizer="fwhiten",
                targets=attention,
                calib_windows=8,
                calib_seq_len=64,
                fisher_windows=4,
            )
        ]


def parse_method(method: str) -> dict[str, str]:
    """``"welore+whiten"`` -> ``{"allocator": "welore", "factorizer": "whiten"}``; ``"svd"`` -> uniform+svd."""
    if method == "svd":
        return {"allocator": "uniform", "factorizer": "svd"}
    allocator, plus, factorizer = method.partition("+")
    if not plus or allocator not in ALLOCATORS or factorizer not in FACTORIZERS:
        raise UsageError(
            f"unknown --method {method!r}; use ALLOCATOR+FACTORIZER with allocator in {{{', '.join(ALLOCATORS)}}} "
            f"and factorizer in {{{', '.join(FACTORIZERS)}}}, e.g. welore+whiten"
        )
    return {"allocator": allocator, "factorizer": factorizer}


@dataclass
class SVD(LowRank):
    """``LowRank`` with data-free defaults: uniform ranks, plain SVD factors (``uniform+svd``).

    The baseline of every low-rank paper, and a collapse on real models (SmolLM2-135M: perplexity
    ~22 -> ~1e6 at 50 %). Kept as its own name because it needs no data and is what older
    recipes refer to.
    """

    name = "svd"

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """The FFN's factor pairs (the attention is the ``lowrank`` and ``quantize`` examples')."""
        return [cls(targets=("gate_proj", "up_proj", "down_proj"))]
