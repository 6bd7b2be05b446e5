"""Calibration: token windows from real text, and the whole-model input covariances two rooms share.

Statistics are accumulated on the fly by hooks (:class:`~eigenpatch.engine.stats.Gram`: fp32
products, fp64 running sums), so memory is set by the model's widths, never by the number of
calibration windows. Linears that read the same input tensor (q/k/v, gate/up) share one
covariance, which is both cheaper and exactly what a fused layer (vLLM's qkv_proj /
gate_up_proj) sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenpatch.engine.stats import Gram, SharedInputs
from eigenpatch.errors import UsageError

DEFAULT_WINDOWS = 128
DEFAULT_SEQ_LEN = 512
DEFAULT_SEED = 0
#: Fisher needs a backward pass per window (about 3x a forward); fewer windows keep it affordable on CPU.
DEFAULT_FISHER_WINDOWS = 32


def calibration_windows(
    tokenizer: Any,
    text: str,
    n_windows: int = DEFAULT_WINDOWS,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
) -> torch.Tensor:
    """``[n, seq_len]`` token windows drawn without overlap from ``text``, deterministic under ``seed``.

    The text is cut into consecutive non-overlapping windows and ``n_windows`` of them are drawn
    at random (all of them, in order, when there are fewer).
    """
    if n_windows < 1 or seq_len < 2:
        raise UsageError(f"calibration needs at least 1 window of at least 2 tokens (got {n_windows} x {seq_len})")
    ids = token_ids(tokenizer, text)
    available = len(ids) // seq_len
    if available == 0:
        raise UsageError(
            f"calibration text has {len(ids)} tokens, shorter than one window of {seq_len}; "
            "pass a longer text or a smaller --calib-seq-len"
        )
    windows = ids[: available * seq_len].view(available, seq_len)
    if available <= n_windows:
        return windows
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_windows]
    return windows[pick.sort().values]


#: Characters tokenized at once. A fast tokenizer's encoding of a whole text (offsets, word ids,
#: Python ints) costs about 130x the text: 370 MB for the 2.7 MB wiki calibration text.
TOKENIZE_CHUNK = 1 << 16


def text_chunks(text: str, size: int = TOKENIZE_CHUNK) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each cut just before the newline that
    starts a line. GPT-2-style byte-level pre-tokenizers (SmolLM2's) split there anyway, so the
    pieces give the whole text's ids; others may merge a run of newlines differently at a cut, a
    token per ``size`` characters, which calibration does not notice."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            found = _CUT.search(text, end)
            end = found.start() if found else len(text)
        yield text[start:end]
        start = end


_CUT = re.compile(r"\n(?=\S)")  # a line's own newline: the cut falls before it


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """``text``'s token ids (no special tokens) as one int64 tensor, tokenized in chunks so the
    tokenizer's peak stays that of one chunk (:data:`TOKENIZE_CHUNK`)."""
    pieces = [
        torch.tensor(tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"])
        for chunk in text_chunks(text)
    ]
    return torch.cat(pieces).long() if pieces else torch.zeros(0, dtype=torch.long)


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad inside the block; every flag is restored afterwards."""
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``windows`` in consecutive batches of ``batch_size`` (the last may be smaller)."""
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


@torch.inference_mode()
def collect_input_covariances(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: torch.Tensor,
    batch_size: int = 4,
    show_progress: bool = True,
) -> dict[str, Gram]:
    """Input Gram ``H = sum_t x_t x_t^T`` of every Linear in ``linears`` over ``windows``, from one
    forward of the whole decoder per batch; Linears that read the same input share one object."""
    grams: dict[str, Gram] = {}
    shared = SharedInputs(linears, lambda leader, x: grams.setdefault(leader, Gram()).add(x))
    body = model.base_model  # the decoder stack: the lm_head's logits are not needed here
    device = next(model.parameters()).device
    with shared.watch(model):
        for batch in tqdm(
            window_batches(windows, batch_size), desc="calibration", unit="batch", disable=not show_progress
        ):
            body(input_ids=batch.to(device), use_cache=False)
    return {name: grams[leader] for name, leader in shared.leader.items()}
