"""``eigenpatch export`` and ``eigenpatch run-onnx``: the edge-deployment commands.

Kept apart from :mod:`eigenpatch.cli` so the patching CLI does not import onnx; these need the
``export`` extra (``pip install -e .[export]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from eigenpatch.errors import UsageError

EXIT_VERIFY_FAILED = 1


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UsageError("ONNX export needs the export extra: pip install -e '.[export]'") from None


def run_export(args: argparse.Namespace) -> int:
    _require_onnx()
    from eigenpatch.export.onnx import ExportFailed, export_onnx
    from eigenpatch.export.precision import check_block
    from eigenpatch.hf_io import load_model

    if args.tensorrt:
        from eigenpatch.export.tensorrt import tensorrt_unavailable

        if (reason := tensorrt_unavailable()) is not None:  # before loading anything
            raise UsageError(reason)
    precision = args.weights or ("dynamic-int8" if args.dynamic_int8 else "float16" if args.fp16 else "float32")
    if args.portable and args.weights:
        raise UsageError("--portable keeps standard ONNX ops, but --weights stores MatMulNBits, an ONNX Runtime op")
    check_block(args.block)
    model, tokenizer, _ = load_model(args.model, trust_remote_code=args.trust_remote_code)
    try:
        meta = export_onnx(
            model,
            args.onnx,
            tokenizer=tokenizer,
            verify=not args.no_verify,
            force=args.force,
            precision=precision,
            tensorrt=args.tensorrt,
            block=args.block,
            quantize_head=not args.fp32_head,
            calib_windows=args.calib_windows,
            calib_text=args.calib,
            quantize_embedding=not args.fp32_embedding,
            dense_bits=args.dense_bits,
            portable=args.portable,
        )
    except ExportFailed as exc:
        print(f"eigenpatch export: failed: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    parity = meta.get("parity")
    print(f"wrote {args.onnx} ({meta['num_layers']} layers, KV cache, export {meta['export_seconds']} s)")
    if parity:
        print(
            f"verified against PyTorch: max |logit diff| {parity['max_abs_logit_diff']:.2e} on {parity['prompts']} "
            f"prompts; {parity['greedy_tokens_matched']} greedy tokens identical through the KV cache"
        )
    if "precision" in meta:
        p = meta["precision"]
        kind = p["kind"]
        if "block" in p:
            counts = ", ".join(f"{n} {b}" for b, n in p["matmuls_by_bits"].items())
            kind += (
                f" ({p['method']}, blocks of {p['block']}; MatMuls: {counts}; head {p['head']}, "
                f"embedding {p['embedding']})"
            )
        print(
            f"{kind}: {p['fp32_bytes'] / 1e6:.1f} MB -> {p['bytes'] / 1e6:.1f} MB; max |logit diff| vs PyTorch "
            f"fp32 {p['max_abs_logit_diff']:.2e}; greedy steps agreeing per prompt: {p['greedy_steps_agreeing']} "
            f"of {p['of']}"
        )
    if "tensorrt" in meta:
        t = meta["tensorrt"]
        print(f"TensorRT engine built with {t['builder']} in {t['build_seconds']} s")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    _require_onnx()
    from eigenpatch.export.runtime import OnnxCausalLM

    runner = OnnxCausalLM(args.model, provider=args.provider)
    kwargs: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    text = runner.generate_text(args.prompt, **kwargs)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "providers": runner.providers}))
    else:
        print(args.prompt + text)
    return 0


def add_export_commands(sub: Any) -> None:
    from eigenpatch.export.precision import (
        BLOCK_SIZES,
        DEFAULT_BLOCK,
        DEFAULT_WEIGHT_WINDOWS,
        WEIGHT_BITS,
        WEIGHT_SEQ_LEN,
    )

    e = sub.add_parser(
        "export",
        help="export a (patched) model to ONNX with a KV cache, verified against PyTorch",
        description="Lower MODEL to ONNX (KV cache in and out, dynamic batch/sequence), then check logits and "
        "32 greedy tokens against PyTorch; exit code 1 when they differ. --weights int8|int4 (CPU and edge), "
        "--dynamic-int8 or --fp16 (GPU) then shrink the verified graph and report their parity against PyTorch; "
        "--tensorrt builds an engine on a GPU machine.",
    )
    e.add_argument("model", help="model folder (patched or not), zoo name or hub id")
    e.add_argument("--onnx", required=True, metavar="OUT_DIR", help="output folder")
    e.add_argument("--no-verify", action="store_true", help="skip the parity check (not recommended)")
    e.add_argument("--force", action="store_true", help="replace an existing output folder")
    precision = e.add_mutually_exclusive_group()
    precision.add_argument(
        "--weights",
        choices=list(WEIGHT_BITS),
        help="weight-only int8 or int4 MatMul weights (ONNX Runtime MatMulNBits, factor pairs included; "
        "activations stay fp32) after the fp32 checks: the edge formats",
    )
    precision.add_argument(
        "--dynamic-int8",
        "--int8",  # its name until weight-only formats came: it quantizes activations too
        action="store_true",
        help="ONNX Runtime dynamic quantization (int8 weights *and* activations, per call) after the fp32 checks; "
        "harsh on SmolLM2 (docs/export.md), prefer --weights int8",
    )
    precision.add_argument(
        "--fp16", action="store_true", help="fp16 weights, activations and KV cache (GPU targets) after the fp32 checks"
    )
    e.add_argument(
        "--block",
        type=int,
        default=DEFAULT_BLOCK,
        help=f"with --weights: input rows per scale, one of {', '.join(map(str, BLOCK_SIZES))} "
        f"(default {DEFAULT_BLOCK}; larger is smaller and coarser)",
    )
    e.add_argument(
        "--fp32-head",
        action="store_true",
        help="with --weights: keep the output head in fp32 (by default it is quantized too, a tied head from the "
        "embedding table: it is a small model's largest matrix, read at every decode step)",
    )
    e.add_argument(
        "--fp32-embedding",
        action="store_true",
        help="with --weights: keep the embedding table fp32 (by default the lookup reads it at int8, "
        "GatherBlockQuantized)",
    )
    e.add_argument(
        "--dense-bits",
        type=int,
        choices=(4, 8, 32),
        help="with --weights int4: bits for the Linears a compressed model kept dense, its most sensitive "
        "(default 32: fp32, as accurate as 8 and faster in ONNX Runtime; a model without factor pairs is all int4)",
    )
    e.add_argument("--calib", default="wiki", help="with --weights: GPTQ calibration text, wiki or a .txt file")
    e.add_argument(
        "--calib-windows",
        type=int,
        default=DEFAULT_WEIGHT_WINDOWS,
        help=f"with --weights: GPTQ calibration windows of {WEIGHT_SEQ_LEN} tokens (%(default)s); 0 rounds "
        "to the nearest level instead (fast, worse)",
    )
    e.add_argument(
        "--portable",
        action="store_true",
        help="standard ONNX ops only, for runtimes other than ONNX Runtime (by default each RMSNorm and the "
        "residual add before it become one ONNX Runtime SkipSimplifiedLayerNormalization: 1-5%% faster decode)",
    )
    e.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build a TensorRT engine (ORT TensorRT EP or trtexec; needs an NVIDIA GPU)",
    )
    e.add_argument("--trust-remote-code", action="store_true")
    e.set_defaults(run=run_export)
    r = sub.add_parser("run-onnx", help="generate text from an exported model with ONNX Runtime")
    r.add_argument("model", help="folder written by eigenpatch export")
    r.add_argument("prompt")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--sample", action="store_true", help="top-p sampling instead of greedy")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=0.9)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--provider", help="force an execution provider: CPU, CUDA, Tensorrt (default: best available)")
    r.add_argument("--json", action="store_true", help="print a JSON object instead of plain text")
    r.set_defaults(run=run_onnx)
