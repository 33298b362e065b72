r"""The semirings the CTC recursions run in, and the one forward and one backward recursion.

Every CTC quantity is the same recursion over the graph (:class:`ctclab.graph.CTCGraph`) in a
different semiring (Mohri 2002; k2's ``get_tot_scores(log_semiring=...)``):

* :data:`LOG` (log-sum-exp, +): log-likelihood and posteriors — the loss.
* :class:`MaxTimes` (max, +, with the argmax move recorded): the Viterbi path.
* :data:`PROBABILITY` (+, ×): probabilities, rescaled by the caller — the fast autograd loss
  (:mod:`ctclab.scaled`) and its underflow bound.

:func:`forward` and :func:`backward` are written once; a change to them is a change to every
quantity and backend that runs on PyTorch (the numba and Triton kernels are the same loops
specialised, tested against these).

.. math::
    \alpha_0(s) = w_0(s) \otimes y_0(s), \qquad
    \alpha_t(s) = y_t(s) \otimes \bigoplus_{m \in \{\text{skip}, \text{advance}, \text{stay}\}}
        w_t^m(s) \otimes \alpha_{t-1}(s - d_m)

with :math:`d = (2, 1, 0)` and :math:`w` the graph's move weights at frame t (entry terms
included); :math:`\beta` is the same read backwards (Graves et al. 2006, eq. 6-7 and 10-11).

References:
    M. Mohri. "Semiring Frameworks and Algorithms for Shortest-Distance Problems", Journal of
    Automata, Languages and Combinatorics 7(3), 2002.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import ADVANCE, NEG, SKIP, STAY, CTCGraph


def predecessors(alpha: Tensor, weights: Tensor, zero: float = NEG) -> Tensor:
    """``(B, S)`` variables at frame t-1 and ``(3, B, S)`` log-weights -> ``(3, B, S)`` what
    arrives in each state by each move (:data:`SKIP`, :data:`ADVANCE`, :data:`STAY`), in log space."""
    padded = F.pad(alpha, (2, 0), value=zero)
    return torch.stack((padded[:, :-2], padded[:, 1:-1], alpha)) + weights


def successors(ahead: Tensor, weights: Tensor, zero: float = NEG) -> Tensor:
    """The mirror of :func:`predecessors`: ``(B, S)`` ``beta_t + y_t`` and the ``(3, B, S)``
    log-weights of frame t -> ``(3, B, S)`` what each state at t-1 reaches by each move."""
    padded = F.pad(ahead + weights, (0, 2), value=zero)
    return torch.stack((padded[SKIP, :, 2:], padded[ADVANCE, :, 1:-1], padded[STAY, :, :-2]))


def log_sum_floor(dtype: torch.dtype) -> float:
    """The log-sum-exp's clamp: differences to the maximum below ``log(tiny) + 1`` count as that
    (their terms vanish against the maximum's 1 either way; :class:`_LogSumExp`, and the fused
    step of :mod:`ctclab.backends.triton_step`)."""
    return math.log(torch.finfo(dtype).tiny) + 1


class _LogSumExp(torch.autograd.Function):
    """``logsumexp`` over dim 0 whose backward is itself differentiable (so double backward works)
    and costs one autograd node instead of seven: the recursion's per-frame overhead is mostly
    autograd bookkeeping. Differences below ``log(tiny)`` are clamped before ``exp``: their terms
    vanish against the maximum's 1 in the sum either way, and ``exp`` of an underflowing argument
    is ~50x slower on CPU."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        floor = log_sum_floor(x.dtype)
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


