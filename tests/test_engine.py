"""The engine runs every layer-by-layer transform of a recipe in shared passes, with one run state.

A second, test-only transform (``_Scale``) joins the low-rank one: it declares its own statistics
(output Fisher and the dense input Gram of ``down_proj``), plans a factor per layer from them, and
scales ``down_proj`` in the fit. The tests check that both share one Fisher, one scoring and one
fit pass (each layer loaded once per pass), that within a layer they run in recipe order, that the
run keeps one state folder, and that a run killed after layer 1 resumes to the very same tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import TINY_VOCAB, killed_after_layer, make_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from eigenpatch import recipe as recipe_module
from eigenpatch.engine import Calibration, LayerStats, LayerStep, LayerTransform, Needs, Plan
from eigenpatch.engine.shards import CheckpointLayers
from eigenpatch.engine.state import RunState
from eigenpatch.errors import UsageError
from eigenpatch.format.lowrank import LowRankLinear
from eigenpatch.out_of_core import patch_checkpoint
from eigenpatch.patchers import LowRank
from eigenpatch.recipe import TransformConfig, TransformResult, register_layer_transform, register_transform

CPU, FP32 = torch.device("cpu"), torch.float32
WINDOWS, SEQ_LEN, SEED = 8, 64, 0


class _Tokens:
    """A tokenizer stand-in for random calibration ids (plumbing: the engine only sees token ids)."""

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        gen = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(0, TINY_VOCAB, (2048,), generator=gen).tolist()}

    def save_pretrained(self, folder: object) -> None:
        """Nothing to save: the stand-in has no files."""


#: What the test transform saw, in order: ("score" | "fit", layer index, ...).
SEEN: list[tuple[Any, ...]] = []


@dataclass
class _Scale(TransformConfig):
    """Test only: scale each layer's ``down_proj`` by a factor planned from its Fisher and input Gram."""

    name: ClassVar[str] = "test_scale"
    out_of_core: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    calib_windows: int = WINDOWS
    score_windows: int | None = 2


class _ScaleLayers(LayerTransform):
    name = "scale"
    module = "mlp.down_proj"

    def __init__(self, model: torch.nn.Module, config: _Scale, context: Any) -> None:
        self.layers = len(model.model.layers)
        self.config = config
        self.scores: dict[int, float] = {}
        self.factors: list[float] | None = None

    def needs(self) -> Needs:
        every = {i: [self.module] for i in range(self.layers)}
        return Needs(
            Calibration(self.config.calib_windows, SEQ_LEN, SEED),
            output_fisher=every,
            fisher_windows=2,
            dense_grams=every,
            score_windows=self.config.score_windows,
            scores=True,
        )

    @property
    def planned(self) -> bool:
        return self.factors is not None

    def score(self, step: LayerStep, stats: LayerStats) -> None:
        fisher = stats.fisher[step.prefix + self.module]
        self.scores[step.index] = float(stats.gram(self.module).trace()) * float(fisher.sum())
        SEEN.append(("score", step.index))

    def plan(self) -> Plan:
        top = max(self.scores.values())
        self.factors = [0.5 + 0.5 * self.scores[i] / top for i in range(self.layers)]
        return Plan({"factors": self.factors})

    def restore(self, plan: Plan) -> None:
        self.factors = plan.meta["factors"]

    def fit(self, step: LayerStep) -> float:
        assert self.factors is not None
        attention = [type(m).__name__ for n, m in step.layer.named_modules() if n.startswith("self_attn.")]
        SEEN.append(("fit", step.index, LowRankLinear.__name__ in attention))
        with torch.no_grad():
            step.layer.get_submodule(self.module).weight.mul_(self.factors[step.index])
        return self.factors[step.index]

    def details(self, records: list[Any]) -> dict[str, Any]:
        return {"factors": records}


@pytest.fixture
def scale_transform():
    """Register the test transform for one test only (the registry's contract tests must not see it)."""
    register_transform(_Scale)(lambda model, config, context: TransformResult())
    register_layer_transform(_Scale)(_ScaleLayers)
    SEEN.clear()
    yield
    recipe_module._REGISTRY.pop(_Scale.name)
    recipe_module._LAYER_FACTORIES.pop(_Scale.name)


