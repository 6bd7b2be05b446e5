"""The attack ``--snap`` leaves: a discrete token search (GCG) on SmolLM2-135M.

    python bench/token_attack.py                          # 50 pairs, 8-token suffix, 100 steps (~30 min, 2 cores)
    python bench/token_attack.py --pairs 10 --steps 20    # a quick look

``patch-model --snap`` maps every input embedding to its nearest vocabulary row, so an attacker who
may send embeddings can do no more than one who sends tokens: the embedding PGD of
``bench/shield_robustness.py`` goes from 0.20 / 1.00 / 1.00 success at budgets 0.1 / 0.25 / 0.5 to 0
(docs/eigenshield.md). What remains is choosing the suffix tokens themselves. This bench measures
that attacker, Greedy Coordinate Gradient (Zou et al. 2023, arXiv 2307.15043), on the same pairs
(``--pairs`` prompts of ``--prompt`` wiki eval tokens, each with a ``--target`` from elsewhere in
the text) and the same success criterion (every target token the greedy argmax).

GCG, per pair, all pairs batched: the gradient of the target loss with respect to the suffix's one-hot
tokens ranks ``--top-k`` replacement tokens per position; ``--candidates`` suffixes, each changing
one random position to one of its top-k tokens, are scored exactly and the best is kept. The model is
the snapped one (the shipped ``Snap`` transform). On token ids snap is an identity, so the search
runs with it detached (it would only cost time, and its zero gradient would hide the one-hot one);
every suffix that broke its pair is then re-checked through the snapped model. Reported: success
rate by step, and how far the successful suffixes' embeddings moved, in mean-embedding-norm units
(compare with the PGD budgets). Writes ``bench/results/token_attack.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS, write_result
from shield_robustness import build_pairs

import eigenpatch
from eigenpatch.evaluate import tokenize
from eigenpatch.format.interventions import token_identities_removed
from eigenpatch.hf_io import load_model
from eigenpatch.patchers import Snap
from eigenpatch.patchers.eigenshield.stats import mean_embedding_norm
from eigenpatch.table import format_table
from eigenpatch.zoo import resolve_text

PROTOCOL_ARGS = ("pairs", "prompt", "suffix", "target", "steps", "top_k", "candidates")


class TokenAttack:
    """Target loss and success of ``prompt + suffix + target`` token sequences, and GCG's gradient."""

    def __init__(self, model: torch.nn.Module, prompts: torch.Tensor, targets: torch.Tensor, suffix: int) -> None:
        self.model, self.prompts, self.targets = model, prompts, targets
        self.first = prompts.shape[1] + suffix - 1  # position predicting the first target token
        self.table = model.get_input_embeddings().weight

    def _logits(self, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=ids, inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[:, self.first : self.first + self.targets.shape[1]]).float()

    def sequences(self, suffixes: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.prompts[pairs], suffixes, self.targets[pairs]], dim=1)

    @torch.no_grad()
    def score(self, suffixes: torch.Tensor, pairs: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed target loss, success) of each suffix for its pair, as token ids."""
        losses, hits = [], []
        for i in range(0, len(pairs), batch):
            s, p = suffixes[i : i + batch], pairs[i : i + batch]
            logits = self._logits(self.sequences(s, p))
            target = self.targets[p]
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
            losses.append(loss.sum(1))
            hits.append((logits.argmax(-1) == target).all(1))
        return torch.cat(losses), torch.cat(hits)

    def gradient(self, suffixes: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """d loss / d one-hot suffix tokens ``[pairs, suffix, vocab]`` (snap detached: identity on tokens)."""
        onehot = F.one_hot(suffixes, self.table.shape[0]).to(self.table.dtype).requires_grad_(True)
        embed = self.model.get_input_embeddings()
        with torch.enable_grad():
            x = torch.cat([embed(self.prompts[pairs]), onehot @ self.table, embed(self.targets[pairs])], dim=1)
            logits = self._logits(embeds=x)
            loss = F.cross_entropy(logits.flatten(0, 1), self.targets[pairs].flatten(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, onehot)
        return grad


def gcg(
    attack: TokenAttack, init: torch.Tensor, steps: int, top_k: int, candidates: int, banned: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair GCG; returns (broken per pair, step at which each broke or -1, final suffixes)."""
    g = torch.Generator().manual_seed(seed)
    n, length = init.shape
    suffixes = init.clone()
    broken_at = torch.full((n,), -1, dtype=torch.long)
    best_at_break = suffixes.clone()
    for step in range(steps + 1):
        loss, hit = attack.score(suffixes, torch.arange(n))
        newly = hit & (broken_at < 0)
        broken_at[newly], best_at_break[newly] = step, suffixes[newly]
        if step == steps or bool((broken_at >= 0).all()):
            break
        active = (broken_at < 0).nonzero().squeeze(1)
        grad = attack.gradient(suffixes[active], active)
        grad[..., banned] = float("inf")
        top = (-grad).topk(top_k, dim=-1).indices  # [a, length, k]
        position = torch.randint(0, length, (len(active), candidates), generator=g)
        choice = torch.randint(0, top_k, (len(active), candidates), generator=g)
        trial = suffixes[active][:, None, :].repeat(1, candidates, 1)  # [a, c, length]
        rows = torch.arange(len(active))[:, None].expand(-1, candidates)
        trial.scatter_(2, position[..., None], top[rows, position, choice][..., None])
        pairs = active[:, None].expand(-1, candidates).flatten()
        trial_loss, trial_hit = attack.score(trial.flatten(0, 1), pairs)
        trial_loss = trial_loss.view(len(active), candidates) - 1e6 * trial_hit.view(len(active), candidates)
        best = trial_loss.argmin(1)
        suffixes[active] = trial[torch.arange(len(active)), best]
        if step % 10 == 0:
            done = int((broken_at >= 0).sum())
            print(f"step {step}: broken {done}/{n}, mean loss {float(loss.mean()):.3f}", flush=True)
    return broken_at >= 0, broken_at, torch.where((broken_at >= 0)[:, None], best_at_break, suffixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--prompt", type=int, default=12)
    parser.add_argument("--suffix", type=int, default=8)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=64, help="replacement tokens per position (%(default)s)")
    parser.add_argument("--candidates", type=int, default=16, help="suffixes scored per pair and step (%(default)s)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS / "token_attack.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.model)
    model.requires_grad_(False)
    eigenpatch.patch(model, Snap(), show_progress=False)
    unit = mean_embedding_norm(model)
    wiki = tokenize(tokenizer, resolve_text("wiki", "eval"), args.eval_tokens)
    prompts, targets = build_pairs(wiki, args.pairs, args.prompt, args.target, seed=1)  # the PGD bench's pairs
    init_ids = tokenizer(" !" * args.suffix, add_special_tokens=False)["input_ids"][: args.suffix]
    init = torch.tensor(init_ids)[None].repeat(args.pairs, 1)
    banned = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    attack = TokenAttack(model, prompts, targets, args.suffix)
    start = time.perf_counter()
    with token_identities_removed(model):  # the search reads tokens, where snap is an identity (and costs time)
        broken, broken_at, final = gcg(attack, init, args.steps, args.top_k, args.candidates, banned, seed=0)
    seconds = time.perf_counter() - start
    confirmed = torch.zeros(0, dtype=torch.bool)
    if bool(broken.any()):
        confirmed = attack.score(final[broken], broken.nonzero().squeeze(1))[1]  # through the snapped model
    print(f"{int(confirmed.sum())} of {int(broken.sum())} broken pairs confirmed through the snapped model")
    table = model.get_input_embeddings().weight.float()
    moved = (table[final] - table[init]).norm(dim=-1) / unit  # per suffix token
    changed = (final != init).float().sum(1)
    marks = sorted({s for s in (10, 25, 50) if s < args.steps} | {args.steps})
    by_step = {s: float(((broken_at >= 0) & (broken_at <= s)).float().mean()) for s in marks}
    rows = [[f"{s}", f"{asr:.2f}"] for s, asr in by_step.items()]
    print(format_table(["GCG steps", "success rate (snapped model)"], rows))
    if bool(broken.any()):
        print(
            f"broken suffixes: {float(changed[broken].mean()):.1f} of {args.suffix} tokens changed; each changed token "
            f"moved {float(moved[broken][final[broken] != init[broken]].mean()):.2f} x the mean embedding norm"
        )
    examples = [tokenizer.decode(final[i]) for i in broken.nonzero().squeeze(1)[:5].tolist()]
    write_result(
        args.out,
        {
            "protocol": {k: getattr(args, k) for k in PROTOCOL_ARGS},
            "success_by_step": by_step,
            "success": float(broken.float().mean()),
            "confirmed_through_snap": int(confirmed.sum()),
            "broken_at": broken_at.tolist(),
            "tokens_changed_when_broken": float(changed[broken].mean()) if bool(broken.any()) else None,
            "moved_per_changed_token": float(moved[final != init].mean()) if bool((final != init).any()) else None,
            "example_suffixes": examples,
            "seconds": round(seconds, 1),
        },
    )


if __name__ == "__main__":
    main()
