"""Structured feed-forward blocks (shared low-rank, BlockDense, BlockShuffle) with a measured
pre-merge for decoding. ``--structured-ffn KIND``."""

from eigenpatch.patchers.structured_ffn import cli, transform
from eigenpatch.patchers.structured_ffn.config import StructuredFFN

__all__ = ["StructuredFFN", "cli", "transform"]
