"""``ctclab bench``: the CTC losses side by side — the built-in, ctclab's autograd and fused paths.

Timings are medians over repeated runs in one process after warm-up, reported with their ratio
to the built-in measured in the same run. They time the loss itself, forward and backward with
respect to ``log_probs``; the ``log_softmax`` before it costs the same for every implementation
and is left out (at C = 5000 it costs as much as the built-in loss). Peak memory is measured per implementation in a fresh
subprocess on CPU (growth of peak RSS over the process's baseline) and with the CUDA allocator's
peak on GPU.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .loss import ctc_loss
from .targets import alignment_targets

SEED_SHAPE = (128, 256, 32, 60)
GRID = [
    (128, 256, 32, 60),  # the seed's shape
    (500, 32, 29, 150),  # characters, long utterances
    (250, 32, 1024, 80),  # BPE vocabulary
    (1000, 8, 5000, 300),  # long and wide
    (50, 64, 80, 20),  # short lines (OCR)
    (2000, 4, 32, 600),  # very long
]
IMPLS: dict[str, Callable] = {
    "builtin": F.ctc_loss,
    "autograd": lambda *a, **k: ctc_loss(*a, impl="autograd", **k),
    "fused": lambda *a, **k: ctc_loss(*a, impl="fused", **k),
}


@dataclass(frozen=True)
class HardCase:
    """An input that makes probability-space kernels lose precision (what every CTC training
    run meets at some point): ``emissions`` names how the random logits of :func:`make_inputs`
    are changed (:func:`make_hard_inputs`)."""

    name: str
    T: int
    B: int
    C: int
    L: int
    emissions: str


#: The hard inputs of ``ctclab bench --hard`` (issue 16): a model in CTC's blank phase, confident
#: models that disagree with the targets, long inputs with short targets, peaky emissions along
#: one alignment, and classes that are ``-inf`` at every frame (a masked vocabulary).
HARD_CASES = [
    HardCase("blank phase (blank +12)", 750, 8, 32, 225, "blank+12"),
    HardCase("blank phase (blank +12), T/L=15", 1500, 8, 32, 100, "blank+12"),
    HardCase("confident, wrong (logits x10)", 750, 8, 32, 225, "x10"),
    HardCase("confident, wrong (logits x10), T/L=15", 1500, 8, 32, 100, "x10"),
    HardCase("confident, wrong (logits x3), T/L=15", 1500, 8, 32, 100, "x3"),
    HardCase("long input, short target, T/L=40", 4000, 4, 32, 100, "random"),
    HardCase("very peaky (+30 on one alignment)", 750, 8, 32, 225, "peaky"),
    HardCase("-inf columns (half the classes)", 500, 16, 64, 100, "-inf columns"),
]


def make_hard_inputs(case: HardCase, seed: int = 0):
    """The inputs of :func:`make_inputs` for ``case``'s shape, its logits changed as its
    ``emissions`` say: ``blank+12`` (blank's logit 12 above the others), ``x10``/``x3`` (random
    logits scaled: confident and unrelated to the targets), ``random``, ``peaky`` (+30 on the
    classes of one evenly spread alignment of each target), ``-inf columns`` (targets drawn from
    the lower half of the classes, the upper half ``-inf`` at every frame)."""
    logits, targets, il, tl = make_inputs(case.T, case.B, case.C, case.L, seed=seed)
    kind = case.emissions
    if kind == "blank+12":
        logits[..., 0] += 12.0
    elif kind in ("x10", "x3"):
        logits *= float(kind[1:])
    elif kind == "peaky":
        for b in range(case.B):
            Tb, Lb = int(il[b]), int(tl[b])
            path = torch.zeros(Tb, dtype=torch.int64)  # blank, with each label at an evenly spaced frame
            frames = ((torch.arange(Lb) + 0.5) * Tb / max(Lb, 1)).long()
            path[frames] = targets[b, :Lb]
            logits[torch.arange(Tb), b, path] += 30.0
    elif kind == "-inf columns":
        half = case.C // 2
        targets = (targets - 1) % (half - 1) + 1
        logits[..., half:] = -torch.inf
    elif kind != "random":
        raise ValueError(f"unknown hard-input emissions {kind!r}")
    return logits, targets, il, tl


@dataclass
class ImplResult:
    impl: str
    fwd_ms: float
    bwd_ms: float
    total_ms: float
    fwd_ratio: float = float("nan")  # built-in time / this time: > 1 means faster than the built-in
    bwd_ratio: float = float("nan")
    total_ratio: float = float("nan")
    peak_mb: float | None = None


@dataclass
class ShapeResult:
    T: int
    B: int
    C: int
    L: int
    device: str
    dtype: str
    repeats: int
    impls: list[ImplResult] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    max_loss_diff: float = 0.0
    max_grad_diff: float = 0.0
    case: str = ""  # the hard input's name (``ctclab bench --hard``), else empty


def make_inputs(T: int, B: int, C: int, L: int, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random logits ``(T, B, C)`` and a ragged batch: target lengths uniform in [L/2, L], input
    lengths uniform in [3T/4, T] (raised where needed so that every target fits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, B, C, generator=g)
    targets = torch.randint(1, C, (B, L), generator=g)
    target_lengths = torch.randint(max(L // 2, 0), L + 1, (B,), generator=g)
    input_lengths = torch.randint(max(3 * T // 4, 1), T + 1, (B,), generator=g)
    input_lengths[0] = T
    repeats = torch.stack(
        [(targets[b, 1 : target_lengths[b]] == targets[b, : max(target_lengths[b] - 1, 0)]).sum() for b in range(B)]
    )
    input_lengths = torch.maximum(input_lengths, (target_lengths + repeats).clamp(max=T))
    return logits.to(device=device, dtype=dtype), targets.to(device), input_lengths.to(device), target_lengths.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_impls(fns: dict[str, Callable], inputs, device: str, repeats: int, warmup: int) -> dict[str, tuple[float, float, float]]:
    """Median fwd, bwd, fwd+bwd ms of each loss alone, round-robin: every repeat runs each
    implementation once in turn, so that a machine whose speed drifts (shared or throttled CPUs)
    slows them alike and their ratios stay meaningful. ``log_probs`` (a log_softmax computed
    beforehand, identical for every implementation) is the leaf the gradient is taken for."""
    logits, targets, il, tl = inputs
    log_probs = logits.log_softmax(-1)
    times: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            x = log_probs.detach().requires_grad_(True)
            _sync(device)
            t0 = time.perf_counter()
            loss = fn(x, targets, il, tl)
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                fwd, bwd, total = times[name]
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                total.append(t2 - t0)
    return {name: tuple(statistics.median(v) * 1e3 for v in lists) for name, lists in times.items()}  # type: ignore[misc]


def _loss_and_grad(fn: Callable, inputs):
    logits, targets, il, tl = inputs
    x = logits.detach().double().requires_grad_(True)
    loss = fn(x.log_softmax(-1), targets, il, tl, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _checks(inputs, result: ShapeResult) -> None:
    """The seed's three checks, in float64 so that only real disagreements show: losses and
    gradients (w.r.t. logits) agree with the built-in, and cross-entropy against the alignment
    targets has the CTC gradient."""
    logits, targets, il, tl = inputs
    ref_loss, ref_grad = _loss_and_grad(F.ctc_loss, inputs)
    loss_diff = grad_diff = 0.0
    for name in ("autograd", "fused"):
        loss, grad = _loss_and_grad(IMPLS[name], inputs)
        loss_diff = max(loss_diff, float((loss - ref_loss).abs() / ref_loss.abs().clamp(min=1)))
        grad_diff = max(grad_diff, float((grad - ref_grad).abs().max()))
    result.max_loss_diff, result.max_grad_diff = loss_diff, grad_diff
    result.checks["loss matches"] = loss_diff < 1e-8
    result.checks["grad matches"] = grad_diff < 1e-8
    x = logits.detach().double().requires_grad_(True)
    q = alignment_targets(x.detach(), targets, il, tl)
    ce = -torch.where(q > 0, q * x.log_softmax(-1), 0.0).sum()  # 0 * -inf counts 0 (masked classes)
    (ce_grad,) = torch.autograd.grad(ce, x)
    _, ctc_grad = _loss_and_grad(IMPLS["fused"], (x.detach(), targets, il, tl))
    result.checks["CE grad matches"] = float((ce_grad - ctc_grad).abs().max()) < 1e-8


def _peak_memory_mb(impl: str, shape, device: str, dtype: str) -> float:
    """Peak memory of one forward+backward of ``impl`` above what its inputs hold, in MB.

    CUDA: the caching allocator's peak. CPU: a fresh subprocess (after one warm-up run) resets
    its peak resident set (``/proc/self/clear_refs``), runs once and reads ``VmHWM``; large
    blocks are mmap'd (``MALLOC_MMAP_THRESHOLD_``) so freed memory leaves the resident set."""
    if device.startswith("cuda"):
        inputs = make_inputs(*shape, device=device, dtype=getattr(torch, dtype))
        _time_impls({impl: IMPLS[impl]}, inputs, device, 1, 1)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _time_impls({impl: IMPLS[impl]}, inputs, device, 1, 0)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    code = f"""
import gc, torch
from ctclab import bench
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024
inputs = bench.make_inputs(*{tuple(shape)!r}, dtype=torch.{dtype})
bench._time_impls({{{impl!r}: bench.IMPLS[{impl!r}]}}, inputs, 'cpu', 1, 0)
import ctclab.backends.numba_cpu
ctclab.backends.numba_cpu._scratch.__dict__.clear()  # count the kernels' reusable scratch too
gc.collect()
before = status('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')
bench._time_impls({{{impl!r}: bench.IMPLS[{impl!r}]}}, inputs, 'cpu', 1, 0)
print(status('VmHWM:') - before)
"""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def run(
    shapes: Iterable[tuple[int, int, int, int]] = (SEED_SHAPE,),
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 10,
    warmup: int = 2,
    memory: bool = True,
    impls: Iterable[str] = ("builtin", "autograd", "fused"),
    progress: Callable[[str], None] | None = None,
    hard: Iterable[HardCase] = (),
) -> list[ShapeResult]:
    """Benchmark each implementation on each ``(T, B, C, L)`` shape (random logits,
    :func:`make_inputs`), then on each of the ``hard`` cases (:data:`HARD_CASES`, no peak
    memory); see :class:`ShapeResult`."""
    impls = list(impls)
    results = []
    cases = [(shape, "", make_inputs) for shape in shapes]
    cases += [((c.T, c.B, c.C, c.L), c.name, lambda *_, c=c, **__: make_hard_inputs(c)) for c in hard]
    for shape, name, inputs_of in cases:
        inputs = tuple(x.to(device) for x in inputs_of(*shape))
        inputs = (inputs[0].to(getattr(torch, dtype)), *inputs[1:])
        result = ShapeResult(*shape, device=device, dtype=dtype, repeats=repeats, case=name)
        label = f"T={shape[0]} B={shape[1]} C={shape[2]} L={shape[3]}" + (f" ({name})" if name else "")
        fns = {name: IMPLS[name] for name in impls}
        if "builtin" in fns and dtype in ("float16", "bfloat16"):
            fns["builtin"] = lambda lp, *a, **k: F.ctc_loss(lp.float(), *a, **k)  # the built-in rejects half
        if progress:
            progress(f"{label}: timing {', '.join(impls)} (round-robin)")
        for impl, medians in _time_impls(fns, inputs, device, repeats, warmup).items():
            res = ImplResult(impl, *medians)
            if memory and not name:
                res.peak_mb = _peak_memory_mb(impl, shape, device, dtype)
            result.impls.append(res)
        base = next((r for r in result.impls if r.impl == "builtin"), None)
        if base:
            for r in result.impls:
                r.fwd_ratio, r.bwd_ratio, r.total_ratio = base.fwd_ms / r.fwd_ms, base.bwd_ms / r.bwd_ms, base.total_ms / r.total_ms
        if progress:
            progress(f"{label}: checks")
        _checks(inputs, result)
        results.append(result)
    return results


