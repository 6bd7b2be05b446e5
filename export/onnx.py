"""Export a (patched) causal LM to ONNX with a KV cache, and verify it against PyTorch.

The graph is traced with ``torch.onnx.export(dynamo=True)`` from a wrapper whose inputs are
plain tensors: ``input_ids``, ``attention_mask``, ``position_ids`` and one ``key`` / ``value``
per layer for the past; outputs are ``logits`` and the presents. Batch, sequence and past
length are dynamic (past may be empty for the prefill). A factor pair lowers to two MatMuls.
Each RMSNorm (with the residual ``Add`` before it) is then fused into ONNX Runtime's
``SkipSimplifiedLayerNormalization`` (:mod:`eigenpatch.export.fuse`); ``portable=True`` skips
that, leaving standard ONNX ops only, for other ONNX runtimes (and TensorRT always gets those).

Verification is part of export (a mismatch is an error, not a warning): logits must match PyTorch within
``LOGITS_ATOL`` on fixed prompts, and greedy decoding through the KV cache must produce the
same tokens as ``transformers.generate`` for ``GREEDY_STEPS`` steps; otherwise export fails.

The graph takes token ids, never embeddings, so interventions that only act on embeddings passed in
directly (``snap``, :data:`eigenpatch.format.TOKEN_IDENTITY_KINDS`) are identities in it and are
left out; the parity check runs PyTorch with them, so it proves that too.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from eigenpatch.atomic import atomic_output_dir
from eigenpatch.errors import UsageError
from eigenpatch.export.fuse import fuse_norms
from eigenpatch.export.precision import (
    DEFAULT_BLOCK,
    DEFAULT_WEIGHT_WINDOWS,
    PRECISIONS,
    WEIGHT_BITS,
    WEIGHT_SEQ_LEN,
    Reference,
    check_block,
    first_divergence,
    max_logit_diff,
    onnx_bytes,
    quantize_dynamic_int8,
    quantize_weights,
    reduced_parity,
    replace_graph,
)
from eigenpatch.export.runtime import META_FILE, MODEL_FILE, OnnxCausalLM
from eigenpatch.export.stored import dequantized_linears, map_stored, quantized_modules, stored_dtype_tensors
from eigenpatch.export.tensorrt import TensorRTFailed, build_engine, tensorrt_unavailable
from eigenpatch.format.interventions import token_identities_removed
from eigenpatch.format.quantized import reference_parameter
from eigenpatch.format.structured import structured_form

#: fp32 parity bound on logits (issue: <= 1e-3; ~1e-4 is typical for a 135M model).
LOGITS_ATOL = 1e-3
GREEDY_STEPS = 32
PROMPTS = (
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Photosynthesis converts",
)


class ExportFailed(Exception):
    """The exported graph does not reproduce PyTorch: export must not succeed."""


class KVCacheDecoder(nn.Module):
    """Flat-tensor interface around an HF causal LM: what the ONNX graph computes."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.get_text_config().num_hidden_layers

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def trace(
    model: PreTrainedModel, path: Path, past_names: list[str], present_names: list[str], opset: int | None
) -> None:
    """Trace ``KVCacheDecoder(model)`` with dynamic batch/sequence/past and save it with external data."""
    _, kv_heads, head_dim = _shapes(model.config)
    dtype = reference_parameter(model).dtype
    vocab = model.config.get_text_config().vocab_size
    batch, seq, past_len = 2, 5, 3
    gen = torch.Generator().manual_seed(0)
    example = (
        torch.randint(0, vocab, (batch, seq), generator=gen),
        torch.ones(batch, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq)[None].expand(batch, -1),
        *(torch.randn(batch, kv_heads, past_len, head_dim, generator=gen).to(dtype) for _ in past_names),
    )
    dyn = torch.export.Dim.DYNAMIC
    dynamic_shapes = {
        "input_ids": {0: dyn, 1: dyn},
        "attention_mask": {0: dyn, 1: dyn},
        "position_ids": {0: dyn, 1: dyn},
        "past": tuple({0: dyn, 2: dyn} for _ in past_names),
    }
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its per-step chatter is not for users
    # structured layers export their small form; token-identity interventions (snap) are left out:
    # the graph's input is token ids, which they return unchanged
    with torch.no_grad(), structured_form(model), token_identities_removed(model):
        program = torch.onnx.export(
            KVCacheDecoder(model).eval(),
            example,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            opset_version=opset,
            verbose=False,
        )
    program.save(str(path), external_data=True)


