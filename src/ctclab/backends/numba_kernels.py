"""CPU kernels (numba) for the fused CTC forward-backward, parallel over the batch.

Probability space with per-frame rescaling (Graves et al. 2006, section 4.1, eq. 9): no exp or
log inside the state loop, which is what makes it fast. Each frame's emissions are divided by
their maximum over the item's labels (one exp per distinct label, float64); forward and backward
variables are renormalised to sum to 1 at every frame, and the posteriors come out normalised
per frame. Only states on the band that can both be reached from the start and still reach the
end are visited; the others have zero posterior.

Exactness guard: a stored forward or backward variable loses at most :data:`TINY` (absolute,
in its frame's scale) to underflow. A loss at frame ``t`` in state ``s`` changes the likelihood
and every posterior by at most ``TINY * beta_t(s) / z_t`` relative (``TINY * alpha_t(s) / z_t``
for a backward variable), with ``z_t = sum_s alpha_t(s) beta_t(s)``: the lost mass's whole
future is in ``beta_t(s)``. :func:`_posteriors` adds ``TINY * (sum alpha_t + sum beta_t) / z_t``
over the frames. Items run tilted (:func:`item_tilt`: the variables times ``r^s``, which
changes no path's score and no posterior, only how a frame's variables compare — what undoes a
blank-dominated frame's or a long input's underflow) from the start where ``r`` is far from 1,
else after an untilted pass whose bound is not negligible; an item whose tilted bound is not
negligible either is recomputed in log space (:func:`_log_forward`, :func:`_log_posteriors`),
so results are those of the log-space recursion, however extreme the scores.

State and class indices in the loops over a frame's band are unsigned (``range(np.uint64(lo),
np.uint64(hi))``, offsets ``s + _TWO``, ``np.uint64(state_class[b, s])``), as in the Viterbi
kernel: numba wraps a negative signed index around (a compare and a select on every access,
``sar``/``and``/``cmov`` in the disassembly) unless LLVM can prove it non-negative, which it cannot
for a band read from an array; and the forward's state loop is one branch-free loop per case.
Together these made the kernels 1.2-2.3x faster, results the same bit for bit (minima of 30
calls at the grid's shapes and the hard inputs, in one process, alternating with the former
kernels; AMD EPYC, AVX2): 2x at the seed's shape, 1.2x at (50, 64, 80, 20), 1.3x for the
log-space fallback (confident, wrong emissions). The forward's state loops read the frame's
emissions from a contiguous row gathered before them (an indexed load inside kept LLVM from
vectorising: a store might alias it); they are now vector code (``zmm`` on Zen 5), the forward
up to 1.2x faster at (500, 32, 29, 150), unchanged where bands are a few dozen states wide,
results the same bit for bit.

The state graph comes from :class:`ctclab.graph.CTCGraph` as arrays (:class:`KernelGraph`: each
state's class column, the weights of the moves into it, start, final and entry states, the band
of states to visit per frame); these kernels only run its recursion, for any topology. They are
the reference recursions of :mod:`ctclab.trellis` specialised (probability semiring with
rescaling) and tested against them; the Viterbi kernel is in
:mod:`ctclab.backends.numba_viterbi`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from ..semiring import MAX_LOG_TILT  # a float: numba reads it as a constant
from .numba_viterbi import _ONE, _TWO  # unsigned offsets: ``s + _TWO`` stays unsigned, ``s + 2`` is signed again

# reassociation lets LLVM vectorise the per-frame sums; no flag that assumes finite values
_FASTMATH = {"reassoc", "contract"}
_jit = numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
# The per-item functions take every buffer from the caller and are compiled without numba's
# reference counting (`_nrt`, numba's own option; plain njit where a numba lacks it): each array
# view or swap would otherwise cost an atomic increment and decrement, and the threads'
# scratch arrays share one count, so those atomics bounce between cores.
try:
    from numba.core.cpu import CPUTargetOptions

    NRT_OPTION = hasattr(CPUTargetOptions, "_nrt")
except ImportError:
    NRT_OPTION = False
_item_jit = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, **({"_nrt": False} if NRT_OPTION else {}))


#: Values below this (float64, in their frame's scale) count as possibly truncated by underflow.
TINY = 1e-300


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts (Cody and Waite): k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_INV_FACTORIAL = tuple(1.0 / math.factorial(i) for i in range(14))
_ROUND = 6755399441055744.0  # 1.5 * 2^52: adding it to a float integer k below 2^51 in size is exact
_ROUND_BITS = 0x4338000000000000  # its bits; those of k + _ROUND are these plus k


@_item_jit
def exp_nonpositive(d, count, out, row, bits, power):
    """``out[row, u] = exp(d[u])`` for the first ``count`` entries, ``d <= 0`` (``-inf``
    included), to 3e-16 relative; 0 below ``e^-708`` (the smallest normal float64 is
    ``e^-708.4``). Unlike libm's scalar ``exp``, it vectorises (AVX2: four lanes): Cody-Waite
    reduction to ``r`` in ``[-ln2/2, ln2/2]``, ``e^r`` by its Taylor polynomial of degree 13
    (error below ``0.35^14/14!``), ``2^k`` built in the exponent bits (``bits``: int64 scratch
    as long as ``d``, ``power`` the same memory as float64). Every step stays in floating point
    or in integers (``k`` is a float from ``np.floor``, ``math.floor``'s int64 would need a
    float-to-int64 conversion that AVX2 lacks, one element at a time): ``k + 1.5 * 2^52`` holds
    ``k`` in its low mantissa bits, which integer lanes turn into ``2^k``'s exponent. Per number
    2.5x (16 a call) to 4.7x (128 a call) faster than ``math.exp``, 1.4-1.7x faster than the
    same polynomial with ``math.floor`` (AMD EPYC, AVX2)."""
    c = _INV_FACTORIAL
    for u in range(count):
        x = max(d[u], -708.0)
        k = np.floor(x * _LOG2E + 0.5)
        r = (x - k * _LN2_HI) - k * _LN2_LO
        p = c[13]
        for i in range(12, -1, -1):  # Horner; a fixed trip count, unrolled by LLVM
            p = p * r + c[i]
        out[row, u] = p
        power[u] = k + _ROUND  # bits: _ROUND's, plus k
    for u in range(count):
        bits[u] = (bits[u] - (_ROUND_BITS - 1023)) << 52  # k + 1023 in the exponent field: 2^k
    for u in range(count):
        out[row, u] = out[row, u] * power[u] if d[u] >= -708.0 else 0.0


class KernelGraph(NamedTuple):
    """:class:`ctclab.graph.CTCGraph` as the kernels read it (numpy arrays, ``S`` states).

    Attributes:
        state_class: ``(B, S)`` int64, column of each state's class in the kernels' class table.
        stay, advance, skip: ``(B, S + 2)`` float64 probability weights of the moves into each
            state from ``s``, ``s - 1``, ``s - 2`` (1 allowed, 0 forbidden; two trailing zeros).
        start, final, entry: ``(B, S)`` float64 0/1: start states, final states, and the states
            whose entry the delay penalty weights.
        band: ``(B, T, 2)`` int64, the states ``[lo, hi)`` to visit at each frame.
        num_states, input_lengths: ``(B,)`` int64.
        unit_moves: every stay and advance weight of the items' states is 1 (most topologies):
            the recursions then skip two multiplications per state and frame (a loop-invariant
            branch, read from the arrays, not assumed).
    """

    state_class: np.ndarray
    stay: np.ndarray
    advance: np.ndarray
    skip: np.ndarray
    start: np.ndarray
    final: np.ndarray
    entry: np.ndarray
    band: np.ndarray
    num_states: np.ndarray
    input_lengths: np.ndarray
    unit_moves: bool


@numba.njit(cache=True, nogil=True)
def state_arrays(targets, lengths, blank):
    """The arrays of :meth:`ctclab.graph.CTCGraph.build` that no topology changes, in one pass
    (as whole-array numpy operations they cost several times more at a training step's shapes).

    Args:
        targets: ``(B, L)`` int64 padded targets; lengths: ``(B,)`` int64; blank: its class.

    Returns:
        ``labels`` ``(B, S)`` int64, the blank-extended targets (``S = 2 L + 1``; the targets'
        padding is written as it comes); bool ``(B, S)``: ``label_states`` (odd states inside
        the item), ``inside`` (the item's ``2 L_b + 1`` states), ``start`` (state 0, and state 1
        if there is a label), ``final`` (the last blank, and the last label if there is one);
        ``num_states`` ``(B,)`` int64, ``2 L_b + 1``.
    """
    B, L = targets.shape
    S = 2 * L + 1
    labels = np.full((B, S), blank, dtype=np.int64)
    label_states = np.zeros((B, S), dtype=np.bool_)
    inside = np.zeros((B, S), dtype=np.bool_)
    start = np.zeros((B, S), dtype=np.bool_)
    final = np.zeros((B, S), dtype=np.bool_)
    num_states = 2 * lengths + 1
    for b in range(B):
        for i in range(L):
            labels[b, 2 * i + 1] = targets[b, i]
        n = num_states[b]
        for s in range(n):
            inside[b, s] = True
            label_states[b, s] = s % 2 == 1
        has_labels = 1 if lengths[b] > 0 else 0
        start[b, 0] = True
        start[b, has_labels] = True
        final[b, n - 1] = True
        final[b, n - 1 - has_labels] = True
    return labels, label_states, inside, start, final, num_states


@numba.njit(cache=True, nogil=True)
def move_weights(skip, advance, stay, inside):
    """``(3, B, S)`` float64 log-weights of the moves (:data:`ctclab.graph.SKIP`, ``ADVANCE``,
    ``STAY``) from a topology's bool ``(B, S)`` rule: 0 where the move exists into a state
    ``inside`` the item, ``-inf`` elsewhere."""
    B, S = inside.shape
    moves = np.empty((3, B, S))
    for m, allowed in enumerate((skip, advance, stay)):
        for b in range(B):
            for s in range(S):
                moves[m, b, s] = 0.0 if allowed[b, s] and inside[b, s] else -np.inf
    return moves


#: Distance of a state that no path reaches (or that reaches no end), in frames.
UNREACHABLE = 1 << 40


@numba.njit(cache=True, nogil=True)
def graph_distances(start, final, moves, num_states):
    """For each state, the first frame a path can occupy it and the fewest frames that must
    follow it before the end, from the moves that exist (``moves``: ``(3, B, S)`` log-weights
    into each state, skip / advance / stay; ``-inf`` where a move does not exist) and the
    ``start`` and ``final`` states ``(B, S)``; :data:`UNREACHABLE` where none. Third, ``(B,)``
    the frames of each item's shortest path (0 for an empty target, ``num_states`` 1; more than
    :data:`UNREACHABLE` where no path exists)."""
    _, B, S = moves.shape
    earliest = np.empty((B, S), dtype=np.int64)  # every entry written below
    to_end = np.empty((B, S), dtype=np.int64)
    shortest = np.empty(B, dtype=np.int64)
    for b in range(B):
        for s in range(S):
            e = 0 if start[b, s] else UNREACHABLE
            if s >= 1 and moves[1, b, s] > -np.inf:
                e = min(e, earliest[b, s - 1] + 1)
            if s >= 2 and moves[0, b, s] > -np.inf:
                e = min(e, earliest[b, s - 2] + 1)
            earliest[b, s] = e
        for s in range(S - 1, -1, -1):
            d = 0 if final[b, s] else UNREACHABLE
            if s + 1 < S and moves[1, b, s + 1] > -np.inf:
                d = min(d, to_end[b, s + 1] + 1)
            if s + 2 < S and moves[0, b, s + 2] > -np.inf:
                d = min(d, to_end[b, s + 2] + 1)
            to_end[b, s] = d
        first_end = UNREACHABLE
        for s in range(S):
            if final[b, s]:
                first_end = min(first_end, earliest[b, s])
        shortest[b] = 0 if num_states[b] == 1 else first_end + 1
    return earliest, to_end, shortest


@numba.njit(cache=True, nogil=True)
def graph_band(earliest, to_end, input_lengths, num_states, num_frames):
    """``(B, T, 2)`` ``[lo, hi)`` per frame: a superset of the states that can lie on a complete
    path at frame t — ``hi`` past the last state reachable by t, ``lo`` the first whose way to
    the end fits in the frames left (whatever the topology; monotone envelopes of the
    distances, so the band only moves forward). Empty beyond an item's frames."""
    B, S = earliest.shape
    band = np.empty((B, num_frames, 2), dtype=np.int64)  # every entry written below
    suffix_min = np.empty(S, dtype=np.int64)
    prefix_min = np.empty(S, dtype=np.int64)
    for b in range(B):
        running = UNREACHABLE
        for s in range(S - 1, -1, -1):
            running = min(running, earliest[b, s])
            suffix_min[s] = running
        running = UNREACHABLE
        for s in range(S):
            running = min(running, to_end[b, s])
            prefix_min[s] = running
        hi = 0
        lo = 0
        for t in range(min(num_frames, input_lengths[b])):
            while hi < S and suffix_min[hi] <= t:
                hi += 1
            left = input_lengths[b] - 1 - t
            while lo < S and prefix_min[lo] > left:
                lo += 1
            band[b, t, 0] = lo
            band[b, t, 1] = max(min(hi, num_states[b]), lo)
        for t in range(min(num_frames, input_lengths[b]), num_frames):
            band[b, t, 0] = S
            band[b, t, 1] = S
    return band


