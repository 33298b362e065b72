"""What the testbeds (``ctclab.examples.ocr``, ``ctclab.examples.speech``) share: the loss and its
variants, the wall-time-budgeted training loop with progress and checkpoints, edit distance,
error summaries and the learning-curve picture."""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import ctclab
from ctclab.targets import alignment_targets, smooth_targets, target_cross_entropy
from ctclab.variants import LabelPrior, focal_ctc_loss

LOSSES = ("fused", "autograd", "builtin")
VARIANTS = ("label_smoothing", "focal", "label_prior")


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch *and* numba. Numba's parallel kernels (ctclab's loss)
    otherwise keep their worker threads (one per core) busy between calls, and a training step's
    torch operations on the same cores run several times slower (measured 10x on 2 cores)."""
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def add_training_options(parser, minutes: float, batch_size: int, lr: float, eval_every: float, out: str) -> None:
    """The ``train`` options both testbeds take (loss, variant, budget, batch, learning rate,
    seed, validation interval, output folder), with the testbed's defaults."""
    parser.add_argument("--loss", choices=LOSSES, default="fused")
    parser.add_argument("--variant", help="label_prior=LAMBDA (arXiv 2406.02560), label_smoothing=EPS or focal=GAMMA")
    parser.add_argument("--minutes", type=float, default=minutes, help="training wall time budget (validation excluded)")
    parser.add_argument("--steps", type=int, help="stop after this many steps instead")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=float, default=eval_every, help="seconds of training between validations")
    parser.add_argument("--out", default=out)


def parse_variant(text: str | None) -> tuple[str, float] | None:
    """``'label_smoothing=0.1'``, ``'focal=2'`` or ``'label_prior=0.3'`` -> (name, value); None for none."""
    if not text:
        return None
    name, _, value = text.partition("=")
    if name not in VARIANTS or not value:
        raise ValueError(f"--variant must be label_smoothing=EPS, focal=GAMMA or label_prior=LAMBDA, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise ValueError(f"--variant {name}= needs a number, got {value!r}") from None


def make_criterion(loss: str, variant: tuple[str, float] | None, blank: int = 0):
    """``criterion(log_probs (T, B, C), targets (B, S), input_lengths, target_lengths) -> scalar``.

    ``loss`` picks the implementation (ctclab's ``fused`` or ``autograd``, or PyTorch's
    ``builtin``); ``variant``: None (plain CTC), label smoothing (cross-entropy against smoothed
    alignment targets), focal CTC (Feng et al. 2019) or label priors (Huang et al., arXiv
    2406.02560: CTC on ``log y - lambda log P``, ``P`` the running average posterior,
    :class:`ctclab.variants.LabelPrior`, updated after every call). The criterion's ``prior``
    attribute is that :class:`LabelPrior` (None for other variants)."""
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    ctc = F.ctc_loss if loss == "builtin" else (lambda *a, **k: ctclab.ctc_loss(*a, impl=loss, **k))
    plain = torch.nn.CTCLoss(blank=blank, zero_infinity=True) if loss == "builtin" else ctclab.CTCLoss(blank=blank, zero_infinity=True, impl=loss)
    name, value = variant if variant else (None, 0.0)
    if name in ("focal", "label_prior") and loss == "builtin":
        raise ValueError(f"{name} needs the true gradient (the built-in's assumes normalised log-probs): use --loss fused or autograd")

    def criterion(log_probs, targets, il, tl):
        if name is None:
            return plain(log_probs, targets, il, tl)
        if name == "focal":
            return focal_ctc_loss(log_probs, targets, il, tl, blank=blank, gamma=value, zero_infinity=True, impl=loss)
        if name == "label_prior":
            if criterion.prior is None:
                criterion.prior = LabelPrior(log_probs.shape[-1], lam=value, blank=blank)
            result = plain(criterion.prior.adjust(log_probs), targets, il, tl)
            criterion.prior.update(log_probs.detach(), il)
            return result
        q = smooth_targets(alignment_targets(log_probs.detach(), targets, il, tl, blank=blank, ctc_loss=ctc), value,
                           "nonblank", blank=blank, input_lengths=il)
        per_item = target_cross_entropy(log_probs, q, reduction="none")
        return (per_item / tl.clamp(min=1)).mean()

    criterion.prior = None
    return criterion


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one element each)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def summary(signed: Sequence[float]) -> dict:
    """Absolute error: median and 90th percentile; signed mean (negative = early); the count."""
    values = sorted(abs(v) for v in signed)
    return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
            "mean_signed": statistics.fmean(signed), "n": len(values)}


