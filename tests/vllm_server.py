"""A real vLLM server on loopback for tests: `eigenpatch serve DIR` in its own process group.

Shared by the serving tests and the registry's contract test (``test_contract.py``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from transformers import LlamaConfig, Qwen2Config

import eigenpatch

#: For TP 1 test servers: the model runs in vLLM's engine process instead of a worker process of
#: its own. The same model runner and plugin code, one Python start fewer (~35 s on two cores:
#: importing vLLM alone takes ~30 s here). On CPU vLLM allows this only without its V1
#: multiprocessing, whose OMP thread binding is then skipped: that costs speed, not results.
#: TP 2 servers, the SmolLM2 server and the fault tests keep vLLM's own topology (what users run).
IN_PROCESS_WORKER = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(family: str):
    """A tiny Llama or Qwen2 that vLLM can serve. head_dim 32: vLLM's CPU attention supports 32, 64,
    80, ... (not the 16 of conftest's tiny models). Weights at 10x the usual init scale (0.2): at
    0.02 the next-token distribution is nearly uniform and every prompt decodes one repeated token,
    so parity would prove little; at 0.2 greedy tokens vary and every patch changes them."""
    common = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    return LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


class Server:
    """`eigenpatch serve DIR` in its own process group, killed (group and all) afterwards.

    At most one runs at a time: starting a server stops the one before. A module-scoped fixture's
    last server would otherwise live until its module ends, holding memory and sharing the two
    cores with every test after it.
    """

    live: Server | None = None

    def __init__(self, model_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        if Server.live is not None:
            Server.live.stop()
        Server.live = self
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = model_dir.name
        cmd = [sys.executable, "-m", "eigenpatch.cli", "serve", str(model_dir), "--port", str(self.port), *extra]
        self.log = model_dir.parent / f"{model_dir.name}-server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
            )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"server not healthy after 600 s:\n{self.log.read_text()[-4000:]}")

    def complete(self, prompt: str | list[int], max_tokens: int = 16) -> dict:
        payload = {"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        return post(f"{self.url}/v1/completions", {**payload, "logprobs": 1, "return_tokens_as_token_ids": True})

    def complete_embeds(self, embeds: torch.Tensor, max_tokens: int = 16) -> dict:
        """A completion of ``prompt_embeds`` ``[tokens, hidden]`` (the server needs ``--enable-prompt-embeds``)."""
        buffer = io.BytesIO()
        torch.save(embeds.contiguous(), buffer)
        payload = {"model": self.name, "prompt_embeds": base64.b64encode(buffer.getvalue()).decode()}
        payload |= {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1, "return_tokens_as_token_ids": True}
        return post(f"{self.url}/v1/completions", payload)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def served_tokens(reply: dict) -> list[int]:
    """Token ids of a completion requested with ``return_tokens_as_token_ids``."""
    return [int(t.split(":")[1]) for t in reply["choices"][0]["logprobs"]["tokens"]]


def served_logprobs(reply: dict) -> list[float]:
    """Log-probability of each generated token of a completion requested with ``logprobs``."""
    return reply["choices"][0]["logprobs"]["token_logprobs"]


def hf_greedy(model_dir: Path | torch.nn.Module, ids: list[int], n: int) -> list[int]:
    return hf_greedy_logprobs(model_dir, ids, n)[0]


def hf_greedy_logprobs(model: Path | torch.nn.Module, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' ``n`` greedy tokens after ``ids`` and the log-probability of each (fp64
    log-softmax of the raw logits: what vLLM reports for ``logprobs``)."""
    if not isinstance(model, torch.nn.Module):
        model = eigenpatch.load(model).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=None,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, len(ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs
