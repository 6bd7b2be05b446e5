"""Weight-only quantization: ``patch-model --bits 8|4|2 [--group G] [--quantizer gptq|rtn]``."""

from eigenpatch.patchers.quantize import cli, transform
from eigenpatch.patchers.quantize.config import Quantize

__all__ = ["Quantize", "cli", "transform"]
