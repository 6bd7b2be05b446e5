"""EigenShield on the command line: ``patch-model --shield SITE`` and ``eigenpatch inspect --shield-spectrum SITE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eigenpatch.errors import UsageError


def add_shield_args(p: argparse.ArgumentParser) -> None:
    from eigenpatch.patchers.eigenshield import CANDIDATES, SCORES, EigenShield

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


def build_shield(args: argparse.Namespace) -> Any:
    """The ``eigenshield`` config of ``--shield`` and its flags, or None."""
    if not getattr(args, "shield", None):
        return None
    from eigenpatch.patchers import EigenShield

    return EigenShield(
        site=args.shield,
        mode=args.shield_mode,
        quantile=args.shield_quantile,
        score=args.shield_score,
        candidates=args.shield_candidates,
        seed=args.seed,
    )


def shield_summary(step: dict[str, Any]) -> str:
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
    from eigenpatch.interventions import decoder_layers
    from eigenpatch.patchers.eigenshield import EigenShield, fit_subspace
    from eigenpatch.patchers.shield_stats import collect_site_stats, parse_site
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
        from eigenpatch.spectra import plot_shield_spectrum

        path = plot_shield_spectrum(sub, args.plot, f"{folder.name} @{config.site}")
        print(f"wrote {path}")
    return 0
