"""Detection by the energy an input puts in the shield's dropped subspace, against attackers who know it.

    python bench/shield_detect.py          # 50 pairs, budgets 0.1 / 0.25 / 0.5, 60 steps (~25 min, 2 cores)

The default shield (``patch-model --shield``) removes a few directions of the input embeddings that
clean text barely uses. Instead of (or besides) removing them, a server could *flag* an input that puts
energy there. The detector here: a token's score is the norm of what the projection removes, in
mean-embedding-norm units; the threshold is the 99.9th percentile of that score over the clean eval
tokens of the four domains; a prompt is flagged when any of its tokens is above it.

Three attackers, each the PGD of ``bench/shield_robustness.py`` (8-token suffix, L2 ball per token):

- ``undefended``: PGD on the undefended model (a detector-unaware attacker);
- ``through shield``: PGD through the projection (the adaptive attacker of issue 23);
- ``off subspace``: PGD on the undefended model with every step projected off the dropped subspace,
  the attacker who knows the detector and stays out of what it watches.

Reported per budget: success rate (any PGD step, as the other bench), and for the final suffix its
success, the fraction flagged, and success while not flagged. Writes ``bench/results/shield_detect.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS, write_result
from shield_robustness import Attack, build_pairs

import eigenpatch
from eigenpatch.evaluate import tokenize
from eigenpatch.format.interventions import HiddenProjection, decoder_layers
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import EigenShield
from eigenpatch.patchers.eigenshield.config import DEFAULT_CALIB
from eigenpatch.patchers.eigenshield.stats import mean_embedding_norm
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text


def removed(projection: HiddenProjection, h: torch.Tensor) -> torch.Tensor:
    """What the drop projection takes out of ``h``: ``P (h - mu)``."""
    return h - projection(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    parser.add_argument("--domains", nargs="+", default=["wiki", "news", "pydoc", "jargon"])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--prompt", type=int, default=12)
    parser.add_argument("--suffix", type=int, default=8)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--percentile", type=float, default=99.9, help="of clean token scores (%(default)s)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS / "shield_detect.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.model)
    model.requires_grad_(False)
    shielded = copy.deepcopy(model)
    report = eigenpatch.patch(shielded, EigenShield(calib=DEFAULT_CALIB), tokenizer=tokenizer, show_progress=False)[
        "steps"
    ][0]
    projection = decoder_layers(shielded)[0].project_in
    print(f"shield: quantile {report['quantile']}, rank {projection.rank}", flush=True)
    unit = mean_embedding_norm(model)
    table = model.get_input_embeddings().weight.detach()

    def scores(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return removed(projection, x).norm(dim=-1) / unit

    clean = {d: scores(table[tokenize(tokenizer, resolve_text(d, "eval"), args.eval_tokens)]) for d in args.domains}
    threshold = float(torch.quantile(torch.cat(list(clean.values())), args.percentile / 100))
    print(f"threshold {threshold:.4f} (clean p{args.percentile})", flush=True)

    wiki = tokenize(tokenizer, resolve_text("wiki", "eval"), args.eval_tokens)
    prompts, targets = build_pairs(wiki, args.pairs, args.prompt, args.target, seed=1)  # the other bench's pairs
    suffix_ids = torch.tensor(tokenizer(" !" * args.suffix, add_special_tokens=False)["input_ids"][: args.suffix])
    attacks = {"undefended": Attack(model, prompts, targets, suffix_ids)}
    attacks["through shield"] = Attack(shielded, prompts, targets, suffix_ids)

    def flagged(attack: Attack, delta: torch.Tensor) -> torch.Tensor:
        x = torch.cat([attack.prompt_emb, attack.suffix_emb + delta, attack.target_emb], dim=1)
        return (scores(x) > threshold).any(1)

    def off_subspace(delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return delta - torch.nn.functional.linear(
                torch.nn.functional.linear(delta, projection.basis_in), projection.basis_out
            )

    no_attack = flagged(attacks["undefended"], torch.zeros_like(attacks["undefended"].suffix_emb))
    results: dict[str, Any] = {"clean_prompts_flagged": float(no_attack.float().mean())}
    rows = []
    for budget in args.budgets:
        for name, attack, constrain in (
            ("undefended", attacks["undefended"], None),
            ("through shield", attacks["through shield"], None),
            ("off subspace", attacks["undefended"], off_subspace),
        ):
            start = time.perf_counter()
            delta, broken = attack.run(budget * unit, args.steps, constrain)
            hit, flag = attack.success(delta), flagged(attack, delta)
            entry = {
                "asr_any_step": float(broken.float().mean()),
                "final_success": float(hit.float().mean()),
                "final_flagged": float(flag.float().mean()),
                "success_unflagged": float((hit & ~flag).float().mean()),
                "seconds": round(time.perf_counter() - start, 1),
            }
            results[f"{budget}/{name}"] = entry
            print(f"budget {budget} {name}: {entry}", flush=True)
            keys = ("asr_any_step", "final_success", "final_flagged", "success_unflagged")
            rows.append([f"{budget}", name, *(f"{entry[k]:.2f}" for k in keys)])
    print(format_table(["budget", "attacker", "ASR", "final success", "flagged", "success unflagged"], rows))
    print(f"clean prompts flagged: {results['clean_prompts_flagged']:.2f}")
    write_result(
        args.out,
        {
            "protocol": {k: getattr(args, k) for k in ("budgets", "pairs", "prompt", "suffix", "target", "steps")}
            | {"percentile": args.percentile, "threshold": threshold, "rank": projection.rank},
            "clean_token_exceedance": {d: float((s > threshold).float().mean()) for d, s in clean.items()},
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
