"""EigenShield: project hidden states onto their random-matrix causal subspace. ``--shield SITE``."""

from eigenpatch.patchers.eigenshield import cli, transform
from eigenpatch.patchers.eigenshield.config import EigenShield

__all__ = ["EigenShield", "cli", "transform"]
