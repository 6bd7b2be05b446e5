"""Load and abuse: `eigenpatch serve` under rounds of concurrent good and malformed requests.

    python bench/serve_load.py --patched patched/smollm2-135m-loss-fwhiten-c0.5
    python bench/serve_load.py                          # patches --compress 0.5 itself (quick calibration)

The server is started as a user would (``eigenpatch serve DIR --steer sentiment=FILE``, bf16).
Each of ``--rounds`` rounds sends ``--concurrency`` requests at once: about three in four are
well-formed (completions from text or token ids, chat, per-request steering, sampled ``n = 2``,
``logprobs``), the rest malformed, one of each kind in turn: truncated JSON, negative and huge
``max_tokens``, a prompt longer than the context, out-of-vocabulary token ids, an unknown
steering vector, too strong or non-numeric steering, a huge ``n``.

Reported: errors among the well-formed requests (must be 0), malformed requests answered with
something other than 4xx (must be 0), p50/p99 latency of the well-formed ones, and the server's
RSS (its whole process group) after each round: growth from round 1 to the last must stay under
5 %. Last, one request asks for ``n = 10000`` while a small request is timed next to it: the
launcher caps ``n`` at 128, so it gets 400 at once. ``--uncapped-n`` lifts the cap to vLLM's own
(16,384) and drops that kind from the rounds, to show what such a request does without it. Prints
a table and writes ``bench/results/serve_load.json`` (``serve_load_uncapped.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from results_io import RESULTS, write_result
from serve_throughput import free_port, tree_rss

from eigenpatch.serving.launcher import serve, stop
from eigenpatch.table import fmt_bytes, fmt_float, format_table
from eigenpatch.zoo import resolve_text

MAX_MODEL_LEN = 1024
#: RSS growth from the first round to the last that counts as a leak
GROWTH_LIMIT = 0.05
#: how long the n = 10000 request (and the small one next to it) may take before we give up
HUGE_N_WAIT = 300


def send(url: str, body: bytes, timeout: float = 600) -> tuple[int, float, dict[str, Any] | None]:
    """(HTTP status, seconds, JSON reply or None) of one POST to ``url``; status 0: no answer in time."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, time.perf_counter() - start, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, time.perf_counter() - start, None
    except (TimeoutError, urllib.error.URLError):  # no answer within timeout: status 0
        return 0, time.perf_counter() - start, None


