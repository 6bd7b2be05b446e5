"""Healing: train only the factor pairs of a compressed model, distilling the original. ``--heal STEPS``."""

from eigenpatch.patchers.heal import cli, transform
from eigenpatch.patchers.heal.config import Heal

__all__ = ["Heal", "cli", "transform"]