def fit(model: torch.nn.Module, batch: Callable[[random.Random], tuple], forward: Callable, criterion,
        validate: Callable[[], float], checkpoint: Callable[[], None], config: dict, *, minutes: float,
        max_steps: int | None, lr: float, seed: int, eval_every: float, progress: bool = True,
        metric: str = "val CER") -> dict:
    """Adam on ``criterion(forward(model, batch), ...)`` for ``minutes`` of training wall time
    (validation excluded) or ``max_steps``; ``validate()`` (a score, lower is better) and
    ``checkpoint()`` every ``eval_every`` seconds of training and at the end. ``batch(rng)`` gives
    ``(inputs, targets, input_lengths, target_lengths)``; ``forward(model, inputs)`` the
    ``(T, B, C)`` log-probs. Returns the history: ``config``, ``steps`` ``(step, seconds, loss)``,
    ``evals`` ``(step, seconds, score)``. ``seed`` seeds the batch order (seed torch before
    building the model)."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    rng = random.Random(seed)
    history = {"config": config, "steps": [], "evals": []}
    budget = minutes * 60.0
    start = time.perf_counter()
    training_time = 0.0
    next_eval, step = 0.0, 0
    while training_time < budget and (max_steps is None or step < max_steps):
        t0 = time.perf_counter()
        inputs, targets, il, tl = batch(rng)
        value = criterion(forward(model, inputs), targets, il, tl)
        optimiser.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimiser.step()
        training_time += time.perf_counter() - t0
        step += 1
        history["steps"].append((step, training_time, value.item()))
        if training_time >= next_eval or training_time >= budget or step == max_steps:
            model.eval()
            with torch.no_grad():
                history["evals"].append((step, training_time, validate()))
            model.train()
            next_eval = training_time + eval_every
            checkpoint()
        if progress:
            done = min(1.0, training_time / budget) if max_steps is None else step / max_steps
            score = f"{history['evals'][-1][2]:.3%}" if history["evals"] else "-"
            print(f"\r[{'#' * int(30 * done):<30}] step {step} loss {value.item():.3f} {metric} {score} "
                  f"({time.perf_counter() - start:.0f} s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return history


def run_label(config: dict) -> str:
    return config["loss"] + (f" + {config['variant']}" if config.get("variant") else "")


def compare(runs: list[str | Path], out: str | Path, metric: str = "val CER") -> None:
    """Learning curves (loss and the validation score against step and against training time)
    of several runs (folders with a ``history.json``) in one PNG."""
    from ctclab.plot import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for run in runs:
        path = Path(run) / "history.json"
        if not path.is_file():
            raise FileNotFoundError(f"no history.json in {str(run)!r} (not a training run's folder)")
        history = json.loads(path.read_text())
        label = run_label(history["config"])
        steps = history["steps"]
        window = 25
        smooth = [statistics.fmean(v for _, _, v in steps[max(0, i - window) : i + 1]) for i in range(len(steps))]
        axes[0, 0].plot([s for s, _, _ in steps], smooth, label=label)
        axes[0, 1].plot([t for _, t, _ in steps], smooth, label=label)
        axes[1, 0].plot([s for s, _, _ in history["evals"]], [c for _, _, c in history["evals"]], label=label)
        axes[1, 1].plot([t for _, t, _ in history["evals"]], [c for _, _, c in history["evals"]], label=label)
    for ax, (x, y) in zip(axes.flat, [("step", "loss"), ("training time (s)", "loss"), ("step", metric), ("training time (s)", metric)]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if y == metric:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
