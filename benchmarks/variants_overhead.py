"""Overhead of each CTC variant relative to plain fused CTC (fwd+bwd w.r.t. logits, CPU).

python benchmarks/variants_overhead.py [--shape T,B,C,L] [--repeats N]
"""
import argparse
import statistics
import time


import ctclab
from ctclab.bench import make_inputs
from ctclab.targets import alignment_targets, focusing_weights, reweight_nonblank_proportion, smooth_targets, target_cross_entropy
from ctclab.variants import LabelPrior, blank_penalty, entropy_regularised_ctc_loss, focal_ctc_loss


def variants(targets, il, tl, C):
    prior = LabelPrior(C, lam=0.3)

    def smoothing(lp):
        q = smooth_targets(alignment_targets(lp.detach(), targets, il, tl), 0.1, "nonblank", input_lengths=il)
        return target_cross_entropy(lp, q)

    def reweighting(lp):
        q = reweight_nonblank_proportion(alignment_targets(lp.detach(), targets, il, tl), targets, tl, 0.5, input_lengths=il)
        return target_cross_entropy(lp, q)

    def focusing(lp):
        q = alignment_targets(lp.detach(), targets, il, tl)
        return target_cross_entropy(lp, q, focusing_weights(q, lp, 2.0, il))

    return {
        "plain fused CTC": lambda lp: ctclab.ctc_loss(lp, targets, il, tl),
        "label smoothing 0.1 (CE vs targets)": smoothing,
        "focal CTC (alpha=1, gamma=2)": lambda lp: focal_ctc_loss(lp, targets, il, tl),
        "re-weighting: non-blank proportion a=0.5": reweighting,
        "re-weighting: focusing g=2": focusing,
        "label priors lam=0.3": lambda lp: ctclab.ctc_loss(prior.adjust(lp), targets, il, tl),
        "blank penalty 1.0": lambda lp: ctclab.ctc_loss(blank_penalty(lp, 1.0), targets, il, tl),
        "modified topology": lambda lp: ctclab.ctc_loss(lp, targets, il, tl, topology="modified"),
        "delay penalty 0.01": lambda lp: ctclab.ctc_loss(lp, targets, il, tl, delay_penalty=0.01),
        "EnCTC beta=0.2 (autograd path, double backward)": lambda lp: entropy_regularised_ctc_loss(lp, targets, il, tl),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="128,256,32,60")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    T, B, C, L = (int(v) for v in args.shape.split(","))
    logits, targets, il, tl = make_inputs(T, B, C, L)
    fns = variants(targets, il, tl, C)
    fns["plain fused CTC (again, after the heavy ones)"] = fns["plain fused CTC"]
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(args.repeats + 1):  # round-robin, so drift hits every variant alike; round 0 warms up
        for name, fn in fns.items():
            x = logits.detach().clone().requires_grad_(True)
            t0 = time.perf_counter()
            fn(x.log_softmax(-1)).backward()
            if round_:
                runs[name].append(time.perf_counter() - t0)
    base = statistics.median(runs["plain fused CTC"] + runs["plain fused CTC (again, after the heavy ones)"])
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"{name:<50} {median * 1e3:8.1f} ms  {median / base:5.2f}x plain fused")


if __name__ == "__main__":
    main()
