"""Hidden-state interventions the checkpoint format stores: modules that act on the residual stream.

Some transforms cannot be folded into a weight: a projection of the residual stream between two
decoder layers (EigenShield) acts on the *sum* every later layer reads, not on any one Linear's
output. Such a transform is a small module attached to a decoder layer, applied by a hook:

- ``hook = "pre"``: on the hidden states *entering* the layer (``project_in``; on layer 0 this is
  the input embeddings, whether they came from ``embed_tokens`` or from ``inputs_embeds``, which
  is exactly what an embedding-space attacker controls);
- ``hook = "post"``: on the hidden states the layer returns (``project_out``).

The module is an attribute of the decoder layer, so its tensors are saved under the layer's name
(``model.layers.5.project_out.basis_in``) and ``config.json["quantization_config"]["interventions"]``
lists what to rebuild before weights load (``docs/FORMAT.md``). Hooks are bound methods of the
module, so ``copy.deepcopy`` of a model carries them to the copy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Attribute names on a decoder layer, by hook point.
ATTRIBUTE = {"pre": "project_in", "post": "project_out"}
PROJECT_MODES = ("keep", "drop")


class HiddenProjection(nn.Module):
    """A rank-``k`` affine projection of hidden states around a centre ``mu``.

    With ``c = h - mu`` and ``P c = basis_out (basis_in c)`` (``basis_in [k, d]``, ``basis_out
    [d, k]``; oblique when the subspace was found in standardized coordinates):

    - ``mode = "keep"``: ``h' = mu + P c``: only the kept subspace survives (everything else is
      replaced by its calibration mean);
    - ``mode = "drop"``: ``h' = h - P c``: the subspace is removed, the rest passes untouched.

    Two thin GEMMs per token, ``2 k d`` multiply-adds. Positions before ``start`` pass unchanged
    (e.g. to leave an attention-sink token alone); the default 0 applies it to every token.
    """

    kind = "project"

    def __init__(
        self,
        dim: int,
        rank: int,
        mode: str = "drop",
        hook: str = "post",
        start: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in PROJECT_MODES:
            raise ValueError(f"projection mode {mode!r} is not one of {PROJECT_MODES}")
        if hook not in ATTRIBUTE:
            raise ValueError(f"hook {hook!r} is not one of {tuple(ATTRIBUTE)}")
        if not 0 <= rank <= dim:
            raise ValueError(f"projection rank {rank} is outside [0, {dim}]")
        kw = {"device": device, "dtype": dtype}
        self.dim, self.rank, self.mode, self.hook, self.start = dim, rank, mode, hook, start
        self.center = nn.Parameter(torch.zeros(dim, **kw), requires_grad=False)
        self.basis_in = nn.Parameter(torch.zeros(rank, dim, **kw), requires_grad=False)
        self.basis_out = nn.Parameter(torch.zeros(dim, rank, **kw), requires_grad=False)

    @classmethod
    def from_bases(
        cls, center: torch.Tensor, basis_in: torch.Tensor, basis_out: torch.Tensor, **kwargs: Any
    ) -> HiddenProjection:
        rank, dim = basis_in.shape
        module = cls(dim, rank, device=center.device, dtype=center.dtype, **kwargs)
        with torch.no_grad():
            module.center.copy_(center)
            module.basis_in.copy_(basis_in)
            module.basis_out.copy_(basis_out)
        return module

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        centred = h - self.center
        moved = F.linear(F.linear(centred, self.basis_in), self.basis_out)
        out = self.center + moved if self.mode == "keep" else h - moved
        if self.start > 0 and positions is not None:
            keep_original = (positions < self.start).reshape(*positions.shape, 1)
            out = torch.where(keep_original, h, out)
        return out

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "hook": self.hook,
            "mode": self.mode,
            "dim": self.dim,
            "rank": self.rank,
            "start": self.start,
        }

    # -- hooks (bound methods, so deepcopy rebinds them to the copy) --------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positions = kwargs.get("position_ids")
        if args:
            return (self(args[0], positions), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=self(kwargs["hidden_states"], positions))
        return args, kwargs

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        positions = kwargs.get("position_ids")
        if isinstance(output, tuple):
            return (self(output[0], positions), *output[1:])
        return self(output, positions)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, mode={self.mode}, hook={self.hook}, start={self.start}"


INTERVENTION_KINDS = {HiddenProjection.kind: HiddenProjection}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack of a causal LM (``model.model.layers`` for Llama, Qwen, Mistral, ...)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder stack at base_model.layers")
    return layers


def attach(layer: nn.Module, module: HiddenProjection) -> None:
    """Install ``module`` on a decoder layer (replacing one already at that hook point)."""
    name = ATTRIBUTE[module.hook]
    detach(layer, module.hook)
    setattr(layer, name, module)
    if module.hook == "pre":
        module._handle = layer.register_forward_pre_hook(module.pre_hook, with_kwargs=True)
    else:
        module._handle = layer.register_forward_hook(module.post_hook, with_kwargs=True)


def detach(layer: nn.Module, hook: str) -> HiddenProjection | None:
    """Remove the intervention at ``hook`` from ``layer`` (and its hook); returns it, or None."""
    name = ATTRIBUTE[hook]
    old = layer._modules.get(name)
    if old is None:
        return None
    handle = getattr(old, "_handle", None)
    if handle is not None:
        handle.remove()
    hooks = layer._forward_pre_hooks if hook == "pre" else layer._forward_hooks
    for key, fn in list(hooks.items()):  # a deep-copied model holds copies of the handles' hooks
        if getattr(fn, "__self__", None) is old:
            del hooks[key]
    delattr(layer, name)
    return old


def intervention_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: spec}`` of every intervention in ``model`` (what the format stores)."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, HiddenProjection)}


def build_interventions(
    model: nn.Module, specs: dict[str, dict[str, Any]], projection_cls: type[HiddenProjection] = HiddenProjection
) -> int:
    """Attach empty interventions of the stored shapes (before weights load), on each layer's device
    and dtype; returns how many. ``projection_cls`` adapts the hooks to a runtime's calling
    convention (vLLM's). A layer without parameters (vLLM's stand-in for a layer on another
    pipeline stage) is skipped."""
    done = 0
    for name, spec in specs.items():
        layer_name, _, attribute = name.rpartition(".")
        if spec.get("kind") not in INTERVENTION_KINDS:
            raise ValueError(f"intervention {name!r} has unknown kind {spec.get('kind')!r}")
        if ATTRIBUTE.get(spec.get("hook")) != attribute:
            raise ValueError(f"intervention {name!r}: attribute does not match hook {spec.get('hook')!r}")
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            raise ValueError(f"intervention {name!r} names no module of this model") from None
        ref = next(layer.parameters(), None)
        if ref is None:
            continue
        options = {k: spec[k] for k in ("mode", "hook", "start")}
        attach(layer, projection_cls(spec["dim"], spec["rank"], device=ref.device, dtype=ref.dtype, **options))
        done += 1
    return done
