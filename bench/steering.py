"""Steering SmolLM2-135M: effect vs perplexity cost, spectral-subspace vs unrestricted vectors.

    python bench/steering.py                          # sentiment vectors on layers 10-12 (about 10 min on 2 cores)
    python bench/steering.py --layers 12 --strengths 1 2 4 8

Vectors: ``bench/data/steer/{positive,negative}.txt`` (32 paired sentences each), mean difference
of the sets' mean activations at each layer, then (a) unrestricted, (b) projected on the layer's
principal subspace with Gavish-Donoho's rank, (c) projected on a fixed top-``--fixed-rank``
subspace, (d) the complement of (b): what (b) removes, i.e. the contrast along the layer's
*low*-variance directions. Each is added at every position, times each strength.

Effect: over ``NEUTRAL`` prompts (none of them in the vector's prompt sets), the mean next-token
log-probability of held-out positive words minus that of held-out negative words (words that
appear in neither prompt file), as a shift from the unsteered model: how far the steering tilts
the next word towards the positive set. Cost: perplexity of the steered model on 4,096 wiki eval
tokens (disjoint from the calibration text the subspaces come from). "Same effect, lower cost":
for each restricted vector, the perplexity at the strength where its effect matches the
unrestricted vector's (linear interpolation on the measured grid).

``--throughput``: instead, vLLM's serving throughput (SmolLM2, bf16, ``--concurrency`` requests
of ``--max-tokens`` greedy tokens at once) of a server started without vectors and of one started
with ``--steer sentiment=...``, with 0 %, 50 % and 100 % of the requests steered; added to the same
JSON under ``throughput``.

Prints a table, writes ``bench/results/steering.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from results_io import RESULTS, write_result

from eigenpatch.calibration import calibration_windows
from eigenpatch.evaluate import perplexity, tokenize
from eigenpatch.format.interventions import HiddenShift, attach, decoder_layers, detach
from eigenpatch.hf_io import load_model
from eigenpatch.patchers.prompts import read_prompts
from eigenpatch.patchers.steer.vectors import (
    build_steering_vectors,
    contrast_direction,
    parse_layers,
    principal_subspaces,
    prompt_activations,
)
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text

DATA = Path(__file__).parent / "data" / "steer"
NEUTRAL = [
    "The food at the restaurant was",
    "I thought the film was",
    "Overall, the trip was",
    "The new phone is",
    "My day at work was",
    "The hotel room was",
    "Honestly, the book was",
    "The weather this weekend was",
    "Our new neighbours are",
    "The meeting this morning was",
    "The concert last night was",
    "In my opinion, the game was",
    "The service on the train was",
    "The result of the election was",
    "The new teacher is",
    "The city centre is",
]
POSITIVE_WORDS = [" good", " nice", " fine", " pleasant", " perfect", " fun", " positive", " best"]
NEGATIVE_WORDS = [" bad", " poor", " boring", " unpleasant", " horrible", " sad", " negative", " worst"]


def word_ids(tokenizer: Any, words: list[str], banned: str) -> list[int]:
    """First-token ids of ``words`` that do not occur in the vector's prompt text (held out)."""
    ids = []
    for w in words:
        if w.strip().lower() in banned:
            continue
        ids.append(tokenizer(w, add_special_tokens=False)["input_ids"][0])
    return sorted(set(ids))


@torch.no_grad()
def sentiment_tilt(model: torch.nn.Module, prompts: list[torch.Tensor], pos: list[int], neg: list[int]) -> float:
    """Mean over prompts of mean log p(positive words) - mean log p(negative words), next token."""
    tilts = []
    for ids in prompts:
        logp = torch.log_softmax(model(ids[None]).logits[0, -1].double(), -1)
        tilts.append(float(logp[pos].mean() - logp[neg].mean()))
    return sum(tilts) / len(tilts)


def steer(model: torch.nn.Module, vectors: dict[int, torch.Tensor], strength: float) -> None:
    for layer, v in vectors.items():
        attach(decoder_layers(model)[layer], HiddenShift.from_vector(strength * v.float()))


def unsteer(model: torch.nn.Module, layers: list[int]) -> None:
    for layer in layers:
        detach(decoder_layers(model)[layer], "post", "shift")


