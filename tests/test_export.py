"""ONNX export with KV cache: real export, real onnxruntime, parity with transformers."""

import json

import numpy as np
import pytest
import torch
from conftest import copy_folder, make_tiny

import eigenpatch
from eigenpatch.errors import EXIT_USAGE, UsageError

pytest.importorskip("onnxruntime")

from eigenpatch.cli import main
from eigenpatch.export.onnx import export_onnx
from eigenpatch.export.runtime import META_FILE, MODEL_FILE, OnnxCausalLM


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory, tiny_tokenizer):
    """A patched tiny model (factor pairs in the graph) exported with verification on."""
    model = make_tiny(request.param)
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    out = tmp_path_factory.mktemp("onnx") / request.param
    meta = export_onnx(model, out, tokenizer=tiny_tokenizer)
    return model, out, meta


def test_export_verifies_logits_and_greedy_tokens(exported):
    _, out, meta = exported
    assert meta["parity"]["max_abs_logit_diff"] <= 1e-4  # fp32, tiny model
    assert meta["parity"]["greedy_tokens_matched"] > 0
    assert json.loads((out / META_FILE).read_text())["parity"] == meta["parity"]
    assert (out / MODEL_FILE).is_file() and (out / "tokenizer.json").is_file()


def test_factor_pairs_lower_to_two_matmuls(exported):
    import onnx

    model, out, _ = exported
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    matmuls = sum(node.op_type in ("MatMul", "Gemm") for node in graph.node)
    pairs = sum(isinstance(m, eigenpatch.LowRankLinear) for m in model.modules())
    assert pairs == 7 * model.config.num_hidden_layers
    assert matmuls >= 2 * pairs + 1  # two per factor pair, plus attention and the head


def test_onnx_generate_matches_transformers_greedy(exported, tiny_tokenizer):
    model, out, _ = exported
    runner = OnnxCausalLM(out)
    assert runner.providers[-1] == "CPUExecutionProvider"
    ids = tiny_tokenizer("The fire spread towards the town", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :]
    assert runner.generate(ids, max_new_tokens=20) == reference.tolist()


def test_kv_cache_steps_equal_one_full_pass(exported):
    _, out, _ = exported
    runner = OnnxCausalLM(out)
    ids = np.array([[5, 17, 99, 3, 250, 41]], dtype=np.int64)
    full, _ = runner.step(ids, np.ones_like(ids), runner.empty_past(1))
    first, past = runner.step(ids[:, :4], np.ones((1, 4), dtype=np.int64), runner.empty_past(1))
    rest, _ = runner.step(ids[:, 4:], np.ones((1, 6), dtype=np.int64), past)
    assert np.abs(np.concatenate([first, rest], axis=1) - full).max() < 1e-4


def test_sampling_is_seeded(exported):
    _, out, _ = exported
    runner = OnnxCausalLM(out)
    a = runner.generate([1, 2, 3], max_new_tokens=8, do_sample=True, top_p=0.9, seed=7, stop_at_eos=False)
    b = runner.generate([1, 2, 3], max_new_tokens=8, do_sample=True, top_p=0.9, seed=7, stop_at_eos=False)
    assert a == b and len(a) == 8


def test_corrupted_onnx_is_a_clear_error(exported, tmp_path):
    _, out, _ = exported
    broken = copy_folder(out, tmp_path / "broken")
    data = (broken / MODEL_FILE).read_bytes()
    (broken / MODEL_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(UsageError, match="cannot load"):
        OnnxCausalLM(broken)


def test_mismatched_tokenizer_is_refused(exported, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from eigenpatch.zoo import resolve_text

    _, out, _ = exported
    other = copy_folder(out, tmp_path / "other")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=2048, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(resolve_text("wiki", split="eval").splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(other)
    with pytest.raises(UsageError, match="belongs to another model"):
        OnnxCausalLM(other)


def test_export_refuses_existing_output_and_leaves_it_untouched(exported):
    model, out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UsageError, match="already exists"):
        export_onnx(model, out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_export_cli_bad_model_is_one_line_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "o")]) == EXIT_USAGE
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_dynamic_int8_export_shrinks_and_reports_greedy_agreement(tmp_path, tiny_tokenizer):
    model = make_tiny("llama")
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    meta = export_onnx(model, tmp_path / "int8", tokenizer=tiny_tokenizer, precision="dynamic-int8")
    assert meta["parity"]["max_abs_logit_diff"] <= 1e-4  # fp32 checked first
    report = meta["precision"]
    assert report["kind"] == "dynamic-int8" and report["bytes"] < 0.75 * report["fp32_bytes"]  # embedding fp32
    assert len(report["greedy_steps_agreeing"]) == 5 and 0 <= report["min"] <= report["of"]
    runner = OnnxCausalLM(tmp_path / "int8")
    assert len(runner.generate([1, 2, 3], max_new_tokens=4, stop_at_eos=False)) == 4


