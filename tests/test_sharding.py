"""Tensor-parallel placement of factor pairs: shards recombine to the unsharded layer (no vLLM needed)."""

import pytest
import torch

from eigenpatch.serving.sharding import column_shard_rows, row_shard_columns


def _factor_pair(out: int, inp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(out + inp + rank)
    return (
        torch.randn(rank, inp, generator=gen, dtype=torch.float64),
        torch.randn(out, rank, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_factor_shards_concatenate_to_the_full_output(tp):
    down, up = _factor_pair(out=96, inp=64, rank=12)
    x = torch.randn(5, 64, dtype=torch.float64)
    parts = []
    for rank in range(tp):
        start, rows = column_shard_rows(96, 96 // tp, rank)
        parts.append((x @ down.T) @ up[start : start + rows].T)  # down replicated, up split by rows
    torch.testing.assert_close(torch.cat(parts, -1), x @ (up @ down).T)


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_factor_shards_sum_to_the_full_output(tp):
    down, up = _factor_pair(out=64, inp=96, rank=12)
    x = torch.randn(5, 96, dtype=torch.float64)
    total = torch.zeros(5, 64, dtype=torch.float64)
    for rank in range(tp):
        start, cols = row_shard_columns(96, 96 // tp, rank)
        total += (x[:, start : start + cols] @ down[:, start : start + cols].T) @ up.T  # the all-reduce
    torch.testing.assert_close(total, x @ (up @ down).T)


def test_gqa_kv_shards_are_replicated_when_heads_are_fewer_than_ranks():
    head_dim, kv_heads, tp = 32, 2, 4  # two KV heads over four ranks: each head on two ranks
    replicas = tp // kv_heads
    starts = [column_shard_rows(kv_heads * head_dim, head_dim, r, replicas)[0] for r in range(tp)]
    assert starts == [0, 0, head_dim, head_dim]
    with pytest.raises(ValueError, match="rows"):
        column_shard_rows(kv_heads * head_dim, head_dim, tp, replicas=1)


def test_cpu_thread_binding_gives_each_tp_worker_its_own_cores():
    from eigenpatch.serving.launcher import cpu_thread_binding, tensor_parallel_size

    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_thread_binding(1, [0, 1]) is None and cpu_thread_binding(4, [0, 1]) is None
    assert tensor_parallel_size(["--dtype", "float32", "--tensor-parallel-size", "2"]) == 2
    assert tensor_parallel_size(["-tp", "4"]) == 4 and tensor_parallel_size(["--tensor-parallel-size=2"]) == 2
    assert tensor_parallel_size([]) == 1


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind", ["blockdense", "blockshuffle"])
def test_block_structured_shards_recombine_for_column_and_row_slots(kind, tp):
    from eigenpatch.format.structured import BlockDenseLinear, BlockShuffleLinear
    from eigenpatch.serving.sharding import local_block_module, local_block_shapes, slice_block_tensor

    torch.manual_seed(tp)
    full = BlockDenseLinear(64, 96, 32, 4) if kind == "blockdense" else BlockShuffleLinear(64, 96, 3, 4)
    for p in full.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = full(x)
        for column in (True, False):
            outputs = []
            for rank in range(tp):
                local = local_block_module(full.spec(), column, tp)
                shapes = local_block_shapes(full.spec(), column, tp)
                for pname, param in local.named_parameters():
                    piece = slice_block_tensor(kind, pname, getattr(full, pname), column, rank, tp)
                    assert tuple(piece.shape) == shapes[pname] == tuple(param.shape)
                    param.copy_(piece)
                xin = x if column else x.chunk(tp, -1)[rank]
                outputs.append(local(xin))
            got = torch.cat(outputs, -1) if column else sum(outputs)  # column: concat; row: all-reduce
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_blocks_not_divisible_by_tp_are_refused():
    from eigenpatch.serving.sharding import local_block_module

    with pytest.raises(ValueError, match="not divisible by tensor parallel size 4"):
        local_block_module({"kind": "blockdense", "blocks": 2, "in_features": 8, "out_features": 8, "rank": 4}, True, 4)


@pytest.mark.parametrize(("tp", "bits"), [(2, 4), (4, 4), (2, 2), (3, 8), (3, 3)])
def test_quantized_shards_are_quantized_linears_that_recombine_to_the_full_output(tp, bits):
    """Column slots by output rows concatenate; row slots by whole groups (zero points repacked
    when a rank's first group is not on a byte) sum to the unsharded layer's output."""
    from eigenpatch.format.quantized import QuantizedLinear
    from eigenpatch.quantizer import quantize_rtn
    from eigenpatch.serving.sharding import slice_quantized

    out, inp, group = 48, 16 * 3 * 4, 16  # 12 groups: split by 2, 3 and 4 ranks
    full = quantize_rtn(torch.randn(out, inp), bits, group, fp16_scales=True).module()
    spec = full.spec()
    stored = {name: getattr(full, name).data for name in ("qweight", "scales", "zeros")}
    x = torch.randn(3, inp)
    expected = full(x)

    def local(column: bool, start: int, length: int) -> QuantizedLinear:
        shape = (inp, length) if column else (length, out)
        module = QuantizedLinear(*shape, bits, group)
        for name, tensor in stored.items():
            getattr(module, name).data = slice_quantized(name, tensor, spec, column, start, length)
        return module

    columns = [local(True, *column_shard_rows(out, out // tp, r)) for r in range(tp)]
    torch.testing.assert_close(torch.cat([m(x) for m in columns], -1), expected)
    rows = [(row_shard_columns(inp, inp // tp, r), r) for r in range(tp)]
    partial = sum(local(False, s, n)(x[:, s : s + n]) for (s, n), _ in rows)
    torch.testing.assert_close(partial, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_quantized_factor_pair_shards_recombine_to_the_full_output(tp):
    """A quantized pair placed like a factor pair: column slots slice ``up``'s rows, row slots slice
    ``down``'s input groups; each rank's slice is itself a quantized pair."""
    from eigenpatch.format.quantized import QuantizedLowRankLinear
    from eigenpatch.quantizer import quantize_rtn
    from eigenpatch.serving.sharding import slice_quantized_pair

    out, inp, rank, group = 64, 128, 32, 16
    down = quantize_rtn(torch.randn(rank, inp), 4, group, fp16_scales=True).module()
    up = quantize_rtn(torch.randn(out, rank), 4, group, fp16_scales=True).module()
    full = QuantizedLowRankLinear.from_factors(down, up)
    spec, stored = full.spec(), {n: p.data for n, p in full.named_parameters()}
    x = torch.randn(3, inp)
    expected = full(x)

    def local(column: bool, start: int, length: int) -> QuantizedLowRankLinear:
        module = QuantizedLowRankLinear(*((inp, length) if column else (length, out)), rank, 4, group)
        for name, tensor in stored.items():
            module.get_parameter(name).data = slice_quantized_pair(name, tensor, spec, column, start, length)
        return module

    columns = [local(True, *column_shard_rows(out, out // tp, r)) for r in range(tp)]
    torch.testing.assert_close(torch.cat([m(x) for m in columns], -1), expected)
    partial = sum(
        local(False, s, n)(x[:, s : s + n]) for s, n in (row_shard_columns(inp, inp // tp, r) for r in range(tp))
    )
    torch.testing.assert_close(partial, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factor_bits", [8, 16])
@pytest.mark.parametrize("tp", [2, 4])
def test_corrected_quantized_shards_recombine_to_the_full_output(tp, factor_bits):
    """The base is sliced as a quantized Linear, the correction as a factor pair (an int8 pair's
    ``correction_up`` row scales with its rows, ``correction_down``'s whole on every rank)."""
    from eigenpatch.format.corrected import CorrectedQuantizedLinear
    from eigenpatch.quantizer import quantize_rtn
    from eigenpatch.serving.sharding import slice_quantized_corrected

    out, inp, rank, group = 64, 128, 8, 16
    base = quantize_rtn(torch.randn(out, inp), 2, group, fp16_scales=True).module()
    full = CorrectedQuantizedLinear.from_parts(base, torch.randn(out, rank), torch.randn(rank, inp), None, factor_bits)
    spec, stored = full.spec(), {n: p.data for n, p in full.named_parameters()}
    x = torch.randn(3, inp)
    expected = full(x)

    def local(column: bool, start: int, length: int) -> CorrectedQuantizedLinear:
        shape = (inp, length) if column else (length, out)
        module = CorrectedQuantizedLinear(*shape, rank, 2, group, factor_bits=factor_bits)
        for name, tensor in stored.items():
            module.get_parameter(name).data = slice_quantized_corrected(name, tensor, spec, column, start, length)
        return module

    columns = [local(True, *column_shard_rows(out, out // tp, r)) for r in range(tp)]
    torch.testing.assert_close(torch.cat([m(x) for m in columns], -1), expected)
    partial = sum(
        local(False, s, n)(x[:, s : s + n]) for s, n in (row_shard_columns(inp, inp // tp, r) for r in range(tp))
    )
    torch.testing.assert_close(partial, expected, rtol=1e-3, atol=1e-3)
