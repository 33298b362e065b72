"""The alignment picture: the Viterbi path over the emissions, and the alignment targets.

Input steps (frames) run along x, output steps (states of the blank-extended target, blank
labelled) along y. Needs matplotlib (``pip install ctclab[plot]``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ._inputs import ctc_batch
from .align import STAR, Alignment
from .graph import CTCGraph


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("ctclab.plot needs matplotlib: pip install 'ctclab[plot]'") from error
    return plt


def plot_alignment(
    log_probs: Tensor,
    targets: Sequence[int] | Tensor,
    alignment: Alignment,
    vocab: Sequence[str] | None = None,
    blank: int | None = None,
    state_posteriors: Tensor | None = None,
    out=None,
    title: str | None = None,
):
    """Draw one utterance's alignment.

    Args:
        log_probs: ``(T, C)`` log-probs of the utterance.
        targets: its ``L`` target indices (may contain :data:`ctclab.align.STAR`).
        alignment: its :func:`ctclab.forced_align` result (unbatched, ``states`` ``(T,)``; an
            item of a padded batch, ``ali.item(b)``, may cover more frames than its length).
        vocab: index -> token string for the y labels (indices otherwise).
        blank: the blank index (default: the alignment's own).
        state_posteriors: optional ``(T, S)`` occupation of the ``S = 2L + 1`` states
            (:func:`ctclab.targets.state_occupation`), drawn as a second panel.
        out: a path to write the picture to (its format from the suffix, PNG without one;
            written atomically), or a binary file object (PNG).

    Returns:
        The matplotlib Figure.
    """
    plt = _pyplot()
    targets = [int(t) for t in (targets.tolist() if isinstance(targets, Tensor) else targets)]
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be (T, C) for one utterance, got shape {tuple(log_probs.shape)}")
    states = alignment.states
    if states.dim() != 1:
        raise ValueError("alignment must be one utterance's (unbatched) forced_align result")
    T = log_probs.shape[0]
    if states.shape[0] > T and bool((states[T:] < 0).all()):
        states = states[:T]  # an item of a padded batch, log_probs cut to its length
    elif states.shape[0] != T:
        raise ValueError(f"alignment covers {states.shape[0]} frames but log_probs have {T}")
    if blank is None:
        blank = getattr(alignment, "blank", 0)
    # the states of the alignment's graph (STAR entries kept: they name the wildcard's rows)
    batch = ctc_batch(log_probs, torch.tensor(targets, dtype=torch.long), None, None, blank, check_target_values=False)
    extended = CTCGraph.build(batch).labels[0].tolist()
    S = len(extended)

    def name(k: int) -> str:
        if k == STAR:
            return "<star>"
        if k == blank:
            return "\u2205"
        return vocab[k] if vocab is not None else str(k)

    columns = torch.tensor([k if k != STAR else blank for k in extended])
    emissions = log_probs.detach().float().cpu()[:, columns].T  # (S, T)
    if STAR in extended:
        star_rows = torch.tensor([k == STAR for k in extended])
        emissions[star_rows] = log_probs.detach().float().cpu().amax(1)
    panels = 2 if state_posteriors is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, T / 12), max(3.0, S / 5) * panels), squeeze=False, sharex=True)
    valid = states >= 0
    frames = torch.arange(T)[valid.cpu()]
    path = states.cpu()[valid.cpu()]
    ax = axes[0, 0]
    image = ax.imshow(emissions.clamp(min=-20).numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.plot(frames.numpy(), path.numpy(), color="red", linewidth=1.5, marker=".", markersize=3, label="Viterbi path")
    ax.set_ylabel("output step (extended target)")
    ax.set_yticks(range(S), [name(k) for k in extended], fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(title or "Viterbi path over the emissions (log-prob)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    if state_posteriors is not None:
        ax2 = axes[1, 0]
        image2 = ax2.imshow(state_posteriors.detach().float().cpu()[:, :S].T.numpy(), aspect="auto", origin="lower",
                            cmap="magma", interpolation="nearest", vmin=0, vmax=1)
        ax2.set_ylabel("output step (extended target)")
        ax2.set_yticks(range(S), [name(k) for k in extended], fontsize=7)
        ax2.set_title("alignment targets (posterior state occupation)")
        fig.colorbar(image2, ax=ax2, fraction=0.03)
    axes[-1, 0].set_xlabel("input step (frame)")
    fig.tight_layout()
    if isinstance(out, (str, os.PathLike)):  # atomically: a failed write leaves no partial picture, the previous one intact
        from .formats import write_atomically

        write_atomically(out, lambda f: fig.savefig(f, format=Path(out).suffix[1:].lower() or "png", dpi=110))
    elif out is not None:  # a file object
        fig.savefig(out, dpi=110)
    return fig
