"""The ``snap`` config: a defence against embedding-space attacks with no parameter to tune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from eigenpatch.errors import UsageError
from eigenpatch.recipe import TransformConfig


@dataclass
class Snap(TransformConfig):
    """Snap every input embedding to the nearest row of the model's own embedding table.

    An attacker who may send embeddings (``inputs_embeds``, vLLM's ``--enable-prompt-embeds``)
    can push them anywhere; snapped, they become tokens again, so the attack is reduced to choosing
    tokens. Against the adaptive embedding attack of ``bench/shield_robustness.py`` it took the
    success rate from 0.20 / 1.00 / 1.00 to 0 at budgets 0.1 / 0.25 / 0.5 (``docs/eigenshield.md``),
    where no EigenShield projection changed it. It needs no calibration and costs nothing in quality:
    token-id inputs are rows already and pass unchanged.
    """

    name: ClassVar[str] = "snap"
    identity_on_tokens: ClassVar[bool] = True
    #: Patch-time report only: the rows sampled to measure how far each token's nearest neighbour is.
    sample_rows: int = 1024

    def __post_init__(self) -> None:
        if self.sample_rows < 1:
            raise UsageError(f"snap sample_rows must be >= 1, got {self.sample_rows}")
