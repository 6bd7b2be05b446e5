"""Command line: ``patch-model`` (the main job) and ``eigenpatch {patch,eval,inspect,export,serve,...}``.

Every command refuses bad input with one line and exit code 2 before doing any work, writes its
output atomically, and never touches its input. The core commands name no transform: the flags of
``patch``, the views of ``inspect`` and the rooms' own commands come from each
room's registered :class:`~eigenpatch.cli.pieces.CliPiece`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from eigenpatch.errors import EXIT_USAGE, UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; users asked for one line naming the fix."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    from eigenpatch.cli.commands import add_eval_command, add_inspect_command
    from eigenpatch.cli.export import add_export_commands
    from eigenpatch.cli.patch import add_patch_args, patch_examples, run_patch
    from eigenpatch.cli.pieces import pieces
    from eigenpatch.cli.serve import add_serve_command

    parser = OneLineParser(prog="eigenpatch", description="Spectral surgery for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "patch",
        help="rewrite a model with spectral surgery and save a patched checkpoint (same as patch-model)",
        epilog=patch_examples(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_patch_args(p)
    p.set_defaults(run=run_patch)
    add_eval_command(sub)
    add_inspect_command(sub)
    add_export_commands(sub)
    add_serve_command(sub)
    for piece in pieces():
        piece.add_commands(sub)
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
        return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``eigenpatch COMMAND ...``"""
    return _run(_build_parser(), argv)


def patch_model_main(argv: Sequence[str] | None = None) -> int:
    """``patch-model``: the main job, same options as ``eigenpatch patch``."""
    from eigenpatch.cli.patch import add_patch_args, patch_examples, run_patch

    parser = OneLineParser(
        prog="patch-model",
        description="Rewrite a Hugging Face model with spectral surgery (the transforms below, in this order) and "
        "save a checkpoint that transformers loads after `import eigenpatch`, vLLM serves and ONNX exports.",
        epilog=patch_examples(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_patch_args(parser)
    parser.set_defaults(run=run_patch)
    return _run(parser, argv)
