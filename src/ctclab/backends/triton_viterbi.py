r"""Batched Viterbi forced alignment in Triton: the whole ragged batch in one launch.

The max-plus recursion over the shared graph (:class:`ctclab.graph.CTCGraph`), the same one
as :func:`ctclab.semiring.forward` in the max semiring and the CPU kernel
(:func:`ctclab.backends.numba_viterbi.viterbi`):

.. math::
    \delta_t(s) = y_t(c_s) + \max\bigl(w_{skip}(s) + e_t(s) + \delta_{t-1}(s-2),\;
    w_{adv}(s) + e_t(s) + \delta_{t-1}(s-1),\; w_{stay}(s) + \delta_{t-1}(s)\bigr),

``c_s`` the class of state ``s``, ``w`` the graph's log-weights of the moves into ``s``,
``e_t(s)`` the delay penalty's frame term on entry states (Graves et al. 2006, section 4.1;
the delay penalty of k2 / icefall). The kernel reads only the graph's arrays — each state's
class, the three moves' log-weights, start/final/entry states, the per-frame entry term, the
band — so every topology and the delay penalty run with no special case.

Algorithm (:func:`_viterbi_kernel`, one program per item, ``B`` programs in one launch):

1. *Forward.* A loop over the item's frames inside the kernel. Each frame visits only the
   states of the graph's band at that frame (:meth:`ctclab.graph.CTCGraph.band`), in tiles of
   ``BLOCK`` states — no cap on the target length: a long target is more tiles. An item whose
   states fit one tile keeps its tile of the graph in registers across frames; otherwise each
   tile reads what the graph needs of it (the standard topology without a delay: each state's
   class and skip weight). The scores of the previous frame are read from a two-row buffer in
   global memory (a row is written by one frame and read by the next after a barrier; states
   outside the previous frame's band read as ``-inf``, so frame 0, with no previous frame, is
   the start states' weights). Each state's winning move is a 2-bit code (0 skip, 1 advance,
   2 stay), packed 4 states to a byte in GPU memory.
2. *Final state.* The best final state of the last frame; ties go to the highest.
3. *Backtrace*, in the same kernel (on the GPU): from the last frame back, ``s -= 2 - code``.

Tie-break (exactly that of the CPU kernel): a state prefers the move from furthest back (skip,
then advance, then stay, each taken only if strictly better), the path ends in the highest final
state unless a lower one scores strictly higher. Scores accumulate in float32 for float32 and
half inputs (read natively), in float64 for float64 inputs; path scores are returned in float64.
Equal-score paths therefore give the CPU kernel's path wherever the sums are exact in float32
(tested with integer scores); near-ties closer than float32's rounding may resolve differently.

Memory per item with ``S = 2L + 1`` states and ``T`` frames: ``T * ceil(S / 4)`` bytes of
backpointers plus two score rows (and the band, 16 bytes a frame). With ``checkpoint_every = K``
the forward pass keeps the score row at the end of every K-frame segment, and the backtrace
recomputes each earlier segment's backpointers from the checkpoint before it, then traces it.
The recomputation visits only the states a path ending where the traced path ends the segment
can pass through (at most ``2K + 1`` a frame, ``~K^2`` a segment): about ``K / S`` of a forward
pass more. Memory: ``K * ceil(S / 4)`` bytes plus ``(T / K) * S * 4`` bytes of checkpoints (8
for float64), bounded for long audio (T = 30000, L = 8000: 120 MB of backpointers without,
~12 MB with K = 173 ≈ sqrt(T)).

Compared with torchaudio's CUDA aligner (``torchaudio.functional.forced_align``,
``falign_cuda_step_kernel``): it takes one item (batch size 1) and launches one step kernel per
frame from a loop on the host, copies the backpointers to the host every 100 frames and traces
back on the CPU, so a batch costs ``B * T`` launches; here the batch is one launch, and the frame
loop, the backpointers and the backtrace stay on the GPU. (No GPU timings were measured for this
kernel yet: see ``benchmarks/gpu_check.py``.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._inputs import compute_dtype
from .._memory import check_memory
from ..graph import ADVANCE, STAY, CTCGraph
from .triton_gpu import _Arrays
from .triton_kernels import _FINAL, _START


@triton.jit
def _tile_graph(graph, base, stride_c, first, BLOCK: tl.constexpr, UNIT: tl.constexpr, DELAY: tl.constexpr):
    """The tile of an item's ``graph`` (``(labels, moves, entry, flags, item offset, moves
    stride)`` in ``_Arrays``' layout, padded past the last tile so that no load needs a mask)
    from state ``base``: the offset of its states' classes in a frame of the scores (``stride_c``
    apart), the log-weights of the moves into them (skip, advance, stay), of starting in them
    (0 or ``-inf``; read only for the ``first`` frame) and their entry weights (0/1; read only
    under a delay). What is not read is not loaded: a tile of the standard topology without a
    delay reads two numbers per state."""
    labels_ptr, moves_ptr, entry_ptr, flags_ptr, item, moves_stride = graph
    at = item + base + tl.arange(0, BLOCK)
    skip_w = tl.load(moves_ptr + at)  # the graph's order of the moves: skip, advance, stay
    zero = tl.full([BLOCK], 0.0, skip_w.dtype)
    adv_w = zero
    stay_w = zero
    if not UNIT:  # else every stay and advance weight is 0: not read, not added
        adv_w = tl.load(moves_ptr + moves_stride + at)
        stay_w = tl.load(moves_ptr + 2 * moves_stride + at)
    start_w = zero + float("-inf")
    if first:
        start_w = tl.where((tl.load(flags_ptr + at) & _START) != 0, 0.0, float("-inf")).to(skip_w.dtype)
    entry_w = zero
    if DELAY:
        entry_w = tl.load(entry_ptr + at)
    column = tl.load(labels_ptr + at).to(tl.int64) * stride_c
    return column, skip_w, adv_w, stay_w, start_w, entry_w


@triton.jit
def _lanes(BLOCK: tl.constexpr):
    """What every tile shares: offsets of its states, the bit shift of each state's code in its
    byte (tiles start at multiples of 4), offsets of its bytes."""
    j = tl.arange(0, BLOCK)
    return j, (j & 3) << 1, tl.arange(0, BLOCK // 4)


@triton.jit
def _frames(t_begin, t_end, prev, plo, phi, end_state, item_data, graph, tile0, lanes,
            RECOMPUTE: tl.constexpr, ONE_TILE: tl.constexpr, UNIT: tl.constexpr, DELAY: tl.constexpr,
            BLOCK: tl.constexpr):
    """Frames ``[t_begin, t_end)`` of the recursion from the row at offset ``prev`` (band ``[plo,
    phi)``; not read when ``t_begin`` is 0), over the tiles (:func:`_tile_graph`) that hold each
    frame's band ``[lo, hi)`` (``tile0``: the item's first tile, loaded once; the only one with
    ``ONE_TILE``). Each frame writes the scores of its band into row ``t % 2`` — on the forward
    pass into the checkpoint row of the segment it ends, if it ends one — and each state's
    winning move into packed row ``t % Kb``.

    ``RECOMPUTE``: a segment again, from its checkpoint, for the backtrace: only in the states a
    path ending in ``end_state`` at frame ``t_end - 1`` can pass through, ``[end_state - 2 (t_end
    - 1 - t), end_state]`` at frame t (a move goes at most two states on; the moves into them come
    from the same window a frame before, so their scores and codes are those of the whole band).

    Offsets within a tile (``lanes``) are compared with scalar bounds (fewer vector operations);
    the recursion is inline (a call costs the interpreter more than the frame). Returns the last
    row's offset and band."""
    lp_item, stride_t, stride_c, scores_ptr, rows, packed_item, band_item, term_ptr, b, B, Sb, Tb, Kb, G = item_data
    j, shift, groups = lanes
    neg = float("-inf")
    for t in range(t_begin, t_end):
        lo = tl.load(band_item + 2 * t)
        hi = tl.load(band_item + 2 * t + 1)
        first = t == 0
        phi = tl.where(first, plo, phi)  # frame 0 has no previous frame: every move reads -inf
        cur = rows + (t % 2) * Sb
        if RECOMPUTE:
            lo = tl.maximum(lo, end_state - 2 * (t_end - 1 - t))
            hi = tl.minimum(hi, end_state + 1)
        else:
            ends_segment = ((t + 1) % Kb == 0) & (t + 1 < Tb)
            cur = tl.where(ends_segment, rows + (1 + (t + 1) // Kb) * Sb, cur)
        term = 0.0
        if DELAY:  # the delay penalty's entry term at this frame
            term = tl.load(term_ptr + tl.cast(t, tl.int64) * B + b)
        lp_frame = lp_item + tl.cast(t, tl.int64) * stride_t
        codes = packed_item + (t % Kb) * G
        for index in range(lo // BLOCK, (hi + BLOCK - 1) // BLOCK):
            base = index * BLOCK
            tile = tile0
            if not ONE_TILE:
                tile = _tile_graph(graph, base, stride_c, first, BLOCK, UNIT, DELAY)
            column, skip_w, adv_w, stay_w, start_w, entry_w = tile
            inside = (j >= lo - base) & (j < hi - base)
            # the previous frame's scores of states s - 2, s - 1, s; -inf outside its band
            low = plo - base
            high = phi - base
            row = scores_ptr + (prev + base) + j
            best = tl.load(row - 2, mask=inside & (j >= low + 2) & (j < high + 2), other=neg) + skip_w
            adv = tl.load(row - 1, mask=inside & (j >= low + 1) & (j < high + 1), other=neg)
            stay = tl.load(row, mask=inside & (j >= low) & (j < high), other=neg)
            if not UNIT:
                adv = adv + adv_w
                stay = stay + stay_w
            entering = start_w
            if DELAY:  # the entry term on the entering moves (and the start) of entry states
                entering = entry_w * term
                best = best + entering
                adv = adv + entering
                entering = start_w + entering
            # the first maximum in the CPU kernel's order: skip, then advance, then stay (frame 0: code 0)
            better = adv > best
            code = tl.where(better, 1, 0)
            best = tl.where(better, adv, best)
            better = stay > best
            code = tl.where(better, 2, code)
            best = tl.where(better, stay, best)
            best = tl.where(first, entering, best)
            y = tl.load(lp_frame + column, mask=inside, other=neg).to(skip_w.dtype)
            tl.store(scores_ptr + (cur + base) + j, best + y, mask=inside)
            # 4 codes to a byte: state 4g + 2p + q at [g, p, q]; split off q, then p (no reduction:
            # tl.sum is a call, which costs the interpreter more than this)
            even, odd = tl.split(tl.reshape(code << shift, (BLOCK // 4, 2, 2)))
            first_even, second_even = tl.split(even)
            first_odd, second_odd = tl.split(odd)
            packed = first_even | first_odd | second_even | second_odd
            tl.store(codes + base // 4 + groups, packed.to(tl.uint8), mask=groups < G - base // 4)
        tl.debug_barrier()  # the next frame reads this row across threads
        prev = cur
        plo = lo
        phi = hi
    return prev, plo, phi


@triton.jit
def _viterbi_kernel(lp_ptr, stride_t, stride_b, stride_c, labels_ptr, moves_ptr, entry_ptr, flags_ptr, band_ptr,
                    term_ptr, lengths_ptr, num_states_ptr, scores_ptr, rows_ptr, packed_ptr, packed_offsets_ptr,
                    states_ptr, path_ptr, B, T, W, K,
                    ONE_TILE: tl.constexpr, UNIT: tl.constexpr, DELAY: tl.constexpr, BLOCK: tl.constexpr):
    """Viterbi path of item ``program_id`` (see the module docstring): forward with a checkpoint
    every ``K`` frames, the best final state, backtrace recomputing each earlier segment.

    Graph arrays as :class:`ctclab.backends.triton_gpu._Arrays` lays them out (``W`` states per
    item); ``band_ptr`` ``(B, T, 2)`` int64, ``term_ptr`` ``(T, B)`` the delay penalty's entry
    term. Per item ``b``: ``rows_ptr[b]`` the offset of its score rows in ``scores_ptr`` (two
    working rows, then one checkpoint per segment boundary, ``S_b`` states each),
    ``packed_offsets_ptr[b]`` that of its backpointers (``min(K, T_b)`` rows of ``ceil(S_b /
    4)`` bytes). Out: ``states_ptr`` ``(B, T)`` (untouched where no path exists), ``path_ptr``
    ``(B,)``."""
    b = tl.program_id(0).to(tl.int64)
    Tb = tl.load(lengths_ptr + b).to(tl.int64)
    Sb = tl.load(num_states_ptr + b).to(tl.int64)
    if Tb > 0:
        G = (Sb + 3) // 4
        Kb = tl.minimum(K, Tb)
        segments = (Tb + Kb - 1) // Kb
        rows = tl.load(rows_ptr + b)
        packed_item = packed_ptr + tl.load(packed_offsets_ptr + b)
        band_item = band_ptr + b * T * 2
        graph = (labels_ptr, moves_ptr, entry_ptr, flags_ptr, b * W, B * W)
        item_data = (lp_ptr + b * stride_b, stride_t, stride_c, scores_ptr, rows, packed_item, band_item, term_ptr,
                     b, B, Sb, Tb, Kb, G)
        tile0 = _tile_graph(graph, 0, stride_c, True, BLOCK, UNIT, DELAY)
        lanes = _lanes(BLOCK)
        # frame 0 writes row 0, or the first checkpoint when the first segment is one frame; its
        # "previous" row and band are not read
        lo = tl.load(band_item)
        hi = tl.load(band_item + 1)
        last, plo, phi = _frames(0, Tb, rows, lo, hi, Sb, item_data, graph, tile0, lanes, False, ONE_TILE, UNIT, DELAY,
                                 BLOCK)
        # the best final state of the last frame; ties: the highest
        best = tl.full((), float("-inf"), tile0[1].dtype)
        state = tl.full((), -1, tl.int64)
        for index in range(plo // BLOCK, (phi + BLOCK - 1) // BLOCK):
            base = index * BLOCK
            j = tl.arange(0, BLOCK)
            final = (j >= plo - base) & (j < phi - base) & ((tl.load(flags_ptr + b * W + base + j) & _FINAL) != 0)
            value = tl.load(scores_ptr + last + base + j, mask=final, other=float("-inf"))
            top = tl.max(value, axis=0)
            where = tl.max(tl.where(final & (value == top), j, -1), axis=0)
            take = (where >= 0) & (top >= best)
            best = tl.where(take, top, best)
            state = tl.where(take, base + where, state)
        tl.store(path_ptr + b, best.to(tl.float64))
        traced = tl.where(best > float("-inf"), segments, 0)
        for i in range(0, traced):
            segment = segments - 1 - i
            start = segment * Kb
            stop = tl.minimum(start + Kb, Tb)
            if i > 0:  # an earlier segment: its backpointers again, from the checkpoint before it
                plo = tl.load(band_item + 2 * tl.maximum(start - 1, 0))
                phi = tl.load(band_item + 2 * tl.maximum(start - 1, 0) + 1)
                _frames(start, stop, rows + (1 + segment) * Sb, plo, phi, state, item_data, graph, tile0, lanes,
                        True, ONE_TILE, UNIT, DELAY, BLOCK)
            for back in range(0, stop - start):  # the backtrace, one frame at a time
                t = stop - 1 - back
                tl.store(states_ptr + b * T + t, state.to(tl.int64))
                byte = tl.load(packed_item + (t % Kb) * G + (state >> 2)).to(tl.int64)
                state = state - 2 + ((byte >> ((state & 3) << 1)) & 3)
            tl.debug_barrier()  # every thread has read this segment's codes before they are recomputed


def _exclusive_cumsum(sizes: Tensor) -> tuple[Tensor, int]:
    ends = sizes.cumsum(0)
    return ends - sizes, int(ends[-1]) if sizes.numel() else 0


def viterbi(graph: CTCGraph, log_probs: Tensor, checkpoint_every: int | None = None) -> tuple[Tensor, Tensor]:
    """Best paths of a batch by :func:`_viterbi_kernel`, on ``log_probs``' device (CUDA, or CPU
    tensors under ``TRITON_INTERPRET=1``).

    Args:
        graph: the batch's :class:`ctclab.graph.CTCGraph` (on any device).
        log_probs: ``(T, B, C)`` log-scores, float16/bfloat16/float32/float64, any strides.
        checkpoint_every: K >= 1: keep a score row every K frames and recompute backpointers
            per segment (``K * ceil(S / 4)`` bytes + ``(T / K) * S`` scores per item); None:
            every frame's backpointers (``T * ceil(S / 4)`` bytes per item).

    Returns:
        ``(B, T)`` int64 state of each frame (-1 beyond an item's input length and for items
        without a path), ``(B,)`` float64 path scores (-inf without a path; an item without
        frames: 0 if its target is empty, else -inf).
    """
    T, B, _ = log_probs.shape
    device = log_probs.device
    states = torch.full((B, T), -1, dtype=torch.int64, device=device)
    no_frames = torch.where(graph.target_lengths == 0, 0.0, -torch.inf).double().to(device)
    if T == 0 or B == 0:
        return states, no_frames
    arrays = _Arrays(graph, log_probs, compute_dtype(log_probs.dtype))
    K = min(checkpoint_every or T, T)
    lengths, num_states = graph.input_lengths.to(device), graph.num_states.to(device)
    frames = lengths.clamp(min=1)  # an item without frames runs nothing; 1 keeps its sizes positive
    segment_frames = frames.clamp(max=K)
    segments = (frames + segment_frames - 1) // segment_frames
    rows, total_scores = _exclusive_cumsum((1 + segments) * num_states)  # 2 working rows + a checkpoint per segment boundary
    packed_offsets, total_packed = _exclusive_cumsum(segment_frames * ((num_states + 3) // 4))
    check_memory(total_scores * arrays.compute.itemsize + total_packed + 24 * B * T, device,
                 "forced_align (impl='triton')",
                 "pass checkpoint_every=K (memory ~ T/K + K per item) or align shorter segments")
    scores = torch.empty(total_scores, dtype=arrays.compute, device=device)
    packed = torch.empty(total_packed, dtype=torch.uint8, device=device)
    path_scores = torch.empty(B, dtype=torch.float64, device=device)
    band = graph.band(T).to(device).contiguous()
    delay = bool(graph.delay_penalty)
    # (T, B) entry term of the delay penalty, computed as the CPU kernel does (in float64)
    frame_times = torch.arange(T, dtype=torch.float64, device=graph.input_lengths.device)[:, None]
    term = graph.frame_term(frame_times, torch.float64) if delay else torch.zeros(1)
    term = term.to(device, arrays.compute).contiguous()
    unit = bool(((graph.moves[ADVANCE:STAY + 1] == 0) | graph.padding).all())
    _viterbi_kernel[(B,)](
        log_probs, *log_probs.stride(), arrays.labels, arrays.moves, arrays.entry, arrays.flags, band, term,
        arrays.input_lengths, arrays.num_states, scores, rows, packed, packed_offsets, states, path_scores,
        B, T, arrays.W, K, ONE_TILE=arrays.S <= arrays.block, UNIT=unit, DELAY=delay, BLOCK=arrays.block,
        num_warps=arrays.warps,
    )
    return states, torch.where(lengths == 0, no_frames, path_scores)
