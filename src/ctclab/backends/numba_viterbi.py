"""CPU kernel (numba) for Viterbi alignment: the max-plus recursion over the shared graph
(:class:`ctclab.backends.numba_kernels.KernelGraph`), parallel over the batch.

It is the reference max-semiring recursion (:func:`ctclab.semiring.forward`) specialised, and
tested against it and against brute-force path enumeration (``tests/test_conformance.py``).
"""
from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def viterbi(log_probs, labels, g, checkpoint_every, delay, states, path_scores):
    """Best path of each item (max-plus recursion over the graph), exact, in float64.

    Backpointers are packed 2 bits per state (0 skip, 1 advance, 2 stay), one byte per 4
    states. With ``checkpoint_every = K < T`` only the scores at every K-th frame are kept on
    the forward pass and each K-frame segment's backpointers are recomputed during the
    backtrace: memory ``T/K * S`` floats plus ``K * S / 4`` bytes per item instead of
    ``T * S / 4`` bytes. Only the band's states are computed (others never lie on a complete
    path).

    Ties: a state prefers the move from furthest back (skip, then advance, then stay); the path
    ends in the highest final state unless a lower one scores strictly higher.

    Args:
        log_probs: ``(T, B, C)``; labels: ``(B, S)`` the class of each state; g: the graph
        (:class:`KernelGraph`); checkpoint_every: int >= 1.
        delay: delay penalty ``lam``: entering an entry state at frame t adds ``-lam (t - T_b/2)``.
        states: ``(B, T)`` int64 out, the state of each frame (untouched beyond the input length).
        path_scores: ``(B,)`` float64 out, the best path's total log-score (-inf if none).
    """
    T, B, C = log_probs.shape
    for b in numba.prange(B):
        Sb = g.num_states[b]
        Tb = g.input_lengths[b]
        if Tb == 0:
            path_scores[b] = 0.0 if Sb == 1 else -np.inf
            continue
        K = min(checkpoint_every, Tb)
        segments = (Tb + K - 1) // K
        groups = (Sb + 3) // 4
        # the item's log-weights, -inf past its states (the groups of 4 may overrun them); one
        # flat array per move, as the step reads them state after state
        skip_w, adv_w, stay_w = np.full(4 * groups, -np.inf), np.full(4 * groups, -np.inf), np.full(4 * groups, -np.inf)
        start_w, entry_w = np.full(4 * groups, -np.inf), np.zeros(4 * groups)
        for s in range(Sb):
            skip_w[s] = _log(g.skip[b, s])
            adv_w[s] = _log(g.advance[b, s])
            stay_w[s] = _log(g.stay[b, s])
            start_w[s] = _log(g.start[b, s])
            entry_w[s] = g.entry[b, s]
        weights = (skip_w, adv_w, stay_w, start_w, entry_w)
        checkpoints = np.empty((segments, 4 * groups + 2))  # scores before each segment
        packed = np.zeros((K, groups), dtype=np.uint8)
        delta = np.full(4 * groups + 2, -np.inf)  # two leading -inf stand for states -2, -1
        nxt = np.full(4 * groups + 2, -np.inf)
        for t in range(Tb):
            if t % K == 0:
                checkpoints[t // K, :] = delta
            _viterbi_step(log_probs, labels, b, t, Tb, Sb, g.band, weights, g.unit_moves, delay, delta, nxt, packed[t % K])
            delta, nxt = nxt, delta
        best = -np.inf
        state = -1
        for s in range(Sb - 1, -1, -1):  # ties: the highest final state
            if g.final[b, s] != 0.0 and (state < 0 or delta[s + 2] > best):
                best = delta[s + 2]
                state = s
        path_scores[b] = best
        if best == -np.inf:
            continue
        for seg in range(segments - 1, -1, -1):
            start = seg * K
            stop = min(start + K, Tb)
            if seg != segments - 1:  # recompute this segment's backpointers from its checkpoint
                delta[:] = checkpoints[seg, :]
                for t in range(start, stop):
                    _viterbi_step(log_probs, labels, b, t, Tb, Sb, g.band, weights, g.unit_moves, delay, delta, nxt, packed[t - start])
                    delta, nxt = nxt, delta
            for t in range(stop - 1, start - 1, -1):
                states[b, t] = state
                code = (packed[t - start, state >> 2] >> (2 * (state & 3))) & 3
                state -= 2 - code


@numba.njit(inline="always")
def _log(weight):
    return math.log(weight) if weight > 0.0 else -np.inf


@numba.njit(inline="always")
def _viterbi_step(log_probs, labels, b, t, Tb, Sb, band, weights, unit, delay, delta, out, packed_row):
    """One frame of the max-plus recursion over the band's states, 4 states per byte:
    ``delta_t(s) = y_t(s) + max(w_skip(s) + delta(s-2), w_adv(s) + delta(s-1), w_stay(s) + delta(s))``
    (entering moves plus the delay's entry term), backpointer = the first maximum's move."""
    lo, hi = band[b, t, 0], band[b, t, 1]
    entry = -delay * (t - 0.5 * Tb)  # log-weight of entering an entry state at frame t
    skip_w, adv_w, stay_w, start_w, entry_w = weights
    for g in range(lo >> 2, (hi + 3) >> 2):
        byte = 0
        for j in range(4):
            s = 4 * g + j
            if t == 0:  # "before" the start: code 0
                best = start_w[s] + (entry_w[s] * entry if delay != 0.0 else 0.0)
                code = 0
            else:
                best = delta[s] + skip_w[s]
                adv = delta[s + 1]
                stay = delta[s + 2]
                if not unit:  # loop-invariant: the weights' own property, read from the arrays
                    adv += adv_w[s]
                    stay += stay_w[s]
                if delay != 0.0:  # the entry term only where it exists: a select here costs a load per state
                    ent = entry_w[s] * entry
                    best += ent
                    adv += ent
                code = 0
                if adv > best:
                    best = adv
                    code = 1
                if stay > best:
                    best = stay
                    code = 2
            out[s + 2] = best + log_probs[t, b, labels[b, s]] if s < Sb else -np.inf
            byte |= code << (2 * j)
        packed_row[g] = byte
