"""What every bench does at the end: stamp the machine and write its JSON under bench/results/."""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, str]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def write_result(path: Path, result: dict[str, Any]) -> None:
    """``result`` plus the machine, as indented JSON at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each phase reports its own peak."""
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then spans earlier phases
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """This process's current resident memory (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
