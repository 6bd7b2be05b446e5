"""Random-matrix facts for sample covariances: the Marchenko-Pastur bulk, its edge, and spikes.

``X`` is ``n x d`` with iid rows of covariance ``sigma^2 I`` plus a few spikes; ``gamma = d / n``.
The eigenvalues of ``X^T X / n`` that are pure noise fill ``[sigma^2 (1 - sqrt g)^2, sigma^2 (1 +
sqrt g)^2]`` (Marchenko-Pastur); a planted direction of variance ``sigma^2 + theta`` separates from
that bulk only above the BBP transition ``theta > sigma^2 sqrt g``. ``sigma^2`` is unknown in real
activations, so it is estimated from the eigenvalues themselves: the median eigenvalue divided by
the median of the unit Marchenko-Pastur law is robust to a minority of spikes (the mean is not:
every spike pulls it up). Formulas: Marchenko & Pastur (1967); Baik, Ben Arous & Péché (2005).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

_GRID = 20001


def mp_edges(sigma2: float, gamma: float) -> tuple[float, float]:
    """Bulk edges ``sigma^2 (1 -/+ sqrt gamma)^2`` of the nonzero Marchenko-Pastur eigenvalues."""
    root = math.sqrt(gamma)
    return sigma2 * (1 - root) ** 2, sigma2 * (1 + root) ** 2


def mp_density(x: torch.Tensor, sigma2: float, gamma: float) -> torch.Tensor:
    """Density of the nonzero eigenvalues (normalized to 1 over the bulk), for plotting and tests.

    For ``gamma <= 1`` it is the usual ``sqrt((l+ - x)(x - l-)) / (2 pi gamma sigma^2 x)``; for
    ``gamma > 1`` the ``n`` nonzero eigenvalues are those of ``X X^T / n``, i.e. ``gamma`` times a
    Marchenko-Pastur law of ratio ``1 / gamma``.
    """
    if gamma > 1:
        return mp_density(x / gamma, sigma2, 1 / gamma) / gamma
    lo, hi = mp_edges(sigma2, gamma)
    inside = (x > lo) & (x < hi)
    val = torch.sqrt(((hi - x) * (x - lo)).clamp_min(0)) / (2 * math.pi * gamma * sigma2 * x.clamp_min(1e-300))
    return torch.where(inside, val, torch.zeros_like(val))


@lru_cache(maxsize=256)
def mp_median(gamma: float) -> float:
    """Median of the nonzero eigenvalues of the unit (``sigma^2 = 1``) Marchenko-Pastur law."""
    if gamma > 1:
        return gamma * mp_median(1 / gamma)
    lo, hi = mp_edges(1.0, gamma)
    # x = lo + (hi - lo) sin^2(t) removes the square-root singularities at both edges.
    t = torch.linspace(0, math.pi / 2, _GRID, dtype=torch.float64)
    x = lo + (hi - lo) * torch.sin(t) ** 2
    dx = 2 * (hi - lo) * torch.sin(t) * torch.cos(t)
    f = mp_density(x, 1.0, gamma) * dx
    cdf = torch.cumulative_trapezoid(f, t, dim=0)
    cdf = torch.cat([cdf.new_zeros(1), cdf]) / cdf[-1]
    i = int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)))
    w = (0.5 - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
    return float(x[i - 1] + w * (x[i] - x[i - 1]))


def estimate_noise(eigenvalues: torch.Tensor, n_samples: int, method: str = "median") -> float:
    """``sigma^2`` of the noise bulk from a covariance's eigenvalues (``d`` of them, ``n`` samples).

    ``median``: median nonzero eigenvalue / Marchenko-Pastur median (robust while spikes are a
    minority). ``iterate``: start from the median estimate and repeat ``sigma^2 = mean of the
    eigenvalues below the edge`` (uses the whole bulk; drifts up when many spikes sit just above it).
    """
    d = eigenvalues.numel()
    gamma = d / n_samples
    values = eigenvalues.double().sort(descending=True).values[: min(d, n_samples)]
    sigma2 = float(values.median()) / mp_median(gamma)
    if method == "median":
        return sigma2
    if method != "iterate":
        raise ValueError(f"noise estimate {method!r} is not one of ('median', 'iterate')")
    for _ in range(100):
        bulk = values[values <= mp_edges(sigma2, gamma)[1]]
        if bulk.numel() == 0:
            break
        new = float(bulk.mean())
        if abs(new - sigma2) <= 1e-10 * sigma2:
            break
        sigma2 = new
    return sigma2


def debias_spike(eigenvalue: float, sigma2: float, gamma: float) -> float:
    """Population spike ``l = 1 + theta / sigma^2`` behind a sample eigenvalue above the edge."""
    x = eigenvalue / sigma2
    b = 1 + x - gamma
    return (b + math.sqrt(max(b * b - 4 * x, 0.0))) / 2


def spike_overlap(ell: float, gamma: float) -> float:
    """Expected ``|<v_hat, u>|^2`` between a sample spike eigenvector and its population direction."""
    if ell <= 1 + math.sqrt(gamma):
        return 0.0
    return (1 - gamma / (ell - 1) ** 2) / (1 + gamma / (ell - 1))


@dataclass
class Spectrum:
    """Eigen-decomposition of a sample covariance with its Marchenko-Pastur fit."""

    eigenvalues: torch.Tensor  # [d] descending (fp64)
    eigenvectors: torch.Tensor  # [d, d] columns, same order
    n_samples: int
    sigma2: float
    margin: float = 0.0  # the bulk is widened by it at both ends

    @property
    def gamma(self) -> float:
        return self.eigenvalues.numel() / self.n_samples

    @property
    def edge(self) -> float:
        """Upper bulk edge ``sigma^2 (1 + sqrt gamma)^2 (1 + margin)``."""
        return mp_edges(self.sigma2, self.gamma)[1] * (1 + self.margin)

    @property
    def spikes(self) -> int:
        """How many eigenvalues lie above the edge (they come first: eigenvalues are descending)."""
        return int((self.eigenvalues > self.edge).sum())

    @property
    def lower_edge(self) -> float:
        """Lower bulk edge ``sigma^2 (1 - sqrt gamma)^2 (1 - margin)``; 0 when ``d >= n``."""
        if self.gamma >= 1:
            return 0.0
        return mp_edges(self.sigma2, self.gamma)[0] * max(1 - self.margin, 0.0)

    @property
    def deficits(self) -> int:
        """How many eigenvalues lie *below* the lower edge (they come last).

        Isotropic noise cannot produce them: they are directions the data is constrained in (a
        near-null space), structure just as the spikes are, at the other end of the spectrum.
        None when ``d >= n``: then ``d - n`` eigenvalues are zero by rank, not by structure."""
        if self.gamma >= 1:
            return 0
        return int((self.eigenvalues < self.lower_edge).sum())


def fit_spectrum(covariance: torch.Tensor, n_samples: int, noise: str = "median", margin: float = 0.0) -> Spectrum:
    """Eigendecompose ``covariance`` (fp64), estimate the noise level and the bulk edge."""
    values, vectors = torch.linalg.eigh(covariance.double())
    values, vectors = values.flip(0), vectors.flip(1)
    return Spectrum(values, vectors, n_samples, estimate_noise(values, n_samples, noise), margin)
