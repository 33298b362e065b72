"""The GPU check of issue 14, one script, one table: CUDA parity of every impl against float64
references on the CPU, bitwise determinism, the loss's fwd+bwd timing over ``ctclab bench``'s
grid and hard inputs against the built-in in its fastest eligible form, forced alignment against
torchaudio's CUDA aligner looped over the batch, and peak memory of each. Sized to finish in
under 5 minutes on one H100/H200.

Usage:
    python benchmarks/gpu_check.py                 # on the GPU
    python benchmarks/gpu_check.py --device cpu    # the same code on tiny shapes, Triton's
                                                   # interpreter on CPU tensors (what CI runs)
    compute-sanitizer --tool racecheck python benchmarks/gpu_check.py --skip loss --skip align
                                                   # the kernels' races (invisible to the interpreter)

Timings are medians of repeated runs in one process, each run synchronised
(``torch.cuda.synchronize``), implementations taking turns (``ctclab.bench``'s round-robin).
The built-in's cuDNN form needs int32 concatenated targets on the CPU, every input length = T,
blank 0 and target lengths <= 256: where a shape allows it, the three forms (cuDNN, native,
ctclab) run on the same full-length problem and the faster built-in form is the anchor; the
ragged problem of ``ctclab bench`` has the native form as anchor. Exit status 1 if a parity or
determinism check fails (after the whole table).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Sizes:
    parity: tuple  # (T, B, C, L) of the parity batch
    grid: list
    hard: list
    seed: tuple
    repeats: int
    warmup: int
    align: tuple  # (B, T, L, C)
    long_align: tuple  # (T, L, C, checkpoint_every)
    backends: tuple | None = None  # the backends of the parity checks (None: all that run here)
    topologies: tuple | None = None  # their topologies (None: all each runs)


def sizes(device: str) -> Sizes:
    from ctclab import bench

    if device == "cuda":
        return Sizes((60, 8, 12, 20), list(bench.GRID), list(bench.HARD_CASES), bench.SEED_SHAPE, 20, 3,
                     (32, 500, 100, 32), (30000, 8000, 32, 1000))
    tiny = bench.HardCase("blank phase (blank +12)", 8, 2, 5, 2, "blank+12")
    # the interpreter costs milliseconds per program and frame: one of each kind, the Triton backend's
    # parity only (the other backends' is the conformance suite's)
    return Sizes((6, 3, 5, 2), [(8, 2, 5, 2)], [tiny], (6, 2, 5, 2), 1, 0, (2, 8, 2, 5), (12, 4, 5, 4),
                 backends=("triton",), topologies=("minimal",))


@dataclass
class Table:
    rows: list = field(default_factory=list)
    failed: bool = False

    def add(self, section: str, case: str, what: str, value: str, status: str = "") -> None:
        """One row; ``status`` 'FAIL' makes the script exit 1."""
        self.rows.append((section, case, what, value, status))
        self.failed |= status == "FAIL"
        print(f"  ... {section} | {case} | {what} | {value} {status}", file=sys.stderr, flush=True)

    def check(self, section: str, case: str, what: str, ok: bool, value: str = "") -> None:
        self.add(section, case, what, value, "ok" if ok else "FAIL")

    def render(self) -> str:
        header = ("section", "case", "what", "value", "status")
        widths = [max(len(str(r[i])) for r in [header, *self.rows]) for i in range(5)]
        line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, self.rows)])


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _loss_and_grad(impl: str, logits, targets, il, tl, dtype=None, **options):
    """Loss ``(B,)`` and gradient w.r.t. the logits through log_softmax (infinite losses count 0)."""
    import torch

    import ctclab

    x = logits.detach().clone().requires_grad_(True)
    lp = x.log_softmax(-1) if dtype is None else x.log_softmax(-1).to(dtype)
    nll = ctclab.ctc_loss(lp, targets, il, tl, reduction="none", impl=impl, **options)
    (grad,) = torch.autograd.grad(torch.where(torch.isinf(nll), 0.0, nll).sum(), x)
    return nll.detach(), grad


def _diff(got, want) -> float:
    """Largest difference relative to ``max(1, |want|)``; equal infinities count 0, NaN counts inf."""
    import torch

    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = torch.where(torch.isinf(got) & (got == want), 0.0, (got - want).abs() / want.abs().clamp(min=1))
    return float(diff.nan_to_num(nan=torch.inf).max())


def parity(table: Table, device: str, size: Sizes) -> None:
    """Every loss / posteriors / Viterbi backend that runs on ``device`` against float64 on the CPU."""
    import torch

    import ctclab
    from ctclab import backends
    from ctclab.bench import make_inputs
    from ctclab.graph import TOPOLOGIES, CTCGraph

    logits, targets, il, tl = make_inputs(*size.parity, device=device, seed=1)
    cpu = [x.cpu() for x in (logits, targets, il, tl)]
    graph = CTCGraph.build(ctclab._inputs.ctc_batch(logits, targets, il, tl))
    table.add("parity", f"T,B,C,L={size.parity}", "'auto' picks for the loss",
              backends.select("loss", "auto", graph, logits).name)
    chosen = [b for b in backends.backends("loss") if size.backends is None or b.name in size.backends]
    for backend in chosen:
        if not backend.runs("loss", graph, device):
            table.add("parity", backend.name, "loss", "does not run here", "-")
            continue
        for topology in size.topologies or (TOPOLOGIES if backend.topologies is None else sorted(backend.topologies)):
            for delay in (0.0, 0.3) if backend.delay_penalty else (0.0,):
                options = {"topology": topology, "delay_penalty": delay}
                want = _loss_and_grad("numba", cpu[0].double(), *cpu[1:], **options)
                for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
                    got = _loss_and_grad(backend.name, logits.to(dtype), targets, il, tl, **options)
                    loss_diff, grad_diff = _diff(got[0], want[0]), _diff(got[1], want[1])
                    table.check("parity", f"{backend.name} {topology}{' delay' if delay else ''}",
                                f"loss+grad {str(dtype)[6:]} vs float64",
                                loss_diff < tol and grad_diff < tol, f"{loss_diff:.1e} / {grad_diff:.1e}")
    for dtype in (torch.float16, torch.bfloat16):
        want = _loss_and_grad("numba", cpu[0].double(), *cpu[1:])
        for impl in ("triton", "autograd"):
            got = _loss_and_grad(impl, logits, targets, il, tl, dtype=dtype)
            ok = got[0].dtype == dtype and _diff(got[0], want[0]) < 2e-2 and _diff(got[1], want[1]) < 2e-2
            table.check("parity", impl, f"{str(dtype)[6:]} scores: dtype kept, close", ok,
                        f"{_diff(got[0], want[0]):.1e} / {_diff(got[1], want[1]):.1e}")
    lp, lp_cpu = logits.log_softmax(-1), cpu[0].double().log_softmax(-1)
    want = ctclab.state_occupation(lp_cpu, *cpu[1:], impl="reference")
    for backend in backends.backends("posteriors"):
        if backend.runs("posteriors", graph, device) and (size.backends is None or backend.name in size.backends):
            got = ctclab.state_occupation(lp, targets, il, tl, impl=backend.name)
            table.check("parity", backend.name, "posteriors vs float64", _diff(got, want) < 1e-4, f"{_diff(got, want):.1e}")
    want = ctclab.forced_align(lp_cpu, *cpu[1:], impl="numba")
    for backend in backends.backends("viterbi"):
        if backend.runs("viterbi", graph, device) and (size.backends is None or backend.name in size.backends):
            got = ctclab.forced_align(lp, targets, il, tl, impl=backend.name)
            same = torch.equal(got.states.cpu(), want.states)
            table.check("parity", backend.name, "forced_align states == CPU kernel", same,
                        f"score diff {_diff(got.path_score, want.path_score):.1e}")
    q = ctclab.alignment_targets(lp, targets, il, tl)
    q_builtin = ctclab.alignment_targets(lp, targets, il, tl, ctc_loss=torch.nn.functional.ctc_loss)
    table.check("parity", "auto", "alignment_targets vs the built-in's gradient", _diff(q, q_builtin) < 1e-4,
                f"{_diff(q, q_builtin):.1e}")
    g = torch.Generator().manual_seed(4)
    lp = (4 * torch.randn(size.parity[0], 6, 12, generator=g)).log_softmax(-1).to(device)
    table.check("parity", "greedy_decode", "on the device == on the CPU",
                ctclab.greedy_decode(lp) == ctclab.greedy_decode(lp.cpu()))
    decoder = ctclab.BeamSearchDecoder(["<b>", "|"] + [chr(97 + i) for i in range(10)], beam_width=8)
    tokens = lambda x: [[h.tokens for h in hyps] for hyps in decoder.decode(x, nbest=2)]  # noqa: E731
    table.check("parity", "BeamSearchDecoder", "on the device == on the CPU (float32, float16)",
                tokens(lp) == tokens(lp.cpu()) and tokens(lp.half()) == tokens(lp.half().cpu()))
    if device == "cuda":
        x = logits[:10, :3].double().log_softmax(-1).requires_grad_(True)
        ok = torch.autograd.gradgradcheck(lambda z: ctclab.ctc_loss(z, targets[:3], il[:3].clamp(max=10),
                                                                    tl[:3].clamp(max=3), impl="autograd"),
                                          (x,), nondet_tol=1e-10)
        table.check("parity", "autograd", "gradgradcheck float64", ok)


def determinism(table: Table, device: str, size: Sizes) -> None:
    import torch

    from ctclab.bench import make_inputs

    logits, targets, il, tl = make_inputs(*size.seed, device=device, seed=2)
    for impl, required in (("triton", True), ("cuda-builtin", False)):
        runs = [_loss_and_grad(impl, logits, targets, il, tl) for _ in range(2)]
        same = torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        if required:
            table.check("determinism", impl, f"two runs bitwise equal, T,B,C,L={size.seed}", same)
        else:
            table.add("determinism", impl, f"two runs bitwise equal, T,B,C,L={size.seed}", "yes" if same else "no",
                      "info (pytorch issue 17798)")


def _loss_peak(device: str, fn, inputs) -> str:
    """Peak memory of one fwd+bwd of ``fn`` above its inputs (the CUDA allocator's)."""
    logits, targets, il, tl = inputs
    x = logits.log_softmax(-1).detach().requires_grad_(True)
    return _peak(device, lambda: fn(x, targets, il, tl).backward())


def _cudnn_form(inputs):
    """The built-in called as cuDNN needs it: int32 concatenated targets and lengths on the CPU."""
    import torch
    import torch.nn.functional as F

    _, targets, il, tl = inputs
    tl32 = tl.cpu().int()
    cat = torch.cat([targets[b, : tl32[b]].cpu() for b in range(len(tl32))]).int()
    il32 = il.cpu().int()
    return lambda x, *_: F.ctc_loss(x, cat, il32, tl32)


def loss_timing(table: Table, device: str, size: Sizes) -> None:
    import torch
    import torch.nn.functional as F

    import ctclab
    from ctclab import bench

    native = lambda x, targets, il, tl: F.ctc_loss(x, targets, il, tl)  # noqa: E731
    ours = lambda x, targets, il, tl: ctclab.ctc_loss(x, targets, il, tl, impl="triton")  # noqa: E731
    problems = []
    for shape in size.grid:
        ragged = bench.make_inputs(*shape, device=device)
        problems.append((f"T,B,C,L={shape} ragged", ragged, {"builtin": native, "triton": ours}))
        if shape[3] <= 256:  # the cuDNN form's conditions (on a CPU tensor: the CPU kernel in that form)
            full = (ragged[0], ragged[1], torch.full_like(ragged[2], shape[0]), ragged[3])
            # PyTorch falls back to its native kernel where cuDNN declines: "builtin-cudnn" is the form
            problems.append((f"T,B,C,L={shape} full-length", full,
                             {"builtin-cudnn": _cudnn_form(full), "builtin": native, "triton": ours}))
    hard = [(f"{case.name} T,B,C,L={(case.T, case.B, case.C, case.L)}",
             tuple(x.to(device) for x in bench.make_hard_inputs(case)), {"builtin": native, "triton": ours})
            for case in size.hard]
    seed = bench.make_inputs(*size.seed, device=device)
    autograd = [(f"T,B,C,L={size.seed} ragged (issue item 5)", seed, {
        "builtin": native, "autograd": lambda x, *a: ctclab.ctc_loss(x, *a, impl="autograd"), "triton": ours})]
    for group, cases, repeats in (("loss grid", problems, size.repeats), ("loss hard inputs", hard, max(1, size.repeats // 2)),
                                  ("loss autograd", autograd, max(1, size.repeats // 5))):
        group_ratios = []
        for name, inputs, fns in cases:
            medians = bench._time_impls(fns, inputs, device, repeats, size.warmup)
            anchor = min(v[2] for k, v in medians.items() if k.startswith("builtin"))
            for impl, (fwd, bwd, total) in medians.items():
                table.add(group, name, f"{impl} fwd / bwd / fwd+bwd ms",
                          f"{fwd:.3f} / {bwd:.3f} / {total:.3f}  {_loss_peak(device, fns[impl], inputs)}",
                          f"{anchor / total:.2f}x")
            if group != "loss autograd":
                group_ratios.append(anchor / medians["triton"][2])
        if group_ratios:
            geo = math.exp(statistics.fmean(math.log(r) for r in group_ratios))
            table.add(group, "all", "triton speed-up over the faster built-in form",
                      f"geometric mean {geo:.2f}x, min {min(group_ratios):.2f}x", "info")


def _median_s(device: str, fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _peak(device: str, fn) -> str:
    """``peak N MB``: the CUDA allocator's peak during ``fn()`` above what was allocated before."""
    import torch

    if device != "cuda":
        return "peak - (CPU)"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return f"peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MB"


def alignment(table: Table, device: str, size: Sizes) -> None:
    import torch

    import ctclab
    from ctclab import backends

    triton = {b.name: b for b in backends.backends()}.get("triton")
    impl = "triton" if triton is not None and "viterbi" in triton.operations else None
    try:
        import torchaudio.functional as TAF
    except ImportError:
        TAF = None
    B, T, L, C = size.align
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(T, B, C, generator=g).log_softmax(-1).to(device)
    targets = torch.randint(1, C, (B, L), generator=g).to(device)
    long_T, long_L, long_C, every = size.long_align
    lp_long = torch.randn(long_T, 1, long_C, generator=g).log_softmax(-1).to(device)
    tg_long = torch.randint(1, long_C, (1, long_L), generator=g).to(device)
    cases = [(f"B,T,L,C={size.align}", lp, targets, None, max(2, size.repeats // 4)),
             (f"T,L,C={(long_T, long_L, long_C)} checkpoint_every={every}", lp_long, tg_long, every, 2)]
    for name, x, tg, checkpoint, repeats in cases:
        if impl is None:
            table.add("forced_align", name, "ctclab impl='triton'", "skipped: no Triton Viterbi registered", "-")
            continue
        ours = lambda x=x, tg=tg, k=checkpoint: ctclab.forced_align(x, tg, impl=impl, checkpoint_every=k)  # noqa: E731
        ours()  # compile
        seconds, ali = _median_s(device, ours, repeats)
        table.add("forced_align", name, f"ctclab impl={impl!r} ms", f"{seconds * 1e3:.2f}  {_peak(device, ours)}")
        if TAF is None:
            table.add("forced_align", name, "torchaudio forced_align, looped", "skipped: torchaudio not installed", "-")
            continue
        batch_first = x.transpose(0, 1).contiguous()  # torchaudio takes (1, T, C) contiguous items

        def theirs(batch_first=batch_first, tg=tg):
            return [TAF.forced_align(batch_first[b : b + 1], tg[b : b + 1].int(), blank=0) for b in range(tg.shape[0])]

        theirs()
        their_seconds, their = _median_s(device, theirs, repeats)
        their_score = torch.stack([scores.sum() for _, scores in their]).cpu().double()
        diff = float((their_score - ali.path_score.cpu().double()).abs().max())
        table.add("forced_align", name, "torchaudio looped ms",
                  f"{their_seconds * 1e3:.2f}  {_peak(device, theirs)}", f"{their_seconds / seconds:.2f}x")
        table.check("forced_align", name, "path scores == torchaudio's", diff < 1e-3 * x.shape[0] ** 0.5, f"{diff:.1e}")
        again = ours()
        table.check("determinism", name, "forced_align two runs equal", torch.equal(again.states, ali.states))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--skip", action="append", default=[], choices=["parity", "determinism", "loss", "align"])
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    import ctclab  # noqa: F401

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu for the interpreter run)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    size = sizes(args.device)
    table = Table()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (Triton interpreter)"
    try:
        import triton

        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}, no triton"
    table.add("machine", name, "versions", versions)
    steps = {"parity": parity, "determinism": determinism, "loss": loss_timing, "align": alignment}
    for key, step in steps.items():
        if key not in args.skip:
            step(table, args.device, size)
    print(table.render())
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
