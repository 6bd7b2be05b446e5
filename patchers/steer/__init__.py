"""Steering vectors: build them from contrastive prompts (``eigenpatch steer build``) and bake them
into a checkpoint (``--steer FILE``); vLLM applies them per request from the same file."""

from eigenpatch.patchers.steer import cli, transform
from eigenpatch.patchers.steer.config import Steer

__all__ = ["Steer", "cli", "transform"]