@numba.njit(cache=True, nogil=True)
def kernel_graph(state_class, moves, start, final, entry, earliest, to_end, input_lengths, num_states, num_frames):
    """The :class:`KernelGraph` of a graph's arrays (``moves`` ``(3, B, S)`` log-weights;
    ``start``, ``final``, ``entry`` ``(B, S)`` bool; the distances of :func:`graph_distances`),
    in one pass: probability weights padded with two zeros, 0/1 flags, the band."""
    _, B, S = moves.shape
    weights = np.empty((3, B, S + 2))
    weights[:, :, S:] = 0.0  # the two trailing zeros; the rest written below
    flags = np.empty((3, B, S))
    unit = True
    for b in range(B):
        for s in range(S):
            for m in range(3):  # 0 and -inf (allowed, forbidden) need no exp
                x = moves[m, b, s]
                weights[m, b, s] = 1.0 if x == 0.0 else 0.0 if x == -np.inf else math.exp(x)
            if s < num_states[b]:
                unit &= weights[1, b, s] == 1.0 and weights[2, b, s] == 1.0
            flags[0, b, s] = 1.0 if start[b, s] else 0.0
            flags[1, b, s] = 1.0 if final[b, s] else 0.0
            flags[2, b, s] = 1.0 if entry[b, s] else 0.0
    band = graph_band(earliest, to_end, input_lengths, num_states, num_frames)
    return KernelGraph(state_class, weights[2], weights[1], weights[0], flags[0], flags[1], flags[2], band,
                       num_states, input_lengths, unit)


