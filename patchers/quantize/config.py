"""The ``quantize`` config: which Linears, how many bits, which group size, which rounding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from eigenpatch.calibration import DEFAULT_FISHER_WINDOWS, DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from eigenpatch.errors import UsageError
from eigenpatch.format.corrected import FACTOR_BITS, pair_bytes
from eigenpatch.format.quantized import BITS
from eigenpatch.patchers.quantize.budget import (
    DEFAULT_PAIRS,
    DEFAULT_RANKS,
    DEFAULT_WIDTHS,
    Option,
    check_budget,
    parse_pair,
    parse_width,
)
from eigenpatch.patchers.targets import DEFAULT_TARGETS
from eigenpatch.recipe import TransformConfig

METHODS = ("gptq", "rtn")
#: 64 divides the widths of SmolLM2 (576, 1536), Llama (4096, 11008), Qwen2 (896, 4864) and
#: Gemma3 (640, 2048); 128, the usual GPTQ default, leaves SmolLM2's 576 a padded half group.
DEFAULT_GROUP = 64


def check_bits_and_group(bits: int, group: int) -> None:
    """One line for a width the format cannot store or a group that does not fit it."""
    if bits not in BITS:
        raise UsageError(f"--bits {bits}: choose one of {', '.join(map(str, BITS))}")
    if group < 16 or group & (group - 1):
        raise UsageError(f"--group {group}: use a power of two of 16 or more (32, 64, 128 ...)")


@dataclass
class Quantize(TransformConfig):
    """Weight-only quantization of the targeted Linears: ``bits``-bit codes in groups of ``group``
    inputs, each group with a scale and a zero point (``symmetric`` fixes the zero point at the
    middle level).

    ``method="gptq"`` rounds each Linear against the Gram of the inputs it really sees: in the
    layer-by-layer engine, on the propagated stream (the quantized layers before it already in
    place), as llm-compressor's sequential GPTQ does; ``calib_windows`` windows of
    ``calib_seq_len`` tokens. ``"rtn"`` rounds each group to its nearest grid, with no data.
    """

    name = "quantize"
    #: 2: ``correction_bits`` (default 8) and ``budget_pairs``; a version-1 entry stored its
    #: corrections in fp16 and had no low-rank replacement in its budget ladder.
    version = 2
    out_of_core = True
    bits: int = 4
    group: int = DEFAULT_GROUP
    method: str = "gptq"
    symmetric: bool = False
    #: GPTQ rounds the most excited inputs first (with the groups' grids fixed beforehand).
    act_order: bool = True
    targets: tuple[str, ...] = DEFAULT_TARGETS
    #: Rank of a low-rank correction of each dense Linear's rounding error (0: none), fitted in
    #: the whitened input space of the propagated inputs (``correct.py``).
    correction_rank: int = 0
    #: The correction factors' storage: 8 (int8 rows, one fp16 scale per row) or 16 (fp16). 8 by
    #: default: the rounding measured free, so at equal bytes it buys twice the rank
    #: (``bench/correction_bits.py``). 16 writes what format v1 readers load.
    correction_bits: int = 8
    #: Weight the correction by the output Fisher (one backward pass over ``fisher_windows``
    #: windows) so it spends its rank where the loss is sensitive, not only where outputs move.
    correction_fisher: bool = True
    #: Which of ``targets`` (last name components) get the correction; None: all of them.
    correction_targets: tuple[str, ...] | None = None
    #: Adam steps of block-local refinement of each layer's corrections towards the dense layer's
    #: outputs, after the layer is rounded (0: the closed form alone).
    refine_steps: int = 0
    refine_lr: float = 1e-3
    #: Also refine each quantized Linear's scales (codes and zero points fixed): no bytes added.
    refine_scales: bool = False
    #: Average bits per targeted weight, everything counted (``budget.py``): each unit of Linears
    #: sharing an input then gets its own width from ``budget_widths`` and correction rank from
    #: ``budget_ranks`` by estimated loss per byte; ``bits``, ``group`` and ``correction_rank`` are unused.
    budget: float | None = None
    budget_widths: tuple[str, ...] = DEFAULT_WIDTHS
    budget_ranks: tuple[int, ...] = DEFAULT_RANKS
    #: Low-rank replacements the budget may choose, ``BITS:GROUP@F`` (``budget.py``); () for none.
    budget_pairs: tuple[str, ...] = DEFAULT_PAIRS
    fisher_windows: int = DEFAULT_FISHER_WINDOWS
    calib_windows: int = DEFAULT_WINDOWS
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group)
        if self.method not in METHODS:
            raise UsageError(f"unknown quantizer {self.method!r}; known: {', '.join(METHODS)}")
        if self.correction_bits not in FACTOR_BITS:
            raise UsageError(f"--correction-bits {self.correction_bits}: choose 8 or 16")
        if self.correction_rank < 0:
            raise UsageError(f"--correct {self.correction_rank}: a correction rank is 0 (none) or positive")
        self.targets = tuple(self.targets)
        if self.correction_targets is not None:
            self.correction_targets = tuple(self.correction_targets)
        self.budget_widths, self.budget_ranks = tuple(self.budget_widths), tuple(self.budget_ranks)
        self.budget_pairs = tuple(self.budget_pairs)
        if self.budget is not None:
            check_budget(self.budget)
            self.budget_options()  # one line for a malformed ladder, now
            if self.correction_rank:
                raise UsageError("--correct with --budget: the budget chooses each matrix's correction rank itself")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformConfig:
        """A version-1 entry re-runs as it ran: fp16 corrections, no replacement pairs in the ladder."""
        if data.get("version", 1) < 2:
            data = {**data, "correction_bits": 16, "budget_pairs": ()}
        return super().from_dict(data)

    def budget_options(self) -> list[Option]:
        """The ladder ``--budget`` chooses from: every width with every rank (8-bit codes need no
        correction), and the low-rank replacements."""
        if not self.budget_ranks or any(r < 0 for r in self.budget_ranks):
            raise UsageError(f"--budget-ranks {' '.join(map(str, self.budget_ranks))}: give ranks of 0 or more")
        widths = sorted({parse_width(w) for w in self.budget_widths})
        ranks = sorted(set(self.budget_ranks))
        ladder = [Option(b, g, r, self.correction_bits) for b, g in widths for r in ranks if b < 8 or r == 0]
        return ladder + sorted({parse_pair(p, self.correction_bits) for p in self.budget_pairs})

    def corrects(self, name: str) -> bool:
        """Whether Linear ``name`` (any dotted name; its last component decides) takes a correction."""
        return self.correction_targets is None or name.rpartition(".")[2] in self.correction_targets

    @property
    def needs_data(self) -> bool:
        return self.method == "gptq" or self.correction_rank > 0 or self.budget is not None

    @property
    def needs_fisher(self) -> bool:
        return (self.correction_rank > 0 and self.correction_fisher) or self.budget is not None

    def touched_linears(self) -> tuple[str, ...]:
        return self.targets

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """GPTQ on the attention of a few short windows, so the runtimes see every quantized kind:
        ``o_proj`` a factor pair (data-free, its rank whole groups) with int4 factors, and q/k/v
        under a byte budget that buys int4 for one layer and int2 for the other, q/k with rank-8
        corrections beside a plain v."""
        from eigenpatch.format.quantized import quantized_bytes
        from eigenpatch.patchers.lowrank.config import LowRank

        pair = LowRank(ratio=0.3, targets=("o_proj",), rank_multiple=32)
        short = {"calib_windows": 8, "calib_seq_len": 64, "fisher_windows": 2}
        factors = cls(group=32, targets=("o_proj",), **short)
        qkv = ("q_proj", "k_proj", "v_proj")
        linears = [(n.rpartition(".")[2], *m.weight.shape) for n, m in model.named_modules() if n.endswith(qkv)]
        corrections = sum(pair_bytes(o, i, 8, cls.correction_bits) for n, o, i in linears if n != "v_proj")
        cost = {b: sum(quantized_bytes(o, i, b, 32) for _, o, i in linears) + corrections for b in (2, 4)}
        middle = 8 * (cost[2] + cost[4]) / 2 / sum(o * i for _, o, i in linears)  # one of two layers at int4
        budget = cls(
            targets=qkv,
            budget=round(middle, 6) + 1e-6,
            budget_widths=("2:32", "4:32"),
            budget_ranks=(8,),
            budget_pairs=(),
            correction_targets=("q_proj", "k_proj"),
            **short,
        )
        return [pair, factors, budget]
