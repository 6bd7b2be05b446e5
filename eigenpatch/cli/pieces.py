"""What a room adds to the command line, and the registry the core CLI iterates.

``patch-model`` knows no transform by name: each room registers a :class:`CliPiece` (its flags,
how a config is built from them, its place in the order of stages, its part of the output name
and its lines in the summary), and may add commands of its own or a view to ``eigenpatch
inspect``. The core builds the parser, the recipe, the output name and the summary by iterating
:func:`pieces` in order.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, ClassVar

from eigenpatch.errors import UsageError
from eigenpatch.recipe import TransformConfig


class CliPiece:
    """One room's piece of the CLI; subclass it in the room's ``cli.py`` and :func:`register_piece` it.

    Override what the room needs; the defaults add nothing. ``order`` places the stage in the
    recipe (lower runs first); ``name_order`` places its part of the default output folder name;
    ``transforms`` are the registry names whose report steps this piece summarizes; ``flag`` is
    how a user turns it on (shown when nothing was asked for).
    """

    order: ClassVar[int] = 100
    name_order: ClassVar[int] = 100
    transforms: ClassVar[tuple[str, ...]] = ()
    flag: ClassVar[str] = ""
    #: Lines for ``patch-model --help``'s examples (a command, then ``# what it does``).
    examples: ClassVar[tuple[str, ...]] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this piece's flags (in an argument group of its own) to ``patch-model``."""

    def build(self, args: argparse.Namespace, earlier: list[TransformConfig]) -> TransformConfig | None:
        """The config the flags ask for, or None when the stage was not asked for. ``earlier``:
        the configs of the stages before this one (to leave the Linears they claim alone)."""
        return None

    def output_name(self, args: argparse.Namespace) -> str:
        """This stage's part of the default output folder name (``""`` when not asked for)."""
        return ""

    def summary_rows(self, step: dict[str, Any]) -> list[list[str]]:
        """Rows ``[what, before, after, after/before]`` of the summary table for one report step."""
        return []

    def summary_lines(self, step: dict[str, Any]) -> list[str]:
        """Lines printed under the summary table for one report step."""
        return []

    def add_commands(self, sub: Any) -> None:
        """Add ``eigenpatch`` sub-commands of the room's own (``sub``: the sub-parsers action)."""

    # -- eigenpatch inspect -------------------------------------------------------------------
    #: Pieces whose view runs when no other piece's inspect flag was given go last.
    inspects_by_default: ClassVar[bool] = False

    def add_inspect_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this piece's flags to ``eigenpatch inspect``."""

    def inspect(self, args: argparse.Namespace, model: Any, tokenizer: Any, folder: Any) -> int | None:
        """Show this piece's view of ``model`` and return an exit code, or None when its flags
        did not ask for it."""
        return None


_PIECES: list[CliPiece] = []


def register_piece(piece: CliPiece) -> CliPiece:
    """Register one room's CLI piece (once; a re-import does not add it twice)."""
    if not any(type(p) is type(piece) for p in _PIECES):
        _PIECES.append(piece)
    return piece


def pieces() -> list[CliPiece]:
    """Every registered piece, in stage order (importing the rooms first)."""
    importlib.import_module("eigenpatch.patchers")
    return sorted(_PIECES, key=lambda s: s.order)


def piece_for(transform: str) -> CliPiece | None:
    """The piece that summarizes report steps of ``transform``."""
    return next((p for p in pieces() if transform in p.transforms), None)


def fraction(flag: str) -> Any:
    """An argparse type: a number strictly inside (0, 1), named after ``flag`` in its error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; e.g. {flag} 0.5") from None
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(f"{flag} {value} is outside (0, 1); e.g. {flag} 0.5 removes half")
        return value

    return parse


def ratio_of(before: float | None, after: float | None) -> str:
    """``after / before`` for the summary table, ``-`` when either is missing."""
    return f"{after / before:.3f}" if before and after is not None else "-"


def needs_text_error(recipe: list[TransformConfig]) -> UsageError:
    """The one-line error for a recipe that needs calibration text on a model without a tokenizer."""
    names = ", ".join(c.name for c in recipe if c.needs_data)
    return UsageError(f"calibration ({names}) needs text, but the model has no tokenizer")