def good_requests(name: str, prompts: list[str], ids: list[list[int]]) -> list[tuple[str, dict[str, Any], int]]:
    """(endpoint, body, completion tokens expected per choice) of the well-formed kinds."""
    base = {"model": name, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    out: list[tuple[str, dict[str, Any], int]] = []
    for i, (prompt, tokens) in enumerate(zip(prompts, ids, strict=True)):
        kind = i % 6
        if kind == 0:
            out.append(("completions", {**base, "prompt": prompt}, 24))
        elif kind == 1:
            out.append(("completions", {**base, "prompt": tokens, "max_tokens": 8, "logprobs": 2}, 8))
        elif kind == 2:
            chat = {**base, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
            out.append(("chat/completions", chat, 16))
        elif kind == 3:
            steer = {"vllm_xargs": {"steer": "sentiment", "steer_strength": 1.0}}
            out.append(("completions", {**base, "prompt": prompt, **steer}, 24))
        elif kind == 4:
            sampled = {**base, "prompt": prompt, "temperature": 0.8, "seed": i, "n": 2, "max_tokens": 12}
            out.append(("completions", sampled, 12))
        else:
            out.append(("completions", {**base, "prompt": prompt, "max_tokens": 48}, 48))
    return out


def bad_requests(name: str, vocab: int) -> list[tuple[str, str, bytes]]:
    """(kind, endpoint, raw body) of every malformed kind; each must get a 4xx."""
    base = {"model": name, "prompt": "The fire spread", "max_tokens": 8}

    def body(**change: Any) -> bytes:
        return json.dumps({**base, **change}).encode()

    return [
        ("truncated JSON", "completions", b'{"model": "x", "prompt": '),
        ("max_tokens -1", "completions", body(max_tokens=-1)),
        ("max_tokens 10^9", "completions", body(max_tokens=10**9)),
        ("prompt > context", "completions", body(prompt=[11] * (MAX_MODEL_LEN + 8))),
        ("token id >= vocab", "completions", body(prompt=[1, 2, vocab + 7])),
        ("unknown steering", "completions", body(vllm_xargs={"steer": "nope"})),
        ("steering too strong", "completions", body(vllm_xargs={"steer": "sentiment", "steer_strength": 100})),
        ("steering not a number", "completions", body(vllm_xargs={"steer": "sentiment", "steer_strength": "x"})),
        ("n = 10000", "completions", body(n=10000, temperature=1.0)),
        ("no messages", "chat/completions", json.dumps({"model": name, "max_tokens": 4}).encode()),
    ]


def one_round(url: str, good: list, bad: list, concurrency: int) -> dict[str, Any]:
    """``concurrency`` requests at once, one malformed after every three well-formed."""
    jobs: list[tuple[str, Any]] = []
    g = b = 0
    while len(jobs) < concurrency:
        if len(jobs) % 4 == 3:
            jobs.append(("bad", bad[b % len(bad)]))
            b += 1
        else:
            jobs.append(("good", good[g % len(good)]))
            g += 1

    def run(job: tuple[str, Any]) -> tuple[str, Any, int, float, dict[str, Any] | None]:
        what, spec = job
        endpoint, body = (spec[0], json.dumps(spec[1]).encode()) if what == "good" else (spec[1], spec[2])
        return (what, spec, *send(f"{url}/v1/{endpoint}", body))

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(run, jobs))
    good_errors, bad_accepted, latencies = [], [], []
    for what, spec, status, seconds, reply in results:
        if what == "good":
            choices = len((reply or {}).get("choices", []))
            tokens = (reply or {}).get("usage", {}).get("completion_tokens")
            n = spec[1].get("n", 1)
            if status != 200 or choices != n or tokens != spec[2] * n:  # every choice ran its full length
                good_errors.append(f"{spec[0]}: HTTP {status}, {choices} choices, {tokens} tokens")
            latencies.append(seconds)
        elif not 400 <= status < 500:
            bad_accepted.append(f"{spec[0]}: {status}")
    latencies.sort()
    return {"good": g, "bad": b, "good_errors": good_errors, "bad_not_4xx": bad_accepted, "latencies": latencies}


def p99(sorted_values: list[float]) -> float:
    return sorted_values[int(0.99 * (len(sorted_values) - 1))]


def huge_n(url: str, name: str, pgid: int) -> dict[str, Any]:
    """One request for n = 10000 while a small request is timed next to it."""
    body = json.dumps({"model": name, "prompt": "The fire", "max_tokens": 16, "n": 10000, "temperature": 1.0})
    probe = json.dumps({"model": name, "prompt": "The fire", "max_tokens": 8, "temperature": 0.0}).encode()
    before = tree_rss(pgid)
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(send, f"{url}/v1/completions", body.encode(), HUGE_N_WAIT)
        time.sleep(1.0)
        small = send(f"{url}/v1/completions", probe, HUGE_N_WAIT)
        status, seconds, _ = big.result()
    return {
        "status": status,
        "seconds": seconds,
        "probe_seconds": small[1],
        "rss_before": before,
        "rss_after": tree_rss(pgid),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patched", type=Path, help="patched checkpoint (default: patch --compress 0.5 here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true", help="serve with --enforce-eager (starts minutes sooner)")
    parser.add_argument("--uncapped-n", action="store_true", help="serve with vLLM's own n limit (16,384)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("serve_load_uncapped.json" if args.uncapped_n else "serve_load.json")
    if args.uncapped_n:
        os.environ["VLLM_MAX_N_SEQUENCES"] = "16384"  # the launcher keeps a value the user set

    import eigenpatch
    from eigenpatch.hf_io import load_model
    from eigenpatch.patchers.prompts import read_prompts
    from eigenpatch.patchers.steer.vectors import build_steering_vectors

    words = resolve_text("wiki", split="eval").split()
    prompts = [" ".join(words[i * 29 : i * 29 + 8 + (i * 13) % 90]) for i in range(48)]
    data = Path(__file__).parent / "data" / "steer"
    with tempfile.TemporaryDirectory(prefix="eigenpatch-serve-load-") as tmp:
        model, tokenizer, _ = load_model(args.patched or args.model)
        if args.patched is None:
            from eigenpatch.patchers import LowRank

            config = LowRank(ratio=0.5, calib_windows=32, fisher_windows=8)
            eigenpatch.patch(model, config, tokenizer=tokenizer, calib_text=resolve_text("wiki", split="calib"))
            checkpoint = eigenpatch.save(model, Path(tmp) / f"{args.model}-c0.5", tokenizer=tokenizer)
        else:
            checkpoint = args.patched
        pos, neg = read_prompts(data / "positive.txt"), read_prompts(data / "negative.txt")
        vectors = build_steering_vectors(model, tokenizer, pos, neg, [10, 11, 12], subspace="none")
        steer_file = vectors.save(Path(tmp) / "sentiment.safetensors")
        vocab = model.config.vocab_size
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        del model

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        extra = ["--dtype", args.dtype, "--max-model-len", str(MAX_MODEL_LEN), *(["--enforce-eager"] * args.eager)]
        process = serve(checkpoint, port=port, extra=extra, foreground=False, steer=[f"sentiment={steer_file}"])
        try:
            good, bad = good_requests(checkpoint.name, prompts, ids), bad_requests(checkpoint.name, vocab)
            if args.uncapped_n:
                bad = [b for b in bad if not b[0].startswith("n =")]
            one_round(url, good[:8], bad, 8)  # warm-up: first-use allocations are not a leak
            rounds = []
            for r in range(args.rounds):
                result = one_round(url, good, bad, args.concurrency)
                time.sleep(2.0)  # let the engine settle before reading memory
                result["rss"] = tree_rss(process.pid)
                rounds.append(result)
                print(f"round {r + 1}: {len(result['good_errors'])} errors, RSS {fmt_bytes(result['rss'])}")
            big = huge_n(url, checkpoint.name, process.pid)
        finally:
            stop(process)

    latencies = sorted(t for r in rounds for t in r["latencies"])
    first = rounds[0]["rss"]
    table = [
        [
            str(i + 1),
            f"{r['good']} + {r['bad']}",
            str(len(r["good_errors"])),
            str(len(r["bad_not_4xx"])),
            fmt_float(statistics.median(r["latencies"]), 2),
            fmt_float(p99(r["latencies"]), 2),
            fmt_bytes(r["rss"]),
            f"{100 * (r['rss'] / first - 1):+.1f} %",
        ]
        for i, r in enumerate(rounds)
    ]
    headers = ["round", "good + malformed", "good errors", "malformed not 4xx", "p50 s", "p99 s", "RSS", "vs round 1"]
    print(format_table(headers, table))
    growth = rounds[-1]["rss"] / first - 1
    errors = sum(len(r["good_errors"]) + len(r["bad_not_4xx"]) for r in rounds)
    p50, p99_all = statistics.median(latencies), p99(latencies)
    print(f"all rounds: p50 {p50:.2f} s, p99 {p99_all:.2f} s", end="; ")
    print(f"RSS growth {100 * growth:+.1f} % (limit {GROWTH_LIMIT:.0%})")
    for r in rounds:
        for line in r["good_errors"] + r["bad_not_4xx"]:
            print(f"  unexpected: {line}")
    print(f"n = 10000: HTTP {big['status'] or 'none'} after {big['seconds']:.1f} s; a small request meanwhile took")
    print(f"  {big['probe_seconds']:.1f} s; RSS {fmt_bytes(big['rss_before'])} -> {fmt_bytes(big['rss_after'])}")
    result = {
        "bench": "serve_load",
        "checkpoint": checkpoint.name,
        "dtype": args.dtype,
        "eager": args.eager,
        "concurrency": args.concurrency,
        "rounds": rounds,
        "p50_seconds": p50,
        "p99_seconds": p99_all,
        "rss_growth": growth,
        "unexpected": errors,
        "huge_n": big,
        "kinds_malformed": [kind for kind, _, _ in bad],
        "n_cap": os.environ.get("VLLM_MAX_N_SEQUENCES", "128 (launcher default)"),
    }
    write_result(args.out, result)
    if errors or growth >= GROWTH_LIMIT:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
