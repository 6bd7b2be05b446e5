"""Frozen encoders and input views for :mod:`eigenpatch.patchers.sts` (zero-shot classification).

Two encoder kinds share one interface (``encode_labels``, ``encode_views``, ``logit_scale``):

- :class:`ClipEncoder`: any dual encoder with CLIP's API (``get_text_features`` /
  ``get_image_features``); inputs are images ``[3, H, W]``; views are random resized crops and
  horizontal flips (the paper's augmentations).
- :class:`SentenceEncoder`: a text encoder used as a zero-shot classifier (sentence-transformers
  style: mean-pooled token states, L2-normalized); labels become prompts, inputs are sentences;
  views drop words and crop spans.

Everything runs under ``torch.inference_mode``: no gradient ever reaches an encoder.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from eigenpatch.errors import UsageError
from eigenpatch.patchers.sts.method import STS, spectral_basis, steer_predict

#: Softmax temperature of a sentence encoder's cosine similarities (CLIP learns its own, ~100).
SENTENCE_LOGIT_SCALE = 50.0


def text_views(text: str, n: int, rng: random.Random, drop: float = 0.15, min_span: float = 0.6) -> list[str]:
    """``text`` then ``n - 1`` augmented copies: a random contiguous span of at least ``min_span`` of
    the words, each word then dropped with probability ``drop`` (never all)."""
    words = text.split()
    out = [text]
    for _ in range(n - 1):
        if len(words) < 2:
            out.append(text)
            continue
        length = rng.randint(max(1, round(min_span * len(words))), len(words))
        start = rng.randint(0, len(words) - length)
        span = words[start : start + length]
        kept = [w for w in span if rng.random() >= drop] or span[:1]
        out.append(" ".join(kept))
    return out


def image_views(image: torch.Tensor, n: int, generator: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """``[n, 3, H, W]``: the image, then random resized crops (area ``>= min_scale``) with random flips."""
    _, h, w = image.shape
    out = [image]
    for _ in range(n - 1):
        scale = min_scale + (1 - min_scale) * float(torch.rand((), generator=generator))
        ch, cw = max(1, round(h * scale**0.5)), max(1, round(w * scale**0.5))
        top = int(torch.randint(0, h - ch + 1, (), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=generator))
        crop = image[None, :, top : top + ch, left : left + cw]
        view = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if float(torch.rand((), generator=generator)) < 0.5:
            view = view.flip(-1)
        out.append(view)
    return torch.stack(out)


class SentenceEncoder:
    """A Hugging Face text encoder with mean pooling (e.g. all-MiniLM-L6-v2, zoo ``minilm-l6``)."""

    logit_scale = SENTENCE_LOGIT_SCALE

    def __init__(self, model: Any, tokenizer: Any, template: str = "{}", batch_size: int = 128) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.batch_size = template, batch_size

    @classmethod
    def load(cls, ref: str = "minilm-l6", **kwargs: Any) -> SentenceEncoder:
        from transformers import AutoModel, AutoTokenizer

        from eigenpatch.zoo import resolve_model

        folder = resolve_model(ref)
        model = AutoModel.from_pretrained(str(folder), use_safetensors=True)
        return cls(model, AutoTokenizer.from_pretrained(str(folder)), **kwargs)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            )
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(states.dtype)
            chunks.append(F.normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1))
        return torch.cat(chunks)

    def encode_labels(self, labels: Sequence[str]) -> torch.Tensor:
        return self.encode([self.template.format(label) for label in labels])

    def encode_views(self, inputs: Sequence[str], n_views: int, seed: int) -> torch.Tensor:
        rng = random.Random(seed)
        texts = [v for text in inputs for v in text_views(text, n_views, rng)]
        return self.encode(texts).view(len(inputs), n_views, -1)


class ClipEncoder:
    """A CLIP-style dual encoder: labels through ``get_text_features``, images through ``get_image_features``."""

    def __init__(self, model: Any, tokenizer: Any, template: str = "a photo of a {}.", batch_size: int = 64) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.batch_size = template, batch_size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        """transformers 5 returns a model output whose ``pooler_output`` holds the projected features."""
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def encode_labels(self, labels: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer([self.template.format(x) for x in labels], padding=True, return_tensors="pt")
        feats = self._features(self.model.get_text_features(**batch))
        return F.normalize(feats, dim=-1)

    @torch.inference_mode()
    def encode_views(self, inputs: Sequence[torch.Tensor], n_views: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.cat([image_views(image, n_views, generator) for image in inputs])
        feats = [
            self._features(self.model.get_image_features(pixel_values=pixels[i : i + self.batch_size]))
            for i in range(0, len(pixels), self.batch_size)
        ]
        return F.normalize(torch.cat(feats), dim=-1).view(len(inputs), n_views, -1)


def zero_shot_classify(
    encoder: SentenceEncoder | ClipEncoder,
    inputs: Sequence[Any],
    labels: Sequence[str],
    method: str = "sts",
    config: STS | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Class probabilities ``[len(inputs), len(labels)]``: ``zero-shot``, ``sts`` or the ``full``
    baseline. Deterministic under ``config.seed`` (views are drawn from it, per batch)."""
    config = config or STS()
    if not labels or not inputs:
        raise UsageError("zero-shot classification needs at least one input and one label")
    prototypes = encoder.encode_labels(labels)
    scale = config.logit_scale or encoder.logit_scale
    basis = spectral_basis(prototypes, config.rank) if method == "sts" else None
    n_views = 1 if method == "zero-shot" else config.views
    out = []
    for b, i in enumerate(range(0, len(inputs), batch_size)):
        views = encoder.encode_views(inputs[i : i + batch_size], n_views, config.seed + b)
        out.append(steer_predict(views, prototypes, config, scale, method, basis))
    return torch.cat(out)
