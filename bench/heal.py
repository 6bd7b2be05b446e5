"""Healing a compressed SmolLM2: perplexity after N steps, LRC-only vs full fine-tuning, KD vs LM loss.

    python bench/heal.py --checkpoint patched/smollm2-135m-loss-fwhiten-c0.5 --steps 100 300
    python bench/heal.py --checkpoint ... --modes lrc-kd --steps 50 100 200 --seq-len 128 --batch 1

Modes: ``lrc-kd`` (the default of ``--heal``: factor pairs only, distilled from the dense model),
``lrc-lm`` (factor pairs only, next-token loss), ``full-kd`` (every parameter, the full
fine-tuning baseline). Each mode starts from the same checkpoint, trains to the largest step
count and is evaluated on the way (wiki and news eval splits, 4,096 tokens each, never trained
on); training time excludes evaluation. The learning-rate schedule spans the largest step count, so a
row at 300 steps of a 1,000-step run (shown as ``300/1000``) is not what ``--heal 300`` gives; rows
are kept per (mode, schedule length). Peak RSS is the process's during training (reset before
each mode). Prints a table and writes ``bench/results/heal.json``, one entry per checkpoint: a
run replaces the rows of the (mode, schedule) pairs it ran and keeps the others, so a long grid can be measured
in pieces (every run re-evaluates the unhealed model; it is deterministic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from results_io import RESULTS, peak_rss_bytes, reset_peak_rss, write_result

from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.hf_io import load_model
from eigenpatch.patchers.heal.config import Heal
from eigenpatch.patchers.heal.transform import apply_heal, trainable_parameters
from eigenpatch.recipe import PatchContext
from eigenpatch.table import fmt_bytes, fmt_count, fmt_float, format_table
from eigenpatch.zoo import resolve_text

MODES = {"lrc-kd": ("factors", "kd"), "lrc-lm": ("factors", "lm"), "full-kd": ("all", "kd")}
EVAL_TEXTS = ("wiki", "news")


def evaluate(model: torch.nn.Module, ids: dict[str, torch.Tensor]) -> dict[str, float]:
    return {t: perplexity(model, x, show_progress=False).ppl for t, x in ids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="compressed checkpoint written by patch-model")
    parser.add_argument("--teacher", default="smollm2-135m", help="the dense model it was compressed from")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 300])
    parser.add_argument("--lr", type=float, default=Heal.lr)
    parser.add_argument("--batch", type=int, default=Heal.batch_size)
    parser.add_argument("--seq-len", type=int, default=Heal.seq_len)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS / "heal.json")
    args = parser.parse_args()

    teacher, tokenizer, _ = load_model(args.teacher)
    teacher.eval().requires_grad_(False)
    ids = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.eval_tokens) for t in EVAL_TEXTS}
    dense = evaluate(teacher, ids)
    calib = resolve_text("wiki", split="calib")
    checkpoints = sorted(set(args.steps))
    rows: list[dict[str, Any]] = []
    unhealed: dict[str, float] | None = None
    for mode in args.modes:
        trainable, loss = MODES[mode]
        student, _, _ = load_model(args.checkpoint)
        if unhealed is None:
            unhealed = evaluate(student, ids)
            rows.append({"mode": "unhealed", "steps": 0, "schedule": 0, "ppl": unhealed})
        eval_seconds = 0.0

        def on_step(_: str, step: int, model: torch.nn.Module, mode: str = mode) -> None:
            nonlocal eval_seconds
            if step in checkpoints:
                t = time.perf_counter()
                rows.append({"mode": mode, "steps": step, "schedule": checkpoints[-1], "ppl": evaluate(model, ids)})
                eval_seconds += time.perf_counter() - t
                print(f"{mode} step {step}: {rows[-1]['ppl']}", flush=True)

        context = PatchContext(tokenizer=tokenizer, calib_text=calib, teacher=teacher, on_step=on_step)
        config = Heal(
            steps=checkpoints[-1],
            loss=loss,
            trainable=trainable,
            lr=args.lr,
            batch_size=args.batch,
            seq_len=args.seq_len,
        )
        reset_peak_rss()
        start = time.perf_counter()
        result = apply_heal(student, config, context).details
        seconds = time.perf_counter() - start - eval_seconds
        for row in rows:
            if row["mode"] == mode and row["schedule"] == checkpoints[-1]:
                row.update(
                    {
                        "train_seconds_total": round(seconds, 1),
                        "tokens_per_second": round(result["tokens"] / seconds, 1),
                        "trainable_params": sum(p.numel() for p in trainable_parameters(student, trainable).values()),
                        "peak_rss": peak_rss_bytes(),
                        "loss_curve": result["loss_curve"],
                    }
                )
        del student
        done = {(m, checkpoints[-1]) for m in args.modes[: args.modes.index(mode) + 1]}
        save_rows(args, rows, unhealed, dense, done=done)


def save_rows(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    unhealed: dict[str, float],
    dense: dict[str, float],
    done: set[tuple[str, int]],
) -> None:
    """Merge the modes measured so far into the checkpoint's entry and write the JSON (after every
    mode, so an interrupted grid keeps what it finished)."""
    settings = {"teacher": args.teacher, "lr": args.lr, "batch": args.batch, "seq_len": args.seq_len}
    settings["eval_tokens"] = args.eval_tokens
    name = Path(args.checkpoint).name
    runs = load_runs(args.out)
    previous = runs.get(name, {})
    rows = list(rows)
    if previous.get("settings") == settings:  # keep the modes this run has not measured
        old = [r for r in previous["rows"] if r["mode"] != "unhealed"]
        rows = [r for r in old if (r["mode"], r["schedule"]) not in done] + rows
    rows = [r for r in rows if r["mode"] == "unhealed" or "train_seconds_total" in r]  # finished modes only
    rows.sort(key=lambda r: (r["mode"] != "unhealed", r["mode"], r["schedule"], r["steps"]))
    for row in rows:
        row["gap_closed"] = {
            t: (unhealed[t] - row["ppl"][t]) / (unhealed[t] - dense[t]) if unhealed[t] != dense[t] else 0.0
            for t in EVAL_TEXTS
        }
    runs[name] = {"settings": settings, "dense_ppl": dense, "rows": rows}
    print(f"{name}; dense: ppl wiki {dense['wiki']:.2f}, news {dense['news']:.2f}")
    print(format_table(HEADERS, [table_row(row) for row in rows]))
    write_result(args.out, {"bench": "heal", "runs": runs})


HEADERS = ["mode", "steps", "ppl wiki", "ppl news", "gap closed w/n", "train s (all steps)", "tok/s"]
HEADERS += ["trainable", "peak RSS"]


def schedule(row: dict[str, Any], entry: dict[str, Any]) -> int:
    """A row's schedule length; rows written before it was recorded come from runs that trained to
    their mode's largest step count."""
    if "schedule" not in row:
        row["schedule"] = max(r["steps"] for r in entry["rows"] if r["mode"] == row["mode"])
    return row["schedule"]


