"""Hidden-state interventions the checkpoint format stores: modules that act on the residual stream.

Some transforms cannot be folded into a weight: a projection of the residual stream between two
decoder layers (EigenShield) acts on the *sum* every later layer reads, not on any one Linear's
output, and a steering shift (``steer``) adds to that sum. Such a transform is a small module
attached to a decoder layer, applied by a hook:

- ``hook = "pre"``: on the hidden states *entering* the layer (``project_in`` / ``steer_in``; on
  layer 0 this is the input embeddings, whether they came from ``embed_tokens`` or from
  ``inputs_embeds``, which is exactly what an embedding-space attacker controls);
- ``hook = "post"``: on the hidden states the layer returns (``project_out`` / ``steer_out``).

One kind stores no tensor: ``snap`` (``model.layers.0.snap_in``) replaces each input embedding by
the nearest row of the model's own embedding table, which it finds when bound to the model.

The module is an attribute of the decoder layer, so its tensors are saved under the layer's name
(``model.layers.5.project_out.basis_in``, ``model.layers.12.steer_out.vector``) and
``config.json["quantization_config"]["interventions"]`` lists what to rebuild before weights load
(``docs/FORMAT.md``). Hooks are bound methods of the module, so ``copy.deepcopy`` of a model
carries them to the copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from eigenpatch.format import HOOKS, PROJECT, SHIFT, SNAP, TOKEN_IDENTITY_KINDS
from eigenpatch.format.quantized import reference_parameter
from eigenpatch.format.snap import snap_rows

PROJECT_MODES = ("keep", "drop")


class Intervention(nn.Module):
    """Base of the residual-stream modules: a hook point, a start position, and the hooks.

    Subclasses define ``kind`` (the name the format stores), ``prefix`` (the attribute on the
    decoder layer is ``{prefix}_in`` for ``hook = "pre"``, ``{prefix}_out`` for ``"post"``, so
    different kinds can sit on the same layer), ``forward(h, positions)`` and :meth:`from_spec`.
    """

    kind: str = ""
    prefix: str = ""
    #: Run before the other hooks at its hook point (whatever order the recipe attached them in).
    first: ClassVar[bool] = False

    def __init__(self, dim: int, hook: str = "post", start: int = 0) -> None:
        super().__init__()
        if hook not in HOOKS:
            raise ValueError(f"hook {hook!r} is not one of {HOOKS}")
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        self.dim, self.hook, self.start = dim, hook, start

    @property
    def attribute(self) -> str:
        return attribute_name(self.prefix, self.hook)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> Intervention:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "hook": self.hook, "dim": self.dim, "start": self.start}

    def bind(self, model: nn.Module) -> None:
        """Called once attached, with the whole model (before its weights load): a kind that reads
        another part of the model finds it here. The others need nothing."""

    def _late(self, h: torch.Tensor, out: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """``out`` where ``position >= start``, ``h`` before (no-op for the default start 0)."""
        if self.start > 0 and positions is not None:
            keep_original = (positions < self.start).reshape(*positions.shape, 1)
            out = torch.where(keep_original, h, out)
        return out

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


class HiddenProjection(Intervention):
    """A rank-``k`` affine projection of hidden states around a centre ``mu``.

    With ``c = h - mu`` and ``P c = basis_out (basis_in c)`` (``basis_in [k, d]``, ``basis_out
    [d, k]``; oblique when the subspace was found in standardized coordinates):

    - ``mode = "keep"``: ``h' = mu + P c``: only the kept subspace survives (everything else is
      replaced by its calibration mean);
    - ``mode = "drop"``: ``h' = h - P c``: the subspace is removed, the rest passes untouched.

    Two thin GEMMs per token, ``2 k d`` multiply-adds. Positions before ``start`` pass unchanged
    (e.g. to leave an attention-sink token alone); the default 0 applies it to every token.
    """

    kind = PROJECT
    prefix = "project"

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
        super().__init__(dim, hook, start)
        if mode not in PROJECT_MODES:
            raise ValueError(f"projection mode {mode!r} is not one of {PROJECT_MODES}")
        if not 0 <= rank <= dim:
            raise ValueError(f"projection rank {rank} is outside [0, {dim}]")
        kw = {"device": device, "dtype": dtype}
        self.rank, self.mode = rank, mode
        self.center = nn.Parameter(torch.zeros(dim, **kw), requires_grad=False)
        self.basis_in = nn.Parameter(torch.zeros(rank, dim, **kw), requires_grad=False)
        self.basis_out = nn.Parameter(torch.zeros(dim, rank, **kw), requires_grad=False)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> HiddenProjection:
        return cls(spec["dim"], spec["rank"], mode=spec["mode"], hook=spec["hook"], start=spec["start"], **kw)

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
        return self._late(h, out, positions)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "mode": self.mode, "rank": self.rank}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, mode={self.mode}, hook={self.hook}, start={self.start}"


class HiddenShift(Intervention):
    """``h' = h + vector``: a fixed steering shift of the residual stream (positions ``>= start``).

    The vector is stored already multiplied by the steering strength, so the checkpoint is exactly
    what runs. One add per token.
    """

    kind = SHIFT
    prefix = "steer"

    def __init__(
        self,
        dim: int,
        hook: str = "post",
        start: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, hook, start)
        self.vector = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype), requires_grad=False)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> HiddenShift:
        return cls(spec["dim"], hook=spec["hook"], start=spec["start"], **kw)

    @classmethod
    def from_vector(cls, vector: torch.Tensor, **kwargs: Any) -> HiddenShift:
        module = cls(vector.numel(), device=vector.device, dtype=vector.dtype, **kwargs)
        with torch.no_grad():
            module.vector.copy_(vector)
        return module

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self._late(h, h + self.vector, positions)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hook={self.hook}, start={self.start}"


class TokenSnap(Intervention):
    """Each input embedding replaced by the nearest row of the model's embedding table (``scale`` x
    the rows, for models that scale their embeddings): any vector a caller sends becomes a token.

    On layer 0's input only (``hook = "pre"``). Parameter-free: :meth:`bind` finds the model's input
    embedding and the search reads its table at every call (no copy to go stale). Token-id inputs
    are rows already, so they pass unchanged; an ONNX graph, whose input is token ids, omits it.
    Cost: one ``[tokens, vocab]`` GEMM per forward, about the ``lm_head``'s
    (:mod:`eigenpatch.format.snap`).
    """

    kind = SNAP
    prefix = "snap"
    first = True

    def __init__(
        self,
        dim: int,
        vocab: int,
        scale: float = 1.0,
        hook: str = "pre",
        start: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, hook, start)
        if hook != "pre":
            raise ValueError("snap acts on the input embeddings: hook must be 'pre' (on layer 0)")
        if vocab < 1 or not scale > 0:
            raise ValueError(f"snap needs vocab >= 1 and scale > 0, got {vocab} and {scale}")
        self.vocab, self.scale = vocab, float(scale)
        self.active = True
        self._embedding: list[nn.Module] = []  # a plain list: the table is the model's, not a submodule

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> TokenSnap:
        return cls(spec["dim"], spec["vocab"], scale=spec["scale"], hook=spec["hook"], start=spec["start"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "vocab": self.vocab, "scale": self.scale}

    def bind(self, model: nn.Module) -> None:
        embedding = input_embedding(model)
        rows, dim = embedding.weight.shape
        if dim != self.dim or rows < self.vocab:
            raise ValueError(
                f"snap expects a [{self.vocab}, {self.dim}] embedding table, the model has [{rows}, {dim}]"
            )
        self._embedding[:] = [embedding]

    def table(self) -> torch.Tensor:
        """The first ``vocab`` rows of the bound table (a runtime may pad it)."""
        if not self._embedding:
            raise RuntimeError("snap is not bound to a model: call bind(model) after attaching it")
        return self._embedding[0].weight[: self.vocab]

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if not self.active:
            return h
        out = snap_rows(h.reshape(-1, self.dim), self.table(), self.scale).reshape(h.shape)
        return self._late(h, out, positions)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, vocab={self.vocab}, scale={self.scale:g}, start={self.start}"


def input_embedding(model: nn.Module) -> nn.Module:
    """The token-embedding module of a causal LM (transformers' ``get_input_embeddings``, or the
    ``embed_tokens`` of runtimes without it, such as vLLM)."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (TypeError, NotImplementedError):
            found = None
        if isinstance(found, nn.Module) and isinstance(getattr(found, "weight", None), torch.Tensor):
            return found
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "embed_tokens" and isinstance(getattr(module, "weight", None), torch.Tensor):
            return module
    raise ValueError(f"{type(model).__name__} has no token embedding to snap to")


