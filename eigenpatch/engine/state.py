"""One run state: one fingerprint, one folder, one resume point for the whole recipe.

A layer-by-layer run that is killed (Ctrl-C, OOM, a reboot) continues when the same command is
given again. Everything it needs lies in one folder, under one key:

- ``run.json``: the key, a digest of what the result depends on (the input's weight files, the
  recipe, dtype, device, calibration text). A folder with another key is cleared, never mixed in;
- ``plan-<i>-<name>.json`` / ``.safetensors``: what transform ``i``'s global planning step chose
  (ranks, scales, ...), so a resumed run skips the scoring passes;
- ``streams-<k>/`` and ``progress.json``: both streams after the last finished layer ``k - 1``
  (one safetensors file per batch and stream, so writing never holds more than one batch's copy)
  and the transforms' per-layer records; ``progress.json`` names the folder;
- ``shards/``: the finished layers themselves (:class:`~eigenpatch.engine.shards.CheckpointLayers`).

Each file is written beside its final name and renamed, so a run killed at any moment leaves the
last complete state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Plan:
    """What a transform's global planning step chose: JSON-able ``meta`` and named ``tensors``."""

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def fingerprint(folder: Path, recipe: Sequence[dict[str, Any]], *parts: str) -> str:
    """A key for a run on the checkpoint in ``folder``: its weight files (name, size, mtime), the
    recipe (as ``to_dict`` entries) and any further ``parts`` (dtype, device, calibration text)."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    digest.update(json.dumps(list(recipe), sort_keys=True).encode())
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class RunState:
    """The state folder of one run (see the module docstring). :meth:`open` clears another run's."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = Path(folder), key

    @classmethod
    def open(cls, folder: Path, key: str) -> RunState:
        """The state in ``folder`` for the run ``key``: an earlier run of the same key is kept (to be
        resumed), anything else there is removed."""
        folder = Path(folder)
        run_file = folder / "run.json"
        if folder.exists() and (not run_file.is_file() or json.loads(run_file.read_text()).get("key") != key):
            shutil.rmtree(folder)  # another command's state: nothing of it applies
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(run_file, {"key": key})
        return cls(folder, key)

    @property
    def shards(self) -> Path:
        """Where the finished layers are written."""
        return self.folder / "shards"

    def remove(self) -> None:
        """The run finished (or stopped on bad input): nothing is left to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- plans ----------------------------------------------------------------------------------
    def _plan_path(self, index: int, name: str) -> Path:
        return self.folder / f"plan-{index}-{name}"

    def save_plan(self, index: int, name: str, plan: Plan) -> None:
        base = self._plan_path(index, name)
        if plan.tensors:
            tensors = {k: v.detach().contiguous().cpu() for k, v in plan.tensors.items()}
            save_file(tensors, str(base) + ".safetensors.tmp")
            os.replace(str(base) + ".safetensors.tmp", str(base) + ".safetensors")
        _write_json(base.with_suffix(".json"), {"key": self.key, "meta": plan.meta})

    def load_plan(self, index: int, name: str) -> Plan | None:
        base = self._plan_path(index, name)
        meta_file = base.with_suffix(".json")
        if not meta_file.is_file():
            return None
        saved = json.loads(meta_file.read_text())
        if saved.get("key") != self.key:
            return None
        tensors_file = Path(str(base) + ".safetensors")
        return Plan(saved["meta"], load_file(str(tensors_file)) if tensors_file.is_file() else {})

    # -- the resume point -----------------------------------------------------------------------
    @property
    def _progress(self) -> Path:
        return self.folder / "progress.json"

    def load_streams(
        self, dense: list[torch.Tensor], propagated: list[torch.Tensor]
    ) -> tuple[int, list[Any], list[float]] | None:
        """Fill both streams (per-batch views) from an earlier run; ``(next layer, records, seconds)``, or None."""
        if not self._progress.is_file():
            return None
        state = json.loads(self._progress.read_text())
        streams = self.folder / state.get("streams", "")
        if state.get("key") != self.key or not streams.is_dir():
            return None
        for stream, views in (("dense", dense), ("propagated", propagated)):
            for b, view in enumerate(views):  # one batch's file in memory at a time
                view.copy_(load_file(str(streams / f"{stream}-{b}.safetensors"), device=str(view.device))["h"])
        return state["next"], state["records"], state["layer_seconds"]

    def save_streams(
        self,
        next_layer: int,
        dense: list[torch.Tensor],
        propagated: list[torch.Tensor],
        records: list[Any],
        seconds: list[float],
    ) -> None:
        """Both streams after layer ``next_layer - 1``, and what the transforms recorded so far."""
        name = f"streams-{next_layer:05d}"
        tmp = self.folder / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for stream, tensors in (("dense", dense), ("propagated", propagated)):
            for b, t in enumerate(tensors):
                save_file({"h": t.detach().contiguous().cpu()}, str(tmp / f"{stream}-{b}.safetensors"))
        shutil.rmtree(self.folder / name, ignore_errors=True)
        os.replace(tmp, self.folder / name)
        state = {"key": self.key, "next": next_layer, "streams": name, "records": records, "layer_seconds": seconds}
        _write_json(self._progress, state)
        for old in self.folder.glob("streams-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