def _lowrank(allocator: str = "loss") -> LowRank:
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    return LowRank(
        ratio=0.5, allocator=allocator, factorizer="fwhiten", targets=attention, sequential=True, refine_steps=2,
        calib_windows=WINDOWS, calib_seq_len=SEQ_LEN, fisher_windows=2, seed=SEED,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("engine") / "tiny4"
    config = make_tiny("llama").config
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _run(folder: Path, out: Path, state: Path, scale: _Scale | None = None, allocator: str = "loss") -> dict[str, Any]:
    report, _ = patch_checkpoint(
        folder, [_lowrank(allocator), scale or _Scale()], out, state_dir=state, device=CPU, dtype=FP32,
        tokenizer=_Tokens(), calib_text="x", show_progress=False,
    )  # fmt: skip
    return report


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("score_windows", [2, None])
def test_two_transforms_share_each_pass_and_run_in_recipe_order(
    tiny4, tmp_path, monkeypatch, scale_transform, score_windows
):
    """Both read the Fisher. When every scorer scores on the Fisher's windows, scoring happens inside
    the Fisher's backward walk (three passes; low-rank with uniform ranks scores nothing); when one
    scores on all windows (low-rank's ``loss`` ranks do), the scoring gets a pass of its own (four)."""
    loads: list[int] = []
    monkeypatch.setattr(
        CheckpointLayers, "load", lambda self, i, f=CheckpointLayers.load: loads.append(i) or f(self, i)
    )
    states: list[list[str]] = []

    def save_streams(self, *args, f=RunState.save_streams, **kwargs):
        f(self, *args, **kwargs)
        states.append(sorted(p.name for p in self.folder.parent.iterdir()))
        states.append(sorted(p.name for p in self.folder.iterdir()))

    monkeypatch.setattr(RunState, "save_streams", save_streams)
    allocator = "uniform" if score_windows else "loss"
    report = _run(tiny4, tmp_path / "out", tmp_path / "state", _Scale(score_windows=score_windows), allocator)
    layers = list(range(4))
    # one Fisher pass (forward, then backward), a scoring pass if it cannot join it, one fit pass:
    # each layer once per pass
    if score_windows is None:
        assert loads == layers + layers[::-1] + layers + layers
        assert list(report["engine"]["passes"]) == ["fisher", "scores", "fit"]
        scored = layers
    else:
        assert loads == layers + layers[::-1] + layers
        assert list(report["engine"]["passes"]) == ["fisher + scores", "fit"]
        scored = layers[::-1]
    assert [s[:2] for s in SEEN] == [("score", i) for i in scored] + [("fit", i) for i in layers]
    assert all(s[2] for s in SEEN if s[0] == "fit")  # low-rank fitted each layer before the scale saw it
    # one run state: one folder beside the output, one run key, one resume point, both plans in it
    assert all(s == ["state"] for s in states[0::2])
    assert {"run.json", "progress.json", f"plan-0-{allocator}+fwhiten.json", "plan-1-scale.json"} <= set(states[1])
    assert not (tmp_path / "state").exists()  # a finished run leaves nothing to resume
    factors = report["steps"][1]["factors"]
    assert len(factors) == 4 and min(factors) < max(factors) == 1.0
    assert report["steps"][0]["factorized"] > 0


def test_a_run_of_two_transforms_killed_after_layer_1_resumes_to_the_same_tensors(
    tiny4, tmp_path, monkeypatch, scale_transform
):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two runs compared bit for bit: one BLAS summation order
    try:
        _run(tiny4, tmp_path / "reference", tmp_path / "state-ref")
        out, state = tmp_path / "out", tmp_path / "state"
        with killed_after_layer(monkeypatch, 2):
            _run(tiny4, out, state)
        assert not out.exists() and json.loads((state / "progress.json").read_text())["next"] == 2
        SEEN.clear()
        report = _run(tiny4, out, state)
    finally:
        torch.set_num_threads(threads)
    assert report["engine"]["resumed_at_layer"] == 2
    assert SEEN == [("fit", 2, True), ("fit", 3, True)]  # plans restored: no scoring again
    assert set(report["engine"]["passes"]) == {"fit"}
    reference, resumed = _stored(tmp_path / "reference"), _stored(out)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def test_transforms_asking_for_different_windows_are_refused_in_one_line(tiny4, tmp_path, scale_transform):
    with pytest.raises(UsageError, match="share its calibration windows"):
        patch_checkpoint(
            tiny4, [_lowrank(), _Scale(calib_windows=4)], tmp_path / "out", state_dir=tmp_path / "state",
            device=CPU, dtype=FP32, tokenizer=_Tokens(), calib_text="x", show_progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()
