"""User-facing errors.

Anything a user can fix (a wrong path, a ratio out of range, a corrupt file) raises
:class:`UsageError`; the CLI prints its one-line message and exits with code 2. Everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

#: Exit code for bad input, as argparse uses it.
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""

    #: the CLI's exit code for this error
    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ServiceError(UsageError):
    """A service that stopped on its own (a vLLM process died): one line, exit code 1."""

    exit_code = 1
