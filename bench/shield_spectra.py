"""How EigenShield's fit moves with the calibration domain, and what its dropped directions encode.

    python bench/shield_spectra.py                       # embed, wiki news pydoc jargon and the mix (~10 min)

For each calibration text alone, and for the four mixed (``patch-model --shield``'s default), the
shield is fitted at ``--site`` exactly as ``patch-model`` fits it (``--windows`` windows of 256 tokens,
gradient perturbations, outlier candidates) and reported:

- the Marchenko-Pastur fit: spikes, deficits, edges;
- **overlaps** between calibrations, ``||Q_a^T Q_b||_F^2 / k`` for orthonormal bases of (a) the deficit
  subspaces and (b) the directions the shield drops at ``--quantile``, both taken in the hidden-state
  space (``D V``, undoing each fit's own standardization, so different fits compare): 1 = the same
  subspace, ``k / d`` = what two random subspaces share;
- at ``embed``, the **vocabulary rows with the most energy in the dropped subspace**
  (``||P (e - mu)||``, ``P`` the drop projector): the tokens whose embeddings the shield changes most,
  which says what a calibration text "does not use". If they were wiki-markup tokens, the deficits
  would be markup artefacts; the table lets a reader check.

Writes ``bench/results/shield_spectra.json``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from results_io import RESULTS, write_result

from eigenpatch.format.interventions import decoder_layers
from eigenpatch.hf_io import load_model
from eigenpatch.patchers.eigenshield.config import DEFAULT_CALIB, EigenShield
from eigenpatch.patchers.eigenshield.select import calibration_set
from eigenpatch.patchers.eigenshield.stats import collect_site_stats
from eigenpatch.patchers.eigenshield.transform import ShieldSubspace, fit_subspace
from eigenpatch.patchers.hidden_states import parse_site
from eigenpatch.table import format_table


def hidden_basis(sub: ShieldSubspace, indices: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``[d, k]`` of the eigenvectors ``indices`` mapped back to hidden-state space."""
    vectors = sub.scale.double()[:, None] * sub.spectrum.eigenvectors[:, indices].double()
    return torch.linalg.qr(vectors)[0]


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles: 1 for one subspace, ``k / d`` for random ones."""
    k = min(a.shape[1], b.shape[1])
    return float((a.T @ b).square().sum() / k) if k else float("nan")


def deficit_indices(sub: ShieldSubspace) -> torch.Tensor:
    d = sub.spectrum.eigenvalues.numel()
    return torch.arange(d - sub.spectrum.deficits, d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--site", default="embed")
    parser.add_argument("--texts", nargs="+", default=list(DEFAULT_CALIB))
    parser.add_argument("--windows", type=int, default=64, help="calibration windows per fit (patch-model: 64)")
    parser.add_argument("--quantile", type=float, default=0.98, help="the quantile auto chose on the mix")
    parser.add_argument("--top", type=int, default=12, help="vocabulary rows listed per calibration")
    args = parser.parse_args()
    model, tokenizer, _ = load_model(args.model)
    model.requires_grad_(False)
    parse_site(args.site, len(decoder_layers(model)))
    base = EigenShield(site=args.site, calib_windows=args.windows)
    fits = {name: (name,) for name in args.texts} | {"mixed": tuple(args.texts)}
    subs: dict[str, ShieldSubspace] = {}
    for label, texts in fits.items():
        config = dataclasses.replace(base, calib=texts)
        windows = calibration_set(tokenizer, config, None)
        stats = collect_site_stats(model, [args.site], windows.fit, config.chunks, epsilon=config.epsilon)
        subs[label] = fit_subspace(stats[args.site], config, args.quantile)
        print(f"{label}: {subs[label].details()}", flush=True)

    labels = list(subs)
    deficits = {k: hidden_basis(s, deficit_indices(s)) for k, s in subs.items()}
    dropped = {k: hidden_basis(s, s.correlational) for k, s in subs.items()}
    dim = next(iter(subs.values())).mean.numel()
    rows = []
    for a in labels:
        s = subs[a].details()
        rows.append(
            [a, s["spikes"], s["deficits"], f"{s['bulk_edge']:.3f}", f"{s['lower_edge']:.3f}", s["correlational"]]
            + [f"{overlap(deficits[a], deficits[b]):.2f} / {overlap(dropped[a], dropped[b]):.2f}" for b in labels]
        )
    head = ["calibration", "spikes", "deficits", "upper edge", "lower edge", "dropped"]
    print(format_table(head + [f"vs {b}: deficits / dropped" for b in labels], rows))
    chance = {k: dropped[k].shape[1] / dim for k in labels}
    print(f"random subspaces of the dropped size share k/d = {chance[labels[0]]:.3f}")

    tokens: dict[str, list[list[object]]] = {}
    if args.site == "embed":
        table = model.get_input_embeddings().weight.detach().double()
        for label, sub in subs.items():
            projection = sub.projection("drop", "pre")
            centered = table - projection.center.double()
            moved = (centered @ projection.basis_in.double().T) @ projection.basis_out.double().T
            energy = moved.norm(dim=1) / table.norm(dim=1).mean()
            top = energy.topk(args.top)
            tokens[label] = [
                [tokenizer.convert_ids_to_tokens(int(i)), round(float(e), 3)] for e, i in zip(*top, strict=True)
            ]
            shown = ", ".join(f"{t!r} {e}" for t, e in tokens[label])
            print(f"{label}: rows moved most ({len(table)} in all, x mean row norm): {shown}")
    write_result(
        RESULTS / "shield_spectra.json",
        {
            "bench": "shield_spectra",
            "model": args.model,
            "protocol": vars(args),
            "fits": {k: s.details() for k, s in subs.items()},
            "overlap_deficits": {a: {b: overlap(deficits[a], deficits[b]) for b in labels} for a in labels},
            "overlap_dropped": {a: {b: overlap(dropped[a], dropped[b]) for b in labels} for a in labels},
            "chance_dropped": chance,
            "top_moved_rows": tokens,
        },
    )


if __name__ == "__main__":
    main()
