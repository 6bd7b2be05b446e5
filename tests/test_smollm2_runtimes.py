"""The real SmolLM2-135M in all three runtimes: transformers, vLLM (over HTTP) and ONNX Runtime.

One checkpoint carries every kind of tensor the format stores, so one vLLM server and one ONNX
export check them all: low-rank FFNs whose gate and up share one input
factor (structured, 30 % fewer FFN parameters), loss-aware Fisher-whitened factor pairs in the
attention (``--compress 0.3`` there), the default EigenShield projection of the input embeddings,
and a sentiment steering vector in layers 10-12. It is built step by step, and each step must
change the model, so agreement proves that every runtime applies every piece.

Calibration uses a few windows (tests); ``bench/`` measures quality at full size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vllm_server import IN_PROCESS_WORKER, Server, hf_greedy_logprobs, post, served_logprobs, served_tokens

import eigenpatch

pytestmark = pytest.mark.slow

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GREEDY = 32


def _greedy(model: torch.nn.Module, tokenizer, prompts) -> dict[str, list[int]]:
    out = {}
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out[prompt] = model.generate(ids, max_new_tokens=GREEDY, do_sample=False)[0, ids.shape[1] :].tolist()
    return out


@pytest.fixture(scope="module")
def stacked(smollm2_dir, tmp_path_factory):
    """(checkpoint, tokenizer, per-step reports): the four pieces applied and checked one by one."""
    from eigenpatch.export.onnx import PROMPTS
    from eigenpatch.hf_io import load_model
    from eigenpatch.patchers import EigenShield, LowRank, Steer, StructuredFFN
    from eigenpatch.patchers.prompts import read_prompts
    from eigenpatch.patchers.steer.vectors import build_steering_vectors
    from eigenpatch.zoo import resolve_text

    model, tokenizer, _ = load_model(smollm2_dir)
    calib = resolve_text("wiki", "calib")
    probe = torch.tensor([tokenizer(resolve_text("news", "eval")[:400])["input_ids"]])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(probe).logits

    dense = logits()
    kw = {"tokenizer": tokenizer, "calib_text": calib, "show_progress": False}
    compress = [
        StructuredFFN(structure="lowrank", ratio=0.3, calib_windows=8, calib_seq_len=256, premerge=16),
        LowRank(
            ratio=0.3, allocator="loss", factorizer="fwhiten", targets=ATTENTION, calib_windows=8, calib_seq_len=256
        ),
    ]
    reports = {"compress": eigenpatch.patch(model, compress, **kw)}
    compressed = logits()
    assert (compressed - dense).abs().max() > 1e-2
    reports["shield"] = eigenpatch.patch(model, EigenShield(calib_windows=16, chunks=4), **kw)
    assert (logits() - compressed).abs().max() > 1e-2  # the projection is applied
    unsteered = _greedy(model, tokenizer, PROMPTS)
    data = Path(__file__).resolve().parents[1] / "bench" / "data" / "steer"
    pos, neg = read_prompts(data / "positive.txt"), read_prompts(data / "negative.txt")
    folder = tmp_path_factory.mktemp("smollm2-stack")
    vectors = build_steering_vectors(model, tokenizer, pos, neg, [10, 11, 12], subspace="none", show_progress=False)
    vec = vectors.save(folder / "sentiment.safetensors")
    reports["steer"] = eigenpatch.patch(model, Steer(vectors=str(vec), strength=0.5))
    steered = _greedy(model, tokenizer, PROMPTS)
    assert sum(unsteered[p] != steered[p] for p in PROMPTS) >= 3  # the steering changes most continuations
    out = eigenpatch.save(model, folder / "smollm2-stack", tokenizer=tokenizer)
    return out, tokenizer, reports


def test_stacked_checkpoint_records_every_piece(stacked):
    out, _, reports = stacked
    assert [c.name for c in eigenpatch.recipe_of(out)] == ["structured_ffn", "lowrank", "eigenshield", "steer"]
    shield = reports["shield"]["steps"][0]
    assert shield["deficits"] >= 1 and 4 <= shield["rank"] <= 64, shield  # the default's form and about its rank
    assert reports["compress"]["model_params_after"] < 0.85 * reports["compress"]["model_params_before"]


def test_vllm_serves_transformers_tokens_and_logprobs(stacked):
    """The 5 fixed prompts, 32 greedy tokens each over HTTP (fp32): the same tokens as transformers,
    every token's log-probability within 1e-3; chat answers."""
    from eigenpatch.export.onnx import PROMPTS

    out, tokenizer, _ = stacked
    # Eager: compiling 30 layers costs 3 of this server's 4 minutes; the compiled paths of the same
    # modules are served by test_serving.py's tiny TP 1 servers.
    server = Server(out, "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", env=IN_PROCESS_WORKER)
    try:
        replies = [server.complete(prompt, max_tokens=GREEDY) for prompt in PROMPTS]
        chat = post(
            f"{server.url}/v1/chat/completions",
            {"model": server.name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16},
        )
    finally:
        server.stop()
    assert chat["choices"][0]["message"]["content"].strip()
    reloaded = eigenpatch.load(out).eval()
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        served = served_tokens(reply)
        expected, logprobs = hf_greedy_logprobs(reloaded, ids, len(served))
        assert served == expected, prompt
        assert served_logprobs(reply) == pytest.approx(logprobs, abs=1e-3), prompt


def test_onnx_export_verifies_stays_factorized_and_runs_transformers_tokens(stacked, tmp_path, capsys):
    """`eigenpatch export` verifies logits and greedy decoding against PyTorch itself; the graph
    stores the factors, not dense products (its bytes follow the parameter count); ONNX Runtime's
    own greedy loop (KV cache) gives transformers' 32 tokens for the 5 fixed prompts, and
    `eigenpatch run-onnx` its completion text."""
    import json

    from eigenpatch.cli import main
    from eigenpatch.export.onnx import PROMPTS
    from eigenpatch.export.runtime import MODEL_FILE, OnnxCausalLM

    out, tokenizer, _ = stacked
    onnx_dir = tmp_path / "onnx"
    assert main(["export", str(out), "--onnx", str(onnx_dir)]) == 0
    assert "verified against PyTorch" in capsys.readouterr().out
    reloaded = eigenpatch.load(out).eval()
    graph_bytes = sum(f.stat().st_size for f in onnx_dir.iterdir() if f.name.startswith(MODEL_FILE))
    params = sum(p.numel() for p in reloaded.parameters())  # fp32, tied embedding once
    assert graph_bytes == pytest.approx(4 * params, rel=0.05)
    runner = OnnxCausalLM(onnx_dir)
    greedy = _greedy(reloaded, tokenizer, PROMPTS)
    for prompt, expected in greedy.items():
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert runner.generate(ids, max_new_tokens=GREEDY) == expected, prompt
    prompt = PROMPTS[0]
    assert main(["run-onnx", str(onnx_dir), prompt, "--max-new-tokens", str(GREEDY), "--json"]) == 0
    completion = json.loads(capsys.readouterr().out)["completion"]
    assert completion == tokenizer.decode(greedy[prompt], skip_special_tokens=False)
