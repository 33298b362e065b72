"""The ``ctclab`` command line."""
from __future__ import annotations

import argparse
import sys


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        T, B, C, L = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be T,B,C,L (four integers), got {text!r}") from None
    if min(T, B, C, L) < 0 or C < 2 or T < 1 or B < 1:
        raise argparse.ArgumentTypeError(f"--shape needs T, B >= 1, C >= 2, L >= 0, got {text!r}")
    return T, B, C, L


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    shapes = list(args.shape or [])
    if args.grid:
        shapes += bench.GRID
    shapes = shapes or [bench.SEED_SHAPE]
    progress = (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
    results = bench.run(
        shapes, device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
        memory=not args.no_memory, impls=args.impl or ("builtin", "autograd", "fused"), progress=progress,
    )
    print(bench.format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            f.write(bench.to_json(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctclab", description="CTC loss, alignment and decoding on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the built-in CTC loss against ctclab's autograd and fused paths")
    b.add_argument("--shape", type=_shape, action="append", help="T,B,C,L (repeatable); default: the seed's 128,256,32,60")
    b.add_argument("--grid", action="store_true", help="add the standard grid of six shapes")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    b.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (median reported)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--impl", action="append", choices=["builtin", "autograd", "fused"], help="subset to run (repeatable)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--json", metavar="FILE", help="write machine-readable results")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        parser.error("--repeats must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
