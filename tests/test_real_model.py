"""Quality and format checks on the real SmolLM2-135M (built offline from its PyPI wheel)."""

import subprocess
import sys

import pytest
import torch

import eigenpatch
from eigenpatch.cli import main, patch_model_main
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.hf_io import load_model
from eigenpatch.zoo import resolve_text

pytestmark = pytest.mark.slow

EVAL_TOKENS = 2048


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tokenizer, _ = load_model(smollm2_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def eval_ids(smollm2):
    return tokenize(smollm2[1], resolve_text("wiki", split="eval"), EVAL_TOKENS)


def test_wiki_calibration_and_eval_text_are_disjoint_articles():
    calib, evals = resolve_text("wiki", split="calib"), resolve_text("wiki:eval")
    titles = lambda text: {line for line in text.splitlines() if line.startswith(" = ") and line.endswith(" = ")}  # noqa: E731
    assert len(calib) > 2_000_000 and len(evals) > 200_000
    assert titles(calib).isdisjoint(titles(evals)) and len(titles(evals)) >= 10
    assert "[[" not in evals and "{{" not in evals and "'''" not in evals  # markup cleaned


def test_dense_perplexity_matches_the_reference_protocol(smollm2, eval_ids):
    ppl = perplexity(smollm2[0], eval_ids, show_progress=False)
    assert ppl.scored_tokens == EVAL_TOKENS - EVAL_TOKENS // 512
    assert 12 < ppl.ppl < 40  # reference: 21.9-22.7 on this Wikipedia text


def test_svd_patch_save_load_logits_identical_and_quality_ordered(smollm2_dir, eval_ids, tmp_path):
    """Acceptance: reloaded logits == in-memory patched logits; plain SVD degrades with the ratio."""
    model, tokenizer, _ = load_model(smollm2_dir)
    dense_ppl = perplexity(model, eval_ids[:1024], show_progress=False).ppl
    report = eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5), show_progress=False)
    assert report["model_params_before"] == 134_515_008
    step = report["steps"][0]
    assert step["targeted_params_before"] == 106_168_320 and step["factorized"] == 210
    assert 0.495 <= step["targeted_params_after"] / step["targeted_params_before"] <= 0.5
    out = eigenpatch.save(model, tmp_path / "smol-svd", tokenizer=tokenizer)

    ids = eval_ids[None, :64]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
    patched_ppl = perplexity(reloaded, eval_ids[:1024], show_progress=False).ppl
    assert patched_ppl > 10 * dense_ppl  # plain SVD at 50 % collapses

    # A fresh interpreter that only imports eigenpatch loads it through transformers' own entry point.
    code = (
        "import sys, eigenpatch, transformers; "
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "print(type(m.model.layers[0].mlp.up_proj).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "LowRankLinear"


def test_patch_model_cli_on_default_model_then_eval(tmp_path, capsys):
    out = tmp_path / "default"
    argv = ["--compress", "0.2", "--method", "svd", "--targets", "gate_proj", "up_proj"]
    assert patch_model_main([*argv, "-o", str(out), "-q"]) == 0
    summary = capsys.readouterr().out
    assert "smollm2-135m ->" in summary and "106,168,320" not in summary  # only MLP gate/up targeted
    assert main(["eval", str(out), "--max-tokens", "1024", "-q", "--json", str(tmp_path / "e.json")]) == 0
    import json

    results = json.loads((tmp_path / "e.json").read_text())
    assert results["base"]["ref"] == "smollm2-135m"
    assert results["model"]["params"] < results["base"]["params"]
    assert results["model"]["ppl"] > results["base"]["ppl"]


def test_default_method_beats_the_svd_llm_reference_and_reloads_exactly(smollm2_dir, eval_ids, tmp_path):
    """Loss-aware ranks x Fisher-whitened factors vs uniform ranks x whitening (SVD-LLM), same statistics."""
    from eigenpatch.patchers import LowRank, parse_method
    from eigenpatch.patchers.lowrank.cli import DEFAULT_METHOD

    calib, cache, ppl = resolve_text("wiki", split="calib"), {}, {}
    for method in ("uniform+whiten", DEFAULT_METHOD):
        model, tokenizer, _ = load_model(smollm2_dir)
        config = LowRank(ratio=0.4, calib_windows=16, fisher_windows=8, **parse_method(method))
        eigenpatch.patch(
            model, config, tokenizer=tokenizer, calib_text=calib, calibration_cache=cache, show_progress=False
        )
        ppl[method] = perplexity(model, eval_ids, show_progress=False).ppl
    assert ppl[DEFAULT_METHOD] < 0.9 * ppl["uniform+whiten"], ppl

    reloaded = eigenpatch.load(eigenpatch.save(model, tmp_path / "best", tokenizer=tokenizer))
    assert perplexity(reloaded, eval_ids, show_progress=False).ppl == pytest.approx(ppl[DEFAULT_METHOD], rel=1e-5)


def test_compressed_smollm2_exports_verified_and_runs_like_transformers(smollm2_dir, tmp_path, capsys):
    """Issue acceptance: a --compress 0.5 SmolLM2 exports with --verify; run-onnx == transformers greedy."""
    pytest.importorskip("onnxruntime")
    from eigenpatch.export.onnx import export_onnx
    from eigenpatch.export.runtime import MODEL_FILE
    from eigenpatch.patchers import LowRank

    model, tokenizer, _ = load_model(smollm2_dir)
    dense_dir = tmp_path / "dense-onnx"
    export_onnx(model, dense_dir, tokenizer=tokenizer, verify=False)
    config = LowRank(ratio=0.5, allocator="loss", factorizer="fwhiten", calib_windows=8, calib_seq_len=256)
    eigenpatch.patch(
        model, config, tokenizer=tokenizer, calib_text=resolve_text("wiki", split="calib"), show_progress=False
    )
    params_ratio = sum(p.numel() for p in model.parameters()) / 134_515_008
    patched = eigenpatch.save(model, tmp_path / "patched", tokenizer=tokenizer)
    onnx_dir = tmp_path / "patched-onnx"
    assert main(["export", str(patched), "--onnx", str(onnx_dir)]) == 0
    assert "verified against PyTorch" in capsys.readouterr().out

    def onnx_bytes(folder):
        return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(MODEL_FILE))

    assert onnx_bytes(onnx_dir) / onnx_bytes(dense_dir) == pytest.approx(params_ratio, rel=0.05)

    prompt = "The capital of France is"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    assert main(["run-onnx", str(onnx_dir), prompt, "--max-new-tokens", "24", "--json"]) == 0
    import json

    got = json.loads(capsys.readouterr().out)["completion"]
    assert got == tokenizer.decode(expected, skip_special_tokens=False)


