"""Quantization on the command line: ``patch-model --bits 4 [--group G] [--quantizer gptq|rtn]``."""

from __future__ import annotations

import argparse
import math
from typing import Any

from eigenpatch.cli.pieces import CliPiece, ratio_of, register_piece
from eigenpatch.errors import UsageError
from eigenpatch.patchers.targets import DEFAULT_TARGETS
from eigenpatch.recipe import TransformConfig
from eigenpatch.table import fmt_bytes

#: PyTorch's int4 kernel wants a multiple of 16 outputs: a ``down`` factor's rows are the rank.
INT4_KERNEL_ROWS = 16


class QuantizePiece(CliPiece):
    order = 35  # after compression (it rounds the final weights), before healing and the interventions
    name_order = 35
    transforms = ("quantize",)
    flag = "--bits N"
    examples = (
        "patch-model --bits 4                               # GPTQ int4, groups of 64, layer by layer",
        "patch-model --bits 8 --quantizer rtn               # data-free rounding",
        "patch-model --compress 0.3 --bits 4                # factor pairs, each factor int4",
        "patch-model --bits 2 --group 32 --correct 32       # int2 plus a rank-32 correction of each error",
        "patch-model --budget 3.25                          # 3.25 bits per weight: widths and ranks by loss",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from eigenpatch.patchers.quantize.budget import DEFAULT_PAIRS, DEFAULT_RANKS, DEFAULT_WIDTHS
        from eigenpatch.patchers.quantize.config import DEFAULT_GROUP, METHODS

        g = parser.add_argument_group("weight-only quantization (group-wise int codes, scales and zero points)")
        g.add_argument(
            "--bits",
            type=int,
            metavar="N",
            help="bits per weight: 8, 4, 3 or 2 (default: no quantization; 2- and 3-bit codes are stored at their "
            "width and run as 4-bit ones); with --compress, both factors of each pair, ranks planned in whole groups",
        )
        g.add_argument(
            "--group",
            type=int,
            default=DEFAULT_GROUP,
            metavar="G",
            help="consecutive inputs sharing one scale and zero point (default %(default)s)",
        )
        g.add_argument(
            "--quantizer",
            choices=METHODS,
            default="gptq",
            help="gptq: round against the inputs each layer sees, layer by layer (needs text); "
            "rtn: round to nearest, no data (default %(default)s)",
        )
        g.add_argument("--symmetric", action="store_true", help="zero point fixed at the middle level")
        g.add_argument(
            "--correct",
            type=int,
            default=0,
            metavar="RANK",
            help="add to each quantized Linear a rank-RANK correction of its rounding error, fitted on the "
            "propagated inputs and weighted by the output Fisher, then refined (--refine-steps) (default: none)",
        )
        g.add_argument(
            "--correction-bits",
            type=int,
            choices=(8, 16),
            default=8,
            help="store correction factors as int8 rows with an fp16 scale each (8: half the bytes, the rounding "
            "measured free) or as fp16 (16: what eigenpatch before format v2 reads) (default: %(default)s)",
        )
        g.add_argument(
            "--refine-scales",
            action="store_true",
            help="after each layer is rounded, train its fp16 scales (codes fixed) towards the dense layer's outputs "
            "for --refine-steps steps: no byte added (always on with --budget)",
        )
        g.add_argument(
            "--budget",
            type=float,
            metavar="B",
            help="average bits per weight, everything counted (codes, scales, zero points, corrections): each "
            "matrix gets the width (--budget-widths) and correction rank (--budget-ranks) that lose least per byte "
            "by a second-order estimate (docs/quantize.md); instead of --bits",
        )
        g.add_argument(
            "--budget-widths",
            nargs="+",
            default=list(DEFAULT_WIDTHS),
            metavar="BITS:GROUP",
            help="widths --budget chooses from (default: %(default)s)",
        )
        g.add_argument(
            "--budget-ranks",
            nargs="+",
            type=int,
            default=list(DEFAULT_RANKS),
            metavar="K",
            help="correction ranks --budget chooses from, 0 included (default: %(default)s)",
        )
        g.add_argument(
            "--budget-pairs",
            nargs="*",
            default=list(DEFAULT_PAIRS),
            metavar="BITS:GROUP@F",
            help="low-rank replacements --budget chooses from: a factor pair at F of the rank where it costs "
            "what the matrix does, both factors at BITS:GROUP; none without values (default: %(default)s)",
        )
        g.add_argument(
            "--quantize-targets",
            nargs="+",
            default=list(DEFAULT_TARGETS),
            metavar="NAME",
            help="Linear names to quantize (default: every decoder Linear; the head and the embedding stay)",
        )

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        from eigenpatch.patchers.quantize.config import Quantize, check_bits_and_group

        if args.budget is not None:
            return self._budget(args, earlier)
        if args.bits is None:
            return None
        structured = [c.name for c in earlier if c.name == "structured_ffn"]
        if structured:
            raise UsageError(
                "--bits with --structured-ffn: block-structured FFNs are not quantized; quantize the dense model "
                "or a --compress one"
            )
        check_bits_and_group(args.bits, args.group)
        for config in earlier:  # factor pairs with whole groups of rank run the int4 kernel (docs/quantize.md)
            if hasattr(config, "rank_multiple"):
                config.rank_multiple = math.lcm(config.rank_multiple, args.group, INT4_KERNEL_ROWS)
        return Quantize(
            bits=args.bits,
            group=args.group,
            correction_rank=args.correct,
            refine_steps=args.refine_steps if args.correct or args.refine_scales else 0,
            refine_scales=args.refine_scales,
            **_shared(args),
        )

    def _budget(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig:
        from eigenpatch.patchers.quantize.config import Quantize

        if args.bits is not None:
            raise UsageError("--bits and --budget: --bits is one width for every matrix, --budget picks them; give one")
        if earlier:
            names = ", ".join(c.name for c in earlier)
            raise UsageError(f"--budget after {names}: a budget plans the dense model's matrices; quantize them alone")
        return Quantize(
            budget=args.budget,
            budget_widths=tuple(args.budget_widths),
            budget_ranks=tuple(args.budget_ranks),
            budget_pairs=tuple(args.budget_pairs),
            correction_rank=args.correct,  # refused with a budget, by the config, in one line
            refine_steps=args.refine_steps,
            refine_scales=args.refine_steps > 0,
            **_shared(args),
        )

    def output_name(self, args: argparse.Namespace) -> str:
        if args.budget is not None:
            return f"-{args.quantizer}-budget{args.budget:g}"
        if args.bits is None:
            return ""
        return f"-{args.quantizer}-int{args.bits}-g{args.group}" + (f"-r{args.correct}" if args.correct else "")

    def summary_rows(self, step: dict[str, Any]) -> list[list[str]]:
        before, after = step["bf16_bytes_before"], step["bytes_after"]
        how = f"{step['method']} int{step['bits']}, group {step['group']}"
        if step.get("budget") is not None:
            how = f"{step['method']}, budget {step['budget']:g} bits per weight"
        if step.get("correction_rank"):
            how += f", rank-{step['correction_rank']} corrections"
        label = f"quantized Linears, bytes vs bf16 ({how})"
        return [[label, fmt_bytes(before), fmt_bytes(after), ratio_of(before, after)]]

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        how = ", layer by layer on the propagated inputs" if step["method"] == "gptq" else ""
        done = f"{step['quantized']} Linears quantized, {step['seconds']} s"
        widened = step.get("kernel_width_bytes_after", step["bytes_after"])
        memory = []
        if widened != step["bytes_after"]:  # 2/3-bit codes: smaller on disk than in any runtime
            memory = [
                f"  in memory: 2- and 3-bit codes run as 4-bit ones, {fmt_bytes(widened)} of Linears in ONNX "
                "Runtime; transformers and vLLM hold the stored codes and, once a bf16 forward packs it, a 4-bit "
                "kernel copy"
            ]
        if not step.get("plan"):
            return [f"{step['method']} int{step['bits']}{how}: {done}", *memory]
        plan = step["plan"]
        widths = ", ".join(f"{n} at {w}" for w, n in plan["matrices_per_width"].items())
        return [
            f"{step['method']} with a budget of {step['budget']:g} bits per weight{how}: {done}",
            f"  plan: {widths}; mean correction rank {plan['mean_correction_rank']:g}; "
            f"{plan['bits_per_weight']:.3f} bits per weight met",
            *memory,
        ]


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Quantize`` fields that ``--bits`` and ``--budget`` take from the same flags."""
    return {
        "method": args.quantizer,
        "symmetric": args.symmetric,
        "correction_bits": args.correction_bits,
        "fisher_windows": args.fisher_windows,
        "targets": tuple(args.quantize_targets),
        "calib_windows": args.calib_windows,
        "calib_seq_len": args.calib_seq_len,
        "seed": args.seed,
    }


register_piece(QuantizePiece())
