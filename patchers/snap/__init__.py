"""Snap: replace each input embedding by the nearest vocabulary row. ``patch-model --snap``."""

from eigenpatch.patchers.snap import cli, transform
from eigenpatch.patchers.snap.config import Snap

__all__ = ["Snap", "cli", "transform"]
