"""What ``eigenpatch inspect`` shows: each matrix's singular-value curve and the rank it would get.

A user looks at this before choosing a ratio: a heavy-tailed curve (fast decay) compresses
well; a flat one loses accuracy at any rank below its break-even ``r* = mn/(m+n)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import max_saving_rank
from eigenpatch.patchers.lowrank.factorize import scaled_spectrum
from eigenpatch.patchers.lowrank.ranks import ALLOCATORS
from eigenpatch.patchers.targets import DEFAULT_TARGETS, find_linears

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class MatrixSpectrum:
    name: str
    shape: tuple[int, int]
    spectrum: torch.Tensor  # sigma_i / sigma_max, descending
    rank: int | None  # chosen rank, None = stays dense
    break_even: int

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def energy_kept(self) -> float:
        """Fraction of ``||W||_F^2`` the truncated SVD keeps (1.0 when dense)."""
        if self.rank is None:
            return 1.0
        sq = self.spectrum.square()
        return float(sq[: self.rank].sum() / sq.sum())


def collect_spectra(
    model: nn.Module,
    ratio: float,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    allocator: str = "uniform",
    show_progress: bool = True,
) -> list[MatrixSpectrum]:
    """Spectra of the targeted matrices and the ranks a data-free ``allocator`` gives them at ``ratio``."""
    allocate, kind = ALLOCATORS[allocator]
    if kind == "loss":
        raise UsageError(
            f"allocator {allocator!r} needs calibration data; inspect shows data-free ones (uniform, welore)"
        )
    linears = find_linears(model, targets)
    shapes = {n: tuple(lin.weight.shape) for n, lin in linears.items()}
    raw = {
        n: scaled_spectrum(lin.weight)
        for n, lin in tqdm(linears.items(), desc="spectra", unit="matrix", disable=not show_progress)
    }
    ranks = allocate(shapes, ratio, raw)
    return [
        MatrixSpectrum(
            name,
            shapes[name],
            (raw[name] / raw[name][0].clamp_min(torch.finfo(torch.float64).tiny)).float(),
            ranks[name],
            max_saving_rank(shapes[name][1], shapes[name][0]),
        )
        for name in linears
    ]


def plot_spectra(spectra: list[MatrixSpectrum], path: str | Path, title: str) -> Path:
    """One panel per matrix kind (q, k, ..., down); one curve per layer, coloured by depth.

    A dot marks the chosen rank; the dashed line is the break-even rank, beyond which a factor
    pair would be larger than the dense matrix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise UsageError(f"plot file {path} must end in .png, .pdf or .svg")
    kinds = list(dict.fromkeys(s.leaf for s in spectra))
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols + 1, 3.0 * rows + 0.6), squeeze=False, layout="constrained"
    )
    depth = [int(m.group(1)) if (m := _LAYER_INDEX.search(s.name)) else 0 for s in spectra]
    top = max(depth) or 1
    cmap = plt.get_cmap("viridis")
    for index, (ax, kind) in enumerate(zip(axes.flat, kinds, strict=False)):
        members = [(s, d) for s, d in zip(spectra, depth, strict=True) if s.leaf == kind]
        for s, d in members:
            ax.semilogy(s.spectrum.numpy(), color=cmap(d / top), lw=0.8)
            if s.rank is not None:
                ax.plot([s.rank - 1], [s.spectrum[s.rank - 1].item()], "o", ms=3, color=cmap(d / top))
        first = members[0][0]
        ax.axvline(first.break_even, ls="--", color="grey", lw=0.8)
        ax.set_title(f"{kind} {first.shape[1]}->{first.shape[0]}", fontsize=9)
        if index >= len(kinds) - cols:
            ax.set_xlabel("singular value index")
        if index % cols == 0:
            ax.set_ylabel("sigma_i / sigma_max")
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=axes, label="layer", shrink=0.6)
    fig.suptitle(f"{title}  (dot: chosen rank, dashed: break-even)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
