r"""Alignment targets: the per-frame posterior occupation :math:`\gamma_t(k)` out of any CTC loss.

Training with cross-entropy against the detached targets gives exactly the CTC gradient with
respect to the logits (``softmax - gamma``); replacing them by a modified ``q`` gives
``softmax - q``. That makes label smoothing, re-weighting and similar variants a line of code.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from . import backends
from ._inputs import Lengths, _lengths_tensor, check_scores, compute_dtype, ctc_batch, frame_mask
from .graph import CTCGraph, Topology
from .trellis import add_wildcard

CTCLossFn = Callable[..., Tensor]


def alignment_targets(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    ctc_loss: CTCLossFn | None = None,
    *,
    impl: str = "auto",
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
            Default: ctclab's own, with the backend ``impl`` (:mod:`ctclab.backends`).

    Returns:
        ``(T, B, C)`` (or ``(T, C)``) detached targets in the compute dtype (float32 for
        half inputs): each frame inside an item's input length sums to 1, frames beyond it
        are 0, and every frame of an item whose target cannot be aligned (too short, or only
        zero-probability paths) is 0. An item with NaN inside its frames gets NaN there, as
        its loss is NaN.

    References:
        A. Graves et al., ICML 2006, section 4.2 (eq. 14-16).
    """
    if ctc_loss is not None and not callable(ctc_loss):
        raise TypeError(f"ctc_loss must be a callable like torch.nn.functional.ctc_loss, got {type(ctc_loss).__name__}")
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    if ctc_loss is None:
        from functools import partial

        from .loss import ctc_loss as ctclab_loss

        ctc_loss = partial(ctclab_loss, impl=backends.check_impl(impl))
    elif impl != "auto":
        raise ValueError("pass either ctc_loss or impl (ctclab's own loss with that backend), not both")
    logits = batch.log_probs.detach().to(compute_dtype(batch.log_probs.dtype)).requires_grad_(True)
    with torch.enable_grad():
        losses = ctc_loss(
            logits.log_softmax(-1), batch.targets, batch.input_lengths, batch.target_lengths,
            blank=blank, reduction="none",
        )
        alignable = torch.isfinite(losses.detach())
        (grad,) = torch.autograd.grad(torch.where(alignable, losses, 0.0).sum(), logits)
    T = logits.shape[0]
    inside = frame_mask(T, batch.input_lengths)
    keep = (inside & alignable[None])[..., None]
    gamma = torch.where(keep, logits.detach().softmax(-1) - grad, 0.0).clamp_(min=0)
    # an item whose loss is NaN (a NaN score inside its frames) gets NaN targets, not zeros
    gamma = gamma.masked_fill_((inside & torch.isnan(losses.detach())[None])[..., None], torch.nan)
    return gamma.squeeze(1) if batch.unbatched else gamma


def state_occupation(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Lengths | None = None,
    target_lengths: Lengths | None = None,
    blank: int = 0,
    topology: Topology = "standard",
    star: float | None = None,
    *,
    delay_penalty: float = 0.0,
    impl: str = "auto",
) -> Tensor:
    r"""``(T, B, S)`` (or ``(T, S)``) posterior occupation :math:`\gamma_t(s)` of each state of the
    blank-extended target (state ``2i + 1`` is label ``i``, even states are blanks),
    ``S = 2 max(L) + 1``. Frames beyond an item's input length, and impossible items, are 0.
    ``star``: wildcard penalty when ``targets`` hold :data:`ctclab.trellis.STAR` entries
    (see :func:`ctclab.trellis.add_wildcard`). ``topology``, ``delay_penalty``: the trellis's
    options, as for :func:`ctclab.ctc_loss`. ``impl``: the backend (:mod:`ctclab.backends`).

    Raises:
        ValueError: as :func:`ctclab.ctc_loss`; NaN inside an item's frames (naming item and frame).
    """
    if star is not None:
        log_probs, targets = add_wildcard(log_probs, targets, float(star))
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    check_scores(batch.log_probs, batch.input_lengths)
    graph = CTCGraph.build(batch, topology, delay_penalty)
    log_probs = batch.log_probs.detach().to(compute_dtype(batch.log_probs.dtype))
    gamma = backends.select("posteriors", impl, graph, log_probs).posteriors(graph, log_probs)
    return gamma[:, 0] if batch.unbatched else gamma


