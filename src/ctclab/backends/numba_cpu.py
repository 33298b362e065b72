"""The numba backend: CPU kernels for the loss's explicit forward-backward
(:mod:`ctclab.backends.numba_kernels`) and for Viterbi (:mod:`ctclab.backends.numba_viterbi`),
parallel over the batch.

The forward pass computes the likelihood and, when a gradient will be needed, the posteriors;
the backward pass returns them scaled (the true gradient, for any log-scores). Items whose
underflow the probability-space kernels cannot bound are recomputed by the kernels' log-space
forward-backward (float64, on the same thread), so results are those of the log-space
recursion, at compiled speed whatever the scores.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading

import numpy as np
import torch
from torch import Tensor

from .._memory import check_memory, viterbi_bytes
from ..graph import CTCGraph
from . import Backend, register
from .common import DOUBLE_BACKWARD_ERROR, upstream, with_nan_items

#: Largest relative error from underflow (bounded by :func:`ctclab.backends.numba_kernels.forward_backward`) that an
#: item may carry before it is recomputed in log space.
_MAX_UNDERFLOW_ERROR = 1e-13


_scratch = threading.local()


def _workspace(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 scratch array of ``shape``, reused across calls of the same thread: the kernels'
    forward variables and scaled emissions live only during one forward, and fresh pages each
    call cost page faults. (numpy, not torch: a tensor and its ``.numpy()`` view cost a small
    call several microseconds more.)"""
    numel = math.prod(shape)
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.shape[0] < numel:
        buffer = np.empty(numel)
        setattr(_scratch, name, buffer)
    return buffer[:numel].reshape(shape)


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor for the posteriors or the gradient (the kernels write every
    entry). Blocks of :data:`_ALWAYS_MAPPED` bytes and more come fresh from the system at every
    call (glibc maps them anew and unmaps them when freed) and each page is faulted in again:
    those numpy allocates, asking Linux for transparent huge pages (``madvise``), 2 MiB per
    fault instead of 4 KiB (a new 160 MB gradient, at (1000, 8, 5000), written in 10 ms instead
    of 58 ms; AMD EPYC Zen 5). Smaller ones torch allocates, from memory glibc mostly reuses
    (numpy's huge-page advice made 4 MB buffers fault 500 pages a call at the seed's shape,
    the kernel 2.3x slower on those calls)."""
    if not _always_mapped(shape, dtype):
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))


def _gradient_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """:func:`_host_empty` for the gradient that backward returns, except that a block of
    :data:`_ALWAYS_MAPPED` bytes or more is kept, one per thread, and handed out again for the
    next gradient of the same shape and dtype once no tensor uses it any more (only ours refers
    to the numpy array then: ``torch.from_numpy``'s storage, hence every view of the gradient and
    every ``.numpy()`` of it, holds a reference). A training step frees the loss's gradient as
    soon as ``log_softmax``'s backward has read it, so the next step writes into memory that is
    already mapped instead of faulting 160 MB in afresh (at (1000, 8, 5000) the backward takes
    4.5-6 ms in every call; with a fresh block 7-13 ms, and up to 100 ms where the memory had
    gone back to the host of the VM; AMD EPYC Zen 5). The kept block is one gradient's size,
    held until the thread ends or a gradient of another shape replaces it."""
    if not _always_mapped(shape, dtype):
        return _host_empty(shape, dtype)
    kept = getattr(_scratch, "gradient", None)
    # references: the attribute, the name kept, getrefcount's argument; a tensor using it adds one
    if kept is None or kept.shape != shape or kept.dtype != _NUMPY_DTYPES[dtype] or sys.getrefcount(kept) > 3:
        kept = np.empty(shape, dtype=_NUMPY_DTYPES[dtype])
        _scratch.gradient = kept
    return torch.from_numpy(kept)


#: glibc's largest ``mmap`` threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks
#: at least this large are always mapped, never reused from the heap.
_ALWAYS_MAPPED = 32 * 2**20
_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _always_mapped(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a buffer of ``shape`` and ``dtype`` is a block glibc maps afresh at every call."""
    return math.prod(shape) * _NUMPY_DTYPES[dtype].itemsize >= _ALWAYS_MAPPED


@functools.lru_cache(maxsize=64)
def _compact_columns(B: int, U: int) -> np.ndarray:
    """``(B, U)`` int64 ``0..U-1`` in every row: where the compact posteriors put each item's
    distinct labels (:func:`ctclab.backends.numba_kernels.forward_backward`'s ``columns``; only
    read)."""
    return np.tile(np.arange(U, dtype=np.int64), (B, 1))