class LogSemiring:
    """(log-sum-exp, +) over log-scores, :data:`NEG` for log 0."""

    zero = NEG

    def weights(self, graph: CTCGraph, t: int, dtype: torch.dtype) -> Tensor:
        return graph.transition_weights(t, dtype)

    def initial(self, graph: CTCGraph, dtype: torch.dtype) -> Tensor:
        return graph.initial_weights(dtype)

    def final(self, graph: CTCGraph, dtype: torch.dtype) -> Tensor:
        return torch.where(graph.final, 0.0, NEG).to(dtype)

    def times(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def transition(self, alpha: Tensor, weights: Tensor) -> Tensor:
        return log_semiring_sum(predecessors(alpha, weights))

    def transposed(self, ahead: Tensor, weights: Tensor) -> Tensor:
        return log_semiring_sum(successors(ahead, weights))

    def total(self, x: Tensor, dim: int = -1) -> Tensor:
        return log_semiring_sum(x, dim)


class MaxTimes(LogSemiring):
    """(max, +): the Viterbi recursion. Each :meth:`transition` records the winning move per
    state in :attr:`moves` (the first maximum: skip before advance before stay)."""

    def __init__(self):
        self.moves: Tensor | None = None

    def transition(self, alpha: Tensor, weights: Tensor) -> Tensor:
        best, self.moves = predecessors(alpha, weights).max(0)
        return best

    def transposed(self, ahead: Tensor, weights: Tensor) -> Tensor:
        return successors(ahead, weights).amax(0)

    def total(self, x: Tensor, dim: int = -1) -> Tensor:
        return x.amax(dim)


def _transition_into(out: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """``out[s] = w_stay[s] a[s] + w_adv[s] a[s-1] + w_skip[s] a[s-2]``, written into ``out``."""
    torch.mul(a, w[STAY], out=out)
    out[:, 1:].addcmul_(a[:, :-1], w[ADVANCE, :, 1:])
    out[:, 2:].addcmul_(a[:, :-2], w[SKIP, :, 2:])
    return out


def _transposed_into(out: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """``out[s] = w_stay[s] g[s] + w_adv[s+1] g[s+1] + w_skip[s+2] g[s+2]``, written into
    ``out``: the backward recursion's step."""
    torch.mul(g, w[STAY], out=out)
    out[:, :-1].addcmul_(g[:, 1:], w[ADVANCE, :, 1:])
    out[:, :-2].addcmul_(g[:, 2:], w[SKIP, :, 2:])
    return out


class _Transition(torch.autograd.Function):
    """``(B, S)`` -> ``(B, S)``: :func:`_transition_into`. Linear, so its backward is its
    transpose (:class:`_TransitionTransposed`), whose backward is this again: derivatives of
    every order, three kernels each way where autograd would pad, slice and zero-fill shifted
    copies."""

    @staticmethod
    def forward(ctx, a: Tensor, weights: Tensor) -> Tensor:
        ctx.weights = weights  # constants of the graph
        return _transition_into(torch.empty_like(a), a, weights)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _TransitionTransposed.apply(grad, ctx.weights), None


class _TransitionTransposed(torch.autograd.Function):
    """:func:`_transposed_into` as an autograd Function (the transpose of :class:`_Transition`)."""

    @staticmethod
    def forward(ctx, grad: Tensor, weights: Tensor) -> Tensor:
        ctx.weights = weights
        return _transposed_into(torch.empty_like(grad), grad, weights)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _Transition.apply(grad, ctx.weights), None


#: Below this many states per frame (batch x states) a Python Function's call costs more than
#: autograd's own nodes, so the probability semiring's transition uses shifted copies.
SMALL_FRAME = 16384


class ProbabilityWeights(NamedTuple):
    """The moves' ``(3, B, S)`` probability weights, and whether every stay weight, and every
    advance weight too, is 1 (most topologies; a tilt leaves the stays 1: the transition then
    needs one or two multiplications fewer per frame)."""

    moves: Tensor
    unit_stay_advance: bool
    skip: Tensor  # moves[SKIP], the view made once rather than every frame
    unit_stay: bool = False

    @classmethod
    def of(cls, moves: Tensor, padding: Tensor | None = None) -> "ProbabilityWeights":
        """``padding``: ``(B, S)`` states past an item's end. No move leads from them back into
        the item's states, so what they hold changes nothing: they may count as unit weights."""
        unit = moves[ADVANCE:] == 1
        if padding is not None:
            unit = unit | padding
        return cls(moves, bool(unit.all()), moves[SKIP], bool(unit[1].all()))


class ProbabilitySemiring:
    """(+, ×) over probabilities. No delay penalty (its entry weights leave the floating-point
    range in probability space): :meth:`weights` refuses one."""

    zero = 0.0

    def weights(self, graph: CTCGraph, t: int, dtype: torch.dtype) -> ProbabilityWeights:
        if graph.delay_penalty:
            raise ValueError("the probability semiring does not run the delay penalty; use the log semiring")
        return ProbabilityWeights.of(graph.probability_weights(dtype), graph.padding)

    def initial(self, graph: CTCGraph, dtype: torch.dtype) -> Tensor:
        return graph.start.to(dtype)

    def final(self, graph: CTCGraph, dtype: torch.dtype) -> Tensor:
        return graph.final.to(dtype)

    def times(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b

    def transition(self, alpha: Tensor, weights: ProbabilityWeights) -> Tensor:
        """The graph's transition matrix applied to ``alpha``, differentiable to any order: a
        linear autograd Function for large frames, shifted copies for small ones."""
        w = weights.moves
        if alpha.numel() <= SMALL_FRAME and alpha.shape[1] >= 3:
            if weights.unit_stay_advance:
                return torch.addcmul(alpha + F.pad(alpha, (1, -1)), F.pad(alpha, (2, -2)), weights.skip)
            if weights.unit_stay:
                return torch.addcmul(torch.addcmul(alpha, F.pad(alpha, (1, -1)), w[ADVANCE]), F.pad(alpha, (2, -2)), weights.skip)
            return torch.addcmul(torch.addcmul(alpha * w[STAY], F.pad(alpha, (1, -1)), w[ADVANCE]), F.pad(alpha, (2, -2)), weights.skip)
        return _Transition.apply(alpha, w)

    def transposed(self, ahead: Tensor, weights: ProbabilityWeights) -> Tensor:
        return _TransitionTransposed.apply(ahead, weights.moves)

    def total(self, x: Tensor, dim: int = -1) -> Tensor:
        return x.sum(dim)


#: The largest ``|log r|`` of a tilt (:class:`TiltedProbability`; the estimates
#: :func:`ctclab.scaled.item_tilts` and :func:`ctclab.backends.numba_kernels.item_tilt` are
#: clamped to it): moves weighted ``r``, ``r^2`` stay far inside float64's range.
MAX_LOG_TILT = 30.0


class TiltedProbability(ProbabilitySemiring):
    r""":class:`ProbabilitySemiring` on the variables times :math:`r_b^s` (``tilt`` ``(B,)``, one
    ``r`` per item): advance moves weighted ``r``, skips ``r^2``, start state ``s`` ``r^s``, final
    state ``s`` ``r^{S_b - 1 - s}``. Every path's score is multiplied by :math:`r^{S_b - 1}` (a
    move from ``s'`` to ``s`` gets :math:`r^{s - s'}`: the factors telescope), which the caller
    divides out; posteriors do not change. What changes is how a frame's variables compare, and
    so what underflows (:func:`ctclab.scaled.item_tilts`)."""

    def __init__(self, tilt: Tensor):
        self.tilt = tilt

    def _powers(self, graph: CTCGraph, exponents: Tensor, where: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.where(where, self.tilt.to(dtype)[:, None] ** exponents.to(dtype), 0.0)

    def weights(self, graph: CTCGraph, t: int, dtype: torch.dtype) -> ProbabilityWeights:
        if graph.delay_penalty:
            raise ValueError("the probability semiring does not run the delay penalty; use the log semiring")
        r = self.tilt.to(dtype)[:, None]
        moves = graph.probability_weights(dtype) * torch.stack((r * r, r, torch.ones_like(r)))  # skip, advance, stay
        return ProbabilityWeights.of(moves, graph.padding)

    def initial(self, graph: CTCGraph, dtype: torch.dtype) -> Tensor:
        states = torch.arange(graph.labels.shape[1], device=graph.labels.device)
        return self._powers(graph, states.expand_as(graph.start), graph.start, dtype)

    def final(self, graph: CTCGraph, dtype: torch.dtype) -> Tensor:
        states = torch.arange(graph.labels.shape[1], device=graph.labels.device)
        return self._powers(graph, graph.num_states[:, None] - 1 - states, graph.final, dtype)


LOG = LogSemiring()
PROBABILITY = ProbabilitySemiring()

#: ``visit(t, inflow, alpha) -> alpha`` after each frame of :func:`forward` (bookkeeping, rescaling).
ForwardVisit = Callable[[int, Tensor, Tensor], Tensor]


def forward(graph: CTCGraph, frames: Sequence[Tensor], semiring, visit: ForwardVisit | None = None) -> Tensor | None:
    r"""The forward recursion (module docstring): :math:`\alpha_t` from :math:`\alpha_{t-1}`.

    Args:
        graph: the batch's graph.
        frames: ``T`` emission frames ``(B, S)`` in the semiring's domain (a tensor ``(T, B, S)``
            or any sequence, e.g. frames computed on demand).
        semiring: :data:`LOG`, :class:`MaxTimes` or :data:`PROBABILITY`.
        visit: called as ``visit(t, inflow, alpha)`` after each frame, ``inflow`` the
            transition's result before the emission; returns the ``alpha`` to go on with (the
            probability semiring's callers rescale there). Keep what you need from it.

    Returns:
        The last frame's ``alpha`` (None for no frames). Frames at or beyond an item's input
        length continue the recursion on whatever ``frames`` holds there.
    """
    alpha = None
    weights = None
    for t in range(len(frames)):
        y = frames[t]
        if t == 0:
            inflow = semiring.initial(graph, y.dtype)
        else:
            if weights is None or graph.delay_penalty:
                weights = semiring.weights(graph, t, y.dtype)
            inflow = semiring.transition(alpha, weights)
        alpha = semiring.times(inflow, y)
        if visit is not None:
            alpha = visit(t, inflow, alpha)
    return alpha


#: ``visit(t, beta) -> beta`` at each frame of :func:`backward`.
BackwardVisit = Callable[[int, Tensor], Tensor]


def backward(graph: CTCGraph, frames: Sequence[Tensor], semiring, visit: BackwardVisit | None = None) -> None:
    r"""The backward recursion: :math:`\beta_t(s)`, the score of finishing from state ``s``
    after frame ``t`` (emission at ``t`` excluded), so that :math:`\alpha_t(s) \otimes \beta_t(s)`
    is the score of all paths through ``s`` at ``t``. Each item starts from its final states at
    its last frame. ``visit(t, beta)`` is called at every frame from the last down and returns
    the ``beta`` to go on with (rescaled, say); frames beyond an item's length hold garbage.
    """
    T = len(frames)
    if T == 0:
        return
    B, S = graph.labels.shape
    dtype = frames[0].dtype
    last = (graph.input_lengths - 1)[:, None]
    final = semiring.final(graph, dtype)
    beta = torch.full((B, S), semiring.zero, dtype=dtype, device=graph.labels.device)
    weights = None
    for t in range(T - 1, -1, -1):
        beta = torch.where(last == t, final, beta)
        if visit is not None:
            beta = visit(t, beta)
        if t == 0:
            break
        if weights is None or graph.delay_penalty:
            weights = semiring.weights(graph, t, dtype)
        beta = semiring.transposed(semiring.times(beta, frames[t]), weights)
