"""The ``quantize`` config: which Linears, how many bits, which group size, which rounding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from eigenpatch.calibration import DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
from eigenpatch.errors import UsageError
from eigenpatch.format.quantized import BITS
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
    out_of_core = True
    bits: int = 4
    group: int = DEFAULT_GROUP
    method: str = "gptq"
    symmetric: bool = False
    #: GPTQ rounds the most excited inputs first (with the groups' grids fixed beforehand).
    act_order: bool = True
    targets: tuple[str, ...] = DEFAULT_TARGETS
    calib_windows: int = DEFAULT_WINDOWS
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group)
        if self.method not in METHODS:
            raise UsageError(f"unknown quantizer {self.method!r}; known: {', '.join(METHODS)}")
        self.targets = tuple(self.targets)

    @property
    def needs_data(self) -> bool:
        return self.method == "gptq"

    def touched_linears(self) -> tuple[str, ...]:
        return self.targets

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """GPTQ int4 of the attention on a few short windows, ``o_proj`` first made a factor pair
        (data-free, its rank whole groups) so the runtimes see both quantized kinds."""
        from eigenpatch.patchers.lowrank.config import LowRank

        pair = LowRank(ratio=0.3, targets=("o_proj",), rank_multiple=32)
        attention = ("q_proj", "k_proj", "v_proj", "o_proj")
        return [pair, cls(group=32, targets=attention, calib_windows=8, calib_seq_len=64)]
