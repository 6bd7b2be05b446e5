"""Gavish & Donoho's optimal hard threshold: how many singular values are signal, not noise.

Used wherever a principal subspace is cut from few samples: steering vectors (``steer``) and the
label-prototype basis of test-time steering (``sts``).
"""

from __future__ import annotations

import torch


def gavish_donoho_rank(singular_values: torch.Tensor, n: int, d: int) -> int:
    """How many singular values of an ``n x d`` matrix exceed the optimal hard threshold.

    Gavish & Donoho (2014), unknown noise level: ``tau = omega(beta) * median(s)`` with ``beta =
    min(n, d) / max(n, d)`` and ``omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43``.
    """
    beta = min(n, d) / max(n, d)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    tau = omega * float(singular_values.median())
    return int((singular_values > tau).sum())
