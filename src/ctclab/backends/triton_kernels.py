r"""Triton kernels of the CTC forward-backward in log space (the loss, its gradient, the posteriors).

One program per item of a ragged batch; a loop over the item's frames inside the program, and in
each frame a loop over tiles of ``BLOCK`` states, so an item may have any number of states (no
cap on the target length). The recursion is that of :mod:`ctclab.semiring` in the log semiring,
on the graph's arrays (:class:`ctclab.graph.CTCGraph`): each state's class, the log-weights of
the moves into it (skip from ``s - 2``, advance from ``s - 1``, stay), its start / final / entry
flags and the delay penalty's per-frame term ``-lam (t - T_b / 2)`` on entries. Any topology runs
unchanged.

Arithmetic in float32 (float64 for float64 scores) in log space: no rescaling, so no underflow
bound and no fallback. Scores are read in their own dtype (float16 and bfloat16 natively).

Forward variables :math:`\alpha_t(s)` (emission at ``t`` included) are stored per item in a
``(B, rows, W + 2)`` buffer, ``rows = T`` when a backward pass follows, 2 otherwise (a ring);
``W`` pads the states past the last tile by two states no move leads into, and each row has two
more in front, all ``-inf``, so that no read needs a mask. The
shifted values ``alpha_{t-1}(s - 1)``, ``alpha_{t-1}(s - 2)`` are read back from the previous row,
which another tile (or another thread) wrote: a barrier separates the frames. The backward pass
overwrites row ``t`` with :math:`\beta_t(s) + y_t(s)` once frame ``t`` is done — what frame
``t - 1`` reads —, so the loss needs nothing beyond the gradient and that buffer.

Which states are visited: at frame ``t`` of an item with ``T_b`` frames and ``S_b`` states,
``[max(0, S_b - 2 (T_b - t)), min(S_b, 2 t + 2))``: a move advances at most two states, paths
start in the first two states and end in the last two (true of every topology in
:data:`ctclab.graph.TOPOLOGIES`; tested). States outside cannot lie on a complete path.

Semantics shared with the other backends: scores below :data:`ctclab.graph.NEG` count as
``NEG`` (so ``-inf`` stays finite and an item with only impossible paths has a likelihood below
``NEG / 2``: ``inf`` loss); an emission is added only where a move leads in (``alpha``) or out
(``beta``), so a NaN (or ``+inf``) counts only where a complete path can read it, as in
:meth:`ctclab.graph.CTCGraph.emissions`; a NaN item gets a NaN loss and NaN on every class of its
frames.

The gradient :math:`-g_b \gamma_t(k)`, with :math:`\gamma_t(k) = \sum_{s: l'_s = k} \gamma_t(s)`,
is written straight into the ``(T, B, C)`` gradient without atomics: each item's states come
sorted by class (``order``), each frame's posteriors are summed per class by a segmented scan in
that order (shifted adds; Triton's ``associative_scan`` with a custom combine runs element by
element in the interpreter, 10x slower), and one state (the last of its class) writes each
class. The same inputs give bitwise the same gradient.

References:
    A. Graves, S. Fernández, F. Gomez, J. Schmidhuber. "Connectionist Temporal
    Classification", ICML 2006, section 4.1 (forward-backward, eq. 6-7, 10-11, 14).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..graph import NEG as _NEG_VALUE

NEG = tl.constexpr(_NEG_VALUE)
#: Bits of the per-state flags (``flags``): start and final states (entry states come as 0/1
#: weights of the delay's term, ``entry``).
START, FINAL = 1, 2
#: The bit of a class-sorted state's code (``sorted``) above its class: the last state of its class.
LAST_BIT = 30
_START, _FINAL = tl.constexpr(START), tl.constexpr(FINAL)
_LAST = tl.constexpr(LAST_BIT)
_CLASS_MASK = tl.constexpr((1 << LAST_BIT) - 1)


@triton.jit
def _item(b, lp_ptr, stride_lb, labels_ptr, moves_ptr, entry_ptr, input_lengths_ptr, num_states_ptr, alpha_ptr,
          rows, B, W):
    """Item ``b``'s lengths and where its rows of the arrays begin (``alpha``'s past its two
    guard states)."""
    skip_b = moves_ptr + b * W
    return (tl.load(input_lengths_ptr + b), tl.load(num_states_ptr + b), lp_ptr + b * stride_lb, labels_ptr + b * W,
            skip_b, skip_b + B * W, skip_b + 2 * B * W, entry_ptr + b * W, alpha_ptr + b * rows * (W + 2) + 2)


@triton.jit(do_not_specialize=["stride_lt", "stride_lb", "rows", "B", "W"])  # no recompilation per shape
def ctc_forward_kernel(
    lp_ptr, stride_lt, stride_lb, stride_lc,  # (T, B, C) scores, any float dtype
    labels_ptr, moves_ptr, entry_ptr, flags_ptr,  # (B, W) int32 classes; (3, B, W) log-weights; (B, W) 0/1; int32 flags
    input_lengths_ptr, num_states_ptr,  # (B,) int32
    alpha_ptr, rows,  # (B, rows, W + 2) forward variables, -inf on entry
    nll_ptr,  # (B,) negative log-likelihood
    B, W, delay,
    BLOCK: tl.constexpr,
):
    """The forward recursion of one item per program; writes its ``-log p(l|x)`` (``inf``
    without a path). ``W``: the states padded past a multiple of ``BLOCK`` by two or more
    padding states (no move leads into them); a row of ``alpha`` has two more in front, so
    that the shifted reads need no mask."""
    b = tl.program_id(0).to(tl.int64)
    acc_ty = alpha_ptr.dtype.element_ty
    Tb, Sb, lp_b, labels_b, skip_b, advance_b, stay_b, entry_b, alpha_b = _item(
        b, lp_ptr, stride_lb, labels_ptr, moves_ptr, entry_ptr, input_lengths_ptr, num_states_ptr, alpha_ptr, rows, B, W)
    lane = tl.arange(0, BLOCK)
    half = Tb.to(acc_ty) / 2
    for t in range(0, Tb):
        row = alpha_b + (t % rows) * (W + 2)
        previous = alpha_b + ((t + rows - 1) % rows) * (W + 2)
        lp_t = lp_b + (t + b * 0) * stride_lt  # in int64, like b: T B C may pass 2^31
        term = -delay * (t - half)
        # the states a complete path can occupy at frame t (module docstring)
        lo = tl.maximum(Sb - 2 * (Tb - t), 0)
        hi = tl.minimum(2 * t + 2, Sb)
        for k in range(lo // BLOCK, (hi + BLOCK - 1) // BLOCK):  # not tl.cdiv: a jit call costs the interpreter ms
            s = k * BLOCK + lane
            entry = tl.load(entry_b + s) * term
            if t == 0:  # the initial weights: start states, entered at frame 0
                start = (tl.load(flags_ptr + b * W + s) & _START) != 0
                inflow = tl.where(start, entry, float("-inf"))
            else:
                # log(e^u + e^v + e^w) over the moves in, -inf when there is none (inline: a call
                # costs the interpreter milliseconds)
                u = tl.load(previous + s) + tl.load(stay_b + s)
                v = tl.load(previous + s - 1) + tl.load(advance_b + s) + entry
                w = tl.load(previous + s - 2) + tl.load(skip_b + s) + entry
                m = tl.maximum(tl.maximum(u, v), w)
                m = tl.where(m == float("-inf"), 0.0, m)
                inflow = m + tl.log(tl.exp(u - m) + tl.exp(v - m) + tl.exp(w - m))
            y = tl.load(lp_t + tl.load(labels_b + s).to(tl.int64) * stride_lc).to(acc_ty)
            y = tl.where(y < NEG, NEG, y)  # NEG for -inf; a NaN stays NaN
            tl.store(row + s, tl.where(inflow == float("-inf"), float("-inf"), inflow + y).to(acc_ty))
        tl.debug_barrier()  # row t complete before frame t + 1 reads its neighbours
    # the final states lie among the last two
    pair = Sb - 2 + tl.arange(0, 2)
    last = alpha_b + ((Tb + rows - 1) % rows) * (W + 2)
    final = (tl.load(flags_ptr + b * W + pair, mask=pair >= 0, other=0) & _FINAL) != 0
    ends = tl.where(final, tl.load(last + pair), float("-inf"))  # garbage if Tb = 0: replaced below
    top = tl.max(ends, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    ll = top + tl.log(tl.sum(tl.exp(ends - top), 0))
    ll = tl.where(Tb > 0, ll, tl.where(Sb == 1, 0.0, float("-inf")))  # no frames: only the empty target
    nll = tl.where(ll < NEG / 2, float("inf"), -ll)
    tl.store(nll_ptr + b, nll.to(acc_ty))


@triton.jit(do_not_specialize=["stride_lt", "stride_lb", "rows", "stride_gt", "stride_gb", "S", "stride_dt",
                               "stride_db", "B", "W", "C"])
def ctc_backward_kernel(
    lp_ptr, stride_lt, stride_lb, stride_lc,  # (T, B, C) scores
    labels_ptr, moves_ptr, entry_ptr, flags_ptr,  # as the forward's
    input_lengths_ptr, num_states_ptr,
    alpha_ptr, rows,  # (B, rows = T, W + 2) the forward's variables; overwritten with beta + emission
    nll_ptr, upstream_ptr,  # (B,) the forward's result; the upstream gradient (GRADIENT only)
    gamma_ptr, stride_gt, stride_gb, S,  # posteriors: (T, B, S) output, or one (B, W) row per item (stride_gt = 0)
    order_ptr, sorted_ptr, segment_ptr,  # (B, W) int32: the states sorted by class; their class and LAST_BIT;
                                         # where their class begins in that order
    grad_ptr, stride_dt, stride_db, stride_dc,  # (T, B, C) gradient in the scores' dtype (GRADIENT only)
    B, W, C, delay,
    BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, GRADIENT: tl.constexpr,
):
    """The backward recursion of one item per program and the posteriors
    :math:`\\gamma_t(s) = \\alpha_t(s) \\beta_t(s) / p(l|x)`; with ``GRADIENT`` the gradient
    ``-g_b gamma_t(k)`` of each class ``k`` into ``grad``, else the posteriors into ``gamma``
    (its first ``S`` states). (Past 80 lines with its argument list: one kernel, whose frame
    loop carries beta, the posteriors and the deterministic class sums in registers together.)"""
    b = tl.program_id(0).to(tl.int64)
    acc_ty = alpha_ptr.dtype.element_ty
    Tb, Sb, lp_b, labels_b, skip_b, advance_b, stay_b, entry_b, alpha_b = _item(
        b, lp_ptr, stride_lb, labels_ptr, moves_ptr, entry_ptr, input_lengths_ptr, num_states_ptr, alpha_ptr, rows, B, W)
    nll = tl.load(nll_ptr + b)
    if GRADIENT:
        scale = -tl.load(upstream_ptr + b).to(acc_ty)
        wanted = scale != 0  # an item masked out upstream keeps 0
    else:
        scale = tl.full((), 1.0, acc_ty)
        wanted = Tb >= 0
    nan_item = nll != nll
    frames = tl.where(wanted & (nll != float("inf")) & ~nan_item, Tb, 0)  # impossible: 0 everywhere
    ll = -nll
    gamma_b = gamma_ptr + b * stride_gb
    lane = tl.arange(0, BLOCK)
    half = Tb.to(acc_ty) / 2
    for i in range(0, frames):
        t = Tb - 1 - i
        t64 = t + b * 0  # in int64, like b: offsets of T B C or T B S elements may pass 2^31
        row = alpha_b + t * (W + 2)
        ahead = row + (W + 2)  # beta + emission of frame t + 1
        term = -delay * (t + 1 - half)  # on the moves into frame t + 1
        lo = tl.maximum(Sb - 2 * (Tb - t), 0)
        hi = tl.minimum(2 * t + 2, Sb)
        for k in range(lo // BLOCK, (hi + BLOCK - 1) // BLOCK):  # not tl.cdiv: a jit call costs the interpreter ms
            s = k * BLOCK + lane
            if i == 0:  # the item's last frame: its final states
                final = (tl.load(flags_ptr + b * W + s) & _FINAL) != 0
                beta = tl.where(final, 0.0, float("-inf")).to(acc_ty)
            else:
                u = tl.load(ahead + s) + tl.load(stay_b + s)
                v = tl.load(ahead + s + 1) + tl.load(advance_b + s + 1) + tl.load(entry_b + s + 1) * term
                w = tl.load(ahead + s + 2) + tl.load(skip_b + s + 2) + tl.load(entry_b + s + 2) * term
                m = tl.maximum(tl.maximum(u, v), w)
                m = tl.where(m == float("-inf"), 0.0, m)
                beta = m + tl.log(tl.exp(u - m) + tl.exp(v - m) + tl.exp(w - m))
            alpha = tl.load(row + s)
            gamma = tl.exp(tl.minimum(alpha + beta - ll, 0.0))
            gamma = tl.where((alpha == float("-inf")) | (beta == float("-inf")), 0.0, gamma)
            if GRADIENT:
                tl.store(gamma_b + s, gamma)
            else:
                tl.store(gamma_b + t64 * stride_gt + s, gamma, mask=s < S)
            y = tl.load(lp_b + t64 * stride_lt + tl.load(labels_b + s).to(tl.int64) * stride_lc).to(acc_ty)
            y = tl.where(y < NEG, NEG, y)
            tl.store(row + s, tl.where(beta == float("-inf"), float("-inf"), beta + y).to(acc_ty))
        if GRADIENT:
            tl.debug_barrier()  # the frame's posteriors complete before they are summed per class
            carry = tl.zeros((BLOCK,), acc_ty)  # the last lane's sum, in every lane (a gather, not a jit'd tl.sum)
            grad_t = grad_ptr + t64 * stride_dt + b * stride_db
            for k in range(0, (Sb + BLOCK - 1) // BLOCK):
                j = k * BLOCK + lane
                state = tl.load(order_ptr + b * W + j)
                code = tl.load(sorted_ptr + b * W + j)
                begins = tl.load(segment_ptr + b * W + j) - k * BLOCK  # < 0: in an earlier tile
                first = tl.maximum(begins, 0)  # the class's first lane in this tile
                total = tl.load(gamma_b + state, mask=(state >= lo) & (state < hi), other=0.0)  # others: stale
                # segmented inclusive sum (Hillis-Steele: log2(BLOCK) shifted adds, each within the
                # lane's class; a fixed order of additions, so the same bits every run)
                for step in range(LOG_BLOCK):  # not unrolled: fewer registers
                    back = lane - (1 << step)
                    total += tl.where(back >= first, tl.gather(total, tl.maximum(back, 0), 0), 0.0)
                total += tl.where(begins < 0, carry, 0.0)  # the class's sum over the earlier tiles
                ends = ((code >> _LAST) & 1) != 0  # the last state of its class writes it (never a padding state)
                tl.store(grad_t + (code & _CLASS_MASK).to(tl.int64) * stride_dc,
                         (scale * total).to(grad_ptr.dtype.element_ty), mask=ends)
                carry = tl.gather(total, tl.full((BLOCK,), BLOCK - 1, tl.int32), 0)
        tl.debug_barrier()  # frame t complete before frame t - 1 reads it
    # an item that read a NaN: NaN on its frames (every class of the gradient, every state of the posteriors)
    nan_frames = tl.where(wanted & nan_item, Tb, 0)
    width = C if GRADIENT else S
    for t in range(0, nan_frames):
        for k in range(0, (width + BLOCK - 1) // BLOCK):
            j = k * BLOCK + lane
            if GRADIENT:
                tl.store(grad_ptr + (t + b * 0) * stride_dt + b * stride_db + j.to(tl.int64) * stride_dc,
                         tl.full((BLOCK,), float("nan"), grad_ptr.dtype.element_ty), mask=j < width)
            else:
                tl.store(gamma_b + (t + b * 0) * stride_gt + j, tl.full((BLOCK,), float("nan"), gamma_ptr.dtype.element_ty),
                         mask=j < width)
