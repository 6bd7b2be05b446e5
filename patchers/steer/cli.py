"""Steering on the command line: ``eigenpatch steer build|show`` and ``patch-model --steer FILE``."""

from __future__ import annotations

import argparse
from typing import Any

from eigenpatch.cli.pieces import CliPiece, register_piece
from eigenpatch.patchers.steer.config import Steer
from eigenpatch.recipe import TransformConfig

STEER_EXAMPLES = """examples:
  eigenpatch steer build --positive bench/data/steer/positive.txt --negative bench/data/steer/negative.txt \\
      --layers 10-14 -o sentiment.safetensors
  eigenpatch steer show sentiment.safetensors
  patch-model --steer sentiment.safetensors --strength 2          # bake it into a checkpoint
  patch-model --compress 0.3 --steer sentiment.safetensors --strength -2 -o patched/gloomy

A vector of layer L is added to what decoder layer L returns. Strength 1 moves the activations by
the contrast between the two prompt sets; negative strengths steer the other way. Useful strengths
depend on the model and the number of layers (SmolLM2, sentiment on layers 10-12: 0.25-1; above
1.5 perplexity explodes)."""


def add_steer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering (add a steering vector to the residual stream, baked into the checkpoint)")
    g.add_argument("--steer", metavar="FILE", help="steering vectors from `eigenpatch steer build`")
    g.add_argument("--strength", type=float, default=Steer.strength, help="multiplier of the vectors (%(default)s)")
    g.add_argument("--steer-layers", metavar="L1-L2", default="", help="only these of the file's layers")
    g.add_argument("--steer-start", type=int, default=0, metavar="POS", help="steer positions >= POS (%(default)s)")


def build_steer(args: argparse.Namespace) -> Steer | None:
    """The ``steer`` config of ``--steer`` and its flags, or None."""
    if not args.steer:
        return None
    from eigenpatch.format.steering import SteeringVectors

    SteeringVectors.load(args.steer)  # refuse a bad file before loading the model
    return Steer(vectors=args.steer, strength=args.strength, layers=args.steer_layers, start=args.steer_start)


def steer_summary(step: dict[str, Any]) -> str:
    """The summary line of a ``steer`` step: which vectors, how strong, and the shift on each layer."""
    norms = ", ".join(f"{L}: {n:.3g}" for L, n in step["shift_norms"].items())
    return f"steer: {step['vectors']} x {step['strength']:g} on layers {step['layers']} (shift norms {norms})"


def run_steer_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from eigenpatch.calibration import calibration_windows
    from eigenpatch.errors import UsageError
    from eigenpatch.format.interventions import decoder_layers
    from eigenpatch.hf_io import load_model, parse_dtype
    from eigenpatch.patchers.prompts import read_prompts
    from eigenpatch.patchers.steer.vectors import build_steering_vectors, describe, parse_layers
    from eigenpatch.table import format_table
    from eigenpatch.zoo import resolve_text

    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"output {out} already exists; choose another -o/--output or pass --force to replace it")
    positive, negative = read_prompts(args.positive), read_prompts(args.negative)
    subspace: str | int = args.subspace
    if subspace not in ("auto", "none", "complement"):
        try:
            subspace = int(subspace)
        except ValueError:
            raise UsageError(f"--subspace must be none, auto, complement or a rank, got {args.subspace!r}") from None
    model, tokenizer, folder = load_model(args.model, parse_dtype(args.dtype), args.trust_remote_code)
    if tokenizer is None:
        raise UsageError(f"{folder} has no tokenizer; steering vectors are read from text")
    layers = parse_layers(args.layers, len(decoder_layers(model)))
    windows = None
    if subspace != "none":
        text = resolve_text(args.calib, "calib")
        windows = calibration_windows(tokenizer, text, args.calib_windows, args.calib_seq_len, args.seed)
    vectors = build_steering_vectors(
        model,
        tokenizer,
        positive,
        negative,
        layers,
        method=args.method,
        read=args.read,
        subspace=subspace,
        calib_windows=windows,
        show_progress=not args.quiet,
    )
    vectors.meta["base_model"] = str(args.model)
    vectors.save(out, force=args.force)
    print(format_table(["layer", "norm", "subspace rank", "energy kept"], describe(vectors)))
    print(f"wrote {out} ({len(positive)} positive / {len(negative)} negative prompts, method {args.method})")
    return 0


