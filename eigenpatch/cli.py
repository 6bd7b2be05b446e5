"""Command line: ``patch-model`` (the main job) and ``eigenpatch {patch,eval,inspect}``.

Every command refuses bad input with one line and exit code 2 before doing any work, writes its
output atomically, and never touches its input.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from eigenpatch.errors import EXIT_USAGE, UsageError

#: What ``--compress`` uses unless ``--method`` says otherwise.
DEFAULT_METHOD = "loss+fwhiten"

PATCH_EXAMPLES = """\
examples:
  patch-model --compress 0.5                       # SmolLM2-135M (built offline), half the decoder Linears
  patch-model ./my-llama --compress 0.3 -o out/    # any local HF folder, calibrated on the wiki text
  patch-model --compress 0.4 --method welore+whiten --calib my_corpus.txt --eval
  patch-model --compress 0.5 --method svd          # data-free baseline (fast, and much worse)
  patch-model --compress 0.5 --heal 300            # then distil into the factor pairs (resumable if interrupted)
  patch-model --structured-ffn blockdense --ffn-ratio 0.3   # structured feed-forward blocks, pre-merged for decode
  patch-model --steer sentiment.safetensors --strength 4    # bake a steering vector (eigenpatch steer build)
  python -c "import eigenpatch, transformers; transformers.AutoModelForCausalLM.from_pretrained('out/')"
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; users asked for one line naming the fix."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ratio(text: str) -> float:
    from eigenpatch.patchers.ranks import check_ratio

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; e.g. --compress 0.5") from None
    try:
        return check_ratio(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="dtype to load and compute in (default: float32)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow architectures with custom code (off by default)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from eigenpatch.evaluate import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN

    p.add_argument("--text", default="wiki", help="eval text: wiki (held-out articles), wiki:calib, or a .txt file")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="score the first N tokens")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="window length (non-overlapping)")


