"""Tensor-parallel placement of factor pairs: which rows / columns each rank holds.

Kept free of vLLM imports so the arithmetic is unit-tested everywhere (tests/test_serving.py
checks that the shards recombine to the unsharded layer for TP = 2 and 4, GQA included).

* column-parallel slot (q/k/v, gate/up): ``up`` is split by output rows, ``down`` replicated;
  each rank computes its own output slice, no communication.
* row-parallel slot (o_proj, down_proj): ``down`` is split by input columns, ``up`` replicated;
  the ranks' partial outputs sum (the layer's all-reduce) to the full output.
"""

from __future__ import annotations


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