def run_steer_show(args: argparse.Namespace) -> int:
    import json

    from eigenpatch.format.steering import SteeringVectors
    from eigenpatch.patchers.steer.vectors import describe
    from eigenpatch.table import format_table

    vectors = SteeringVectors.load(args.file)
    print(format_table(["layer", "norm", "subspace rank", "energy kept"], describe(vectors)))
    meta = {k: v for k, v in vectors.meta.items() if k not in ("norms", "raw_norms", "subspace")}
    print(json.dumps(meta, indent=1))
    return 0


def add_steer_command(sub: Any) -> None:
    from eigenpatch.calibration import DEFAULT_SEED
    from eigenpatch.patchers.steer.vectors import METHODS, READS
    from eigenpatch.zoo import DEFAULT_MODEL

    s = sub.add_parser(
        "steer",
        help="build and inspect steering vectors",
        epilog=STEER_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssub = s.add_subparsers(dest="steer_command", required=True, metavar="ACTION")
    b = ssub.add_parser(
        "build",
        help="steering vectors from contrastive prompt files, in each layer's principal subspace",
        epilog=STEER_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model folder, zoo name or hub id (%(default)s)")
    b.add_argument("--positive", required=True, metavar="FILE", help="prompts to steer towards, one per line")
    b.add_argument("--negative", required=True, metavar="FILE", help="prompts to steer away from, one per line")
    b.add_argument("--layers", required=True, metavar="L1-L2", help="decoder layers: 12, 10-14, 4,8,12, -4--1")
    b.add_argument("-o", "--output", required=True, metavar="FILE.safetensors")
    b.add_argument("--force", action="store_true", help="replace an existing output file")
    b.add_argument("--method", choices=METHODS, default="mean", help="mean difference or PCA of pairs (%(default)s)")
    b.add_argument("--read", choices=READS, default="mean", help="a prompt's activation: mean over tokens or last")
    b.add_argument(
        "--subspace",
        default="none",
        metavar="none|auto|complement|K",
        help="none: the raw contrast (the measured best, default); auto: restricted to the layer's top-K "
        "principal subspace on calibration text, K by Gavish-Donoho's optimal hard threshold (STS-style); "
        "complement: the part outside it; K: a fixed rank",
    )
    b.add_argument("--calib", default="wiki", help="calibration text for the subspace (%(default)s)")
    b.add_argument("--calib-windows", type=int, default=32, help="windows (%(default)s)")
    b.add_argument("--calib-seq-len", type=int, default=256, help="tokens per window (%(default)s)")
    b.add_argument("--seed", type=int, default=DEFAULT_SEED)
    b.add_argument("--dtype", default="float32")
    b.add_argument("--trust-remote-code", action="store_true")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(run=run_steer_build)
    w = ssub.add_parser("show", help="what a steering vector file holds")
    w.add_argument("file")
    w.set_defaults(run=run_steer_show)


class SteerPiece(CliPiece):
    order = 50  # last: the shift is added to what the finished layers return
    name_order = 50
    transforms = ("steer",)
    flag = "--steer FILE"
    examples = (
        "patch-model --steer sentiment.safetensors --strength 4    # bake a steering vector (eigenpatch steer build)",
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_steer_args(parser)

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        return build_steer(args)

    def output_name(self, args: argparse.Namespace) -> str:
        return f"-steer{args.strength:g}" if args.steer else ""

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        return [steer_summary(step)]

    def add_commands(self, sub: Any) -> None:
        add_steer_command(sub)


register_piece(SteerPiece())
