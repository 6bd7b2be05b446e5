"""Perplexity and size, measured the same way for patched and unpatched models.

Protocol: tokenize the text, keep the first ``max_tokens``, cut it
into non-overlapping windows of ``seq_len`` tokens, score each window independently
(``labels = input_ids``: ``seq_len - 1`` predictions per window), fp32, and report
``exp(total NLL / scored tokens)``. Every window counts, the short last one included; a
non-finite loss is reported as such, never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 16_384
DEFAULT_BATCH = 4


@dataclass
class Perplexity:
    ppl: float
    nll: float
    scored_tokens: int
    windows: int

    def as_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll": self.nll, "scored_tokens": self.scored_tokens, "windows": self.windows}


def tokenize(tokenizer: Any, text: str, max_tokens: int | None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), cut to ``max_tokens``."""
    if not text.strip():
        raise ValueError("evaluation text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH,
    show_progress: bool = True,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity of ``model`` on the 1-D token tensor ``ids`` (see the module docstring)."""
    device = next(model.parameters()).device
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]  # a 1-token tail predicts nothing
    total_nll = 0.0
    scored = 0
    full = [w for w in windows if len(w) == seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if len(w) != seq_len]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not show_progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        scored += batch[:, 1:].numel()
    mean = total_nll / scored if scored else float("nan")
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else (float("inf") if mean >= 700 else float("nan"))
    return Perplexity(ppl=ppl, nll=mean, scored_tokens=scored, windows=len(windows))
