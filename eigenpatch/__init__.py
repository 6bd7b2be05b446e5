"""eigenpatch: spectral surgery for Hugging Face models.

``import eigenpatch`` registers the ``eigenpatch`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(patched_dir)`` rebuilds factorized layers by itself.

    import eigenpatch
    model = ...  # any causal LM
    config = eigenpatch.LowRank(ratio=0.5, allocator="loss", factorizer="fwhiten")
    report = eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=text)
    eigenpatch.save(model, "out/", tokenizer=tokenizer)
    model = eigenpatch.load("out/")

The transform configs (``LowRank``, ``SVD``, ``Heal``, ``StructuredFFN``, ``EigenShield``,
``Steer``, ``Snap``) are re-exported from ``eigenpatch.patchers`` on first access: the transforms import
the core, so the core does not import them while it is being imported.
"""

from typing import Any

from eigenpatch import recipe
from eigenpatch.format.checkpoint import EigenpatchConfig, load, register_with_transformers, save
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.format.structured import set_premerge
from eigenpatch.recipe import TransformConfig, config_from_dict, patch, recipe_of, register_transform

register_with_transformers()

_CONFIGS = ("SVD", "EigenShield", "Heal", "LowRank", "Snap", "Steer", "StructuredFFN")


def __getattr__(name: str) -> Any:
    if name in _CONFIGS:
        import eigenpatch.patchers

        return getattr(eigenpatch.patchers, name)
    raise AttributeError(f"module 'eigenpatch' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "SVD",
    "EigenShield",
    "EigenpatchConfig",
    "Heal",
    "LowRank",
    "LowRankLinear",
    "Snap",
    "Steer",
    "StructuredFFN",
    "TransformConfig",
    "config_from_dict",
    "load",
    "patch",
    "recipe",
    "recipe_of",
    "register_transform",
    "register_with_transformers",
    "save",
    "set_premerge",
]
