"""STS: spectrum-aware test-time steering of a frozen zero-shot classifier (arXiv 2511.09809).

A zero-shot classifier compares an input's embedding with one prototype per label (CLIP: text
embeddings of "a photo of a {label}"; a sentence encoder: embeddings of label prompts). STS adapts
it per input without touching the encoders:

1. Once per label set: SVD of the prototypes ``Z [C, D]``; ``B [D, k]`` = top-``k`` right singular
   vectors, ``k`` by Gavish & Donoho's optimal hard threshold (unknown noise).
2. Per input: ``V`` augmented views (image crops/flips, text word drops/crops) are embedded; the
   ``keep`` fraction with the lowest prediction entropy under the original prototypes is kept.
3. A shift ``dz = B gamma`` shared by all classes (``gamma [k]``, zero at the start) minimizes the
   entropy of the kept views' mean prediction plus ``reg * ||dz||`` with ``steps`` AdamW steps;
   prototypes become ``normalize(z_c + dz)``; the prediction averages the kept views' softmax.

Only ``k`` numbers per input are learned and no gradient reaches an encoder, which is why it is
cheap — and the shifted prototypes are never materialized: with ``B`` fixed, every quantity the
logits need is a projection computed once (:class:`_Factored`), so a step costs ``O(m (C + k))``
per input instead of the ``O(C D)`` of tuning the prototypes themselves (the ``full`` baseline).
Batched: each input has its own ``gamma`` row, and since AdamW is elementwise and the loss a sum of
per-input losses, one batched step equals one step per input.

The paper's values: 64 views, keep 10 %, AdamW lr 5e-3, 1 step; the regularizer weight is not
published (``reg``, measured in ``bench/sts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eigenpatch.errors import UsageError
from eigenpatch.patchers.gavish_donoho import gavish_donoho_rank

METHODS = ("zero-shot", "sts", "full")


@dataclass
class STS:
    """Test-time steering settings (paper defaults)."""

    views: int = 64
    keep: float = 0.1
    lr: float = 5e-3
    steps: int = 1
    reg: float = 0.0
    rank: int | None = None  # None: Gavish-Donoho
    logit_scale: float | None = None  # None: the encoder's (CLIP's learned scale, 50 for sentence encoders)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 1 or not 0 < self.keep <= 1 or self.steps < 0 or self.lr <= 0 or self.reg < 0:
            raise UsageError(
                f"STS needs views >= 1, 0 < keep <= 1, steps >= 0, lr > 0, reg >= 0; got views={self.views}, "
                f"keep={self.keep}, steps={self.steps}, lr={self.lr}, reg={self.reg}"
            )


def spectral_basis(prototypes: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """``[D, k]``: the top right singular vectors of the ``[C, D]`` prototypes (``k`` by Gavish-Donoho)."""
    _, s, vh = torch.linalg.svd(prototypes.double(), full_matrices=False)
    c, d = prototypes.shape
    k = rank if rank is not None else max(1, gavish_donoho_rank(s, c, d))
    if not 1 <= k <= len(s):
        raise UsageError(f"STS rank {k} is outside [1, {len(s)}]")
    return vh[:k].T.to(prototypes.dtype)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def confident_views(logits: torch.Tensor, keep: float) -> torch.Tensor:
    """``[N, m]`` indices of the ``keep`` fraction of views (at least 1) with the lowest entropy."""
    n_keep = max(1, round(keep * logits.shape[1]))
    return _entropy(logits.softmax(-1)).topk(n_keep, dim=1, largest=False).indices


def _mean_probs(views: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """``views [N, m, D]`` (normalized), ``prototypes [N, C, D]`` or ``[C, D]`` -> mean softmax ``[N, C]``."""
    protos = F.normalize(prototypes, dim=-1)
    logits = views @ protos.transpose(-1, -2)  # [N, m, C], shared or per-input prototypes
    return (scale * logits).softmax(-1).mean(1)


class _Factored:
    """Cosine logits of views against ``normalize(z_c + B gamma)`` without forming the shifted prototypes.

    ``v · (z_c + B γ) = (v · z_c) + (vB) γ`` and ``|z_c + B γ|² = |z_c|² + 2 (z_c B) γ + γᵀ (BᵀB) γ``:
    the projections ``V Zᵀ`` ``[N, m, C]``, ``V B`` ``[N, m, k]``, ``Z B`` ``[C, k]`` and ``BᵀB``
    ``[k, k]`` are fixed, so a step touches ``m C + m k + C k`` numbers per input, not ``C D``.
    Exact for any basis (the Gram matrix covers a non-orthonormal one).
    """

    def __init__(self, views: torch.Tensor, prototypes: torch.Tensor, basis: torch.Tensor) -> None:
        self.vz = views @ prototypes.T  # [N, m, C]
        self.vb = views @ basis  # [N, m, k]
        self.zb = prototypes @ basis  # [C, k]
        self.z2 = prototypes.pow(2).sum(-1)  # [C]
        self.gram = basis.T @ basis  # [k, k]

    def shift_norm(self, gamma: torch.Tensor) -> torch.Tensor:
        """``|B γ|`` per input ``[N]``."""
        return ((gamma @ self.gram) * gamma).sum(-1).clamp_min(0).sqrt()

    def mean_probs(self, gamma: torch.Tensor, scale: float) -> torch.Tensor:
        dot = self.vz + (self.vb @ gamma[..., None])  # [N, m, C]
        sq = self.z2 + 2 * gamma @ self.zb.T + ((gamma @ self.gram) * gamma).sum(-1, keepdim=True)  # [N, C]
        cos = dot / sq.clamp_min(1e-12).sqrt()[:, None, :]
        return (scale * cos).softmax(-1).mean(1)


def steer_predict(
    view_embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    config: STS,
    scale: float,
    method: str = "sts",
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class probabilities ``[N, C]`` for ``N`` inputs from their view embeddings ``[N, V, D]``
    (view 0: the unaugmented input).

    ``zero-shot``: the unaugmented view against the prototypes. ``sts``: the spectral shift above.
    ``full``: the entropy-minimization baseline that tunes a full ``[C, D]`` offset of every
    prototype instead (same views, filter, loss, optimizer and steps).
    """
    if method not in METHODS:
        raise UsageError(f"method {method!r} is not one of {METHODS}")
    views = F.normalize(view_embeddings.detach().float(), dim=-1)
    protos = prototypes.detach().float()
    if method == "zero-shot":
        return (scale * views[:, 0] @ F.normalize(protos, dim=-1).T).softmax(-1)
    keep = confident_views(scale * views @ F.normalize(protos, dim=-1).T, config.keep)
    kept = torch.gather(views, 1, keep[..., None].expand(-1, -1, views.shape[-1]))
    n = views.shape[0]
    if method == "sts":  # k numbers per input, logits from fixed projections
        basis = spectral_basis(protos, config.rank) if basis is None else basis.float()
        factored = _Factored(kept, protos, basis)
        param = torch.zeros(n, basis.shape[1], requires_grad=True)
        probs = lambda: factored.mean_probs(param, scale)  # noqa: E731
        shift_norm = lambda: factored.shift_norm(param)  # noqa: E731
    else:  # C x D numbers per input: every prototype gets its own offset
        param = torch.zeros(n, *protos.shape, requires_grad=True)
        probs = lambda: _mean_probs(kept, protos + param, scale)  # noqa: E731
        shift_norm = lambda: param.flatten(1).norm(dim=1)  # noqa: E731
    optimizer = torch.optim.AdamW([param], lr=config.lr)
    with torch.enable_grad():
        for _ in range(config.steps):
            loss = _entropy(probs()).sum()
            if config.reg:
                loss = loss + config.reg * shift_norm().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return probs()
