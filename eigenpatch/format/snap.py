"""Nearest-vocabulary-row search: the math of the ``snap`` intervention.

An embedding-space attacker hands the model vectors no token has (``inputs_embeds``, vLLM's
``prompt_embeds``). Replacing each input vector by the nearest row of the model's own embedding
table takes that freedom away: whatever was sent, the model reads a token. A vector within half
the distance from its row to that row's nearest neighbour comes back as exactly that row, so a
small perturbation of a real prompt is undone, provably, and a token-id input is unchanged.

The search is a GEMM against the table: ``argmin_v ||x - s e_v||^2 = argmax_v s x.e_v - s^2
||e_v||^2 / 2`` (``s``: the scale a model applies to its embeddings, 1 for most). In bf16 the
scores round to ~0.4 % of ``x.e``, and real tables hold clusters of near-identical rows (SmolLM2's
unused special tokens: 20+ rows within 2 % of each other), so a GEMM ranking alone swaps near
neighbours. The best :data:`CANDIDATES` by score are re-ranked by their exact fp32 distance, and a
token whose candidates all score within the rounding bound of the best (a cluster larger than the
candidate set) is searched exactly over the whole table: the nearest row is always found, and a
row-exact input always finds itself. Tokens go through in chunks of :data:`CHUNK` so the
``[tokens, vocab]`` scores stay small in a long prefill.

It runs as one custom op (``eigenpatch::snap_rows``): opaque to ``torch.compile`` (vLLM compiles
the decoder stack), so the chunk loop and the row-norm cache stay plain eager code.
"""

from __future__ import annotations

import torch

#: Rows re-ranked by exact distance after the GEMM's approximate ranking.
CANDIDATES = 64
#: Tokens per scored chunk (scores ``[64, vocab]`` fp32: 33 MB at a 128k vocabulary; candidate rows
#: ``[64, 64, d]``: 67 MB at d = 4096); rows per chunk of the exact fallback search.
CHUNK = 64
ROW_CHUNK = 8192

# Row norms of the last table seen: recomputed when the table changes (another tensor, or the same
# one written in place), so a forward reads the table once, in the GEMM.
_norms_cache: dict[str, tuple[tuple, torch.Tensor]] = {}


def _row_norms(table: torch.Tensor) -> torch.Tensor:
    """``||e_v||^2`` in fp32, cached per table (keyed by storage, shape, dtype and version)."""
    try:
        version = table._version
    except RuntimeError:  # an inference tensor has no version counter
        version = -1
    key = (table.data_ptr(), tuple(table.shape), table.dtype, table.device, version)
    hit = _norms_cache.get("last")
    if hit is not None and hit[0] == key and version >= 0:
        return hit[1]
    norms = torch.linalg.vector_norm(table, dim=-1, dtype=torch.float32).square()
    _norms_cache["last"] = key, norms
    return norms


def _exact_nearest(x: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 nearest rows of ``x`` ``[n, d]`` over the whole table, read in chunks of rows."""
    best = torch.full((x.shape[0],), float("inf"), device=x.device)
    index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, table.shape[0], ROW_CHUNK):
        rows = table[start : start + ROW_CHUNK].float() * scale
        dist = torch.cdist(x.float(), rows, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not |a|²+|b|²-2ab
        value, arg = dist.min(-1)
        better = value < best
        best, index = torch.where(better, value, best), torch.where(better, arg + start, index)
    return index


def nearest_rows(x: torch.Tensor, table: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Index of the row of ``scale * table`` nearest (L2) to each row of ``x`` ``[n, d]``; ``[n]``."""
    norms = _row_norms(table)
    k = min(CANDIDATES, table.shape[0])
    # bound on the GEMM's rounding of s x.e_v (output rounding, fp32 accumulation over d): twice it
    # separates "surely not the nearest" from "maybe"
    eps = torch.finfo(table.dtype).eps * (
        1.0 if table.dtype in (torch.bfloat16, torch.float16) else table.shape[1] ** 0.5
    )
    top_norm = float(norms.max().sqrt()) * scale
    picks = []
    for chunk in x.split(CHUNK):
        scores = torch.nn.functional.linear(chunk.to(table.dtype), table).float()
        scores.mul_(scale).sub_(norms, alpha=0.5 * scale * scale)
        value, candidates = scores.topk(k, dim=-1)  # [c, k], best first
        rows = table[candidates].float() * scale  # [c, k, d]
        dist = (rows - chunk.float()[:, None, :]).square().sum(-1)
        pick = candidates.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
        tol = 2 * eps * chunk.float().norm(dim=-1) * top_norm
        unsure = (value[:, -1] >= value[:, 0] - 2 * tol) & (k < table.shape[0])
        if bool(unsure.any()):  # a cluster of near-ties wider than the candidates: search it all
            pick[unsure] = _exact_nearest(chunk[unsure], table, scale)
        picks.append(pick)
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.library.custom_op("eigenpatch::snap_rows", mutates_args=())
def snap_rows(x: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row of ``x`` ``[n, d]`` replaced by its nearest row of ``scale * table`` (in ``x``'s dtype)."""
    if x.shape[0] == 0:
        return x.clone()
    rows = table[nearest_rows(x, table, scale)]
    return (rows * scale if scale != 1.0 else rows).to(x.dtype)


@snap_rows.register_fake
def _(x: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


def _backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    """The honest derivative: the map is piecewise constant, so zero almost everywhere (an attacker
    who wants a signal through it must straight-through it himself, as ``bench/`` does)."""
    return torch.zeros_like(grad), None, None


snap_rows.register_autograd(_backward)


def half_gaps(table: torch.Tensor, sample: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``sample`` random rows (their ids, and per row): half the distance to the nearest
    *other* row, the radius within which a perturbation of that token's embedding provably snaps
    back to it."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(table.shape[0], generator=g)[: min(sample, table.shape[0])]
    t = table.float()
    norms = t.square().sum(-1)
    gaps = []
    for chunk in idx.split(CHUNK):
        d2 = norms[chunk, None] + norms[None, :] - 2 * t[chunk] @ t.T  # [c, V]
        d2[torch.arange(len(chunk)), chunk] = float("inf")
        gaps.append(d2.min(-1).values.clamp_min(0).sqrt() / 2)
    return idx, torch.cat(gaps)
