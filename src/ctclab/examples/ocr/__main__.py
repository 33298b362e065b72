"""``python -m ctclab.examples.ocr train|eval|compare``."""
from __future__ import annotations

import argparse
import json
import sys

from ..common import add_training_options
from .train import compare, evaluate, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctclab.examples.ocr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a CRNN on rendered text lines")
    add_training_options(t, minutes=5.0, batch_size=32, lr=3e-3, eval_every=20.0, out="runs/ocr")
    t.add_argument("--train-lines", type=int, default=20000)
    t.add_argument("--eval-lines", type=int, default=1000, help="held-out lines for the final report")
    e = sub.add_parser("eval", help="CER (greedy, beam) and alignment error of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--lines", type=int, default=1000)
    e.add_argument("--beam", type=int, default=16)
    c = sub.add_parser("compare", help="plot the learning curves of several runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", default="curves.png")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            train(args.loss, args.variant, args.minutes, args.steps, args.batch_size, args.lr, args.seed,
                  args.train_lines, eval_every=args.eval_every, out=args.out)
            report = evaluate(f"{args.out}/model.pt", args.eval_lines)
            with open(f"{args.out}/report.json", "w") as f:
                json.dump(report, f, indent=2)
            print(json.dumps(report, indent=2))
        elif args.command == "eval":
            print(json.dumps(evaluate(args.checkpoint, args.lines, beam=args.beam), indent=2))
        else:
            compare(args.runs, args.out)
            print(f"wrote {args.out}")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
