"""The ``steer`` config: which vector file, how strong, on which layers and positions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eigenpatch.errors import UsageError
from eigenpatch.recipe import TransformConfig


@dataclass
class Steer(TransformConfig):
    """Add ``strength`` times the steering vectors in ``vectors`` (a file of ``eigenpatch steer build``)."""

    name = "steer"
    vectors: str = ""
    strength: float = 1.0
    layers: str = ""  # a subset of the file's layers ("10-14"); empty: all of them
    start: int = 0
    sha256: str = ""  # of the vector file, recorded when the recipe runs

    def __post_init__(self) -> None:
        if not self.vectors:
            raise UsageError("steer needs a vector file (eigenpatch steer build ... -o vec.safetensors)")
        if not torch.isfinite(torch.tensor(self.strength)):
            raise UsageError(f"steering strength must be finite, got {self.strength}")
        if self.start < 0:
            raise UsageError(f"steering start position must be >= 0, got {self.start}")

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """Random vectors (twice the typical hidden-state scale) on every layer, from position 2."""
        from eigenpatch.format.interventions import decoder_layers
        from eigenpatch.format.steering import SteeringVectors

        dim, n_layers = model.get_input_embeddings().weight.shape[1], len(decoder_layers(model))
        g = torch.Generator().manual_seed(0)
        vectors = SteeringVectors({i: 2.0 * torch.randn(dim, generator=g) for i in range(n_layers)})
        return [
            cls(vectors=str(vectors.save(workdir / "steer-example.safetensors", force=True)), strength=1.5, start=2)
        ]
