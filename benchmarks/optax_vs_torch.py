"""optax.ctc_loss under jax.jit on CPU against the built-in and ctclab's fused loss.

All three take logits and return the summed loss and its gradient with respect to the logits
(fwd+bwd, log_softmax included for all, as optax applies it internally). optax runs in an
interpreter of its own (it is not a dependency of ctclab); set one up once with:

    python3 -m venv /tmp/jax-venv && /tmp/jax-venv/bin/pip install jax jaxlib optax numpy

then: python benchmarks/optax_vs_torch.py --jax-python /tmp/jax-venv/bin/python [--grid]
"""
import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F

import ctclab
from ctclab.bench import GRID, SEED_SHAPE, make_inputs

WORKER = str(Path(__file__).with_name("_optax_worker.py"))


def time_torch(fn, logits, targets, il, tl, repeats):
    times, loss = [], None
    for i in range(repeats + 2):
        x = logits.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = fn(x.log_softmax(-1), targets, il, tl, reduction="sum")
        loss.backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jax-python", required=True)
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for shape in GRID if args.grid else [SEED_SHAPE]:
        logits, targets, il, tl = make_inputs(*shape)
        builtin, ref = time_torch(F.ctc_loss, logits, targets, il, tl, args.repeats)
        fused, _ = time_torch(ctclab.ctc_loss, logits, targets, il, tl, args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/case.npz"
            np.savez(path, logits=logits.numpy(), targets=targets.numpy(), input_lengths=il.numpy(), target_lengths=tl.numpy())
            subprocess.run([args.jax_python, WORKER, path, str(args.repeats), f"{tmp}/out.json"], check=True)
            optax = json.load(open(f"{tmp}/out.json"))
        print(f"T,B,C,L={shape}: built-in {builtin * 1e3:.1f} ms, optax+jit {optax['median_s'] * 1e3:.1f} ms "
              f"({builtin / optax['median_s']:.2f}x the built-in's speed), ctclab fused {fused * 1e3:.1f} ms "
              f"({builtin / fused:.2f}x; {optax['median_s'] / fused:.2f}x optax); "
              f"loss rel diff optax vs built-in {abs(optax['loss'] - ref) / abs(ref):.1e}", flush=True)


if __name__ == "__main__":
    main()
