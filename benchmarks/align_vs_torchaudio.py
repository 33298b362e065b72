"""ctclab.forced_align against torchaudio's forced_align looped over the batch (CPU).

torchaudio has no build for the torch ctclab develops on, so it runs in an interpreter of its
own, one process per measurement (peak memory = growth of the peak resident set over the
process's baseline, read from /proc after /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_ makes
freed large blocks leave the resident set). Set that interpreter up once with:

    python3 -m venv /tmp/ta-venv && /tmp/ta-venv/bin/pip install torch==2.9.1 'torchaudio==2.9.*' numpy

then: python benchmarks/align_vs_torchaudio.py --torchaudio-python /tmp/ta-venv/bin/python

The long case runs ctclab three ways: the full backpointer table (the default up to
``max_memory``), ``checkpoint_every=1000``, and the interval ``forced_align`` chooses under a
``max_memory`` of 16 MiB (``sqrt(32 T)`` frames). The first line gives the processor and the
load, which the ratios depend on.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import platform

import numpy as np
import torch

WORKER = str(Path(__file__).with_name("_align_worker.py"))


def make_case(T, B, C, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(T, B, C, generator=g).log_softmax(-1)
    targets = torch.randint(1, C, (B, L), generator=g)
    return {"log_probs": lp.numpy(), "targets": targets.numpy(), "input_lengths": np.full(B, T), "target_lengths": np.full(B, L)}


def run(python, impl, path, repeats, extra=None):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        cmd = [python, WORKER, impl, path, str(repeats), out.name] + ([json.dumps(extra)] if extra else [])
        subprocess.run(cmd, check=True, env=env)
        return json.load(open(out.name))


def machine():
    """The processor's model name and the load average: what every figure depends on."""
    model = platform.processor() or platform.machine()
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} CPUs, load average {load:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torchaudio-python", required=True, help="interpreter with torchaudio installed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-long", action="store_true")
    args = parser.parse_args()
    cases = [("batch B=32 T=500 L=100 C=32", (500, 32, 32, 100), args.repeats, [{}])]
    if not args.skip_long:
        cases.append(("long B=1 T=30000 L=8000 C=32", (30000, 1, 32, 8000), max(1, args.repeats // 2),
                      [{}, {"checkpoint_every": 1000}, {"max_memory": 16 * 2**20}]))
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, repeats, variants in cases:
            path = os.path.join(tmp, "case.npz")
            np.savez(path, **make_case(*shape))
            ta = run(args.torchaudio_python, "torchaudio", path, repeats)
            print(f"{name}: torchaudio loop {ta['median_s'] * 1e3:.1f} ms, peak {ta['peak_mb']:.0f} MB")
            for extra in variants:
                ours = run(sys.executable, "ctclab", path, repeats, extra)
                # torchaudio runs its recursion in the scores' float32, ctclab in float64: where they
                # differ, the higher score is the better path (both are sums of the same log-probs)
                diffs = [(a - b) / max(1.0, abs(a)) for a, b in zip(ours["scores"], ta["scores"])]
                label = f"ctclab {extra}" if extra else "ctclab"
                print(f"  {label}: {ours['median_s'] * 1e3:.1f} ms ({ta['median_s'] / ours['median_s']:.2f}x faster), "
                      f"peak {ours['peak_mb']:.0f} MB" + (f" ({ours['peak_mb'] / ta['peak_mb']:.2f}x)" if ta["peak_mb"] >= 1 else "") + ", "
                      f"path score ctclab - torchaudio (relative) {min(diffs):+.1e} .. {max(diffs):+.1e}")


if __name__ == "__main__":
    main()