def format_results(results: list[ShapeResult]) -> str:
    lines = []
    for r in results:
        case = f"{r.case}: " if r.case else ""
        lines.append(f"{case}T={r.T} B={r.B} C={r.C} L={r.L}  ({r.dtype}, {r.device}, median of {r.repeats})")
        lines.append(f"  {'impl':<9} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} {'speed-up vs built-in (fwd/bwd/total)':>38} {'peak MB':>9}")
        for i in r.impls:
            peak = "-" if i.peak_mb is None else f"{i.peak_mb:.1f}"
            ratios = f"{i.fwd_ratio:.2f}x / {i.bwd_ratio:.2f}x / {i.total_ratio:.2f}x"
            lines.append(f"  {i.impl:<9} {i.fwd_ms:>9.2f} {i.bwd_ms:>9.2f} {i.total_ms:>11.2f} {ratios:>38} {peak:>9}")
        checks = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r.checks.items())
        lines.append(f"  checks: {checks}  (max rel loss diff {r.max_loss_diff:.1e}, max grad diff {r.max_grad_diff:.1e})")
    for title, hard in (("", False), ("hard inputs: ", True)):
        fused = [i.total_ratio for r in results for i in r.impls if i.impl == "fused" and bool(r.case) == hard]
        if len(fused) > 1:
            geo = float(torch.tensor(fused).log().mean().exp())
            lines.append(f"{title}fused fwd+bwd speed-up over the built-in: geometric mean {geo:.2f}x, min {min(fused):.2f}x")
    return "\n".join(lines)


def to_json(results: list[ShapeResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
