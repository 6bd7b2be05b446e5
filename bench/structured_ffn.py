"""Structured FFNs: time per call vs tokens (PyTorch and ONNX Runtime, CPU) and perplexity at 30 % fewer FFN params.

    python bench/structured_ffn.py                       # speed (SmolLM2 and 7B FFN shapes) + SmolLM2 perplexity
    python bench/structured_ffn.py --skip-ppl --shapes smollm2

Speed: one whole SwiGLU block ``down(silu(gate x) * up x)`` per call, for token counts
{1, 8, 64, 512, 2048}, with random weights at the FFN shapes of SmolLM2-135M (576 -> 1536) and of a
7B model (4096 -> 11008), keeping 70 % of the FFN parameters. Variants: dense; each structure
(``lowrank``: gate/up share their input factor; ``blockdense``; ``blockshuffle``, 4 blocks) run
structured; and the same structure *pre-merged*: the threshold measured by
``eigenpatch.patchers.premerge`` on this machine picks the merged dense matrix for small calls.
Medians of interleaved repeats, each call with cold caches (as inside a model, where the other
layers' weights pass through the cache in between); quote the ratios. ONNX Runtime: the structured and the dense
block exported separately; "pre-merged" there picks the faster graph with ORT's own measured
threshold (same rule).

Perplexity: SmolLM2-135M with each structure at ``--ffn-ratio 0.3`` (whitened init on the wiki
calibration split), wiki and news eval (4,096 tokens each), and the dense model, same run.
Prints tables and writes ``bench/results/structured_ffn.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from results_io import RESULTS, write_result
from torch import nn

import eigenpatch
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.format.structured import BlockDenseLinear, BlockShuffleLinear, SharedLowRankLinear, set_premerge
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import Heal, StructuredFFN
from eigenpatch.patchers.heal.transform import apply_heal
from eigenpatch.patchers.structured_ffn.init import blockdense_rank, blockshuffle_rank, lowrank_rank, shared_rank
from eigenpatch.patchers.structured_ffn.premerge import crossover, flush_cache, measure_crossover
from eigenpatch.recipe import PatchContext
from eigenpatch.table import fmt_float, format_table
from eigenpatch.zoo import resolve_text

SHAPES = {"smollm2": (576, 1536), "7b": (4096, 11008)}
TOKENS = (1, 8, 64, 512, 2048)
STRUCTURES = ("lowrank", "blockdense", "blockshuffle")
KEEP, BLOCKS = 0.7, 4


class SwiGLU(nn.Module):
    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return module


def build_ffn(structure: str, hidden: int, inter: int) -> SwiGLU:
    """A random SwiGLU block with ``structure`` at 70 % of the dense FFN parameters."""
    if structure == "dense":
        lin = [nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)]
        return SwiGLU(*lin, nn.Linear(inter, hidden, bias=False)).requires_grad_(False)
    if structure == "lowrank":
        r = shared_rank(KEEP, hidden, inter)
        owner = SharedLowRankLinear(hidden, inter, r)
        user = SharedLowRankLinear(hidden, inter, r, owner=owner, down_from="gate_proj")
        down = SharedLowRankLinear(inter, hidden, lowrank_rank(KEEP, inter, hidden))
        return _randomize(SwiGLU(owner, user, down)).requires_grad_(False)
    if structure == "blockdense":
        make = lambda i, o: BlockDenseLinear(i, o, blockdense_rank(KEEP, i, o, BLOCKS), BLOCKS)  # noqa: E731
    else:
        make = lambda i, o: BlockShuffleLinear(i, o, blockshuffle_rank(KEEP, i, o, BLOCKS), BLOCKS)  # noqa: E731
    return _randomize(SwiGLU(make(hidden, inter), make(hidden, inter), make(inter, hidden))).requires_grad_(False)


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int, min_seconds: float = 1.0) -> dict[str, float]:
    """Median seconds per call of each function, called round-robin (one call each per round) so
    that drift of a shared, noisy machine hits every variant alike; every call starts with cold
    caches, as an FFN block does inside a model (the other layers' weights pass in between)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    began = time.perf_counter()
    done = 0
    while done < rounds or (time.perf_counter() - began < min_seconds and done < 200):
        for name, fn in fns.items():
            flush_cache()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        done += 1
    return {name: statistics.median(t) for name, t in times.items()}


def onnx_session(module: nn.Module, hidden: int, folder: Path, name: str) -> Any:
    import onnxruntime as ort

    path = folder / f"{name}.onnx"
    x = torch.randn(4, hidden)
    torch.onnx.export(
        module,
        (x,),
        path,
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("tokens")},),
        input_names=["x"],
        output_names=["y"],
        verbose=False,
        external_data=False,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the cores to torch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speed(shape_name: str, rounds: int) -> list[dict[str, Any]]:
    hidden, inter = SHAPES[shape_name]
    dense = build_ffn("dense", hidden, inter)
    dense_params = sum(p.numel() for p in dense.parameters())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_ort = onnx_session(dense, hidden, Path(tmp), "dense")
        for structure in STRUCTURES:
            ffn = build_ffn(structure, hidden, inter)
            ort_structured = onnx_session(ffn, hidden, Path(tmp), structure)
            merged = build_ffn(structure, hidden, inter)
            merged.load_state_dict(ffn.state_dict())
            pairs = (
                [[merged.gate_proj, merged.up_proj]]
                if structure == "lowrank"
                else [[merged.gate_proj], [merged.up_proj]]
            )
            thresholds = []
            for group in [*pairs, [merged.down_proj]]:  # what patch-model stores, on the bench's token grid
                threshold, _ = measure_crossover(group, grid=TOKENS, rounds=rounds)
                for m in group:
                    m.premerge_max_tokens = threshold
                thresholds.append(threshold)
            set_premerge(merged)
            ort_timings: dict[int, tuple[float, float]] = {}
            for tokens in TOKENS:
                x = torch.randn(tokens, hidden)
                feed = {"x": x.numpy()}
                with torch.no_grad():  # torch and ORT apart: ORT's idle threads would slow torch's next call
                    t = interleaved_medians(
                        {"dense": partial(dense, x), "structured": partial(ffn, x), "premerged": partial(merged, x)},
                        rounds,
                    )
                o = interleaved_medians(
                    {
                        "dense": partial(dense_ort.run, None, feed),
                        "structured": partial(ort_structured.run, None, feed),
                    },
                    rounds,
                )
                ort_timings[tokens] = (o["dense"], o["structured"])
                rows.append(
                    {"shape": shape_name, "structure": structure, "tokens": tokens, "dense_params": dense_params,
                     "ffn_params": sum(p.numel() for p in ffn.parameters()), "torch_thresholds": thresholds,
                     "torch": t, "ort": {"dense": ort_timings[tokens][0], "structured": ort_timings[tokens][1]}}
                )  # fmt: skip
            ort_threshold = crossover(ort_timings)
            for row in rows[-len(TOKENS) :]:
                use_dense = ort_threshold is None or row["tokens"] <= ort_threshold
                row["ort"]["premerged"] = ort_timings[row["tokens"]][0 if use_dense else 1]
                row["ort_threshold"] = ort_threshold
            print(f"{shape_name} {structure}: pre-merge thresholds torch {thresholds}, ort {ort_threshold}", flush=True)
    return rows


