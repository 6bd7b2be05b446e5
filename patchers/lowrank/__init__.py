"""Low-rank compression: rank allocators (uniform, WeLore, loss-aware) x factorizers (SVD, FWSVD,
whitening), one global parameter ratio. ``--compress R --method ALLOCATOR+FACTORIZER``."""

from eigenpatch.patchers.lowrank import cli, transform
from eigenpatch.patchers.lowrank.config import SVD, LowRank, parse_method

__all__ = ["SVD", "LowRank", "cli", "parse_method", "transform"]
