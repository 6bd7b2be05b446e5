"""A real vLLM server on loopback for tests: `eigenpatch serve DIR` in its own process group.

Shared by the serving tests and the registry's contract test (``test_contract.py``).
"""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(family: str):
    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... (not the 16 of conftest's tiny models)
    common = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


class Server:
    """`eigenpatch serve DIR` in its own process group, killed (group and all) afterwards."""

    def __init__(self, model_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = model_dir.name
        cmd = [sys.executable, "-m", "eigenpatch.cli", "serve", str(model_dir), "--port", str(self.port), *extra]
        self.log = model_dir.parent / f"{model_dir.name}-server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def complete(self, prompt: str, max_tokens: int = 16) -> dict:
        payload = {"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        return post(f"{self.url}/v1/completions", {**payload, "logprobs": 1, "return_tokens_as_token_ids": True})

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


def hf_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    model = eigenpatch.load(model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=None)
    return out[0, len(ids) :].tolist()
