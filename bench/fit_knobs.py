"""Where the layer-by-layer fit spends its time, and what its knobs cost in quality, on real SmolLM2.

    python bench/fit_knobs.py --parts                     # seconds of each part of one layer's fit
    python bench/fit_knobs.py --layers 8 --variants 64,1e-4,32 32,2e-4,8

``--parts`` times the pieces a fit layer is made of (layer 3, README command 1's 128 x 512 windows):
whole and partial forwards, input Grams, decompositions, refinement steps.

``--variants STEPS,LR,ERROR_BATCHES[,bf16] ...`` plans once on the whole model (R = 0.5, ``loss+fwhiten``,
the engine's Fisher pass with its scores), then for each variant fits only the first ``--layers``
layers (the rest stay dense) with that many refinement steps, that learning rate, and the
refinement's before / after error on that many batches (``bf16``: the whole fit under CPU bf16
autocast, every forward and the refinement's backward; Grams and decompositions stay fp32 / fp64),
and reports the fit's seconds per layer and the whole model's perplexity on both eval texts. A
proxy: an 8-layer fit takes minutes where the whole model takes half an hour, and a knob that hurts
8 layers hurts 30. The dense model is
in the same table. Writes ``bench/results/fit_knobs.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from results_io import RESULTS, write_result

import eigenpatch.patchers.lowrank.propagate as propagate
from eigenpatch.calibration import calibration_windows
from eigenpatch.engine.passes import plan_transforms, run_layers
from eigenpatch.engine.shards import LayerSource
from eigenpatch.engine.state import Plan
from eigenpatch.engine.stats import Gram
from eigenpatch.engine.streams import call_layer, capture_input, record_batches
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import LowRank
from eigenpatch.patchers.lowrank.factorize import scaled_spectrum, whitening
from eigenpatch.patchers.lowrank.layers import LowRankLayers
from eigenpatch.recipe import PatchContext
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text

MODEL = "smollm2-135m"


def seconds(f, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats


def parts(windows: torch.Tensor) -> dict[str, float]:
    model, _, _ = load_model(MODEL)
    hidden, kwargs_of = record_batches(model, windows, 4)
    layer, kws = model.model.layers[3], [k[3] for k in kwargs_of]
    pairs = list(zip(hidden, kws, strict=True))
    out = {
        "layer forward, all windows": seconds(lambda: [call_layer(layer, h, k) for h, k in pairs]),
        "partial forward to o_proj's input": seconds(
            lambda: [capture_input(layer, "self_attn.o_proj", h, k) for h, k in pairs]
        ),
        "partial forward to down_proj's input": seconds(
            lambda: [capture_input(layer, "mlp.down_proj", h, k) for h, k in pairs]
        ),
    }
    grams = {}
    for width in (576, 1536):
        xs = [torch.randn(len(h), h.shape[1], width) for h in hidden]

        def accumulate(xs=xs, width=width) -> None:
            g = Gram()
            for x in xs:
                g.add(x)
            grams[width] = g.value

        out[f"input Gram {width}, all windows"] = seconds(accumulate)
        out[f"eigh {width} fp64"] = seconds(lambda w=width: torch.linalg.eigh(grams[w]), 3)
    scaling = whitening(grams[1536])
    weight = layer.mlp.down_proj.weight
    out["singular values of C W R, 576 x 1536 fp64"] = seconds(lambda: scaled_spectrum(weight, scaling), 3)
    out["full SVD 576 x 1536 fp64"] = seconds(lambda: torch.linalg.svd(weight.double(), full_matrices=False), 3)

    def step() -> None:
        with torch.enable_grad():
            y = layer(hidden[0], **kws[0])
            (y[0] if isinstance(y, tuple) else y).square().mean().backward()

    out["refinement step (forward + backward, 4 windows)"] = seconds(step, 4)
    return {k: round(v, 3) for k, v in out.items()}


class _FirstLayers(LayerSource):
    """The model's own layers, of which a pass sees only the first ``count``."""

    def __init__(self, model: torch.nn.Module, count: int) -> None:
        super().__init__(model)
        self.count = count

    def __len__(self) -> int:
        return self.count


def variants(windows: torch.Tensor, texts: dict[str, torch.Tensor], layers: int, specs: list[str]) -> list[dict]:
    def ppl(m: torch.nn.Module) -> dict[str, float]:
        return {t: round(perplexity(m, x, show_progress=False).ppl, 2) for t, x in texts.items()}

    model, _, _ = load_model(MODEL)
    rows = [{"variant": "dense", "ppl": ppl(model)}]
    config = LowRank(ratio=0.5, allocator="loss", factorizer="fwhiten", sequential=True)
    planner = LowRankLayers(model, config, PatchContext(show_progress=False))
    start = time.perf_counter()
    passes = plan_transforms(model, [planner], windows, show_progress=False)
    print(f"plan: {passes}, {time.perf_counter() - start:.1f} s", flush=True)
    plan = Plan({"ranks": planner.ranks}, dict(planner.scales))
    for spec in specs:
        steps, lr, error_batches, *flags = spec.split(",")
        propagate.ERROR_BATCHES = int(error_batches)
        model, _, _ = load_model(MODEL)
        variant = LowRank(**{**config.__dict__, "refine_steps": int(steps), "refine_lr": float(lr)})
        fit = LowRankLayers(model, variant, PatchContext(show_progress=False))
        fit.restore(plan)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in flags):
            walked = run_layers(model, windows, fit.fit, source=_FirstLayers(model, layers), show_progress=False)
        row = {
            "variant": spec,
            "fit_seconds_per_layer": round((time.perf_counter() - start) / layers, 1),
            "ppl": ppl(model),
            "layer_error_after": [round(r["after"], 5) for r in walked.records if r],
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", action="store_true", help="time the parts of one layer's fit")
    parser.add_argument("--variants", nargs="*", default=[], metavar="STEPS,LR,ERROR_BATCHES[,bf16]")
    parser.add_argument("--layers", type=int, default=8, help="layers fitted per variant")
    parser.add_argument("--max-tokens", type=int, default=4096, help="eval tokens per text")
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_knobs.json")
    args = parser.parse_args()
    _, tokenizer, _ = load_model(MODEL)
    windows = calibration_windows(tokenizer, resolve_text("wiki", split="calib"), 128, 512, 0)
    result: dict = {"model": MODEL, "windows": list(windows.shape)}
    if args.parts:
        result["parts_seconds"] = parts(windows)
        print(format_table(["part", "s"], [[k, f"{v:.2f}"] for k, v in result["parts_seconds"].items()]))
    if args.variants:
        texts = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.max_tokens) for t in ("wiki", "news")}
        result["layers"] = args.layers
        result["variants"] = variants(windows, texts, args.layers, args.variants)
        table = [
            [r["variant"], r.get("fit_seconds_per_layer", "-"), f"{r['ppl']['wiki']:.2f}", f"{r['ppl']['news']:.2f}"]
            for r in result["variants"]
        ]
        print(format_table(["steps,lr,error batches", "fit s/layer", "ppl wiki", "ppl news"], table))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
