"""EigenShield on the command line: ``patch-model --shield SITE`` and ``eigenpatch inspect --shield-spectrum SITE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eigenpatch.cli.pieces import CliPiece, register_piece
from eigenpatch.errors import UsageError
from eigenpatch.patchers.eigenshield.config import CANDIDATES, DEFAULT_CALIB, QUANTILE_GRID, SCORES, EigenShield
from eigenpatch.recipe import TransformConfig


def _quantile(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        q = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {value!r}") from None
    if not 0.0 <= q <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {value!r}")
    return q


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
        type=_quantile,
        default=None,
        metavar="Q|auto",
        help="candidates whose robustness score is above this quantile are correlational and dropped; "
        f"auto (default): the lowest of {', '.join(map(str, QUANTILE_GRID))} whose perplexity cost on held-out "
        "windows of every --shield-calib text is within --shield-max-cost",
    )
    g.add_argument(
        "--shield-max-cost",
        type=float,
        default=EigenShield.max_cost,
        metavar="FRACTION",
        help="largest perplexity cost auto may pay on any calibration text (%(default)s: +5%%)",
    )
    g.add_argument(
        "--shield-calib",
        nargs="+",
        default=list(DEFAULT_CALIB),
        metavar="TEXT",
        help="texts the shield is fitted on, equal windows from each (zoo names or .txt files; "
        "default: %(default)s, one of each kind in the domain panel). Calibrate on the kinds of text you serve",
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
        max_cost=args.shield_max_cost,
        calib=tuple(args.shield_calib),
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
    ) + _chosen(step)


def _chosen(step: dict[str, Any]) -> str:
    """How the quantile was chosen, when it was: the worst held-out cost and the text it hit."""
    if not step.get("quantile_chosen"):
        return ""
    costs = step["check_costs"][str(step["quantile"])]
    worst = max(costs, key=costs.get)
    met = "" if step["max_cost_met"] else ", above the limit"
    return f"; quantile {step['quantile']} chosen: worst cost {costs[worst]:+.1%} ({worst}{met})"


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
