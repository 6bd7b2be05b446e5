"""Per-request steering in vLLM: named vectors loaded by the server, chosen by each request.

The server is started with named vector files (``eigenpatch serve DIR --steer happy=h.safetensors``,
passed to every vLLM process as ``EIGENPATCH_STEER``, a JSON ``{name: path}``). A request picks
one through the OpenAI API's extra body, ``{"vllm_xargs": {"steer": "happy", "steer_strength":
2}}``, which vLLM copies into ``SamplingParams.extra_args``. Steered and unsteered requests share
a batch.

Three places, each guarding a known silent failure:

- **Admission** (API-server process, :func:`_checked_process_inputs` wraps
  ``InputProcessor.process_inputs``): unknown names, non-numeric or out-of-range strengths raise
  ``VLLMValidationError``, which the server answers with 400 and keeps serving. A steered request
  gets a ``cache_salt`` naming its vector and strength, so the prefix cache never hands KV blocks
  computed under one steering to a request with another (or none): without it an unsteered
  request after a steered one with the same prefix reuses steered blocks.
- **Routing** (worker, :func:`_routed_model_forward` wraps the model runner's ``_model_forward``,
  which is not compiled): from the batch's request order and ``query_start_loc``, each token gets
  a row of the steering table and a strength, copied into persistent buffers. No per-request
  Python runs inside the compiled model, where it would be frozen at trace time.
- **Model** (:class:`RequestSteering` on each steered decoder layer, hooked before vLLM
  compiles): ``hidden += table[rows[:T]] * scales[:T, None]`` always, with row 0 all zeros, so
  the graph never branches; an unsteered token adds exactly zero (identical logits).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

ENV = "EIGENPATCH_STEER"
ENV_MAX_STRENGTH = "EIGENPATCH_STEER_MAX_STRENGTH"
DEFAULT_MAX_STRENGTH = 16.0
KEY_NAME, KEY_STRENGTH = "steer", "steer_strength"


def configured_vectors() -> dict[str, str]:
    """``{name: path}`` from ``EIGENPATCH_STEER`` (empty when unset)."""
    raw = os.environ.get(ENV)
    return dict(json.loads(raw)) if raw else {}


def max_strength() -> float:
    return float(os.environ.get(ENV_MAX_STRENGTH, DEFAULT_MAX_STRENGTH))


def requested_steering(extra_args: Mapping[str, Any] | None, names: Any, limit: float) -> tuple[str, float] | None:
    """``(name, strength)`` a request asks for, None for no steering; ``ValueError`` naming the fix."""
    if not extra_args or extra_args.get(KEY_NAME) in (None, ""):
        if extra_args and KEY_STRENGTH in extra_args:
            raise ValueError(f"'{KEY_STRENGTH}' needs '{KEY_NAME}' (a vector name) in vllm_xargs")
        return None
    name = extra_args[KEY_NAME]
    if not isinstance(name, str) or name not in names:
        known = ", ".join(sorted(names)) or "none (start the server with --steer NAME=FILE)"
        raise ValueError(f"unknown steering vector {name!r}; this server has: {known}")
    strength = extra_args.get(KEY_STRENGTH, 1.0)
    if isinstance(strength, bool) or not isinstance(strength, int | float | str):
        raise ValueError(f"'{KEY_STRENGTH}' must be a number, got {strength!r}")
    try:
        strength = float(strength)
    except ValueError:
        raise ValueError(f"'{KEY_STRENGTH}' must be a number, got {strength!r}") from None
    if not math.isfinite(strength) or abs(strength) > limit:
        raise ValueError(f"'{KEY_STRENGTH}' must be within [-{limit:g}, {limit:g}], got {strength:g}")
    return (name, strength) if strength != 0 else None


class SteeringRouter:
    """The per-token row indices and strengths every :class:`RequestSteering` reads."""

    def __init__(self, names: list[str], capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.index = {name: i + 1 for i, name in enumerate(names)}  # row 0: no steering
        self.rows = torch.zeros(capacity, dtype=torch.long, device=device)
        self.scales = torch.zeros(capacity, dtype=dtype, device=device)
        self.dirty = False

    def route(self, spans: list[tuple[int, int, str, float]]) -> None:
        """Set ``rows`` / ``scales`` for the token ranges ``[start, end)`` of steered requests; zero elsewhere."""
        if not spans and not self.dirty:
            return
        rows = torch.zeros_like(self.rows, device="cpu")
        scales = torch.zeros_like(self.scales, device="cpu")
        for start, end, name, strength in spans:
            rows[start:end] = self.index[name]
            scales[start:end] = strength
        self.rows.copy_(rows)
        self.scales.copy_(scales)
        self.dirty = bool(spans)


class RequestSteering(nn.Module):
    """One decoder layer's steering table ``[1 + n_vectors, d]`` (row 0 zeros) and its hook."""

    def __init__(self, table: torch.Tensor, router: SteeringRouter) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("rows", router.rows, persistent=False)
        self.register_buffer("scales", router.scales, persistent=False)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden, residual = output
        n = hidden.shape[0]
        shift = self.table[self.rows[:n]] * self.scales[:n, None]
        return hidden + shift, residual  # the residual stream is hidden + residual: shift either part