#: The module class of each intervention kind.
INTERVENTION_CLASSES: dict[str, type[Intervention]] = {c.kind: c for c in (HiddenProjection, HiddenShift, TokenSnap)}


def attribute_name(prefix: str, hook: str) -> str:
    """The decoder-layer attribute of an intervention: ``project_out``, ``steer_in``, ..."""
    return f"{prefix}_{'in' if hook == 'pre' else 'out'}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack of a causal LM (``model.model.layers`` for Llama, Qwen, Mistral, ...)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder stack at base_model.layers")
    return layers


def attach(layer: nn.Module, module: Intervention) -> None:
    """Install ``module`` on a decoder layer (replacing one of its kind already at that hook point)."""
    detach(layer, module.hook, module.kind)
    setattr(layer, module.attribute, module)
    if module.hook == "pre":
        module._handle = layer.register_forward_pre_hook(module.pre_hook, with_kwargs=True, prepend=module.first)
    else:
        module._handle = layer.register_forward_hook(module.post_hook, with_kwargs=True, prepend=module.first)


def detach(layer: nn.Module, hook: str, kind: str = HiddenProjection.kind) -> Intervention | None:
    """Remove the ``kind`` intervention at ``hook`` from ``layer`` (and its hook); returns it, or None."""
    name = attribute_name(INTERVENTION_CLASSES[kind].prefix, hook)
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
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, Intervention)}


