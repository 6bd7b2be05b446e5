"""Where the decoder layers live while a pass works through them: in memory, or in safetensors shards.

:class:`CheckpointLayers` serves a checkpoint bigger than memory. The model is built on the
``meta`` device (no memory), then only what every pass needs is materialized: the embeddings,
the final norm and the head, and the buffers the model computes itself (rotary frequencies).
Decoder layer ``i`` is materialized from the safetensors shards when a pass asks for it (each
file opened lazily, one tensor read at a time), returned to ``meta`` when the pass is done with
it, and written to its own output shard when it is final. So peak memory is one layer (and its
frozen dense copy), the calibration streams and the embeddings, whatever the depth.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from eigenpatch.engine.memory import release_freed_memory
from eigenpatch.engine.streams import decoder_layers, layer_prefix
from eigenpatch.errors import UsageError
from eigenpatch.format.verify import REBUILD, CheckpointError


class LayerSource:
    """Where the decoder layers live while an engine pass works through them.

    A pass calls :meth:`load` before it uses layer ``i`` and then either :meth:`drop` (it only
    read it) or :meth:`done` (it patched it; the layer is final). This base class serves a model
    that is already in memory, so every call is free; :class:`CheckpointLayers`
    reads each layer from the safetensors shards and writes it out when it is done, so a pass
    never holds more than one layer. Transforms that go through a source run the same code in
    both cases.
    """

    #: Whether a finished layer survives the process (written to disk), so a run can resume after it.
    persistent = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = decoder_layers(model)

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int) -> nn.Module:
        """Layer ``index``, materialized on the model's device."""
        return self.layers[index]

    def drop(self, index: int) -> None:
        """The pass is done reading layer ``index`` (unchanged)."""

    def done(self, index: int) -> None:
        """Layer ``index`` is patched and final."""


def layer_source(model: nn.Module, source: LayerSource | None) -> LayerSource:
    """``source``, or the in-memory source of ``model``."""
    return source if source is not None else LayerSource(model)


INDEX_FILE = "model.safetensors.index.json"


def tensor_files(folder: Path, pattern: str = "*.safetensors") -> dict[str, Path]:
    """Which safetensors file of ``folder`` holds each tensor (from the shard headers)."""
    where: dict[str, Path] = {}
    for file in sorted(folder.glob(pattern)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                where[name] = file
    return where


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class CheckpointLayers(LayerSource):
    """The decoder layers of the checkpoint in ``folder``, materialized on ``device`` in ``dtype`` on demand.

    ``shards``: where finished layers go (``done``), one safetensors file per layer; the first
    file of the set is left for the tensors outside the layers (:meth:`write_rest`).
    """

    persistent = True

    def __init__(
        self,
        folder: Path,
        shards: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        trust_remote_code: bool = False,
    ) -> None:
        self.folder, self.shards, self.device, self.dtype = folder, shards, device, dtype
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model.eval()
        model.config.dtype = dtype
        super().__init__(model)
        self.files = tensor_files(folder)
        self.prefixes = [layer_prefix(model, i) for i in range(len(self.layers))]
        self.total_shards = len(self.layers) + 1
        self._done: set[int] = set()
        self._materialize_buffers()
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        rest = [k for k in model.state_dict() if not k.startswith(tuple(self.prefixes)) and k not in tied]
        self._read(model, "", rest)
        model.tie_weights()

    def _materialize_buffers(self) -> None:
        """Buffers the model computes and never stores (rotary frequencies): computed here, as
        ``from_pretrained`` does, by the model's own weight initializer on their modules."""
        owners = set()
        for name, buffer in self.model.named_non_persistent_buffers():
            _set_tensor(self.model, name, torch.empty_like(buffer, device=self.device))
            owners.add(name.rpartition(".")[0])
        for owner in sorted(owners):
            self.model._init_weights(self.model.get_submodule(owner))

    def _read(self, module: nn.Module, prefix: str, names: Sequence[str]) -> None:
        """Read tensors ``prefix + name`` into ``module`` (each file opened only while it is read,
        so its pages are not kept mapped), checking presence, shape and finiteness."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            file = self.files.get(prefix + name)
            if file is None:
                raise CheckpointError(f"{self.folder}: tensor {prefix + name} is missing from the weights; {REBUILD}")
            by_file.setdefault(file, []).append(name)
        expected = module.state_dict()
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in group:
                    value = f.get_tensor(prefix + name)
                    if tuple(value.shape) != tuple(expected[name].shape):
                        raise CheckpointError(
                            f"{file.name}: {prefix + name} has shape {tuple(value.shape)}, the config implies "
                            f"{tuple(expected[name].shape)}; {REBUILD}"
                        )
                    if value.is_floating_point():
                        if not torch.isfinite(value).all():
                            raise UsageError(
                                f"weight {prefix + name} contains NaN or inf values; the checkpoint is broken"
                            )
                        value = value.to(self.dtype)
                    _set_tensor(module, name, value.to(self.device))

    def load(self, index: int) -> nn.Module:
        if index in self._done:
            raise AssertionError(
                f"layer {index} is already final; the engine runs every layer-by-layer transform in one pass"
            )
        layer = self.layers[index]
        self._read(layer, self.prefixes[index], list(layer.state_dict()))
        return layer

    def drop(self, index: int) -> None:
        self.layers[index].to("meta")
        release_freed_memory()

    def done(self, index: int) -> None:
        prefix = self.prefixes[index]
        self._write(index + 1, {prefix + k: v for k, v in self.layers[index].state_dict().items()})
        self._done.add(index)
        self.drop(index)

    def is_written(self, index: int) -> bool:
        return (self.shards / shard_name(index + 1, self.total_shards)).is_file()

    def write_rest(self) -> None:
        """Write the tensors outside the decoder layers (embeddings, final norm, untied head) to the first shard."""
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        rest = {
            k: v for k, v in self.model.state_dict().items() if not k.startswith(tuple(self.prefixes)) and k not in tied
        }
        self._write(0, rest)

    def _write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        self.shards.mkdir(parents=True, exist_ok=True)
        seen: dict[int, str] = {}
        for name, t in tensors.items():
            if t.data_ptr() in seen and t.numel():
                raise AssertionError(f"{name} shares storage with {seen[t.data_ptr()]}; shards store each tensor once")
            seen[t.data_ptr()] = name
        target = self.shards / shard_name(shard, self.total_shards)
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(cpu, str(target) + ".tmp", metadata={"format": "pt"})
        os.replace(str(target) + ".tmp", target)
