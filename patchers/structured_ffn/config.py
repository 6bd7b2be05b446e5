"""The ``structured_ffn`` config: which structure, how much it removes, and the pre-merge rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from eigenpatch.calibration import DEFAULT_SEED, DEFAULT_SEQ_LEN
from eigenpatch.errors import UsageError
from eigenpatch.recipe import TransformConfig

STRUCTURES = ("lowrank", "blockdense", "blockshuffle")


PREMERGE_CHOICES = ("auto", "off", "always")


@dataclass
class StructuredFFN(TransformConfig):
    """Remove ``ratio`` of every FFN matrix's parameters with ``structure`` (``blocks`` for the block kinds)."""

    name = "structured_ffn"
    structure: str = "lowrank"
    ratio: float = 0.3
    blocks: int = 4
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    whiten: bool = True
    calib_windows: int = 64
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = DEFAULT_SEED
    premerge: str | int = "auto"

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise UsageError(f"unknown FFN structure {self.structure!r}; known: {', '.join(STRUCTURES)}")
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"FFN ratio must be in (0, 1), got {self.ratio}")
        if self.blocks < 1:
            raise UsageError(f"blocks must be >= 1, got {self.blocks}")
        if isinstance(self.premerge, str) and self.premerge not in PREMERGE_CHOICES:
            if not self.premerge.isdigit():
                raise UsageError(f"premerge must be one of {PREMERGE_CHOICES} or a token count, got {self.premerge!r}")
            self.premerge = int(self.premerge)

    @property
    def needs_data(self) -> bool:
        return self.whiten

    def claimed_linears(self) -> tuple[str, ...]:
        return (self.gate, self.up, self.down)

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """The default structure, whitened on a few short windows; merged up to 4 tokens, so
        decoding runs the merged form and prefill the structured one."""
        return [cls(calib_windows=8, calib_seq_len=64, premerge=4)]
