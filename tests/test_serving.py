"""vLLM serving of tiny checkpoints: a real `eigenpatch serve` process on loopback (serve-cpu extra).

Each server costs about a minute on two cores, so one checkpoint carries as many checks as it can:

- ``plain``: an unpatched Llama served with the plugin installed and with named steering vectors
  (TP 1 compiled, TP 2 eager): greedy parity, chat, malformed requests, per-request steering;
- ``stack``: one Qwen2 (q/k/v biases) holding every kind a decoder layer can carry at once:
  factor pairs in *mixed* fused layers (q, v, o and up factorized; k, gate and down dense, so
  qkv_proj, with its biases, and gate_up_proj hold low-rank and dense shards), an EigenShield
  projection after layer 0, snap on layer 0's input and a static steering shift (TP 1 compiled
  with prompt embeddings, TP 2 eager with a single KV head replicated on both ranks). Its tokens
  must equal transformers', and each intervention must change transformers' tokens, so a server
  that skipped one would disagree; at TP 1 perturbed prompt embeddings must decode like the clean
  prompt (snap, through vLLM's compiled graph);
- both answer 32 concurrent requests with the tokens each gets alone (batch invariance);
- one server each for the block-structured FFNs, and for ``patch-model``'s layer-by-layer output
  (one shard per decoder layer + index).

The registry's contract test (``test_contract.py``) serves every transform's own example, and
``test_smollm2_runtimes.py`` the real model.
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
from conftest import pushed
from transformers import AutoModelForCausalLM
from vllm_server import (
    IN_PROCESS_WORKER,
    Server,
    hf_greedy,
    hf_greedy_logprobs,
    post,
    served_logprobs,
    served_tokens,
    tiny_config,
)

import eigenpatch
from eigenpatch.recipe import TransformConfig

pytest.importorskip("vllm", reason="serving tests need the serve-cpu extra")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ("The fire spread towards the town", "Police said the man")
MIXED_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]  # k, gate, down stay dense
#: fp32 server vs fp32 transformers: same weights, different kernels and reduction orders
LOGPROB_ATOL = 1e-3


def _server(out: Path, tp: int, *extra: str) -> Server:
    """fp32 (exact argmax parity). TP 1: compiled, the model in the engine process; TP 2: eager
    (its compiled graph is TP 1's with collectives), a worker process per rank."""
    args = ("--max-model-len", "512", "--dtype", "float32", "--tensor-parallel-size", str(tp), *extra)
    return Server(out, *args, env=IN_PROCESS_WORKER) if tp == 1 else Server(out, *args, "--enforce-eager")


def _status(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _assert_batch_invariant(server: Server, tokenizer, n: int = 32) -> None:
    """``n`` concurrent greedy requests (prompts of 3 to 40 tokens, so prefill and decode share the
    engine's steps) each give the tokens that request gets alone. fp32: a near-tie would need a
    logit gap below the kernels' ~1e-6 reordering noise (bf16: ``bench/batch_invariance.py``)."""
    from eigenpatch.zoo import resolve_text

    ids = tokenizer(resolve_text("news", "eval"), add_special_tokens=False)["input_ids"]
    prompts = [ids[17 * i : 17 * i + 3 + (i * 7) % 38] for i in range(n)]
    alone = [served_tokens(server.complete(p)) for p in prompts]
    with ThreadPoolExecutor(n) as pool:
        together = [served_tokens(r) for r in pool.map(server.complete, prompts)]
    assert len({tuple(t) for t in alone}) > n // 2  # different prompts, different answers
    differ = [i for i in range(n) if together[i] != alone[i]]
    assert not differ, f"{len(differ)} of {n} concurrent requests changed their tokens: {differ}"


def _assert_serves_like_transformers(server: Server, out: Path, tokenizer, prompts=PROMPTS) -> dict:
    """Greedy tokens equal transformers' and each token's log-probability agrees; returns the tokens."""
    model = eigenpatch.load(out).eval()
    tokens = {}
    for prompt in prompts:
        reply = server.complete(prompt, max_tokens=16)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected, logprobs = hf_greedy_logprobs(model, ids, 16)
        assert served_tokens(reply) == expected, prompt
        assert served_logprobs(reply) == pytest.approx(logprobs, abs=LOGPROB_ATOL), prompt
        tokens[prompt] = expected
    return tokens


# -- plain: the plugin must not disturb an unpatched model; per-request steering ---------------
@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_tokenizer):
    """An unpatched tiny Llama (with a chat template) and a steering vector file built on it."""
    from eigenpatch.format.steering import SteeringVectors, model_fingerprint

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("serve-plain")
    out = eigenpatch.save(model, folder / "tiny-plain", tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({i: 2.0 * torch.randn(128, generator=g) for i in (0, 1)})
    vectors.meta["model"] = model_fingerprint(model)
    return model, out, vectors.save(folder / "up.safetensors"), tokenizer


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def plain_server(request, plain):
    _, out, vec, _ = plain
    extra = ("--enable-prompt-tokens-details", "--steer", f"up={vec}", "--steer-max-strength", "4")
    server = _server(out, request.param, *extra)
    yield server
    server.stop()


def test_unpatched_checkpoint_serves_transformers_greedy_tokens(plain, plain_server):
    _, out, _, tokenizer = plain
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint: the plugin must leave it alone
    _assert_serves_like_transformers(plain_server, out, tokenizer)


def test_unpatched_answers_do_not_depend_on_server_load(plain, plain_server):
    _assert_batch_invariant(plain_server, plain[3])


def test_served_checkpoint_answers_chat(plain_server):
    payload = {"model": plain_server.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    reply = post(f"{plain_server.url}/v1/chat/completions", payload)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] > 0


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(plain_server):
    url = f"{plain_server.url}/v1/completions"
    # greedy and ignore_eos: a sampled EOS would end a reply early (a random tiny model emits it by chance)
    good = {"model": plain_server.name, "prompt": "The fire", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    assert 400 <= _status(url, b'{"model": "x", "prompt": ') < 500  # truncated JSON
    assert 400 <= _status(url, json.dumps({**good, "max_tokens": -3}).encode()) < 500
    assert 400 <= _status(url, json.dumps({**good, "model": "no-such-model"}).encode()) < 500
    assert _status(url, json.dumps({**good, "n": 10_000, "temperature": 1.0}).encode()) == 400  # the launcher's cap
    # then 32 concurrent requests, all answered: seeded sampling (n = 2) with prompts that overflow
    # one engine step's 512 tokens, so prefills are split and their sampled tokens discarded (on CPU
    # that used to stop the engine: serving/vllm_cpu_fixes.py); each seed's tokens are those it gets alone
    sampled = {"temperature": 1.0, "n": 2, "logprobs": 1, "return_tokens_as_token_ids": True}
    seeded = [
        {**good, **sampled, "prompt": "The fire spread towards the town. " * (2 + i % 12), "seed": i} for i in range(32)
    ]
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda r: post(url, r), seeded))
    assert all(r["usage"]["completion_tokens"] == 2 * 4 for r in replies)
    for i in (0, 17, 31):
        assert served_tokens(post(url, seeded[i])) == served_tokens(replies[i]), f"seed {i}"


def test_per_request_steering_over_http(plain, plain_server):
    """A steered and an unsteered request sent together each give exactly transformers' tokens for
    their setting; repeating the unsteered request after the steered one with the same
    (prefix-cached) prompt gives the unsteered tokens, and the other way round; strength 0 is the
    unsteered model; bad steering arguments get 400 and the server keeps serving."""
    from eigenpatch.patchers import Steer
    from eigenpatch.zoo import resolve_text

    model, _, vec, tokenizer = plain
    ids = tokenizer(resolve_text("news", "eval"), add_special_tokens=False)["input_ids"][:300]
    steered_model = copy.deepcopy(model)
    eigenpatch.patch(steered_model, Steer(vectors=str(vec), strength=1.5))

    def greedy(m: torch.nn.Module) -> list[int]:
        with torch.no_grad():
            return m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()

    expected = {"plain": greedy(model), "steered": greedy(steered_model)}
    assert expected["plain"] != expected["steered"]  # the test can tell them apart
    url = f"{plain_server.url}/v1/completions"
    base = {"model": plain_server.name, "prompt": ids, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    base |= {"logprobs": 1, "return_tokens_as_token_ids": True}
    steer = {"vllm_xargs": {"steer": "up", "steer_strength": 1.5}}
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
    assert served_tokens(together[0]) == expected["steered"]
    assert served_tokens(together[1]) == expected["plain"]
    assert served_tokens(again_plain) == expected["plain"]
    assert served_tokens(again_steered) == expected["steered"]
    assert served_tokens(zero) == expected["plain"]
    assert served_tokens(after) == expected["steered"]
    cached = (again_plain["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    assert cached, "the prefix cache was not used, so this test would not catch stale steered blocks"
    assert statuses == [400, 400, 400, 400]


# -- stack: mixed fused shards + a projection + a shift, on one checkpoint ---------------------
def _stack_recipe(vec: Path) -> dict[str, TransformConfig]:
    from eigenpatch.patchers import SVD, EigenShield, Snap, Steer

    return {
        "svd": SVD(ratio=0.5, targets=MIXED_TARGETS),
        "eigenshield": EigenShield(site="layer:0", mode="keep", calib_windows=16, calib_seq_len=64, chunks=4),
        "snap": Snap(),
        "steer": Steer(vectors=str(vec), strength=0.5, start=2),
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_tokenizer):
    """The stacked checkpoint, and transformers' greedy tokens with each intervention left out."""
    from eigenpatch.format.steering import SteeringVectors
    from eigenpatch.zoo import resolve_text

    config = tiny_config("qwen2")
    config.num_key_value_heads = 1  # at TP 2 the single KV head is replicated on both ranks
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("serve-stack")
    g = torch.Generator().manual_seed(4)
    vec = SteeringVectors({i: 2.0 * torch.randn(128, generator=g) for i in (0, 1)}).save(folder / "v.safetensors")
    recipe, calib = _stack_recipe(vec), resolve_text("news", "calib")

    def build(without: str | None = None) -> torch.nn.Module:
        model = copy.deepcopy(base)
        configs = [c for name, c in recipe.items() if name != without]
        eigenpatch.patch(model, configs, tokenizer=tiny_tokenizer, calib_text=calib, show_progress=False)
        return model.eval()

    out = eigenpatch.save(build(), folder / "tiny-stack", tokenizer=tiny_tokenizer)
    ids = {p: tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}
    without = {
        name: {p: hf_greedy(build(without=name), ids[p], 16) for p in PROMPTS} for name in ("eigenshield", "steer")
    }
    return out, without


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def stack_server(request, stack):
    server = _server(stack[0], request.param, *(("--enable-prompt-embeds",) if request.param == 1 else ()))
    server.tp = request.param
    yield server
    server.stop()


def test_stacked_checkpoint_serves_transformers_tokens_and_every_piece_matters(stack, stack_server, tiny_tokenizer):
    out, without = stack
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {name.rsplit(".", 1)[-1] for name in config["layers"]} == set(MIXED_TARGETS)  # mixed shards
    assert [r["transform"] for r in config["recipe"]] == ["svd", "eigenshield", "snap", "steer"]
    tokens = _assert_serves_like_transformers(stack_server, out, tiny_tokenizer)
    if stack_server.tp == 1:  # prompt embeddings, each token pushed 0.2 x the mean row norm: snapped back
        model = eigenpatch.load(out).eval()
        for prompt, expected in tokens.items():
            ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            rows = model.get_input_embeddings().weight.detach()[ids]
            assert served_tokens(stack_server.complete_embeds(pushed(rows))) == expected, prompt
    assert len({t for seq in tokens.values() for t in seq}) >= 8  # not one repeated token: parity means something
    for name, theirs in without.items():  # a server that skipped this piece would have given these
        assert theirs != tokens, f"{name} does not change the greedy tokens: the test could not see it skipped"
    # steering asked of a server started without vectors: refused, never silently ignored
    ask = {"model": stack_server.name, "prompt": "The fire", "max_tokens": 4, "vllm_xargs": {"steer": "happy"}}
    assert _status(f"{stack_server.url}/v1/completions", json.dumps(ask).encode()) == 400


def test_patched_answers_do_not_depend_on_server_load(stack_server, tiny_tokenizer):
    _assert_batch_invariant(stack_server, tiny_tokenizer)


# -- one server each: the block-structured FFNs ---------------------------------------------
@pytest.mark.parametrize(("kind", "tp"), [("blockdense", 1), ("blockshuffle", 2)], ids=lambda v: str(v))
def test_checkpoint_kind_serves_transformers_greedy_tokens(kind, tp, tmp_path_factory, tiny_tokenizer):
    """The block kinds run their batched matmuls, TP 2 splitting by blocks (gate/up by output
    blocks, down_proj by input blocks + all-reduce); transformers decodes through the merged dense
    form (premerge 4 tokens), vLLM through the structure. TP 1 is compiled, TP 2 eager."""
    from eigenpatch.patchers import StructuredFFN

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    eigenpatch.patch(model, StructuredFFN(structure=kind, whiten=False, premerge=4), show_progress=False)
    out = eigenpatch.save(
        model, tmp_path_factory.mktemp("serve-kind") / f"tiny-{kind}-tp{tp}", tokenizer=tiny_tokenizer
    )
    server = _server(out, tp)
    try:
        _assert_serves_like_transformers(server, out, tiny_tokenizer)
    finally:
        server.stop()


def test_a_checkpoint_written_layer_by_layer_serves_transformers_tokens(tmp_path_factory, tiny_tokenizer):
    """``patch-model``'s out-of-core output (one shard per decoder layer + index, factor pairs fitted
    on propagated inputs) is the same format: vLLM loads the shards and decodes transformers' tokens."""
    from eigenpatch.out_of_core import patch_checkpoint
    from eigenpatch.patchers import LowRank
    from eigenpatch.zoo import resolve_text

    torch.manual_seed(6)
    dense = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("serve-lazy")
    dense.save_pretrained(folder / "dense")
    tiny_tokenizer.save_pretrained(folder / "dense")
    recipe = LowRank(ratio=0.5, allocator="loss", factorizer="fwhiten", sequential=True, refine_steps=2,
                     calib_windows=4, calib_seq_len=64, fisher_windows=2)  # fmt: skip
    _, out = patch_checkpoint(
        folder / "dense", [recipe], folder / "tiny-lazy", state_dir=folder / "state", device=torch.device("cpu"),
        dtype=torch.float32, tokenizer=tiny_tokenizer, calib_text=resolve_text("news", "calib"), show_progress=False,
    )  # fmt: skip
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 3  # one per layer, one for the rest
    server = _server(out, 1)
    try:
        tokens = _assert_serves_like_transformers(server, out, tiny_tokenizer)
    finally:
        server.stop()
    ids = {p: tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}
    assert {p: hf_greedy(dense, ids[p], 16) for p in PROMPTS} != tokens  # the compression is served, not the dense


def test_serve_refuses_a_folder_without_config(tmp_path, capsys):
    from eigenpatch.cli import main
    from eigenpatch.errors import EXIT_USAGE

    assert main(["serve", str(tmp_path)]) == EXIT_USAGE
    assert "no config.json" in capsys.readouterr().err


def test_launcher_caps_n_unless_the_user_sets_it(monkeypatch):
    from eigenpatch.serving.launcher import DEFAULT_MAX_N, server_env

    monkeypatch.delenv("VLLM_MAX_N_SEQUENCES", raising=False)
    assert server_env([])["VLLM_MAX_N_SEQUENCES"] == str(DEFAULT_MAX_N)
    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "512")
    assert server_env([])["VLLM_MAX_N_SEQUENCES"] == "512"


def _has_cpu_wna16() -> bool:
    """vllm-cpu's int4 op: compiled into its AVX-512 builds only."""
    import vllm._C  # noqa: F401  (registers torch.ops._C)

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


@pytest.mark.skipif(not _has_cpu_wna16(), reason="this vLLM build has no cpu_gemm_wna16 (AVX2)")
def test_vllms_own_int4_kernel_reads_the_formats_codes():
    """A 4-bit shard converted to the layout vLLM's mixed-precision kernel reads gives the format's
    ``(q - z) * s`` (bf16 activations; the kernel refuses fp32, so it is not offered there)."""
    from eigenpatch.quantizer import quantize_gptq
    from eigenpatch.serving.vllm_int4 import vllm_kernel_for

    module = quantize_gptq(torch.randn(96, 256), torch.eye(256), 4, 64, fp16_scales=True).module()
    fast = vllm_kernel_for(module, torch.bfloat16)
    assert fast is not None and fast.kernel_name == "CPUWNA16LinearKernel"
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    expected = x.float() @ module.dequantized().T
    assert (fast(x).float() - expected).norm() / expected.norm() < 1e-2
    assert vllm_kernel_for(module, torch.float32) is None
    assert vllm_kernel_for(quantize_gptq(torch.randn(96, 256), torch.eye(256), 8, 64).module(), torch.bfloat16) is None