def add_patch_args(p: argparse.ArgumentParser) -> None:
    from eigenpatch.calibration import DEFAULT_FISHER_WINDOWS, DEFAULT_SEED, DEFAULT_WINDOWS
    from eigenpatch.calibration import DEFAULT_SEQ_LEN as CALIB_SEQ_LEN
    from eigenpatch.patchers.targets import DEFAULT_TARGETS
    from eigenpatch.zoo import DEFAULT_MODEL, MODELS

    zoo = ", ".join(MODELS)
    p.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"HF folder, zoo name ({zoo}) or hub id (default: %(default)s)"
    )
    p.add_argument(
        "--compress",
        type=_ratio,
        metavar="R",
        help="fraction of targeted Linear params to remove (low-rank factor pairs)",
    )
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help="ALLOCATOR+FACTORIZER: allocator uniform|welore|loss, factorizer svd|fwsvd|whiten|fwhiten; "
        "'svd' = uniform+svd (data-free). Default: %(default)s",
    )
    p.add_argument(
        "--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME", help="Linear names to compress"
    )
    p.add_argument("-o", "--output", help="output folder (default: ./patched/<model>-<method>-c<R>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    p.add_argument("--calib", default="wiki", help="calibration text: wiki (its calib split) or a .txt file")
    p.add_argument("--calib-windows", type=int, default=DEFAULT_WINDOWS, help="calibration windows (%(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=CALIB_SEQ_LEN, help="tokens per window (%(default)s)")
    p.add_argument(
        "--fisher-windows",
        type=int,
        default=DEFAULT_FISHER_WINDOWS,
        help="windows for gradient statistics (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="calibration sampling seed (%(default)s)")
    from eigenpatch.patchers.heal import Heal
    from eigenpatch.patchers.structured_ffn import STRUCTURES, StructuredFFN

    f = p.add_argument_group("structured feed-forward blocks (instead of, or with, --compress on attention)")
    f.add_argument(
        "--structured-ffn",
        choices=STRUCTURES,
        help="lowrank: gate/up share one input factor; blockdense / blockshuffle: block-diagonal stages",
    )
    f.add_argument(
        "--ffn-ratio",
        type=_ratio,
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
    h = p.add_argument_group("healing (train only the factor pairs after compression)")
    h.add_argument("--heal", type=int, default=0, metavar="STEPS", help="healing steps (default 0: none)")
    h.add_argument("--heal-loss", choices=["kd", "lm"], default="kd", help="kd: distil the original model (default)")
    h.add_argument("--heal-lr", type=float, default=Heal.lr, help="peak AdamW learning rate (%(default)s)")
    h.add_argument("--heal-batch", type=int, default=Heal.batch_size, help="windows per step (%(default)s)")
    h.add_argument("--heal-seq-len", type=int, default=Heal.seq_len, help="tokens per window (%(default)s)")
    h.add_argument("--heal-grad-accum", type=int, default=Heal.grad_accum, help="micro-batches per step (%(default)s)")
    from eigenpatch.cli_shield import add_shield_args
    from eigenpatch.cli_steer import add_steer_args

    add_shield_args(p)
    add_steer_args(p)
    _add_model_args(p)
    _add_eval_args(p)


def _default_output(args: argparse.Namespace) -> Path:
    name = Path(args.model).name or "model"
    if args.structured_ffn:
        name += f"-ffn-{args.structured_ffn}-f{args.ffn_ratio:g}"
    if args.compress is not None:
        name += f"-{args.method.replace('+', '-')}-c{args.compress:g}"
    if getattr(args, "shield", None):
        name += f"-shield-{args.shield.replace(':', '')}"
    if getattr(args, "steer", None):
        name += f"-steer{args.strength:g}"
    return Path("patched") / (f"{name}-heal{args.heal}" if args.heal else name)


def build_heal(args: argparse.Namespace) -> Any:
    """The ``heal`` config of ``--heal STEPS`` and its flags, or None."""
    if not args.heal:
        return None
    from eigenpatch.patchers import Heal

    return Heal(
        steps=args.heal,
        loss=args.heal_loss,
        lr=args.heal_lr,
        batch_size=args.heal_batch,
        seq_len=args.heal_seq_len,
        grad_accum=args.heal_grad_accum,
        seed=args.seed,
    )


def build_structured_ffn(args: argparse.Namespace) -> Any:
    """The ``structured_ffn`` config of ``--structured-ffn`` and its flags, or None."""
    if not args.structured_ffn:
        return None
    from eigenpatch.patchers import StructuredFFN

    return StructuredFFN(
        structure=args.structured_ffn,
        ratio=args.ffn_ratio,
        blocks=args.ffn_blocks,
        calib_seq_len=args.calib_seq_len,
        seed=args.seed,
        premerge=args.premerge,
    )


def _compression_targets(args: argparse.Namespace) -> tuple[str, ...]:
    """``--targets``; with ``--structured-ffn`` the FFN Linears are already taken."""
    from eigenpatch.patchers.targets import DEFAULT_TARGETS

    if not args.structured_ffn:
        return tuple(args.targets)
    ffn = {"gate_proj", "up_proj", "down_proj"}
    if list(args.targets) == list(DEFAULT_TARGETS):
        return tuple(t for t in args.targets if t not in ffn)
    taken = sorted(ffn & set(args.targets))
    if taken:
        raise UsageError(f"--structured-ffn already replaces {', '.join(taken)}; drop them from --targets")
    return tuple(args.targets)


def build_compression(args: argparse.Namespace) -> Any:
    """The transform config ``--method`` / ``--compress`` / calibration flags describe (None without --compress)."""
    from eigenpatch.patchers import SVD, LowRank, parse_method

    if args.compress is None:
        return None
    parts = parse_method(args.method)
    common = {"ratio": args.compress, "targets": _compression_targets(args)}
    if args.method == "svd":
        return SVD(**common)
    return LowRank(
        **common,
        **parts,
        calib_windows=args.calib_windows,
        calib_seq_len=args.calib_seq_len,
        fisher_windows=args.fisher_windows,
        seed=args.seed,
    )


def run_patch(args: argparse.Namespace) -> int:
    import eigenpatch
    from eigenpatch.checkpoint import weights_bytes
    from eigenpatch.cli_shield import build_shield
    from eigenpatch.cli_steer import build_steer
    from eigenpatch.hf_io import load_model, parse_dtype
    from eigenpatch.zoo import resolve_text

    if args.compress is None and not args.structured_ffn and not args.shield and not args.steer:
        raise UsageError("nothing to do: give --compress R, --structured-ffn KIND, --shield SITE and/or --steer FILE")
    heal = build_heal(args)
    stages = (build_structured_ffn(args), build_compression(args), heal, build_shield(args), build_steer(args))
    recipe = [c for c in stages if c is not None]
    needs_data = any(c.needs_data for c in recipe)
    output = Path(args.output) if args.output else _default_output(args)
    if output.exists() and not args.force:
        raise UsageError(f"output {output} already exists; choose another -o/--output or pass --force to replace it")
    calib_text = resolve_text(args.calib, split="calib") if needs_data else None
    dtype = parse_dtype(args.dtype)
    start = time.perf_counter()
    model, tokenizer, folder = load_model(args.model, dtype, args.trust_remote_code)
    if folder.resolve() == output.resolve():
        raise UsageError("output folder is the input folder; eigenpatch never modifies its input — pick another -o")
    if needs_data and tokenizer is None:
        raise UsageError(
            "calibration (--method, --structured-ffn, --heal, --shield) needs text, but the model has no tokenizer"
        )
    evals: dict[str, Any] = {}
    ids = _eval_ids(args, tokenizer) if args.eval else None
    if ids is not None:
        evals["before"] = _ppl(model, ids, args, "ppl (base)")
    state_dir = output.parent / f".{output.name}.heal-state"  # an interrupted --heal resumes from here
    report = eigenpatch.patch(
        model,
        recipe,
        tokenizer=tokenizer,
        calib_text=calib_text,
        base_model=args.model,
        show_progress=not args.quiet,
        state_dir=state_dir if heal is not None else None,
    )
    if ids is not None:
        evals["after"] = _ppl(model, ids, args, "ppl (patched)")
        report["perplexity"] = evals
    report["input_weights_bytes"] = weights_bytes(folder)
    report["seconds"] = round(time.perf_counter() - start, 2)
    out = eigenpatch.save(model, output, tokenizer=tokenizer, report=report, force=args.force)
    shutil.rmtree(state_dir, ignore_errors=True)  # the run finished: nothing left to resume
    report["weights_bytes"] = weights_bytes(out)
    from eigenpatch.cli_summary import summarize_patch

    print(summarize_patch(report, out))
    return 0


def _eval_ids(args: argparse.Namespace, tokenizer: Any) -> Any:
    from eigenpatch.evaluate import tokenize
    from eigenpatch.zoo import resolve_text

    if tokenizer is None:
        raise UsageError("perplexity needs a tokenizer and the model folder has none; add tokenizer files")
    if args.max_tokens < 2 or args.seq_len < 2:
        raise UsageError("--max-tokens and --seq-len must be at least 2")
    try:
        return tokenize(tokenizer, resolve_text(args.text, split="eval"), args.max_tokens)
    except ValueError as exc:
        raise UsageError(f"{exc}; pass a text file with content") from None


def _ppl(model: Any, ids: Any, args: argparse.Namespace, desc: str) -> dict[str, Any]:
    from eigenpatch.evaluate import perplexity

    return perplexity(model, ids, seq_len=args.seq_len, show_progress=not args.quiet, desc=desc).as_dict()


def run_eval(args: argparse.Namespace) -> int:
    from eigenpatch.hf_io import is_patched, load_model, parse_dtype
    from eigenpatch.recipe import count_parameters
    from eigenpatch.table import fmt_count, fmt_float, format_table
    from eigenpatch.zoo import resolve_model

    dtype = parse_dtype(args.dtype)
    folder = resolve_model(args.model)
    base_ref = args.base
    if base_ref is None and not args.no_base and is_patched(folder):
        base_ref = json.loads((folder / "config.json").read_text())["quantization_config"].get("base_model")
    results = {}
    for label, ref in (("model", args.model), ("base", None if args.no_base else base_ref)):
        if ref is None:
            continue
        model, tokenizer, _ = load_model(ref, dtype, args.trust_remote_code)
        ids = _eval_ids(args, tokenizer)
        results[label] = {
            "ref": str(ref),
            "params": count_parameters(model),
            **_ppl(model, ids, args, f"ppl ({label})"),
        }
        del model
    rows = [
        [f"{label}: {r['ref']}", fmt_count(r["params"]), fmt_float(r["ppl"]), fmt_count(r["scored_tokens"])]
        for label, r in sorted(results.items())
    ]
    print(format_table(["", "params", "perplexity", "scored tokens"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from eigenpatch.hf_io import load_model, parse_dtype
    from eigenpatch.spectra import collect_spectra, plot_spectra
    from eigenpatch.table import format_table

    model, tokenizer, folder = load_model(args.model, parse_dtype(args.dtype), args.trust_remote_code)
    if args.shield_spectrum:
        from eigenpatch.cli_shield import run_shield_spectrum

        return run_shield_spectrum(args, model, tokenizer, folder)
    spectra = collect_spectra(model, args.compress, tuple(args.targets), args.allocator, show_progress=not args.quiet)
    rows = [
        [s.name, f"{s.shape[1]}->{s.shape[0]}", s.break_even, s.rank or "dense", f"{s.energy_kept:.3f}"]
        for s in spectra
    ]
    print(format_table(["matrix", "in->out", "break-even", f"rank @{args.compress:g}", "energy kept"], rows))
    if args.plot:
        path = plot_spectra(
            spectra, args.plot, f"{folder.name}, {args.allocator} ranks at --compress {args.compress:g}"
        )
        print(f"wrote {path}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    from eigenpatch.patchers.targets import DEFAULT_TARGETS

    parser = OneLineParser(prog="eigenpatch", description="Spectral surgery for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "patch",
        help="compress a model and save a patched checkpoint",
        epilog=PATCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_patch_args(p)
    p.set_defaults(run=run_patch)
    e = sub.add_parser("eval", help="perplexity and size of a (patched) model, side by side with its base")
    e.add_argument("model", help="model folder (patched or not), zoo name or hub id")
    e.add_argument("--base", help="base model to compare with (default: the one a patched checkpoint names)")
    e.add_argument("--no-base", action="store_true", help="evaluate only MODEL")
    e.add_argument("--json", help="also write the results to this JSON file")
    _add_model_args(e)
    _add_eval_args(e)
    e.set_defaults(run=run_eval)
    i = sub.add_parser("inspect", help="singular-value spectra of each matrix and the ranks a ratio would pick")
    i.add_argument("model", nargs="?", default="smollm2-135m", help="model folder, zoo name or hub id")
    i.add_argument("--compress", type=_ratio, default=0.5, metavar="R", help="ratio whose ranks to show")
    i.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME")
    i.add_argument("--allocator", default="uniform", choices=["uniform", "welore"], help="data-free rank allocator")
    i.add_argument("--plot", metavar="FILE.png", help="draw the normalized spectra with the chosen ranks")
    i.add_argument(
        "--shield-spectrum",
        metavar="SITE",
        help="instead: EigenShield's eigenvalue spectrum of the hidden states at SITE (embed, layer:L), "
        "with the fitted Marchenko-Pastur bulk and the causal spikes",
    )
    i.add_argument("--calib", default="wiki", help="calibration text for --shield-spectrum (%(default)s)")
    _add_model_args(i)
    i.set_defaults(run=run_inspect)
    from eigenpatch.cli_export import add_export_commands

    add_export_commands(sub)
    from eigenpatch.cli_serve import add_serve_command

    add_serve_command(sub)
    from eigenpatch.cli_steer import add_steer_command
    from eigenpatch.cli_sts import add_sts_command

    add_steer_command(sub)
    add_sts_command(sub)
    return parser


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """``eigenpatch COMMAND ...``"""
    return _run(_build_parser(), argv)


def patch_model_main(argv: Sequence[str] | None = None) -> int:
    """``patch-model``: the main job, same options as ``eigenpatch patch``."""
    parser = OneLineParser(
        prog="patch-model",
        description="Compress a Hugging Face model with spectral surgery and save a checkpoint that "
        "transformers loads after `import eigenpatch`.",
        epilog=PATCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_patch_args(parser)
    parser.set_defaults(run=run_patch)
    return _run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