@_item_jit
def _forward(b, log_probs, classes, num_classes, g, Tb, delay, tilt, scaled, alpha, state, emit, shifted, bits, power):
    r"""Forward pass of item ``b`` (arguments as :func:`forward_backward`'s; ``scaled`` ``(T, U)``
    and ``alpha`` ``(T, S)`` are the thread's, filled here; ``state`` ``(2, S + 2)``, ``emit``
    ``(S,)``, ``shifted``, ``bits`` and ``power`` ``(U,)`` its scratch). Returns the log-likelihood (-inf if no path)
    and whether any variable fell below :data:`TINY`; NaN if a score the item reads (its labels',
    blank's) is NaN at one of its frames, as the log-space recursion would give.

    :math:`\alpha_t(s) = y_t(s) [w_{stay}(s) \alpha_{t-1}(s) + e_t(s) (w_{adv}(s) \alpha_{t-1}(s-1)
    + w_{skip}(s) \alpha_{t-1}(s-2))]`, ``e_t`` the delay penalty's entry factor; with a ``tilt``
    ``r`` other than 1, the variables are :math:`\alpha_t(s) r^s` (:func:`item_tilt`).
    (One loop nest over frames and states, past 80 lines: the frame's emissions, its step and
    its rescaling share the per-frame scale and band, which a split would pass back and forth.)"""
    flagged = False
    Sb = g.num_states[b]
    # one loop-invariant branch; the fast one multiplies no stored variable by a weight other
    # than 0 or 1 before the emission's product, so nothing underflows in the last frame's scale
    unit = g.unit_moves and tilt == 1.0 and delay == 0.0
    for s in range(Sb + 2):  # two rows, this frame's and the last; two leading zeros stand for states -2, -1
        state[0, s] = 0.0
        state[1, s] = 0.0
    total = 0.0  # the log-likelihood so far: frame maxima, and the logs of the sums' product
    sums = 1.0  # the product of the frames' sums since its last log, kept inside [1e-200, 1e200]
    inv_prev = 1.0
    ok = Tb > 0
    n = num_classes[b]
    lo, hi = 0, 0
    for t in range(Tb):
        frame_max = -np.inf
        nan = False
        for u in range(n):
            shifted[u] = log_probs[t, b, np.uint64(classes[b, u])]
            frame_max = max(frame_max, shifted[u])
            nan |= shifted[u] != shifted[u]
        lo, hi = g.band[b, t, 0], g.band[b, t, 1]
        if nan:  # max() and the exp below would read NaN as probability 0: a finite, wrong loss
            for s in range(lo, hi):  # ... if a state a path can be in reads it (as in log space)
                score = log_probs[t, b, classes[b, g.state_class[b, s]]]
                if score != score:
                    return np.nan, False
        if frame_max == np.inf:  # only the band's classes count (+inf off every path changes nothing)
            frame_max = -np.inf
            for s in range(lo, hi):
                frame_max = max(frame_max, log_probs[t, b, classes[b, g.state_class[b, s]]])
            if frame_max == np.inf:  # on a path: no finite answer, as in log space
                return np.nan, False
        if frame_max == -np.inf:  # every label impossible at this frame
            ok = False
            break
        for u in range(n):
            shifted[u] -= frame_max
        exp_nonpositive(shifted, n, scaled, t, bits, power)
        entry = math.exp(-delay * (t - 0.5 * Tb)) if delay != 0.0 else 1.0
        # cur = alpha_t / (exp(shifts) * previous frame's sum): a per-frame scale, which the
        # posteriors (normalised per frame) do not see and the likelihood adds back in logs
        cur = t & 1
        prev = cur ^ 1
        norm = 0.0
        underflow = False
        # the frame's emissions gathered into a contiguous row first: the state loops then read
        # and write only contiguous rows, which LLVM vectorises (an indexed load in the loop
        # kept it scalar: a store might alias it). One loop per case (the first frame; unit
        # moves; weighted moves), each free of branches; the entry factor is exactly 1 without
        # a delay penalty.
        for s in range(np.uint64(lo), np.uint64(hi)):
            emit[s] = scaled[t, np.uint64(g.state_class[b, s])]
        old, new, alpha_t = state[prev], state[cur], alpha[t]
        if t == 0:
            for s in range(np.uint64(lo), np.uint64(hi)):
                entering = g.start[b, s] * tilt ** s if g.start[b, s] != 0.0 else 0.0
                v = entering * (1.0 + g.entry[b, s] * (entry - 1.0)) * emit[s]
                underflow |= v < TINY
                new[s + _TWO] = v
                alpha_t[s] = v
                norm += v
        elif unit:
            skip = g.skip[b]
            for s in range(np.uint64(lo), np.uint64(hi)):
                entering = old[s + _ONE] + skip[s] * old[s]
                v = (old[s + _TWO] + entering) * (emit[s] * inv_prev)
                underflow |= v < TINY
                new[s + _TWO] = v
                alpha_t[s] = v
                norm += v
        else:  # the last frame's variables divided by their sum first: products below TINY are then
            # below TINY in this frame's scale, as the bound assumes (not 1 / norm times more)
            stay, advance, skip, entries = g.stay[b], g.advance[b], g.skip[b], g.entry[b]
            for s in range(np.uint64(lo), np.uint64(hi)):
                kept = stay[s] * (old[s + _TWO] * inv_prev)
                entering = tilt * (advance[s] * (old[s + _ONE] * inv_prev) + tilt * skip[s] * (old[s] * inv_prev))
                v = (kept + entering * (1.0 + entries[s] * (entry - 1.0))) * emit[s]
                underflow |= v < TINY
                new[s + _TWO] = v
                alpha_t[s] = v
                norm += v
        if norm < TINY:  # vanished: 1 / norm would overflow the next frame (the bound cannot vouch)
            ok = False
            break
        flagged |= underflow
        state[cur, lo] = 0.0  # states lo-2, lo-1: read next frame, stale from two frames ago
        state[cur, lo + 1] = 0.0
        inv_prev = 1.0 / norm
        total += frame_max
        if 1e-100 < norm < 1e100:  # one log every few hundred frames instead of one a frame
            sums *= norm
            if not 1e-200 < sums < 1e200:
                total += math.log(sums)
                sums = 1.0
        else:
            total += math.log(norm)
    if ok:
        last = (Tb - 1) & 1
        end = 0.0
        for s in range(lo, hi):
            if g.final[b, s] != 0.0:
                end += g.final[b, s] * tilt ** (Sb - 1 - s) * state[last, s + 2]
        if end == 0.0:
            return -np.inf, flagged
        return total + math.log(sums) + math.log(end * inv_prev) - (Sb - 1) * math.log(tilt), flagged
    return -np.inf, flagged


