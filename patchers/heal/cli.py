"""Healing on the command line: ``patch-model --compress R --heal STEPS``, or after ``--bits`` / ``--budget``."""

from __future__ import annotations

import argparse
from typing import Any

from eigenpatch.cli.pieces import CliPiece, register_piece
from eigenpatch.patchers.heal.config import LOSSES, Heal
from eigenpatch.recipe import TransformConfig


class HealPiece(CliPiece):
    order = 37  # after compression and quantization (it trains what they left), before the interventions
    name_order = 90  # the folder name ends in -heal<STEPS>
    transforms = ("heal",)
    flag = "--heal STEPS"
    examples = (
        "patch-model --compress 0.5 --heal 300            # then distil into the factor pairs (resumable)",
        "patch-model --budget 3.25 --heal 300             # then distil into the quantized scales (no byte added)",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        h = parser.add_argument_group(
            "healing (distil into the factor pairs after --compress, the scales and corrections after --bits/--budget)"
        )
        h.add_argument("--heal", type=int, default=0, metavar="STEPS", help="healing steps (default 0: none)")
        h.add_argument("--heal-loss", choices=LOSSES, default="kd", help="kd: distil the original model (default)")
        h.add_argument("--heal-lr", type=float, default=Heal.lr, help="peak AdamW learning rate (%(default)s)")
        h.add_argument(
            "--heal-scale-lr",
            type=float,
            default=Heal.scale_lr,
            help="quantized scales' peak step, relative to their magnitude (%(default)s)",
        )
        h.add_argument("--heal-batch", type=int, default=Heal.batch_size, help="windows per step (%(default)s)")
        h.add_argument("--heal-seq-len", type=int, default=Heal.seq_len, help="tokens per window (%(default)s)")
        h.add_argument(
            "--heal-grad-accum", type=int, default=Heal.grad_accum, help="micro-batches per step (%(default)s)"
        )
        h.add_argument(
            "--heal-checkpoint-every",
            type=int,
            default=Heal.checkpoint_every,
            metavar="N",
            help="save the training state every N steps, so a killed run resumes there (%(default)s)",
        )

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        if not args.heal:
            return None
        return Heal(
            steps=args.heal,
            loss=args.heal_loss,
            lr=args.heal_lr,
            scale_lr=args.heal_scale_lr,
            batch_size=args.heal_batch,
            seq_len=args.heal_seq_len,
            grad_accum=args.heal_grad_accum,
            checkpoint_every=args.heal_checkpoint_every,
            seed=args.seed,
        )

    def output_name(self, args: argparse.Namespace) -> str:
        return f"-heal{args.heal}" if args.heal else ""

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        resumed = f", resumed at step {step['resumed_from_step']}" if step["resumed_from_step"] else ""
        return [
            f"heal: {step['steps']} steps ({step['loss']}), {step['trainable_params']:,} trainable params, "
            f"loss {step['loss_first']:.3f} -> {step['loss_last']:.3f}, {step['tokens_per_second']:.0f} tok/s, "
            f"{step['seconds']} s{resumed}"
        ]


register_piece(HealPiece())
