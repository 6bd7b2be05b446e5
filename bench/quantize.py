"""Quantized SmolLM2-135M: bytes, perplexity and decode speed of RTN and GPTQ at 8, 4 and 2 bits.

    python bench/quantize.py                       # the table in docs/quantize.md
    python bench/quantize.py --calib-windows 128   # GPTQ on README command 1's calibration
    python bench/quantize.py --configs gptq:4:32 c0.3+gptq:4:64 --onnx gptq:4:32 --out bench/results/q.json

In one process, from one dense model: the dense fp32 model, then ``quantize`` at each
``METHOD:BITS:GROUP`` of ``--configs`` (every decoder Linear; head and embedding stay), each
patched from a fresh copy and saved, then reloaded through ``eigenpatch.load`` like any user's.
``METHOD:bB[:refineN]`` is ``--budget B`` (refined 64 steps per layer unless ``refineN`` says
otherwise; the plan goes into the row), ``:w3-64,4-64`` and ``:ranks0,8`` its ladder; ``:scales``
also refines the quantized Linears' scales.
``METHOD:BITS:GROUP:rK`` adds a rank-K correction of each Linear's rounding error (``--correct
K``; ``:rK:nofisher`` without the output-Fisher weight, ``:rK:refineN`` refined N steps per
layer). ``cR+METHOD:BITS:GROUP`` first compresses by ``R`` with patch-model's default recipe
(``loss+fwhiten``, layer by layer, refined; ranks in whole groups) and then quantizes both factors
of each pair and the Linears kept dense, in the same engine run: ``--compress R --bits BITS``.
Each row reports:

- the bytes the quantized Linears take (codes, scales, zero points) against the same Linears in
  bf16, and the whole checkpoint's bytes on disk (the fp32 embedding is most of SmolLM2's);
- the bytes the quantized Linears hold in memory after bf16 decoding: the stored bytes plus the
  int4 kernel's packed copy where it runs (3-bit codes run as 4-bit ones, so they cost both);
- perplexity on ``--max-tokens`` of ``wiki:eval`` and ``news:eval`` (fp32 activations: the
  dequantizing path, so the numbers are those of the stored codes);
- the seconds ``patch()`` took (GPTQ: the engine's layer-by-layer pass on the propagated inputs);
- batch-1 greedy decode in transformers with bf16 activations (``--decode-tokens`` new tokens after
  a short prompt) against the dense model in bf16, the two timed in turns, and the kernel the 4-bit
  Linears ran;
- with ``--onnx``, the same checkpoint in ONNX Runtime: exported as stored (the Linears as
  ``MatMulNBits`` on their codes, the embedding and head fp32) and with ``--weights int4`` on top
  (the head int4 and the embedding int8, as the dense export does), each with its bytes and its
  perplexity on wiki computed by ONNX Runtime; the dense model's ``--weights int4`` export (GPTQ
  in the graph) is the row to beat at equal bytes.

SmolLM2's weights were dequantized from a Q4_1 GGUF (groups of 32 inputs, a scale and a minimum):
a 4-bit grid with groups of 32 can land back on those codes, groups of 64 and 128 cannot (each
spans 2 or 4 source groups with their own scales), and no 2-bit grid can. Writes
``bench/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.format.checkpoint import weights_bytes
from eigenpatch.format.quantized import QuantizedLinear, resident_bytes
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import LowRank, Quantize
from eigenpatch.table import fmt_bytes, format_table
from eigenpatch.zoo import resolve_text

MODEL = "smollm2-135m"
CONFIGS = (
    "rtn:8:64",
    "gptq:8:64",
    "rtn:4:32",
    "gptq:4:32",
    "rtn:4:64",
    "gptq:4:64",
    "rtn:4:128",
    "gptq:4:128",
    "rtn:2:32",
    "gptq:2:32",
)


def decode_seconds(models: list[torch.nn.Module], prompt: torch.Tensor, tokens: int, repeats: int = 3) -> list[float]:
    """Best of ``repeats``: seconds per new token of batch-1 greedy decoding, per model.

    The models take turns within each repeat (after one warm-up each), so a change in the machine's
    load hits the dense baseline and the quantized model alike: the ratio is what the bench quotes.
    """
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    best = [float("inf")] * len(models)
    with torch.no_grad():
        for model in models:
            model.generate(prompt, max_new_tokens=2, do_sample=False)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model.generate(prompt, **kw)
                best[i] = min(best[i], time.perf_counter() - start)
    return [b / tokens for b in best]


def recipe(spec: str, calib_windows: int) -> list:
    """``[cR+]METHOD:BITS:GROUP`` -> the configs ``patch-model [--compress R] --bits BITS`` would build."""
    compress, _, quantize = spec.rpartition("+")
    method, width, *rest = quantize.split(":")
    options: dict = {}
    if width.startswith("b"):  # METHOD:bB: patch-model --budget B, refined 64 steps unless refineN says
        options = {"budget": float(width[1:]), "refine_steps": 64}
    else:
        options = {"bits": int(width), "group": int(rest.pop(0))}
    group = options.get("group", 64)
    for option in rest:  # rK, nofisher, refineN, scales, wB-G,..., ranksK,...
        if option == "nofisher":
            options["correction_fisher"] = False
        elif option == "scales":
            options["refine_scales"] = True
            options.setdefault("refine_steps", 64)
        elif option.startswith("w"):  # w3-64,4-64: the budget's widths
            options["budget_widths"] = tuple(w.replace("-", ":") for w in option[1:].split(","))
        elif option.startswith("ranks"):  # ranks0,8: the budget's correction ranks
            options["budget_ranks"] = tuple(int(k) for k in option.removeprefix("ranks").split(","))
        elif option.startswith("refine"):
            options["refine_steps"] = int(option.removeprefix("refine"))
        else:
            options["correction_rank"] = int(option.removeprefix("r"))
    configs: list = []
    if compress:
        ratio = float(compress.removeprefix("c"))
        configs.append(
            LowRank(
                ratio=ratio,
                allocator="loss",
                factorizer="fwhiten",
                sequential=True,
                refine_steps=64,
                calib_windows=calib_windows,
                rank_multiple=math.lcm(int(group), 16),
            )
        )
    configs.append(Quantize(method=method, calib_windows=calib_windows, **options))
    return configs


def onnx_rows(model: torch.nn.Module, tokenizer, folder: Path, wiki: list[int]) -> dict[str, dict[str, float]]:
    """``{precision: {bytes, ppl_wiki}}`` of ``model`` exported as stored (float32) and with int4 weights."""
    from export_speed import onnx_perplexity

    from eigenpatch.export.onnx import ExportFailed, export_onnx
    from eigenpatch.export.precision import onnx_bytes
    from eigenpatch.export.runtime import OnnxCausalLM

    out = {}
    for precision in ("float32", "int4"):
        target = folder / f"onnx-{precision}"
        row: dict = {}
        try:
            meta = export_onnx(model, target, tokenizer, precision=precision, verify=precision == "float32")
            row["parity"] = meta.get("parity")
        except ExportFailed as exc:  # kept as a result, and the graph scored anyway
            row["parity_failed"] = str(exc)
            export_onnx(model, target, tokenizer, precision=precision, verify=False, force=True)
        ppl = onnx_perplexity(OnnxCausalLM(target, provider="CPU"), wiki)
        out[precision] = row | {"bytes": onnx_bytes(target), "ppl_wiki": round(ppl, 2)}
        shutil.rmtree(target)
    return out


def kernels(model: torch.nn.Module) -> list[str]:
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    found = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            found.add(m.kernel(x.expand(1, m.in_features)))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="METHOD:BITS:GROUP")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096, help="eval tokens per text")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument(
        "--onnx",
        nargs="*",
        metavar="CONFIG",
        help="also export and score in ONNX Runtime the dense model and these configs (none named: all)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize.json")
    args = parser.parse_args()

    base, tokenizer, folder = load_model(MODEL)
    texts = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.max_tokens) for t in ("wiki", "news")}
    calib = resolve_text("wiki", split="calib")
    prompt = torch.tensor([tokenizer("The history of the city begins")["input_ids"]])

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        return {t: round(perplexity(model, x, show_progress=False).ppl, 2) for t, x in texts.items()}

    dense_bf16 = copy.deepcopy(base).to(torch.bfloat16)  # every row's decode is timed beside it
    (dense_decode,) = decode_seconds([dense_bf16], prompt, args.decode_tokens)
    rows = [
        {"config": "dense", "ppl": ppl(base), "disk_bytes": weights_bytes(folder), "decode_s_per_token": dense_decode}
    ]
    wiki = texts["wiki"].view(-1).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = None if args.onnx is None else set(args.onnx or args.configs)
        if onnx:
            rows[0]["onnx"] = onnx_rows(base, tokenizer, Path(tmp), wiki)
        print(rows[0], flush=True)
        cache: dict = {}  # scores shared by the rows that can share them (budgets, compression ratios)
        for spec in args.configs:
            model = copy.deepcopy(base)
            configs = recipe(spec, args.calib_windows)
            start = time.perf_counter()
            report = eigenpatch.patch(
                model, configs, tokenizer=tokenizer, calib_text=calib, show_progress=False, calibration_cache=cache
            )
            seconds = time.perf_counter() - start
            out = eigenpatch.save(model, Path(tmp) / spec.replace(":", "-").replace("+", "-"), tokenizer=tokenizer)
            del model
            loaded = eigenpatch.load(out).eval()
            step = report["steps"][-1]
            row = {
                "config": spec,
                "quantize_seconds": round(seconds, 1),
                "linear_bytes": step["bytes_after"],
                # against the dense Linears' bf16 bytes, also for a compressed model
                "linear_bf16_bytes": 2 * report["steps"][0]["targeted_params_before"]
                if len(configs) > 1
                else step["bf16_bytes_before"],
                "disk_bytes": weights_bytes(out),
                "ppl": ppl(loaded),
            }
            if step.get("plan"):
                row["plan"] = step["plan"]
            if onnx and spec in onnx:
                row["onnx"] = onnx_rows(loaded, tokenizer, Path(tmp), wiki)
            loaded = loaded.to(torch.bfloat16)
            dense_s, row["decode_s_per_token"] = decode_seconds([dense_bf16, loaded], prompt, args.decode_tokens)
            row["dense_decode_s_per_token"] = dense_s
            row["decode_vs_dense_bf16"] = round(dense_s / row["decode_s_per_token"], 2)
            row["bf16_kernels"] = kernels(loaded)
            row["resident_linear_bytes"] = resident_bytes(loaded)  # after bf16 decoding: codes + kernel copies
            print(row, flush=True)
            rows.append(row)
    table = [
        [
            r["config"],
            fmt_bytes(r.get("linear_bytes")),
            f"{r['linear_bytes'] / r['linear_bf16_bytes']:.3f}" if "linear_bytes" in r else "-",
            fmt_bytes(r["disk_bytes"]),
            fmt_bytes(r.get("resident_linear_bytes")),
            f"{r['ppl']['wiki']:.2f}",
            f"{r['ppl']['news']:.2f}",
            r.get("quantize_seconds", "-"),
            f"{r.get('decode_vs_dense_bf16', 1.0):.2f}",
            ",".join(r.get("bf16_kernels", [])) or "-",
        ]
        for r in rows
    ]
    header = ["config", "Linears", "x bf16", "on disk", "in memory (bf16)", "ppl wiki", "ppl news", "s"]
    header += ["decode x bf16", "bf16 kernel"]
    print(format_table(header, table))
    if onnx:
        onnx_table = []
        for r in (r for r in rows if "onnx" in r):
            cells = [(fmt_bytes(r["onnx"][p]["bytes"]), r["onnx"][p]["ppl_wiki"]) for p in ("float32", "int4")]
            onnx_table.append([r["config"], *(x for cell in cells for x in cell)])
        header = ["config", "ONNX as stored", "ppl wiki (ORT)", "ONNX --weights int4", "ppl wiki (ORT)"]
        print(format_table(header, onnx_table))
    torch_threads = torch.get_num_threads()
    write_result(
        args.out,
        {"model": MODEL, "calib_windows": args.calib_windows, "threads": torch_threads, "rows": rows},
    )


if __name__ == "__main__":
    main()
