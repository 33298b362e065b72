r"""The CTC forward recursion in probability space with rescaling, differentiated by autograd.

Graves et al. 2006 (section 4.1, eq. 9) keep the forward variables as probabilities and divide
them by their sum as they go; the log-likelihood is the log of the final mass plus the logs of
the divisors. No exp or log runs inside the loop over time, only a few multiply-adds per frame,
so autograd's graph is short: this is the ``impl='autograd'`` loss (:mod:`ctclab.loss`), and any
change to it is differentiated for free, to any order.

The constants the recursion divides by (each frame's maximum score, the mass every few frames)
are constants for autograd. That is exact, not an approximation: the computed function equals
the log-likelihood for *every* input, whatever constants were picked, so all its derivatives are
the true ones.

What probability space cannot do is keep a variable much smaller than its frame's mass
(``float32``: below about :math:`e^{-87}` of it). Such variables underflow; whether it matters
depends on their future. :func:`underflow_bound` bounds the relative error this causes from the
backward variables, as the CPU kernels do (:mod:`ctclab.backends.numba_kernels`): callers recompute items whose
bound is not negligible in log space (:func:`ctclab.trellis.log_alpha`), so results are always
those of the log-space recursion.

The state graph comes from :class:`ctclab.trellis.CTCTrellis`; :func:`transition` is its
transition matrix in the probability semiring (the log-semiring version is
:meth:`~ctclab.trellis.CTCTrellis.predecessors`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._compat import renamed
from ._inputs import frame_mask
from .semiring import MAX_LOG_TILT, PROBABILITY, ProbabilityWeights, TiltedProbability, backward, forward
from .trellis import NEG, CTCTrellis, is_impossible
from .trellis import log_space_nll

#: Largest relative error from underflow (bounded by :func:`underflow_bound`) that an item may
#: carry before it is recomputed in log space: float32's rounding level, float64's.
MAX_UNDERFLOW_ERROR = {torch.float32: 1e-6, torch.float64: 1e-13}


def transition(alpha: Tensor, weights: Tensor) -> Tensor:
    """``(B, S)`` probabilities at frame t-1 -> their sum over each state's predecessors,
    weighted by the graph's ``(3, B, S)`` probability weights (:meth:`ctclab.graph.CTCGraph.probability_weights`):
    the probability semiring's transition (:mod:`ctclab.semiring`), differentiable to any order."""
    return PROBABILITY.transition(alpha, ProbabilityWeights.of(weights))


def transition_transposed(beta: Tensor, weights: Tensor) -> Tensor:
    """The transpose of :func:`transition`: ``(B, S)`` scores of going on from frame t+1 ->
    their sum over each state's successors."""
    return PROBABILITY.transposed(beta, ProbabilityWeights.of(weights))


class ScaledForward:
    """The rescaled forward recursion of a batch (see :func:`scaled_forward`).

    Attributes:
        trellis: the batch's state graph.
        log_likelihood: ``(B,)`` differentiable log-likelihood, ``-inf`` where no path survived
            (impossible items, or every path lost to underflow: see :meth:`certified`).
        inflows: ``T`` tensors ``(B, S)``, ``transition(v_{t-1})`` (the start states at t = 0);
            the forward variables are ``v_t = inflows[t] * emissions[t]``.
        emissions: ``(T, B, S)`` each state's emission divided by its frame's maximum (1 past
            an item's input length).
        semiring: :data:`ctclab.semiring.PROBABILITY`, or a
            :class:`ctclab.semiring.TiltedProbability` (the variables times ``r^s``).
    """

    def __init__(self, trellis: CTCTrellis, log_likelihood: Tensor, inflows: list[Tensor], emissions: Tensor,
                 semiring=PROBABILITY):
        self.trellis = trellis
        self.log_likelihood = log_likelihood
        self.inflows = inflows
        self.emissions = emissions
        self.semiring = semiring

    def certified(self) -> Tensor:
        """``(B,)`` bool: the item's log-likelihood is that of the log-space recursion to within
        :data:`MAX_UNDERFLOW_ERROR` (impossible items and items without frames included)."""
        trellis = self.trellis
        exact = ~trellis.feasible | (trellis.input_lengths == 0)
        if bool(exact.all()):
            return exact
        survived = torch.isfinite(self.log_likelihood.detach())
        bound = underflow_bound(self)
        return exact | (survived & (bound <= MAX_UNDERFLOW_ERROR[self.emissions.dtype]))


def _last_frames(trellis: CTCTrellis) -> dict[int, Tensor]:
    """Frame t -> indices of the items whose last frame it is."""
    last = trellis.input_lengths - 1
    return {t: (last == t).nonzero().squeeze(1) for t in sorted(set(last.tolist())) if t >= 0}