_ROUTER: SteeringRouter | None = None


def attach_request_steering(model: nn.Module, vllm_config: Any) -> int:
    """Build the tables of the configured vectors on this process's decoder layers; returns how many layers."""
    global _ROUTER
    vectors = configured_vectors()
    if not vectors:
        return 0
    from eigenpatch.format.steering import SteeringVectors

    loaded = {name: SteeringVectors.load(path) for name, path in vectors.items()}
    names = sorted(loaded)
    layers = model.get_submodule("model.layers")  # vLLM's decoder stack, named as in the checkpoint
    ref = next(p for p in model.parameters())
    capacity = max(vllm_config.scheduler_config.max_num_batched_tokens, 1)
    router = SteeringRouter(names, capacity, ref.dtype, ref.device)
    wanted = sorted({i for v in loaded.values() for i in v.layers})
    done = 0
    for index in wanted:
        layer = layers[index]
        if next(layer.parameters(), None) is None:  # on another pipeline stage
            continue
        table = torch.zeros(len(names) + 1, loaded[names[0]].dim, dtype=ref.dtype, device=ref.device)
        for row, name in enumerate(names, start=1):
            if index in loaded[name].vectors:
                table[row] = loaded[name].vectors[index].to(table)
        module = RequestSteering(table, router)
        layer.steer_request = module
        layer.register_forward_hook(module.post_hook, with_kwargs=True)
        done += 1
    _ROUTER = router
    return done


def _spans(runner: Any) -> list[tuple[int, int, str, float]]:
    """Token ranges of the steered requests in the runner's current batch."""
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0:
        return []
    bounds = runner.query_start_loc.cpu[: n + 1].tolist()
    spans = []
    for i, req_id in enumerate(batch.req_ids[:n]):
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        # admission already checked the strength; here only name -> row (no env read per step)
        chosen = requested_steering(getattr(params, "extra_args", None), _ROUTER.index, math.inf)
        if chosen is not None:
            spans.append((bounds[i], bounds[i + 1], *chosen))
    return spans


def install_worker() -> None:
    """Wrap the V1 model runner's ``_model_forward`` (idempotent): route tokens before each forward."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_eigenpatch", False):
        return

    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _ROUTER is not None:
            _ROUTER.route(_spans(self))
        return original(self, *args, **kwargs)

    _model_forward._eigenpatch = True  # type: ignore[attr-defined]
    GPUModelRunner._model_forward = _model_forward  # type: ignore[method-assign]


def install_frontend() -> None:
    """Wrap ``InputProcessor.process_inputs`` (idempotent): validate steering, salt the prefix cache."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_eigenpatch", False):
        return

    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        chosen = None
        if isinstance(params, SamplingParams):
            try:
                chosen = requested_steering(params.extra_args, configured_vectors(), max_strength())
            except ValueError as exc:
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if chosen is not None:
            salt = f"eigenpatch-steer:{chosen[0]}:{chosen[1]!r}"
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return request

    process_inputs._eigenpatch = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]
