"""CUDA checks of the pure-PyTorch paths (the numba kernels are CPU-only): parity with the
built-in on the GPU, half precision, forced alignment against the CPU kernel, alignment targets,
decoding of CUDA (and half-precision) log-probs.
Exits non-zero on the first failed check. Usage: python benchmarks/cuda_check.py"""
import sys
import time

import torch
import torch.nn.functional as F

import ctclab
from ctclab.bench import make_inputs


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        sys.exit(1)


def loss_grad(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x.log_softmax(-1), *args, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    dev = "cuda"
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for dtype in (torch.float64, torch.float32):
        logits, targets, il, tl = make_inputs(60, 8, 12, 20, device=dev, dtype=dtype, seed=1)
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        for reduction in ("none", "mean", "sum"):
            ref = loss_grad(F.ctc_loss, logits, targets, il, tl, reduction=reduction)
            for impl in ("autograd", "fused"):
                got = loss_grad(ctclab.ctc_loss, logits, targets, il, tl, reduction=reduction, impl=impl)
                diff = max(float((got[0] - ref[0]).abs().max()), float((got[1] - ref[1]).abs().max()))
                check(f"cuda parity {impl} {dtype} {reduction}", diff < tol * 10, f"max diff {diff:.1e}")
    logits, targets, il, tl = make_inputs(40, 4, 10, 12, device=dev, seed=2)
    for half in (torch.float16, torch.bfloat16):
        for impl in ("autograd", "fused"):
            x = logits.log_softmax(-1).to(half).requires_grad_(True)
            loss = ctclab.ctc_loss(x, targets, il, tl, reduction="none", impl=impl)
            loss.sum().backward()
            ref = ctclab.ctc_loss(x.detach().float(), targets, il, tl, reduction="none", impl=impl)
            ok = loss.dtype == half and x.grad.dtype == half and torch.isfinite(x.grad).all() and torch.allclose(loss.float(), ref, rtol=2e-2, atol=2e-2)
            check(f"cuda {half} {impl}", bool(ok))
    x = logits.double().log_softmax(-1).requires_grad_(True)
    # gather's backward adds atomically on CUDA: sums are reproducible only up to rounding
    ok = torch.autograd.gradgradcheck(lambda z: ctclab.ctc_loss(z, targets, il, tl, impl="autograd"), (x,), nondet_tol=1e-10)
    check("cuda gradgradcheck autograd", ok)
    lp = logits.log_softmax(-1)
    on_gpu = ctclab.forced_align(lp, targets, il, tl)
    on_cpu = ctclab.forced_align(lp.cpu(), targets.cpu(), il.cpu(), tl.cpu())
    check("cuda forced_align equals CPU kernel", torch.equal(on_gpu.states.cpu(), on_cpu.states)
          and torch.allclose(on_gpu.path_score.cpu().double(), on_cpu.path_score.double(), atol=1e-3))
    q = ctclab.alignment_targets(lp, targets, il, tl)
    q_builtin = ctclab.alignment_targets(lp, targets, il, tl, ctc_loss=F.ctc_loss)
    check("cuda alignment_targets match the built-in's", torch.allclose(q, q_builtin, atol=1e-4), f"{float((q - q_builtin).abs().max()):.1e}")
    lp = (4 * torch.randn(80, 6, 12, device=dev)).log_softmax(-1)
    il = torch.tensor([80, 70, 60, 80, 50, 40], device=dev)
    vocab = ["<b>", "|"] + [chr(97 + i) for i in range(10)]
    check("cuda greedy_decode equals CPU", ctclab.greedy_decode(lp, il[:6]) == ctclab.greedy_decode(lp.cpu(), il[:6].cpu()))
    decoder = ctclab.BeamSearchDecoder(vocab, beam_width=16, hotwords=["abc"])
    on_gpu = [[(h.text, h.tokens) for h in hyps] for hyps in decoder.decode(lp, il[:6], nbest=2)]
    on_cpu = [[(h.text, h.tokens) for h in hyps] for hyps in decoder.decode(lp.cpu(), il[:6].cpu(), nbest=2)]
    half = [[h.tokens for h in hyps] for hyps in decoder.decode(lp.half(), il[:6])]
    half_cpu = [[h.tokens for h in hyps] for hyps in decoder.decode(lp.half().cpu(), il[:6].cpu())]
    check("cuda beam search equals CPU (float32 and float16 input)", on_gpu == on_cpu and half == half_cpu)
    if "--quick" in sys.argv:
        return
    # long alignment on the GPU (packed backpointers on the device)
    lp_long = torch.randn(30000, 1, 32, device=dev).log_softmax(-1)
    tg_long = torch.randint(1, 32, (1, 8000), device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ali = ctclab.forced_align(lp_long, tg_long)
    torch.cuda.synchronize()
    print(f"long alignment T=30000 L=8000 on GPU (torch path): {time.perf_counter() - t0:.2f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB, path score {float(ali.path_score):.1f}", flush=True)
    cpu = ctclab.forced_align(lp_long.cpu(), tg_long.cpu())
    check("long alignment GPU == CPU", torch.equal(ali.states.cpu(), cpu.states))


if __name__ == "__main__":
    main()
