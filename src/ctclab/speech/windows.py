"""Emissions of long recordings in bounded memory: windows with context, trimmed and stitched.

A recording is cut into cores of ``window`` seconds; each is run with ``context`` seconds of
audio either side, and only the core's frames are kept, so each kept frame saw at least
``context`` seconds around it. Cores start at multiples of the model's samples per frame, so a
window's frame ``t`` is the recording's frame ``start / samples_per_frame + t`` and the
stitched frames are exactly those of one pass over the whole recording; for a model whose
receptive field is shorter than the context (a convolutional model), their values are too.
Windows of all recordings are batched together, up to ``batch_seconds`` of (padded) audio per
forward pass: the model's memory depends on ``batch_seconds``, not on the recordings' lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .model import AcousticModel

WINDOW_SECONDS = 30.0
CONTEXT_SECONDS = 3.0
BATCH_SECONDS = 120.0
#: variance floor of :func:`normalize` (Hugging Face's Wav2Vec2FeatureExtractor's)
EPSILON = 1e-7


@dataclass(frozen=True)
class Piece:
    """One window of one recording: samples ``[start, end)``; of its output frames, ``[keep,
    keep + frames)`` are kept (``frames`` None: to the end)."""

    item: int
    start: int
    end: int
    keep: int
    frames: int | None

    def __len__(self) -> int:
        return self.end - self.start


def normalize(waveform: Tensor) -> Tensor:
    """Zero mean, unit variance over the whole recording (what Hugging Face's feature
    extractor does per input), so that every window sees the same scaling."""
    mean, scale = _moments(waveform)
    return (waveform.float() - mean) * scale


def _moments(waveform: Tensor) -> tuple[float, float]:
    """``(mean, 1 / std)`` of a recording, accumulated in float64 a block at a time."""
    total, squares, n = 0.0, 0.0, max(len(waveform), 1)
    for block in waveform.split(1 << 22):
        block = block.double()
        total += float(block.sum())
        squares += float((block * block).sum())
    mean = total / n
    return mean, 1.0 / math.sqrt(max(squares / n - mean * mean, 0.0) + EPSILON)


def plan_windows(num_samples: int, samples_per_frame: int, core: int, context: int, item: int = 0) -> list[Piece]:
    """The windows of one recording of ``num_samples``: cores of ``core`` samples (a multiple of
    ``samples_per_frame``) with ``context`` samples either side, clipped to the recording. A
    recording no longer than ``core + 2 * context`` is one window."""
    if num_samples <= core + 2 * context:
        return [Piece(item, 0, num_samples, 0, None)]
    pieces = []
    for core_start in range(0, num_samples, core):
        start = max(0, core_start - context)
        last = core_start + core >= num_samples
        end = num_samples if last else min(num_samples, core_start + core + context)
        pieces.append(Piece(item, start, end, (core_start - start) // samples_per_frame, None if last else core // samples_per_frame))
    return pieces


def _batches(pieces: list[Piece], rate: int, batch_seconds: float, equal_only: bool) -> list[list[Piece]]:
    """Pieces grouped into forward passes of at most ``batch_seconds`` of padded audio (at least
    one piece each), longest first; ``equal_only``: only pieces of one length together."""
    order = sorted(pieces, key=lambda p: (-len(p), p.item, p.start))
    batches: list[list[Piece]] = []
    for piece in order:
        current = batches[-1] if batches else None
        if current and (len(current) + 1) * len(current[0]) <= batch_seconds * rate and (not equal_only or len(piece) == len(current[0])):
            current.append(piece)
        else:
            batches.append([piece])
    return batches


def windowed_log_probs(
    model: AcousticModel, waveforms: Sequence[Tensor], *, window: float = WINDOW_SECONDS, context: float = CONTEXT_SECONDS,
    batch_seconds: float = BATCH_SECONDS,
) -> list[Tensor]:
    """``(T_i, C)`` float32 log-probs (on the CPU) of each mono waveform at the model's rate.

    Args:
        model: the :class:`AcousticModel` (runs on its device).
        waveforms: ``(N_i,)`` each.
        window: seconds of audio whose frames each window keeps (rounded to whole frames).
        context: seconds of audio either side of a window's core that the model sees but whose
            frames are dropped (at least one frame).
        batch_seconds: audio per forward pass, windows of several recordings together.

    Raises:
        ValueError: options out of range, a waveform that is not ``(N,)`` or too short for one frame.
    """
    for name, value in (("window", window), ("batch_seconds", batch_seconds)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    if not (isinstance(context, (int, float)) and math.isfinite(context) and context >= 0):
        raise ValueError(f"context must be a number of seconds >= 0, got {context!r}")
    rate, spf = model.sample_rate, model.samples_per_frame
    core = max(1, round(window * rate / spf)) * spf
    ctx = max(1, math.ceil(context * rate / spf)) * spf
    audio, moments, pieces = [], [], []
    for i, w in enumerate(waveforms):
        w = torch.as_tensor(w)
        if w.dim() != 1:
            raise ValueError(f"waveform {i} must be mono (N,), got shape {tuple(w.shape)}")
        audio.append(w)
        moments.append(_moments(w) if model.normalize else (0.0, 1.0))  # applied per window: no normalised copy
        pieces += plan_windows(len(w), spf, core, ctx, i)
    kept: dict[Piece, Tensor] = {}
    for batch in _batches(pieces, rate, batch_seconds, model.padding is None):
        n = len(batch[0])
        x = torch.zeros(len(batch), n)
        for b, p in enumerate(batch):
            mean, scale = moments[p.item]
            x[b, : len(p)] = (audio[p.item][p.start : p.end].float() - mean) * scale
        log_probs, frames = model.log_probs(x, torch.tensor([len(p) for p in batch]))
        for b, p in enumerate(batch):
            have = int(frames[b])
            stop = have if p.frames is None else p.keep + p.frames
            if stop > have or p.keep > have:
                raise ValueError(f"context {context} s is too short for {model.name}: a window of {len(p)} samples gives "
                                 f"{have} frames, {stop} needed; pass a longer context")
            kept[p] = log_probs[b, p.keep : stop].to("cpu", copy=True)  # not a view pinning the batch
    out = []
    for i in range(len(audio)):
        parts = [kept[p] for p in pieces if p.item == i]
        lp = torch.cat(parts) if len(parts) > 1 else parts[0]
        if lp.shape[0] == 0:
            raise ValueError(f"waveform {i} ({len(audio[i]) / rate:.3f} s) is too short for one frame of {model.name}")
        out.append(lp)
    return out
