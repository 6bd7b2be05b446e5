"""Compress a model bigger than this machine's memory: a random-weight Llama-2-7B shape, layer by layer.

    python bench/scale.py                          # 32 layers (13.5 GB of bf16 shards), data-free svd
    python bench/scale.py --methods svd loss+fwhiten --calib-layers 8
    python bench/scale.py --layers 4               # a quick look at the per-layer cost
    python bench/scale.py --methods int4:rtn       # patch-model --bits 4 --quantizer rtn, out of core
    python bench/scale.py --shape 360m --methods loss+fwhiten --calib-layers 32 --calib-windows 128 \\
        --calib-seq-len 512                        # a 1.45 GB-fp32 model, patch-model's default calibration

The model (32 layers, hidden 4096, intermediate 11008; SmolLM2's tokenizer and vocabulary so the
calibrated run has text) is written once into the cache, one bf16 shard per layer, without ever
being whole in memory: 13.5 GB on disk, 27 GB in fp32, more than the 24 GB of RAM here. Random
weights measure memory and time, not quality.

Each method runs as ``patch-model --compress 0.5 --method M --dtype auto`` (``int4:rtn``: ``--bits 4
--quantizer rtn``) in a child process, as a user would run it, and reports the child's peak RSS
(``wait4``), wall time, seconds per layer, and then that the output loads and gives finite logits.
The calibrated run uses 8 x 256 tokens; when ``--calib-layers`` is below the depth it runs on a copy
that keeps that many layers (the same files, hard-linked) and states the extrapolation to 32. Writes
``bench/results/scale.json``."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_io import RESULTS, write_result
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from eigenpatch.table import fmt_bytes, format_table
from eigenpatch.zoo import cache_dir, resolve_model

#: Llama-2-7B (27 GB in fp32), SmolLM2-360M (1.45 GB in fp32: the "1 GB model" of issue 20), and
#: Llama-3.2-1B's widths (16 layers: what ``bench/decode_speed.py`` runs at a size where each GEMM
#: streams megabytes, with SmolLM2's 49k vocabulary).
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8),
}
#: The shards' dtype (what ``--dtype auto`` computes in): 7B as published (bf16); the small one in
#: fp32, so that it is the 1 GB-fp32 case exactly.
DTYPES = {"7b": torch.bfloat16, "360m": torch.float32, "1b": torch.bfloat16}


def _layer_tensors(i: int, config: LlamaConfig, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    out = {f"model.layers.{i}.{k}": (torch.randn(s, generator=gen) * s[1] ** -0.5).to(dtype) for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=dtype)
    return out


def build(folder: Path, layers: int, name: str) -> Path:
    """The random checkpoint of shape ``name``, written shard by shard (once; a complete folder is reused)."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    smol = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(smol)
    config = LlamaConfig(
        **SHAPES[name], num_hidden_layers=layers, vocab_size=len(tokenizer), max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=str(DTYPES[name]).removeprefix("torch."),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen, dtype = torch.Generator().manual_seed(0), DTYPES[name]
    weight_map, total = {}, 0
    names = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    rest = {
        "model.embed_tokens.weight": (torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02).to(
            dtype
        ),
        "model.norm.weight": torch.ones(config.hidden_size, dtype=dtype),
        "lm_head.weight": (torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02).to(dtype),
    }
    shards = itertools.chain([rest], (_layer_tensors(i, config, gen, dtype) for i in range(layers)))
    for shard, tensors in enumerate(shards):  # one layer in memory at a time
        save_file(tensors, str(tmp / names[shard]), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, names[shard])
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        print(f"\rwriting shard {shard + 1}/{layers + 1}", end="", flush=True)
    print()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def truncated(folder: Path, layers: int) -> Path:
    """A copy of ``folder`` that keeps its first ``layers`` layers (shards hard-linked, not copied)."""
    target = folder.with_name(f"{folder.name}-first{layers}")
    if target.is_dir():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keep = {
        k: v
        for k, v in index["weight_map"].items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    for shard in set(keep.values()):
        os.link(folder / shard, tmp / shard)
    index["weight_map"] = keep
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in folder.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, tmp / f.name)
    config = json.loads((tmp / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(target)
    return target


def method_flags(method: str) -> list[str]:
    """``patch-model`` flags of a ``--methods`` entry: ``int4:rtn`` / ``int4:gptq`` quantize (``--bits 4
    --quantizer rtn``), anything else is a ``--compress 0.5 --method`` value."""
    if method.startswith("int"):
        bits, _, quantizer = method.removeprefix("int").partition(":")
        return ["--bits", bits, "--quantizer", quantizer or "gptq"]
    return ["--compress", "0.5", "--method", method]


def calibrated(method: str) -> bool:
    return method not in ("svd",) and not method.endswith(":rtn")


def compress(folder: Path, method: str, out: Path, extra: list[str]) -> dict[str, object]:
    """``patch-model`` in a child process: its own peak RSS, wall time and report."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "eigenpatch.cli", "patch", str(folder), *method_flags(method)]
    cmd += ["--dtype", "auto", "-o", str(out), "-q", *extra]
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child so far
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    peak = usage.ru_maxrss * 1024
    report = json.loads((out / "eigenpatch_report.json").read_text())
    step = report["steps"][0]
    per_layer = step.get("layer_by_layer", {}).get("layer_seconds", [])
    return {
        "method": method,
        "layers": len(per_layer),
        "seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "layer_seconds_median": round(sorted(per_layer)[len(per_layer) // 2], 2) if per_layer else None,
        "input_weights_bytes": report["input_weights_bytes"],
        "weights_bytes": report["weights_bytes"],
        "command": " ".join(cmd[1:]),
    }


def loads(out: Path) -> bool:
    """The output loads (in bf16 and whole: half the parameters are gone) and gives finite logits."""
    import eigenpatch

    model = eigenpatch.load(out, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    del model
    return bool(torch.isfinite(logits).all())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="7b", help="widths of the model built (default 7b)")
    p.add_argument("--layers", type=int, default=32, help="depth of the model built (default 32, as both shapes)")
    p.add_argument("--methods", nargs="+", default=["svd"], help="--method values to run (default: svd)")
    p.add_argument("--calib-layers", type=int, default=8, help="layers the calibrated run keeps (extrapolated)")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows (default 8; patch-model's: 128)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per window (default 256; patch-model's: 512)")
    p.add_argument("--keep", action="store_true", help="keep the compressed outputs")
    p.add_argument("--out", type=Path, help="results file (default bench/results/scale[-SHAPE].json)")
    args = p.parse_args()
    name = f"llama-{args.shape}-shape-random-{args.layers}l"
    folder = build(cache_dir() / "bench" / name, args.layers, args.shape)
    rows = []
    for method in args.methods:
        needs_text = calibrated(method)
        src = truncated(folder, args.calib_layers) if needs_text and args.calib_layers < args.layers else folder
        calib = ["--calib-windows", str(args.calib_windows), "--calib-seq-len", str(args.calib_seq_len)]
        fisher = ["--fisher-windows", str(min(8, args.calib_windows))] if args.calib_windows < 32 else []
        extra = calib + (fisher if "+" in method else []) if needs_text else []
        out = cache_dir() / "bench" / f"scale-out-{args.shape}-{method.replace('+', '-').replace(':', '-')}"
        row = compress(src, method, out, extra)
        row["output_loads"] = loads(out)
        if row["layers"] and row["layers"] < args.layers:
            row["extrapolated_seconds"] = round(row["seconds"] / row["layers"] * args.layers)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(out)
        print(json.dumps(row))
    table = [
        [
            r["method"], f"{r['layers']}/{args.layers}", fmt_bytes(r["input_weights_bytes"]),
            fmt_bytes(r["weights_bytes"]), fmt_bytes(r["peak_rss_bytes"]), f"{r['layer_seconds_median']} s",
            f"{r['seconds']} s",
            f"{r.get('extrapolated_seconds', '')}", "yes" if r["output_loads"] else "NO",
        ]
        for r in rows
    ]  # fmt: skip
    head = ["method", "layers", "input", "output", "peak RSS", "s/layer", "total", "32-layer est. s", "loads"]
    print(format_table(head, table))
    result = {"shape": args.shape, "widths": SHAPES[args.shape], "layers": args.layers, "runs": rows}
    write_result(args.out or RESULTS / ("scale.json" if args.shape == "7b" else f"scale-{args.shape}.json"), result)


if __name__ == "__main__":
    main()
