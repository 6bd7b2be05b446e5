"""Structured FFNs on the command line: ``patch-model --structured-ffn KIND [--ffn-ratio R]``."""

from __future__ import annotations

import argparse
from typing import Any

from eigenpatch.cli.pieces import CliPiece, fraction, ratio_of, register_piece
from eigenpatch.patchers.structured_ffn.config import STRUCTURES, StructuredFFN
from eigenpatch.recipe import TransformConfig
from eigenpatch.table import fmt_count


def _premerge_words(threshold: int | None) -> str:
    if threshold is None:
        return "always merged"
    return "never merged" if threshold == 0 else f"merged up to {threshold} tokens"


class StructuredFFNPiece(CliPiece):
    order = 10  # first: it claims the FFN Linears, which --compress then leaves alone
    name_order = 10
    transforms = ("structured_ffn",)
    flag = "--structured-ffn KIND"
    examples = (
        "patch-model --structured-ffn blockdense --ffn-ratio 0.3   # structured FFN blocks, pre-merged for decode",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        f = parser.add_argument_group("structured feed-forward blocks (instead of, or with, --compress on attention)")
        f.add_argument(
            "--structured-ffn",
            choices=STRUCTURES,
            help="lowrank: gate/up share one input factor; blockdense / blockshuffle: block-diagonal stages",
        )
        f.add_argument(
            "--ffn-ratio",
            type=fraction("--ffn-ratio"),
            default=StructuredFFN.ratio,
            metavar="R",
            help="fraction of FFN params to remove (%(default)s)",
        )
        f.add_argument(
            "--ffn-blocks", type=int, default=StructuredFFN.blocks, help="blocks of the block kinds (%(default)s)"
        )
        f.add_argument(
            "--premerge",
            default="auto",
            help="auto: measure here when the merged dense matrix is faster (few tokens) and store it; "
            "off: never merge (no dense copy in memory); always; or a token count (%(default)s)",
        )

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        if not args.structured_ffn:
            return None
        return StructuredFFN(
            structure=args.structured_ffn,
            ratio=args.ffn_ratio,
            blocks=args.ffn_blocks,
            calib_seq_len=args.calib_seq_len,
            seed=args.seed,
            premerge=args.premerge,
        )

    def output_name(self, args: argparse.Namespace) -> str:
        return f"-ffn-{args.structured_ffn}-f{args.ffn_ratio:g}" if args.structured_ffn else ""

    def summary_rows(self, step: dict[str, Any]) -> list[list[str]]:
        before, after = step["ffn_params_before"], step["ffn_params_after"]
        return [[f"FFN matrices ({step['structure']})", fmt_count(before), fmt_count(after), ratio_of(before, after)]]

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        thresholds = ", ".join(
            f"{label}: {_premerge_words(v['premerge_max_tokens'])}" for label, v in step["premerge_thresholds"].items()
        )
        return [f"structured_ffn: {step['ffn_blocks']} FFN blocks, {step['seconds']} s; pre-merge {thresholds}"]


register_piece(StructuredFFNPiece())
