"""Patch a checkpoint bigger than memory: the recipe run over decoder layers read from its shards.

This sits above the recipe: it builds the layer source (:class:`~eigenpatch.engine.shards.CheckpointLayers`:
the model on ``meta``, one decoder layer materialized at a time), opens the run state
(:class:`~eigenpatch.engine.state.RunState`: one fingerprint, one folder, one resume point), runs
:func:`~eigenpatch.recipe.patch` with both, and publishes the checkpoint atomically: shards are
written into the run's state folder (where a killed run finds them again), then moved with the
index, config and tokenizer into a temporary folder that is renamed into place, and checked
before that.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from eigenpatch.atomic import atomic_output_dir
from eigenpatch.engine.memory import peak_memory
from eigenpatch.engine.shards import INDEX_FILE, CheckpointLayers, shard_name, tensor_files
from eigenpatch.engine.state import RunState, fingerprint
from eigenpatch.errors import UsageError
from eigenpatch.format import REPORT_FILE
from eigenpatch.format.checkpoint import verify_checkpoint, weights_bytes
from eigenpatch.recipe import TransformConfig, patch

__all__ = ["INDEX_FILE", "patch_checkpoint"]


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
    """Apply ``recipe`` (every config ``out_of_core``) to the checkpoint in ``folder`` layer by layer;
    write the result to ``output``. Returns ``(report, output path)``.

    ``state_dir`` keeps finished shards and checkpoints; the same command given again after a
    crash continues there (it is cleared when its fingerprint differs, and removed at the end).
    """
    key = fingerprint(folder, [c.to_dict() for c in recipe], f"{dtype}:{device.type}", calib_text or "")
    state = RunState.open(state_dir, key)
    with _cleared_on_bad_input(state):
        source = CheckpointLayers(folder, state.shards, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        report = patch(
            source.model,
            list(recipe),
            tokenizer=tokenizer,
            calib_text=calib_text,
            base_model=base_model,
            show_progress=show_progress,
            layers=source,
            run_state=state,
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
    state.remove()
    return report, Path(output).resolve()


@contextmanager
def _cleared_on_bad_input(state: RunState) -> Iterator[None]:
    """Remove the run's state when it stops on bad input (a rerun would fail the same way); keep it
    when it is interrupted, so the same command continues."""
    try:
        yield
    except UsageError:
        state.remove()
        raise


def _check_complete(source: CheckpointLayers, weight_map: dict[str, str]) -> None:
    """Every layer has its shard, and every tensor outside the layers is stored (tied copies excepted).

    What is inside a layer is not checked against the skeleton: the layers a resumed run finished
    before it was killed are on disk only. :func:`verify_checkpoint` checks them against the recipe.
    """
    shards = set(weight_map.values())
    absent = [i for i in range(len(source)) if shard_name(i + 1, source.total_shards) not in shards]
    if absent:
        raise AssertionError(f"the written checkpoint lacks the shard of layer {absent[0]}")
    tied = set(getattr(source.model, "all_tied_weights_keys", {}) or {})
    rest = {k for k in source.model.state_dict() if not k.startswith(tuple(source.prefixes))} - tied
    missing = sorted(rest - set(weight_map))
    if missing:
        raise AssertionError(f"the written checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
