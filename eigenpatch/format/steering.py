"""The steering-vector file: what ``eigenpatch steer build`` writes and every runtime reads.

A safetensors file with one ``layers.L`` ``[d]`` vector per decoder layer, and under the metadata
key ``eigenpatch`` a JSON record (``format = "eigenpatch-steer"``, version, the base model's
fingerprint, how the vectors were made). It lives in the core, next to the checkpoint format,
because the vLLM server reads it (per-request steering) without the transform that builds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from eigenpatch.atomic import atomic_output_file
from eigenpatch.errors import UsageError
from eigenpatch.format import STEER_FILE_FORMAT, STEER_FILE_VERSION
from eigenpatch.format.interventions import decoder_layers


def model_fingerprint(model: nn.Module) -> str:
    """A short hash naming the base model: its width, depth and input-embedding bytes.

    Compression and the other transforms never touch the embeddings, so a vector built on a model
    still matches that model's patched checkpoints; a different model does not.
    """
    return _fingerprint(model.get_input_embeddings().weight, len(decoder_layers(model)))


def _fingerprint(weight: torch.Tensor, n_layers: int) -> str:
    weight = weight.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(weight.shape)}:{n_layers}".encode())
    digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


def folder_fingerprint(folder: str | os.PathLike, n_layers: int) -> str | None:
    """:func:`model_fingerprint` of a saved checkpoint, read from its safetensors without loading
    the model (None when no ``*embed_tokens.weight`` tensor is found)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            names = [k for k in f.keys() if k.endswith("embed_tokens.weight")]  # noqa: SIM118 (not a dict)
            if names:
                return _fingerprint(f.get_tensor(names[0]), n_layers)
    return None


@dataclass
class SteeringVectors:
    """Per-layer steering vectors and the record of how they were made."""

    vectors: dict[int, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def dim(self) -> int:
        return next(iter(self.vectors.values())).numel()

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        tensors = {f"layers.{L}": v.detach().to("cpu", torch.float32).contiguous() for L, v in self.vectors.items()}
        meta = {
            **self.meta,
            "format": STEER_FILE_FORMAT,
            "version": STEER_FILE_VERSION,
            "layers": self.layers,
            "dim": self.dim,
        }
        with atomic_output_file(path, force=force) as tmp:
            save_file(tensors, str(tmp), metadata={"eigenpatch": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVectors:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"steering vector file {p} does not exist")
        try:
            with safe_open(str(p), "pt") as f:  # one pass: metadata and tensors
                raw = (f.metadata() or {}).get("eigenpatch")
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{p} is not a safetensors file: {exc}") from None
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != STEER_FILE_FORMAT:
            raise UsageError(f"{p} is not an eigenpatch steering file (build one with `eigenpatch steer build`)")
        if meta.get("version", 1) > STEER_FILE_VERSION:
            raise UsageError(
                f"{p} is steering-file version {meta['version']}; this eigenpatch reads up to {STEER_FILE_VERSION}: "
                "upgrade eigenpatch"
            )
        vectors = {}
        for name, t in tensors.items():
            head, _, index = name.partition(".")
            if head != "layers" or not index.isdigit() or t.dim() != 1:
                raise UsageError(f"{p}: unexpected tensor {name!r} {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise UsageError(f"{p}: tensor {name} has NaN or inf values")
            vectors[int(index)] = t
        if not vectors or len({v.numel() for v in vectors.values()}) != 1:
            raise UsageError(f"{p}: needs one or more layers.L vectors of one width")
        return cls(vectors, meta)

    def check_model(self, model: nn.Module, source: str = "the vectors") -> None:
        """Refuse a model the vectors were not built on (width, depth, fingerprint)."""
        dim = model.get_input_embeddings().weight.shape[1]
        n_layers = len(decoder_layers(model))
        if self.dim != dim:
            raise UsageError(f"{source} are {self.dim}-dimensional; this model's hidden size is {dim}")
        if self.layers[-1] >= n_layers:
            raise UsageError(f"{source} name layer {self.layers[-1]}; this model has {n_layers} decoder layers")
        want = self.meta.get("model")
        if want and want != model_fingerprint(model):
            raise UsageError(
                f"{source} were built on another model (fingerprint {want}, this one {model_fingerprint(model)})"
            )
