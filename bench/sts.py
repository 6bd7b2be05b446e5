"""STS on a real text encoder: zero-shot topic classification of Wikipedia sentences, clean and shifted.

    python bench/sts.py                         # 40 topics x 5 sentences, 3 seeds (about 30 min on 2 cores)
    python bench/sts.py --splits context --methods zero-shot sts --seeds 5

Task (built offline from the ``wiki`` text, calibration and eval articles alike: nothing is trained):
each of ``--classes`` articles is a class named by its title; inputs are ``--per-class`` sentences of
at least 8 words from its body; a prediction is correct when the sentence is matched to its own
article's title (label prompt: ``"This text is about {title}."``). Two shifted splits of the same
sentences:

- **noisy**: truncated to their first 8 words, lower-cased, 8 % of the letters replaced at random
  (what a noisy front end — OCR, ASR, a phone keyboard — hands a classifier);
- **context**: each sentence between two unrelated sentences of the ``news`` eval text (what a
  scraper hands it: the relevant sentence inside surrounding page text).

Encoder: all-MiniLM-L6-v2 (zoo ``minilm-l6``), frozen. Methods, all with the same 64 views (word
crops and drops), confidence filter (10 %), loss (entropy of the kept views' mean prediction),
AdamW (lr ``--lr``) and 1 step:

- ``zero-shot``: the sentence against the prototypes;
- ``sts``: the spectral shift ``B gamma`` shared by the classes (``k`` by Gavish-Donoho);
- ``full``: every prototype gets its own free offset (``C x D`` numbers per sample);
- ``prompt``: the label prompt's context words ("This text is about") become free embeddings,
  optimized *through the encoder* (test-time prompt tuning, as TPT does for CLIP).

Also ``views only``: the same views, filter and averaging without any steering step, which
separates what the test-time *augmentation* buys from what the *steering* buys.

Per method: accuracy per seed (views differ by seed), mean, the margin over zero-shot with a 95 %
t-interval over seeds; the adaptation time per sample (view filtering, optimization and prediction
on views encoded once per seed and shared; label prompts and the basis are per label set, not
timed) and the total with the view encoding; the adaptation's memory per sample: the bytes of the
tensors autograd saves for the backward pass (counted by a ``saved_tensors_hooks`` pack hook) plus
AdamW's working set (16 bytes per learned number: value, gradient, two moments) — process RSS
cannot resolve allocations of a few KiB; and the exact number of values optimized per sample.
``--extra-lr``: ``sts`` and ``full`` again at a larger learning rate, since one AdamW step of 5e-3
moves each coefficient by at most 5e-3. Prints a table, writes ``bench/results/sts.json``; a run
replaces the (split, method) entries it measured and keeps the others (``--splits`` /
``--methods`` measure a part of the grid).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from results_io import RESULTS, write_result

from eigenpatch.patchers.sts.encoders import SentenceEncoder
from eigenpatch.patchers.sts.method import STS, confident_views, spectral_basis, steer_predict
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text

TEMPLATE = "This text is about {}."
T95 = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def build_task(n_classes: int, per_class: int, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """Titles, sentences and their labels from the wiki articles (fixed for every STS seed)."""
    text = resolve_text("wiki", "calib") + "\n" + resolve_text("wiki", "eval")
    rng = random.Random(seed)
    titles, sentences, labels = [], [], []
    for title, body in re.findall(r" = ([^\n]+?) = \n\n(.*?)(?=\n = |\Z)", text, flags=re.S):
        if "disambiguation" in title or title.startswith("List of") or len(titles) == n_classes:
            continue
        candidates = [s.strip() for s in re.split(r"(?<=[.!?])\s+", body.replace("\n", " "))]
        candidates = [s for s in candidates if 8 <= len(s.split()) <= 60 and title.split()[0] not in s]
        if len(candidates) < per_class:
            continue
        titles.append(re.sub(r"\s*\(.*\)", "", title))
        for s in rng.sample(candidates, per_class):
            sentences.append(s)
            labels.append(len(titles) - 1)
    return titles, sentences, labels


def in_context(sentence: str, rng: random.Random, others: list[str]) -> str:
    """``sentence`` between two random sentences of ``others``."""
    return f"{rng.choice(others)} {sentence} {rng.choice(others)}"


def news_sentences() -> list[str]:
    text = resolve_text("news", "eval").replace("\n", " ")
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 30]


def noisy(sentence: str, rng: random.Random, words: int = 8, noise: float = 0.08) -> str:
    chars = list(" ".join(sentence.split()[:words]).lower())
    for i, c in enumerate(chars):
        if c.isalpha() and rng.random() < noise:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(chars)


def prompt_tuning(encoder: SentenceEncoder, views: torch.Tensor, titles: list[str], config: STS) -> torch.Tensor:
    """Test-time prompt tuning: the template's context words are free input embeddings, one step of
    entropy minimization through the (frozen) encoder per sample."""
    model, tok = encoder.model, encoder.tokenizer
    context = TEMPLATE.split("{}")[0].strip()
    batch = tok([f"{context} {t}." for t in titles], padding=True, return_tensors="pt")
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    embed = model.get_input_embeddings()
    scale = config.logit_scale or encoder.logit_scale
    base = embed(batch["input_ids"]).detach()
    mask = batch["attention_mask"][..., None].float()
    out = []
    for sample in F.normalize(views.float(), dim=-1):

        def prototypes(ctx: torch.Tensor) -> torch.Tensor:
            x = torch.cat([base[:, :1], ctx.expand(len(titles), -1, -1), base[:, 1 + n_ctx :]], dim=1)
            states = model(inputs_embeds=x, attention_mask=batch["attention_mask"]).last_hidden_state
            return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

        ctx = base[:1, 1 : 1 + n_ctx].clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([ctx], lr=config.lr)
        with torch.enable_grad():
            protos = prototypes(ctx)
            keep = confident_views(scale * sample[None] @ protos.detach().T, config.keep)[0]
            for _ in range(config.steps):
                p = (scale * sample[keep] @ protos.T).softmax(-1).mean(0)
                loss = -(p * p.clamp_min(1e-12).log()).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                protos = prototypes(ctx)
        with torch.no_grad():
            out.append((scale * sample[keep] @ protos.T).softmax(-1).mean(0))
    return torch.stack(out)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (each storage once) while active."""

    def __init__(self) -> None:
        self.bytes, self._seen = 0, set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        # detached: returning ``t`` itself makes a saved output hold its own grad_fn, a cycle
        # through C++ autograd nodes that Python's collector cannot free (it leaked GBs)
        return t.detach()

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def adapt(
    method: str,
    encoder: SentenceEncoder,
    views: torch.Tensor,
    titles: list[str],
    config: STS,
    prototypes: torch.Tensor,
    basis: torch.Tensor,
) -> tuple[torch.Tensor, float, int]:
    """Probabilities, seconds and the largest autograd-saved bytes per input of a 32-input chunk for
    one method on pre-encoded views ``[N, V, D]``. The label prototypes and their basis are computed
    once per label set, outside the timing (the prompt method re-encodes the labels every step, inside)."""
    saved = 0
    scale = config.logit_scale or encoder.logit_scale
    if method == "views only":  # the filter and the averaging, no steering step
        method, config = "sts", STS(views=config.views, keep=config.keep, steps=0, seed=config.seed)
    start = time.perf_counter()
    out = []
    for i in range(0, len(views), 32):
        chunk = views[i : i + 32]
        with SavedBytes() as counter:
            if method == "prompt":
                with torch.inference_mode(False):
                    out.append(prompt_tuning(encoder, chunk.clone(), titles, config))
            else:
                out.append(steer_predict(chunk, prototypes, config, scale, method, basis))
        saved = max(saved, counter.bytes // len(chunk))
    seconds = time.perf_counter() - start
    return torch.cat(out), seconds, saved


def encode_views(encoder: SentenceEncoder, inputs: list[str], n_views: int, seed: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    views = torch.cat(
        [encoder.encode_views(inputs[i : i + 32], n_views, seed + b) for b, i in enumerate(range(0, len(inputs), 32))]
    )
    return views, time.perf_counter() - start


def learned_numbers(method: str, titles: list[str], config: STS, rank: int, encoder: SentenceEncoder) -> int:
    """Numbers optimized per sample (AdamW keeps 3 more of each: gradient and two moments)."""
    dim = encoder.model.config.hidden_size
    if method == "sts":
        return rank
    if method == "full":
        return len(titles) * dim
    if method == "prompt":
        return len(encoder.tokenizer(TEMPLATE.split("{}")[0].strip(), add_special_tokens=False)["input_ids"]) * dim
    return 0


SPLITS = ("clean", "noisy", "context")
METHODS = ["zero-shot", "views only", "sts", "full", "prompt"]


def build_splits(sentences: list[str]) -> dict[str, list[str]]:
    rng = random.Random(0)
    news = news_sentences()
    return {
        "clean": sentences,
        "noisy": [noisy(s, rng) for s in sentences],
        "context": [in_context(s, rng, news) for s in sentences],
    }


def measure(
    args: argparse.Namespace,
    encoder: SentenceEncoder,
    titles: list[str],
    prototypes: torch.Tensor,
    inputs: list[str],
    target: torch.Tensor,
) -> dict[str, dict[str, Any]]:
    """Every method on one split, every seed: accuracy, seconds, memory per sample."""
    basis = spectral_basis(prototypes)
    rank = basis.shape[1]
    results: dict[str, dict[str, Any]] = {}
    one_view, zs_view_seconds = encode_views(encoder, inputs, 1, 0)
    for seed in range(args.seeds):
        config = STS(views=args.views, lr=args.lr, reg=args.reg, seed=seed)
        views, view_seconds = encode_views(encoder, inputs, args.views, seed)
        for method in args.methods + [f"{m} (lr {args.extra_lr:g})" for m in ("sts", "full") if args.extra_lr]:
            if (method == "zero-shot" and seed > 0) or (method == "prompt" and seed >= args.prompt_seeds):
                continue  # zero-shot is deterministic (view 0); prompt tuning is slow
            name, _, lr = method.partition(" (lr ")
            run_config = STS(views=args.views, lr=float(lr[:-1]), reg=args.reg, seed=seed) if lr else config
            zero_shot = method == "zero-shot"
            inputs_views = one_view if zero_shot else views
            probs, seconds, saved = adapt(name, encoder, inputs_views, titles, run_config, prototypes, basis)
            entry = results.setdefault(method, {"acc": [], "adapt_s": [], "views_s": []})
            entry["acc"].append(float((probs.argmax(-1) == target).float().mean()))
            entry["adapt_s"].append(seconds / len(inputs))
            entry["views_s"].append((zs_view_seconds if zero_shot else view_seconds) / len(inputs))
            entry["learned_per_sample"] = learned = learned_numbers(name, titles, run_config, rank, encoder)
            entry["memory_per_sample"] = max(entry.get("memory_per_sample", 0), saved + 16 * learned)
            print(f"{method} seed {seed}: acc {entry['acc'][-1]:.4f}", flush=True)
    zs = results["zero-shot"]["acc"][0] if "zero-shot" in results else None
    for method, r in results.items():
        if zs is not None and method != "zero-shot" and len(r["acc"]) > 1:
            diffs = [a - zs for a in r["acc"]]
            half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
            r["margin_vs_zero_shot"] = {"mean": statistics.mean(diffs), "ci95_half_width": half}
    return results


def table_row(split: str, method: str, r: dict[str, Any]) -> list[str]:
    margin = r.get("margin_vs_zero_shot")
    adapt_ms = 1e3 * statistics.median(r["adapt_s"])
    return [
        split,
        method,
        f"{100 * statistics.mean(r['acc']):.2f}",
        f"{100 * margin['mean']:+.2f} ± {100 * margin['ci95_half_width']:.2f}" if margin else "-",
        f"{adapt_ms:.2f}",
        f"{adapt_ms + 1e3 * statistics.median(r['views_s']):.1f}",
        f"{r['learned_per_sample']:,}",
        f"{r['memory_per_sample'] / 2**10:,.1f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--views", type=int, default=STS.views)
    ap.add_argument("--lr", type=float, default=STS.lr)
    ap.add_argument("--reg", type=float, default=STS.reg)
    ap.add_argument("--prompt-seeds", type=int, default=1, help="seeds for the (slow) prompt-tuning baseline")
    ap.add_argument("--extra-lr", type=float, default=0.1, help="also run sts and full at this lr (0: not)")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--out", type=Path, default=RESULTS / "sts.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    titles, sentences, labels = build_task(args.classes, args.per_class)
    encoder = SentenceEncoder.load("minilm-l6", template=TEMPLATE)
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    prototypes = encoder.encode_labels(titles)  # once: every split and method shares them
    rank = spectral_basis(prototypes).shape[1]
    print(f"{len(titles)} classes, {len(sentences)} sentences per split; Gavish-Donoho rank of the prototypes: {rank}")
    settings = {"views": args.views, "keep": STS.keep, "lr": args.lr, "steps": STS.steps, "reg": args.reg}
    settings.update(classes=len(titles), sentences=len(sentences), seeds=args.seeds)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = previous.get("results", {}) if previous.get("settings") == settings else {}
    all_splits = build_splits(sentences)
    for split in args.splits:
        print(f"== {split}", flush=True)
        measured = measure(args, encoder, titles, prototypes, all_splits[split], torch.tensor(labels))
        results.update({f"{split}/{method}": r for method, r in measured.items()})
        write_result(
            args.out,
            {"bench": "sts", "encoder": "all-MiniLM-L6-v2", "prototype_rank": rank, "settings": settings}
            | {"examples": {k: v[0] for k, v in all_splits.items()}, "results": results},
        )
    by_split = sorted(results.items(), key=lambda kv: SPLITS.index(kv[0].split("/")[0]))  # stable: method order
    rows = [table_row(*key.split("/"), r) for key, r in by_split]
    headers = ["split", "method", "acc %", "vs zero-shot (pts, 95% CI)", "adapt ms/sample", "total ms/sample"]
    print(format_table([*headers, "learned/sample", "adapt memory KiB/sample"], rows))


if __name__ == "__main__":
    main()