def test_healing_the_factor_pairs_recovers_perplexity(smollm2_dir, eval_ids):
    """30 distillation steps into the factor pairs of a 50 %-compressed SmolLM2 (about a minute on
    2 cores) already cut its held-out perplexity sharply; bench/heal.py measures the full curve."""
    from eigenpatch.patchers import Heal, LowRank

    model, tokenizer, _ = load_model(smollm2_dir)
    calib = resolve_text("wiki", split="calib")
    compress = LowRank(ratio=0.5, allocator="loss", factorizer="fwhiten", calib_windows=8, calib_seq_len=256)
    eigenpatch.patch(model, compress, tokenizer=tokenizer, calib_text=calib, show_progress=False)
    unhealed = perplexity(model, eval_ids, show_progress=False).ppl
    dense = load_model(smollm2_dir)[0]
    from eigenpatch.patchers.heal.transform import apply_heal
    from eigenpatch.recipe import PatchContext

    context = PatchContext(
        tokenizer=tokenizer, calib_text=calib, teacher=dense.requires_grad_(False), show_progress=False
    )
    apply_heal(model, Heal(steps=30, seq_len=128), context)
    healed = perplexity(model, eval_ids, show_progress=False).ppl
    assert healed < 0.8 * unhealed, (unhealed, healed)
