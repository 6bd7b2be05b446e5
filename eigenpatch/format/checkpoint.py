"""The eigenpatch checkpoint format (``docs/FORMAT.md``) and its transformers quantizer.

A patched checkpoint is an ordinary HF folder: ``config.json`` keeps the base architecture and
gains ``quantization_config = {"quant_method": "eigenpatch", ...}``; weights are safetensors in
which a factorized Linear ``X`` is stored as ``X.lowrank_down`` and ``X.lowrank_up``. Loading
goes through transformers' quantizer door: after ``import eigenpatch`` the registered
:class:`EigenpatchHfQuantizer` swaps the named Linears for :class:`LowRankLinear` modules on the
meta device, before any weight is read, so ``from_pretrained`` needs no remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from eigenpatch.atomic import atomic_output_dir
from eigenpatch.errors import UsageError
from eigenpatch.format import (
    FORMAT_VERSION,
    INTERVENTION_KINDS,
    LAYER_KINDS,
    LOWRANK,
    LOWRANK_QUANTIZED,
    QUANT_METHOD,
    QUANTIZED_CORRECTED,
    QUANTIZED_KINDS,
    REPORT_FILE,
)
from eigenpatch.format.corrected import CorrectedQuantizedLinear
from eigenpatch.format.interventions import Intervention, build_interventions, intervention_specs
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.format.quantized import QuantizedLinear, QuantizedLowRankLinear
from eigenpatch.format.structured import StructuredLinear, module_from_spec, premerge_enabled_by_env, set_premerge
from eigenpatch.format.verify import (
    REBUILD,
    CheckpointError,
    check_finite_in_files,
    check_finite_in_model,
    check_present,
    format_tensor_names,
    stored_shapes,
    weight_files,
)

#: Modules whose tensors the format adds (and :mod:`eigenpatch.format.verify` checks).
#: Modules whose tensors the format stores (a stored module's parts are checked as its own).
QUANTIZED_MODULES = (QuantizedLinear, QuantizedLowRankLinear, CorrectedQuantizedLinear)
FORMAT_MODULES = (LowRankLinear, StructuredLinear, *QUANTIZED_MODULES, Intervention)


class EigenpatchConfig(QuantizationConfigMixin):
    """``config.json["quantization_config"]``: everything needed to rebuild module shapes.

    ``layers`` maps a module name (HF naming) to ``{"kind": "lowrank", "rank", "in_features",
    "out_features", "bias"}``; ``recipe`` is the list of transform configs that made the
    checkpoint (for provenance and re-running); ``base_model`` names the unpatched source;
    ``interventions`` maps a module attached to a decoder layer (``model.layers.5.project_out``)
    to the spec of a hidden-state intervention (:mod:`eigenpatch.format.interventions`).
    """

    def __init__(
        self,
        layers: dict[str, dict[str, Any]] | None = None,
        recipe: list[dict[str, Any]] | None = None,
        base_model: str | None = None,
        version: int = FORMAT_VERSION,
        interventions: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.version = version
        self.layers = dict(layers or {})
        self.interventions = dict(interventions or {})
        self.recipe = list(recipe or [])
        self.base_model = base_model
        if version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint uses eigenpatch format v{version}, this eigenpatch reads up to v{FORMAT_VERSION}; "
                "upgrade eigenpatch"
            )
        for name, spec in self.layers.items():
            if spec.get("kind") not in LAYER_KINDS:
                raise ValueError(f"layer {name!r} has unknown kind {spec.get('kind')!r}; known: {LAYER_KINDS}")
        for name, spec in self.interventions.items():
            if spec.get("kind") not in INTERVENTION_KINDS:
                raise ValueError(
                    f"intervention {name!r} has unknown kind {spec.get('kind')!r}; known: {INTERVENTION_KINDS}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "version": self.version,
            "base_model": self.base_model,
            "recipe": self.recipe,
            "layers": self.layers,
            "interventions": self.interventions,
        }


def layer_spec(module: nn.Module) -> dict[str, Any] | None:
    """The ``layers`` entry that rebuilds ``module``'s shapes (None: not a module the format stores)."""
    if isinstance(module, (StructuredLinear, *QUANTIZED_MODULES)):
        return module.spec()
    if not isinstance(module, LowRankLinear):
        return None
    return {
        "kind": LOWRANK,
        "rank": module.rank,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }


def written_version(layers: dict[str, dict[str, Any]]) -> int:
    """The oldest format version that describes ``layers``: 2 where a correction pair is stored at
    8 bits (a v1 reader would take its int8 codes for fp16 factors), else 1, which every reader
    since v1 loads."""
    return 2 if any(spec.get("factor_bits", 16) != 16 for spec in layers.values()) else 1


def format_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: spec}`` for each module the format stores; the parts of a stored module (the
    factors of a quantized pair) are its own, not layers of their own."""
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in layers):
            continue
        spec = layer_spec(module)
        if spec is not None:
            layers[name] = spec
    return layers


def build_patched_modules(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace each module named in ``layers`` by an empty module of the stored shape.

    Parameters are created on the device and dtype of the Linear they replace (``meta`` while
    transformers builds the skeleton), so this is also how a checkpoint's shapes are restored.
    """
    # Owners of shared factors first: their partners look them up when they are built.
    for name, spec in sorted(layers.items(), key=lambda item: item[1].get("down_from") is not None):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(
                f"quantization_config.layers names {name!r}, which is not a Linear of this "
                f"{type(model).__name__}; config.json does not match the model: {REBUILD}"
            )
        if (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(
                f"{name}: checkpoint says {spec['in_features']}->{spec['out_features']}, "
                f"model has {old.in_features}->{old.out_features}"
            )
        kw = {"device": old.weight.device, "dtype": old.weight.dtype}
        if spec["kind"] == LOWRANK:
            new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], **kw)
        elif spec["kind"] in QUANTIZED_KINDS:
            new = quantized_from_spec(name, spec, kw)
        else:
            new = module_from_spec(spec, model, kw)
        setattr(parent, child, new)


