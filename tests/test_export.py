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


def test_int8_export_shrinks_and_reports_greedy_agreement(tmp_path, tiny_tokenizer):
    model = make_tiny("llama")
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    meta = export_onnx(model, tmp_path / "int8", tokenizer=tiny_tokenizer, precision="int8")
    assert meta["parity"]["max_abs_logit_diff"] <= 1e-4  # fp32 checked first
    report = meta["precision"]
    assert report["kind"] == "int8" and report["bytes"] < 0.75 * report["fp32_bytes"]  # the embedding stays fp32
    assert len(report["greedy_steps_agreeing"]) == 5 and 0 <= report["min"] <= report["of"]
    runner = OnnxCausalLM(tmp_path / "int8")
    assert len(runner.generate([1, 2, 3], max_new_tokens=4, stop_at_eos=False)) == 4


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


def test_int8_and_fp16_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path), "--onnx", str(tmp_path / "o"), "--int8", "--fp16"])
    assert exc.value.code == EXIT_USAGE and "not allowed with" in capsys.readouterr().err
