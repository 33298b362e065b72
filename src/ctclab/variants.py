r"""CTC variants that change the loss or the emissions (the state-graph variants, k2's modified
topology and the delay penalty, are options of :func:`ctclab.ctc_loss` itself; the target
variants live in :mod:`ctclab.targets`).

Each reduces exactly to plain CTC at zero strength.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._inputs import Lengths, frame_mask
from .loss import Impl, ctc_loss, reduce_losses


def focal_ctc_loss(
    log_probs: Tensor, targets: Tensor, input_lengths: Lengths, target_lengths: Lengths, blank: int = 0,
    alpha: float = 1.0, gamma: float = 2.0, reduction: str = "mean", zero_infinity: bool = False, impl: Impl = "auto",
) -> Tensor:
    r"""Focal CTC (Feng et al., "Focal CTC Loss for Chinese Optical Character Recognition on
    Unbalanced Datasets", Complexity 2019): per utterance
    :math:`\alpha\,(1 - e^{-\mathcal{L}})^{\gamma}\,\mathcal{L}` with :math:`\mathcal{L}` its CTC loss, so
    well-recognised utterances (:math:`e^{-\mathcal{L}} = p(l|x) \to 1`) count less. PaddleOCR's
    ``use_focal_loss`` is ``alpha=1, gamma=2``; ``gamma=0, alpha=1`` is plain CTC."""
    if gamma < 0 or alpha <= 0:
        raise ValueError(f"need alpha > 0 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
    losses = ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, "none", False, impl)
    finite = torch.isfinite(losses)
    safe = torch.where(finite, losses, 0.0)
    focal = alpha * (-torch.expm1(-safe)).clamp(min=0) ** gamma * safe if gamma else alpha * safe
    focal = torch.where(finite, focal, losses)
    lengths = torch.as_tensor(target_lengths, device=focal.device).reshape(-1)
    return reduce_losses(focal, lengths, reduction, zero_infinity)


def blank_penalty(log_probs: Tensor, beta: float, blank: int = 0) -> Tensor:
    r"""Subtract ``beta`` nats from the blank's log-score at every frame (:math:`\log y_t(\varnothing) - \beta`):
    fewer blanks, less peaky alignments, fewer deletions at decoding. Feed the result to
    :func:`ctclab.ctc_loss` with ``impl='fused'`` or ``'autograd'`` (the scores are no longer
    normalised: only the true gradient is right; the built-in's is not)."""
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
    """

    def __init__(self, num_classes: int, lam: float = 0.3, momentum: float = 0.99, blank: int = 0):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.lam = lam
        self.momentum = momentum
        self.log_prior = torch.full((num_classes,), -torch.log(torch.tensor(float(num_classes))).item())
        self.seen = False

    def adjust(self, log_probs: Tensor) -> Tensor:
        if self.lam == 0:
            return log_probs
        return log_probs - self.lam * self.log_prior.to(log_probs)

    @torch.no_grad()
    def update(self, log_probs: Tensor, input_lengths: Lengths | None = None) -> None:
        """Fold the average posterior of this batch's valid frames into the running prior."""
        T, B, C = log_probs.shape
        if input_lengths is None:
            valid = torch.ones(T, B, dtype=torch.bool, device=log_probs.device)
        else:
            lengths = torch.as_tensor(input_lengths, device=log_probs.device)
            valid = frame_mask(T, lengths)
        probs = (log_probs.float().exp() * valid[..., None]).sum((0, 1)) / valid.sum().clamp(min=1)
        probs = probs.cpu()
        current = probs if not self.seen else self.momentum * self.log_prior.exp() + (1 - self.momentum) * probs
        self.log_prior = current.clamp(min=1e-30).log()
        self.seen = True


def entropy_regularised_ctc_loss(
    log_probs: Tensor, targets: Tensor, input_lengths: Lengths, target_lengths: Lengths, blank: int = 0,
    beta: float = 0.2, reduction: str = "mean", zero_infinity: bool = False,
) -> Tensor:
    r"""Maximum-entropy regularised CTC, EnCTC (Liu et al., "Connectionist Temporal Classification
    with Maximum Entropy Regularization", NeurIPS 2018):
    :math:`\mathcal{L} = \mathcal{L}_{CTC} - \beta H(\pi | l, x)` with the path entropy

    .. math:: H = -\mathcal{L}_{CTC} - \sum_t \sum_k \gamma_t(k) \log y_t(k),

    ``gamma`` the posterior occupation. ``gamma`` is the gradient of the autograd path, taken with
    ``create_graph=True``, so ``H`` and the loss stay differentiable (double backward).
    ``beta = 0`` is plain CTC."""
    with torch.enable_grad():
        x = log_probs if log_probs.requires_grad else log_probs.detach().requires_grad_(True)
        losses = ctc_loss(x, targets, input_lengths, target_lengths, blank, "none", False, "autograd")
        if beta == 0:
            entropy = torch.zeros_like(losses)
        else:
            finite = torch.isfinite(losses)
            (grad,) = torch.autograd.grad(torch.where(finite, losses, 0.0).sum(), x, create_graph=True)
            gamma = -grad  # true gradient: -posterior occupation
            safe = torch.where(torch.isfinite(x), x, 0.0)
            entropy = torch.where(finite, -losses - (gamma * safe).sum(0).sum(-1), 0.0)
    total = losses - beta * entropy
    lengths = torch.as_tensor(target_lengths, device=total.device).reshape(-1)
    return reduce_losses(total.reshape(-1), lengths, reduction, zero_infinity).reshape(total.shape if reduction == "none" else ())
