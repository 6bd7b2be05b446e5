"""Snap on the command line: ``patch-model --snap``."""

from __future__ import annotations

import argparse
from typing import Any

from eigenpatch.cli.pieces import CliPiece, register_piece
from eigenpatch.patchers.snap.config import Snap
from eigenpatch.recipe import TransformConfig


class SnapPiece(CliPiece):
    order = 45  # after the shield has fitted (its perturbation statistics must see unsnapped inputs)
    name_order = 45
    transforms = ("snap",)
    flag = "--snap"
    examples = ("patch-model --snap                # embeddings sent in (prompt_embeds) become tokens again",)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("snap (defence against embedding-space attacks; no effect on token ids)")
        g.add_argument(
            "--snap",
            action="store_true",
            help="replace each input embedding by the nearest row of the embedding table, so embeddings a "
            "caller sends (inputs_embeds, vLLM --enable-prompt-embeds) become tokens; costs one [tokens, vocab] "
            "GEMM per forward where embeddings are accepted, nothing in quality",
        )

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        return Snap() if args.snap else None

    def output_name(self, args: argparse.Namespace) -> str:
        return "-snap" if args.snap else ""

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        r = step["safe_radius"]
        return [
            f"snap: {step['vocab']} rows; a perturbation below {r['p5']:.3f} x the mean row norm snaps back to its "
            f"token for 95 % of tokens (median {r['median']:.3f}, smallest {r['min']:.3f}; {step['sampled_rows']} "
            "rows sampled)"
        ]


register_piece(SnapPiece())
