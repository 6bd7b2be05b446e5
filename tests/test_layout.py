"""The layout's promises, enforced: runtimes read the format only, the core names no transform,
every format constant matches the modules that carry it, and every registered transform has a room."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eigenpatch import format as fmt
from eigenpatch.recipe import registered

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("runtime", ["serving", "export"])
def test_runtimes_never_import_the_transforms(runtime):
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / runtime).rglob("*.py"))
        for name in _imports(path)
        if name.startswith("eigenpatch.patchers") or name == "patchers"
    }
    assert not offenders


def test_importing_the_runtimes_and_the_core_loads_no_transform():
    """Not only no direct import: nothing they import pulls a transform in (checked in a fresh process)."""
    code = (
        "import sys, eigenpatch, eigenpatch.format.checkpoint, eigenpatch.format.steering, eigenpatch.cli.patch, "
        "eigenpatch.export.onnx, eigenpatch.export.runtime, eigenpatch.serving.launcher, eigenpatch.serving.sharding; "
        "print(sorted(m for m in sys.modules if m.startswith('eigenpatch.patchers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


#: Core modules that must not name a transform: they build everything from the registry.
CORE = [
    "eigenpatch/recipe.py",
    *(f"eigenpatch/cli/{n}.py" for n in ("__init__", "patch", "pieces", "summary", "commands")),
]


@pytest.mark.parametrize("path", CORE)
def test_the_core_names_no_transform(path):
    words = {name for name in registered()} | {cls.__name__ for cls, _ in registered().values()}
    words |= {"shield", "steer", "sts", "compress", "structured", "ffn"}  # their flags and commands, too
    text = (ROOT / path).read_text().lower()
    found = sorted(w for w in words if re.search(rf"(?<![\w-]){re.escape(w.lower())}(?![\w])", text))
    assert not found, f"{path} names {found}"


def test_every_registered_transform_lives_in_a_room_with_its_four_parts():
    for name, (config_cls, handler) in registered().items():
        room = config_cls.__module__.rsplit(".", 1)[0]
        assert room.startswith("eigenpatch.patchers."), name
        assert handler.__module__.startswith(room), f"{name}: handler outside its room"
        folder = ROOT / "patchers" / room.split(".")[2]
        assert {"config.py", "transform.py", "cli.py"} <= {p.name for p in folder.iterdir()}, name


def test_format_constants_match_the_stored_modules():
    from eigenpatch.format.corrected import CorrectedQuantizedLinear
    from eigenpatch.format.interventions import INTERVENTION_CLASSES
    from eigenpatch.format.lowrank import LowRankLinear
    from eigenpatch.format.quantized import QuantizedLinear, QuantizedLowRankLinear
    from eigenpatch.format.structured import STRUCTURED_CLASSES, BlockDenseLinear, BlockShuffleLinear

    assert set(STRUCTURED_CLASSES) == set(fmt.STRUCTURED_KINDS)
    assert set(INTERVENTION_CLASSES) == set(fmt.INTERVENTION_KINDS)
    assert set(fmt.TENSORS) == set(fmt.LAYER_KINDS) | set(fmt.INTERVENTION_KINDS)
    modules = {
        fmt.LOWRANK: LowRankLinear(8, 8, 2),
        fmt.LOWRANK_SHARED: STRUCTURED_CLASSES[fmt.LOWRANK_SHARED](8, 8, 2),
        fmt.BLOCKDENSE: BlockDenseLinear(8, 8, 4, 2),
        fmt.BLOCKSHUFFLE: BlockShuffleLinear(8, 8, 1, 2),
        fmt.PROJECT: INTERVENTION_CLASSES[fmt.PROJECT](8, 2),
        fmt.SHIFT: INTERVENTION_CLASSES[fmt.SHIFT](8),
        fmt.QUANTIZED: QuantizedLinear(32, 8, 4, 32),
        fmt.LOWRANK_QUANTIZED: QuantizedLowRankLinear(64, 32, 32, 4, 32),
        fmt.QUANTIZED_CORRECTED: CorrectedQuantizedLinear(64, 32, 8, 4, 32),
    }
    for kind, module in modules.items():
        assert tuple(name for name, _ in module.named_parameters()) == fmt.TENSORS[kind], kind


ENGINE = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "eigenpatch" / "engine").glob("*.py"))


@pytest.mark.parametrize("path", ENGINE)
def test_the_engine_names_no_transform(path):
    """The engine serves any layer-by-layer transform: it names none of them, nor their rooms' words."""
    words = {name for name in registered()} | {cls.__name__ for cls, _ in registered().values()}
    words |= {"lowrank", "factor", "rank", "quantize", "gptq", "shield", "steer"}
    text = (ROOT / path).read_text().lower()
    found = sorted(w for w in words if re.search(rf"(?<![\w-]){re.escape(w.lower())}(?![\w])", text))
    assert not found, f"{path} names {found}"
    assert not any(name.startswith("eigenpatch.patchers") for name in _imports(ROOT / path)), path


def test_rooms_reach_the_engine_only_through_its_step_api():
    """A room imports ``from eigenpatch.engine import <name in __all__>``, never an engine module."""
    import eigenpatch.engine as engine

    offenders = []
    for path in sorted((ROOT / "patchers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eigenpatch.engine"):
                names = {a.name for a in node.names}
                if node.module != "eigenpatch.engine" or not names <= set(engine.__all__):
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import {sorted(names)}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("eigenpatch.engine") for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}: import {[a.name for a in node.names]}")
    assert not offenders
    assert any("eigenpatch.engine" in _imports(p) for p in (ROOT / "patchers").rglob("*.py"))  # the check has teeth