def _state_emissions(trellis: CTCTrellis, log_probs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(T, B, S)`` emissions in ``dtype`` divided by each frame's maximum, and ``(T, B)`` the
    maximum's log (a constant for autograd). Items past their input length get 1, whatever
    padding holds (NaN included). ``exp`` runs over the classes when there are fewer classes
    than states, else over the states (and only they are converted to ``dtype``)."""
    T, B, C = log_probs.shape
    labels = trellis.labels
    S = labels.shape[1]
    inside = frame_mask(T, trellis.input_lengths)[..., None]
    index = labels.expand(T, B, S)
    ragged = not bool(inside.all())
    scores = (log_probs if C <= S else log_probs.gather(2, index)).to(dtype)
    if ragged:
        scores = torch.where(inside, scores, 0.0)
    # a NaN score of a class no state reads must not spoil its frame's shift (nor the gradient)
    shift = (scores.detach().nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf) if C <= S else scores.detach())
    shift = shift.amax(2, keepdim=True).clamp_(min=NEG)
    emissions = (scores - shift).exp()
    if C <= S:
        emissions = emissions.gather(2, index)
    return emissions, shift.squeeze(2)


def _normalise_every(emissions: Tensor) -> int:
    """How many frames may pass between two divisions by the mass (1 to 4): per frame the mass
    can shrink by at most the smallest emission (and grow at most 3-fold); the frames between
    two divisions may lose up to ``e^-20`` of the dtype's range, which costs the underflow
    bound nothing."""
    smallest = float(emissions.detach().amin()) if emissions.numel() else 1.0
    spread = -math.log(smallest) if smallest > 0 else math.inf
    return 1 + min(3, int(20 / spread)) if spread > 0 else 4


def scaled_forward(trellis: CTCTrellis, log_probs: Tensor, dtype: torch.dtype | None = None,
                   tilt: Tensor | None = None) -> ScaledForward:
    r"""Forward variables in probability space, rescaled (Graves et al. 2006, eq. 9),
    differentiable by autograd (double backward included).

    :math:`v_t = \text{transition}(v_{t-1}) \odot y_t`, with :math:`y_t(s)` the emission of
    state s divided by the frame's maximum :math:`e^{m_t}`, and every few frames (as the
    emissions' spread allows) :math:`v_t` divided by its sum :math:`c_t`; both :math:`m_t` and
    :math:`c_t` are constants for autograd. :math:`\log p(l|x) = \sum_{t < T_b} m_t +
    \sum_{\text{divisions at } t < T_b} \log c_t + \log \sum_{s \in \text{final}} v_{T_b-1}(s)`.

    Args:
        trellis: the batch's state graph (no delay penalty).
        log_probs: ``(T, B, C)`` log-scores.
        dtype: float32 or float64, the recursion's dtype (default: that of ``log_probs``).
        tilt: ``(B,)`` the recursion runs on the variables times ``tilt^s``
            (:class:`ctclab.semiring.TiltedProbability`, :func:`item_tilts`); the same
            likelihood, less underflow where the items' scores favour early states. Default: none.

    Returns:
        A :class:`ScaledForward`; check :meth:`ScaledForward.certified` before trusting an item.

    Raises:
        ValueError: the trellis has a delay penalty, or ``tilt`` is not ``(B,)`` positive and
        finite. TypeError: ``dtype`` is not float32/float64.
    """
    if trellis.delay_penalty:
        raise ValueError("scaled_forward does not implement the delay penalty; use ctclab.trellis.log_alpha")
    dtype = dtype or log_probs.dtype
    if dtype not in MAX_UNDERFLOW_ERROR:
        raise TypeError(f"dtype must be torch.float32 or torch.float64 (the recursion's dtype), got {dtype}")
    T, B, C = log_probs.shape
    if tilt is not None and (tilt.shape != (B,) or not bool(((tilt > 0) & torch.isfinite(tilt)).all())):
        raise ValueError(f"tilt must hold one positive finite number per item, shape ({B},); got shape "
                         f"{tuple(tilt.shape)} (scaled.item_tilts gives one)")
    device = log_probs.device
    S = trellis.labels.shape[1]
    no_frames = torch.where(trellis.target_lengths == 0, 0.0, -torch.inf).to(dtype)
    if T == 0:
        return ScaledForward(trellis, no_frames, [], torch.zeros(0, B, S, dtype=dtype, device=device))
    emissions, shift = _state_emissions(trellis, log_probs, dtype)
    every = _normalise_every(emissions)
    semiring = PROBABILITY if tilt is None else TiltedProbability(tilt)
    accepting = semiring.final(trellis, dtype)
    ends = _last_frames(trellis)
    tiny = torch.finfo(dtype).tiny
    inflows, finals, divisors = [], [], []

    def rescale(t: int, inflow: Tensor, alpha: Tensor) -> Tensor:
        if t % every == every - 1:
            mass = alpha.detach().sum(1, keepdim=True).clamp_(min=tiny)
            alpha = alpha * mass.reciprocal()
            divisors.append(mass.squeeze(1))
        if t in ends:
            items = ends[t]
            finals.append((alpha[items] * accepting[items]).sum(1))
        inflows.append(inflow)
        return alpha

    forward(trellis, emissions.unbind(0), semiring, rescale)  # unbind: one backward node for all frames
    # the constants' logs, summed in float64 (hundreds of terms)
    inside = frame_mask(T, trellis.input_lengths)
    log_scale = torch.where(inside, shift.double(), 0.0).sum(0)
    if divisors:
        divided = inside[every - 1 :: every]
        log_scale += torch.where(divided, torch.stack(divisors).double().log(), 0.0).sum(0)
    final = torch.zeros(B, dtype=dtype, device=device)
    if finals:
        final = final.index_put((torch.cat(list(ends.values())),), torch.cat(finals))
    if tilt is not None:  # every path's score was multiplied by tilt^(S_b - 1)
        log_scale -= (trellis.num_states - 1) * tilt.double().log()
    survived = final > 0
    ll = torch.where(survived, torch.where(survived, final, 1.0).log() + log_scale.to(dtype), -torch.inf)
    ll = torch.where(trellis.input_lengths == 0, no_frames, ll)
    return ScaledForward(trellis, ll, inflows, emissions, semiring)


@torch.no_grad()
def underflow_bound(forward: ScaledForward) -> Tensor:
    r"""``(B,)`` bound on the relative error that underflow caused in :func:`scaled_forward`'s
    likelihood (and, up to a factor 2, in every posterior).

    A forward variable of frame t loses at most :math:`\delta_t = 16\,\text{tiny}\,(1 + 1/c_t)`
    to underflow relative to its frame's mass :math:`c_t = \sum_s v_t(s)` (the transition's three
    terms, each carrying its predecessor's loss, times an emission of at most 1, every operation
    flushing at ``tiny``; then perhaps the division by :math:`c_t`). A loss
    :math:`\delta` in state s changes the likelihood by at most :math:`\delta\,\hat\beta_t(s)/z_t`
    relative, with :math:`\hat\beta_t` the backward variables rescaled to sum 1 and
    :math:`z_t = \sum_s \hat v_t(s) \hat\beta_t(s)` (:math:`\hat v_t = v_t / c_t`); the bound is
    :math:`\sum_{t < T_b} \delta_t / z_t`, plus the same for the backward variables' own losses
    (as in :mod:`ctclab.backends.numba_kernels`); ``inf`` where some :math:`z_t` vanished. On CPU a numba kernel
    runs the backward variables in float64; :func:`reference_underflow_bound` is the same in
    PyTorch, on any device, in the forward's dtype.
    """
    from .backends.numba_cpu import available as kernels_available

    if forward.emissions.device.type == "cpu" and kernels_available():
        import numba

        from .backends import numba_kernels

        trellis = forward.trellis
        graph = trellis.kernel_graph(0)
        if isinstance(forward.semiring, TiltedProbability):
            graph = numba_kernels.tilted_graph(graph, forward.semiring.tilt.double().numpy())
        return torch.from_numpy(numba_kernels.scaled_underflow_bound(
            numba.typed.List([x.detach().numpy() for x in forward.inflows]), forward.emissions.detach().numpy(),
            graph, torch.finfo(forward.emissions.dtype).tiny, numba.get_num_threads(),
        ))
    return reference_underflow_bound(forward)


@torch.no_grad()
def reference_underflow_bound(forward: ScaledForward, dtype: torch.dtype | None = None) -> Tensor:
    """:func:`underflow_bound` in PyTorch, on any device: the reference of the CPU kernel, its
    backward variables in ``dtype`` (default: the forward's)."""
    trellis = forward.trellis
    tiny_forward = torch.finfo(forward.emissions.dtype).tiny
    dtype = dtype or forward.emissions.dtype
    emissions = forward.emissions.detach().to(dtype)
    T = emissions.shape[0]
    tiny = torch.finfo(dtype).tiny
    terms: list[Tensor] = [None] * T

    def bound_term(t: int, beta: Tensor) -> Tensor:
        """Frame t's term of the bound; beta_t rescaled to sum 1 to go on with."""
        scale = beta.sum(1, keepdim=True).clamp_(min=tiny).reciprocal_()
        inflow = forward.inflows[t].detach().to(dtype)
        mass = torch.linalg.vecdot(inflow, emissions[t])  # c_t
        overlap = torch.linalg.vecdot(inflow, emissions[t] * beta * scale) / mass  # z_t
        losses = 16 * tiny_forward * (1 + 1 / mass) + 16 * tiny * (1 + scale.squeeze(1))
        terms[t] = torch.where(overlap > 0, losses / overlap, torch.inf)
        return beta * scale

    backward(trellis, emissions.unbind(0), forward.semiring, bound_term)
    if T == 0:
        return torch.zeros(trellis.labels.shape[0], dtype=dtype, device=emissions.device)
    return torch.where(frame_mask(T, trellis.input_lengths), torch.stack(terms), 0.0).sum(0)


@torch.no_grad()
def item_tilts(trellis: CTCTrellis, log_probs: Tensor) -> Tensor:
    r"""``(B,)`` float64 tilt ``r`` of each item (:class:`ctclab.semiring.TiltedProbability`):
    :math:`r^2 = \frac{\bar p_{blank}}{\bar p_{label}} \frac{L_b}{T_b - L_b}`, the geometric
    means over the item's frames of blank's and its target labels' scores (each label counted as
    often as the target has it), times the ratio that puts the peak of a binomial path count where
    the posterior mass lies; 1 where that is not finite or the item has no label. The estimate of
    the CPU kernels' :func:`ctclab.backends.numba_kernels.item_tilt` (which explains why it undoes
    a blank-dominated frame's underflow), for any device."""
    T = log_probs.shape[0]
    labels = trellis.target_lengths.to(torch.float64)
    frames = trellis.input_lengths.to(torch.float64)
    scores = torch.where(frame_mask(T, trellis.input_lengths)[..., None], log_probs.double(), 0.0)
    totals = scores.sum(0).gather(1, trellis.labels)  # (B, S): each state's class summed over the item's frames
    label_states = (torch.arange(trellis.labels.shape[1], device=totals.device) % 2 == 1) & ~trellis.padding
    label_mean = torch.where(label_states, totals, 0.0).sum(1) / labels
    log_r2 = (totals[:, 0] - label_mean) / frames + torch.log(labels / (frames - labels).clamp(min=1))
    log_r = (0.5 * log_r2).clamp(-MAX_LOG_TILT, MAX_LOG_TILT)
    return torch.where(torch.isfinite(log_r2) & (labels > 0) & (frames > 0), log_r.exp(), 1.0)


#: Below this many states per frame (batch x states) the recursion's cost is per operation, not
#: per number, and float64 (which rarely underflows) costs no more than float32.
SMALL_FRAME = 16384


def scaled_nll(trellis: CTCTrellis, log_probs: Tensor) -> Tensor:
    """``(B,)`` CTC loss by :func:`scaled_forward`, differentiable by autograd to any order,
    ``inf`` for items without any path.

    float32 scores run in float32 when the frames are large. Items that
    :meth:`ScaledForward.certified` cannot vouch for run again in float64 and tilted
    (:func:`item_tilts`: float64's range and the tilt each undo most underflow, together the
    blank phase's too); items neither pass can vouch for are recomputed in log space
    (:func:`ctclab.trellis.log_space_nll`). Unlike the CPU kernels, the first pass is never
    tilted: a tilted frame's advance weights are not 1, which costs this recursion a
    multiplication a frame backward (measured: +10% on peaky emissions, a trained model's, whose
    tilt is large but which need none)."""
    B, S = trellis.labels.shape
    dtype = log_probs.dtype
    work = torch.float64 if B * S <= SMALL_FRAME else dtype
    nll, redo = _certified_nll(trellis, log_probs, work)
    if bool(redo.any()):
        items = redo.nonzero().squeeze(1)
        part = trellis.select(items)
        retried, still = _certified_nll(part, log_probs[:, items], torch.float64, item_tilts(part, log_probs[:, items]))
        nll = nll.index_put((items,), retried.to(work))
        redo = redo.index_put((items,), still)
    if bool(redo.any()):
        items = redo.nonzero().squeeze(1)
        nll = nll.index_put((items,), log_space_nll(trellis.select(items), log_probs[:, items]).to(work))
    return nll.to(dtype)


def _certified_nll(trellis: CTCTrellis, log_probs: Tensor, dtype: torch.dtype,
                   tilt: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(B,)`` NLL by :func:`scaled_forward` in ``dtype`` (with ``tilt``) and ``(B,)`` bool, the
    items it cannot vouch for."""
    forward = scaled_forward(trellis, log_probs, dtype, tilt)
    ll = forward.log_likelihood
    return torch.where(is_impossible(ll), torch.inf, -ll), ~forward.certified()


negative_log_likelihood = renamed(scaled_nll, "ctclab.scaled.negative_log_likelihood")
