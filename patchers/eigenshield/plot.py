"""``eigenpatch inspect --shield-spectrum SITE --plot FILE``: the fitted spectrum, drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eigenpatch.errors import UsageError


def plot_shield_spectrum(sub: Any, path: str | Path, title: str) -> Path:
    """EigenShield's view of a site: the eigenvalue histogram against the fitted Marchenko-Pastur
    density (left, bulk region) and every eigenvalue by rank on a log scale (right), with the bulk
    edges and the candidates coloured causal (kept) or correlational (dropped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eigenpatch.patchers.eigenshield.rmt import mp_density

    path = Path(path)
    if path.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise UsageError(f"plot file {path} must end in .png, .pdf or .svg")
    s = sub.spectrum
    values = s.eigenvalues.double()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    top = 3 * s.edge
    shown = values[values <= top]
    left.hist(shown.numpy(), bins=60, density=True, color="lightsteelblue", label=f"{len(shown)} eigenvalues")
    grid = torch.linspace(1e-6, top, 800, dtype=torch.float64)
    # MP density of the nonzero eigenvalues, rescaled to the share of eigenvalues in the bulk
    bulk = (values <= s.edge) & (values >= s.lower_edge)
    weight = float(bulk.double().mean()) / max(float((values <= top).double().mean()), 1e-12)
    left.plot(
        grid.numpy(),
        weight * mp_density(grid, s.sigma2, s.gamma).numpy(),
        color="black",
        lw=1.2,
        label=f"Marchenko-Pastur, sigma^2={s.sigma2:.3g}",
    )
    left.axvline(s.edge, color="grey", ls="--", lw=1, label="bulk edges")
    if s.lower_edge > 0:
        left.axvline(s.lower_edge, color="grey", ls="--", lw=1)
    left.set_xlabel("eigenvalue (standardized covariance)")
    left.set_ylabel("density")
    left.legend(fontsize=8)
    index = torch.arange(1, len(values) + 1)
    right.semilogy(index.numpy(), values.clamp_min(1e-12).numpy(), ".", ms=2, color="lightsteelblue")
    for picks, color, label in ((sub.causal, "tab:green", "causal"), (sub.correlational, "tab:red", "correlational")):
        right.semilogy(
            (picks + 1).numpy(), values[picks].numpy(), "o", ms=3, color=color, label=f"{label} ({len(picks)})"
        )
    right.axhline(s.edge, color="grey", ls="--", lw=1)
    if s.lower_edge > 0:
        right.axhline(s.lower_edge, color="grey", ls="--", lw=1)
    right.set_xscale("log")
    right.set_xlabel("rank")
    right.set_ylabel("eigenvalue")
    right.legend(fontsize=8)
    fig.suptitle(
        f"{title}: {s.spikes} spikes above the bulk, {s.deficits} deficits below "
        f"({s.n_samples:,} tokens, gamma={s.gamma:.3g})",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