def _shapes(config: Any) -> tuple[int, int, int]:
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return text.num_hidden_layers, kv_heads, head_dim


def _eos_ids(model: PreTrainedModel) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def export_onnx(
    model: PreTrainedModel,
    output: str | Path,
    tokenizer: Any = None,
    verify: bool = True,
    force: bool = False,
    opset: int | None = None,
    precision: str = "float32",
    tensorrt: bool = False,
    block: int = DEFAULT_BLOCK,
    quantize_head: bool = True,
    calib_windows: int = DEFAULT_WEIGHT_WINDOWS,
    calib_text: str = "wiki",
    quantize_embedding: bool = True,
    dense_bits: int | None = None,
    portable: bool = False,
) -> dict[str, Any]:
    """Write ``model.onnx`` (+ external data), the tokenizer and ``eigenpatch_onnx.json`` to ``output``.

    Atomic: everything goes to a temporary folder that is renamed into place only after
    verification passed. Returns the metadata (with parity numbers when ``verify``).

    ``precision``: ``"int8"`` / ``"int4"`` store the verified fp32 graph's MatMul weights (factor
    pairs and, with ``quantize_head``, the output head included) weight-only in blocks of ``block``
    rows (``MatMulNBits``; activations stay fp32), GPTQ-rounded on ``calib_windows`` windows of
    ``calib_text`` (0: round to nearest), the embedding table at int8 unless not
    ``quantize_embedding``, and at int4 the Linears a compressed model kept dense at
    ``dense_bits`` (default 32: fp32; see :func:`eigenpatch.export.precision.quantize_weights`);
    ``"dynamic-int8"`` is ONNX Runtime's dynamic quantization (activations too); ``"float16"``
    re-traces a half-precision copy (weights, activations and the KV cache in fp16, for GPU
    targets). None can meet the fp32 logits bound, so their parity is *reported* under
    ``meta["precision"]`` (see :mod:`eigenpatch.export.precision`), not enforced.

    ``portable``: standard ONNX ops only (no fused norms); implied by ``tensorrt``.

    ``tensorrt``: after all checks, build a TensorRT engine for the final graph (GPU only; see
    :mod:`eigenpatch.export.tensorrt`); refused up front, before any work, where it cannot be built.
    """
    if precision not in ("float32", *PRECISIONS):
        raise UsageError(f"unknown precision {precision!r}; choose float32, {', '.join(PRECISIONS)}")
    if precision == "float16" and quantized_modules(model):
        raise UsageError("a quantized checkpoint exports in float32 (its Linears run as MatMulNBits), not float16")
    check_block(block)
    if tensorrt and (reason := tensorrt_unavailable()) is not None:
        raise UsageError(reason)
    stored = stored_dtype_tensors(model)
    if any(p.dtype != torch.float32 for p in model.parameters() if id(p) not in stored):
        raise UsageError("ONNX export (and its fp32 parity check) needs the model loaded in float32")
    model.eval()
    num_layers, kv_heads, head_dim = _shapes(model.config)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    vocab = model.config.get_text_config().vocab_size
    with atomic_output_dir(output, force) as tmp:
        start = time.perf_counter()
        with dequantized_linears(model) as codes:  # stored quantized Linears: traced as their fp32 weights
            trace(model, tmp / MODEL_FILE, past_names, present_names, opset)
        fused = {} if portable or tensorrt else fuse_norms(tmp / MODEL_FILE)
        mapped = map_stored(tmp, MODEL_FILE, codes) if codes else None  # ... then read from their codes
        meta: dict[str, Any] = {
            "format": 1,
            "dtype": "float32",
            "num_layers": num_layers,
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "eos_token_ids": _eos_ids(model),
            "inputs": ["input_ids", "attention_mask", "position_ids", *past_names],
            "outputs": ["logits", *present_names],
            "past_names": past_names,
            "past_shape": ["batch", kv_heads, "past_sequence", head_dim],
            "fused": fused,  # ONNX Runtime ops the graph's norms became ({} : standard ONNX ops only)
            "stored_quantized": mapped,  # the checkpoint's quantized Linears, as MatMulNBits on their codes
            "export_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        prompts = prompt_ids(tokenizer, vocab)
        reduced = precision != "float32"
        reference = pytorch_reference(model, prompts) if verify or reduced else None
        if verify:
            meta["parity"] = verify_export(tmp, reference, fused=bool(fused))
        if reduced:
            fp32_bytes = onnx_bytes(tmp)
            done: dict[str, Any] = {}
            if precision in WEIGHT_BITS:
                bits = WEIGHT_BITS[precision]
                windows = _weight_windows(tokenizer, calib_text, calib_windows)
                kept_dense = dense_bits or (32 if bits == 4 else None)
                done = {
                    "block": block,
                    **quantize_weights(tmp, bits, block, quantize_head, windows, quantize_embedding, kept_dense),
                }
            elif precision == "dynamic-int8":
                quantize_dynamic_int8(tmp)
            else:  # a second trace in fp16: HF's own fp32 upcasts (RMSNorm, softmax) stay in the graph
                half = nn.Module.half(copy.deepcopy(model))  # PreTrainedModel.half refuses patched models
                (tmp / "fp16").mkdir()
                trace(half, tmp / "fp16" / MODEL_FILE, past_names, present_names, opset)
                replace_graph(tmp, tmp / "fp16")
                # the fp16 trace casts around each norm, which the fusion leaves as traced
                meta["fused"] = {} if portable or tensorrt else fuse_norms(tmp / MODEL_FILE)
            meta["dtype"] = "float16" if precision == "float16" else "float32"  # of inputs, outputs, KV cache
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # the runner reads the dtype
            meta["precision"] = {
                "kind": precision,
                **done,
                "fp32_bytes": fp32_bytes,
                "bytes": onnx_bytes(tmp),
                **reduced_parity(tmp, reference, GREEDY_STEPS),
            }
        if tensorrt:
            try:
                meta["tensorrt"] = build_engine(tmp, meta, fp16=precision == "float16")
            except TensorRTFailed as exc:
                raise ExportFailed(str(exc)) from None
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _weight_windows(tokenizer: Any, text: str, n: int) -> Any:
    """GPTQ's calibration token windows (``None``: round to nearest, for want of text or of ``n``)."""
    if tokenizer is None or n <= 0:
        return None
    from eigenpatch.calibration import calibration_windows
    from eigenpatch.zoo import resolve_text

    return calibration_windows(tokenizer, resolve_text(text, split="calib"), n, WEIGHT_SEQ_LEN).numpy()


@torch.no_grad()
def pytorch_reference(model: PreTrainedModel, prompts: list[list[int]]) -> Reference:
    """PyTorch's logits and ``transformers.generate`` greedy continuations for ``prompts``, once."""
    logits = [model(input_ids=torch.tensor([ids])).logits.numpy() for ids in prompts]
    greedy = [
        model.generate(
            torch.tensor([ids]), max_new_tokens=GREEDY_STEPS, do_sample=False, attention_mask=torch.ones(1, len(ids))
        )[0, len(ids) :].tolist()
        for ids in prompts
    ]
    return Reference(prompts, logits, greedy)


def prompt_ids(tokenizer: Any, vocab: int) -> list[list[int]]:
    """The fixed verification prompts as token ids (seeded random ids when there is no tokenizer)."""
    if tokenizer is not None:
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 9, 3, 12, 7)]


def verify_export(path: Path, reference: Reference, fused: bool = False) -> dict[str, Any]:
    """Logits parity and greedy-token identity (through the KV cache) of the ONNX graph vs PyTorch."""
    runner = OnnxCausalLM(path, provider="CPU")
    worst = max_logit_diff(runner, reference)
    if not worst <= LOGITS_ATOL:
        hint = " (its norms are fused: --portable exports them as traced)" if fused else ""
        raise ExportFailed(
            f"ONNX logits differ from PyTorch by {worst:.3g} (> {LOGITS_ATOL}){hint}; the export is wrong"
        )
    matched = 0
    for ids, greedy in zip(reference.prompts, reference.greedy, strict=True):
        got = runner.generate(ids, max_new_tokens=GREEDY_STEPS)
        if got != greedy:
            raise ExportFailed(
                f"greedy decoding through the ONNX KV cache diverges from transformers at step "
                f"{first_divergence(got, greedy)} (prompt {ids[:8]}...); the export is wrong"
            )
        matched += len(got)
    return {"max_abs_logit_diff": worst, "prompts": len(reference.prompts), "greedy_tokens_matched": matched}