def test_weight_only_exports_pack_every_matmul_and_round_by_their_bits(tmp_path, tiny_tokenizer):
    """Every MatMul with a constant weight, both factors of each pair and the untied head, becomes a
    MatMulNBits of 8 or 4 bits in blocks of 32 (GPTQ on a few calibration windows); the embedding
    lookup reads an int8 table. The logits move by the weights' rounding, 4 bits more than 8
    (greedy agreement is reported, not asserted: a tiny random model's next-token distribution is
    nearly flat, so any rounding flips near-ties; ``bench/export_speed.py`` measures it on SmolLM2)."""
    import onnx

    model = make_tiny("qwen2")  # untied head: it is quantized too
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    diffs = {}
    for weights, bits in (("int8", 8), ("int4", 4)):
        meta = export_onnx(
            model, tmp_path / weights, tokenizer=tiny_tokenizer, precision=weights, block=32, calib_windows=4,
            dense_bits=bits,
        )  # fmt: skip
        report = meta["precision"]
        assert report["kind"] == weights and report["block"] == 32 and report["bytes"] < report["fp32_bytes"]
        assert report["method"] == "gptq" and report["calibration_windows"] == 4 and report["embedding"] == "int8"
        assert report["pairs_balanced"] == model.config.num_hidden_layers * 7
        assert len(report["greedy_steps_agreeing"]) == 5 and 0 <= report["min"] <= report["of"]
        graph = onnx.load(str(tmp_path / weights / MODEL_FILE)).graph
        stored = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer}
        assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gather") and n.input[1] in stored]
        assert [n.op_type for n in graph.node if "embedding" in n.output] == ["GatherBlockQuantized"]
        packed = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(packed) == model.config.num_hidden_layers * 7 * 2 + 1  # q k v o gate up down, 2 factors; head
        attrs = [{a.name: a.i for a in n.attribute} for n in packed]
        assert {a["bits"] for a in attrs} == {bits} and {a["block_size"] for a in attrs} == {32}
        # bytes per weight: bits/8 + one fp32 scale and a zero point per 32 (0.28x / 0.16x of fp32),
        # a little more where a factor's rank is padded to whole blocks
        fp32 = sum(4 * a["K"] * a["N"] for a in attrs)
        assert sum(stored.get(i, 0) for n in packed for i in n.input[1:]) < (0.36 if bits == 8 else 0.21) * fp32
        diffs[weights] = report["max_abs_logit_diff"]
    assert 0 < diffs["int8"] < 0.05 and diffs["int8"] < diffs["int4"] < 0.5  # logits spread over ~1.5 here