#: Below this ``z_t`` the posteriors' sums are redone on the variables divided by their frame's
#: sums (:func:`_rescaled_sums`): the products ``alpha beta`` of two small normal numbers may
#: fall below float64's smallest normal, and ``1 / z_t`` overflow.
RESCALED_BELOW = 1e-200


@_item_jit
def _rescaled_sums(b, lo, hi, alpha_t, beta, g, n, blank, scale_alpha, scale_beta, per_class):
    """The per-class sums and ``z`` of one frame of :func:`_posteriors` again, on
    ``alpha scale_alpha`` and ``beta scale_beta``: ``per_class`` (``n`` classes) refilled,
    returns ``(z, blank's share)``."""
    for u in range(n):
        per_class[u] = 0.0
    z = 0.0
    blank_mass = 0.0
    for s in range(lo, hi):
        ab = (alpha_t[s] * scale_alpha) * (beta[s] * scale_beta)
        u = g.state_class[b, s]
        if u == blank:
            blank_mass += ab
        else:
            per_class[u] += ab
        z += ab
    return z, blank_mass


@_item_jit
def _posteriors(b, columns, num_classes, g, Tb, delay, tilt, alpha, scaled, occupancy, write, per_state,
                beta, weighted, entering, per_class, max_error):
    r"""Backward pass of item ``b``: beta, and its posteriors into ``occupancy``: per class (when
    ``write``) or per state (``per_state``: ``occupancy`` ``(T, B, S)``).
    ``beta``, ``weighted``, ``entering`` ``(S + 2,)`` and ``per_class`` ``(U,)`` are the thread's
    scratch. Returns a bound on the relative error that underflow caused (see the module
    docstring; inf where a frame's ``z`` vanished), as soon as it exceeds ``max_error`` (the
    caller then recomputes the item, posteriors included).

    :math:`\beta_{t-1}(s) = w_{stay}(s)\, \beta_t(s) y_t(s) + e_t(s{+}1) w_{adv}(s{+}1)\, \beta_t(s{+}1) y_t(s{+}1)
    + e_t(s{+}2) w_{skip}(s{+}2)\, \beta_t(s{+}2) y_t(s{+}2)`, rescaled per frame; times
    :math:`r^{-s}` with a ``tilt`` ``r`` other than 1 (the posteriors do not change)."""
    error = 0.0
    Sb = g.num_states[b]
    unit = g.unit_moves and tilt == 1.0
    norm_next = 0.0  # the sum of the frame's beta over its band, known before the frame
    for s in range(Sb + 2):  # two trailing zeros stand for states Sb and Sb+1
        beta[s] = g.final[b, s] * tilt ** (Sb - 1 - s) if s < Sb and g.final[b, s] != 0.0 else 0.0
        norm_next += beta[s]
        weighted[s] = 0.0  # beta_t(s) y_t(s) / sum(beta_t); outside the band: 0, or read through a move of weight 0
        entering[s] = 0.0  # the same, times the entry factor of the delay penalty
    for u in range(num_classes[b]):
        per_class[u] = 0.0
    into = entering if delay != 0.0 else weighted  # what the moves into s+1, s+2 carry
    blank = np.uint64(g.state_class[b, 0])  # state 0 emits blank (unsigned, as u below)
    for t in range(Tb - 1, -1, -1):
        lo, hi = g.band[b, t, 0], g.band[b, t, 1]
        entry = math.exp(-delay * (t - 0.5 * Tb)) if delay != 0.0 else 1.0  # into entry states at t
        z = 0.0
        blank_mass = 0.0
        beta_norm = norm_next
        if beta_norm < TINY:  # vanished (1 / beta_norm would overflow: inf, then NaN)
            return np.inf
        inv = 1.0 / beta_norm  # folded into the emissions: products below TINY are so in the next frame's scale
        alpha_norm = 0.0
        for s in range(np.uint64(lo), np.uint64(hi)):
            u = np.uint64(g.state_class[b, s])
            a = alpha[t, s]
            ab = a * beta[s]
            if u == blank:  # a register, not a store-to-load chain through per_class[blank]
                blank_mass += ab
            else:
                per_class[u] += ab
            z += ab
            alpha_norm += a
            w = beta[s] * (scaled[t, u] * inv)
            weighted[s] = w
            if delay != 0.0:
                entering[s] = w * (1.0 + g.entry[b, s] * (entry - 1.0))
        if z == 0.0:
            return np.inf
        scale_alpha, scale_beta = 1.0, 1.0
        if z < RESCALED_BELOW:  # alpha * beta near float64's smallest: 1 / z would overflow
            scale_alpha, scale_beta = 1.0 / alpha_norm, 1.0 / beta_norm
            z, blank_mass = _rescaled_sums(b, lo, hi, alpha[t], beta, g, num_classes[b], blank, scale_alpha,
                                           scale_beta, per_class)
        # every stored variable may have lost up to TINY (absolute, in its frame's scale): with
        # z = sum (alpha scale_alpha) (beta scale_beta), TINY (alpha_norm + beta_norm) / (alpha beta)'s sum
        error += TINY * (alpha_norm + beta_norm) * scale_alpha * scale_beta / z
        if not error <= max_error:  # NaN included
            return error
        inv_z = 1.0 / z
        per_class[blank] += blank_mass
        if per_state:
            for s in range(occupancy.shape[2]):
                occupancy[t, b, s] = 0.0
            for s in range(lo, hi):
                occupancy[t, b, s] = (alpha[t, s] * scale_alpha) * (beta[s] * scale_beta) * inv_z
        if write:
            for c in range(occupancy.shape[2]):  # columns of absent classes
                occupancy[t, b, c] = 0.0
        for u in range(num_classes[b]):
            if write:
                occupancy[t, b, columns[b, u]] = per_class[u] * inv_z
            per_class[u] = 0.0
        if t == 0:
            break
        # beta_{t-1}(s) = sum over successors s' of w(s -> s') beta_t(s') y_t(s') / sum(beta_t)
        plo, phi = g.band[b, t - 1, 0], g.band[b, t - 1, 1]
        norm_next = 0.0
        if unit:
            for s in range(np.uint64(plo), np.uint64(phi)):
                beta[s] = weighted[s] + into[s + _ONE] + g.skip[b, s + _TWO] * into[s + _TWO]
                norm_next += beta[s]
        else:
            for s in range(np.uint64(plo), np.uint64(phi)):
                beta[s] = (g.stay[b, s] * weighted[s]
                           + tilt * (g.advance[b, s + _ONE] * into[s + _ONE] + tilt * g.skip[b, s + _TWO] * into[s + _TWO]))
                norm_next += beta[s]
    return error


_SQRT2 = 1.4142135623730951
_INV_ODD = tuple(1.0 / (2 * i + 1) for i in range(11))


