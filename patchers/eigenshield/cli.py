"""EigenShield on the command line: ``patch-model --shield SITE`` and ``eigenpatch inspect --shield-spectrum SITE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eigenpatch.cli.pieces import CliPiece, register_piece
from eigenpatch.errors import UsageError
from eigenpatch.patchers.eigenshield.config import CANDIDATES, SCORES, EigenShield
from eigenpatch.recipe import TransformConfig


def add_shield_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("EigenShield (project hidden states onto their random-matrix causal subspace)")
    g.add_argument(
        "--shield",
        nargs="?",
        const=EigenShield.site,
        metavar="SITE",
        help=f"embed (input embeddings) or layer:L (after decoder layer L); bare --shield: {EigenShield.site}",
    )
    g.add_argument(
        "--shield-mode",
        choices=["drop", "keep"],
        default=EigenShield.mode,
        help="drop: remove the correlational directions; keep: keep only the causal ones (%(default)s)",
    )
    g.add_argument(
        "--shield-quantile",
        type=float,
        default=EigenShield.quantile,
        help="candidates whose robustness score is above this quantile are correlational (%(default)s)",
    )
    g.add_argument(
        "--shield-candidates",
        choices=CANDIDATES,
        default=EigenShield.candidates,
        help="eigenvectors the score ranks: spikes (above the Marchenko-Pastur bulk) or outliers "
        "(spikes and deficits, below the bulk) (%(default)s)",
    )
    g.add_argument("--shield-score", choices=SCORES, default=EigenShield.score, help="robustness score (%(default)s)")


def build_shield(args: argparse.Namespace) -> EigenShield | None:
    """The ``eigenshield`` config of ``--shield`` and its flags, or None."""
    if not args.shield:
        return None
    return EigenShield(
        site=args.shield,
        mode=args.shield_mode,
        quantile=args.shield_quantile,
        score=args.shield_score,
        candidates=args.shield_candidates,
        seed=args.seed,
    )


def shield_summary(step: dict[str, Any]) -> str:
    """The summary line of an ``eigenshield`` step: the fitted spectrum and the projector's rank."""
    return (
        f"eigenshield @{step['site']} ({step['mode']}): {step['spikes']} spikes above the Marchenko-Pastur edge "
        f"{step['bulk_edge']:.3g} and {step['deficits']} deficits below {step['lower_edge']:.3g} "
        f"(sigma^2 {step['sigma2']:.3g}, {step['tokens']:,} tokens), "
        f"{step['causal']} causal / {step['correlational']} correlational, projector rank {step['rank']}, "
        f"{step['seconds']} s"
    )


def run_shield_spectrum(args: argparse.Namespace, model: Any, tokenizer: Any, folder: Path) -> int:
    """``inspect --shield-spectrum SITE``: the fitted spectrum at a site, and optionally its plot."""
    from eigenpatch.calibration import calibration_windows
    from eigenpatch.format.interventions import decoder_layers
    from eigenpatch.patchers.eigenshield.config import EigenShield
    from eigenpatch.patchers.eigenshield.stats import collect_site_stats
    from eigenpatch.patchers.eigenshield.transform import fit_subspace
    from eigenpatch.patchers.hidden_states import parse_site
    from eigenpatch.table import format_table
    from eigenpatch.zoo import resolve_text

    if tokenizer is None:
        raise UsageError("the shield spectrum needs calibration text, but the model has no tokenizer")
    parse_site(args.shield_spectrum, len(decoder_layers(model)))
    config = EigenShield(site=args.shield_spectrum)
    windows = calibration_windows(
        tokenizer, resolve_text(args.calib, "calib"), config.calib_windows, config.calib_seq_len, config.seed
    )
    stats = collect_site_stats(
        model,
        [config.site],
        windows,
        config.chunks,
        perturb=config.perturb,
        epsilon=config.epsilon,
        show_progress=not args.quiet,
    )[config.site]
    sub = fit_subspace(stats, config)
    d = sub.details()
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in d.items()]
    print(format_table([f"shield spectrum @{config.site}", ""], rows))
    if args.plot:
        from eigenpatch.patchers.eigenshield.plot import plot_shield_spectrum

        path = plot_shield_spectrum(sub, args.plot, f"{folder.name} @{config.site}")
        print(f"wrote {path}")
    return 0


class EigenShieldPiece(CliPiece):
    order = 40  # after the weight rewrites: the projection is fitted on the compressed model's states
    name_order = 40
    transforms = ("eigenshield",)
    flag = "--shield SITE"
    examples = ("patch-model --shield                             # EigenShield at the input embeddings",)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_shield_args(parser)

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        return build_shield(args)

    def output_name(self, args: argparse.Namespace) -> str:
        return f"-shield-{args.shield.replace(':', '')}" if args.shield else ""

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        return [shield_summary(step)]

    def add_inspect_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--shield-spectrum",
            metavar="SITE",
            help="instead: EigenShield's eigenvalue spectrum of the hidden states at SITE (embed, layer:L), "
            "with the fitted Marchenko-Pastur bulk and the causal spikes",
        )

    def inspect(self, args: argparse.Namespace, model: Any, tokenizer: Any, folder: Path) -> int | None:
        return run_shield_spectrum(args, model, tokenizer, folder) if args.shield_spectrum else None


register_piece(EigenShieldPiece())
