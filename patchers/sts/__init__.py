"""STS: spectrum-aware test-time steering of a frozen zero-shot classifier (``eigenpatch sts``).

A classifier adapter, not a model rewrite: it registers no transform and writes no checkpoint,
only its command.
"""

from eigenpatch.patchers.sts import cli
from eigenpatch.patchers.sts.method import STS

__all__ = ["STS", "cli"]
