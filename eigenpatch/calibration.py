"""Calibration: token windows from real text and the statistics hooks that data-aware transforms share.

Statistics are accumulated on the fly by hooks (fp32 products, fp64 running sums), so memory is
set by the model's widths, never by the number of calibration windows. Linears that read the
same input tensor (q/k/v, gate/up) share one covariance, which is both cheaper and exactly what
a fused layer (vLLM's qkv_proj / gate_up_proj) sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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


@dataclass
class InputCovariance:
    """Running ``H = sum_t x_t x_t^T`` over calibration tokens (fp64), and the token count."""

    dim: int
    gram: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, self.dim).float()
        self.gram += (flat.T @ flat).double()  # fp32 product per batch, fp64 running sum
        self.tokens += flat.shape[0]


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


@torch.inference_mode()
def collect_input_covariances(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: torch.Tensor,
    batch_size: int = 4,
    show_progress: bool = True,
) -> dict[str, InputCovariance]:
    """Input covariance of every Linear in ``linears`` over ``windows``; shared inputs share one object.

    Sharing is detected, not assumed: within one parent module (an attention or MLP block), two
    Linears whose forward receives the very same tensor read the same input.
    """
    stats: dict[str, InputCovariance] = {}
    seen: dict[tuple[str, int, tuple[int, ...]], InputCovariance] = {}

    def hook_for(name: str):
        parent = name.rpartition(".")[0]

        def hook(module: nn.Linear, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            key = (parent, x.data_ptr(), tuple(x.shape))
            if key in seen:
                stats.setdefault(name, seen[key])  # same input as a sibling: already counted
                return
            stat = stats.setdefault(name, InputCovariance(module.in_features))
            stat.add(x)
            seen[key] = stat

        return hook

    handles = [lin.register_forward_pre_hook(hook_for(name)) for name, lin in linears.items()]
    body = model.base_model  # the decoder stack: the lm_head's logits are not needed here
    device = next(model.parameters()).device
    with _hooks(handles):
        for batch in tqdm(_batches(windows, batch_size), desc="calibration", unit="batch", disable=not show_progress):
            seen.clear()
            body(input_ids=batch.to(device), use_cache=False)
    return stats


def collect_fisher(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: torch.Tensor,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Empirical Fisher per *input column* of each Linear: ``I_j = sum_windows sum_i (dL/dW_ij)^2``.

    One window per backward pass, so each squared gradient is a per-sample gradient (the
    empirical Fisher), not the square of a batch mean. Only the targeted weights require grad.
    """
    fisher = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
    device = next(model.parameters()).device
    with trainable_only(model, [lin.weight for lin in linears.values()]):
        for window in tqdm(windows, desc="fisher", unit="window", disable=not show_progress):
            ids = window[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for name, lin in linears.items():
                fisher[name] += lin.weight.grad.detach().double().square().sum(dim=0).cpu()
                lin.weight.grad = None
    return fisher


def collect_output_fisher(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: torch.Tensor,
    batch_size: int = 4,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of each Linear's *output*: ``b_o = sum_t (dL/dy_{t,o})^2`` over calibration tokens.

    With it, ``0.5 * sum_t sum_o b_o dy_{t,o}^2`` estimates the loss increase a perturbation
    ``dy`` of that layer's output causes (Fisher approximation of the Hessian), in units that
    compare across layers. No parameter gradient is allocated: only the embedding output is
    made to require grad, so backward runs through activations alone.
    """
    fisher = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in linears.items()}

    def hook_for(name: str):
        def hook(module: nn.Linear, args: Any, output: torch.Tensor) -> None:
            def accumulate(grad: torch.Tensor) -> None:
                fisher[name] += grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(dim=0).cpu()

            output.register_hook(accumulate)

        return hook

    def grad_from_embeddings(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    handles = [lin.register_forward_hook(hook_for(name)) for name, lin in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(grad_from_embeddings))
    device = next(model.parameters()).device
    batches = tqdm(_batches(windows, batch_size), desc="output fisher", unit="batch", disable=not show_progress)
    with trainable_only(model, []), _hooks(handles):
        for batch in batches:
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # summed (not averaged) over tokens, so each token's gradient is its own sample's
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            loss.backward()
    return fisher
