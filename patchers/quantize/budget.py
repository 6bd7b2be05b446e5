"""``--budget B``: each matrix's bit width and correction rank, chosen by estimated loss per byte.

A budget of ``B`` bits per targeted weight buys ``B * sum(out * in) / 8`` bytes, counting all the
weights cost: codes, fp16 scales, zero points and correction factors (int8 rows with fp16 row
scales by default: :func:`~eigenpatch.format.corrected.pair_bytes`). Each *unit* (the
Linears of one decoder layer that read one input: q/k/v, gate/up, o, down) picks one option
``(bits, group, rank)`` from a ladder: the widths ``--budget-widths`` with the correction ranks
``--budget-ranks``, and the low-rank replacements ``--budget-pairs``. A unit shares its option
because its Linears share one Gram and, in vLLM, one fused GEMM whose codes must have one width.

**Low-rank replacement.** ``BITS:GROUP@F`` replaces each Linear of the unit by a factor pair
``up (down x)`` of rank ``F`` times the break-even rank ``out in / (out + in)`` (where a pair costs
what the matrix does at the same width), rounded down to whole groups, both factors quantized at
``BITS:GROUP`` (kind ``lowrank_quantized``). It wins where a matrix's whitened, Fisher-weighted
spectrum decays fast enough that the truncation loses less than fewer bits would. Its estimate is
measured, not derived: the pair is built as the fit builds it (the ``fwhiten`` factorization of
``C W R``, ``down`` rounded by GPTQ, ``up`` refitted and rounded, :mod:`.layers`) and
``dL = 1/2 ||C (W - up down) R||_F^2`` computed on the result; only where the truncation's loss, a
lower bound, is below the unit's cheapest width's (``QuantizeLayers._score_pairs``).

**The estimate.** Rounding ``W`` to ``Q`` and correcting with a rank-``k`` pair ``U V`` moves the
Linear's outputs by ``D = W - Q - U V`` times its input. To second order, with the output Fisher
``b`` (diagonal, per output channel, from the engine's Fisher pass) and the input Gram ``H`` (dense
stream, the Fisher's windows), the loss grows by

    dL(bits, group, k) = 1/2 * || C D R ||_F^2,     C = diag(sqrt(b)),  R R^T = H + lam I

summed over the Linears, each rounded independently (the off-diagonal terms between matrices are
dropped, as HAWQ and the ``loss`` rank allocator drop them). ``Q`` is the quantizer the fit uses
(GPTQ against ``H``, or RTN), run once per width at scoring time. The correction the fit makes is
the top-``k`` SVD of ``C E R`` (:mod:`.correct`), so with ``s_i`` the singular values of
``C (W - Q) R`` the whole ladder of ranks costs one spectrum:

    dL(bits, group, k) = 1/2 * sum_{i > k} s_i^2

**The allocation.** Every unit starts at its cheapest option. Options that are not on the lower
convex hull of (bytes, dL) are never worth taking; along each hull a step buys ``-d(dL) / d(bytes)``
of loss per byte. Steps are taken best slope first, across all units, while the bytes last (a step
that no longer fits freezes its unit): the same as one global threshold on loss per byte (the
Lagrangian of the budget), with the leftover spent greedily. ``tests/test_budget.py`` checks the
estimate against measured loss increases on SmolLM2 and the allocation against exhaustive search.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from eigenpatch.errors import UsageError
from eigenpatch.format.corrected import pair_bytes
from eigenpatch.format.quantized import BITS, quantized_bytes

#: Widths of the default ladder, ``bits:group``: 2 bits needs groups of 32 to be usable, at 3 bits and
#: up 64 pays (half the scales of 32, and every width here divides by 64).
DEFAULT_WIDTHS = ("2:64", "2:32", "3:64", "4:64", "8:64")
#: Correction ranks of the default ladder (0: none).
DEFAULT_RANKS = (0, 8, 16, 32)
#: Low-rank replacements of the default ladder, ``BITS:GROUP@F`` (module docstring): int4 pairs at a
#: quarter and at half of the break-even rank (as cheap as int1 and int2 codes of the whole matrix).
DEFAULT_PAIRS = ("4:64@0.25", "4:64@0.5")
#: A pair's rank is a whole number of these rows and of the group: ``up``'s inputs fill whole groups
#: and ``down``'s outputs whole tiles of the int4 kernel (the rule ``--compress R --bits N`` follows).
PAIR_RANK_ROWS = 16
#: Budgets a user may ask for, in bits per weight: below 2 no option exists, above 16 is not a saving.
BUDGET_RANGE = (2.0, 16.0)


@dataclass(frozen=True, order=True)
class Option:
    """One choice for a unit: ``bits``-bit codes in groups of ``group``, rank-``rank`` corrections
    stored at ``factor_bits``; or, with ``pair``, a factor pair at that fraction of the break-even
    rank, both factors at ``bits``/``group`` (module docstring)."""

    bits: int
    group: int
    rank: int = 0
    factor_bits: int = 16
    pair: float = 0.0

    def bytes(self, shapes: list[tuple[int, int]], corrected: list[bool]) -> int:
        """Stored bytes of a unit of ``[out, in]`` Linears (``corrected``: which take the rank)."""
        total = 0
        for (out, inp), takes in zip(shapes, corrected, strict=True):
            if self.pair:
                r = pair_rank(out, inp, self.pair, self.group)
                total += quantized_bytes(r, inp, self.bits, self.group) + quantized_bytes(out, r, self.bits, self.group)
                continue
            total += quantized_bytes(out, inp, self.bits, self.group)
            if takes and self.rank:
                total += pair_bytes(out, inp, min(self.rank, out, inp), self.factor_bits)
        return total

    def label(self) -> str:
        if self.pair:
            return f"int{self.bits} g{self.group} pairs@{self.pair:g}"
        return f"int{self.bits} g{self.group}" + (f" r{self.rank}" if self.rank else "")


def pair_rank(out_features: int, in_features: int, fraction: float, group: int) -> int:
    """The rank of a replacement pair: ``fraction`` of ``out in / (out + in)``, rounded down to whole
    groups (at least one, at most the matrix's own rank); 0 where not even one fits."""
    multiple = math.lcm(group, PAIR_RANK_ROWS)
    most = min(out_features, in_features) // multiple * multiple
    wanted = int(fraction * out_features * in_features / (out_features + in_features)) // multiple * multiple
    return min(max(wanted, multiple), most)


def parse_pair(text: str, factor_bits: int = 16) -> Option:
    """``"4:64@0.25"`` -> the replacement option, with one line for a malformed one."""
    width, _, fraction = text.partition("@")
    try:
        f = float(fraction)
    except ValueError:
        f = -1.0
    if not 0 < f < 1:
        raise UsageError(f"--budget-pairs {text!r}: write BITS:GROUP@F with 0 < F < 1, for example 4:64@0.25")
    bits, group = parse_width(width, flag="--budget-pairs")
    return Option(bits, group, 0, factor_bits, f)


def parse_width(text: str, flag: str = "--budget-widths") -> tuple[int, int]:
    """``"3:64"`` -> ``(3, 64)``, with one line for a width or group the format cannot store."""
    try:
        bits, group = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: write BITS:GROUP, for example 3:64") from None
    if bits not in BITS or group < 16 or group & (group - 1):
        raise UsageError(f"{flag} {text}: bits from {', '.join(map(str, BITS))}, group a power of two >= 16")
    return bits, group


def check_budget(budget: float) -> None:
    lo, hi = BUDGET_RANGE
    if not lo <= budget <= hi:
        raise UsageError(f"--budget {budget:g}: give average bits per weight between {lo:g} and {hi:g}")


@dataclass
class Unit:
    """The Linears that share one option, and what each option costs and is estimated to lose."""

    names: list[str]  # full dotted names
    shapes: list[tuple[int, int]]  # [out, in] each
    corrected: list[bool]  # which of them take the option's correction rank
    losses: dict[Option, float] = field(default_factory=dict)

    def weights(self) -> int:
        return sum(o * i for o, i in self.shapes)

    def cheapest(self, options: list[Option]) -> int:
        return min(o.bytes(self.shapes, self.corrected) for o in options)


def residual_energies(
    weight: torch.Tensor, dequantized: torch.Tensor, root: torch.Tensor | None, out_scale: torch.Tensor | None
) -> torch.Tensor:
    """``s_i^2``, descending: the squared singular values of ``C (W - Q) R`` (module docstring).

    ``root`` is ``R`` (``[in, in]``, or None for plain outputs). The spectrum comes from the
    eigenvalues of the smaller of ``A A^T`` and ``A^T A`` (fp64), much cheaper than an SVD on the
    wide matrices of an MLP and exact to the precision the ladder needs."""
    a = weight.detach().double() - dequantized.double()
    if root is not None:
        a = a @ root
    if out_scale is not None:
        a = out_scale.double()[:, None] * a
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def rank_losses(energies: torch.Tensor, ranks: tuple[int, ...]) -> dict[int, float]:
    """``dL(k) = 1/2 sum_{i > k} s_i^2`` for each ``k`` of ``ranks``."""
    total = float(energies.sum())
    kept = torch.cat([energies.new_zeros(1), energies.cumsum(0)])
    return {k: 0.5 * max(total - float(kept[min(k, len(energies))]), 0.0) for k in ranks}


def _hull(points: list[tuple[int, float, Option]]) -> list[tuple[int, float, Option]]:
    """The lower convex hull of ``(bytes, loss)`` from the cheapest point, loss strictly falling."""
    points = sorted(points, key=lambda p: (p[0], p[1]))
    hull: list[tuple[int, float, Option]] = []
    for p in points:
        if hull and p[1] >= hull[-1][1]:
            continue  # costs more, loses no less
        while len(hull) >= 2:
            (b1, l1, _), (b2, l2, _) = hull[-2], hull[-1]
            if (l1 - l2) * (p[0] - b2) <= (l2 - p[1]) * (b2 - b1):
                hull.pop()  # the middle point lies above the chord: never the best buy
            else:
                break
        hull.append(p)
    return hull


@dataclass
class Allocation:
    """The option of each unit, and what the whole plan costs and is estimated to lose."""

    choice: list[Option]
    bytes: int
    loss: float
    threshold: float  # loss per byte of the last step taken (the global threshold)


def allocate(units: list[Unit], budget_bytes: float) -> Allocation:
    """The plan of the module docstring: cheapest start, best loss-per-byte steps while they fit."""
    hulls = []
    for u in units:
        hulls.append(_hull([(o.bytes(u.shapes, u.corrected), loss, o) for o, loss in u.losses.items()]))
    at = [0] * len(units)
    spent = sum(h[0][0] for h in hulls)
    if spent > budget_bytes:
        raise UsageError("the budget is below every matrix's cheapest option")
    steps: list[tuple[float, int, int]] = []  # (-slope, unit, next index)

    def push(u: int) -> None:
        h, i = hulls[u], at[u]
        if i + 1 < len(h):
            slope = (h[i][1] - h[i + 1][1]) / max(h[i + 1][0] - h[i][0], 1)
            heapq.heappush(steps, (-slope, u, i + 1))

    for u in range(len(units)):
        push(u)
    threshold = float("inf")
    while steps:
        neg, u, i = heapq.heappop(steps)
        extra = hulls[u][i][0] - hulls[u][at[u]][0]
        if spent + extra > budget_bytes:
            continue  # this unit stays where it is
        spent += extra
        at[u] = i
        threshold = -neg
        push(u)
    choice = [h[i][2] for h, i in zip(hulls, at, strict=True)]
    loss = sum(h[i][1] for h, i in zip(hulls, at, strict=True))
    return Allocation(choice, spent, loss, threshold)


def describe(units: list[Unit], plan: Allocation) -> dict:
    """What the summary prints and the report stores: matrices per width, mean rank, bits met."""
    widths: dict[str, int] = {}
    ranks: list[int] = []
    for unit, option in zip(units, plan.choice, strict=True):
        key = option.label() if option.pair else f"int{option.bits} g{option.group}"
        widths[key] = widths.get(key, 0) + len(unit.names)
        ranks += [option.rank if takes else 0 for takes in unit.corrected]
    weights = sum(u.weights() for u in units)
    return {
        "matrices_per_width": dict(sorted(widths.items())),
        "mean_correction_rank": round(sum(ranks) / max(len(ranks), 1), 2),
        "bytes": plan.bytes,
        "bits_per_weight": round(8 * plan.bytes / max(weights, 1), 4),
        "estimated_loss": plan.loss,
        "threshold_loss_per_byte": plan.threshold,
    }
