"""Structured FFNs: module algebra, initialization, pre-merge policy, transform, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

import eigenpatch
from eigenpatch.errors import UsageError
from eigenpatch.format.structured import (
    ALWAYS_MERGED,
    BlockDenseLinear,
    BlockShuffleLinear,
    SharedLowRankLinear,
    StructuredLinear,
    set_premerge,
)
from eigenpatch.patchers import Heal, StructuredFFN
from eigenpatch.patchers.heal.transform import trainable_parameters
from eigenpatch.patchers.structured_ffn.init import (
    blockdense_rank,
    blockshuffle_rank,
    init_blockdense,
    init_blockshuffle,
    refit_output,
    shared_rank,
)
from eigenpatch.patchers.structured_ffn.premerge import crossover, measure_crossover
from eigenpatch.zoo import resolve_text

TEXT = resolve_text("news", split="calib")


def _random_modules() -> list[StructuredLinear]:
    torch.manual_seed(0)
    owner = SharedLowRankLinear(48, 64, 12, bias=True)
    user = SharedLowRankLinear(48, 64, 12, owner=owner, down_from="gate")
    modules = [owner, user, BlockDenseLinear(48, 40, 16, 4, bias=True), BlockShuffleLinear(48, 40, 3, 4, bias=True)]
    for m in modules:
        for p in m.parameters():
            torch.nn.init.normal_(p)
    return modules


@pytest.mark.parametrize("index", range(4), ids=["shared-owner", "shared-user", "blockdense", "blockshuffle"])
def test_structured_forward_is_its_dense_matrix_and_merged_form_agrees(index):
    module = _random_modules()[index]
    x = torch.randn(2, 5, module.in_features)
    expected = F.linear(x, module.dense_weight(), module.bias)
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
        module.premerge_max_tokens = ALWAYS_MERGED
        module.build_merged()
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)


def test_blockshuffle_dense_blocks_have_rank_s_and_blockdense_input_stage_is_block_diagonal():
    shuffle, dense = _random_modules()[3], _random_modules()[2]
    w = shuffle.dense_weight()
    for i in range(4):
        for j in range(4):
            block = w[i * 10 : (i + 1) * 10, j * 12 : (j + 1) * 12]
            assert torch.linalg.matrix_rank(block) == 3
    # one input block only moves R/B latent dims: zeroing it changes nothing else
    x = torch.randn(1, 48)
    x2 = x.clone()
    x2[:, :12] = 0
    h, h2 = (torch.einsum("bkn,bn->bk", dense.block_down, v.view(4, 12)) for v in (x, x2))
    assert torch.equal(h[1:], h2[1:]) and not torch.equal(h[0], h2[0])


def test_shared_partner_reuses_the_owner_projection_only_for_the_same_tensor():
    owner, user = _random_modules()[:2]
    x = torch.randn(3, 48)
    calls = []
    owner.register_forward_hook(lambda *a: calls.append("owner"))
    with torch.no_grad():
        owner(x)
        assert owner._memo is not None and owner._memo[0] is x
        y = user(x)
        assert owner._memo is None  # consumed: nothing held between MLP calls
        torch.testing.assert_close(y, F.linear(x, user.dense_weight()), rtol=1e-4, atol=1e-4)
        owner(x)
        other = x.clone()  # equal values, another tensor: projected afresh, still correct
        torch.testing.assert_close(user(other), y, rtol=1e-5, atol=1e-5)


def test_premerge_switches_by_token_count():
    module = _random_modules()[2]
    module.premerge_max_tokens = 4
    module.build_merged()
    module.merged = module.merged * 0  # poison the merged copy to see which path ran
    with torch.no_grad():
        assert module(torch.randn(4, 48)).abs().sum() == module.bias.abs().sum() * 4
        assert module(torch.randn(5, 48)).abs().sum() != module.bias.abs().sum() * 5
        module.premerge_max_tokens = 0
        assert module(torch.randn(1, 48)).abs().sum() != module.bias.abs().sum()
    module.premerge_max_tokens = ALWAYS_MERGED
    x = torch.randn(1, 48, requires_grad=True)
    module(x).sum().backward()  # with gradients on, the structured tensors are used (healing)
    assert module.block_up.grad is not None


def test_crossover_rule():
    ms = 1e-3
    assert crossover({1: (1 * ms, 2 * ms), 64: (5 * ms, 4 * ms), 512: (9 * ms, 5 * ms)}) == 1
    assert crossover({1: (1 * ms, 2 * ms), 64: (5 * ms, 6 * ms)}) is ALWAYS_MERGED
    assert crossover({1: (2 * ms, 1 * ms), 64: (6 * ms, 5 * ms)}) == 0
    # winners that flip along the grid: the threshold with the smallest worst-case slowdown
    assert crossover({1: (1, 2), 8: (2, 1), 64: (3, 4), 512: (9, 5)}) == 1
    assert crossover({1: (1.36, 1), 8: (1, 1.59), 64: (1.06, 1), 512: (1.5, 1)}) == 8
    # merging must buy more than the noise margin, or no dense copy is kept
    assert crossover({1: (1.0, 1.02), 8: (2, 1)}) == 0
    assert crossover({1: (1.0, 1.10), 8: (2, 1)}) == 1


def test_measured_crossover_runs_on_a_real_group():
    owner, user = _random_modules()[:2]
    threshold, timings = measure_crossover([owner, user], grid=(1, 16))
    assert set(timings) == {1, 16} and all(a > 0 and b > 0 for a, b in timings.values())
    assert threshold in (0, 1, ALWAYS_MERGED)
    assert owner.merged is None and owner.premerge_max_tokens == 0  # measurement leaves no copy behind


def test_full_size_structures_reproduce_the_matrix_exactly():
    torch.manual_seed(1)
    w = torch.randn(40, 48, dtype=torch.float64)
    down, up = init_blockdense(w, 48, 4, None)  # R/B = in/B: every block kept whole
    m = BlockDenseLinear(48, 40, 48, 4, dtype=torch.float64)
    m.block_down.data, m.block_up.data = down, up
    torch.testing.assert_close(m.dense_weight(), w)
    s_in, s_out = init_blockshuffle(w, 10, 4, None)  # s = min(out, in) / B: full-rank blocks
    m = BlockShuffleLinear(48, 40, 10, 4, dtype=torch.float64)
    m.shuffle_in.data, m.shuffle_out.data = s_in, s_out
    torch.testing.assert_close(m.dense_weight(), w)


def test_least_squares_refit_never_loses_to_the_per_block_output_factor():
    from eigenpatch.patchers.lowrank.factorize import factorize, whitening

    torch.manual_seed(2)
    w = torch.randn(32, 64, dtype=torch.float64)
    x = torch.randn(64, 500, dtype=torch.float64) * torch.linspace(0.1, 3, 64, dtype=torch.float64)[:, None]
    x[16:32] += 2 * x[:16]  # correlated input blocks: what the per-block SVDs cannot see
    cov = x @ x.T
    down, up = init_blockdense(w, 16, 4, cov)
    g = torch.block_diag(*down)
    blocks = [
        factorize(w[:, j * 16 : (j + 1) * 16], 4, whitening(cov[j * 16 : (j + 1) * 16, j * 16 : (j + 1) * 16]))
        for j in range(4)
    ]
    torch.testing.assert_close(torch.stack([d for _, d in blocks]), down)  # same input stage
    per_block_up = torch.cat([u for u, _ in blocks], dim=1)
    err_refit = torch.linalg.norm((w - up @ g) @ x)
    err_per_block = torch.linalg.norm((w - per_block_up @ g) @ x)
    assert err_refit < 0.99 * err_per_block, (err_refit, err_per_block)
    assert err_refit <= torch.linalg.norm((w - refit_output(w, g, None) @ g) @ x)  # data beats no data


def test_budgets_keep_the_requested_fraction():
    for keep in (0.7, 0.5):
        r = shared_rank(keep, 576, 1536)
        assert r * (576 + 2 * 1536) <= keep * 2 * 576 * 1536 < (r + 1) * (576 + 2 * 1536)
        rd = blockdense_rank(keep, 576, 1536, 4)
        assert rd % 4 == 0 and rd * (1536 + 144) <= keep * 576 * 1536 < (rd + 4) * (1536 + 144)
        s = blockshuffle_rank(keep, 1536, 576, 4)
        assert 4 * s * (1536 + 576) <= keep * 576 * 1536 < 4 * (s + 1) * (1536 + 576)


@pytest.mark.parametrize("structure", ["lowrank", "blockdense", "blockshuffle"])
def test_transform_cuts_ffn_params_and_round_trips(structure, tiny_tokenizer, tmp_path):
    model = make_tiny("llama")
    config = StructuredFFN(structure=structure, ratio=0.3, calib_windows=4, calib_seq_len=64, premerge=8)
    report = eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, calib_text=TEXT, show_progress=False)
    step = report["steps"][0]
    assert 0.65 <= step["ffn_params_after"] / step["ffn_params_before"] <= 0.70  # block granularity on tiny shapes
    ids = torch.tensor([tiny_tokenizer(TEXT[:2000])["input_ids"][:40]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    eigenpatch.save(model, tmp_path / "s", tokenizer=tiny_tokenizer)
    layers = (tmp_path / "s" / "config.json").read_text()
    assert f'"{ {"lowrank": "lowrank_shared"}.get(structure, structure) }"' in layers
    reloaded = eigenpatch.load(tmp_path / "s")
    merged = [m for m in reloaded.modules() if isinstance(m, StructuredLinear) and m.merged is not None]
    assert merged and all(m.premerge_max_tokens == 8 for m in merged)  # built at load, threshold kept
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)  # 40 > 8
        torch.testing.assert_close(reloaded(input_ids=ids[:, :8]).logits, expected[:, :8], rtol=1e-4, atol=1e-4)
        assert set_premerge(reloaded, enabled=False) == 0
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_whitened_init_beats_plain_on_calibration_text(tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer(resolve_text("news", split="eval")[:3000])["input_ids"][:128]])
    dense = make_tiny("qwen2")
    with torch.no_grad():
        target = dense(input_ids=ids).logits
    errors = {}
    for whiten in (False, True):
        model = make_tiny("qwen2")
        config = StructuredFFN(
            structure="blockdense", ratio=0.5, whiten=whiten, calib_windows=8, calib_seq_len=64, premerge="off"
        )
        eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, calib_text=TEXT, show_progress=False)
        with torch.no_grad():
            errors[whiten] = float((model(input_ids=ids).logits - target).pow(2).mean())
    assert errors[True] < errors[False], errors


def test_heal_trains_structured_tensors(tiny_tokenizer):
    model = make_tiny("llama")
    recipe = [
        StructuredFFN(structure="blockshuffle", ratio=0.3, whiten=False, premerge="off"),
        Heal(steps=2, loss="lm", batch_size=1, seq_len=32, warmup_steps=1),
    ]
    eigenpatch.patch(model, recipe, tokenizer=tiny_tokenizer, calib_text=TEXT, show_progress=False)
    names = set(trainable_parameters(model))
    assert names and all(n.endswith(("shuffle_in", "shuffle_out")) for n in names)


def test_bad_options_are_clear_errors():
    with pytest.raises(UsageError, match="unknown FFN structure"):
        StructuredFFN(structure="monarch")
    with pytest.raises(UsageError, match="premerge"):
        StructuredFFN(premerge="sometimes")
    with pytest.raises(UsageError, match="no feed-forward block"):
        eigenpatch.patch(make_tiny("llama"), StructuredFFN(gate="w1", whiten=False), show_progress=False)


def test_patch_model_structured_ffn_with_attention_compression(tmp_path, tiny_tokenizer, capsys):
    import json

    from eigenpatch.cli import patch_model_main
    from eigenpatch.format.lowrank import LowRankLinear

    src = tmp_path / "tiny"
    make_tiny("qwen2").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    argv = [str(src), "--structured-ffn", "blockshuffle", "--ffn-ratio", "0.5", "--ffn-blocks", "2", "--premerge", "16"]
    argv += ["--compress", "0.3", "--method", "svd", "--calib", "news", "--calib-seq-len", "64", "-o", str(out), "-q"]
    assert patch_model_main(argv) == 0
    printed = capsys.readouterr().out
    assert "FFN matrices (blockshuffle)" in printed and "merged up to 16 tokens" in printed
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [step["transform"] for step in qconfig["recipe"]] == ["structured_ffn", "svd"]
    kinds = {name.rpartition(".")[2]: spec["kind"] for name, spec in qconfig["layers"].items()}
    assert kinds == {
        "q_proj": "lowrank",
        "k_proj": "lowrank",
        "v_proj": "lowrank",
        "o_proj": "lowrank",
        "gate_proj": "blockshuffle",
        "up_proj": "blockshuffle",
        "down_proj": "blockshuffle",
    }
    reloaded = eigenpatch.load(out)
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == 8


def test_patch_model_needs_something_to_do(tiny_dir, tmp_path, capsys):
    from eigenpatch.cli import patch_model_main
    from eigenpatch.errors import EXIT_USAGE

    assert patch_model_main([str(tiny_dir), "-o", str(tmp_path / "x"), "-q"]) == EXIT_USAGE
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize("structure", ["lowrank", "blockdense", "blockshuffle"])
def test_structured_checkpoint_exports_to_onnx_with_parity(structure, tiny_tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from eigenpatch.export.onnx import export_onnx
    from eigenpatch.export.runtime import MODEL_FILE, OnnxCausalLM

    model = make_tiny("llama")
    config = StructuredFFN(structure=structure, ratio=0.3, calib_windows=4, calib_seq_len=64, premerge=2)
    eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, calib_text=TEXT, show_progress=False)
    eigenpatch.save(model, tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    loaded = eigenpatch.load(tmp_path / "ckpt")  # merged copies built: export must still trace the structure
    assert any(isinstance(m, StructuredLinear) and m.merged is not None for m in loaded.modules())
    meta = export_onnx(loaded, tmp_path / "onnx", tokenizer=tiny_tokenizer)
    assert meta["parity"]["max_abs_logit_diff"] <= 1e-4
    graph = onnx.load(str(tmp_path / "onnx" / MODEL_FILE), load_external_data=False).graph
    names = {i.name for i in graph.initializer}
    assert not any("merged" in n for n in names)  # the graph carries the small form only
    if structure == "lowrank":  # the shared input factor is applied once per layer, not twice
        matmuls = sum(n.op_type == "MatMul" for n in graph.node)
        # per layer: q, k, v, o, two attention products, FFN 1 shared + 2 up + 2 down; then the head
        assert matmuls == loaded.config.num_hidden_layers * (4 + 2 + 5) + 1
    ids = tiny_tokenizer("The fire spread towards the town", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # transformers decodes through the merged form (1 token <= 2), prefill structured
        reference = loaded.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
    assert OnnxCausalLM(tmp_path / "onnx").generate(ids, max_new_tokens=16) == reference.tolist()
