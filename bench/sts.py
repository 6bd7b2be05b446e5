"""STS on a real text encoder: zero-shot topic classification of Wikipedia sentences, clean and shifted.

    python bench/sts.py                         # 40 topics x 5 sentences, 5 seeds (about 10 min on 2 cores)
    python bench/sts.py --lr 0.05 --seeds 3

Task (built offline from the ``wiki`` text, calibration and eval articles alike: nothing is trained):
each of ``--classes`` articles is a class named by its title; inputs are ``--per-class`` sentences of
at least 8 words from its body; a prediction is correct when the sentence is matched to its own
article's title (label prompt: ``"This text is about {title}."``). The **shifted** split is the same
sentences truncated to their first 8 words, lower-cased, with 8 % of the letters replaced at random:
what a noisy front end (OCR, ASR, a phone keyboard) hands a classifier.

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
t-interval over seeds; the adaptation time per sample (label prompts and optimization, on views
encoded once per seed and shared) and the total with the view encoding; the peak memory the
adaptation adds over the loaded encoder (VmHWM reset before each method; Linux; allocations of a few
MiB come from memory the process already holds, so small methods read ~0) and the exact number of
values optimized per sample (AdamW holds three more of each). ``--extra-lr``: ``sts`` and ``full``
again at a larger learning rate, since one AdamW step of 5e-3 moves each coefficient by at most 5e-3.
Prints a table, writes ``bench/results/sts.json``.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from results_io import RESULTS, peak_rss_bytes, reset_peak_rss, rss_bytes, write_result

from eigenpatch.patchers.sts import STS, confident_views, spectral_basis, steer_predict
from eigenpatch.patchers.sts_encoders import SentenceEncoder
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


def shift(sentence: str, rng: random.Random, words: int = 8, noise: float = 0.08) -> str:
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


def adapt(
    method: str, encoder: SentenceEncoder, views: torch.Tensor, titles: list[str], config: STS
) -> tuple[torch.Tensor, float, int]:
    """Probabilities, seconds and added peak memory of one method on pre-encoded views ``[N, V, D]``
    (the label prompts are encoded inside: the prompt method re-encodes them anyway)."""
    rss_before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    prototypes = encoder.encode_labels(titles)
    scale = config.logit_scale or encoder.logit_scale
    if method == "views only":  # the filter and the averaging, no steering step
        method, config = "sts", STS(views=config.views, keep=config.keep, steps=0, seed=config.seed)
    basis = spectral_basis(prototypes, config.rank) if method == "sts" else None
    out = []
    for i in range(0, len(views), 32):
        chunk = views[i : i + 32]
        if method == "prompt":
            with torch.inference_mode(False):
                out.append(prompt_tuning(encoder, chunk.clone(), titles, config))
        else:
            out.append(steer_predict(chunk, prototypes, config, scale, method, basis))
    seconds = time.perf_counter() - start
    return torch.cat(out), seconds, max(0, peak_rss_bytes() - rss_before)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--views", type=int, default=STS.views)
    ap.add_argument("--lr", type=float, default=STS.lr)
    ap.add_argument("--reg", type=float, default=STS.reg)
    ap.add_argument("--prompt-seeds", type=int, default=1, help="seeds for the (slow) prompt-tuning baseline")
    ap.add_argument("--extra-lr", type=float, default=0.1, help="also run sts and full at this lr (0: not)")
    ap.add_argument("--methods", nargs="+", default=["zero-shot", "views only", "sts", "full", "prompt"])
    ap.add_argument("--out", type=Path, default=RESULTS / "sts.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    titles, sentences, labels = build_task(args.classes, args.per_class)
    rng = random.Random(0)
    splits = {"clean": sentences, "shifted": [shift(s, rng) for s in sentences]}
    target = torch.tensor(labels)
    encoder = SentenceEncoder.load("minilm-l6", template=TEMPLATE)
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    rank = spectral_basis(encoder.encode_labels(titles)).shape[1]
    print(f"{len(titles)} classes, {len(sentences)} sentences per split; Gavish-Donoho rank of the prototypes: {rank}")
    results: dict[str, Any] = {}
    for split, inputs in splits.items():
        for seed in range(args.seeds):
            config = STS(views=args.views, lr=args.lr, reg=args.reg, seed=seed)
            views, view_seconds = encode_views(encoder, inputs, args.views, seed)
            for method in args.methods + [f"{m} (lr {args.extra_lr:g})" for m in ("sts", "full") if args.extra_lr]:
                if (method == "zero-shot" and seed > 0) or (method == "prompt" and seed >= args.prompt_seeds):
                    continue  # zero-shot is deterministic (view 0); prompt tuning is slow
                name, _, lr = method.partition(" (lr ")
                run_config = STS(views=args.views, lr=float(lr[:-1]), reg=args.reg, seed=seed) if lr else config
                if method == "zero-shot":
                    one_view, view_seconds_zs = encode_views(encoder, inputs, 1, seed)
                inputs_views = one_view if method == "zero-shot" else views
                probs, seconds, memory = adapt(name, encoder, inputs_views, titles, run_config)
                entry = results.setdefault(f"{split}/{method}", {"acc": [], "adapt_s": [], "views_s": [], "peak": []})
                entry["acc"].append(float((probs.argmax(-1) == target).float().mean()))
                entry["adapt_s"].append(seconds / len(inputs))
                entry["views_s"].append((view_seconds_zs if method == "zero-shot" else view_seconds) / len(inputs))
                entry["learned_per_sample"] = learned_numbers(name, titles, run_config, rank, encoder)
                entry["peak"].append(memory)
                print(f"{split} {method} seed {seed}: acc {entry['acc'][-1]:.4f}", flush=True)
    table = []
    for key, r in results.items():
        split, method = key.split("/")
        zs = results[f"{split}/zero-shot"]["acc"][0] if f"{split}/zero-shot" in results else None
        margin = "-"
        if zs is not None and method != "zero-shot" and len(r["acc"]) > 1:
            diffs = [a - zs for a in r["acc"]]
            half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
            r["margin_vs_zero_shot"] = {"mean": statistics.mean(diffs), "ci95_half_width": half}
            margin = f"{100 * statistics.mean(diffs):+.2f} ± {100 * half:.2f}"
        table.append(
            [
                split,
                method,
                f"{100 * statistics.mean(r['acc']):.2f}",
                margin,
                f"{1e3 * statistics.median(r['adapt_s']):.2f}",
                f"{1e3 * (statistics.median(r['adapt_s']) + statistics.median(r['views_s'])):.1f}",
                f"{r['learned_per_sample']:,}",
                f"{max(r['peak']) / 2**20:.1f}",
            ]
        )
    headers = ["split", "method", "acc %", "vs zero-shot (pts, 95% CI)", "adapt ms/sample", "total ms/sample"]
    headers += ["learned/sample", "peak RSS +MiB"]
    print(format_table(headers, table))
    write_result(
        args.out,
        {
            "bench": "sts",
            "encoder": "all-MiniLM-L6-v2",
            "classes": len(titles),
            "sentences": len(sentences),
            "prototype_rank": rank,
            "settings": {"views": args.views, "keep": STS.keep, "lr": args.lr, "steps": STS.steps, "reg": args.reg},
            "seeds": args.seeds,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
