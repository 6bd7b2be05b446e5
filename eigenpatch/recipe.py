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

from eigenpatch.engine.shards import LayerSource
from eigenpatch.engine.state import RunState
from eigenpatch.engine.transform import LayerTransform
from eigenpatch.errors import UsageError
from eigenpatch.format.checkpoint import attach_format


@dataclass
class TransformConfig:
    """Base of every transform config: what the core reads from a transform, declared in one place.

    ``name`` keys the registry and the recipe; ``version`` is stored with each recipe entry, so a
    config whose fields change meaning can read older entries (bump it and handle the old form in
    :meth:`from_dict`); ``needs_data`` says the transform reads calibration text (the CLI then
    loads it and demands a tokenizer); ``needs_teacher`` asks :func:`patch` for a frozen copy of
    the model as it was before the recipe ran (distillation); ``resumable`` asks for a state
    folder that survives an interrupted run; ``out_of_core`` see below. A subclass may turn
    ``needs_data`` into a property when it depends on the config's fields.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_data: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    resumable: ClassVar[bool] = False
    #: The transform runs inside the layer-by-layer engine (:mod:`eigenpatch.engine`), through the
    #: :class:`~eigenpatch.engine.LayerTransform` its room registers with
    #: :func:`register_layer_transform`; so it sees one decoder layer at a time and the recipe can
    #: run on a model too big for memory (:mod:`eigenpatch.out_of_core`). A property where it
    #: depends on the config's fields.
    out_of_core: ClassVar[bool] = False
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
    #: Where the decoder layers live (:class:`~eigenpatch.engine.shards.LayerSource`); None: all in
    #: ``model``. Only ``out_of_core`` configs run with a lazy one, inside the engine.
    layers: LayerSource | None = None
    #: The out-of-core run's state (:class:`~eigenpatch.engine.state.RunState`), for the engine.
    run_state: RunState | None = None


@dataclass
class TransformResult:
    """What a handler reports back; merged into the run report."""

    details: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[nn.Module, Any, PatchContext], TransformResult]
#: Builds the engine's view of an ``out_of_core`` config: ``factory(model, config, context)``.
LayerFactory = Callable[[nn.Module, Any, PatchContext], LayerTransform]

_REGISTRY: dict[str, tuple[type[TransformConfig], Handler]] = {}
_LAYER_FACTORIES: dict[str, LayerFactory] = {}


def register_transform(config_cls: type[TransformConfig]) -> Callable[[Handler], Handler]:
    """Decorator: ``@register_transform(MyConfig)`` on the function that applies a ``MyConfig``."""
    if not config_cls.name:
        raise TypeError(f"{config_cls.__name__} needs a class attribute `name`")

    def decorate(handler: Handler) -> Handler:
        _REGISTRY[config_cls.name] = (config_cls, handler)
        return handler

    return decorate


def register_layer_transform(config_cls: type[TransformConfig]) -> Callable[[LayerFactory], LayerFactory]:
    """Decorator: ``@register_layer_transform(MyConfig)`` on the :class:`~eigenpatch.engine.LayerTransform`
    (or a function returning one) that runs a ``MyConfig`` whose ``out_of_core`` is true in the engine."""

    def decorate(factory: LayerFactory) -> LayerFactory:
        _LAYER_FACTORIES[config_cls.name] = factory
        return factory

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
    """Unique parameters (a tied embedding / lm_head counts once); a quantized Linear counts the
    weights its codes stand for (its bytes are in the report's ``weights_bytes``)."""
    from eigenpatch.format.quantized import QuantizedLinear

    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    stored = {id(p) for m in quantized for p in m.stored()}
    logical = sum(m.in_features * m.out_features for m in quantized)
    return logical + sum(p.numel() for p in model.parameters() if id(p) not in stored)


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
    run_state: RunState | None = None,
) -> dict[str, Any]:
    """Apply ``recipe`` to ``model`` in place, in order, and describe the result in its config.

    Returns the run report (parameter counts before/after, per-transform details, seconds).
    After this, ``save_pretrained`` / :func:`eigenpatch.save` writes the eigenpatch format.
    ``state_dir``: where resumable transforms checkpoint; rerunning the same recipe
    with the same ``state_dir`` continues an interrupted run. Consecutive ``out_of_core`` configs
    run together in one layer-by-layer engine run (one Fisher, one scoring and one fit pass for
    all); ``layers`` and ``run_state``: the lazy source of the decoder layers of a skeleton
    ``model``, and the run's state (:func:`eigenpatch.out_of_core.patch_checkpoint` passes both).
    """
    configs = [recipe] if isinstance(recipe, TransformConfig) else list(recipe)
    context = PatchContext(tokenizer=tokenizer, calib_text=calib_text, show_progress=show_progress)
    if calibration_cache is not None:
        context.cache = calibration_cache
    if state_dir is not None:
        context.state_dir = Path(state_dir)
    if layers is not None:
        whole = [c.name for c in configs if not c.out_of_core]
        if whole:
            raise UsageError(f"{whole[0]} needs the whole model in memory; it cannot run layer by layer from disk")
    context.layers, context.run_state = layers, run_state
    if any(c.needs_teacher for c in configs):
        context.teacher = copy.deepcopy(model).eval().requires_grad_(False)
    before = count_parameters(model)
    steps: list[dict[str, Any]] = []
    engine: dict[str, Any] | None = None
    registry = registered()
    for config in configs:
        if config.name not in registry:
            raise UsageError(f"transform {config.name!r} is not registered; known: {', '.join(transform_names())}")
    i = 0
    while i < len(configs):
        start = time.perf_counter()
        if configs[i].out_of_core:
            group = [configs[i]]
            while i + len(group) < len(configs) and configs[i + len(group)].out_of_core:
                group.append(configs[i + len(group)])
            details, engine = _run_in_engine(model, group, context)
        else:
            group = [configs[i]]
            details = [registry[configs[i].name][1](model, configs[i], context).details]
        seconds = round(time.perf_counter() - start, 2)
        steps += [{**config.to_dict(), **d, "seconds": seconds} for config, d in zip(group, details, strict=True)]
        i += len(group)
    attach_format(model, [c.to_dict() for c in configs], base_model)
    after = count_parameters(model)
    report = {
        "base_model": base_model,
        "model_params_before": before,
        "model_params_after": after,
        "steps": steps,
    }
    if engine is not None:
        report["engine"] = engine
    return report


def _run_in_engine(
    model: nn.Module, group: list[TransformConfig], context: PatchContext
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One engine run for consecutive ``out_of_core`` configs: each one's details, and the engine's report
    (also under each step's ``layer_by_layer``, beside what the transform put there)."""
    from eigenpatch.engine.passes import run_engine

    missing = [c.name for c in group if c.name not in _LAYER_FACTORIES]
    if missing:
        raise TypeError(f"{missing[0]} is out_of_core but registers no layer transform")
    transforms = [_LAYER_FACTORIES[c.name](model, c, context) for c in group]
    run = run_engine(
        model,
        transforms,
        source=context.layers,
        tokenizer=context.tokenizer,
        calib_text=context.calib_text,
        state=context.run_state,
        show_progress=context.show_progress,
    )
    details = [{**d, "layer_by_layer": {**run.report, **d.get("layer_by_layer", {})}} for d in run.details]
    return details, run.report
