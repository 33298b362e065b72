r"""CPU kernel (numba) for Viterbi alignment: the max-plus recursion over the shared graph, in
float64, parallel over the batch, laid out so that LLVM vectorises it over states.

:math:`\delta_0(s) = w_{start}(s) + e_0(s) + y_0(s)`,
:math:`\delta_t(s) = y_t(s) + \max\big(w_{skip}(s) + e_t(s) + \delta_{t-1}(s-2),\;
w_{adv}(s) + e_t(s) + \delta_{t-1}(s-1),\; w_{stay}(s) + \delta_{t-1}(s)\big)`

(Graves et al. 2006, section 4.1; :func:`ctclab.semiring.forward` in the max semiring, of which
this is the specialisation, tested against it and against brute-force path enumeration in
``tests/test_conformance.py``). ``w`` are the graph's move log-weights (``CTCGraph.moves``,
``-inf`` where a move does not exist: the skip rule, self-loops, padding), ``e_t(s)`` the delay
penalty's entry term (``entry(s) * -lam (t - T_b/2)``), ``y_t`` the emissions.

What vectorises (checked with ``viterbi.inspect_asm()``, see ``tests/test_viterbi_kernel.py``):
every frame is three loops over the band's states, each free of branches and of a test of a
state's parity or index, so that LLVM's loop vectoriser turns them into SIMD code of the
machine's own width (``ymm`` with AVX2, ``zmm`` with AVX-512; numba compiles for the host):

1. the gather of the frame's emissions into a contiguous row (``y_t(s) = log_probs[t, b,
   labels[s]]``; scalar loads where the target has no gather instruction worth using);
2. the step: three shifted loads of the previous row, additive weight rows (a forbidden move is
   an added ``-inf``, the delay's entry term ``entry(s) * e_t`` a multiply-add that is ``+0``
   without a penalty), two compares (``vcmpltpd``) and two maxima (``vmaxpd``: a compare-select
   with the first maximum kept), and the backpointer code (0 skip, 1 advance, 2 stay) from the
   compare masks (``vandpd``, ``vblendvpd``), converted to bytes 4 at a time (``vcvttpd2dq``,
   ``vpshufb``): 23 instructions per 4 states with AVX2;
3. the packing of those codes 4 per byte (``code(4g) | code(4g+1) << 2 | ...``), a vector of
   bytes at a time.

The first frame is peeled out of the loop (start weights instead of moves). Ties are broken as
by the reference: the first maximum in the order skip, advance, stay (strict ``>`` compares, the
same sums in the same order), the highest final state unless a lower one scores strictly higher.

Checkpointing (``checkpoint_every = K < T``): the forward pass keeps only the scores before
every K-th frame and computes no backpointers (the step without its code loops); the backtrace
recomputes each segment from its checkpoint, but only the states the path can pass through:
a path that is in state ``s_end`` at the segment's last frame was in a state ``>= s_end - 2(K-1)``
at its first, and the scores of states ``>= s_end - 2K + 2j`` at the segment's ``j``-th frame
depend only on states in that window (each move is at most 2 states long), so the window's
scores, backpointers and tie-breaks are exactly those of the full recursion. The recomputation
costs ``T * min(2K + 1, band)`` state updates against the forward's ``T * band``: a fraction
``2K / S`` of one forward pass. Memory per item: ``T/K * (S + 2)`` floats of checkpoints plus
``K * S / 4`` bytes of backpointers (:func:`ctclab._memory.viterbi_bytes`), instead of ``T * S / 4`` bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

# No fastmath: the sums and compares run in IEEE order, so scores and tie-breaks are the
# reference's; maxima by compare-and-select vectorise without it.
_step_jit = numba.njit(inline="always")
# Unsigned state indices: numba wraps negative signed indices around (a select per access),
# which keeps LLVM from vectorising; an unsigned index cannot be negative.
_ONE, _TWO = np.uint64(1), np.uint64(2)


@_step_jit
def _entry_term(delay, t, Tb):
    """Log-weight of entering an entry state at frame ``t`` (the delay penalty's)."""
    return -delay * (t - 0.5 * Tb)


@_step_jit
def _gather(log_probs, t, b, labels, lo, hi, emit):
    """``emit[s] = log_probs[t, b, labels[b, s]]`` for the band's states: the frame's emissions
    as a contiguous row, in the scores' dtype (a float32 row is widened 4 at a time by the
    step's ``vcvtps2pd`` instead of one by one here)."""
    for s in range(np.uint64(lo), np.uint64(hi)):
        emit[s] = log_probs[t, b, np.uint64(labels[b, s])]


@_step_jit
def _first(w, e, emit, lo, hi, out):
    """Frame 0: ``out[s + 2] = w_start(s) + e_0(s) + y_0(s)``."""
    for s in range(np.uint64(lo), np.uint64(hi)):
        out[s + _TWO] = (w.start[s] + w.entry[s] * e) + np.float64(emit[s])


@_step_jit
def _step(prev, w, e, emit, lo, hi, out, codes):
    """One frame ``t > 0`` over states ``[lo, hi)`` (rows offset by 2: ``prev[s + 2]`` is state
    ``s``; ``prev[lo]``, ``prev[lo + 1]`` must hold the scores of states ``lo - 2``, ``lo - 1`` or
    ``-inf``). ``codes[s]`` gets the winning move (0 skip, 1 advance, 2 stay; ties: the first);
    ``codes=None`` compiles the step without them (checkpointed forward pass)."""
    for s in range(np.uint64(lo), np.uint64(hi)):
        ent = w.entry[s] * e  # 0 without a delay penalty or off the entry states
        skp = (prev[s] + w.skip[s]) + ent
        adv = (prev[s + _ONE] + w.advance[s]) + ent
        stay = prev[s + _TWO] + w.stay[s]
        by_adv = adv > skp
        best = adv if by_adv else skp
        by_stay = stay > best
        out[s + _TWO] = (stay if by_stay else best) + np.float64(emit[s])
        if codes is not None:  # as a float64 blend of the masks, converted 4 at a time to bytes
            codes[s] = np.uint8(2.0 if by_stay else (1.0 if by_adv else 0.0))
    # the next frame reads states [lo - 2, hi + 2) (the band moves by at most 2 states a frame):
    # those outside this frame's band hold no path now
    out[lo] = out[lo + 1] = -np.inf
    out[hi + 2] = out[hi + 3] = -np.inf


@_step_jit
def _pack(codes, lo, hi, row):
    """``row[g]`` = the codes of states ``4g .. 4g+3``, 2 bits each, for the groups of the
    band ``[lo, hi)`` (``codes`` padded to a multiple of 4)."""
    four = np.uint64(4)
    for g in range(np.uint64(lo >> 2), np.uint64((hi + 3) >> 2)):
        c = four * g
        row[g] = codes[c] | (codes[c + _ONE] << 2) | (codes[c + _TWO] << 4) | (codes[c + np.uint64(3)] << 6)


class Rows(NamedTuple):
    """One item's additive rows (``4 * groups`` float64 each, ``-inf`` / 0 past its states):
    the log-weights of the moves into each state, of starting there, and its entry flag."""

    skip: np.ndarray
    advance: np.ndarray
    stay: np.ndarray
    start: np.ndarray
    entry: np.ndarray


@_step_jit
def _rows(g, b, width):
    """Item ``b``'s :class:`Rows` from the graph's host arrays (:class:`ctclab.graph.HostArrays`)."""
    skip, advance, stay = np.full(width, -np.inf), np.full(width, -np.inf), np.full(width, -np.inf)
    start, entry = np.full(width, -np.inf), np.zeros(width)
    for s in range(g.num_states[b]):
        skip[s] = g.moves[0, b, s]
        advance[s] = g.moves[1, b, s]
        stay[s] = g.moves[2, b, s]
        start[s] = 0.0 if g.start[b, s] else -np.inf
        entry[s] = 1.0 if g.entry[b, s] else 0.0
    return Rows(skip, advance, stay, start, entry)


@numba.njit(parallel=True, cache=True, nogil=True)
def viterbi(log_probs, g, band, checkpoint_every, delay, states, path_scores):
    """Best path of each item (the module docstring's recursion), exact, in float64.

    Args:
        log_probs: ``(T, B, C)`` float32/float64; g: the graph's host arrays
            (:class:`ctclab.graph.HostArrays`: labels, moves, start/final/entry states, lengths);
        band: ``(B, T, 2)`` int64, the states ``[lo, hi)`` to visit at each frame
            (:meth:`ctclab.graph.CTCGraph.band`);
        checkpoint_every: ``K >= 1`` (``>= T``: no checkpointing).
        delay: delay penalty ``lam``: entering an entry state at frame t adds ``-lam (t - T_b/2)``.
        states: ``(B, T)`` int64 out, the state of each frame (untouched beyond the input length).
        path_scores: ``(B,)`` float64 out, the best path's total log-score (-inf if none).
    """
    B = log_probs.shape[1]
    for b in numba.prange(B):
        Sb = g.num_states[b]
        Tb = g.input_lengths[b]
        if Tb == 0:
            path_scores[b] = 0.0 if Sb == 1 else -np.inf
            continue
        K = min(checkpoint_every, Tb)
        checkpointed = K < Tb
        segments = (Tb + K - 1) // K
        groups = (Sb + 3) // 4
        w = _rows(g, b, 4 * groups)
        emit = np.zeros(4 * groups, dtype=log_probs.dtype)
        codes = np.zeros(4 * groups, dtype=np.uint8)
        packed = np.zeros((K, groups), dtype=np.uint8)
        checkpoints = np.empty((segments if checkpointed else 0, 4 * groups + 4))
        delta = np.full(4 * groups + 4, -np.inf)  # two leading -inf stand for states -2, -1
        nxt = np.full(4 * groups + 4, -np.inf)
        lo, hi = band[b, 0, 0], band[b, 0, 1]
        _gather(log_probs, 0, b, g.labels, lo, hi, emit)
        _first(w, _entry_term(delay, 0, Tb), emit, lo, hi, delta)
        for t in range(1, Tb):
            lo, hi = band[b, t, 0], band[b, t, 1]
            _gather(log_probs, t, b, g.labels, lo, hi, emit)
            if checkpointed:
                if t % K == 0:
                    checkpoints[t // K, :] = delta
                _step(delta, w, _entry_term(delay, t, Tb), emit, lo, hi, nxt, None)
            else:
                _step(delta, w, _entry_term(delay, t, Tb), emit, lo, hi, nxt, codes)
                _pack(codes, lo, hi, packed[t])
            delta, nxt = nxt, delta
        best = -np.inf
        state = -1
        for s in range(Sb - 1, -1, -1):  # ties: the highest final state
            if g.final[b, s] and (state < 0 or delta[s + 2] > best):
                best = delta[s + 2]
                state = s
        path_scores[b] = best
        if best == -np.inf:
            continue
        for seg in range(segments - 1, -1, -1):
            first = seg * K
            stop = min(first + K, Tb)
            if checkpointed:  # the segment's backpointers, recomputed in the path's window
                window = max(0, state - 2 * K)
                top = state + 1
                if seg == 0:
                    lo, hi = max(band[b, 0, 0], window), min(band[b, 0, 1], top)
                    _gather(log_probs, 0, b, g.labels, lo, hi, emit)
                    delta[:] = -np.inf
                    _first(w, _entry_term(delay, 0, Tb), emit, lo, hi, delta)
                else:
                    delta[:] = checkpoints[seg, :]
                for t in range(max(first, 1), stop):
                    lo, hi = max(band[b, t, 0], window), min(band[b, t, 1], top)
                    _gather(log_probs, t, b, g.labels, lo, hi, emit)
                    _step(delta, w, _entry_term(delay, t, Tb), emit, lo, hi, nxt, codes)
                    _pack(codes, lo, hi, packed[t - first])
                    delta, nxt = nxt, delta
            for t in range(stop - 1, first - 1, -1):
                states[b, t] = state
                code = (packed[t - first, state >> 2] >> (2 * (state & 3))) & 3
                state -= 2 - code


@numba.njit(cache=True, nogil=True)
def path_labels(states, aligned, state_labels, log_probs, blank, labels, scores):
    """What a best path reads, in one pass over ``(B, T)`` (:func:`ctclab.align.best_paths` on
    CPU, where its six torch operations on small tensors took 0.2-0.4 ms, 5-8% of an
    alignment of B=32, T=500, L=100):
    ``states`` (``-1`` beyond an item's frames) set to ``-1`` for items not ``aligned``;
    ``labels[b, t] = state_labels[b, states[b, t]]`` and ``scores[b, t] = log_probs[t, b,
    labels[b, t]]`` where a state is set, ``blank`` and 0 elsewhere.

    Args:
        states: ``(B, T)`` int64, in and out; aligned: ``(B,)`` bool; state_labels: ``(B, S)``
            int64 (:attr:`ctclab.graph.CTCGraph.labels`); log_probs: ``(T, B, C)``;
        labels, scores: ``(B, T)`` int64 and ``log_probs``' dtype, out.
    """
    B, T = states.shape
    for t in range(T):  # frame by frame: the reads of log_probs stay within a few pages
        for b in range(B):
            s = states[b, t] if aligned[b] else -1
            states[b, t] = s
            label = state_labels[b, s] if s >= 0 else blank
            labels[b, t] = label
            scores[b, t] = log_probs[t, b, label] if s >= 0 else 0.0