def real_number(name: str, value) -> float:
    """``value`` as a Python float: a real number (a 0-D / one-element tensor too, not a bool),
    finite. Range checks are the caller's (with the meaning of the parameter in the message)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def class_index(name: str, value, num_classes: int) -> int:
    """``value`` checked to be an int class index in ``[0, num_classes)`` (negative indices, which
    would silently pick a class from the end, are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int class index, got {type(value).__name__}")
    if not 0 <= value < num_classes:
        raise ValueError(f"{name} must be a class index in [0, C) = [0, {num_classes}), got {value}")
    return int(value)


def _scores(name: str, x) -> tuple[Tensor, bool]:
    """A floating ``(T, B, C)`` or unbatched ``(T, C)`` tensor -> ``(T, B, C)`` and whether it was unbatched."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (T, B, C) or unbatched (T, C), got shape {tuple(x.shape)}")
    return (x.unsqueeze(1), True) if x.dim() == 2 else (x, False)


def _frame_lengths(input_lengths: Lengths | None, T: int, B: int, unbatched: bool, device: torch.device) -> Tensor:
    """``(B,)`` int64 input lengths, checked: ``(B,)``, or for unbatched input an int, a 0-D or
    one-element tensor or sequence; values in ``[0, T]``. None: every item has ``T`` frames."""
    if input_lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)
    lengths = _lengths_tensor("input_lengths", input_lengths, device)
    if unbatched or (B == 1 and lengths.dim() == 0):
        lengths = lengths.reshape(-1)
    if lengths.shape != (B,):
        hint = "" if unbatched else " (a single int only for unbatched (T, C) input)"
        raise ValueError(f"input_lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}{hint}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"input_lengths must be >= 0, got {int(lengths.min())}")
    if lengths.numel() and int(lengths.max()) > T:
        raise ValueError(f"input_lengths must be <= T = {T} (the number of frames), got {int(lengths.max())}")
    return lengths


def _valid_frames(T: int, B: int, input_lengths: Lengths | None, unbatched: bool, device: torch.device) -> Tensor:
    """``(T, B, 1)`` bool mask of frames inside each item's input length (all when None)."""
    return frame_mask(T, _frame_lengths(input_lengths, T, B, unbatched, device))[..., None]


def smoothing_prior(
    num_classes: int, prior: str | Tensor = "uniform", blank: int = 0, *, dtype: torch.dtype | None = None
) -> Tensor:
    """``(C,)`` distribution to smooth towards: ``'uniform'`` over all classes, ``'nonblank'``
    (uniform over the labels, blank-aware as in Bonito), or a user-given ``(C,)`` tensor of
    finite, non-negative weights with a positive sum (normalised here). ``dtype``: of the result
    (default: torch's default dtype for a name, the tensor's floating dtype for a tensor).

    Raises:
        TypeError: ``prior`` neither a string nor a real tensor; ``num_classes`` or ``blank`` not an int.
        ValueError: an unknown name, a tensor of the wrong shape or with NaN, infinite or negative
            entries or a zero sum, ``num_classes < 1``, ``blank`` outside ``[0, C)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    blank = class_index("blank", blank, num_classes)
    if isinstance(prior, Tensor):
        if prior.is_complex() or prior.dtype == torch.bool:
            raise TypeError(f"prior must be a real tensor of class weights, got dtype {prior.dtype}")
        if prior.shape != (num_classes,):
            raise ValueError(f"prior must have shape (C,) = ({num_classes},), got {tuple(prior.shape)}")
        if dtype is not None or not prior.is_floating_point():
            prior = prior.to(dtype or torch.get_default_dtype())
        if not bool(torch.isfinite(prior).all()):
            raise ValueError(f"prior must hold finite weights, got {prior.tolist()}")
        if bool((prior < 0).any()):
            raise ValueError(f"prior must hold non-negative weights, got {prior.tolist()}")
        total = prior.sum()
        if float(total) <= 0:
            raise ValueError("prior must have a positive sum (it is normalised to a distribution), got all zeros")
        return prior / total
    if not isinstance(prior, str):
        raise TypeError(f"prior must be 'uniform', 'nonblank' or a (C,) tensor, got {type(prior).__name__}")
    if prior == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes, dtype=dtype)
    if prior == "nonblank":
        if num_classes < 2:
            raise ValueError("prior='nonblank' needs at least one non-blank class (C >= 2)")
        p = torch.full((num_classes,), 1.0 / (num_classes - 1), dtype=dtype)
        p[blank] = 0.0
        return p
    raise ValueError(f"prior must be 'uniform', 'nonblank' or a (C,) tensor, got {prior!r}")


def smooth_targets(
    gamma: Tensor, eps: float, prior: str | Tensor = "uniform", blank: int = 0, input_lengths: Lengths | None = None
) -> Tensor:
    r"""Label smoothing of alignment targets: :math:`q = (1 - \epsilon)\gamma + \epsilon\,\pi`.

    Cross-entropy against ``q`` has the gradient of
    :math:`(1-\epsilon)\,\mathcal{L}_{CTC} + \epsilon \sum_t \mathrm{CE}(\pi, y_t)` with respect to
    the logits.

    Args:
        gamma: ``(T, B, C)`` targets from :func:`alignment_targets`, or ``(T, C)`` for one utterance.
        eps: smoothing weight in ``[0, 1]``.
        prior: see :func:`smoothing_prior`.
        blank: the blank class, in ``[0, C)`` (used by ``prior='nonblank'``).
        input_lengths: ``(B,)`` frames of each item (an int, 0-D tensor or one-element sequence
            for ``(T, C)`` input); frames beyond stay 0. None: all frames.

    Returns:
        ``q``, the shape of ``gamma``.

    References: C. Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016 (label
    smoothing); applied to CTC alignment targets as in ONT's Bonito.
    """
    g, unbatched = _scores("gamma", gamma)
    T, B, C = g.shape
    eps = real_number("eps", eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    pi = smoothing_prior(C, prior, blank, dtype=compute_dtype(g.dtype)).to(g)
    q = torch.where(_valid_frames(T, B, input_lengths, unbatched, g.device), (1 - eps) * g + eps * pi, 0.0)
    return q.squeeze(1) if unbatched else q


def target_cross_entropy(
    log_probs: Tensor, q: Tensor, weights: Tensor | None = None, reduction: str = "sum"
) -> Tensor:
    r"""Cross-entropy of log-probs against per-frame targets ``q``:
    :math:`-\sum_t w_t \sum_k q_t(k) \log y_t(k)`, per item then reduced (``'none'`` -> ``(B,)``,
    ``'sum'``, ``'mean'`` over the batch). With ``log_probs = log_softmax(z)`` and ``q`` summing to 1
    the gradient with respect to ``z`` is :math:`w_t (y_t - q_t)`.

    Args:
        log_probs: ``(T, B, C)``, or ``(T, C)`` for one utterance (then ``'none'`` gives a scalar).
        q: targets of the same shape.
        weights: optional per-frame weights, ``(T, B)`` (``(T,)`` for one utterance).
        reduction: ``'none'``, ``'sum'`` or ``'mean'``.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    lp, unbatched = _scores("log_probs", log_probs)
    if not isinstance(q, Tensor) or q.shape != log_probs.shape:
        got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q must have the shape of log_probs {tuple(log_probs.shape)}, got {got}")
    if weights is not None:
        expected = tuple(log_probs.shape[:-1])
        if not isinstance(weights, Tensor) or tuple(weights.shape) != expected:
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(f"weights must have shape {'(T,)' if unbatched else '(T, B)'} = {expected}, got {got}")
    q3 = q.unsqueeze(1) if unbatched else q
    safe = torch.where(q3 > 0, lp, 0.0)  # 0 * -inf would be NaN for masked classes
    per_frame = -(q3 * safe).sum(-1)
    if weights is not None:
        per_frame = per_frame * (weights.unsqueeze(1) if unbatched else weights)
    per_item = per_frame.sum(0)
    if reduction == "none":
        return per_item.squeeze(0) if unbatched else per_item
    if reduction == "sum":
        return per_item.sum()
    return per_item.mean()


def reweight_nonblank_proportion(
    gamma: Tensor, targets: Tensor, target_lengths: Lengths, a: float, blank: int = 0,
    input_lengths: Lengths | None = None,
) -> Tensor:
    r"""Non-blank proportion re-weighting (Li & Wang, arXiv 1904.10619, section 3.1).

    Per item: each non-blank class's total target mass over time is rescaled to its count in
    the label, the blank's total to :math:`\frac{1-a}{a} N` (``N`` = number of labels, so
    non-blank labels make up a fraction ``a`` of the mass), then every frame is renormalised to
    sum to 1.

    Args:
        gamma: ``(T, B, C)`` targets (from :func:`alignment_targets`), or ``(T, C)`` for one utterance.
        targets, target_lengths, blank, input_lengths: as for :func:`ctclab.ctc_loss` (padded
            ``(B, S)``, concatenated or unbatched ``(S,)`` targets; None lengths mean full length).
        a: the non-blank proportion, ``0 < a < 1``.

    Returns:
        The re-weighted targets, the shape of ``gamma``; frames beyond ``input_lengths`` are 0.
    """
    a = real_number("a", a)
    if not 0.0 < a < 1.0:
        raise ValueError(f"a must be in (0, 1), got {a}")
    _scores("gamma", gamma)
    batch = ctc_batch(gamma, targets, input_lengths, target_lengths, blank)
    g = batch.log_probs
    T, B, C = g.shape
    lengths = batch.target_lengths
    inside = torch.arange(batch.targets.shape[1], device=g.device) < lengths[:, None]
    # the per-item targets a * count (labels) and (1 - a) N (blank): the ratio (1 - a) / a of the
    # method without its overflow for a -> 0 (each frame is renormalised, so a common factor goes)
    counts = torch.zeros(B, C, dtype=g.dtype, device=g.device)
    counts.scatter_add_(1, batch.targets, inside.to(g.dtype) * a)
    counts[:, batch.blank] = (1 - a) * lengths.to(g.dtype)
    mass = g.sum(0)
    scale = torch.where(mass > 0, counts / mass.clamp(min=torch.finfo(g.dtype).tiny), 0.0)
    q = g * scale
    total = q.sum(-1, keepdim=True)
    q = torch.where(total > 0, q / total.clamp(min=torch.finfo(g.dtype).tiny), 0.0)
    q = torch.where(frame_mask(T, batch.input_lengths)[..., None], q, 0.0)
    return q.squeeze(1) if batch.unbatched else q


def focusing_weights(q: Tensor, log_probs: Tensor, g: float, input_lengths: Lengths | None = None) -> Tensor:
    r"""Per-frame focusing weights (Li & Wang, arXiv 1904.10619, section 3.2):
    :math:`w_t = (\max_k (q_t(k) - y_t(k)))^g`, normalised to sum to each item's number of frames.
    Frames the model already gets right weigh less. ``g = 0`` (or a model that matches ``q``
    exactly) gives all ones.

    Args:
        q: ``(T, B, C)`` targets, or ``(T, C)`` for one utterance.
        log_probs: the model's log-probs, the shape of ``q``.
        g: the focusing exponent, finite and ``>= 0``.
        input_lengths: as for :func:`smooth_targets`.

    Returns:
        ``(T, B)`` (``(T,)`` for one utterance) detached weights, 0 beyond each input length.
    """
    g = real_number("g", g)
    if g < 0:
        raise ValueError(f"g must be >= 0, got {g}")
    q3, unbatched = _scores("q", q)
    if not isinstance(log_probs, Tensor) or log_probs.shape != q.shape:
        got = tuple(log_probs.shape) if isinstance(log_probs, Tensor) else type(log_probs).__name__
        raise ValueError(f"log_probs must have the shape of q {tuple(q.shape)}, got {got}")
    lp = log_probs.unsqueeze(1) if unbatched else log_probs
    T, B, _ = q3.shape
    valid = _valid_frames(T, B, input_lengths, unbatched, q3.device)[..., 0]
    gap = (q3 - lp.detach().exp()).amax(-1).clamp(min=0)
    w = torch.where(valid, gap**g, 0.0)
    frames = valid.sum(0).to(w.dtype)
    total = w.sum(0)
    # a NaN total (NaN scores) stays NaN rather than turning into unit weights
    w = torch.where(total == 0, valid.to(w.dtype), w * (frames / total.clamp(min=torch.finfo(w.dtype).tiny))).detach()
    return w.squeeze(1) if unbatched else w
