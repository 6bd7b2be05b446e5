"""Atomic output folders: write into a temporary sibling, rename into place only on success."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eigenpatch.errors import UsageError


@contextmanager
def atomic_output_dir(output: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``output`` when the block succeeds.

    On any exception the temporary folder is removed and ``output`` is untouched, so a failed
    or interrupted run never leaves a half-written result. An existing ``output`` is refused
    unless ``force``.
    """
    out = Path(output).resolve()
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; choose another -o/--output or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_output_file(output: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``output``'s folder that is renamed to ``output`` on success."""
    out = Path(output).resolve()
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; choose another -o/--output or pass --force to replace it")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
