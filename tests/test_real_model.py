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


@pytest.mark.parametrize("name", ["pydoc", "jargon"])
def test_debian_domain_texts_split_into_disjoint_documents_of_their_kind(name, smollm2):
    """The shield's domain panel: real text of other kinds, fetched from Debian's packages once."""
    calib, evals = resolve_text(name, split="calib"), resolve_text(f"{name}:eval")
    assert len(evals) > 100_000 and len(calib) > 5 * len(evals)
    probes = [evals[i * len(evals) // 6 :][:300] for i in range(1, 6)]
    assert not any(probe in calib for probe in probes)  # split by document: no eval passage is in calib
    marker = {"pydoc": ">>> ", "jargon": "[Usenet]"}[name]  # interpreter sessions; usage notes
    markup = {"pydoc": ":keyword:`", "jargon": "\n   :"}[name]  # reST roles; the glossary's indent
    assert marker in calib and markup not in evals  # cleaned to the text a reader sees
    ppl = perplexity(smollm2[0], tokenize(smollm2[1], evals, 1024), show_progress=False).ppl
    assert 3 < ppl < 200  # real English of its own kind, not markup soup


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


@pytest.fixture(scope="module")
def compressed(smollm2_dir, tmp_path_factory):
    """SmolLM2 at ``--compress 0.5`` with the default method on 8 windows of 256 tokens, built once:
    (in-memory model, saved checkpoint, tokenizer, the calibration statistics it used)."""
    from eigenpatch.patchers import LowRank, parse_method
    from eigenpatch.patchers.lowrank.cli import DEFAULT_METHOD

    model, tokenizer, _ = load_model(smollm2_dir)
    cache: dict = {}
    config = LowRank(ratio=0.5, calib_windows=8, calib_seq_len=256, **parse_method(DEFAULT_METHOD))
    calib = resolve_text("wiki", split="calib")
    eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=calib, calibration_cache=cache, show_progress=False)
    out = eigenpatch.save(model, tmp_path_factory.mktemp("smollm2-c0.5") / "patched", tokenizer=tokenizer)
    return model.eval(), out, tokenizer, cache


def test_default_method_beats_the_svd_llm_reference_and_reloads_exactly(compressed, smollm2_dir, eval_ids):
    """Loss-aware ranks x Fisher-whitened factors vs uniform ranks x whitening (SVD-LLM), same statistics."""
    from eigenpatch.patchers import LowRank

    best, out, tokenizer, cache = compressed
    ppl = {"default": perplexity(best, eval_ids, show_progress=False).ppl}
    model = load_model(smollm2_dir)[0]
    reference = LowRank(ratio=0.5, calib_windows=8, calib_seq_len=256, allocator="uniform", factorizer="whiten")
    calib = resolve_text("wiki", split="calib")
    eigenpatch.patch(
        model, reference, tokenizer=tokenizer, calib_text=calib, calibration_cache=cache, show_progress=False
    )
    ppl["uniform+whiten"] = perplexity(model, eval_ids, show_progress=False).ppl
    assert ppl["default"] < 0.9 * ppl["uniform+whiten"], ppl
    reloaded = eigenpatch.load(out)
    assert perplexity(reloaded, eval_ids, show_progress=False).ppl == pytest.approx(ppl["default"], rel=1e-5)


def test_healing_the_factor_pairs_recovers_perplexity(compressed, smollm2_dir, eval_ids):
    """30 distillation steps into the factor pairs of a 50 %-compressed SmolLM2 (about a minute on
    2 cores) already cut its held-out perplexity sharply; bench/heal.py measures the full curve."""
    from eigenpatch.patchers import Heal
    from eigenpatch.patchers.heal.transform import apply_heal
    from eigenpatch.recipe import PatchContext

    _, out, tokenizer, _ = compressed
    model = eigenpatch.load(out)  # a copy: the fixture's model stays as it was compressed
    unhealed = perplexity(model, eval_ids, show_progress=False).ppl
    dense = load_model(smollm2_dir)[0]
    calib = resolve_text("wiki", split="calib")
    context = PatchContext(
        tokenizer=tokenizer, calib_text=calib, teacher=dense.requires_grad_(False), show_progress=False
    )
    apply_heal(model, Heal(steps=30, seq_len=128), context)
    healed = perplexity(model, eval_ids, show_progress=False).ppl
    assert healed < 0.8 * unhealed, (unhealed, healed)