@numba.njit(inline="always")
def _log_of_sum(x):
    """``log(x)`` for ``x`` in ``[1, 3]`` (one plus two exps of non-positive numbers), to about
    2e-16 absolute, without a branch or a libm call, so that LLVM vectorises the loop around
    it: ``x = 2^k f`` with ``f`` in ``[1/sqrt 2, sqrt 2)``, then ``log f = 2 atanh(z) =
    2 (z + z^3/3 + ... + z^21/21)``, ``z = (f-1)/(f+1)``, ``|z| < 0.172`` (the first term left
    out is below 1e-18 relative)."""
    first = x >= _SQRT2
    f = x * 0.5 if first else x
    second = f >= _SQRT2
    f = f * 0.5 if second else f
    k = (1.0 if first else 0.0) + (1.0 if second else 0.0)
    z = (f - 1.0) / (f + 1.0)
    z2 = z * z
    c = _INV_ODD
    p = c[10]
    for i in range(9, -1, -1):
        p = p * z2 + c[i]
    return k * _LN2_HI + (2.0 * z * p + k * _LN2_LO)


@numba.njit(inline="always")
def _log_weight(weight):
    return math.log(weight) if weight > 0.0 else -np.inf


@_item_jit
def _log_moves(b, g, Sb, weights):
    """``weights (3, S + 2)``: the log-weights of the moves into item ``b``'s states, stay,
    advance, skip (``-inf`` where a move does not exist; past the item's states too)."""
    for s in range(weights.shape[1]):
        inside = s < Sb
        weights[0, s] = _log_weight(g.stay[b, s]) if inside else -np.inf
        weights[1, s] = _log_weight(g.advance[b, s]) if inside else -np.inf
        weights[2, s] = _log_weight(g.skip[b, s]) if inside else -np.inf


@_item_jit
def _log_sum3(n, terms, top, out, bits, power):
    """``out[1, i] = top[i] + log(1 + exp(terms[i]) + exp(terms[n + i]))`` for ``i < n``: the
    log-sum-exps of triples given by :func:`_split3` (their maximum ``top``, the other two's
    differences to it, filled by the caller), in one vectorised pass of exps
    (:func:`exp_nonpositive`) over the ``2n`` differences and one of logs (:func:`_log_of_sum`);
    ``-inf`` where all three are."""
    exp_nonpositive(terms, 2 * n, out, 0, bits, power)
    for i in range(n):
        out[1, i] = top[i] + _log_of_sum(1.0 + out[0, i] + out[0, n + i])


@numba.njit(inline="always")
def _split3(a, b, c, i, n, terms, top):
    """Store the triple ``a, b, c`` for :func:`_log_sum3` at ``i``: its maximum, and the middle
    and smallest values' differences to it (so only two exps: the largest one's is 1), with
    selects rather than branches; differences to 0 where all are ``-inf`` (no NaN)."""
    m = max(a, max(b, c))
    middle = max(min(a, b), min(max(a, b), c))
    least = min(a, min(b, c))
    shift = m if m > -np.inf else 0.0
    top[i] = m
    terms[i] = middle - shift
    terms[n + i] = least - shift


@_item_jit
def _reads_invalid(b, log_probs, classes, g, first, Tb):
    """NaN if a state on item ``b``'s band reads a NaN or ``+inf`` score at a frame in
    ``[first, Tb)``, else -inf: the log-likelihood of an item no path survives (the answer
    the log-space recursion gives, which carries a NaN on to the end)."""
    for t in range(first, Tb):
        for s in range(g.band[b, t, 0], g.band[b, t, 1]):
            if not log_probs[t, b, classes[b, g.state_class[b, s]]] < np.inf:
                return np.nan
    return -np.inf


@_item_jit
def _log_forward(b, log_probs, classes, g, Tb, delay, weights, alpha, rows, terms, top, out, bits, power):
    r"""The forward pass of item ``b`` in log space (float64), exact whatever the scores' range:
    the fallback for items whose probability-space error bound is not negligible. The same
    recursion as :func:`_forward` over the same band, on logs:
    :math:`\log\alpha_t(s) = \log y_t(s) + \mathrm{lse}(w_{stay}(s) + \log\alpha_{t-1}(s),
    e_t(s) + w_{adv}(s) + \log\alpha_{t-1}(s-1), e_t(s) + w_{skip}(s) + \log\alpha_{t-1}(s-2))`
    (log-weights ``weights`` from :func:`_log_moves`, ``e_t`` the delay's entry term), each
    frame's log-sum-exps in one vectorised pass (:func:`_log_sum3`). Each frame is shifted by its
    maximum, whose sum the likelihood adds back: the variables stay near 0, so rounding is
    relative to the frame's range, not to the log-likelihood's size. Fills ``alpha[t, s]``
    (shifted) on the band (``rows (2, S + 2)``, ``terms (2 S,)``, ``top (S,)``, ``out (2, 2 S)``, ``bits``/``power``
    ``(2 S,)`` scratch). Returns the log-likelihood: -inf if no path, NaN if a state on the band
    reads a NaN or ``+inf`` score (as :func:`_forward`)."""
    Sb = g.num_states[b]
    for s in range(Sb + 2):  # two leading -inf stand for states -2, -1
        rows[0, s] = -np.inf
        rows[1, s] = -np.inf
    lo, hi = 0, 0
    total = 0.0
    for t in range(Tb):
        lo, hi = g.band[b, t, 0], g.band[b, t, 1]
        n = hi - lo
        cur = t & 1
        prev = cur ^ 1
        entry = -delay * (t - 0.5 * Tb)
        for i in range(n):
            s = np.uint64(lo + i)  # unsigned (see the module docstring)
            e = g.entry[b, s] * entry if delay != 0.0 else 0.0
            if t == 0:
                kept, advanced, skipped = -np.inf, (0.0 if g.start[b, s] != 0.0 else -np.inf) + e, -np.inf
            else:
                kept = rows[prev, s + _TWO] + weights[0, s]
                advanced = rows[prev, s + _ONE] + weights[1, s] + e
                skipped = rows[prev, s] + weights[2, s] + e
            _split3(kept, advanced, skipped, i, n, terms, top)
        _log_sum3(n, terms, top, out, bits, power)
        bad = False
        frame_max = -np.inf
        for i in range(n):
            y = np.float64(log_probs[t, b, np.uint64(classes[b, g.state_class[b, lo + i]])])
            bad |= not y < np.inf  # NaN or +inf on the band: no answer
            out[1, i] += y
            frame_max = max(frame_max, out[1, i])
        if bad:
            return np.nan
        if frame_max == -np.inf:  # no path survives this frame: -inf, unless a later one reads NaN
            return _reads_invalid(b, log_probs, classes, g, t + 1, Tb)
        for i in range(n):
            v = out[1, i] - frame_max
            rows[cur, lo + i + 2] = v
            alpha[t, lo + i] = v
        total += frame_max
        rows[cur, lo] = -np.inf  # states lo-2, lo-1: read next frame, stale from two frames ago
        rows[cur, lo + 1] = -np.inf
    if Tb == 0:
        return 0.0 if Sb == 1 else -np.inf
    m = -np.inf
    for s in range(lo, hi):
        if g.final[b, s] != 0.0:
            m = max(m, alpha[Tb - 1, s])
    if m == -np.inf:
        return -np.inf
    end = 0.0
    for s in range(lo, hi):
        if g.final[b, s] != 0.0:
            end += math.exp(alpha[Tb - 1, s] - m)
    return total + m + math.log(end)


