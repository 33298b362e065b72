"""Train, evaluate and compare CRNNs on rendered text lines with ctclab's CTC loss."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import ctclab
from ctclab.decode import BeamSearchDecoder, greedy_decode

from ..common import LOSSES, compare, edit_distance, fit, make_criterion, parse_variant, summary  # noqa: F401 (re-exported)
from .data import BLANK, CHARSET, NUM_CLASSES, collate, make_lines
from .model import CRNN


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
    config = dict(loss=loss, variant=variant, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed)

    def batch(rng: random.Random):
        first = rng.randrange(max(1, len(pool) - batch_size + 1))
        return collate(pool[first : first + batch_size])

    def checkpoint():
        torch.save({"model": model.state_dict(), "config": config}, out / "model.pt")

    history = fit(model, batch, lambda m, images: m(images), criterion, lambda: character_error_rate(model, validation),
                  checkpoint, config, minutes=minutes, max_steps=max_steps, lr=lr, seed=seed, eval_every=eval_every,
                  progress=progress)
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
