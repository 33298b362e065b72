"""Greedy (best-path) decoding of a 64 x 500 frames x 1024 classes batch (float32, 131 MB):
ctclab.greedy_decode against torch's max(-1) and argmax(-1) alone, medians in one process.

Two inputs: blank-dominated, as a trained CTC model's outputs are (a token in ~1 frame of 4),
and random scores (a new token almost every frame: 32,000 spans to build).
Usage: python benchmarks/greedy_decode.py [--repeats N]"""
import argparse
import time

import torch

from ctclab import greedy_decode


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    T, B, C = 500, 64, 1024
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, B, C, generator=g)
    speaking = torch.rand(T, B, generator=g) < 0.25
    best = torch.where(speaking, torch.randint(1, C, (T, B), generator=g), 0)
    peaky = logits.clone()
    peaky[torch.arange(T)[:, None], torch.arange(B)[None], best] += 8
    for name, lp in (("blank-dominated", peaky.log_softmax(-1)), ("random", logits.log_softmax(-1))):
        tokens = sum(len(spans) for spans in greedy_decode(lp))
        ours = median_ms(lambda: greedy_decode(lp), args.repeats)
        top = median_ms(lambda: lp.max(-1), args.repeats)
        arg = median_ms(lambda: lp.argmax(-1), args.repeats)
        print(f"{name}: greedy_decode {ours:.1f} ms ({tokens} tokens); torch max(-1) {top:.1f} ms, argmax(-1) {arg:.1f} ms")


if __name__ == "__main__":
    main()