@_item_jit
def _log_posteriors(b, log_probs, classes, columns, num_classes, g, Tb, delay, weights, alpha, occupancy,
                    per_state, beta, weighted, entering, terms, top, out, bits, power, per_class):
    r"""The backward pass of item ``b`` in log space after :func:`_log_forward` (for an item
    with a finite log-likelihood), writing the posteriors into ``occupancy`` as
    :func:`_posteriors` does (per class at ``columns``; per state, ``(T, B, S)``, with
    ``per_state``): :math:`\gamma_t(s) = \alpha_t(s)\beta_t(s) / \sum_{s'} \alpha_t(s')\beta_t(s')`
    (both shifted per frame, which the ratio does not see) and
    :math:`\log\beta_{t-1}(s) = \mathrm{lse}(w_{stay}(s) + W_t(s), w_{adv}(s{+}1) + E_t(s{+}1),
    w_{skip}(s{+}2) + E_t(s{+}2))` with :math:`W_t = \log\beta_t + \log y_t` and :math:`E_t` the
    same plus the entry term. ``beta``, ``weighted``, ``entering`` ``(S + 2,)`` and ``per_class``
    ``(U,)`` are scratch, the rest as :func:`_log_forward`'s."""
    Sb = g.num_states[b]
    for s in range(Sb + 2):
        beta[s] = 0.0 if s < Sb and g.final[b, s] != 0.0 else -np.inf
        weighted[s] = -np.inf
        entering[s] = -np.inf
    for u in range(num_classes[b]):
        per_class[u] = 0.0
    into = entering if delay != 0.0 else weighted
    for t in range(Tb - 1, -1, -1):
        lo, hi = g.band[b, t, 0], g.band[b, t, 1]
        n = hi - lo
        entry = -delay * (t - 0.5 * Tb)
        for i in range(n):
            s = np.uint64(lo + i)
            y = np.float64(log_probs[t, b, np.uint64(classes[b, g.state_class[b, s]])])
            w = beta[s] + y
            weighted[s] = w
            if delay != 0.0:
                entering[s] = w + g.entry[b, s] * entry
            terms[i] = alpha[t, s] + beta[s]
        peak = -np.inf
        for i in range(n):
            peak = max(peak, terms[i])
        for i in range(n):
            terms[i] -= peak
        exp_nonpositive(terms, n, out, 0, bits, power)
        z = 0.0
        for i in range(n):
            z += out[0, i]
        inv_z = 1.0 / z  # both sides shifted per frame: the posteriors normalised per frame
        for i in range(n):
            out[0, i] *= inv_z
        if per_state:
            for s in range(occupancy.shape[2]):
                occupancy[t, b, s] = 0.0
            for i in range(n):
                occupancy[t, b, lo + i] = out[0, i]
        else:
            for i in range(n):
                per_class[g.state_class[b, lo + i]] += out[0, i]
            for c in range(occupancy.shape[2]):  # columns of absent classes
                occupancy[t, b, c] = 0.0
            for u in range(num_classes[b]):
                occupancy[t, b, columns[b, u]] = per_class[u]
                per_class[u] = 0.0
        if t == 0:
            break
        plo, phi = g.band[b, t - 1, 0], g.band[b, t - 1, 1]
        n = phi - plo
        for i in range(n):
            s = np.uint64(plo + i)
            kept = weighted[s] + weights[0, s]
            advanced = into[s + _ONE] + weights[1, s + _ONE]
            skipped = into[s + _TWO] + weights[2, s + _TWO]
            _split3(kept, advanced, skipped, i, n, terms, top)
        _log_sum3(n, terms, top, out, bits, power)
        peak = -np.inf
        for i in range(n):
            peak = max(peak, out[1, i])
        peak = peak if peak > -np.inf else 0.0
        for i in range(n):
            beta[plo + i] = out[1, i] - peak  # shifted per frame, as alpha


class LogScratch(NamedTuple):
    """One thread's scratch for the log-space kernels (:func:`_log_forward`,
    :func:`_log_posteriors`), ``S`` states: ``weights (3, S + 2)``, ``rows (2, S + 2)``,
    ``beta``/``weighted``/``entering`` ``(S + 2,)``, ``terms (2 S,)``, ``top (S,)``,
    ``out (2, 2 S)``, ``bits``/``power`` ``(2 S,)`` (one memory)."""

    weights: np.ndarray
    rows: np.ndarray
    beta: np.ndarray
    weighted: np.ndarray
    entering: np.ndarray
    terms: np.ndarray
    top: np.ndarray
    out: np.ndarray
    bits: np.ndarray
    power: np.ndarray


@numba.njit(cache=True, nogil=True)
def log_scratch(S):
    bits = np.empty(2 * S, dtype=np.int64)
    return LogScratch(np.empty((3, S + 2)), np.empty((2, S + 2)), np.empty(S + 2), np.empty(S + 2), np.empty(S + 2),
                      np.empty(2 * S), np.empty(S), np.empty((2, 2 * S)), bits, bits.view(np.float64))


@_item_jit
def _log_space_item(b, log_probs, classes, columns, num_classes, g, Tb, delay, need_grad, per_state, alpha, occupancy,
                    w, per_class):
    """Item ``b`` by the log-space kernels (``w``: the thread's :class:`LogScratch`): its
    log-likelihood, and its posteriors into ``occupancy`` with ``need_grad`` (where it is finite)."""
    _log_moves(b, g, g.num_states[b], w.weights)
    ll = _log_forward(b, log_probs, classes, g, Tb, delay, w.weights, alpha, w.rows, w.terms, w.top, w.out, w.bits, w.power)
    if need_grad and Tb > 0 and -np.inf < ll < np.inf:
        _log_posteriors(b, log_probs, classes, columns, num_classes, g, Tb, delay, w.weights, alpha, occupancy,
                        per_state, w.beta, w.weighted, w.entering, w.terms, w.top, w.out, w.bits, w.power, per_class)
    return ll


#: From this ``|log r|`` on, an item's first pass runs tilted (an untilted pass would mostly
#: fail first: the blank phase's ``|log r|`` is 4-6, a confident model's 1-2); below it the
#: untilted loop, two multiplications a state cheaper, goes first. A cost trade, not an exactness
#: one: every pass is exact or sent on by the bound.
TILT_FIRST = 1.0


def tilted_graph(g: KernelGraph, tilt: np.ndarray) -> KernelGraph:
    """``g`` with each item's moves, final weights and start weights tilted by ``tilt`` ``(B,)``
    (:func:`item_tilt`'s gauge, as arrays: what :func:`scaled_underflow_bound` reads for a
    tilted forward, :class:`ctclab.semiring.TiltedProbability`)."""
    r = tilt[:, None]
    states = np.arange(g.start.shape[1])
    final = g.final * r ** np.where(g.final != 0.0, g.num_states[:, None] - 1 - states, 0)
    start = g.start * r ** np.where(g.start != 0.0, states, 0)
    return g._replace(advance=g.advance * r, skip=g.skip * r * r, start=start, final=final, unit_moves=False)


