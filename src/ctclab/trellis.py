r"""The reference recursions over the CTC graph, in PyTorch: log-space forward and backward
variables, likelihoods and posteriors. Differentiable by autograd to any order, on any device.

The graph is :class:`ctclab.graph.CTCGraph` (``CTCTrellis`` is its old name, kept); the
recursions are :func:`ctclab.semiring.forward` and :func:`ctclab.semiring.backward` in the log
semiring. The loss is the log-sum-exp recursion, the Viterbi alignment its max recursion
(:mod:`ctclab.align`), the alignment targets forward times backward (:mod:`ctclab.targets`).
A CTC variant is a change to the graph (topology, move weights) or to the emissions, never a new
copy of the loop.

References:
    A. Graves, S. Fernández, F. Gomez, J. Schmidhuber. "Connectionist Temporal Classification:
    Labelling Unsegmented Sequence Data with Recurrent Neural Networks", ICML 2006.
    A. Laptev, S. Majumdar, B. Ginsburg. "CTC Variations Through New WFST Topologies",
    Interspeech 2022 (arXiv 2110.03098) — the "modified", "selfless" and "minimal" topologies.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._compat import renamed
from ._inputs import frame_mask
from .graph import ADVANCE, NEG, SKIP, STAY, TOPOLOGIES, CTCGraph, Topology, check_delay_penalty  # noqa: F401
from .semiring import LOG, LogSemiring, backward, forward, log_semiring_sum, predecessors, successors  # noqa: F401

#: The graph under its first name; the same class.
CTCTrellis = CTCGraph

#: The wildcard token in targets (see :func:`add_wildcard`).
STAR = -1


def log_alpha(trellis: CTCGraph, emissions: Tensor, semiring: LogSemiring = LOG) -> Tensor:
    r"""Forward variables in log space, differentiable by autograd (double backward included):
    :func:`ctclab.semiring.forward` in the log semiring (Graves et al. 2006, eq. 6-7).

    Args:
        trellis: the batch's graph.
        emissions: ``(T, B, S)`` log-scores of each state's class (:meth:`CTCGraph.emissions`).
        semiring: :data:`ctclab.semiring.LOG`, or the same semiring with its step fused into one
            kernel (:data:`ctclab.backends.triton_step.FUSED_LOG`, CUDA).

    Returns:
        ``(T, B, S)`` :math:`\log \alpha`; frames at or beyond an item's input length continue the
        recursion on whatever the emissions hold there and must be ignored by the caller.
    """
    if emissions.shape[0] == 0:
        return emissions
    alphas = []
    # unbind: one backward node for all frames, not one (T, B, S) zero-fill per frame
    forward(trellis, emissions.unbind(0), semiring, lambda t, inflow, alpha: alphas.append(alpha) or alpha)
    return torch.stack(alphas)


def log_beta(trellis: CTCGraph, emissions: Tensor) -> Tensor:
    r"""Backward variables in log space: :math:`\beta_t(s)`, the log-score of finishing from state
    ``s`` after frame ``t`` (emission at ``t`` excluded), so that
    :math:`\alpha_t(s) \beta_t(s)` is the score of all paths through ``s`` at ``t``
    (Graves et al. 2006, eq. 10-11, with the emission moved to alpha's side):
    :func:`ctclab.semiring.backward` in the log semiring.

    Args / returns as :func:`log_alpha`; frames beyond an item's input length hold :data:`NEG`.
    """
    T = emissions.shape[0]
    betas = [None] * T
    backward(trellis, emissions.unbind(0), LOG, lambda t, beta: betas.__setitem__(t, beta) or beta)
    if T == 0:
        return emissions
    frames = torch.arange(T, device=emissions.device)[:, None, None]
    inside = frames <= (trellis.input_lengths - 1)[None, :, None]
    return torch.where(inside, torch.stack(betas), NEG)


def log_likelihood(trellis: CTCTrellis, log_alphas: Tensor) -> Tensor:
    """``(B,)`` log-score of all paths of each item (:data:`NEG`-ish when none exists), read off
    the forward variables at each item's last frame. Items with no frames score 0 if their
    target is empty."""
    B = trellis.labels.shape[0]
    if log_alphas.shape[0] == 0:
        last = torch.full_like(trellis.labels, NEG, dtype=log_alphas.dtype)
    else:
        frame = (trellis.input_lengths - 1).clamp(min=0)
        last = log_alphas[frame, torch.arange(B, device=frame.device)]
    total = log_semiring_sum(torch.where(trellis.final_states(), last, NEG), dim=-1)
    no_frames = torch.where(trellis.target_lengths == 0, 0.0, NEG).to(total.dtype)
    return torch.where(trellis.input_lengths == 0, no_frames, total)


def is_impossible(log_likelihoods: Tensor) -> Tensor:
    """``(B,)`` bool, items without any path of non-zero probability."""
    return log_likelihoods < NEG / 2


def log_space_nll(trellis: CTCGraph, log_probs: Tensor, semiring: LogSemiring = LOG) -> Tensor:
    """``(B,)`` CTC loss of ``(T, B, C)`` log-scores by the log-space forward recursion
    (in ``semiring``, as :func:`log_alpha`), differentiable by autograd; ``inf`` for items
    without any path."""
    ll = log_likelihood(trellis, log_alpha(trellis, trellis.emissions(log_probs), semiring))
    return torch.where(is_impossible(ll), torch.inf, -ll)


def state_posteriors(trellis: CTCTrellis, emissions: Tensor, log_alphas: Tensor | None = None) -> Tensor:
    r"""``(T, B, S)`` posterior occupation :math:`\gamma_t(s) = \alpha_t(s)\beta_t(s) / p(l|x)` of
    each state at each frame (Graves et al. 2006, eq. 14). Each frame of a possible item sums
    to 1; frames beyond its input length, and every frame of an impossible item, are 0."""
    if log_alphas is None:
        log_alphas = log_alpha(trellis, emissions)
    ll = log_likelihood(trellis, log_alphas)
    log_gamma = log_alphas + log_beta(trellis, emissions) - ll[None, :, None]
    T = emissions.shape[0]
    keep = frame_mask(T, trellis.input_lengths)[..., None] & ~is_impossible(ll)[None, :, None]
    return torch.where(keep, log_gamma.clamp(max=0).exp(), 0.0)


def class_posteriors(trellis: CTCTrellis, state_occupation: Tensor, num_classes: int) -> Tensor:
    r"""``(T, B, S)`` state occupation -> ``(T, B, C)``: :math:`\gamma_t(k) = \sum_{s: l'_s = k} \gamma_t(s)`."""
    T, B, S = state_occupation.shape
    out = torch.zeros(T, B, num_classes, dtype=state_occupation.dtype, device=state_occupation.device)
    return out.scatter_add_(2, trellis.labels.unsqueeze(0).expand(T, B, S), state_occupation)


def add_wildcard(log_probs: Tensor, targets, penalty: float) -> tuple[Tensor, Tensor]:
    """Append a wildcard class (index ``C``) whose score at each frame is that frame's best class
    minus ``penalty`` nats, and map :data:`STAR` entries of ``targets`` to it: the wildcard token
    matches any stretch of audio, at a cost, so audio a transcript lacks need not be forced onto
    its text (the MMS alignment recipe's ``<star>``, scored relative to the frame)."""
    C = log_probs.shape[-1]
    column = log_probs.detach().amax(-1, keepdim=True) - penalty
    targets = torch.as_tensor(targets)
    return torch.cat((log_probs.detach(), column), -1), torch.where(targets == STAR, C, targets)


negative_log_likelihood = renamed(log_space_nll, "ctclab.trellis.negative_log_likelihood")