def test_a_tied_table_is_stored_once_for_lookup_and_head_unless_kept_fp32(tmp_path, tiny_tokenizer):
    """Rounded to the nearest level, a tied head and the lookup hold the same int8 codes: one table,
    read by GatherBlockQuantized and (through a Reshape) by the head's MatMulNBits; the fp32 table
    is gone. ``quantize_head=False`` / ``quantize_embedding=False`` keep each fp32. int4 keeps the
    Linears a compressed model left dense at 8 bits unless told otherwise."""
    import onnx

    model = make_tiny("llama")  # tied embeddings
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    tables = {}
    for name, kwargs in {
        "shared": {"precision": "int8"},
        "fp32-head": {"precision": "int8", "quantize_head": False, "quantize_embedding": False},
    }.items():
        out = tmp_path / name
        meta = export_onnx(model, out, tokenizer=tiny_tokenizer, calib_windows=0, **kwargs)
        graph = onnx.load(str(out / MODEL_FILE)).graph
        ops = {n.op_type for n in graph.node if "logits" in n.output or "embedding" in n.output}
        shape = [model.config.vocab_size, model.config.hidden_size]
        tables[name] = sorted(onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if t.dims == shape)
        if name == "shared":
            assert (
                meta["precision"]["embedding"] == "int8, shared with the head" and meta["precision"]["head"] == "int8"
            )
            assert ops == {"GatherBlockQuantized", "MatMulNBits"} and meta["precision"]["method"] == "round-to-nearest"
        else:
            assert meta["precision"]["embedding"] == "fp32" and meta["precision"]["head"] == "fp32"
            assert ops == {"Gather", "MatMul"}
    assert tables == {"shared": ["UINT8"], "fp32-head": ["FLOAT"]}  # one table each: the codes, or the fp32


def test_a_dense_model_is_int4_throughout_and_a_compressed_one_keeps_its_dense_linears_fp32(tmp_path, tiny_tokenizer):
    """``dense_bits`` (default fp32 at int4) is for the Linears a *compressed* model kept dense; a
    model without factor pairs has every MatMul at int4."""
    import onnx

    dense = make_tiny("llama")
    mixed = make_tiny("llama")
    eigenpatch.patch(mixed, eigenpatch.SVD(ratio=0.5, targets=["q_proj", "k_proj"]), show_progress=False)
    counts = {}
    for name, model in (("dense", dense), ("mixed", mixed)):
        meta = export_onnx(model, tmp_path / name, tokenizer=tiny_tokenizer, precision="int4", calib_windows=0)
        graph = onnx.load(str(tmp_path / name / MODEL_FILE)).graph
        counts[name] = (meta["precision"]["matmuls_by_bits"], sum(n.op_type == "MatMul" for n in graph.node))
    layers = dense.config.num_hidden_layers
    assert counts["dense"][0] == {"int4": 7 * layers + 1}
    assert counts["mixed"][0] == {"int4": 2 * 2 * layers + 1}  # q and k pairs, the head
    assert counts["mixed"][1] - counts["dense"][1] == 5 * layers  # v o gate up down stay fp32 MatMuls


