"""Patch a checkpoint bigger than memory: decoder layers read from its shards one at a time.

The model is built on the ``meta`` device (no memory), then only what every pass needs is
materialized: the embeddings, the final norm and the head, and the buffers the model computes
itself (rotary frequencies). :class:`CheckpointLayers` materializes decoder layer ``i`` from the
safetensors shards when a pass asks for it (each file opened lazily, one tensor read at a time),
returns it to ``meta`` when the pass is done with it, and writes it to its own output shard when
it is final. So peak memory is one layer (and its frozen dense copy), the calibration streams
and the embeddings, whatever the depth.

:func:`patch_checkpoint` runs a recipe of ``streams`` transforms this way and publishes the
checkpoint atomically: shards are written into the run's state folder (where a killed run finds
them again), then moved with the index, config and tokenizer into a temporary folder that is
renamed into place, and checked before that.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from eigenpatch.atomic import atomic_output_dir
from eigenpatch.errors import UsageError
from eigenpatch.format import REPORT_FILE
from eigenpatch.format.checkpoint import verify_checkpoint, weights_bytes
from eigenpatch.format.verify import REBUILD, CheckpointError
from eigenpatch.memory import peak_memory, release_freed_memory
from eigenpatch.recipe import TransformConfig, patch
from eigenpatch.sequential import LayerSource, layer_prefix

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


def _shard_name(index: int, total: int) -> str:
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
            raise AssertionError(f"layer {index} is already final; a second streamed transform cannot reload it")
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
        return (self.shards / _shard_name(index + 1, self.total_shards)).is_file()

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
        target = self.shards / _shard_name(shard, self.total_shards)
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(cpu, str(target) + ".tmp", metadata={"format": "pt"})
        os.replace(str(target) + ".tmp", target)


def run_fingerprint(
    folder: Path, recipe: Sequence[TransformConfig], dtype: torch.dtype, device: torch.device, calib_text: str | None
) -> str:
    """What a resumed run must share with the one it continues."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    digest.update(json.dumps([c.to_dict() for c in recipe], sort_keys=True).encode())
    digest.update(f"{dtype}:{device.type}".encode())
    digest.update((calib_text or "").encode())
    return digest.hexdigest()[:16]


def patch_checkpoint(
    folder: Path,
    recipe: Sequence[TransformConfig],
    output: Path,
    *,
    state_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: Any = None,
    calib_text: str | None = None,
    base_model: str | None = None,
    show_progress: bool = True,
    force: bool = False,
    trust_remote_code: bool = False,
    report_extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Apply ``recipe`` (every config ``streams``) to the checkpoint in ``folder`` layer by layer;
    write the result to ``output``. Returns ``(report, output path)``.

    ``state_dir`` keeps finished shards and checkpoints; the same command given again after a
    crash continues there (it is cleared when its fingerprint differs, and removed at the end).
    """
    key = run_fingerprint(folder, recipe, dtype, device, calib_text)
    run_file = state_dir / "run.json"
    if state_dir.exists() and (not run_file.is_file() or json.loads(run_file.read_text()).get("key") != key):
        shutil.rmtree(state_dir)  # another command's state: nothing of it applies
    state_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"key": key}))
    with _cleared_on_bad_input(state_dir):
        source = CheckpointLayers(
            folder, state_dir / "shards", device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        report = patch(
            source.model,
            list(recipe),
            tokenizer=tokenizer,
            calib_text=calib_text,
            base_model=base_model,
            show_progress=show_progress,
            state_dir=state_dir,
            layers=source,
        )
        for i in range(len(source)):  # layers no transform changed are copied as they are
            if not source.is_written(i):
                source.load(i)
                source.done(i)
        source.write_rest()
        report.update(report_extra or {})
        with atomic_output_dir(output, force) as tmp:
            weight_map = {}
            for shard in sorted(source.shards.glob("model-*.safetensors")):
                shutil.move(str(shard), tmp / shard.name)
                weight_map |= {name: shard.name for name in tensor_files(tmp, shard.name)}
            total = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            source.model.config.save_pretrained(tmp)
            if getattr(source.model, "generation_config", None) is not None:
                source.model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _check_complete(source, weight_map)
            verify_checkpoint(tmp)  # format tensors present, of the right shape, finite
            report["weights_bytes"] = weights_bytes(tmp)
            report.update(peak_memory(device))
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(state_dir, ignore_errors=True)
    return report, Path(output).resolve()


@contextmanager
def _cleared_on_bad_input(state_dir: Path) -> Iterator[None]:
    """Remove the run's state when it stops on bad input (a rerun would fail the same way); keep it
    when it is interrupted, so the same command continues."""
    try:
        yield
    except UsageError:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise


def _check_complete(source: CheckpointLayers, weight_map: dict[str, str]) -> None:
    """Every layer has its shard, and every tensor outside the layers is stored (tied copies excepted).

    What is inside a layer is not checked against the skeleton: the layers a resumed run finished
    before it was killed are on disk only. :func:`verify_checkpoint` checks them against the recipe.
    """
    shards = set(weight_map.values())
    absent = [i for i in range(len(source)) if _shard_name(i + 1, source.total_shards) not in shards]
    if absent:
        raise AssertionError(f"the written checkpoint lacks the shard of layer {absent[0]}")
    tied = set(getattr(source.model, "all_tied_weights_keys", {}) or {})
    rest = {k for k in source.model.state_dict() if not k.startswith(tuple(source.prefixes))} - tied
    missing = sorted(rest - set(weight_map))
    if missing:
        raise AssertionError(f"the written checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