def build_interventions(
    model: nn.Module,
    specs: dict[str, dict[str, Any]],
    classes: dict[str, type[Intervention]] | None = None,
) -> int:
    """Attach empty interventions of the stored shapes (before weights load), on each layer's device
    and dtype; returns how many. ``classes`` (by kind) adapts the hooks to a runtime's calling
    convention (vLLM's). A layer without parameters (vLLM's stand-in for a layer on another
    pipeline stage) is skipped."""
    classes = {**INTERVENTION_CLASSES, **(classes or {})}
    done = 0
    for name, spec in specs.items():
        layer_name, _, attribute = name.rpartition(".")
        kind = spec.get("kind")
        if kind not in INTERVENTION_CLASSES:
            raise ValueError(f"intervention {name!r} has unknown kind {kind!r}")
        if spec.get("hook") not in HOOKS or attribute_name(classes[kind].prefix, spec["hook"]) != attribute:
            raise ValueError(f"intervention {name!r}: attribute does not match hook {spec.get('hook')!r}")
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            raise ValueError(f"intervention {name!r} names no module of this model") from None
        ref = reference_parameter(layer)
        if ref is None:
            continue
        module = classes[kind].from_spec(spec, device=ref.device, dtype=ref.dtype)
        attach(layer, module)
        module.bind(model)
        done += 1
    return done


@contextlib.contextmanager
def token_identities_removed(model: nn.Module) -> Iterator[list[str]]:
    """Detach the interventions that leave token ids unchanged (:data:`TOKEN_IDENTITY_KINDS`) for
    the duration (a graph traced on token ids need not compute them); yields their names."""
    removed = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Intervention) and module.kind in TOKEN_IDENTITY_KINDS:
            layer = model.get_submodule(name.rpartition(".")[0])
            removed.append((name, layer, detach(layer, module.hook, module.kind)))
    try:
        yield [name for name, _, _ in removed]
    finally:
        for _, layer, module in removed:
            attach(layer, module)
