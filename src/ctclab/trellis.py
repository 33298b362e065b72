r"""The CTC trellis: blank-extended targets and the transitions between their states.

Written once and shared by everything in ctclab: the loss is the trellis's log-sum-exp
recursion (here, the reference) or its sum-product recursion in probability space
(:mod:`ctclab.scaled`, the autograd loss), the Viterbi alignment its max recursion, the
alignment targets its forward times backward. A CTC variant is a change here (topology,
transition weights) or to the emissions, never a new copy of the loop.

For a target :math:`l = (l_1, \dots, l_L)` the extended sequence is
:math:`l' = (\varnothing, l_1, \varnothing, l_2, \dots, l_L, \varnothing)` with :math:`S = 2L + 1`
states. A path may, from frame to frame, stay in its state, advance by one state, or skip
from :math:`s-2` to :math:`s` over a blank when :math:`l'_s \ne \varnothing` and
:math:`l'_s \ne l'_{s-2}` (Graves et al. 2006, section 4.1, eq. 6-7). It starts in state 0 or 1
and ends in state :math:`S-1` or :math:`S-2`.

References:
    A. Graves, S. Fernández, F. Gomez, J. Schmidhuber. "Connectionist Temporal Classification:
    Labelling Unsegmented Sequence Data with Recurrent Neural Networks", ICML 2006.
    A. Laptev, S. Majumdar, B. Ginsburg. "CTC Variations Through New WFST Topologies",
    Interspeech 2022 (arXiv 2110.03098) — the "modified" topology.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._inputs import CTCBatch, frame_mask

#: Finite stand-in for log(0). Keeping every score finite means no ``-inf - -inf`` and hence
#: no NaN in values or gradients (pytorch issue 31829); ``exp(NEG - x)`` is exactly 0 for
#: any score ``x`` a path can reach.
NEG = -1e30

#: The wildcard token in targets (see :func:`add_wildcard`).
STAR = -1

Topology = Literal["standard", "modified"]
TOPOLOGIES = ("standard", "modified")


def check_delay_penalty(delay_penalty: float) -> None:
    """``delay_penalty`` must be a finite number >= 0 (0: plain CTC)."""
    if isinstance(delay_penalty, bool) or not isinstance(delay_penalty, (int, float)):
        raise TypeError(f"delay_penalty must be a number >= 0, got {type(delay_penalty).__name__}")
    if not math.isfinite(delay_penalty) or delay_penalty < 0:
        raise ValueError(
            f"delay_penalty must be finite and >= 0 (the weight lam of exp(-lam (t - T/2)); 0 is plain CTC), "
            f"got {delay_penalty!r}"
        )


@dataclass(frozen=True)
class CTCTrellis:
    """The CTC state graph of a batch, unrolled over time.

    Attributes:
        labels: ``(B, S)`` int64 blank-extended targets, ``S = 2 * max(target_lengths) + 1``;
            states beyond an item's ``2 L + 1`` are padding (blank) and never reach its end.
        skip: ``(B, S)`` bool, whether the transition ``s - 2 -> s`` is allowed.
        input_lengths: ``(B,)`` int64, frames of each item.
        target_lengths: ``(B,)`` int64, labels of each item.
        blank: index of the blank class.
        delay_penalty: ``lam`` of the delay penalty (k2 / icefall): entering a label state at
            frame ``t`` is weighted by ``exp(-lam * (t - T_b / 2))``; self-loops are unchanged.
    """

    labels: Tensor
    skip: Tensor
    input_lengths: Tensor
    target_lengths: Tensor
    blank: int
    delay_penalty: float = 0.0

    @classmethod
    def build(cls, batch: CTCBatch, topology: Topology = "standard", delay_penalty: float = 0.0) -> "CTCTrellis":
        """The trellis of a validated batch.

        ``topology='standard'`` is Graves' CTC. ``'modified'`` is k2's modified CTC topology
        (Laptev et al.): the skip over a blank is allowed into every label state, also between
        equal labels, so ``"aa"`` needs no blank frame between its two ``a``.
        """
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
        check_delay_penalty(delay_penalty)
        targets = batch.targets
        B, L = targets.shape
        S = 2 * L + 1
        labels = torch.full((B, S), batch.blank, dtype=torch.int64, device=targets.device)
        labels[:, 1::2] = targets
        is_label = torch.zeros(B, S, dtype=torch.bool, device=targets.device)
        is_label[:, 1::2] = True
        skip = is_label.clone()
        if topology == "standard":
            # s-2 holds the previous label; equal neighbours need a blank between them.
            skip[:, 3::2] &= targets[:, 1:] != targets[:, :-1]
        return cls(labels, skip, batch.input_lengths, batch.target_lengths, batch.blank, float(delay_penalty))

    def select(self, items: Tensor) -> "CTCTrellis":
        """The trellis of a subset of the batch (``items``: indices or a bool mask)."""
        return CTCTrellis(
            self.labels[items], self.skip[items], self.input_lengths[items], self.target_lengths[items],
            self.blank, self.delay_penalty,
        )

    @property
    def num_states(self) -> Tensor:
        """``(B,)`` int64, ``2 L + 1`` states of each item."""
        return 2 * self.target_lengths + 1

    @property
    def min_frames(self) -> Tensor:
        """``(B,)`` int64, the shortest path: one frame per label, plus one blank frame between
        labels that cannot be skipped over (for standard CTC, ``L + repeats``)."""
        S = self.labels.shape[1]
        inner = (torch.arange(S, device=self.labels.device) >= 3) & (
            torch.arange(S, device=self.labels.device) < self.num_states[:, None] - 1
        )
        forced_blanks = (inner & ~self.skip)[:, 3::2].sum(1) if S > 3 else torch.zeros_like(self.target_lengths)
        return self.target_lengths + forced_blanks

    @property
    def feasible(self) -> Tensor:
        """``(B,)`` bool, whether any path fits in the item's frames."""
        empty = self.target_lengths == 0
        return (self.input_lengths >= self.min_frames) & ((self.input_lengths > 0) | empty)

    def emissions(self, log_probs: Tensor) -> Tensor:
        """``(T, B, C)`` log-scores -> ``(T, B, S)`` score of each state's label at each frame,
        clamped to :data:`NEG` from below so that ``-inf`` stays finite, and 0 at frames at or
        beyond an item's input length (whatever padding holds there, NaN included, is ignored)."""
        T = log_probs.shape[0]
        index = self.labels.unsqueeze(0).expand(T, -1, -1)
        inside = frame_mask(T, self.input_lengths)[..., None]
        return torch.where(inside, log_probs.gather(2, index).clamp(min=NEG), 0.0)

    def final_states(self) -> Tensor:
        """``(B, S)`` bool, the accepting states ``2L`` and ``2L - 1`` (just ``0`` when ``L = 0``)."""
        s = torch.arange(self.labels.shape[1], device=self.labels.device)
        last = self.num_states[:, None] - 1
        return (s == last) | ((s == last - 1) & (self.target_lengths[:, None] > 0))

    def _entry_weight(self, t: int, dtype: torch.dtype) -> Tensor | None:
        """``(B, S)`` log-weight of entering each state at frame ``t`` (delay penalty), or None."""
        if not self.delay_penalty:
            return None
        centre = self.input_lengths.to(dtype) / 2
        is_label = self.labels != self.blank
        is_label[:, 0::2] = False
        return (-self.delay_penalty * (t - centre))[:, None] * is_label

    def transition_weights(self, t: int, dtype: torch.dtype) -> Tensor:
        """``(3, B, S)`` log-weights of the transitions into state ``s`` at frame ``t``, from
        ``s - 2`` (skip), ``s - 1`` (advance) and ``s`` (stay): 0 if allowed, :data:`NEG` if not."""
        weights = torch.zeros(3, *self.labels.shape, dtype=dtype, device=self.labels.device)
        weights[SKIP].masked_fill_(~self.skip, NEG)
        entry = self._entry_weight(t, dtype)
        if entry is not None:
            weights[:STAY] += entry
        return weights

    def initial_weights(self, dtype: torch.dtype) -> Tensor:
        """``(B, S)`` log-weight of starting in each state at frame 0: states 0 and 1 (if L > 0)."""
        s = torch.arange(self.labels.shape[1], device=self.labels.device)
        start = (s == 0) | ((s == 1) & (self.target_lengths[:, None] > 0))
        weights = torch.where(start, 0.0, NEG).to(dtype)
        entry = self._entry_weight(0, dtype)
        return weights if entry is None else weights + entry

    @staticmethod
    def predecessors(alpha: Tensor, weights: Tensor) -> Tensor:
        """``(B, S)`` scores at frame t-1 -> ``(3, B, S)`` scores arriving in each state at frame t
        from ``s - 2`` (skip), ``s - 1`` (advance) and ``s`` (stay), given
        :meth:`transition_weights` at frame t."""
        padded = F.pad(alpha, (2, 0), value=NEG)
        return torch.stack((padded[:, :-2], padded[:, 1:-1], alpha)) + weights

    @staticmethod
    def successors(beta: Tensor, weights: Tensor) -> Tensor:
        """The mirror of :meth:`predecessors`: ``(B, S)`` scores of going on from each state after
        frame t (``beta + emission`` at frame t+1) -> ``(3, B, S)`` for moving from ``s`` to
        ``s + 2`` (skip), ``s + 1`` (advance) and ``s`` (stay), given :meth:`transition_weights` at frame t+1."""
        padded = F.pad(beta + weights, (0, 2), value=NEG)
        return torch.stack((padded[SKIP, :, 2:], padded[ADVANCE, :, 1:-1], padded[STAY, :, :-2]))