def quantized_from_spec(name: str, spec: dict[str, Any], kw: dict[str, Any]) -> nn.Module:
    """An empty quantized Linear or quantized factor pair of the stored shape; a width, group or rank
    it cannot hold is refused with one line."""
    try:
        shape = (spec["in_features"], spec["out_features"])
        if spec["kind"] == LOWRANK_QUANTIZED:
            return QuantizedLowRankLinear(*shape, spec["rank"], spec["bits"], spec["group"], spec["bias"], **kw)
        if spec["kind"] == QUANTIZED_CORRECTED:
            factor_bits = spec.get("factor_bits", 16)  # v1 checkpoints: fp16 factors
            args = (*shape, spec["rank"], spec["bits"], spec["group"], spec["bias"])
            return CorrectedQuantizedLinear(*args, factor_bits=factor_bits, **kw)
        return QuantizedLinear(*shape, spec["bits"], spec["group"], spec["bias"], **kw)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"quantization_config.layers[{name!r}] is not a valid quantized Linear ({exc}); {REBUILD}"
        ) from None


class EigenpatchHfQuantizer(HfQuantizer):
    """Rebuilds factor-pair modules before transformers loads the weights into them."""

    requires_calibration = False
    quantization_config: EigenpatchConfig

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        build_patched_modules(model, self.quantization_config.layers)
        build_interventions(model, self.quantization_config.interventions)
        files = [Path(f) for f in checkpoint_files or () if str(f).endswith(".safetensors")]
        self._source = files[0].parent if files else "the checkpoint"
        self._format_names = format_tensor_names(model, FORMAT_MODULES)
        if files:  # before any weight is read: a missing factor would be filled with fresh values
            check_present(model, stored_shapes(files), self._source, self._format_names)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        names = getattr(self, "_format_names", None) or format_tensor_names(model, FORMAT_MODULES)
        check_finite_in_model(model, names, getattr(self, "_source", "the model"))
        for module in model.modules():
            if isinstance(module, QuantizedLinear):  # the loader makes every float tensor trainable
                module.scales.requires_grad_(False)
        if premerge_enabled_by_env():
            set_premerge(model)  # merged dense copies of structured layers, for few-token calls

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return False  # weights are stored already factorized; nothing to convert at load time

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # factor pairs are plain parameters (WeLore-style healing trains them)


def register_with_transformers() -> None:
    """Register the config and quantizer under ``eigenpatch`` once (transformers raises on repeats)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EigenpatchConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(EigenpatchHfQuantizer)


def attach_format(model: PreTrainedModel, recipe: list[dict[str, Any]], base_model: str | None) -> EigenpatchConfig:
    """Describe ``model``'s patched modules in its config, so ``save_pretrained`` writes the format.

    The model also gets the same ``hf_quantizer`` it would have after ``from_pretrained``, so an
    in-memory patched model and a reloaded one behave alike (saving, ``is_quantized``).
    """
    layers = format_layers(model)
    previous = getattr(model.config, "quantization_config", None)
    if previous is not None:
        prev = previous if isinstance(previous, dict) else previous.to_dict()
        if prev.get("quant_method") != QUANT_METHOD:
            raise UsageError(
                f"model is already quantized with {prev.get('quant_method')!r}; patch the unquantized model instead"
            )
        recipe = list(prev.get("recipe", [])) + list(recipe)
        base_model = prev.get("base_model") or base_model
    qconfig = EigenpatchConfig(
        layers=layers,
        recipe=recipe,
        base_model=base_model,
        version=written_version(layers),
        interventions=intervention_specs(model),
    )
    model.config.quantization_config = qconfig
    model.hf_quantizer = EigenpatchHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return qconfig


def weights_bytes(path: str | os.PathLike) -> int:
    """Bytes of the safetensors weight files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def save(
    model: PreTrainedModel,
    output: str | os.PathLike,
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` (and tokenizer, report) to ``output`` atomically.

    Everything goes to a temporary folder beside ``output`` and is renamed into place at the
    end, so an interrupted or failed save leaves no half-written checkpoint. An existing
    ``output`` is replaced only with ``force``.
    """
    with atomic_output_dir(output, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report = dict(report, weights_bytes=weights_bytes(tmp))
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return Path(output).resolve()


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the quantizer registered: one call, no remote code.

    Stricter than ``from_pretrained``: a tensor missing from the weights is an error
    (:class:`~eigenpatch.format.verify.CheckpointError`), never a freshly initialized one."""
    register_with_transformers()
    kwargs.setdefault("trust_remote_code", False)
    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]}{more} is missing from the weights; {REBUILD}")
    return model


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check a checkpoint folder without loading it, for runtimes that do not go through
    transformers (vLLM, ``eigenpatch serve`` before it starts one): its format tensors are all
    stored, with the shapes ``quantization_config`` implies, and finite. A folder that is not an
    eigenpatch checkpoint passes (its runtime checks it). Raises
    :class:`~eigenpatch.format.verify.CheckpointError`."""
    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    spec = raw.get("quantization_config")
    if not isinstance(spec, dict) or spec.get("quant_method") != QUANT_METHOD:
        return
    qconfig = EigenpatchConfig(**{k: v for k, v in spec.items() if k != "quant_method"})
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    build_patched_modules(model, qconfig.layers)
    build_interventions(model, qconfig.interventions)
    names = format_tensor_names(model, FORMAT_MODULES)
    stored = stored_shapes(weight_files(folder))
    check_present(model, stored, folder, names)
    check_finite_in_files(names, stored)
