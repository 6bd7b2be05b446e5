"""``heal``: WeLore's other half — train only the small tensors a compression left.

After compression, the low-rank components (LRCs: every ``LowRankLinear``'s ``lowrank_down`` and
``lowrank_up``) are the only trainable tensors; dense matrices, norms, embeddings and biases stay
frozen (byte-identical), and the optimizer keeps state for the factors only. That is the memory
argument of WeLore: the trainable set is a fraction of the model and so is AdamW's state.

After quantization (``--bits`` / ``--budget``), the trainable tensors are each quantized Linear's
fp16 scales and its correction factors; codes and zero points stay fixed, so healing adds no
byte. This is end-to-end training of the quantization step sizes (EfficientQAT's E2E-QP, PEQA):
the block-local refinement of the quantize step matches each layer to the dense one on its own,
healing matches the whole model's output distribution. The scales train in fp32 with a step of
``scale_lr`` times each tensor's mean magnitude (a scale of 0.1 and one of 0.01 move by the same
fraction) and are stored back in fp16; the correction factors train in fp32 with ``lr``, like factor
pairs, and are stored back at their ``factor_bits`` (int8 rows or fp16).

Loss: knowledge distillation from the uncompressed teacher (forward KL on the full vocabulary at
``temperature``, the teacher run on the fly — :func:`eigenpatch.patch` keeps a frozen copy when a
recipe contains ``heal``), or plain next-token loss (``loss="lm"``). AdamW, linear warm-up then
cosine decay, gradient accumulation, gradient clipping; bf16 autocast on request (``autocast``:
measured +13 % tokens/s on an AVX512-BF16 CPU without AMX, so fp32 stays the default). The
text is the calibration split, disjoint from every eval split.

Deterministic under ``seed`` and resumable: every ``checkpoint_every`` steps the factors, AdamW's
moments and the step go to ``PatchContext.state_dir`` (safetensors + JSON, written atomically);
a rerun with the same recipe continues from there and ends with the same weights as an
uninterrupted run. ``trainable="all"`` trains every parameter instead (the full fine-tuning
baseline of ``bench/heal.py``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.calibration import calibration_windows
from eigenpatch.errors import UsageError
from eigenpatch.format.corrected import CorrectedQuantizedLinear, float_factors
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.format.quantized import QuantizedLinear
from eigenpatch.format.structured import StructuredLinear, set_premerge
from eigenpatch.patchers.heal.config import Heal
from eigenpatch.recipe import PatchContext, TransformResult, register_transform

STATE_FILE, META_FILE = "heal_state.safetensors", "heal_state.json"
META_KEY = "eigenpatch_heal"  # the safetensors header entry holding the step and the settings


def trainable_parameters(model: nn.Module, which: str = "factors") -> dict[str, nn.Parameter]:
    """The parameters healing trains, by name: the factor pairs, quantized Linears' scales and
    correction factors (or everything, for the baseline)."""
    if which == "all":
        return dict(model.named_parameters())
    found: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, LowRankLinear | StructuredLinear):
            names = [n for n, _ in module.named_parameters(recurse=False) if n != "bias"]
        elif isinstance(module, QuantizedLinear):
            names = ["scales"]
        elif isinstance(module, CorrectedQuantizedLinear):
            names = ["correction_down", "correction_up"]
        else:
            continue
        found |= {f"{mod_name}.{n}": getattr(module, n) for n in names}
    return found


def scale_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The quantized Linears' scales: they train with a step relative to their magnitude."""
    return {m.scales for m in model.modules() if isinstance(m, QuantizedLinear)}


def _param_groups(params: dict[str, nn.Parameter], scales: set[nn.Parameter], config: Heal) -> list[dict]:
    """One group for the factors at ``lr``; one per scale tensor at ``scale_lr`` x its mean |value|.
    ``base_lr`` is the peak that :func:`lr_factor` scales at each step."""
    plain = [p for p in params.values() if p not in scales]
    groups = [{"params": plain, "lr": config.lr, "base_lr": config.lr}] if plain else []
    for p in (p for p in params.values() if p in scales):
        lr = config.scale_lr * float(p.detach().abs().mean().clamp_min(1e-12))
        groups.append({"params": [p], "lr": lr, "base_lr": lr})
    return groups


