"""Atomic outputs: write into a temporary sibling, rename into place only on success.

The temporary sibling is named ``.{name}.partial-{pid}-{random}``: hidden, obviously unfinished,
and owned by a process id. A run killed hard (SIGKILL, power loss) cannot clean up after itself,
so the next run writing the same output removes every leftover whose process is gone.

Files get the modes ``save_pretrained`` would give them (``0666`` and directories ``0777``, less
the umask): ``mkstemp``/``mkdtemp`` make them private, and a rename keeps the mode, so without
this a server or container running as another user could not read the weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eigenpatch.errors import UsageError

PARTIAL = ".partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _partial_prefix(out: Path) -> str:
    return f".{out.name}{PARTIAL}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete the leftovers of killed runs that wrote ``out`` (their process is gone); returns them."""
    removed = []
    prefix = _partial_prefix(out)
    for path in out.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def publish_modes(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes a plain write would: 0666 / 0777 less the umask."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _prepare(output: str | os.PathLike, force: bool) -> Path:
    out = Path(output).resolve()
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; choose another -o/--output or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    return out


@contextmanager
def atomic_output_dir(output: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``output`` when the block succeeds.

    On any exception the temporary folder is removed and ``output`` is untouched, so a failed
    or interrupted run never leaves a half-written result. An existing ``output`` is refused
    unless ``force``.
    """
    out = _prepare(output, force)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        publish_modes(tmp)
        if out.exists():
            old = out.with_name(f"{_partial_prefix(out)}{os.getpid()}-old")
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
    if Path(output).resolve().is_dir():
        raise UsageError(f"output {Path(output).resolve()} is a folder; give a file name")
    out = _prepare(output, force)
    fd, name = tempfile.mkstemp(prefix=f"{_partial_prefix(out)}{os.getpid()}-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish_modes(tmp)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
