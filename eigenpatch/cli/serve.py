"""``eigenpatch serve``: the patched checkpoint behind vLLM's OpenAI endpoint (needs a vLLM extra)."""

from __future__ import annotations

import argparse
from typing import Any

SERVE_EXAMPLES = """examples:
  eigenpatch serve patched/smollm2-135m-loss-fwhiten-c0.3
  eigenpatch serve patched/smollm2-135m-loss-fwhiten-c0.3 --port 8001 --dtype bfloat16 --max-model-len 2048
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2-135m-loss-fwhiten-c0.3", "prompt": "The capital of France is", "max_tokens": 16}'

Per-request steering: start with named vectors (from `eigenpatch steer build`), then pick one per request
through the OpenAI extra body; steered and unsteered requests share batches, and steered ones never
share prefix-cache blocks with others:
  eigenpatch serve DIR --steer happy=happy.safetensors --steer formal=formal.safetensors
  curl ... -d '{"model": ..., "prompt": "...", "vllm_xargs": {"steer": "happy", "steer_strength": 2}}'
  (Python client: extra_body={"vllm_xargs": {"steer": "happy", "steer_strength": 2}})

Any option not listed above goes to vLLM unchanged (--dtype, --max-model-len, --tensor-parallel-size, ...).
On CPU the KV cache gets VLLM_CPU_KVCACHE_SPACE=1 (GiB) unless you set it or --kv-cache-memory-bytes."""


def run_serve(args: argparse.Namespace) -> int:
    from eigenpatch.serving.launcher import serve

    try:
        serve(  # in the foreground: returns only by an exception (Ctrl-C, a signal, a server that stopped)
            args.model,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            extra=args.extra,
            startup_timeout=args.startup_timeout,
            steer=args.steer,
            steer_max_strength=args.steer_max_strength,
        )
    except KeyboardInterrupt:  # the server has been stopped already
        return 130
    return 0


def add_serve_command(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a patched checkpoint with vLLM's OpenAI-compatible server",
        description="Start vLLM's OpenAI-compatible server on DIR with the eigenpatch plugin active, wait until "
        "/health answers, then stay in the foreground (Ctrl-C stops it).",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "model", metavar="DIR", help="checkpoint folder written by patch-model (or any HF folder, or a zoo name)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require this bearer token on every request")
    s.add_argument("--startup-timeout", type=float, default=900, metavar="S", help="give up after S seconds")
    s.add_argument(
        "--steer",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a steering vector file requests may select by NAME (repeatable; see below)",
    )
    s.add_argument(
        "--steer-max-strength",
        type=float,
        default=16.0,
        metavar="S",
        help="requests asking for |strength| > S get 400 (%(default)s)",
    )
    s.set_defaults(run=run_serve, accepts_extra=True)