@_item_jit
def item_tilt(b, log_probs, classes, num_classes, g, Tb, mean, sums):
    r"""The tilt ``r`` of item ``b``'s retry (:func:`forward_backward`): the recursion then runs on
    :math:`\alpha_t(s) r^s` and :math:`\beta_t(s) r^{-s}` — advance moves weighted ``r``, skips
    ``r^2``, start state ``s`` ``r^s``, final state ``s`` ``r^{S_b - 1 - s}`` and the likelihood
    divided by :math:`r^{S_b - 1}` —, which changes no path's score (a move from ``s'`` to ``s``
    gets :math:`r^{s - s'}`: the factors of a path telescope), so neither the likelihood nor any
    posterior, only how the variables of a frame compare.

    That is what underflow depends on. In a blank-dominated frame (CTC's blank phase) or with
    long inputs, the forward variables fall by the label-to-blank score ratio with every label
    entered, so at frame ``t`` the states where the posterior mass lies (around
    :math:`s \approx 2 t L_b / T_b`) sit hundreds of orders of magnitude below the frame's
    maximum (near the start) and underflow, while the backward variables mirror it. ``r`` undoes
    this on average: :math:`r^2 = \frac{\bar p_{blank}}{\bar p_{label}} \frac{L_b}{T_b - L_b}`,
    the geometric means over the item's frames of blank's and its target labels' scores, times
    the ratio that puts the peak of a binomial path count at the posterior's position. 1 when
    it is not finite (``-inf`` scores) or the item has no label. ``mean`` ``(U,)`` is scratch;
    so is ``sums``, ``(C,)`` or empty: with it every class's scores are summed over the frames,
    whole rows at a time (vector code), and the item's classes picked from the sums, else the
    item's classes are gathered frame by frame (fewer additions where ``C`` is much larger than
    ``U``, but a load and a store per addition). The same sums, in the same order, either way."""
    Sb = g.num_states[b]
    labels = (Sb - 1) // 2  # label states are the odd ones (ctclab.graph.CTCGraph.build)
    if labels == 0 or Tb <= 0:
        return 1.0
    n = num_classes[b]
    C = log_probs.shape[2]
    if sums.shape[0] >= C:
        for c in range(C):
            sums[c] = 0.0
        for t in range(Tb):
            for c in range(C):
                sums[c] += log_probs[t, b, c]
        for u in range(n):
            mean[u] = sums[np.uint64(classes[b, u])]
    else:
        for u in range(n):
            mean[u] = 0.0
        for t in range(Tb):
            for u in range(n):
                mean[u] += log_probs[t, b, np.uint64(classes[b, u])]
    label_sum = 0.0
    for s in range(1, Sb, 2):
        label_sum += mean[g.state_class[b, s]]
    log_r2 = (mean[g.state_class[b, 0]] - label_sum / labels) / Tb + math.log(labels / max(Tb - labels, 1))
    for u in range(n):
        mean[u] = 0.0
    if not abs(log_r2) < np.inf:  # NaN or infinite
        return 1.0
    return math.exp(min(max(0.5 * log_r2, -MAX_LOG_TILT), MAX_LOG_TILT))


@_jit
def forward_backward(log_probs, classes, columns, num_classes, g, delay, need_grad, occupancy, alpha, scaled,
                     max_error, per_state, tilts=True):
    """Forward and backward pass, item by item: each thread keeps its item's forward variables
    in a buffer of its own, read back by the backward pass from cache rather than from memory.
    Items whose :func:`item_tilt` is at least ``e^TILT_FIRST`` away from 1 run tilted from the
    start, the others untilted and, where the underflow bound exceeds ``max_error`` or the
    likelihood vanished, again tilted (no tilt at all if ``tilts`` is False); an item no pass
    vouches for runs in log space (:func:`_log_forward`, :func:`_log_posteriors`) on the same
    thread: results are those of the log-space recursion, however extreme the scores.

    Args:
        log_probs: ``(T, B, C)`` float32/float64 log-scores.
        classes: ``(B, U)`` int64, the distinct labels of each item (blank included);
            num_classes: ``(B,)`` how many.
        columns: ``(B, U)`` where each distinct label's posterior goes in ``occupancy``: the
            labels themselves (``occupancy`` ``(T, B, C)``, the gradient's layout) or ``0..U-1``
            (compact, ``(T, B, U)``).
        g: the graph (:class:`KernelGraph`; its ``state_class`` indexes ``classes``' columns).
        delay: delay penalty ``lam``: entering a label state at frame t is weighted by
            ``exp(-lam * (t - T_b / 2))`` (0: plain CTC).
        need_grad: write the posteriors (every entry of ``occupancy``, which may come
            uninitialised: zero where there are none); otherwise the backward pass runs only where the
            forward pass lost mass to underflow, for the error bound.
        alpha, scaled: ``(threads, T, S)`` and ``(threads, T, U)`` float64 scratch: forward
            variables up to a per-frame scale (band only), ``exp(log_prob - frame max)`` of each
            distinct label.
        max_error: the largest underflow bound (relative error) an item may keep.
        per_state: ``occupancy`` is ``(T, B, S)``, the posterior of each state (``columns``
            unused): :func:`ctclab.trellis.state_posteriors`'s layout.

    Returns:
        ``(B,)`` float64 log-likelihood (-inf if no path, NaN if the item reads a NaN score;
        such items' posteriors are left 0), ``(B,)`` float64 bound on the relative error that
        underflow caused (0 where the backward pass did not run, and for items run in log
        space), ``(B,)`` bool: the items run in log space, ``(B,)`` bool: the items run again
        tilted.
    """
    B = log_probs.shape[1]
    threads, _, S = alpha.shape
    U = scaled.shape[2]
    input_lengths = g.input_lengths
    loglik = np.full(B, -np.inf)
    error = np.zeros(B)
    log_space = np.zeros(B, dtype=np.bool_)
    tilted = np.zeros(B, dtype=np.bool_)
    # each thread's scratch, made once: the per-item functions take it all from here
    state = np.zeros((threads, 2, S + 2))
    emit = np.empty((threads, S))
    shifted = np.empty((threads, U))
    bits = np.empty((threads, U), dtype=np.int64)
    power = bits.view(np.float64)
    beta, weighted, entering = np.empty((threads, S + 2)), np.empty((threads, S + 2)), np.empty((threads, S + 2))
    per_class = np.empty((threads, U))
    # item_tilt sums every class's scores (contiguous rows, vector code) where that is at most
    # twice the additions of the item's classes alone (a gathered load and a store each): all
    # items' tilts 2x faster at the seed's shape (C = 1.1 U), 1.1x slower at C = 3.8 U, 2x at
    # C = 13 U (AMD EPYC Zen 5)
    C = log_probs.shape[2]
    class_sums = np.empty((threads, C if C <= 2 * U else 0))
    exact = [log_scratch(S) for _ in range(threads)]
    for b in numba.prange(B):  # items to whichever thread is free (dynamic with a chunk size set)
        thread = numba.get_thread_id()
        Tb = input_lengths[b]
        # the tilt the item's scores call for: the first pass runs with it where it is far from
        # 1, else untilted (the cheaper loop), then tilted if that pass cannot vouch for the item
        estimate = item_tilt(b, log_probs, classes, num_classes, g, Tb, per_class[thread], class_sums[thread]) if tilts else 1.0
        tilt = estimate if abs(math.log(estimate)) >= TILT_FIRST else 1.0
        tilted[b] = tilt != 1.0
        for attempt in range(2):
            ll, flagged = _forward(b, log_probs, classes, num_classes, g, Tb, delay, tilt, scaled[thread],
                                   alpha[thread], state[thread], emit[thread], shifted[thread], bits[thread], power[thread])
            ran = ll > -np.inf and Tb > 0 and (need_grad or flagged)
            error[b] = 0.0
            if ran:
                error[b] = _posteriors(b, columns, num_classes, g, Tb, delay, tilt, alpha[thread], scaled[thread],
                                       occupancy, need_grad and not per_state, per_state, beta[thread],
                                       weighted[thread], entering[thread], per_class[thread], max_error)
            if (ll > -np.inf and error[b] <= max_error) or ll != ll or Tb == 0 or tilt != 1.0 or estimate == 1.0:
                break  # vouched for, NaN, or a tilted pass could not: log space
            tilt = estimate
            tilted[b] = True
        if ll == -np.inf or not error[b] <= max_error:  # underflow that may matter (a NaN bound too), or a vanished score
            log_space[b] = True
            error[b] = 0.0
            ll = _log_space_item(b, log_probs, classes, columns, num_classes, g, Tb, delay, need_grad, per_state,
                                 alpha[thread], occupancy, exact[thread], per_class[thread])
        loglik[b] = ll
        if need_grad:  # the caller's buffer is uninitialised: zero what the posteriors left
            complete = Tb > 0 and -np.inf < ll < np.inf
            for t in range(Tb if complete else 0, occupancy.shape[0]):
                for c in range(occupancy.shape[2]):
                    occupancy[t, b, c] = 0.0
    return loglik, error, log_space, tilted