def matched_cost(rows: list[dict[str, Any]], target: float) -> float | None:
    """Perplexity where ``effect`` first reaches ``target`` going up in strength (linear
    interpolation between grid points); None if it never does."""
    pts = sorted((r["strength"], r["effect"], r["ppl"]) for r in rows)
    for (_, e0, p0), (_, e1, p1) in itertools.pairwise(pts):
        if e0 <= target <= e1 and e1 > e0:
            return p0 + (p1 - p0) * (target - e0) / (e1 - e0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="10-12")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--fixed-rank", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "steering.json")
    ap.add_argument("--variants", nargs="+", help="only these restricted variants (spectral, complement)")
    ap.add_argument("--throughput", action="store_true", help="measure vLLM throughput instead")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.throughput:
        return throughput(args)

    model, tokenizer, _ = load_model(args.model)
    layers = parse_layers(args.layers, len(decoder_layers(model)))
    pos_text, neg_text = read_prompts(DATA / "positive.txt"), read_prompts(DATA / "negative.txt")
    banned = " ".join(pos_text + neg_text).lower()
    pos_ids, neg_ids = word_ids(tokenizer, POSITIVE_WORDS, banned), word_ids(tokenizer, NEGATIVE_WORDS, banned)
    prompts = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for p in NEUTRAL]
    eval_ids = tokenize(tokenizer, resolve_text("wiki", "eval"), args.eval_tokens)
    windows = calibration_windows(tokenizer, resolve_text("wiki", "calib"), args.calib_windows, 256)

    start = time.perf_counter()
    pos_act = prompt_activations(model, tokenizer, pos_text, layers)
    neg_act = prompt_activations(model, tokenizer, neg_text, layers)
    raw = {L: contrast_direction(pos_act[L], neg_act[L]) for L in layers}
    subs = principal_subspaces(model, windows, layers)  # ranks set by Gavish-Donoho
    gd_ranks = [subs[L].rank for L in layers]
    spectral = {L: subs[L].restrict(raw[L]) for L in layers}  # what `eigenpatch steer build` writes
    fixed = {}
    for L in layers:
        subs[L].rank = args.fixed_rank
        fixed[L] = subs[L].restrict(raw[L])
    variants = {
        "unrestricted": raw,
        f"spectral (Gavish-Donoho, k={'/'.join(map(str, gd_ranks))})": spectral,
        f"spectral (top {args.fixed_rank})": fixed,
        "complement (outside the Gavish-Donoho subspace)": {L: raw[L] - spectral[L] for L in layers},
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k == "unrestricted" or k.split(" (")[0] in args.variants}
    build_seconds = time.perf_counter() - start

    base_tilt = sentiment_tilt(model, prompts, pos_ids, neg_ids)
    base_ppl = perplexity(model, eval_ids, seq_len=512, show_progress=False).ppl
    # a partial run (--variants) adds to the previous results and reuses their unrestricted rows
    previous = json.loads(args.out.read_text()) if args.variants and args.out.is_file() else {}
    results: dict[str, Any] = {"base": {"tilt": base_tilt, "ppl": base_ppl}, "variants": {}}
    results["variants"] = {k: v for k, v in previous.get("variants", {}).items() if k not in variants}
    table = [["none", "-", "-", "0", f"{base_ppl:.2f}", "-"]]
    for name, vectors in variants.items():
        if name == "unrestricted" and name in previous.get("variants", {}):
            results["variants"][name] = previous["variants"][name]
            continue
        norm = sum(float(v.norm()) for v in vectors.values()) / len(vectors)
        kept = sum(float(vectors[L].norm() ** 2 / raw[L].norm() ** 2) for L in layers) / len(layers)
        rows = [{"strength": 0.0, "effect": 0.0, "ppl": base_ppl}]
        for s in args.strengths:
            steer(model, vectors, s)
            effect = sentiment_tilt(model, prompts, pos_ids, neg_ids) - base_tilt
            ppl = perplexity(model, eval_ids, seq_len=512, show_progress=False).ppl
            unsteer(model, layers)
            rows.append({"strength": s, "effect": effect, "ppl": ppl})
            table.append([name, f"{norm:.2f}", f"{kept:.3f}", f"{s:g}", f"{ppl:.2f}", f"{effect:+.3f}"])
            print(table[-1], flush=True)
        results["variants"][name] = {"mean_norm": norm, "energy_kept": kept, "rows": rows}
    print(format_table(["vector", "mean norm", "energy kept", "strength", "ppl wiki", "tilt shift"], table))

    reference = results["variants"]["unrestricted"]["rows"]
    comparison = []
    for name, entry in results["variants"].items():
        if name == "unrestricted":
            continue
        for row in reference[1:]:
            cost = matched_cost(entry["rows"], row["effect"])
            comparison.append(
                [name, f"{row['effect']:+.3f}", f"{row['ppl']:.2f}", "-" if cost is None else f"{cost:.2f}"]
            )
    print()
    print(format_table(["restricted vector", "effect", "ppl unrestricted", "ppl restricted (matched)"], comparison))
    results["matched"] = comparison
    write_result(
        args.out,
        {
            "bench": "steering",
            "model": args.model,
            "layers": layers,
            "positive_words": tokenizer.convert_ids_to_tokens(pos_ids),
            "negative_words": tokenizer.convert_ids_to_tokens(neg_ids),
            "neutral_prompts": len(NEUTRAL),
            "eval_tokens": args.eval_tokens,
            "build_seconds": round(build_seconds, 1),
            **{k: v for k, v in previous.items() if k == "throughput"},
            **results,
        },
    )


