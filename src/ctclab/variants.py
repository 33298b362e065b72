r"""CTC variants that change the loss or the emissions (the state-graph variants, k2's modified
topology and the delay penalty, are options of :func:`ctclab.ctc_loss` itself; the target
variants live in :mod:`ctclab.targets`).

Each reduces exactly to plain CTC at zero strength. The losses take their inputs exactly as
:func:`ctclab.ctc_loss` does (padded, concatenated or unbatched targets; ``None`` lengths mean
full length) and refuse what it refuses.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import Tensor

from . import backends
from ._inputs import CTCBatch, Lengths, compute_dtype, ctc_batch, frame_mask
from .loss import Impl, Reduction, check_options, ctc_loss, reduce_losses
from .targets import _frame_lengths, class_index, real_number
from .trellis import CTCTrellis, Topology, is_impossible, log_alpha, log_likelihood


def _batch_loss(batch: CTCBatch, impl: Impl, topology: Topology, delay_penalty: float) -> Tensor:
    """``(B,)`` per-item CTC loss of a canonical batch (``inf`` for items without a path)."""
    return ctc_loss(
        batch.log_probs, batch.targets, batch.input_lengths, batch.target_lengths, batch.blank, "none", False, impl,
        topology=topology, delay_penalty=delay_penalty,
    )


def _finish(losses: Tensor, batch: CTCBatch, reduction: str, zero_infinity: bool) -> Tensor:
    """Reduce ``(B,)`` per-item losses as :func:`ctclab.ctc_loss` does (a scalar for unbatched input)."""
    loss = reduce_losses(losses, batch.target_lengths, reduction, zero_infinity)
    return loss.squeeze(0) if batch.unbatched and reduction == "none" else loss


def focal_ctc_loss(
    log_probs: Tensor, targets: Tensor, input_lengths: Lengths | None, target_lengths: Lengths | None, blank: int = 0,
    alpha: float = 1.0, gamma: float = 2.0, reduction: Reduction = "mean", zero_infinity: bool = False,
    impl: Impl = "auto", *, topology: Topology = "standard", delay_penalty: float = 0.0,
) -> Tensor:
    r"""Focal CTC (Feng et al., "Focal CTC Loss for Chinese Optical Character Recognition on
    Unbalanced Datasets", Complexity 2019): per utterance
    :math:`\alpha\,(1 - e^{-\mathcal{L}})^{\gamma}\,\mathcal{L}` with :math:`\mathcal{L}` its CTC loss, so
    well-recognised utterances (:math:`e^{-\mathcal{L}} = p(l|x) \to 1`) count less. PaddleOCR's
    ``use_focal_loss`` is ``alpha=1, gamma=2``; ``gamma=0, alpha=1`` is plain CTC.

    Args:
        log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, impl,
            topology, delay_penalty: as for :func:`ctclab.ctc_loss` (``(T, B, C)`` or ``(T, C)``
            log-probs; ``None`` lengths mean full length). ``'mean'`` divides each item's focal
            loss by its target length, then averages over the batch.
        alpha: finite scale, ``> 0``.
        gamma: finite focusing exponent, ``>= 0``.

    Returns:
        A scalar, or ``(B,)`` for ``reduction='none'`` (a scalar for unbatched input); ``inf``
        for items whose target cannot fit (0 with ``zero_infinity``).
    """
    check_options(reduction, impl)
    alpha, gamma = real_number("alpha", alpha), real_number("gamma", gamma)
    if gamma < 0 or alpha <= 0:
        raise ValueError(f"need alpha > 0 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    losses = _batch_loss(batch, impl, topology, delay_penalty)
    finite = torch.isfinite(losses)
    safe = torch.where(finite, losses, 0.0)
    if gamma:
        # (1 - p)^gamma as exp(gamma log(1 - p)): pow's backward, gamma (1 - p)^(gamma - 1), is
        # infinite at a zero loss for gamma < 1 (and 0 * inf = NaN); log's, a division, is not
        one_minus_p = -torch.expm1(-safe)
        positive = one_minus_p > 0  # a loss <= 0 (unnormalised scores) weighs 0
        weight = torch.where(positive, torch.where(positive, one_minus_p, 1.0).log().mul(gamma).exp(), 0.0)
        focal = alpha * weight * safe
    else:
        focal = alpha * safe
    return _finish(torch.where(finite, focal, losses), batch, reduction, zero_infinity)


def blank_penalty(log_probs: Tensor, beta: float, blank: int = 0) -> Tensor:
    r"""Subtract ``beta`` nats from the blank's log-score at every frame (:math:`\log y_t(\varnothing) - \beta`):
    fewer blanks, less peaky alignments, fewer deletions at decoding. Feed the result to
    :func:`ctclab.ctc_loss` with ``impl='fused'`` or ``'autograd'`` (the scores are no longer
    normalised: only the true gradient is right; the built-in's is not).

    Args:
        log_probs: ``(..., C)`` log-scores, e.g. ``(T, B, C)``.
        beta: finite penalty in nats (negative: a bonus).
        blank: the blank class, in ``[0, C)``.

    Returns:
        The shifted scores, the shape of ``log_probs`` (``log_probs`` itself when ``beta = 0``).
    """
    if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point():
        got = log_probs.dtype if isinstance(log_probs, Tensor) else type(log_probs).__name__
        raise TypeError(f"log_probs must be a floating torch.Tensor (..., C), got {got}")
    if log_probs.dim() < 1:
        raise ValueError("log_probs must have a class axis (..., C), got a 0-D tensor")
    blank = class_index("blank", blank, log_probs.shape[-1])
    beta = real_number("beta", beta)
    if beta == 0:
        return log_probs
    shift = torch.zeros(log_probs.shape[-1], dtype=log_probs.dtype, device=log_probs.device)
    shift[blank] = beta
    return log_probs - shift


class LabelPrior:
    r"""Label priors (Huang et al., "Less Peaky and More Accurate CTC Forced Alignment by Label
    Priors", ICASSP 2024, arXiv 2406.02560): train on
    :math:`\log \tilde y_t(k) = \log y_t(k) - \lambda \log P(k)`, where ``P`` is a running,
    detached average of the posteriors over all frames seen. Suppresses blank's dominance.

    Usage::

        prior = LabelPrior(num_classes, lam=0.3)
        loss = ctclab.ctc_loss(prior.adjust(log_probs), targets, il, tl)  # fused or autograd
        prior.update(log_probs, il)

    ``lam = 0`` is plain CTC.

    Args:
        num_classes: ``C``, a positive int.
        lam: finite prior weight :math:`\lambda`.
        momentum: in ``[0, 1)``, the weight of the running prior at each update.
        blank: the blank class, in ``[0, C)``.
    """

    def __init__(self, num_classes: int, lam: float = 0.3, momentum: float = 0.99, blank: int = 0):
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"num_classes must be a positive int, got {type(num_classes).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes}")
        lam, momentum = real_number("lam", lam), real_number("momentum", momentum)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = int(num_classes)
        self.blank = class_index("blank", blank, self.num_classes)
        self.lam = lam
        self.momentum = momentum
        self.log_prior = torch.full((num_classes,), -torch.log(torch.tensor(float(num_classes))).item())
        self.seen = False

    def _check_classes(self, log_probs: Tensor) -> None:
        if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point():
            got = log_probs.dtype if isinstance(log_probs, Tensor) else type(log_probs).__name__
            raise TypeError(f"log_probs must be a floating torch.Tensor, got {got}")
        if log_probs.dim() < 1 or log_probs.shape[-1] != self.num_classes:
            raise ValueError(
                f"log_probs must have num_classes = {self.num_classes} classes on the last axis, "
                f"got shape {tuple(log_probs.shape)}"
            )

    def adjust(self, log_probs: Tensor) -> Tensor:
        """``(..., C)`` log-scores minus ``lam`` times the log-prior, the same shape."""
        self._check_classes(log_probs)
        if self.lam == 0:
            return log_probs
        return log_probs - self.lam * self.log_prior.to(log_probs)

    @torch.no_grad()
    def update(self, log_probs: Tensor, input_lengths: Lengths | None = None) -> None:
        """Fold the average posterior of this batch's valid frames into the running prior.

        Args:
            log_probs: ``(T, B, C)`` or unbatched ``(T, C)`` log-posteriors.
            input_lengths: ``(B,)`` frames of each item (an int for unbatched input); None: all.

        Raises:
            ValueError: NaN or ``+inf`` inside an item's frames (the prior is left as it was;
                padding beyond the input lengths is ignored), wrong shapes or lengths.
        """
        self._check_classes(log_probs)
        if log_probs.dim() not in (2, 3):
            raise ValueError(f"log_probs must be (T, B, C) or unbatched (T, C), got shape {tuple(log_probs.shape)}")
        unbatched = log_probs.dim() == 2
        x = log_probs.unsqueeze(1) if unbatched else log_probs
        T, B, _ = x.shape
        valid = frame_mask(T, _frame_lengths(input_lengths, T, B, unbatched, x.device))
        frames = x[valid].float()  # (N, C)
        if bool(torch.isnan(frames).any()) or bool((frames == torch.inf).any()):
            raise ValueError(
                "log_probs hold NaN or +inf inside the input lengths: the label prior would be poisoned; "
                "check the model's output (the prior is unchanged)"
            )
        if not frames.shape[0]:
            return  # no frame seen, nothing learnt
        probs = (frames.exp().sum(0) / frames.shape[0]).cpu()
        current = probs if not self.seen else self.momentum * self.log_prior.exp() + (1 - self.momentum) * probs
        self.log_prior = current.clamp(min=1e-30).log()
        self.seen = True


def _path_entropy(batch: CTCBatch, x: Tensor, topology: Topology, delay_penalty: float) -> tuple[Tensor, Tensor]:
    r"""``(B,)`` losses and path entropies :math:`H(\pi | l, x)` of the posterior over paths the
    loss defines, differentiable (double backward). ``x``: ``(T, B, C)``, requiring grad.

    :math:`H = -\mathcal{L} - \sum_t \sum_k \gamma_t(k) \log y_t(k) - E[\log w(\pi)]`. Without a
    delay penalty the path weights ``w`` are 1. With one, :math:`\log w = -\lambda D`,
    :math:`D = \sum_{\text{label entries}} (t - T_b/2)`, and :math:`E[D]` comes from the state
    occupation: label state ``2i + 1`` is entered at the number of frames spent in earlier
    states, so :math:`\sum_i t_i = \sum_t (L - \lfloor (s_t + 1)/2 \rfloor)`.
    """
    safe = torch.where(torch.isfinite(x), x, 0.0)
    if not delay_penalty:
        losses = _batch_loss(dataclasses.replace(batch, log_probs=x), "autograd", topology, delay_penalty)
        finite = torch.isfinite(losses)
        (grad,) = torch.autograd.grad(torch.where(finite, losses, 0.0).sum(), x, create_graph=True)
        entropy = -losses + (grad * safe).sum((0, 2))  # grad = -gamma
        return losses, torch.where(finite, entropy, 0.0)
    # the log-space recursion ctc_loss(impl='autograd') runs under a delay penalty, with the
    # state-level emissions exposed for the occupation
    trellis = CTCTrellis.build(batch, topology, delay_penalty)
    emissions = trellis.emissions(x.to(compute_dtype(x.dtype)))
    ll = log_likelihood(trellis, log_alpha(trellis, emissions))
    losses = torch.where(is_impossible(ll), torch.inf, -ll)
    finite = torch.isfinite(losses)
    grad, grad_states = torch.autograd.grad(torch.where(finite, losses, 0.0).sum(), (x, emissions), create_graph=True)
    S = trellis.labels.shape[1]
    states = torch.arange(S, device=x.device)
    labels_after = (batch.target_lengths[:, None] - (states + 1) // 2).to(losses.dtype)  # (B, S)
    entry_frames = -(grad_states * labels_after).sum((0, 2))  # E[sum of the label entry frames]
    centre = batch.input_lengths.to(losses.dtype) / 2
    expected_delay = entry_frames - centre * batch.target_lengths.to(losses.dtype)
    entropy = -losses + (grad * safe).sum((0, 2)).to(losses.dtype) + float(delay_penalty) * expected_delay
    return losses, torch.where(finite, entropy, 0.0)


def entropy_regularised_ctc_loss(
    log_probs: Tensor, targets: Tensor, input_lengths: Lengths | None, target_lengths: Lengths | None, blank: int = 0,
    beta: float = 0.2, reduction: Reduction = "mean", zero_infinity: bool = False,
    *, topology: Topology = "standard", delay_penalty: float = 0.0, impl: str = "autograd",
) -> Tensor:
    r"""Maximum-entropy regularised CTC, EnCTC (Liu et al., "Connectionist Temporal Classification
    with Maximum Entropy Regularization", NeurIPS 2018):
    :math:`\mathcal{L} = \mathcal{L}_{CTC} - \beta H(\pi | l, x)` with the path entropy

    .. math:: H = -\mathcal{L}_{CTC} - \sum_t \sum_k \gamma_t(k) \log y_t(k),

    ``gamma`` the posterior occupation. ``gamma`` is the gradient of the autograd path, taken with
    ``create_graph=True``, so ``H`` and the loss stay differentiable (double backward).
    ``beta = 0`` is plain CTC. With ``delay_penalty`` the entropy is that of the posterior over
    paths the penalised loss defines (its path weights count).

    Args:
        log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity,
            topology, delay_penalty: as for :func:`ctclab.ctc_loss`.
        beta: finite weight of the entropy.
        impl: a backend whose loss differentiates twice (the entropy is made of the loss's
            gradient): ``'autograd'``, the only one today.

    Returns:
        A scalar, or ``(B,)`` for ``reduction='none'`` (a scalar for unbatched input), in the dtype
        of ``log_probs``; ``inf`` for items whose target cannot fit (0 with ``zero_infinity``).
    """
    impl = check_options(reduction, impl)
    higher = [b.name for b in backends.backends("loss") if b.higher_order]
    if impl not in higher:
        raise ValueError(f"entropy_regularised_ctc_loss differentiates the loss twice: impl must be one of {higher}, got {impl!r}")
    beta = real_number("beta", beta)
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    if beta == 0:
        return _finish(_batch_loss(batch, "autograd", topology, delay_penalty), batch, reduction, zero_infinity)
    with torch.enable_grad():
        x = batch.log_probs if batch.log_probs.requires_grad else batch.log_probs.detach().requires_grad_(True)
        losses, entropy = _path_entropy(batch, x, topology, delay_penalty)
    total = (losses - beta * entropy).to(log_probs.dtype)
    if not (log_probs.requires_grad and torch.is_grad_enabled()):
        total = total.detach()
    return _finish(total, batch, reduction, zero_infinity)
