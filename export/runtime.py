"""ONNX Runtime runner for exported decoders: ``OnnxCausalLM(dir).generate(...)`` with the KV cache.

The graph (written by :mod:`eigenpatch.export.onnx`) takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{i}.key/value`` and returns ``logits`` and
``present.{i}.key/value``; generation feeds the presents back as the next step's past.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eigenpatch.errors import UsageError

META_FILE = "eigenpatch_onnx.json"
MODEL_FILE = "model.onnx"
#: Execution providers in order of preference; the first one this onnxruntime build offers is used.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: str | None = None) -> list[str]:
    """``[requested]`` if this onnxruntime offers it, else the best available (TensorRT -> CUDA -> CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is not None:
        name = requested if requested.endswith("ExecutionProvider") else f"{requested}ExecutionProvider"
        if name not in available:
            raise UsageError(f"execution provider {requested!r} is not available here; available: {available}")
        return [name, "CPUExecutionProvider"] if name != "CPUExecutionProvider" else [name]
    return [p for p in PROVIDER_PREFERENCE if p in available]


class OnnxCausalLM:
    """A decoder-only LM exported by eigenpatch, run with ONNX Runtime."""

    def __init__(self, path: str | Path, provider: str | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not (self.path / MODEL_FILE).is_file() or not meta_file.is_file():
            raise UsageError(f"{self.path} is not an eigenpatch ONNX export (needs {MODEL_FILE} and {META_FILE})")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        try:
            self.session = ort.InferenceSession(str(self.path / MODEL_FILE), providers=self._providers(provider))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
            first = str(exc).strip().splitlines()[0][:200]
            raise UsageError(f"cannot load {self.path / MODEL_FILE}: {first}; re-run eigenpatch export") from None
        self.tokenizer = self._load_tokenizer()
        self._dtype = np.float16 if self.meta.get("dtype") == "float16" else np.float32

    def _providers(self, requested: str | None) -> list[Any]:
        """Chosen providers; the TensorRT EP gets the engine cache and profile ``--tensorrt`` built."""
        names = choose_providers(requested)
        trt = self.meta.get("tensorrt", {})
        if "TensorrtExecutionProvider" not in names or trt.get("builder") != "onnxruntime-tensorrt-ep":
            return names
        from eigenpatch.export.tensorrt import ep_options

        options = ep_options(self.path, trt["profile"], trt["fp16"])
        return [(n, options) if n == "TensorrtExecutionProvider" else n for n in names]

    def _load_tokenizer(self) -> Any:
        if not (self.path / "tokenizer.json").is_file() and not (self.path / "tokenizer_config.json").is_file():
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        if len(tokenizer) > self.meta["vocab_size"]:
            raise UsageError(
                f"tokenizer in {self.path} has {len(tokenizer)} tokens but the model's vocabulary is "
                f"{self.meta['vocab_size']}: it belongs to another model; re-export with the right tokenizer"
            )
        return tokenizer

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.meta["num_kv_heads"], 0, self.meta["head_dim"])
        return {name: np.zeros(shape, dtype=self._dtype) for name in self.meta["past_names"]}

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: logits ``[B, S, V]`` and the new past (the old past plus these tokens)."""
        past_len = next(iter(past.values())).shape[2]
        seq = input_ids.shape[1]
        position_ids = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), input_ids.shape)
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": np.ascontiguousarray(position_ids),
            **past,
        }
        outputs = self.session.run(None, feed)
        present = dict(zip(self.meta["past_names"], outputs[1:], strict=True))
        return outputs[0], present

    def generate(
        self,
        prompt: str | list[int] | np.ndarray,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """New token ids after ``prompt`` (text needs the exported tokenizer); greedy unless ``do_sample``."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError(f"{self.path} has no tokenizer; pass token ids instead of text")
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise UsageError("the prompt is empty")
        rng = np.random.default_rng(seed)
        eos = set(self.meta.get("eos_token_ids", [])) if stop_at_eos else set()
        past = self.empty_past(1)
        mask = np.ones_like(ids)
        new: list[int] = []
        step_ids = ids
        for _ in range(max_new_tokens):
            logits, past = self.step(step_ids, mask, past)
            token = self._pick(logits[0, -1].astype(np.float64), do_sample, temperature, top_p, rng)
            new.append(token)
            if token in eos:
                break
            step_ids = np.array([[token]], dtype=np.int64)
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        return new

    @staticmethod
    def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_p: float, rng: Any) -> int:
        if not do_sample:
            return int(logits.argmax())
        scaled = logits / max(temperature, 1e-6)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]  # nucleus
        return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))

    def generate_text(self, prompt: str, **kwargs: Any) -> str:
        if self.tokenizer is None:
            raise UsageError(f"{self.path} has no tokenizer; use generate() with token ids")
        return self.tokenizer.decode(self.generate(prompt, **kwargs), skip_special_tokens=False)