def test_bad_block_size_is_one_line_exit_2_before_loading(tmp_path, capsys):
    missing = tmp_path / "missing-model"  # never loaded: the block size is checked first
    args = ["export", str(missing), "--onnx", str(tmp_path / "o"), "--weights", "int4", "--block", "48"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--block" in err and not (tmp_path / "o").exists()


def test_fp16_export_halves_the_graph_and_keeps_greedy_tokens(tmp_path, tiny_tokenizer):
    import onnx

    model = make_tiny("qwen2")
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    meta = export_onnx(model, tmp_path / "fp16", tokenizer=tiny_tokenizer, precision="float16")
    report = meta["precision"]
    assert report["kind"] == "float16" and report["bytes"] < 0.8 * report["fp32_bytes"]  # + fp32 graph structure
    assert report["max_abs_logit_diff"] < 2e-2 and report["min"] >= 16  # tiny model: fp16 keeps the argmax
    graph = onnx.load(str(tmp_path / "fp16" / MODEL_FILE), load_external_data=False).graph
    weights = [t for t in graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert {i.type.tensor_type.elem_type for i in graph.input[3:]} == {onnx.TensorProto.FLOAT16}  # KV cache in fp16
    assert meta["fused"] == {}  # the fp16 graph's norms cast to fp32 and stay as traced
    runner = OnnxCausalLM(tmp_path / "fp16")
    _, past = runner.step(np.array([[1, 2]]), np.ones((1, 2)), runner.empty_past(1))
    assert next(iter(past.values())).dtype == np.float16


def test_tensorrt_without_gpu_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    from eigenpatch.export.tensorrt import tensorrt_unavailable

    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT is available here: bench/gpu_check.py exercises it")
    missing = tmp_path / "missing-model"  # not even loaded: the TensorRT check comes first
    assert main(["export", str(missing), "--onnx", str(tmp_path / "o"), "--tensorrt"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT" in err and not (tmp_path / "o").exists()


def test_precisions_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path), "--onnx", str(tmp_path / "o"), "--weights", "int4", "--fp16"])
    assert exc.value.code == EXIT_USAGE and "not allowed with" in capsys.readouterr().err


def test_norms_fuse_into_onnxruntime_ops(exported):
    """Every RMSNorm becomes one node: the first one (it reads the embedding) a plain one, each later
    one fused with the residual Add before it; the export's parity check ran on this graph."""
    import onnx

    model, out, meta = exported
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    norms = 2 * model.config.num_hidden_layers + 1  # two per layer and the final one
    assert meta["fused"] == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": norms - 1}
    assert ops.count("SimplifiedLayerNormalization") == 1 and ops.count("SkipSimplifiedLayerNormalization") == norms - 1
    assert "Pow" not in ops and "Reciprocal" not in ops


def test_portable_export_keeps_standard_ops_and_the_same_logits(exported, tmp_path, tiny_tokenizer):
    import onnx

    model, out, _ = exported
    meta = export_onnx(model, tmp_path / "portable", tokenizer=tiny_tokenizer, portable=True)
    graph = onnx.load(str(tmp_path / "portable" / MODEL_FILE), load_external_data=False).graph
    assert meta["fused"] == {} and all(onnx.defs.has(n.op_type, n.domain) for n in graph.node)
    ids = np.array([[5, 17, 99, 3, 250, 41]], dtype=np.int64)
    logits = [
        r.step(ids, np.ones_like(ids), r.empty_past(1))[0] for r in map(OnnxCausalLM, (out, tmp_path / "portable"))
    ]
    assert np.abs(logits[0] - logits[1]).max() < 1e-5


def _norm_graph(skip_shape: list[int]) -> tuple[object, dict[str, np.ndarray], np.ndarray]:
    """``y = RMSNorm(a + b) * w`` as the exporter traces it, with the sum also an output (the residual);
    the graph, its feeds and ``w``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"w": rng.standard_normal(8).astype(np.float32), "two": np.array(2.0, np.float32)}
    consts |= {"axes": np.array([-1]), "eps": np.array(1e-6, np.float32)}
    nodes = [
        helper.make_node("Add", ["a", "b"], ["h"]),
        helper.make_node("Pow", ["h", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["h", "inv"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "norm",
        [helper.make_tensor_value_info("a", f32, [2, 3, 8]), helper.make_tensor_value_info("b", f32, skip_shape)],
        [helper.make_tensor_value_info("y", f32, [2, 3, 8]), helper.make_tensor_value_info("h", f32, [2, 3, 8])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    feeds["b"] = rng.standard_normal(skip_shape).astype(np.float32)
    return model, feeds, consts["w"]


@pytest.mark.parametrize(
    ("skip_shape", "fused_op"), [([2, 3, 8], "SkipSimplifiedLayerNormalization"), ([8], "SimplifiedLayerNormalization")]
)
def test_norm_fusion_is_exact_and_never_fuses_a_broadcast_add(skip_shape, fused_op):
    """A residual Add of two equal-shaped tensors joins the norm; a broadcast one (a bias) stays an Add."""
    import onnx
    import onnxruntime as ort

    from eigenpatch.export.fuse import CONTRIB, fuse_graph

    model, feeds, weight = _norm_graph(skip_shape)
    fused_counts = fuse_graph(model.graph)
    model.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
    assert fused_counts[fused_op] == 1 and sum(fused_counts.values()) == 1
    assert [n.op_type for n in model.graph.node] == ([fused_op] if "Skip" in fused_op else ["Add", fused_op])
    y, h = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    ref_h = feeds["a"] + feeds["b"]
    ref_y = weight * ref_h / np.sqrt((ref_h**2).mean(-1, keepdims=True) + 1e-6)
    assert np.abs(h - ref_h).max() < 1e-6 and np.abs(y - ref_y).max() < 1e-5


def test_portable_weight_only_is_one_line_exit_2_before_loading(tmp_path, capsys):
    args = ["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "o"), "--weights", "int4", "--portable"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MatMulNBits" in err and not (tmp_path / "o").exists()