def quality(ratio: float, calib_windows: int, eval_tokens: int, heal_steps: int) -> dict[str, Any]:
    """Perplexity of SmolLM2 with each structure at ``ratio`` fewer FFN parameters (and dense), before
    and after ``heal_steps`` of distillation from the dense model into the structured tensors."""
    model, tokenizer, _ = load_model("smollm2-135m")
    ids = {t: tokenize(tokenizer, resolve_text(t, split="eval"), eval_tokens) for t in ("wiki", "news")}
    calib = resolve_text("wiki", split="calib")
    cache: dict[Any, Any] = {}
    out: dict[str, Any] = {"dense": {t: perplexity(model, x, show_progress=False).ppl for t, x in ids.items()}}
    for structure in STRUCTURES:
        student, _, _ = load_model("smollm2-135m")
        config = StructuredFFN(structure=structure, ratio=ratio, calib_windows=calib_windows, premerge="off")
        start = time.perf_counter()
        report = eigenpatch.patch(student, config, tokenizer=tokenizer, calib_text=calib, calibration_cache=cache)
        step = report["steps"][0]
        out[structure] = {t: perplexity(student, x, show_progress=False).ppl for t, x in ids.items()}
        out[structure].update(
            ffn_keep=step["ffn_params_after"] / step["ffn_params_before"], seconds=round(time.perf_counter() - start, 1)
        )
        if heal_steps:
            context = PatchContext(tokenizer=tokenizer, calib_text=calib, teacher=model)
            start = time.perf_counter()
            apply_heal(student, Heal(steps=heal_steps), context)
            healed = {t: perplexity(student, x, show_progress=False).ppl for t, x in ids.items()}
            out[structure]["healed"] = {**healed, "steps": heal_steps, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{structure}: {out[structure]}", flush=True)
        del student
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per token count")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--ffn-ratio", type=float, default=0.3)
    parser.add_argument("--calib-windows", type=int, default=StructuredFFN.calib_windows)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--heal-steps", type=int, default=100, help="distillation steps after init (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS / "structured_ffn.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    # a run with --skip-speed / --skip-ppl keeps the other part of an earlier result
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    result: dict[str, Any] = {
        k: previous[k] for k in ("speed", "worst_premerged_vs_best", "perplexity") if k in previous
    }
    result |= {
        "bench": "structured_ffn",
        "keep": KEEP,
        "blocks": BLOCKS,
        "torch_threads": torch.get_num_threads(),
    }
    if not args.skip_speed:
        rows = [row for shape in args.shapes for row in speed(shape, args.rounds)]
        rows += [r for r in result.get("speed", []) if r["shape"] not in args.shapes]  # shapes not re-run
        table = []
        for r in rows:
            best = min(r["torch"]["dense"], r["torch"]["structured"])
            obest = min(r["ort"]["dense"], r["ort"]["structured"])
            table.append(
                [
                    r["shape"],
                    r["structure"],
                    r["tokens"],
                    fmt_float(r["torch"]["dense"] * 1e3, 3),
                    _ratio(r["torch"]["dense"], r["torch"]["structured"]),
                    _ratio(r["torch"]["dense"], r["torch"]["premerged"]),
                    f"{r['torch']['premerged'] / best - 1:+.0%}",
                    fmt_float(r["ort"]["dense"] * 1e3, 3),
                    _ratio(r["ort"]["dense"], r["ort"]["structured"]),
                    f"{r['ort']['premerged'] / obest - 1:+.0%}",
                ]
            )
            r["premerged_vs_best"] = {"torch": r["torch"]["premerged"] / best, "ort": r["ort"]["premerged"] / obest}
        headers = [
            "shape",
            "structure",
            "tokens",
            "torch dense ms",
            "structured speed-up",
            "pre-merged speed-up",
            "pre-merged vs best",
            "ORT dense ms",
            "ORT structured speed-up",
            "ORT pre-merged vs best",
        ]
        print(format_table(headers, table))
        result["speed"] = rows
        result["worst_premerged_vs_best"] = {k: max(r["premerged_vs_best"][k] for r in rows) for k in ("torch", "ort")}
        print(f"pre-merged, worst case vs the better form: {result['worst_premerged_vs_best']}")
    if not args.skip_ppl:
        q = quality(args.ffn_ratio, args.calib_windows, args.eval_tokens, args.heal_steps)
        table = []
        for k, v in q.items():
            healed = v.get("healed", {})
            row = [k, fmt_float(v.get("ffn_keep", 1.0), 3), fmt_float(v["wiki"]), fmt_float(v["news"])]
            table.append([*row, fmt_float(healed.get("wiki")), fmt_float(healed.get("news"))])
        heal = f"+{args.heal_steps} KD steps"
        print(format_table(["model", "FFN params kept", "ppl wiki", "ppl news", f"wiki {heal}", f"news {heal}"], table))
        result["perplexity"] = {"ffn_ratio": args.ffn_ratio, "calib_windows": args.calib_windows, **q}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
