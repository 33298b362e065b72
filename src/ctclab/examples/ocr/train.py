"""Train, evaluate and compare CRNNs on rendered text lines with ctclab's CTC loss."""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ctclab
from ctclab.decode import BeamSearchDecoder, greedy_decode
from ctclab.targets import alignment_targets, smooth_targets, target_cross_entropy
from ctclab.variants import focal_ctc_loss

from .data import BLANK, CHARSET, NUM_CLASSES, collate, make_lines
from .model import CRNN

LOSSES = ("fused", "autograd", "builtin")


def parse_variant(text: str | None) -> tuple[str, float] | None:
    """``'label_smoothing=0.1'`` or ``'focal=2'`` -> (name, value)."""
    if not text:
        return None
    name, _, value = text.partition("=")
    if name not in ("label_smoothing", "focal") or not value:
        raise ValueError(f"--variant must be label_smoothing=EPS or focal=GAMMA, got {text!r}")
    return name, float(value)


def make_criterion(loss: str, variant: tuple[str, float] | None):
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    ctc = F.ctc_loss if loss == "builtin" else (lambda *a, **k: ctclab.ctc_loss(*a, impl=loss, **k))
    plain = torch.nn.CTCLoss(zero_infinity=True) if loss == "builtin" else ctclab.CTCLoss(zero_infinity=True, impl=loss)

    def criterion(log_probs, targets, il, tl):
        if variant is None:
            return plain(log_probs, targets, il, tl)
        name, value = variant
        if name == "focal":
            if loss == "builtin":
                raise ValueError("focal CTC needs the true gradient through the per-utterance loss: use --loss fused or autograd")
            return focal_ctc_loss(log_probs, targets, il, tl, gamma=value, zero_infinity=True, impl=loss)
        q = smooth_targets(alignment_targets(log_probs.detach(), targets, il, tl, ctc_loss=ctc), value, "nonblank", input_lengths=il)
        per_item = target_cross_entropy(log_probs, q, reduction="none")
        return (per_item / tl.clamp(min=1)).mean()

    return criterion