_TINY64 = 2.2250738585072014e-308


@_item_jit
def _bound_step(b, t, inflow, emissions, g, Sb, beta, row, ahead, tiny):
    """One frame of :func:`scaled_underflow_bound` for item ``b``: its term of the bound (inf
    where ``z`` vanished), and ``beta[row]`` moved one frame back, rescaled."""
    mass = 0.0  # the frame's mass as the forward sums it, padding states included
    for s in range(inflow.shape[1]):
        mass += np.float64(inflow[b, s]) * np.float64(emissions[t, b, s])
    z = 0.0
    norm = 0.0
    for s in range(Sb):
        w = beta[row, s] * np.float64(emissions[t, b, s])
        ahead[s] = w
        z += np.float64(inflow[b, s]) * w
        norm += beta[row, s]
    if z <= 0.0:
        return np.inf
    ahead[Sb] = 0.0  # states Sb, Sb+1
    ahead[Sb + 1] = 0.0
    inv = 1.0 / max(norm, 1e-300)
    for s in range(Sb):
        beta[row, s] = (g.stay[b, s] * ahead[s] + g.advance[b, s + 1] * ahead[s + 1] + g.skip[b, s + 2] * ahead[s + 2]) * inv
    # delta_t / z_t, z_t = z / (mass * norm) the overlap of the two rescaled distributions;
    # then the same for the backward variables' own losses (float64)
    return (16.0 * tiny * (1.0 + mass) * norm + 16.0 * _TINY64 * (1.0 + norm) * mass) / z


@_jit
def scaled_underflow_bound(inflows, emissions, g, tiny, threads):
    """:func:`ctclab.scaled.underflow_bound` for the CPU: the same bound, the backward variables
    in float64, parallel over the batch. Each thread takes its items frame by frame, so that it
    fetches each frame's array from the list once.

    Args:
        inflows: list of ``T`` arrays ``(B, S)``, ``transition(v_{t-1})`` of the scaled forward.
        emissions: ``(T, B, S)`` its scaled emissions (``v_t = inflows[t] * emissions[t]``).
        g: the graph (:class:`KernelGraph`; its band is not used).
        tiny: the forward's dtype's smallest normal number; threads: how many to use.

    Returns:
        ``(B,)`` float64 bound (0 for items without frames, inf where a frame's ``z`` vanished).
    """
    B = emissions.shape[1]
    S = emissions.shape[2]
    input_lengths, num_states = g.input_lengths, g.num_states
    bound = np.zeros(B)
    threads = max(1, min(threads, B))
    for thread in numba.prange(threads):
        mine = np.arange(thread, B, threads)
        beta = np.zeros((mine.shape[0], S))
        ahead = np.zeros(S + 2)
        frames = 0
        for i in range(mine.shape[0]):
            frames = max(frames, input_lengths[mine[i]])
        for t in range(frames - 1, -1, -1):
            inflow = inflows[t]
            for i in range(mine.shape[0]):
                b = mine[i]
                Sb = num_states[b]
                if t >= input_lengths[b] or bound[b] == np.inf:
                    continue
                if t == input_lengths[b] - 1:  # the item's last frame: its final states
                    for s in range(Sb):
                        beta[i, s] = g.final[b, s]
                bound[b] += _bound_step(b, t, inflow, emissions, g, Sb, beta, i, ahead, tiny)
    return bound


@_jit
def scatter_posteriors(compact, classes, num_classes, scale, out):
    """The gradient from compact posteriors: ``out[t, b, classes[b, u]] = compact[t, b, u] *
    scale[b]``, 0 elsewhere; every entry of ``out`` (which may come uninitialised) written
    once, in parallel over frames (a zero-fill then a scatter would write it twice, the first
    time on one thread).

    Args:
        compact: ``(T, B, U)``; classes: ``(B, U)`` int64, num_classes: ``(B,)``;
        scale: ``(B,)``; out: ``(T, B, C)``.
    """
    T, B, C = out.shape
    for t in numba.prange(T):
        for b in range(B):  # plain indexing: a view per row would cost shared reference counts
            for c in range(C):
                out[t, b, c] = 0.0
            weight = scale[b]
            for u in range(num_classes[b]):
                out[t, b, classes[b, u]] = compact[t, b, u] * weight


@numba.njit(cache=True, nogil=True)
def class_tables(labels, num_classes_total):
    """The distinct labels of each item, for the kernels' per-class emissions.

    Args:
        labels: ``(B, S)`` int64 extended targets; num_classes_total: C.

    Returns:
        ``(B,)`` int64 how many distinct labels each item has (blank included), ``(B, U)``
        int64 those labels in increasing order (padded with the last one; ``U`` the largest
        count), ``(B, S)`` int64 each state's label's position in that list.
    """
    B, S = labels.shape
    rank = np.full(num_classes_total, -1, dtype=np.int64)
    counts = np.empty(B, dtype=np.int64)  # every entry written below
    listed = np.empty((B, S), dtype=np.int64)
    state_class = np.empty((B, S), dtype=np.int64)
    for b in range(B):
        for s in range(S):
            rank[labels[b, s]] = 0
        n = 0
        for c in range(num_classes_total):  # increasing order: the torch layout's columns
            if rank[c] == 0:
                listed[b, n] = c
                rank[c] = n + 1
                n += 1
        counts[b] = n
        for s in range(S):
            state_class[b, s] = rank[labels[b, s]] - 1
        for s in range(S):
            rank[labels[b, s]] = -1
        for u in range(n, S):
            listed[b, u] = listed[b, n - 1]
    width = counts.max() if B else 0
    return counts, listed[:, :width].copy(), state_class
