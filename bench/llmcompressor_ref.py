"""External reference: llm-compressor's GPTQ W4A16 of SmolLM2-135M, scored by our perplexity code.

    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    python bench/llmcompressor_ref.py --python /tmp/lcvenv/bin/python            # group 64 and 32
    python bench/llmcompressor_ref.py --python /tmp/lcvenv/bin/python --groups 64 --bits 2

llm-compressor pins its own transformers and compressed-tensors, so it runs in a venv of its own:
this script (in the project's venv) writes the calibration windows that ``patch-model --bits``
uses (``wiki:calib``, the bench's 32 x 512 tokens, the same seed), runs itself as a worker in that
venv (``oneshot`` with ``GPTQModifier``: every decoder Linear, the head ignored, asymmetric int
groups along the inputs, llm-compressor's defaults otherwise), and the worker writes two files: the
compressed-tensors checkpoint it would ship (its bytes are what we count) and the GPTQ-rounded
weights as plain tensors. Back here those weights are loaded into the dense model and scored on the
same 4,096 tokens of ``wiki:eval`` and ``news:eval`` as ``bench/quantize.py``, next to our own GPTQ
of the same bits and group in the same run. Writes ``bench/results/llmcompressor_ref.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path


def worker(folder: str, windows: str, out: str, bits: int, group: int) -> None:
    """Runs in llm-compressor's venv: GPTQ the model, save compressed and as rounded dense tensors."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids = torch.load(windows)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    names = {n for n, _ in model.named_parameters()}
    scheme = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}
    recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": scheme}}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
    seconds = time.perf_counter() - start
    state = {n: p.detach().contiguous() for n, p in model.state_dict().items() if n in names}
    save_file(state, f"{out}/rounded.safetensors")
    model.save_pretrained(f"{out}/compressed", save_compressed=True)
    Path(out, "seconds.json").write_text(json.dumps({"seconds": seconds}))


def packed_linear_bytes(folder: Path) -> int:
    """Bytes of the quantized Linears' tensors (packed codes, scales, zero points) in a compressed-tensors folder."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name.rpartition(".")[2] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"):
                    t = f.get_tensor(name)
                    total += t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", required=True, help="the interpreter of a venv with llmcompressor")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "WINDOWS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, bits=args.bits, group=args.groups[0])
        return

    import copy

    import torch
    from results_io import RESULTS, write_result
    from safetensors.torch import load_file

    import eigenpatch
    from eigenpatch.calibration import calibration_windows
    from eigenpatch.evaluate import perplexity, tokenize
    from eigenpatch.hf_io import load_model
    from eigenpatch.patchers import Quantize
    from eigenpatch.table import fmt_bytes, format_table
    from eigenpatch.zoo import resolve_text

    version = subprocess.run(
        [args.python, "-c", "from importlib.metadata import version; print(version('llmcompressor'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    base, tokenizer, folder = load_model("smollm2-135m")
    texts = {t: tokenize(tokenizer, resolve_text(t, split="eval"), args.max_tokens) for t in ("wiki", "news")}
    calib = resolve_text("wiki", split="calib")

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        return {t: round(perplexity(model, x, show_progress=False).ppl, 2) for t, x in texts.items()}

    rows = [{"config": "dense", "ppl": ppl(base)}]
    with tempfile.TemporaryDirectory() as tmp:
        windows = Path(tmp, "windows.pt")
        torch.save(calibration_windows(tokenizer, calib, args.calib_windows), windows)
        for group in args.groups:
            out = Path(tmp, f"g{group}")
            out.mkdir()
            cmd = [args.python, __file__, "--python", args.python, "--bits", str(args.bits), "--groups", str(group)]
            subprocess.run([*cmd, "--worker", str(folder), str(windows), str(out)], check=True)
            theirs = copy.deepcopy(base)
            missing, unexpected = theirs.load_state_dict(load_file(out / "rounded.safetensors"), strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
            rows.append(
                {
                    "config": f"llmcompressor {version} GPTQ int{args.bits} g{group}",
                    "linear_bytes": packed_linear_bytes(out / "compressed"),
                    "seconds": json.loads((out / "seconds.json").read_text())["seconds"],
                    "ppl": ppl(theirs),
                }
            )
            del theirs
            ours = copy.deepcopy(base)
            start = time.perf_counter()
            config = Quantize(bits=args.bits, group=group, calib_windows=args.calib_windows)
            report = eigenpatch.patch(ours, [config], tokenizer=tokenizer, calib_text=calib, show_progress=False)
            rows.append(
                {
                    "config": f"eigenpatch GPTQ int{args.bits} g{group}",
                    "linear_bytes": report["steps"][-1]["bytes_after"],
                    "seconds": time.perf_counter() - start,
                    "ppl": ppl(ours),
                }
            )
            del ours
            print(rows[-2], rows[-1], flush=True)
    header = ["config", "quantized Linears", "ppl wiki", "ppl news", "s"]
    table = [
        [r["config"], fmt_bytes(r.get("linear_bytes")), r["ppl"]["wiki"], r["ppl"]["news"], round(r.get("seconds", 0))]
        for r in rows
    ]
    print(format_table(header, table))
    write_result(
        args.out or RESULTS / "llmcompressor_ref.json",
        {"model": "smollm2-135m", "calib_windows": args.calib_windows, "llmcompressor": version, "rows": rows},
    )


if __name__ == "__main__":
    main()
