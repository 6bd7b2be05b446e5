"""What checkpoint verification costs: SmolLM2-135M at --compress 0.5, dense and patched, one process.

    python bench/verify_cost.py            # svd (data-free) factors; the checks do not depend on the method

Times, best of ``--repeats``: ``eigenpatch.load`` (which verifies), the safetensors header check,
the finiteness pass over the format's tensors in memory, and ``verify_checkpoint`` (the file-level
check vLLM and ``eigenpatch serve`` run: headers, a meta-device skeleton, the factors read from disk).
Prints a table and writes ``bench/results/verify_cost.json``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from results_io import machine, write_result

import eigenpatch
from eigenpatch.format.checkpoint import FORMAT_MODULES, verify_checkpoint
from eigenpatch.format.verify import (
    check_finite_in_model,
    check_present,
    format_tensor_names,
    stored_shapes,
    weight_files,
)
from eigenpatch.hf_io import load_model
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_model

RESULTS = Path(__file__).parent / "results"


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dense_dir = resolve_model("smollm2-135m")
    model, tokenizer, _ = load_model(dense_dir)
    eigenpatch.patch(model, eigenpatch.SVD(ratio=args.ratio), show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        patched = eigenpatch.save(model, Path(tmp) / "patched", tokenizer=tokenizer)
        loaded = eigenpatch.load(patched)
        names = format_tensor_names(loaded, FORMAT_MODULES)
        stored = stored_shapes(weight_files(patched))
        rows = {
            "load dense (eigenpatch.load)": best(lambda: eigenpatch.load(dense_dir), args.repeats),
            "load patched (eigenpatch.load, verifies)": best(lambda: eigenpatch.load(patched), args.repeats),
            "  header check (before weights load)": best(
                lambda: check_present(loaded, stored_shapes(weight_files(patched)), patched, names), args.repeats
            ),
            "  finiteness pass (after weights load)": best(
                lambda: check_finite_in_model(loaded, names, patched), args.repeats
            ),
            "verify_checkpoint (vLLM, serve)": best(lambda: verify_checkpoint(patched), args.repeats),
        }
        tensors = len(names)
        elements = sum(math.prod(stored[n][0]) for n in names if n in stored)
    table = [[what, f"{seconds * 1000:.0f} ms"] for what, seconds in rows.items()]
    print(f"SmolLM2-135M --compress {args.ratio} (svd): {tensors} format tensors, {elements / 1e6:.1f} M elements")
    print(format_table(["step", f"best of {args.repeats}"], table))
    write_result(
        RESULTS / "verify_cost.json",
        {
            "machine": machine(),
            "model": "smollm2-135m",
            "ratio": args.ratio,
            "format_tensors": tensors,
            "format_elements": elements,
            "seconds": rows,
        },
    )


if __name__ == "__main__":
    main()
