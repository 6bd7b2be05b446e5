"""``structured_ffn``: replace each SwiGLU feed-forward block's matrices by a structured form.

Structures (``eigenpatch.format.structured``): ``lowrank`` (gate and up share one input factor, down is
a factor pair), ``blockdense`` and ``blockshuffle`` (each of gate, up, down). ``ratio`` of the FFN
parameters is removed, per matrix (the structure, not a rank allocator, is what is being studied).
With calibration text, initialization minimizes the output error on its activations (whitening
and least-squares refits, ``structured_init``); without, the plain Frobenius error.

The pre-merge threshold (calls with at most that many tokens run the merged dense matrix) is
measured here on this machine, once per distinct layer shape (``premerge="auto"``), and stored per
layer; ``"off"`` stores 0 (never merge: no dense copy in memory), ``"always"`` stores None, an
int stores itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.calibration import calibration_windows, collect_input_covariances
from eigenpatch.errors import UsageError
from eigenpatch.format.structured import (
    ALWAYS_MERGED,
    BlockDenseLinear,
    BlockShuffleLinear,
    SharedLowRankLinear,
    StructuredLinear,
)
from eigenpatch.patchers.structured_ffn.config import StructuredFFN
from eigenpatch.patchers.structured_ffn.init import (
    blockdense_rank,
    blockshuffle_rank,
    init_blockdense,
    init_blockshuffle,
    init_lowrank,
    init_shared_lowrank,
    lowrank_rank,
    shared_rank,
)
from eigenpatch.patchers.structured_ffn.premerge import measure_crossover
from eigenpatch.patchers.targets import replace_module
from eigenpatch.recipe import PatchContext, TransformResult, register_transform


def find_ffns(model: nn.Module, config: StructuredFFN) -> dict[str, nn.Module]:
    """MLP blocks (by name) that have dense ``gate``, ``up`` and ``down`` Linears."""
    found = {
        name: module
        for name, module in model.named_modules()
        if all(isinstance(getattr(module, leaf, None), nn.Linear) for leaf in (config.gate, config.up, config.down))
    }
    if not found:
        raise UsageError(
            f"no feed-forward block with dense {config.gate}/{config.up}/{config.down} Linears in this model "
            "(structured_ffn supports gated MLPs: Llama, Qwen2, Mistral, Gemma ...)"
        )
    return found


def _covariances(
    model: nn.Module, ffns: dict[str, nn.Module], config: StructuredFFN, context: PatchContext
) -> dict[str, torch.Tensor | None]:
    names = [f"{p}.{leaf}" for p in ffns for leaf in (config.gate, config.up, config.down)]
    if not config.whiten:
        return dict.fromkeys(names)
    if context.calib_text is None or context.tokenizer is None:
        raise UsageError("structured_ffn with whitening needs calibration text and a tokenizer (or whiten=False)")
    windows = calibration_windows(
        context.tokenizer, context.calib_text, config.calib_windows, config.calib_seq_len, config.seed
    )
    linears = {n: model.get_submodule(n) for n in names}
    covs = collect_input_covariances(model, linears, windows, show_progress=context.show_progress)
    return {n: covs[n].value for n in names}


def _structure_one(
    name: str, lin: nn.Linear, cov: torch.Tensor | None, config: StructuredFFN
) -> tuple[nn.Module, dict[str, Any]]:
    """The structured replacement of one matrix (the gate/up pair is handled by the caller)."""
    keep, out_f, in_f = 1.0 - config.ratio, lin.out_features, lin.in_features
    w, b = lin.weight, lin.bias
    if config.structure == "lowrank":  # down_proj: a factor pair of its own (no partner), pre-merge capable
        rank = lowrank_rank(keep, in_f, out_f)
        module = SharedLowRankLinear(in_f, out_f, rank, bias=b is not None, dtype=w.dtype)
        up, down = init_lowrank(w, rank, cov)
        _copy(module, [("lowrank_down", down), ("lowrank_up", up)], b)
        return module, {"rank": rank}
    if config.structure == "blockdense":
        rank = blockdense_rank(keep, in_f, out_f, config.blocks)
        module = BlockDenseLinear(in_f, out_f, rank, config.blocks, bias=b is not None, dtype=w.dtype)
        _copy(module, zip(("block_down", "block_up"), init_blockdense(w, rank, config.blocks, cov), strict=True), b)
        return module, {"rank": rank}
    s = blockshuffle_rank(keep, in_f, out_f, config.blocks)
    module = BlockShuffleLinear(in_f, out_f, s, config.blocks, bias=b is not None, dtype=w.dtype)
    _copy(module, zip(("shuffle_in", "shuffle_out"), init_blockshuffle(w, s, config.blocks, cov), strict=True), b)
    return module, {"block_rank": s}


def _copy(module: nn.Module, tensors, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        for attr, value in tensors:
            getattr(module, attr).copy_(value)
        if bias is not None:
            module.bias.copy_(bias)


def _shared_pair(
    prefix: str, gate: nn.Linear, up: nn.Linear, cov: torch.Tensor | None, config: StructuredFFN
) -> tuple[SharedLowRankLinear, SharedLowRankLinear, int]:
    rank = shared_rank(1.0 - config.ratio, gate.in_features, gate.out_features)
    (up_g, up_u), down = init_shared_lowrank([gate.weight, up.weight], rank, cov)
    kw = {"dtype": gate.weight.dtype}
    owner = SharedLowRankLinear(gate.in_features, gate.out_features, rank, bias=gate.bias is not None, **kw)
    user = SharedLowRankLinear(
        up.in_features,
        up.out_features,
        rank,
        bias=up.bias is not None,
        owner=owner,
        down_from=f"{prefix}.{config.gate}",
        **kw,
    )
    _copy(owner, [("lowrank_down", down), ("lowrank_up", up_g)], gate.bias)
    _copy(user, [("lowrank_up", up_u)], up.bias)
    return owner, user, rank


def _signature(module: nn.Module) -> tuple[Any, ...]:
    return (type(module).__name__, *sorted(module.spec().items())) if isinstance(module, StructuredLinear) else ()


def _set_premerge(groups: list[list[StructuredLinear]], config: StructuredFFN, show_progress: bool) -> dict[str, Any]:
    """Store the threshold on every structured module (measured once per distinct group); report by group shape."""
    report: dict[str, Any] = {}
    measured: dict[tuple[Any, ...], int | None] = {}
    for group in tqdm(
        groups, desc="pre-merge timing", unit="group", disable=not show_progress or config.premerge != "auto"
    ):
        label = "+".join(f"{m.kind}[{m.out_features}x{m.in_features}]" for m in group)
        if config.premerge == "auto":
            key = tuple(_signature(m) for m in group)
            if key not in measured:
                measured[key], timings = measure_crossover(group)
                report[label] = {"premerge_max_tokens": measured[key], "seconds": timings}
            threshold = measured[key]
        else:
            threshold = {"off": 0, "always": ALWAYS_MERGED}.get(config.premerge, config.premerge)
            report[label] = {"premerge_max_tokens": threshold}
        for m in group:
            m.premerge_max_tokens = threshold
            m.merged = None  # measurement builds transient copies; the loader builds its own
    return report


@register_transform(StructuredFFN)
def apply_structured_ffn(model: nn.Module, config: StructuredFFN, context: PatchContext) -> TransformResult:
    ffns = find_ffns(model, config)
    covs = _covariances(model, ffns, config, context)
    before = after = 0
    groups: list[list[StructuredLinear]] = []
    ranks: dict[str, Any] = {}
    for prefix, mlp in tqdm(ffns.items(), desc=config.structure, unit="ffn", disable=not context.show_progress):
        gate, up, down = (getattr(mlp, leaf) for leaf in (config.gate, config.up, config.down))
        before += sum(lin.weight.numel() for lin in (gate, up, down))
        names = [f"{prefix}.{leaf}" for leaf in (config.gate, config.up, config.down)]
        if config.structure == "lowrank":
            owner, user, rank = _shared_pair(prefix, gate, up, covs[names[0]], config)
            replace_module(model, names[0], owner)
            replace_module(model, names[1], user)
            groups.append([owner, user])
            ranks[f"{prefix}.{config.gate}+{config.up}"] = rank
            new_down, info = _structure_one(names[2], down, covs[names[2]], config)
            replace_module(model, names[2], new_down)
            groups.append([new_down])
            ranks[names[2]] = info["rank"]
        else:
            for name, lin in zip(names, (gate, up, down), strict=True):
                new, info = _structure_one(name, lin, covs[name], config)
                replace_module(model, name, new)
                groups.append([new])
                ranks[name] = next(iter(info.values()))
        after += sum(
            p.numel()
            for leaf in (config.gate, config.up, config.down)
            for n, p in getattr(mlp, leaf).named_parameters(recurse=False)
            if n != "bias"
        )
    timings = _set_premerge(groups, config, context.show_progress)
    return TransformResult(
        details={
            "ffn_params_before": before,
            "ffn_params_after": after,
            "ffn_blocks": len(ffns),
            "ranks": ranks,
            "premerge_thresholds": timings,
        }
    )
