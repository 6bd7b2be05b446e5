"""Which Linears a transform touches, and how a module is swapped in place."""

from __future__ import annotations

from torch import nn

from eigenpatch.errors import UsageError

#: The decoder Linears of every Llama-family model (attention q/k/v/o, MLP gate/up/down).
#: Embeddings and lm_head are left dense by default, as every low-rank paper does.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Never factorized: the output head (tied to the embedding in small models) is not a decoder Linear.
EXCLUDED_LEAVES = frozenset({"lm_head"})


def find_linears(model: nn.Module, targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """Named ``nn.Linear`` modules whose last name component is in ``targets``, in model order.

    A target that matches nothing is an error naming the Linears the model does have, so a typo
    (``gate`` for ``gate_proj``) or another family's naming (``c_attn``) is caught before work starts.
    """
    found: dict[str, nn.Linear] = {}
    leaves: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rpartition(".")[2]
        if leaf in EXCLUDED_LEAVES:
            continue
        leaves.add(leaf)
        if leaf in targets:
            found[name] = module
    missing = [t for t in targets if t not in leaves]
    if missing:
        have = ", ".join(sorted(leaves)) or "none"
        raise UsageError(f"target module(s) {', '.join(missing)} not in this model; its Linears are: {have}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.<name> = new`` for a dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
