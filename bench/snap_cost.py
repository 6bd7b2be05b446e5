"""What ``--snap`` costs: SmolLM2-135M with and without it, side by side, on embeddings sent in.

    python bench/snap_cost.py            # about 2 minutes on 2 cores

Snap only runs where a caller may send embeddings (``inputs_embeds``; vLLM's ``prompt_embeds``), and
costs one ``[tokens, vocab]`` GEMM per forward, about the ``lm_head``'s. Measured here in transformers
(fp32, eager): a prefill of ``--prefill`` tokens and single-token forwards with a KV cache (decode),
each as the median of ``--repeats`` interleaved runs, the snapped and the plain model reading the same
embeddings. Also reported: the safe radius of the patch report (half the distance from a token's row to
its nearest other row, in mean-row-norm units; a perturbation below it provably snaps back).
Writes ``bench/results/snap_cost.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS, write_result

import eigenpatch
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import Snap
from eigenpatch.table import format_table


def forward_seconds(model: torch.nn.Module, embeds: torch.Tensor, decode: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) on ``embeds`` ``[1, T, d]``, then ``decode`` steps."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - start
        step = embeds[:, -1:]
        start = time.perf_counter()
        for _ in range(decode):
            model(inputs_embeds=step, past_key_values=cache, use_cache=True)
        return prefill, (time.perf_counter() - start) / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "snap_cost.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    plain, _, _ = load_model(args.model)
    snapped = copy.deepcopy(plain)
    report = eigenpatch.patch(snapped, Snap(), show_progress=False)["steps"][0]
    table = plain.get_input_embeddings().weight.detach()
    ids = torch.randint(0, table.shape[0], (1, args.prefill))
    noise = torch.randn(1, args.prefill, table.shape[1])
    embeds = table[ids] + 0.1 * table.norm(dim=-1).mean() * noise / noise.norm(dim=-1, keepdim=True)
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "snap": []}
    for _ in range(args.repeats):  # interleaved: drift on a noisy machine hits both alike
        for name, model in (("plain", plain), ("snap", snapped)):
            runs[name].append(forward_seconds(model, embeds, args.decode))
    medians = {
        name: {
            "prefill_tokens_per_s": args.prefill / statistics.median(r[0] for r in rs),
            "decode_ms_per_token": 1e3 * statistics.median(r[1] for r in rs),
        }
        for name, rs in runs.items()
    }
    rows = [
        [
            "prefill tokens/s",
            f"{medians['plain']['prefill_tokens_per_s']:.0f}",
            f"{medians['snap']['prefill_tokens_per_s']:.0f}",
            f"{medians['snap']['prefill_tokens_per_s'] / medians['plain']['prefill_tokens_per_s']:.3f}",
        ],
        [
            "decode ms/token",
            f"{medians['plain']['decode_ms_per_token']:.2f}",
            f"{medians['snap']['decode_ms_per_token']:.2f}",
            f"{medians['snap']['decode_ms_per_token'] / medians['plain']['decode_ms_per_token']:.3f}",
        ],
    ]
    print(format_table(["transformers fp32, inputs_embeds", "plain", "snap", "snap / plain"], rows))
    print(f"safe radius (x mean row norm): {report['safe_radius']}")
    write_result(
        args.out,
        {
            "protocol": {k: getattr(args, k) for k in ("model", "prefill", "decode", "repeats")},
            "medians": medians,
            "safe_radius": report["safe_radius"],
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
