"""Tensor-parallel placement of factor pairs: which rows / columns each rank holds.

Kept free of vLLM imports so the arithmetic is unit-tested everywhere (tests/test_serving.py
checks that the shards recombine to the unsharded layer for TP = 2 and 4, GQA included).

* column-parallel slot (q/k/v, gate/up): ``up`` is split by output rows, ``down`` replicated;
  each rank computes its own output slice, no communication.
* row-parallel slot (o_proj, down_proj): ``down`` is split by input columns, ``up`` replicated;
  the ranks' partial outputs sum (the layer's all-reduce) to the full output.
"""

from __future__ import annotations

from typing import Any


def column_shard_rows(full_rows: int, local_rows: int, tp_rank: int, replicas: int = 1) -> tuple[int, int]:
    """(start, length) of the output rows of one shard that live on ``tp_rank``.

    ``replicas`` > 1 when a shard has fewer heads than TP ranks (GQA's k/v with ``num_kv_heads
    < tp``): consecutive ranks then hold the same rows, as vLLM's ``QKVParallelLinear`` does.
    """
    start = (tp_rank // replicas) * local_rows
    if start + local_rows > full_rows:
        raise ValueError(f"TP rank {tp_rank} needs rows {start}:{start + local_rows} of a {full_rows}-row shard")
    return start, local_rows


def row_shard_columns(full_cols: int, local_cols: int, tp_rank: int) -> tuple[int, int]:
    """(start, length) of the input columns a row-parallel layer's ``tp_rank`` holds."""
    start = tp_rank * local_cols
    if start + local_cols > full_cols:
        raise ValueError(f"TP rank {tp_rank} needs columns {start}:{start + local_cols} of {full_cols}")
    return start, local_cols


# -- block-structured FFN layers (blockdense, blockshuffle): tensor parallelism by blocks -------
# A rank holds whole blocks, never a part of one, so TP must divide the number of blocks.
#   column slot (gate/up): the input stage is replicated; the output rows a rank computes are
#     whole output blocks (blockshuffle) or rows of the dense output stage (blockdense);
#   row slot (down_proj): a rank holds the input blocks of its input columns and the output-stage
#     columns that read their latents; partial outputs sum in the layer's all-reduce.


def check_blocks(blocks: int, tp_size: int, name: str) -> None:
    if blocks % tp_size:
        raise ValueError(f"eigenpatch: {name} has {blocks} blocks, not divisible by tensor parallel size {tp_size}")


def local_block_shapes(spec: dict[str, Any], column: bool, tp_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one rank's tensors (checkpoint names) for a blockdense / blockshuffle spec."""
    b, i, o = spec["blocks"], spec["in_features"], spec["out_features"]
    if spec["kind"] == "blockdense":
        k = spec["rank"] // b
        if column:
            return {"block_down": (b, k, i // b), "block_up": (o // tp_size, spec["rank"])}
        return {"block_down": (b // tp_size, k, i // b), "block_up": (o, spec["rank"] // tp_size)}
    s = spec["block_rank"]
    if column:
        return {"shuffle_in": (b, b // tp_size, s, i // b), "shuffle_out": (b // tp_size, o // b, b, s)}
    return {"shuffle_in": (b // tp_size, b, s, i // b), "shuffle_out": (b, o // b, b // tp_size, s)}


def slice_block_tensor(kind: str, pname: str, tensor: Any, column: bool, tp_rank: int, tp_size: int) -> Any:
    """This rank's part of a full checkpoint tensor (see :func:`local_block_shapes`)."""
    axis = {
        ("blockdense", "block_down", True): None,
        ("blockdense", "block_up", True): 0,
        ("blockdense", "block_down", False): 0,
        ("blockdense", "block_up", False): 1,
        ("blockshuffle", "shuffle_in", True): 1,
        ("blockshuffle", "shuffle_out", True): 0,
        ("blockshuffle", "shuffle_in", False): 0,
        ("blockshuffle", "shuffle_out", False): 2,
    }[(kind, pname, column)]
    return tensor if axis is None else tensor.chunk(tp_size, axis)[tp_rank]


def local_block_module(spec: dict[str, Any], column: bool, tp_size: int, dtype: Any = None) -> Any:
    """An empty structured module with one rank's shapes: the same forward code runs the slice."""
    from eigenpatch.format.structured import BlockDenseLinear, BlockShuffleLinear

    b, i, o = spec["blocks"], spec["in_features"], spec["out_features"]
    check_blocks(b, tp_size, f"a {spec['kind']} layer")
    if spec["kind"] == "blockdense":
        if column:
            return BlockDenseLinear(i, o // tp_size, spec["rank"], b, dtype=dtype)
        return BlockDenseLinear(i // tp_size, o, spec["rank"] // tp_size, b // tp_size, dtype=dtype)
    s = spec["block_rank"]
    if column:
        return BlockShuffleLinear(i, o // tp_size, s, b, out_blocks=b // tp_size, dtype=dtype)
    return BlockShuffleLinear(i // tp_size, o, s, b // tp_size, out_blocks=b, dtype=dtype)


# -- quantized Linears: codes, scales and zero points sliced like the weight they stand for ------
# Column slots take whole output rows of all three. Row slots take whole groups of input columns
# (so a rank's slice is itself a valid quantized Linear): the codes are a byte range (a group
# fills whole bytes), the scales a column range, and the zero points, packed along the groups,
# are unpacked and repacked when the slice does not start on a byte.


def slice_quantized(pname: str, tensor: Any, spec: dict[str, Any], column: bool, start: int, length: int) -> Any:
    """One rank's part of ``qweight`` / ``scales`` / ``zeros``: output rows ``start:+length``
    (column slot) or input columns ``start:+length`` (row slot, whole groups)."""
    from eigenpatch.format.quantized import pack, unpack

    if column:
        return tensor.narrow(0, start, length)
    group, bits, k = spec["group"], spec["bits"], spec["in_features"]
    if start % group or length % group or k % group:
        raise ValueError(
            f"eigenpatch: a quantized row-parallel slice {start}:+{length} of {k} inputs must be whole "
            f"groups of {group}; use a tensor parallel size that divides the groups"
        )
    g0, groups = start // group, length // group
    if pname == "qweight":
        return tensor.narrow(1, start * bits // 8, length * bits // 8)
    if pname == "scales":
        return tensor.narrow(1, g0, groups)
    return pack(unpack(tensor, bits, k // group).narrow(1, g0, groups), bits)


def slice_quantized_pair(pname: str, tensor: Any, spec: dict[str, Any], column: bool, start: int, length: int) -> Any:
    """One rank's part of a quantized factor pair's ``lowrank_down.*`` / ``lowrank_up.*`` tensor, placed
    as a factor pair is: a column slot slices ``up``'s output rows and replicates ``down``; a row
    slot slices ``down``'s inputs (whole groups) and replicates ``up``."""
    from eigenpatch.format import DOWN_NAME, UP_NAME

    factor, _, name = pname.partition(".")
    if factor != (UP_NAME if column else DOWN_NAME):
        return tensor  # the replicated factor
    # the sliced factor as a quantized Linear of its own: up is rank -> out, down is in -> rank
    own = {**spec, "in_features": spec["rank"]} if factor == UP_NAME else {**spec, "out_features": spec["rank"]}
    return slice_quantized(name, tensor, own, column, start, length)


def slice_quantized_corrected(
    pname: str, tensor: Any, spec: dict[str, Any], column: bool, start: int, length: int
) -> Any:
    """One rank's part of a corrected quantized Linear's tensor: ``base.*`` as a quantized Linear,
    the correction as a factor pair (``correction_up``'s rows, and an 8-bit pair's row scales with
    them, in a column slot; ``correction_down``'s input columns in a row slot; the rest replicated)."""
    part, _, name = pname.partition(".")
    if part == "base":
        return slice_quantized(name, tensor, spec, column, start, length)
    if column:
        return tensor.narrow(0, start, length) if pname in ("correction_up", "correction_up_scale") else tensor
    return tensor.narrow(1, start, length) if pname == "correction_down" else tensor
