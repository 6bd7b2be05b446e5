"""``eigenpatch sts``: zero-shot text classification with spectrum-aware test-time steering."""

from __future__ import annotations

import argparse
from typing import Any

from eigenpatch.cli.pieces import CliPiece, register_piece

STS_EXAMPLES = """examples:
  eigenpatch sts --labels topics.txt --inputs sentences.txt                 # one label / input per line
  eigenpatch sts --labels topics.txt --inputs sentences.txt --method zero-shot --json out.json
  eigenpatch sts --labels topics.txt --inputs s.txt --template "This text is about {}." --views 32

Prints one line per input: the predicted label and its probability. The encoder is a sentence
encoder folder (mean pooling) or the zoo's minilm-l6 (all-MiniLM-L6-v2, built offline)."""


def run_sts(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from eigenpatch.errors import UsageError
    from eigenpatch.patchers.prompts import read_prompts
    from eigenpatch.patchers.sts.encoders import SentenceEncoder, zero_shot_classify
    from eigenpatch.patchers.sts.method import STS

    if "{}" not in args.template:
        raise UsageError(f"--template must contain {{}} where the label goes, got {args.template!r}")
    labels, inputs = read_prompts(args.labels), read_prompts(args.inputs)
    if len(set(labels)) < 2:
        raise UsageError(f"{args.labels} needs at least two different labels")
    config = STS(views=args.views, keep=args.keep, lr=args.lr, steps=args.steps, seed=args.seed)
    encoder = SentenceEncoder.load(args.encoder, template=args.template)
    probs = zero_shot_classify(encoder, inputs, labels, args.method, config)
    best, index = probs.max(-1)
    rows = [
        {"input": text, "label": labels[i], "probability": round(float(p), 4)}
        for text, i, p in zip(inputs, index.tolist(), best, strict=True)
    ]
    for row in rows:
        print(f"{row['label']}\t{row['probability']:.3f}\t{row['input']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "predictions": rows}, indent=1) + "\n")
    return 0


def add_sts_command(sub: Any) -> None:
    from eigenpatch.patchers.sts.method import METHODS, STS

    s = sub.add_parser(
        "sts",
        help="zero-shot text classification, adapted per input by spectrum-aware test-time steering",
        epilog=STS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--labels", required=True, metavar="FILE", help="candidate labels, one per line")
    s.add_argument("--inputs", required=True, metavar="FILE", help="texts to classify, one per line")
    s.add_argument("--method", choices=METHODS, default="sts", help="(%(default)s)")
    s.add_argument("--encoder", default="minilm-l6", help="sentence encoder folder or zoo name (%(default)s)")
    s.add_argument("--template", default="This text is about {}.", help="label prompt (%(default)s)")
    s.add_argument("--views", type=int, default=STS.views, help="augmented views per input (%(default)s)")
    s.add_argument("--keep", type=float, default=STS.keep, help="fraction of most confident views kept")
    s.add_argument("--lr", type=float, default=STS.lr, help="AdamW learning rate (%(default)s)")
    s.add_argument("--steps", type=int, default=STS.steps, help="AdamW steps per input (%(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", metavar="FILE", help="also write the predictions as JSON")
    s.set_defaults(run=run_sts)


class STSPiece(CliPiece):
    """STS adds a command, not a stage: it adapts a classifier per input and writes no checkpoint."""

    def add_commands(self, sub: Any) -> None:
        add_sts_command(sub)


register_piece(STSPiece())