def edit_distance(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def text_of(tokens) -> str:
    return "".join(CHARSET[t - 1] for t in tokens)


@torch.no_grad()
def character_error_rate(model, lines, batch_size: int = 64, beam: int = 0) -> float:
    model.eval()
    errors = total = 0
    decoder = BeamSearchDecoder(["<b>"] + list(CHARSET), beam_width=beam, word_delimiter=None) if beam else None
    for i in range(0, len(lines), batch_size):
        chunk = lines[i : i + batch_size]
        images, _, il, _ = collate(chunk)
        lp = model(images)
        if decoder is None:
            hyps = [text_of(s.token for s in spans) for spans in greedy_decode(lp, il)]
        else:
            hyps = [text_of(h[0].tokens) for h in decoder.decode(lp, il)]
        for line, hyp in zip(chunk, hyps):
            errors += edit_distance(hyp, line.text)
            total += len(line.text)
    model.train()
    return errors / max(total, 1)


def train(loss: str = "fused", variant: str | None = None, minutes: float = 5.0, max_steps: int | None = None,
          batch_size: int = 32, lr: float = 3e-3, seed: int = 0, train_lines: int = 20000, val_lines: int = 200,
          eval_every: float = 20.0, out: str | Path = "runs/ocr", progress: bool = True) -> dict:
    """Train a CRNN for ``minutes`` of wall time (or ``max_steps``), evaluating greedy CER on
    ``val_lines`` held-out lines every ``eval_every`` seconds. Writes ``model.pt`` and
    ``history.json`` to ``out`` and returns the history."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    criterion = make_criterion(loss, parse_variant(variant))
    # width-sorted pool: a batch is a random window of lines of similar width (little padding)
    pool = sorted(make_lines(train_lines, seed), key=lambda line: line.image.shape[1])
    validation = make_lines(val_lines, seed + 10_000)
    model = CRNN(NUM_CLASSES)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    rng = random.Random(seed)
    history = {"config": dict(loss=loss, variant=variant, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed),
               "steps": [], "evals": []}
    budget = minutes * 60.0
    start = time.perf_counter()
    training_time = 0.0  # wall time spent in training steps, evaluation excluded
    next_eval, step = 0.0, 0
    while training_time < budget and (max_steps is None or step < max_steps):
        t0 = time.perf_counter()
        first = rng.randrange(max(1, len(pool) - batch_size + 1))
        batch = collate(pool[first : first + batch_size])
        images, targets, il, tl = batch
        log_probs = model(images)
        value = criterion(log_probs, targets, il, tl)
        optimiser.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimiser.step()
        training_time += time.perf_counter() - t0
        step += 1
        history["steps"].append((step, training_time, value.item()))
        if training_time >= next_eval or training_time >= budget or step == max_steps:
            cer = character_error_rate(model, validation)
            history["evals"].append((step, training_time, cer))
            next_eval = training_time + eval_every
            torch.save({"model": model.state_dict(), "config": history["config"]}, out / "model.pt")
        if progress:
            done = min(1.0, training_time / budget) if max_steps is None else step / max_steps
            cer_text = f"{history['evals'][-1][2]:.3%}" if history["evals"] else "-"
            print(f"\r[{'#' * int(30 * done):<30}] step {step} loss {value.item():.3f} val CER {cer_text} "
                  f"({time.perf_counter() - start:.0f} s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    (out / "history.json").write_text(json.dumps(history))
    return history


def load_model(checkpoint: str | Path) -> CRNN:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = CRNN(NUM_CLASSES)
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def alignment_errors(model, lines, batch_size: int = 64) -> dict:
    """Frame errors (predicted - true) of character starts and ends against the true extents, for
    the Viterbi path and for posterior-based boundaries (frames where the character's state has
    posterior >= 0.5)."""
    viterbi, posterior = {"start": [], "end": []}, {"start": [], "end": []}
    for i in range(0, len(lines), batch_size):
        chunk = lines[i : i + batch_size]
        images, targets, il, tl = collate(chunk)
        lp = model(images)
        ali = ctclab.forced_align(lp, targets, il, tl, blank=BLANK, skip_infeasible=True)
        gamma = ctclab.state_occupation(lp, targets, il, tl, blank=BLANK)  # (T, B, S)
        spans = ctclab.token_spans(ali, blank=BLANK)
        for b, line in enumerate(chunk):
            if not bool(ali.aligned[b]):
                continue
            truth = line.frame_extents()
            for k, ((t0, t1), span) in enumerate(zip(truth, spans[b])):
                viterbi["start"].append(span.start - t0)
                viterbi["end"].append(span.end - t1)
                occ = gamma[: il[b], b, 2 * k + 1]
                frames = torch.nonzero(occ >= 0.5)[:, 0]
                if len(frames) == 0:
                    frames = occ.argmax().reshape(1)
                posterior["start"].append(int(frames[0]) - t0)
                posterior["end"].append(int(frames[-1]) + 1 - t1)

    def summary(signed):
        """Absolute error: median and 90th percentile; signed mean (negative = early)."""
        values = sorted(abs(v) for v in signed)
        return {"median": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))],
                "mean_signed": statistics.fmean(signed), "n": len(values)}

    return {name: {side: summary(v) for side, v in d.items()} for name, d in (("viterbi", viterbi), ("posterior", posterior))}


def evaluate(checkpoint: str | Path, lines: int = 1000, seed: int = 20_000, beam: int = 16) -> dict:
    """CER (greedy and beam search) and alignment error on ``lines`` held-out lines."""
    model = load_model(checkpoint)
    test = make_lines(lines, seed)
    report = {
        "lines": lines,
        "cer_greedy": character_error_rate(model, test),
        "cer_beam": character_error_rate(model, test, beam=beam),
        "alignment_frame_error": alignment_errors(model, test),
    }
    return report


def compare(runs: list[str | Path], out: str | Path) -> None:
    """Learning curves (loss and validation CER against step and against training time) of
    several runs in one PNG."""
    from ctclab.plot import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for run in runs:
        history = json.loads((Path(run) / "history.json").read_text())
        cfg = history["config"]
        label = cfg["loss"] + (f" + {cfg['variant']}" if cfg.get("variant") else "")
        steps = history["steps"]
        window = 25
        smooth = [statistics.fmean(v for _, _, v in steps[max(0, i - window) : i + 1]) for i in range(len(steps))]
        axes[0, 0].plot([s for s, _, _ in steps], smooth, label=label)
        axes[0, 1].plot([t for _, t, _ in steps], smooth, label=label)
        axes[1, 0].plot([s for s, _, _ in history["evals"]], [c for _, _, c in history["evals"]], label=label)
        axes[1, 1].plot([t for _, t, _ in history["evals"]], [c for _, _, c in history["evals"]], label=label)
    for ax, (x, y) in zip(axes.flat, [("step", "loss"), ("training time (s)", "loss"), ("step", "val CER"), ("training time (s)", "val CER")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if "CER" in y:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
