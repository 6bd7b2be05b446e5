"""Refuse a damaged checkpoint before it is trusted: missing, misshapen or non-finite tensors.

transformers fills a tensor missing from the weights with freshly initialized values and prints
a report; for a factor pair that means NaN or garbage logits and no error. A NaN written into a
factor loads silently too. So every loader of the format (the transformers quantizer, hence
:func:`eigenpatch.load`; the vLLM loader; ``eigenpatch export`` and ``serve``) checks:

- every tensor the patched model needs is in the safetensors, with the shape its
  ``quantization_config`` implies (headers only: cheap);
- every tensor the format adds (factor pairs, structured blocks, projections, shifts) is finite
  (one pass over those tensors);
- every layer ``quantization_config`` lists exists in the architecture (checked where the
  modules are rebuilt, :func:`~eigenpatch.format.checkpoint.build_patched_modules`).

A failure is a :class:`CheckpointError`: one line naming the tensor, the file and the fix; a
``ValueError`` for Python callers and a usage error (exit code 2) in the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from eigenpatch.errors import UsageError

INDEX_FILE = "model.safetensors.index.json"
REBUILD = "re-run patch-model to rebuild the checkpoint"


class CheckpointError(UsageError, ValueError):
    """A checkpoint that must not be loaded: the message names the tensor or layer, the file and the fix."""


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every ``*.safetensors``."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: {INDEX_FILE} names {', '.join(missing)}, which is missing; {REBUILD}")
        return files
    return sorted(folder.glob("*.safetensors"))


def stored_shapes(files: Iterable[str | Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """``{tensor name: (shape, file)}`` from the safetensors headers (no tensor data is read)."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in map(Path, files):
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (not a dict)
                    shapes[name] = (tuple(f.get_slice(name).get_shape()), file)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            reason = f"not a readable safetensors file ({exc}); the file is truncated or damaged"
            raise CheckpointError(f"{file}: {reason}") from None
    return shapes


def _aliases(model: nn.Module) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Each tensor of ``model``'s state dict once, with every name it is saved under (a tied
    embedding and ``lm_head`` share one tensor; saving keeps one of the names)."""
    keys = set(model.state_dict())
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if name in keys:
            groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    yield from groups.values()


def check_present(
    model: nn.Module, stored: dict[str, tuple[tuple[int, ...], Path]], folder: str | Path, only: Iterable[str]
) -> None:
    """Every tensor of ``model`` named in ``only`` (its patched modules already rebuilt) is stored
    with its shape. ``only`` is the format's tensors: the others are the base architecture's, whose
    file names transformers may map (its weight conversions), and whose absence it reports itself."""
    wanted = set(only)
    for names, tensor in _aliases(model):
        if wanted.isdisjoint(names):
            continue
        found = next((n for n in names if n in stored), None)
        if found is None:
            raise CheckpointError(
                f"{folder}: tensor {names[0]} is missing from the weights (truncated or edited?); {REBUILD}"
            )
        shape, file = stored[found]
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"{file}: tensor {found} has shape {list(shape)}, config.json implies {list(tensor.shape)}; {REBUILD}"
            )


def format_tensor_names(model: nn.Module, owners: tuple[type[nn.Module], ...]) -> list[str]:
    """Names of the tensors the format adds: the direct parameters of every ``owners`` module."""
    return [
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, owners)
        for name, _ in module.named_parameters(recurse=False)
    ]


def check_finite_in_model(model: nn.Module, names: Iterable[str], source: str | Path) -> None:
    """Every named parameter of a loaded ``model`` is finite."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        tensor = params.get(name)
        if tensor is not None and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values; {REBUILD}")


def check_finite_in_files(names: Iterable[str], stored: dict[str, tuple[tuple[int, ...], Path]]) -> None:
    """Every named tensor, read from its file, is finite."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name in stored:
            by_file.setdefault(stored[name][1], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name in file_names:
                if not bool(torch.isfinite(f.get_tensor(name)).all()):
                    raise CheckpointError(f"{file}: tensor {name} holds NaN or infinite values; {REBUILD}")
