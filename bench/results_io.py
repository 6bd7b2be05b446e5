"""What every bench does at the end: stamp the machine and write its JSON under bench/results/."""

from __future__ import annotations

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
