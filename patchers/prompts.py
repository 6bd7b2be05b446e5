"""Prompt files: one prompt (or label, or input text) per non-empty line."""

from __future__ import annotations

import os
from pathlib import Path

from eigenpatch.errors import UsageError


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompt file {p} does not exist")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {p} has no prompts (one per line)")
    return prompts
