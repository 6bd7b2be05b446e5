"""eigenpatch: spectral surgery for Hugging Face models.

``import eigenpatch`` registers the ``eigenpatch`` quantization method with transformers, so
``AutoModelForCausalLM.from_pretrained(patched_dir)`` rebuilds factorized layers by itself.

    import eigenpatch
    model = ...  # any causal LM
    config = eigenpatch.LowRank(ratio=0.5, allocator="loss", factorizer="fwhiten")
    report = eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=text)
    eigenpatch.save(model, "out/", tokenizer=tokenizer)
    model = eigenpatch.load("out/")
"""

from eigenpatch import recipe
from eigenpatch.checkpoint import EigenpatchConfig, load, register_with_transformers, save
from eigenpatch.modules import LowRankLinear
from eigenpatch.patchers import SVD, EigenShield, Heal, LowRank, Steer, StructuredFFN
from eigenpatch.recipe import TransformConfig, patch, register_transform
from eigenpatch.structured import set_premerge

register_with_transformers()

__version__ = "0.1.0"
__all__ = [
    "SVD",
    "EigenShield",
    "EigenpatchConfig",
    "Heal",
    "LowRank",
    "LowRankLinear",
    "Steer",
    "StructuredFFN",
    "TransformConfig",
    "load",
    "patch",
    "recipe",
    "register_transform",
    "register_with_transformers",
    "save",
    "set_premerge",
]
