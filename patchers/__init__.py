"""Transforms that rewrite a model: one module per transform, registered on import.

Imported as ``eigenpatch.patchers`` (setuptools maps this folder there); never import it as a
bare ``patchers``, which would create a second copy of every class.
"""

from eigenpatch.patchers.compress import LowRank, parse_method
from eigenpatch.patchers.eigenshield import EigenShield
from eigenpatch.patchers.heal import Heal
from eigenpatch.patchers.steer import Steer
from eigenpatch.patchers.structured_ffn import StructuredFFN
from eigenpatch.patchers.svd import SVD

__all__ = ["SVD", "EigenShield", "Heal", "LowRank", "Steer", "StructuredFFN", "parse_method"]