def table_row(row: dict[str, Any]) -> list[Any]:
    gaps = row["gap_closed"]
    steps = row["steps"] if row["steps"] == row["schedule"] else f"{row['steps']}/{row['schedule']}"
    return [
        row["mode"],
        steps,
        fmt_float(row["ppl"]["wiki"]),
        fmt_float(row["ppl"]["news"]),
        f"{gaps['wiki']:.0%} / {gaps['news']:.0%}",
        fmt_float(row.get("train_seconds_total"), 0),
        fmt_float(row.get("tokens_per_second"), 1),
        fmt_count(row.get("trainable_params")),
        fmt_bytes(row.get("peak_rss")),
    ]


def load_runs(path: Path) -> dict[str, Any]:
    """Earlier runs by checkpoint name; a file in the first, single-checkpoint layout is converted."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "runs" in data:
        runs = data["runs"]
    else:
        settings = {k: data[k] for k in ("teacher", "lr", "batch", "seq_len", "eval_tokens")}
        runs = {data["checkpoint"]: {"settings": settings, "dense_ppl": data["dense_ppl"], "rows": data["rows"]}}
    for entry in runs.values():
        for row in entry["rows"]:
            row["schedule"] = 0 if row["mode"] == "unhealed" else schedule(row, entry)
    return runs


if __name__ == "__main__":
    main()
