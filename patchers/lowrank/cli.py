"""Low-rank compression on the command line: ``patch-model --compress R [--method A+F]`` and the
default view of ``eigenpatch inspect`` (each matrix's spectrum and the rank a ratio gives it)."""

from __future__ import annotations

import argparse
from typing import Any

from eigenpatch.calibration import DEFAULT_FISHER_WINDOWS
from eigenpatch.cli.pieces import CliPiece, fraction, ratio_of, register_piece
from eigenpatch.errors import UsageError
from eigenpatch.patchers.targets import DEFAULT_TARGETS
from eigenpatch.recipe import TransformConfig
from eigenpatch.table import fmt_count

#: What ``--compress`` uses unless ``--method`` says otherwise.
DEFAULT_METHOD = "loss+fwhiten"
#: Block-local refinement steps per layer in the default layer-by-layer fit (bench/compress_quality.py).
DEFAULT_REFINE_STEPS = 64


def method_label(step: dict[str, Any]) -> str:
    return f"{step['allocator']}+{step['factorizer']}"


class LowRankPiece(CliPiece):
    order = 20  # after structured FFNs (which claim the FFN Linears), before healing
    name_order = 20
    transforms = ("lowrank", "svd")
    flag = "--compress R"
    examples = (
        "patch-model --compress 0.4 --method welore+whiten --calib my_corpus.txt --eval",
        "patch-model --compress 0.5 --method svd          # data-free baseline (fast, and much worse)",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("low-rank compression (factor pairs, one global parameter ratio)")
        g.add_argument(
            "--compress",
            type=fraction("--compress"),
            metavar="R",
            help="fraction of targeted Linear params to remove (low-rank factor pairs)",
        )
        g.add_argument(
            "--method",
            default=DEFAULT_METHOD,
            help="ALLOCATOR+FACTORIZER: allocator uniform|welore|loss, factorizer svd|fwsvd|whiten|fwhiten; "
            "'svd' = uniform+svd (data-free). Default: %(default)s",
        )
        g.add_argument(
            "--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME", help="Linear names to compress"
        )
        g.add_argument(
            "--one-shot",
            action="store_true",
            help="fit every factor pair on the dense model's statistics at once (faster, worse). By default "
            "whiten/fwhiten pairs are fitted layer by layer on the inputs the compressed layers before them "
            "produce, then refined (see docs/compression.md)",
        )
        g.add_argument(
            "--refine-steps",
            type=int,
            default=DEFAULT_REFINE_STEPS,
            metavar="N",
            help="layer by layer: Adam steps per layer on its factor pairs (and with --correct, on its "
            "corrections) so its output matches the dense layer's (0: closed-form fit only; default %(default)s)",
        )
        g.add_argument(
            "--fisher-windows",
            type=int,
            default=DEFAULT_FISHER_WINDOWS,
            help="windows for gradient statistics (%(default)s)",
        )

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        from eigenpatch.patchers.lowrank.config import SVD, LowRank, parse_method

        if args.compress is None:
            return None
        if args.refine_steps < 0:
            raise UsageError(f"--refine-steps must be 0 or more, got {args.refine_steps}")
        parts = parse_method(args.method)
        common = {"ratio": args.compress, "targets": _targets(args, earlier)}
        if args.method == "svd":
            return SVD(**common)
        return LowRank(
            **common,
            **parts,
            calib_windows=args.calib_windows,
            calib_seq_len=args.calib_seq_len,
            fisher_windows=args.fisher_windows,
            seed=args.seed,
            sequential=not args.one_shot,
            refine_steps=0 if args.one_shot else args.refine_steps,
        )

    def output_name(self, args: argparse.Namespace) -> str:
        return "" if args.compress is None else f"-{args.method.replace('+', '-')}-c{args.compress:g}"

    def summary_rows(self, step: dict[str, Any]) -> list[list[str]]:
        before, after = step["targeted_params_before"], step["targeted_params_after"]
        return [
            [f"targeted Linears ({method_label(step)})", fmt_count(before), fmt_count(after), ratio_of(before, after)]
        ]

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        engine = step.get("layer_by_layer")
        how = ", layer by layer" if engine is not None else ""
        if engine is not None and "resumed_at_layer" in engine:
            how += f" (resumed at layer {engine['resumed_at_layer']})"
        return [
            f"{method_label(step)}{how}: {step['factorized']} matrices factorized, {step['kept_dense']} kept dense, "
            f"{step['seconds']} s"
        ]

    # -- inspect: spectra and ranks -------------------------------------------------------------
    inspects_by_default = True

    def add_inspect_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--compress", type=fraction("--compress"), default=0.5, metavar="R", help="ratio whose ranks to show"
        )
        parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME")
        parser.add_argument(
            "--allocator", default="uniform", choices=["uniform", "welore"], help="data-free rank allocator"
        )

    def inspect(self, args: argparse.Namespace, model: Any, tokenizer: Any, folder: Any) -> int | None:
        from eigenpatch.patchers.lowrank.inspect import collect_spectra, plot_spectra
        from eigenpatch.table import format_table

        spectra = collect_spectra(
            model, args.compress, tuple(args.targets), args.allocator, show_progress=not args.quiet
        )
        rows = [
            [s.name, f"{s.shape[1]}->{s.shape[0]}", s.break_even, s.rank or "dense", f"{s.energy_kept:.3f}"]
            for s in spectra
        ]
        print(format_table(["matrix", "in->out", "break-even", f"rank @{args.compress:g}", "energy kept"], rows))
        if args.plot:
            title = f"{folder.name}, {args.allocator} ranks at --compress {args.compress:g}"
            print(f"wrote {plot_spectra(spectra, args.plot, title)}")
        return 0


def _targets(args: argparse.Namespace, earlier: list[TransformConfig]) -> tuple[str, ...]:
    """``--targets``, less the Linears an earlier stage replaces (``--structured-ffn`` takes the FFN)."""
    claimed = {name for config in earlier for name in config.claimed_linears()}
    if not claimed:
        return tuple(args.targets)
    if list(args.targets) == list(DEFAULT_TARGETS):
        return tuple(t for t in args.targets if t not in claimed)
    taken = sorted(claimed & set(args.targets))
    if taken:
        flags = " ".join(sorted({c.name for c in earlier if set(c.claimed_linears()) & set(taken)}))
        raise UsageError(f"{flags} already replaces {', '.join(taken)}; drop them from --targets")
    return tuple(args.targets)


register_piece(LowRankPiece())