@contextlib.contextmanager
def _threads_for(threads: int, items: int, all_threads: int):
    """numba's parallel loops, for the block, on ``threads`` of its ``all_threads`` (thread ids
    index the kernels' scratch) and, with more ``items`` than threads, handing out runs of
    ``items // (4 threads)`` neighbouring items (at least one) to whichever thread is free: a
    thread slowed by a busy neighbour no longer holds up the other's last items, and neighbouring
    items, whose posteriors share cache lines in the ``(T, B, .)`` layout, mostly stay on one
    thread (items dealt one at a time made the two threads write the same lines: the kernels
    6-15% slower at (50, 64, 80, 20), minimum and median of 40 calls). Settings already right
    are left alone: each change costs tens of microseconds, a fair share of a small call. (Set
    inside the kernel, the chunk size would keep numba from caching it.)"""
    import numba

    chunk = numba.set_parallel_chunksize(max(1, items // (4 * threads))) if items > threads else None
    if threads != all_threads:
        numba.set_num_threads(threads)
    try:
        yield
    finally:
        if threads != all_threads:
            numba.set_num_threads(all_threads)
        if chunk is not None:
            numba.set_parallel_chunksize(chunk)


class _KernelState:
    """The CPU kernels' forward-backward of a batch.

    The posteriors are computed at forward time when a gradient will be needed: the exactness
    check (:func:`ctclab.backends.numba_kernels.forward_backward`) needs the backward variables anyway, and an
    item's forward variables then live only in its thread's scratch buffer. Without a gradient
    only items whose forward pass lost mass to underflow run the backward check.

    Attributes:
        loglik: ``(B,)`` float64 numpy log-likelihood (:meth:`nll`: the loss tensor).
        tilted: ``(B,)`` bool, the items the kernels ran tilted
            (:func:`ctclab.backends.numba_kernels.item_tilt`): from the start, or after an
            untilted pass they could not vouch for.
        log_space: ``(B,)`` bool, the items the kernels recomputed in log space (after both).
        nan, finite: ``(B,)`` bool numpy, items that read a NaN score (NaN loss and
            gradient), items whose likelihood is finite (a path exists).
        classes, num_classes, state_class: the kernels' class tables, numpy
            (:func:`ctclab.backends.numba_kernels.class_tables`).
    """

    def __init__(self, trellis: CTCGraph, log_probs: Tensor, need_grad: bool, per_state: bool = False):
        from . import numba_kernels

        C = log_probs.shape[2]
        # host numpy arrays, as the kernels read them (no tensor round trips: a few microseconds each)
        self.num_classes, self.classes, self.state_class = numba_kernels.class_tables(trellis.host.labels, C)
        U = self.classes.shape[1]
        self.graph = trellis.kernel_graph(log_probs.shape[0], self.state_class)
        self.lp = log_probs.detach().contiguous()
        self.trellis = trellis
        # the kernel writes the posteriors straight into the gradient's layout (T, B, C) when the
        # vocabulary is small (backward: one multiplication in place), else compactly, (T, B, U),
        # scattered onto the classes in backward: one pass over the gradient instead of zeros
        # written in forward and a read-modify-write in backward. (Peak memory is no higher in
        # the full layout, which becomes the gradient; it is held from forward to backward.) The
        # two cost alike near C = 6 U: the full layout 3-5% faster at (50, 64, 80, 20) (C = 3.8 U),
        # the compact one 11% faster at C = 12.6 U (AMD EPYC Zen 5, medians of 150 calls each)
        self.compact = C > 4 * U
        self.per_state = per_state
        loglik, self.tilted, self.log_space, self.occupancy = self._run(need_grad)
        self.nan = np.isnan(loglik)  # the item read a NaN score: NaN loss, NaN gradient
        self.finite = np.isfinite(loglik)  # (host arrays: a torch operation on B numbers costs more)
        self.loglik = loglik

    def nll(self) -> Tensor:
        """``(B,)`` negative log-likelihood in the scores' dtype, a new tensor: the autograd
        Function's output, which the state (kept by its context) must not hold (output ->
        grad_fn -> context -> output would be a reference cycle, freed, with the posteriors'
        buffer, only when Python's garbage collector next runs)."""
        return torch.from_numpy((-self.loglik).astype(self.lp.numpy().dtype))

    def _run(self, need_grad: bool) -> tuple[np.ndarray, Tensor, Tensor, Tensor]:
        """The kernels' log-likelihoods (float64 numpy), the items they ran tilted, those they
        recomputed in log space and (with ``need_grad``) posteriors in the scores' dtype: per
        class, or per state ``(T, B, S)`` with :attr:`per_state`."""
        import numba

        from . import numba_kernels

        trellis = self.trellis
        T, B, C = self.lp.shape
        S = trellis.labels.shape[1]
        U = self.classes.shape[1]
        columns = _compact_columns(B, U) if self.compact else self.classes
        width = S if self.per_state else U if self.compact else C
        shape = (T, B, width) if need_grad else (0, 0, 0)
        # scratch per thread, and no more threads than items: one long item needs one T x S buffer
        all_threads = numba.get_num_threads()
        threads = max(1, min(all_threads, B))
        check_memory(
            8 * threads * T * (S + U) + self.lp.element_size() * math.prod(shape), self.lp.device,
            f"ctc_loss (fused, T={T}, S={S} states per item)",
            "use shorter inputs or targets (memory grows as T x (2L + 1) per item), or split the batch",
        )
        occupancy = _host_empty(shape, self.lp.dtype)  # every entry written by the kernel
        scaled = _workspace("scaled", (threads, T, max(U, 1)))
        alpha = _workspace("alpha", (threads, T, S))
        with _threads_for(threads, B, all_threads):
            loglik, _, log_space, tilted = numba_kernels.forward_backward(
                self.lp.numpy(), self.classes, columns, self.num_classes, self.graph,
                float(trellis.delay_penalty), need_grad, occupancy.numpy(), alpha, scaled,
                _MAX_UNDERFLOW_ERROR, self.per_state,
            )
        return loglik, torch.from_numpy(tilted), torch.from_numpy(log_space), occupancy

    def grad(self, grad_nll: Tensor) -> Tensor:
        """``(T, B, C)`` gradient for upstream ``(B,)`` ``grad_nll``. The posteriors' buffer
        becomes the gradient (scaled in place, no copy); a second backward through a retained
        graph recomputes them."""
        from . import numba_kernels

        occupancy = self.occupancy if self.occupancy is not None else self._run(True)[3]
        self.occupancy = None  # handed out: autograd may keep it as the .grad
        upstream = grad_nll.numpy()
        scale = torch.from_numpy(np.where(self.finite, -upstream, 0.0).astype(self.lp.numpy().dtype))
        if self.compact:
            grad = _gradient_buffer(tuple(self.lp.shape), self.lp.dtype)
            numba_kernels.scatter_posteriors(occupancy.numpy(), self.classes, self.num_classes, scale.numpy(), grad.numpy())
        else:
            grad = occupancy.mul_(scale[None, :, None])
        nan_items = self.nan & (upstream != 0)
        return with_nan_items(grad, torch.from_numpy(nan_items), self.trellis.input_lengths) if nan_items.any() else grad


def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _delay_in_range(graph: CTCGraph, log_probs: Tensor) -> bool:
    # entry weights exp(-lam (t - T/2)) must stay inside float64's range in probability space
    return graph.delay_penalty * log_probs.shape[0] / 2 < 500


class _KernelCTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs: Tensor, graph: CTCGraph) -> Tensor:
        ctx.kernel_state = _KernelState(graph, log_probs, need_grad=ctx.needs_input_grad[0])
        return ctx.kernel_state.nll()

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        return ctx.kernel_state.grad(upstream(grad_nll)), None


def loss(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    """``(B,)`` negative log-likelihood by the kernels, the true gradient in backward."""
    return _KernelCTC.apply(log_probs, graph)


def posteriors(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    """``(T, B, S)`` state occupation (:func:`ctclab.trellis.state_posteriors`) by the kernels'
    forward-backward, in the scores' dtype; items the probability-space bound cannot vouch for
    by the log-space kernels. 0 beyond an item's frames and for impossible items."""
    return _KernelState(graph, log_probs, need_grad=True, per_state=True).occupancy


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def viterbi(graph: CTCGraph, log_probs: Tensor, checkpoint_every: int | None = None) -> tuple[Tensor, Tensor]:
    """Best paths by :func:`ctclab.backends.numba_viterbi.viterbi`: ``(B, T)`` states, ``(B,)``
    path scores; checkpointed every ``checkpoint_every`` frames (None: the full backpointer
    table). Memory: :func:`ctclab._memory.viterbi_bytes` per item in flight."""
    from . import numba_viterbi

    T, B, _ = log_probs.shape
    S = graph.labels.shape[1]
    every = min(checkpoint_every or max(T, 1), max(T, 1))
    check_memory(min(B, _threads()) * viterbi_bytes(T, S, every) + 16 * B * T, log_probs.device, "forced_align",
                 "pass max_memory=<bytes> or checkpoint_every=K (memory ~ S (8 T/K + K/4) bytes per item), "
                 "or align shorter segments")
    states = torch.full((B, T), -1, dtype=torch.int64)
    path_score = torch.empty(B, dtype=torch.float64)
    numba_viterbi.viterbi(log_probs.detach().contiguous().numpy(), graph.host, graph.host_band(T), every,
                          float(graph.delay_penalty), states.numpy(), path_score.numpy())
    return states, path_score


BACKEND = register(Backend(
    "numba", frozenset({"loss", "viterbi", "posteriors"}), devices=frozenset({"cpu"}), loss=loss, viterbi=viterbi,
    posteriors=posteriors,
    accepts=_delay_in_range, available=available, runs_on=frozenset({"cpu"}), priority=20, description="CPU kernels (numba), parallel over the batch",
))
