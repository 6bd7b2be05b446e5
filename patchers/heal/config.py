"""The ``heal`` config: how long, on what loss, and how the factor pairs are trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from eigenpatch.errors import UsageError
from eigenpatch.recipe import TransformConfig

LOSSES = ("kd", "lm")


@dataclass
class Heal(TransformConfig):
    """Train the factor pairs on calibration text; see the module docstring."""

    name: ClassVar[str] = "heal"
    needs_data: ClassVar[bool] = True
    resumable: ClassVar[bool] = True  # checkpoints every ``checkpoint_every`` steps into the state folder

    steps: int = 300
    loss: str = "kd"
    lr: float = 3e-5  # measured on SmolLM2 at R = 0.5: 1e-4 first degrades (ppl 177 -> 480 in 3 steps)
    scale_lr: float = 1e-3  # quantized Linears' scales: step relative to each tensor's mean magnitude
    batch_size: int = 1
    grad_accum: int = 1
    seq_len: int = 256
    warmup_steps: int = 10
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    autocast: str = "none"  # "bf16", "auto" (bf16 where the CPU has bf16 units) or "none" (fp32)
    trainable: str = "factors"  # "factors" (WeLore-PEFT) or "all" (full fine-tuning baseline)

    @property
    def needs_teacher(self) -> bool:
        """Distillation needs the uncompressed model's logits: ``patch`` keeps a frozen copy."""
        return self.loss == "kd"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"heal loss must be one of {LOSSES}, not {self.loss!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise UsageError("heal needs steps, batch size and gradient accumulation of at least 1")
        if self.trainable not in ("factors", "all"):
            raise UsageError(f"heal trainable must be 'factors' or 'all', not {self.trainable!r}")
        if self.autocast not in ("auto", "bf16", "none"):
            raise UsageError(f"heal autocast must be auto, bf16 or none, not {self.autocast!r}")

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """Healing needs factor pairs to train: a data-free compression first, then a few steps."""
        from eigenpatch.patchers.lowrank.config import SVD

        return [SVD(ratio=0.5), cls(steps=3, seq_len=32, warmup_steps=1, lr=1e-3)]