def lr_factor(step: int, config: Heal) -> float:
    """The schedule, as a fraction of each group's peak: linear warm-up, then cosine decay to 10 %."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _use_bf16(setting: str) -> bool:
    if setting == "none":
        return False
    if setting == "bf16":
        return True
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL(teacher || student) per token, on the full vocabulary, scaled by T^2 (Hinton)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean") * temperature**2


def _save_state(state_dir: Path, step: int, params: dict[str, nn.Parameter], optimizer: Any, config: Heal) -> None:
    """Factors, AdamW moments and the step in one safetensors file (the step in its header), replaced
    atomically: a run killed at any instant leaves the previous checkpoint or this one, never a mix.
    The JSON beside it is a readable copy of the header."""
    tensors: dict[str, torch.Tensor] = {}
    adam_step = 0.0
    for name, p in params.items():
        tensors[f"param/{name}"] = p.detach().contiguous()
        st = optimizer.state.get(p, {})
        if st:
            tensors[f"exp_avg/{name}"] = st["exp_avg"].contiguous()
            tensors[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].contiguous()
            adam_step = float(st["step"])
    state_dir.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"step": step, "adam_step": adam_step, "config": config.to_dict()}, indent=2)
    tmp = state_dir / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: meta})
    os.replace(tmp, state_dir / STATE_FILE)
    (state_dir / (META_FILE + ".tmp")).write_text(meta)
    os.replace(state_dir / (META_FILE + ".tmp"), state_dir / META_FILE)


def _load_state(state_dir: Path, params: dict[str, nn.Parameter], optimizer: Any, config: Heal) -> int:
    """Restore a checkpoint written by the same recipe; returns the step to continue from (0: none)."""
    state_file = state_dir / STATE_FILE
    if not state_file.is_file():
        return 0
    with safe_open(str(state_file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    if not meta:
        return 0  # written by an older eigenpatch (step in the JSON only): start over
    if meta["config"] != config.to_dict():
        raise UsageError(f"{state_dir} holds an interrupted healing run with other settings; delete it to start over")
    tensors = load_file(str(state_file))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
            if f"exp_avg/{name}" in tensors:
                optimizer.state[p] = {
                    "step": torch.tensor(meta["adam_step"]),
                    "exp_avg": tensors[f"exp_avg/{name}"].clone(),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].clone(),
                }
    return int(meta["step"])


@register_transform(Heal)
def apply_heal(model: nn.Module, config: Heal, context: PatchContext) -> TransformResult:
    if context.calib_text is None or context.tokenizer is None:
        raise UsageError("heal trains on text: it needs calibration text and a tokenizer")
    if config.loss == "kd" and context.teacher is None:
        raise UsageError("heal with loss 'kd' needs the uncompressed teacher; run it through eigenpatch.patch")
    with float_factors(model):  # correction pairs train as fp32 factors, stored back (int8 rows or fp16) after
        return _heal(model, config, context)


def _heal(model: nn.Module, config: Heal, context: PatchContext) -> TransformResult:
    params = trainable_parameters(model, config.trainable)
    if not params:
        raise UsageError(
            "heal found nothing to train: put a compression (--compress) or quantization (--bits, --budget) "
            "step before it in the recipe"
        )
    set_premerge(model, enabled=False)  # merged copies of structured layers would go stale while training
    total = config.steps * config.grad_accum * config.batch_size
    windows = calibration_windows(context.tokenizer, context.calib_text, total, config.seq_len + 1, config.seed)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    stored_dtypes = {p: p.dtype for p in params.values()}
    for p in params.values():
        p.data = p.data.float()  # fp16 scales and corrections train in fp32; stored back at the end
        p.requires_grad_(True)
    groups = _param_groups(params, scale_parameters(model), config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = _load_state(context.state_dir, params, optimizer, config) if context.state_dir else 0
    bf16 = _use_bf16(config.autocast)
    model.train()
    losses: list[float] = []
    began, tokens = time.perf_counter(), 0
    bar = tqdm(range(start, config.steps), desc="heal", unit="step", disable=not context.show_progress)
    try:
        for step in bar:
            step_loss = 0.0
            for micro in range(config.grad_accum):
                first = (step * config.grad_accum + micro) * config.batch_size
                batch = windows[order[torch.arange(first, first + config.batch_size) % len(windows)]]
                inputs, targets = batch[:, :-1], batch[:, 1:]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(input_ids=inputs).logits
                    if config.loss == "kd":
                        with torch.no_grad():
                            teacher = context.teacher(input_ids=inputs).logits
                        loss = distillation_loss(logits, teacher, config.temperature)
                    else:
                        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                (loss / config.grad_accum).backward()
                step_loss += loss.item() / config.grad_accum
                tokens += inputs.numel()
            torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, config)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / (time.perf_counter() - began):.0f}")
            if context.state_dir and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _save_state(context.state_dir, step + 1, params, optimizer, config)
            if context.on_step is not None:
                model.eval()
                context.on_step(config.name, step + 1, model)
                model.train()
    finally:
        model.eval()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        for p, dtype in stored_dtypes.items():
            p.data = p.data.to(dtype)
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.scales_changed()
    seconds = time.perf_counter() - began
    return TransformResult(
        {
            "trainable_params": sum(p.numel() for p in params.values()),
            "resumed_from_step": start,
            "tokens": tokens,
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "bf16_autocast": bf16,
            "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
        }
    )
