"""Correction factors at 16 or 8 bits: what rounding them to int8 costs, and what it buys at equal bytes.

    python bench/correction_bits.py                 # ranks 16 and 32 (about 40 min alone on 2 cores)
    python bench/correction_bits.py --ranks 8 16

For each rank: GPTQ int2 (groups of 32) with closed-form rank-K corrections (``Quantize(bits=2,
group=32, correction_rank=K)``, no refinement), scored with its fp16 factors as stored, then with
each factor rounded per row to int8 (symmetric, one fp16 scale per row: ``K (in + out)`` bytes plus
``2 (K + out)`` for the scales, against ``2 K (in + out)``). Bits per weight count everything (codes,
scales, zero points, factors). Rank 2K at int8 costs what rank K at fp16 does, so the pair of runs
answers "store the factors at 8 or 16 bits" at equal bytes. The rounding is simulated on the fp16
checkpoint's factors (``--correction-bits 16``), the same per-row rounding ``--correction-bits 8``
(the default since) stores.

Writes ``bench/results/correction_bits.json``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.format.corrected import CorrectedQuantizedLinear
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import Quantize
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text


def int8_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded per row to symmetric int8 and back (one scale per row)."""
    scale = t.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return ((t.float() / scale).round().clamp(-127, 127) * scale).to(t.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args()

    base, tokenizer, _ = load_model("smollm2-135m")
    base.eval()
    texts = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.max_tokens) for t in ("wiki", "news")}
    calib = resolve_text("wiki", split="calib")

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        return {t: round(perplexity(model, x, show_progress=False).ppl, 2) for t, x in texts.items()}

    rows, cache = [], {}  # one Fisher pass for every rank
    for rank in args.ranks:
        model, start = copy.deepcopy(base), time.perf_counter()
        config = Quantize(bits=2, group=32, correction_rank=rank, correction_bits=16, calib_windows=args.calib_windows)
        report = eigenpatch.patch(
            model, config, tokenizer=tokenizer, calib_text=calib, show_progress=False, calibration_cache=cache
        )
        step = report["steps"][-1]
        weights = step.get("targeted_params_before") or step["bf16_bytes_before"] / 2
        pairs = [m for m in model.modules() if isinstance(m, CorrectedQuantizedLinear)]
        values = sum(m.correction_down.numel() + m.correction_up.numel() for m in pairs)
        scales = sum(m.correction_down.shape[0] + m.correction_up.shape[0] for m in pairs)
        fp16 = 8 * step["bytes_after"] / weights
        row = {"rank": rank, "fp16": {"bits_per_weight": round(fp16, 4), "ppl": ppl(model.eval())}}
        with torch.no_grad():
            for m in pairs:
                m.correction_down.copy_(int8_rows(m.correction_down))
                m.correction_up.copy_(int8_rows(m.correction_up))
        int8 = fp16 - 8 * (values - 2 * scales) / weights  # 2 bytes a value become 1, plus fp16 row scales
        row["int8"] = {"bits_per_weight": round(int8, 4), "ppl": ppl(model)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(row, flush=True)
        rows.append(row)
    table = [[f"int2 g32 + rank {r['rank']}, {kind} factors", f"{r[kind]['bits_per_weight']:.3f}",
              r[kind]["ppl"]["wiki"], r[kind]["ppl"]["news"]] for r in rows for kind in ("fp16", "int8")]  # fmt: skip
    print(format_table(["config", "bits / weight", "ppl wiki", "ppl news"], table))
    write_result(RESULTS / "correction_bits.json", {"model": "smollm2-135m", "rows": rows})


if __name__ == "__main__":
    main()
