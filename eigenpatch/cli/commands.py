"""``eigenpatch eval`` (perplexity beside the base model) and ``eigenpatch inspect`` (the rooms' views)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def run_eval(args: argparse.Namespace) -> int:
    from eigenpatch.cli.patch import eval_ids, perplexity
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
        ids = eval_ids(args, tokenizer)
        results[label] = {
            "ref": str(ref),
            "params": count_parameters(model),
            **perplexity(model, ids, args, f"ppl ({label})"),
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


def add_eval_command(sub: Any) -> None:
    from eigenpatch.cli.patch import add_eval_args, add_model_args

    e = sub.add_parser("eval", help="perplexity and size of a (patched) model, side by side with its base")
    e.add_argument("model", help="model folder (patched or not), zoo name or hub id")
    e.add_argument("--base", help="base model to compare with (default: the one a patched checkpoint names)")
    e.add_argument("--no-base", action="store_true", help="evaluate only MODEL")
    e.add_argument("--json", help="also write the results to this JSON file")
    add_model_args(e)
    add_eval_args(e)
    e.set_defaults(run=run_eval)


def run_inspect(args: argparse.Namespace) -> int:
    """Load the model once, then the first piece whose flags asked for its view shows it; the
    default view (no such flag) goes last."""
    from eigenpatch.cli.pieces import pieces
    from eigenpatch.hf_io import load_model, parse_dtype

    model, tokenizer, folder = load_model(args.model, parse_dtype(args.dtype), args.trust_remote_code)
    for piece in sorted(pieces(), key=lambda p: p.inspects_by_default):
        code = piece.inspect(args, model, tokenizer, folder)
        if code is not None:
            return code
    raise AssertionError("no registered piece shows a default inspect view")


def add_inspect_command(sub: Any) -> None:
    from eigenpatch.cli.patch import add_model_args
    from eigenpatch.cli.pieces import pieces
    from eigenpatch.zoo import DEFAULT_MODEL

    i = sub.add_parser("inspect", help="singular-value spectra of each matrix and the ranks a ratio would pick")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model folder, zoo name or hub id")
    i.add_argument("--plot", metavar="FILE.png", help="also draw the view")
    i.add_argument("--calib", default="wiki", help="calibration text for views that read text (%(default)s)")
    for piece in pieces():
        piece.add_inspect_arguments(i)
    add_model_args(i)
    i.set_defaults(run=run_inspect)
