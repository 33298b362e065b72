"""The picture of an audio alignment (the torchaudio forced-alignment tutorial's figure): the
waveform with each word's segment and text, and the emissions of the transcript's tokens.

Readable for minutes of audio: a fixed size, the waveform drawn as its min/max envelope over
at most :data:`COLUMNS` columns, the emissions max-pooled to as many frames, and word labels
only where they have room (each label takes about 1/:data:`LABELS` of the width).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..formats import token_text, write_atomically
from ..plot import _pyplot
from .corpus import AudioAlignment

COLUMNS = 2000
LABELS = 60
FIGSIZE = (14.0, 6.0)


def _envelope(waveform: Tensor, columns: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, low, high)``: sample positions and the min/max of each of at most ``columns`` bins."""
    n = len(waveform)
    bins = max(1, min(columns, n))
    size = -(-n // bins)
    padded = torch.nn.functional.pad(waveform.float(), (0, size * bins - n), value=float(waveform[-1]))
    blocks = padded.reshape(bins, size)
    return torch.arange(bins) * size, blocks.amin(1), blocks.amax(1)


def plot_audio_alignment(waveform: Tensor, sample_rate: int, result: AudioAlignment, out=None, *,
                         title: str | None = None, close: bool = False):
    """Draw ``result`` (an :class:`~ctclab.speech.corpus.AudioAlignment` made with
    ``keep_log_probs=True``) over its ``(N,)`` waveform at ``sample_rate``.

    Args:
        out: a path (format from the suffix, PNG without one; written atomically) or a binary
            file object; None: not written.
        close: close the figure after writing (for many pictures in one process).

    Returns:
        The matplotlib Figure (None when closed).
    """
    plt = _pyplot()
    if result.log_probs is None:
        raise ValueError("the alignment holds no emissions: make it with keep_log_probs=True")
    waveform = torch.as_tensor(waveform).detach().float().cpu()
    duration = len(waveform) / sample_rate
    fig, (ax_wave, ax_em) = plt.subplots(2, 1, figsize=FIGSIZE, sharex=True, gridspec_kw={"height_ratios": (1, 1.3)})
    x, low, high = _envelope(waveform, COLUMNS)
    ax_wave.fill_between((x / sample_rate).numpy(), low.numpy(), high.numpy(), color="tab:blue", linewidth=0.3)
    room = duration / LABELS
    last_label = -room
    for i, w in enumerate(result.words):
        a, b = w.start_time, w.end_time
        ax_wave.axvspan(a, b, color=("tab:orange", "tab:green")[i % 2], alpha=0.3, linewidth=0)  # neighbours told apart
        if a - last_label >= room or len(result.words) <= LABELS:
            ax_wave.annotate(w.text, ((a + b) / 2, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                             fontsize=7, annotation_clip=True)
            last_label = a
    ax_wave.set_ylabel("waveform")
    ax_wave.set_xlim(0, duration)
    ax_wave.set_title(title or f"{result.id}: {len(result.words)} words, {duration:.1f} s", pad=14)

    # emissions of the classes the transcript uses, max-pooled in time
    classes = sorted({t.token for t in result.tokens if t.token >= 0})
    lp = result.log_probs.float()
    shown = lp[:, classes] if classes else lp
    frames = shown.shape[0]
    pool = max(1, -(-frames // COLUMNS))
    if pool > 1:
        shown = torch.nn.functional.max_pool1d(shown.T[None], pool, pool, ceil_mode=True)[0].T
    extent = (0, frames * result.frame_shift, -0.5, shown.shape[1] - 0.5)
    image = ax_em.imshow(shown.clamp(min=-20).T.numpy(), aspect="auto", origin="lower", cmap="viridis",
                         interpolation="nearest", extent=extent)
    if classes and len(classes) <= 60:
        ax_em.set_yticks(range(len(classes)), [token_text(k, result.vocabulary) for k in classes], fontsize=6)
    ax_em.set_ylabel("emission (log-prob)")
    ax_em.set_xlabel("time (s)")
    fig.colorbar(image, ax=[ax_wave, ax_em], fraction=0.02, pad=0.01)
    if isinstance(out, (str, os.PathLike)):
        write_atomically(out, lambda f: fig.savefig(f, format=Path(out).suffix[1:].lower() or "png", dpi=100))
    elif out is not None:
        fig.savefig(out, dpi=100)
    if close:
        plt.close(fig)
        return None
    return fig
