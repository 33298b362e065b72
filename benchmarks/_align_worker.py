"""Worker for align_vs_torchaudio.py: runs one aligner on saved inputs in its own process, so
each gets a clean peak-memory reading. Runs under either interpreter (ctclab's or torchaudio's)."""
import json
import statistics
import sys
import time

import numpy as np
import torch


def status_mb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024


def main():
    impl, data_path, repeats, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    data = np.load(data_path)
    lp = torch.from_numpy(data["log_probs"])  # (T, B, C)
    targets = torch.from_numpy(data["targets"])
    il, tl = torch.from_numpy(data["input_lengths"]), torch.from_numpy(data["target_lengths"])
    if impl == "torchaudio":
        import warnings

        from torchaudio.functional import forced_align

        warnings.filterwarnings("ignore", category=UserWarning)
        # batch size 1 only: per-item contiguous (1, T, C) inputs, prepared outside the timing
        items = [(lp[: il[b], b].contiguous()[None], targets[b, : tl[b]][None].int()) for b in range(lp.shape[1])]

        def run():
            scores = []
            for emission, target in items:
                _, s = forced_align(emission, target, blank=0)
                scores.append(float(s.double().sum()))
            return scores
    else:
        import ctclab

        def run():
            return ctclab.forced_align(lp, targets, il, tl, **extra).path_score.double().tolist()

    scores = run()  # warm-up (and JIT)
    before = status_mb("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = run()
        times.append(time.perf_counter() - t0)
    peak = status_mb("VmHWM:") - before
    json.dump({"median_s": statistics.median(times), "peak_mb": peak, "scores": scores}, open(out_path, "w"))


if __name__ == "__main__":
    main()