def throughput(args: argparse.Namespace) -> None:
    """Tokens/s of a server without vectors and of one with a vector, 0 / 50 / 100 % steered."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from serve_throughput import complete, free_port

    from eigenpatch.serving.launcher import serve, stop
    from eigenpatch.zoo import resolve_model

    model, tokenizer, folder = load_model(args.model)
    layers = parse_layers(args.layers, len(decoder_layers(model)))
    pos_text, neg_text = read_prompts(DATA / "positive.txt"), read_prompts(DATA / "negative.txt")
    words = resolve_text("wiki", split="eval").split()
    prompts = [" ".join(words[i * 40 : i * 40 + 32]) for i in range(args.concurrency)]
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="eigenpatch-steer-bench-") as tmp:
        vectors = build_steering_vectors(model, tokenizer, pos_text, neg_text, layers)
        vec = vectors.save(Path(tmp) / "sentiment.safetensors")
        del model
        for label, steer in (("no vectors loaded", ()), ("sentiment loaded", (f"sentiment={vec}",))):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            extra = ["--dtype", "bfloat16", "--max-model-len", "1024"]
            process = serve(resolve_model(folder), port=port, extra=extra, foreground=False, steer=steer)
            try:
                fractions = (0.0,) if not steer else (0.0, 0.5, 1.0)
                for fraction in fractions:
                    steered = round(fraction * args.concurrency)
                    steer_args = {"vllm_xargs": {"steer": "sentiment", "steer_strength": 1.0}}
                    extras = [steer_args if i < steered else {} for i in range(len(prompts))]

                    def one(i: int, url: str = url, extras: list[dict] = extras) -> int:
                        return complete(url, folder.name, prompts[i], args.max_tokens, **extras[i])

                    complete(url, folder.name, prompts[0], 8, **extras[0])  # warm-up
                    best = 0.0
                    for _ in range(args.rounds):
                        t = time.perf_counter()
                        with ThreadPoolExecutor(args.concurrency) as pool:
                            tokens = sum(pool.map(one, range(len(prompts))))
                        best = max(best, tokens / (time.perf_counter() - t))
                    key = f"{label}, {fraction:.0%} steered"
                    rows[key] = best
                    print(f"{key}: {best:.1f} tok/s", flush=True)
            finally:
                stop(process)
    base = rows["no vectors loaded, 0% steered"]
    table = [[k, f"{v:.1f}", f"{v / base:.3f}"] for k, v in rows.items()]
    print(format_table(["server", "tok/s", "x no vectors"], table))
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"bench": "steering"}
    result.pop("machine", None)
    result["throughput"] = {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "dtype": "bfloat16",
        "layers": layers,
        "tok_s": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