#: Index of each transition along the first axis of :meth:`CTCTrellis.predecessors`; the
#: Viterbi backpointer stores it in 2 bits.
SKIP, ADVANCE, STAY = 0, 1, 2


class _LogSumExp(torch.autograd.Function):
    """``logsumexp`` over dim 0 whose backward is itself differentiable (so double backward works)
    and costs one autograd node instead of seven: the recursion's per-frame overhead is mostly
    autograd bookkeeping. Differences below ``log(tiny)`` are clamped before ``exp``: their terms
    vanish against the maximum's 1 in the sum either way, and ``exp`` of an underflowing argument
    is ~50x slower on CPU."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        floor = math.log(torch.finfo(x.dtype).tiny) + 1
        shift = x.amax(0)
        out = (x - shift).clamp_(min=floor).exp_().sum(0).log_().add_(shift)
        ctx.save_for_backward(x, out)
        ctx.floor = floor
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, out = ctx.saved_tensors
        return grad * (x - out).clamp(min=ctx.floor).exp()


def log_semiring_sum(x: Tensor, dim: int = 0) -> Tensor:
    """``logsumexp`` over ``dim``, exact to every derivative order and NaN-free (scores are
    finite, :data:`NEG` standing for log 0)."""
    return _LogSumExp.apply(x.movedim(dim, 0))


def log_alpha(trellis: CTCTrellis, emissions: Tensor) -> Tensor:
    r"""Forward variables in log space, differentiable by autograd (double backward included).

    :math:`\alpha_t(s) = y_t(l'_s) \sum_{s' \in \{s, s-1, s-2\}} w(s' \to s)\, \alpha_{t-1}(s')`
    (Graves et al. 2006, eq. 6-7), with :math:`\alpha_0` from :meth:`CTCTrellis.initial_weights`.

    Args:
        trellis: the batch's state graph.
        emissions: ``(T, B, S)`` log-scores of each state's label (:meth:`CTCTrellis.emissions`).

    Returns:
        ``(T, B, S)`` :math:`\log \alpha`; frames at or beyond an item's input length continue the
        recursion on whatever the emissions hold there and must be ignored by the caller.
    """
    T = emissions.shape[0]
    if T == 0:
        return emissions
    dtype = emissions.dtype
    frames = emissions.unbind(0)  # one backward node for all frames, not one (T, B, S) zero-fill per frame
    alpha = frames[0] + trellis.initial_weights(dtype)
    alphas = [alpha]
    weights = trellis.transition_weights(0, dtype)
    for t in range(1, T):
        if trellis.delay_penalty:
            weights = trellis.transition_weights(t, dtype)
        alpha = log_semiring_sum(trellis.predecessors(alpha, weights)) + frames[t]
        alphas.append(alpha)
    return torch.stack(alphas)


def log_beta(trellis: CTCTrellis, emissions: Tensor) -> Tensor:
    r"""Backward variables in log space: :math:`\beta_t(s)`, the log-score of finishing from state
    ``s`` after frame ``t`` (emission at ``t`` excluded), so that
    :math:`\alpha_t(s) \beta_t(s)` is the score of all paths through ``s`` at ``t``
    (Graves et al. 2006, eq. 10-11, with the emission moved to alpha's side).

    Args / returns as :func:`log_alpha`; frames at or beyond an item's input length hold :data:`NEG`.
    """
    T, B, S = emissions.shape
    dtype = emissions.dtype
    final = torch.where(trellis.final_states(), 0.0, NEG).to(dtype)
    last_frame = (trellis.input_lengths - 1)[:, None]
    beta = torch.full((B, S), NEG, dtype=dtype, device=emissions.device)
    betas = [beta] * T
    frames = emissions.unbind(0)
    weights = trellis.transition_weights(0, dtype)
    for t in range(T - 2, -1, -1):
        if trellis.delay_penalty:
            weights = trellis.transition_weights(t + 1, dtype)
        beta = torch.where(last_frame == t + 1, final, beta)
        beta = log_semiring_sum(trellis.successors(beta + frames[t + 1], weights))
        betas[t] = beta
    stacked = torch.stack(betas) if T else emissions
    frames = torch.arange(T, device=emissions.device)[:, None, None]
    return torch.where(frames == last_frame[None], final, torch.where(frames < last_frame[None], stacked, NEG))


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


def negative_log_likelihood(trellis: CTCTrellis, log_probs: Tensor) -> Tensor:
    """``(B,)`` CTC loss of ``(T, B, C)`` log-scores by the log-space forward recursion,
    differentiable by autograd; ``inf`` for items without any path."""
    ll = log_likelihood(trellis, log_alpha(trellis, trellis.emissions(log_probs)))
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
