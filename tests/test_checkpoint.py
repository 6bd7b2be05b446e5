"""The format: patch -> save -> AutoModelForCausalLM.from_pretrained, across model families."""

import json

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny
from transformers import AutoModelForCausalLM

import eigenpatch
from eigenpatch.format import QUANT_METHOD, REPORT_FILE
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.patchers.targets import DEFAULT_TARGETS


def _logits(model, seed=1):
    ids = torch.randint(0, TINY_VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_roundtrip_rebuilds_factor_pairs_with_identical_logits(tiny_family, tmp_path):
    model = make_tiny(tiny_family)
    report = eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    n_targets = len(DEFAULT_TARGETS) * model.config.num_hidden_layers
    assert report["steps"][0]["factorized"] == n_targets
    expected = _logits(model)

    out = eigenpatch.save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["architectures"] == [type(model).__name__]  # base architecture unchanged
    assert qc["quant_method"] == QUANT_METHOD and qc["version"] == 1
    assert qc["recipe"][0]["transform"] == "svd" and len(qc["layers"]) == n_targets

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    pairs = {n: m for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)}
    assert set(pairs) == set(qc["layers"])
    assert all(pairs[n].rank == spec["rank"] for n, spec in qc["layers"].items())
    assert (_logits(reloaded) - expected).abs().max().item() <= 1e-5


def test_biases_survive_factorization(tmp_path):
    model = make_tiny("qwen2")  # q/k/v have biases
    bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.3), show_progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and torch.equal(q.bias, bias)
    reloaded = eigenpatch.load(eigenpatch.save(model, tmp_path / "q"))
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.bias, bias)


def test_svd_at_full_information_reproduces_dense_logits():
    """When every matrix's rank fits in its allocated rank, SVD must reproduce the dense model."""
    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rpartition(".")[2] in DEFAULT_TARGETS:
                out_f, in_f = mod.weight.shape
                mod.weight.copy_(torch.randn(out_f, 4, generator=gen) @ torch.randn(4, in_f, generator=gen) / 4)
    dense = _logits(model)
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.1), show_progress=False)
    assert (_logits(model) - dense).abs().max().item() < 1e-4


def test_tied_embeddings_stay_tied_after_reload(tmp_path):
    model = make_tiny("llama")
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    reloaded = eigenpatch.load(eigenpatch.save(model, tmp_path / "t"))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_save_refuses_existing_output_and_writes_atomically(tmp_path):
    model = make_tiny("llama")
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    out = eigenpatch.save(model, tmp_path / "o", report={"x": 1})
    assert json.loads((out / REPORT_FILE).read_text())["weights_bytes"] > 0
    with pytest.raises(eigenpatch.errors.UsageError, match="already exists"):
        eigenpatch.save(model, out)
    eigenpatch.save(model, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temp or backup folder left behind


def test_patching_twice_composes_the_recipe(tmp_path):
    model = make_tiny("llama")
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.2, targets=("gate_proj", "up_proj")), show_progress=False)
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5, targets=("q_proj",)), show_progress=False)
    recipe = model.config.quantization_config.recipe
    assert [step["targets"] for step in recipe] == [["gate_proj", "up_proj"], ["q_proj"]]
    expected = _logits(model)
    reloaded = eigenpatch.load(eigenpatch.save(model, tmp_path / "twice"))
    assert (_logits(reloaded) - expected).abs().max().item() <= 1e-5
