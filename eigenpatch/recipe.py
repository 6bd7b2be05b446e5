"""Transform configs, the handler registry, and :func:`patch`.

As in torchao's ``quantize_``: each transform is a small config dataclass, and
:func:`register_transform` maps the config type to the function that rewrites the model. A
recipe is a list of configs; it serializes into the checkpoint (``quantization_config.recipe``)
so a patched folder remembers how it was made and the recipe can be re-run.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from eigenpatch.errors import UsageError
from eigenpatch.format.checkpoint import attach_format
from eigenpatch.sequential import LayerSource


@dataclass
class TransformConfig:
    """Base of every transform config: what the core reads from a transform, declared in one place.

    ``name`` keys the registry and the recipe; ``version`` is stored with each recipe entry, so a
    config whose fields change meaning can read older entries (bump it and handle the old form in
    :meth:`from_dict`); ``needs_data`` says the transform reads calibration text (the CLI then
    loads it and demands a tokenizer); ``needs_teacher`` asks :func:`patch` for a frozen copy of
    the model as it was before the recipe ran (distillation); ``resumable`` asks for a state
    folder that survives an interrupted run; ``streams`` see below. A subclass may turn ``needs_data`` into a property
    when it depends on the config's fields.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_data: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    resumable: ClassVar[bool] = False
    #: The handler reaches decoder layers only through ``context.layers`` (one at a time), so the
    #: recipe can run on a model too big for memory (:mod:`eigenpatch.lazy`). A property where it
    #: depends on the config's fields.
    streams: ClassVar[bool] = False
    #: The patched model gives the same outputs for token ids: only embeddings passed in directly
    #: change (a defence against embedding-space attacks). The contract test then looks for the
    #: patch's effect on embeddings.
    identity_on_tokens: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"transform": self.name, "version": self.version, **values}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformConfig:
        """The config of a recipe entry (without ``transform``), written by ``version`` <= this class's."""
        version = data.pop("version", 1)  # entries written before versions were stored are version 1
        if version > cls.version:
            raise UsageError(
                f"recipe entry {cls.name!r} is version {version}; this eigenpatch reads up to {cls.version}: upgrade it"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise UsageError(f"transform {cls.name!r} has no option(s) {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def claimed_linears(self) -> tuple[str, ...]:
        """Linear names this transform replaces wholesale, so later stages must leave them alone."""
        return ()

    def touched_linears(self) -> tuple[str, ...]:
        """Linear names this transform rewrites (claimed or not): two transforms touching the same
        name cannot both apply it as configured. The contract test stacks examples by this."""
        return self.claimed_linears()

    @classmethod
    def example(cls, workdir: Path, model: nn.Module) -> list[TransformConfig]:
        """A small recipe ending with this transform, for the registry's contract test on a tiny
        model (``workdir``: where it may write input files). The default is the config's defaults."""
        return [cls()]


@dataclass
class PatchContext:
    """What a handler may read besides the model: calibration text and the tokenizer, when given."""

    tokenizer: Any = None
    calib_text: str | None = None
    show_progress: bool = True
    #: Calibration statistics already gathered, keyed by what they depend on. Reuse one dict only
    #: across patches of the same base model with the same calibration text (benchmarks do).
    cache: dict[Any, Any] = field(default_factory=dict)
    #: A frozen copy of the model as it was before the recipe ran, for transforms that distill
    #: from it; made only when a config's ``needs_teacher`` is true.
    teacher: nn.Module | None = None
    #: Where long-running transforms keep resumable state (``resumable`` configs); None: no resume.
    state_dir: Path | None = None
    #: Called as ``on_step(transform_name, step, model)`` after each training step of transforms
    #: that train: benchmarks evaluate intermediate models through it.
    on_step: Callable[[str, int, nn.Module], None] | None = None
    #: Where the decoder layers live (:class:`~eigenpatch.sequential.LayerSource`); None: all in
    #: ``model``. Only handlers of ``streams`` configs are given a lazy one.
    layers: LayerSource | None = None


@dataclass
class TransformResult:
    """What a handler reports back; merged into the run report."""

    details: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[nn.Module, Any, PatchContext], TransformResult]

_REGISTRY: dict[str, tuple[type[TransformConfig], Handler]] = {}


def register_transform(config_cls: type[TransformConfig]) -> Callable[[Handler], Handler]:
    """Decorator: ``@register_transform(MyConfig)`` on the function that applies a ``MyConfig``."""
    if not config_cls.name:
        raise TypeError(f"{config_cls.__name__} needs a class attribute `name`")

    def decorate(handler: Handler) -> Handler:
        _REGISTRY[config_cls.name] = (config_cls, handler)
        return handler

    return decorate


def _load_rooms() -> None:
    """Import ``eigenpatch.patchers``, whose rooms register their transforms on import.

    Done on first use rather than at ``import eigenpatch``, so the core never imports the
    transforms at import time (they import the core)."""
    importlib.import_module("eigenpatch.patchers")


def registered() -> dict[str, tuple[type[TransformConfig], Handler]]:
    """Every registered transform: ``{name: (config class, handler)}``."""
    _load_rooms()
    return dict(_REGISTRY)


def transform_names() -> list[str]:
    """Names of the registered transforms."""
    return sorted(registered())


def config_from_dict(data: dict[str, Any]) -> TransformConfig:
    """Inverse of :meth:`TransformConfig.to_dict`: replays one entry of a saved recipe."""
    data = dict(data)
    name = data.pop("transform", None)
    registry = registered()
    if name not in registry:
        raise UsageError(f"unknown transform {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name][0].from_dict(data)


def recipe_of(folder: str | Path) -> list[TransformConfig]:
    """The recipe a patched checkpoint was made with, as configs (to re-run it on another model)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    entries = (config.get("quantization_config") or {}).get("recipe")
    if not entries:
        raise UsageError(f"{folder} is not an eigenpatch checkpoint (no quantization_config.recipe in config.json)")
    return [config_from_dict(entry) for entry in entries]


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding / lm_head counts once)."""
    return sum(p.numel() for p in model.parameters())


def patch(
    model: nn.Module,
    recipe: TransformConfig | Sequence[TransformConfig],
    *,
    tokenizer: Any = None,
    calib_text: str | None = None,
    base_model: str | None = None,
    show_progress: bool = True,
    calibration_cache: dict[Any, Any] | None = None,
    state_dir: str | Path | None = None,
    layers: LayerSource | None = None,
) -> dict[str, Any]:
    """Apply ``recipe`` to ``model`` in place, in order, and describe the result in its config.

    Returns the run report (parameter counts before/after, per-transform details, seconds).
    After this, ``save_pretrained`` / :func:`eigenpatch.save` writes the eigenpatch format.
    ``state_dir``: where resumable transforms checkpoint; rerunning the same recipe
    with the same ``state_dir`` continues an interrupted run. ``layers``: a lazy source of the
    decoder layers for a skeleton ``model`` (:func:`eigenpatch.lazy.patch_checkpoint` passes it).
    """
    configs = [recipe] if isinstance(recipe, TransformConfig) else list(recipe)
    context = PatchContext(tokenizer=tokenizer, calib_text=calib_text, show_progress=show_progress)
    if calibration_cache is not None:
        context.cache = calibration_cache
    if state_dir is not None:
        context.state_dir = Path(state_dir)
    if layers is not None:
        lazy = [c.name for c in configs if not c.streams]
        if lazy:
            raise UsageError(f"{lazy[0]} needs the whole model in memory; it cannot run layer by layer from disk")
        context.layers = layers
    if any(c.needs_teacher for c in configs):
        context.teacher = copy.deepcopy(model).eval().requires_grad_(False)
    before = count_parameters(model)
    steps = []
    registry = registered()
    for config in configs:
        if config.name not in registry:
            raise UsageError(f"transform {config.name!r} is not registered; known: {', '.join(transform_names())}")
        start = time.perf_counter()
        result = registry[config.name][1](model, config, context)
        steps.append({**config.to_dict(), **result.details, "seconds": round(time.perf_counter() - start, 2)})
    attach_format(model, [c.to_dict() for c in configs], base_model)
    after = count_parameters(model)
    return {
        "base_model": base_model,
        "model_params_before": before,
        "model_params_after": after,
        "steps": steps,
    }
