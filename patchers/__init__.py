"""Transforms that rewrite a model: one room (sub-package) per transform, registered on import.

Each room holds its config (``config.py``), its transform (``transform.py``, the registered
handler), its math, and its CLI piece (``cli.py``: flags, summary lines, place in the stage
order). Helpers that two rooms share live beside them under a name that says what they do
(``targets``, ``hidden_states``, ``gavish_donoho``, ``prompts``). Adding a transform is adding a
room and one import line below; the core iterates the registry (``docs/adding-a-transform.md``).

Imported as ``eigenpatch.patchers`` (setuptools maps this folder there); never import it as a
bare ``patchers``, which would create a second copy of every class.
"""

from eigenpatch.patchers import eigenshield, heal, lowrank, quantize, snap, steer, structured_ffn, sts
from eigenpatch.patchers.eigenshield import EigenShield
from eigenpatch.patchers.heal import Heal
from eigenpatch.patchers.lowrank import SVD, LowRank, parse_method
from eigenpatch.patchers.quantize import Quantize
from eigenpatch.patchers.snap import Snap
from eigenpatch.patchers.steer import Steer
from eigenpatch.patchers.structured_ffn import StructuredFFN

__all__ = [
    "SVD",
    "EigenShield",
    "Heal",
    "LowRank",
    "Quantize",
    "Snap",
    "Steer",
    "StructuredFFN",
    "eigenshield",
    "heal",
    "lowrank",
    "parse_method",
    "quantize",
    "snap",
    "steer",
    "structured_ffn",
    "sts",
]
