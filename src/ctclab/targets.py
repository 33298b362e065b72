r"""Alignment targets: the per-frame posterior occupation :math:`\gamma_t(k)` out of any CTC loss.

Training with cross-entropy against the detached targets gives exactly the CTC gradient with
respect to the logits (``softmax - gamma``); replacing them by a modified ``q`` gives
``softmax - q``. That makes label smoothing, re-weighting and similar variants a line of code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._inputs import Lengths, ctc_batch
from .loss import compute_dtype
from .trellis import CTCTrellis, Topology, add_wildcard, state_posteriors

CTCLossFn = Callable[..., Tensor]


def alignment_targets(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    ctc_loss: CTCLossFn | None = None,
) -> Tensor:
    r"""Per-frame alignment targets :math:`\gamma_t(k) = \sum_{s: l'_s = k} \alpha_t(s)\beta_t(s) / p(l|x)`.

    Computed from the gradient of any CTC implementation through a ``log_softmax``:
    for :math:`\mathcal{L} = \mathrm{CTC}(\mathrm{log\_softmax}(z))` every correct implementation has
    :math:`\partial \mathcal{L} / \partial z = \mathrm{softmax}(z) - \gamma` (ctclab's true gradient and
    the built-in's ``exp(lp) - gamma`` agree there), so
    :math:`\gamma = \mathrm{softmax}(z) - \partial \mathcal{L} / \partial z` with ``z = log_probs``.
    Per-frame normalisation of the scores does not change the posterior over paths, so
    ``log_probs`` need not be normalised.

    Args:
        log_probs: ``(T, B, C)`` or ``(T, C)`` log-scores.
        targets, input_lengths, target_lengths, blank: as for :func:`ctclab.ctc_loss`.
        ctc_loss: any callable with the ``torch.nn.functional.ctc_loss`` signature (the built-in,
            ``ctclab.ctc_loss``, ``functools.partial(ctclab.ctc_loss, impl='autograd')``...).
            Default: ctclab's fused path.

    Returns:
        ``(T, B, C)`` (or ``(T, C)``) detached targets in the compute dtype (float32 for
        half inputs): each frame inside an item's input length sums to 1, frames beyond it
        are 0, and every frame of an item whose target cannot be aligned (too short, or only
        zero-probability paths) is 0.

    References:
        A. Graves et al., ICML 2006, section 4.2 (eq. 14-16).
    """
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    if ctc_loss is None:
        from .loss import ctc_loss
    logits = batch.log_probs.detach().to(compute_dtype(batch.log_probs.dtype)).requires_grad_(True)
    with torch.enable_grad():
        losses = ctc_loss(
            logits.log_softmax(-1), batch.targets, batch.input_lengths, batch.target_lengths,
            blank=blank, reduction="none",
        )
        alignable = torch.isfinite(losses.detach())
        (grad,) = torch.autograd.grad(torch.where(alignable, losses, 0.0).sum(), logits)
    T = logits.shape[0]
    inside = torch.arange(T, device=logits.device)[:, None] < batch.input_lengths[None, :]
    keep = (inside & alignable[None])[..., None]
    gamma = torch.where(keep, logits.detach().softmax(-1) - grad, 0.0).clamp_(min=0)
    return gamma.squeeze(1) if batch.unbatched else gamma


def state_occupation(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Lengths | None = None,
    target_lengths: Lengths | None = None,
    blank: int = 0,
    topology: Topology = "standard",
    star: float | None = None,
) -> Tensor:
    r"""``(T, B, S)`` (or ``(T, S)``) posterior occupation :math:`\gamma_t(s)` of each state of the
    blank-extended target (state ``2i + 1`` is label ``i``, even states are blanks),
    ``S = 2 max(L) + 1``. Frames beyond an item's input length, and impossible items, are 0.
    ``star``: wildcard penalty when ``targets`` hold :data:`ctclab.trellis.STAR` entries
    (see :func:`ctclab.trellis.add_wildcard`)."""
    if star is not None:
        log_probs, targets = add_wildcard(log_probs, targets, float(star))
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    trellis = CTCTrellis.build(batch, topology)
    with torch.no_grad():
        emissions = trellis.emissions(batch.log_probs.to(compute_dtype(batch.log_probs.dtype)))
        gamma = state_posteriors(trellis, emissions)
    return gamma[:, 0] if batch.unbatched else gamma
