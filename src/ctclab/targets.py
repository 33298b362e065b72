r"""Alignment targets: the per-frame posterior occupation :math:`\gamma_t(k)` out of any CTC loss.

Training with cross-entropy against the detached targets gives exactly the CTC gradient with
respect to the logits (``softmax - gamma``); replacing them by a modified ``q`` gives
``softmax - q``. That makes label smoothing, re-weighting and similar variants a line of code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._inputs import Lengths, ctc_batch, frame_mask
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
    keep = (frame_mask(T, batch.input_lengths) & alignable[None])[..., None]
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


def _valid_frames(targets_like: Tensor, input_lengths: Tensor | None) -> Tensor:
    """``(T, B, 1)`` bool mask of frames inside each item's input length (all when None)."""
    T, B = targets_like.shape[:2]
    if input_lengths is None:
        return torch.ones(T, B, 1, dtype=torch.bool, device=targets_like.device)
    lengths = torch.as_tensor(input_lengths, device=targets_like.device)
    return frame_mask(T, lengths)[..., None]


def smoothing_prior(num_classes: int, prior: str | Tensor = "uniform", blank: int = 0) -> Tensor:
    """``(C,)`` distribution to smooth towards: ``'uniform'`` over all classes, ``'nonblank'``
    (uniform over the labels, blank-aware as in Bonito), or a user-given ``(C,)`` tensor
    (normalised here)."""
    if isinstance(prior, Tensor):
        if prior.shape != (num_classes,) or bool((prior < 0).any()) or float(prior.sum()) <= 0:
            raise ValueError(f"prior must be a non-negative (C,) = ({num_classes},) tensor with positive sum")
        return prior / prior.sum()
    if prior == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes)
    if prior == "nonblank":
        if num_classes < 2:
            raise ValueError("prior='nonblank' needs at least one non-blank class")
        p = torch.full((num_classes,), 1.0 / (num_classes - 1))
        p[blank] = 0.0
        return p
    raise ValueError(f"prior must be 'uniform', 'nonblank' or a (C,) tensor, got {prior!r}")


def smooth_targets(
    gamma: Tensor, eps: float, prior: str | Tensor = "uniform", blank: int = 0, input_lengths: Lengths | None = None
) -> Tensor:
    r"""Label smoothing of alignment targets: :math:`q = (1 - \epsilon)\gamma + \epsilon\,\pi`.

    Cross-entropy against ``q`` has the gradient of
    :math:`(1-\epsilon)\,\mathcal{L}_{CTC} + \epsilon \sum_t \mathrm{CE}(\pi, y_t)` with respect to
    the logits. ``gamma``: ``(T, B, C)`` from :func:`alignment_targets`; frames beyond
    ``input_lengths`` stay 0. ``prior``: see :func:`smoothing_prior`.

    References: C. Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016 (label
    smoothing); applied to CTC alignment targets as in ONT's Bonito.
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    pi = smoothing_prior(gamma.shape[-1], prior, blank).to(gamma)
    return torch.where(_valid_frames(gamma, input_lengths), (1 - eps) * gamma + eps * pi, 0.0)


def target_cross_entropy(
    log_probs: Tensor, q: Tensor, weights: Tensor | None = None, reduction: str = "sum"
) -> Tensor:
    r"""Cross-entropy of ``(T, B, C)`` log-probs against per-frame targets ``q``:
    :math:`-\sum_t w_t \sum_k q_t(k) \log y_t(k)`, per item then reduced (``'none'`` -> ``(B,)``,
    ``'sum'``, ``'mean'`` over the batch). With ``log_probs = log_softmax(z)`` and ``q`` summing to 1
    the gradient with respect to ``z`` is :math:`w_t (y_t - q_t)`. ``weights``: optional ``(T, B)``."""
    if q.shape != log_probs.shape:
        raise ValueError(f"q must have the shape of log_probs {tuple(log_probs.shape)}, got {tuple(q.shape)}")
    safe = torch.where(q > 0, log_probs, 0.0)  # 0 * -inf would be NaN for masked classes
    per_frame = -(q * safe).sum(-1)
    if weights is not None:
        per_frame = per_frame * weights
    per_item = per_frame.sum(0)
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        return per_item.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def reweight_nonblank_proportion(
    gamma: Tensor, targets: Tensor, target_lengths: Lengths, a: float, blank: int = 0,
    input_lengths: Lengths | None = None,
) -> Tensor:
    r"""Non-blank proportion re-weighting (Li & Wang, arXiv 1904.10619, section 3.1).

    Per item: each non-blank class's total target mass over time is rescaled to its count in
    the label, the blank's total to :math:`\frac{1-a}{a} N` (``N`` = number of labels, so
    non-blank labels make up a fraction ``a`` of the mass), then every frame is renormalised to
    sum to 1. ``gamma`` ``(T, B, C)``; ``targets`` padded ``(B, S)``; ``0 < a < 1``.
    """
    if not 0.0 < a < 1.0:
        raise ValueError(f"a must be in (0, 1), got {a}")
    T, B, C = gamma.shape
    lengths = torch.as_tensor(target_lengths, device=gamma.device)
    inside = torch.arange(targets.shape[1], device=gamma.device) < lengths[:, None]
    counts = torch.zeros(B, C, dtype=gamma.dtype, device=gamma.device)
    counts.scatter_add_(1, targets.clamp(min=0).to(gamma.device), inside.to(gamma.dtype))
    counts[:, blank] = (1 - a) / a * lengths.to(gamma.dtype)
    mass = gamma.sum(0)
    scale = torch.where(mass > 0, counts / mass.clamp(min=torch.finfo(gamma.dtype).tiny), 0.0)
    q = gamma * scale
    total = q.sum(-1, keepdim=True)
    q = torch.where(total > 0, q / total.clamp(min=torch.finfo(gamma.dtype).tiny), 0.0)
    return torch.where(_valid_frames(gamma, input_lengths), q, 0.0)


def focusing_weights(q: Tensor, log_probs: Tensor, g: float, input_lengths: Lengths | None = None) -> Tensor:
    r"""Per-frame focusing weights (Li & Wang, arXiv 1904.10619, section 3.2):
    :math:`w_t = (\max_k (q_t(k) - y_t(k)))^g`, normalised to sum to each item's number of frames.
    Frames the model already gets right weigh less. ``g = 0`` gives all ones. Returns ``(T, B)``,
    detached."""
    if g < 0:
        raise ValueError(f"g must be >= 0, got {g}")
    valid = _valid_frames(q, input_lengths)[..., 0]
    gap = (q - log_probs.detach().exp()).amax(-1).clamp(min=0)
    w = torch.where(valid, gap**g, 0.0)
    frames = valid.sum(0).to(w.dtype)
    total = w.sum(0)
    return torch.where(total > 0, w * (frames / total.clamp(min=torch.finfo(w.dtype).tiny)), valid.to(w.dtype)).detach()
