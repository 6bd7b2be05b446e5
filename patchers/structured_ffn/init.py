"""How a trained dense FFN matrix becomes each structure: budgets and initialization.

Every initializer minimizes the output error on calibration activations, ``||(W - W') X||_F``
with ``H = X X^T`` the input covariance (``H = I`` without calibration: plain Frobenius error):

- **shared low-rank** (gate and up): one whitened SVD of the stacked ``[W_gate; W_up]``
  (``factorize`` with the SVD-LLM whitening): the best rank-r pair for the two outputs jointly.
- **BlockDense** ``U V_b``: each input block ``j`` gets the top ``R/B`` right singular directions of
  its whitened column block ``W[:, j] R_j`` ("block projection"), then ``U`` is refit by least
  squares against the *full* covariance: ``U = W H G^T (G H G^T)^+`` with ``G = V_b``. The refit is
  the exact optimum given ``V_b`` (it accounts for correlations between blocks that the per-block
  SVDs ignore), so it can only lower the error.
- **BlockShuffle**: every ``(i, j)`` block of ``W`` is rank ``s`` in this structure, so each gets
  its own whitened rank-``s`` SVD (the Monarch projection, weighted by the block's input
  covariance); each output block's stage is then refit the same way.

Budgets are per matrix (``keep`` = fraction of dense parameters kept), as ``--compress`` counts.
"""

from __future__ import annotations

import torch

from eigenpatch.patchers.lowrank.factorize import factorize, whitening


def shared_rank(keep: float, in_features: int, out_each: int, partners: int = 2) -> int:
    """Rank of a factor pair shared by ``partners`` matrices ``[out_each, in]``: ``r (in + p out) <= keep p out in``."""
    rank = int(keep * partners * out_each * in_features // (in_features + partners * out_each))
    return max(1, min(rank, in_features, partners * out_each))


def lowrank_rank(keep: float, in_features: int, out_features: int) -> int:
    rank = int(keep * in_features * out_features // (in_features + out_features))
    return max(1, min(rank, in_features, out_features))


def blockdense_rank(keep: float, in_features: int, out_features: int, blocks: int) -> int:
    """``R`` with ``R (out + in/B) <= keep out in``, a multiple of ``B``, each block's ``R/B <= min(out, in/B)``."""
    per_block = int(keep * in_features * out_features // (out_features + in_features // blocks)) // blocks
    return blocks * max(1, min(per_block, out_features, in_features // blocks))


def blockshuffle_rank(keep: float, in_features: int, out_features: int, blocks: int) -> int:
    """Per-block-pair rank ``s`` with ``B s (in + out) <= keep out in`` and ``s <= min(in, out) / B``."""
    s = int(keep * in_features * out_features // (blocks * (in_features + out_features)))
    return max(1, min(s, in_features // blocks, out_features // blocks))


def _block_scaling(cov: torch.Tensor | None, j: int, n: int):
    return None if cov is None else whitening(cov[j * n : (j + 1) * n, j * n : (j + 1) * n])


def refit_output(weight: torch.Tensor, stage: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """``argmin_U ||(W - U G) X||_F = W H G^T (G H G^T)^+`` (fp64; ``H = I`` without calibration)."""
    w, g = weight.to(torch.float64), stage.to(torch.float64)
    hg = g.T if cov is None else cov.to(torch.float64) @ g.T  # [in, k]
    return (w @ hg) @ torch.linalg.pinv(g @ hg, hermitian=True)


def init_shared_lowrank(
    weights: list[torch.Tensor], rank: int, cov: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([up_k [out_k, r] ...], down [r, in])`` for matrices reading the same input."""
    stacked = torch.cat([w.detach() for w in weights])
    up, down = factorize(stacked, rank, None if cov is None else whitening(cov))
    return list(up.split([w.shape[0] for w in weights])), down


def init_lowrank(weight: torch.Tensor, rank: int, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of the whitened truncated SVD."""
    return factorize(weight.detach(), rank, None if cov is None else whitening(cov))


def init_blockdense(
    weight: torch.Tensor, rank: int, blocks: int, cov: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_down [B, R/B, in/B], block_up [out, R])``."""
    w = weight.detach().to(torch.float64)
    n, k = w.shape[1] // blocks, rank // blocks
    downs = [factorize(w[:, j * n : (j + 1) * n], k, _block_scaling(cov, j, n))[1] for j in range(blocks)]
    stage = torch.block_diag(*downs)  # [R, in]
    up = refit_output(w, stage, cov)
    return torch.stack(downs).to(weight.dtype), up.to(weight.dtype)


def init_blockshuffle(
    weight: torch.Tensor, block_rank: int, blocks: int, cov: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shuffle_in [B_j, B_i, s, in/B], shuffle_out [B_i, out/B, B_j, s])``."""
    w = weight.detach().to(torch.float64)
    b, s = blocks, block_rank
    m, n = w.shape[0] // b, w.shape[1] // b
    scalings = [_block_scaling(cov, j, n) for j in range(b)]
    shuffle_in = torch.empty(b, b, s, n, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            shuffle_in[j, i] = factorize(w[i * m : (i + 1) * m, j * n : (j + 1) * n], s, scalings[j])[1]
    shuffle_out = torch.empty(b, m, b, s, dtype=torch.float64)
    for i in range(b):
        stage = torch.block_diag(*[shuffle_in[j, i] for j in range(b)])  # [B s, in]: what output block i reads
        shuffle_out[i] = refit_output(w[i * m : (i + 1) * m], stage, cov).reshape(m, b, s)
    return shuffle_in.to(weight.dtype), shuffle_out.to(weight.dtype)
