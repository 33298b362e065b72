"""``python -m ctclab.examples.speech data|train|eval|compare``."""
from __future__ import annotations

import argparse
import json
import sys

from ..common import add_training_options, compare, set_threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctclab.examples.speech", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="synthesise train and held-out test utterances with true word extents (espeak-ng)")
    d.add_argument("--out", default="data/speech")
    d.add_argument("--train", type=int, default=3000, help="training utterances")
    d.add_argument("--test", type=int, default=600, help="held-out test utterances")
    d.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train the character CTC acoustic model; saves a ctclab model folder OUT/model")
    t.add_argument("--data", default="data/speech")
    add_training_options(t, minutes=10.0, batch_size=8, lr=3e-3, eval_every=60.0, out="runs/speech")
    t.add_argument("--val", type=int, default=100, help="validation utterances (held-out sentences, not the test set)")
    t.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    t.add_argument("--init-from", metavar="RUN", help="fine-tune from this training run's folder (or checkpoint.pt)")
    e = sub.add_parser("eval", help="word boundary error and CER of trained models on the held-out test set")
    e.add_argument("runs", nargs="+", help="training run folders (OUT of train); label-prior runs are found by their config")
    e.add_argument("--data", default="data/speech")
    e.add_argument("--utterances", type=int, default=600)
    e.add_argument("--blank-penalty", type=float, default=1.0, help="nats off blank for method (d)")
    e.add_argument("--beam", type=int, default=32)
    e.add_argument("--torchaudio-python", help="an interpreter with torchaudio, for method (e)")
    e.add_argument("--plots", type=int, default=3, help="alignment figures of this many test files")
    e.add_argument("--out", default="runs/speech-eval")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--trim-db", type=float, help="the +trim methods' threshold (default 25 dB below the word's loudest)")
    e.add_argument("--split", choices=("test", "train"), default="test",
                   help="evaluate on the training split instead (to choose settings without the test set)")
    c = sub.add_parser("compare", help="plot the learning curves of several runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", default="curves.png")
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            from .train import make_data

            print(json.dumps(make_data(args.out, args.train, args.test, args.seed), indent=2))
        elif args.command == "train":
            from .train import train

            set_threads(args.threads)
            history = train(args.data, args.loss, args.variant, args.minutes, args.steps, args.batch_size, args.lr,
                            args.seed, args.val, args.eval_every, args.out, init_from=args.init_from)
            steps, evals = history["steps"], history["evals"]
            print(json.dumps({"steps": len(steps), "training_minutes": round(steps[-1][1] / 60, 2),
                              "final_loss": steps[-1][2], "val_cer_greedy": evals[-1][2], "out": args.out}, indent=2))
        elif args.command == "eval":
            from .evaluate import evaluate

            set_threads(args.threads)
            report = evaluate(args.runs, args.data, args.utterances, blank_penalty=args.blank_penalty, beam=args.beam,
                              torchaudio_python=args.torchaudio_python, plots=args.plots, out=args.out,
                              trim_db=args.trim_db, split=args.split)
            print(json.dumps(report, indent=2))
        else:
            compare(args.runs, args.out)
            print(f"wrote {args.out}")
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, RuntimeError) else 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
