"""The Triton backend: ctclab's own GPU kernels (:mod:`ctclab.backends.triton_kernels`) for the
loss (likelihood and true gradient) and the posteriors, for every topology and the delay penalty.

``'auto'`` picks it for CUDA tensors when Triton is installed (it comes with PyTorch's CUDA
wheels; ``pip install ctclab[gpu]`` otherwise). Named (``impl='triton'``) it also runs on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which
is how the tests check the kernels without a GPU. Nothing here imports Triton until a kernel runs.

Memory of the loss, beyond its input: the ``(T, B, C)`` gradient in the scores' dtype; the
forward variables, ``4 B T (W + 2)`` bytes (float32; 8 for float64 scores; ``T`` becomes 2 when
no gradient is needed), with ``W = ceil(S / tile) * tile + 2`` (``S = 2 max(L) + 1``, the tile
of :func:`_block`); and ``O(B W)`` of graph arrays (eleven int32/float32 rows, the class order
included). At the seed's shape (T, B, C, L) = (128, 256, 32, 60): 17.3 MB of forward variables,
4.2 MB of gradient, 1.5 MB of graph arrays. ATen's CUDA kernel keeps its forward variables
until backward and allocates as many backward variables there, ``2 x 4 B T S`` (31.7 MB), plus
the gradient (measured peaks on a GPU: ``benchmarks/gpu_check.py``; none here yet). The posteriors need
their ``(T, B, S)`` output and the same forward variables.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._inputs import compute_dtype
from .._memory import check_memory
from ..graph import CTCGraph
from . import Backend, register, triton_support
from .common import DOUBLE_BACKWARD_ERROR, upstream

#: Largest tile of states (a power of two); longer targets run in several tiles per frame.
MAX_BLOCK = 1024


def _block(num_states: int) -> tuple[int, int]:
    """Tile size and warps for items of ``num_states`` states: one tile up to :data:`MAX_BLOCK`,
    a thread per state up to 8 warps (each frame is a chain of dependent steps: the fewer states
    a thread owns, the shorter the chain; not tuned on a GPU yet)."""
    block = max(16, min(MAX_BLOCK, 1 << max(num_states - 1, 1).bit_length()))
    return block, max(1, min(8, block // 32))


def _check_device(log_probs: Tensor) -> None:
    device = log_probs.device.type
    if not triton_support.runs_on(device):
        if device == "cpu":
            raise ValueError("impl='triton' runs on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                             "before triton is imported, or move the tensors to a CUDA device")
        raise ValueError(f"impl='triton' runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device}")


class _Arrays:
    """The graph as the kernels read it, on the scores' device, padded to ``W`` states (a
    multiple of the tile plus two padding states, into which no move leads, so that no read
    needs a mask): ``labels`` ``(B, W)`` int32, ``moves`` ``(3, B, W)`` log-weights and
    ``entry`` ``(B, W)`` 0/1 in the compute dtype, ``flags`` ``(B, W)`` int32 (start and final
    bits), lengths ``(B,)`` int32."""

    def __init__(self, graph: CTCGraph, log_probs: Tensor, compute: torch.dtype):
        from . import triton_kernels as k

        device = log_probs.device
        self.B, self.S = graph.labels.shape
        self.T, _, self.C = log_probs.shape
        self.compute = compute
        self.block, self.warps = _block(self.S)
        self.W = -(-self.S // self.block) * self.block + 2
        pad = (0, self.W - self.S)
        self.labels = torch.nn.functional.pad(graph.labels.to(device, torch.int32), pad, value=graph.blank)
        self.moves = torch.nn.functional.pad(graph.moves.to(device, compute), pad, value=-torch.inf)
        self.entry = torch.nn.functional.pad(graph.entry.to(device, compute), pad)
        flags = graph.start.int() * k.START + graph.final.int() * k.FINAL
        self.flags = torch.nn.functional.pad(flags.to(device, torch.int32), pad)
        self.input_lengths = graph.input_lengths.to(device, torch.int32)
        self.num_states = graph.num_states.to(device, torch.int32)
        self.delay = float(graph.delay_penalty)

    def graph_args(self) -> tuple:
        return (self.labels, self.moves, self.entry, self.flags, self.input_lengths, self.num_states)

    def class_order(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, W)`` int32 each: the states sorted by class within each item (padding states
        last); each sorted state's class with :data:`~ctclab.backends.triton_kernels.LAST_BIT`
        set on the last state of its class (never on padding states); the position in that order
        where its class begins."""
        from . import triton_kernels as k

        states = torch.arange(self.W, device=self.labels.device)
        real = states < self.num_states[:, None]
        key = torch.where(real, self.labels.long(), self.C) * self.W + states
        order = key.argsort(1)
        cls = self.labels.gather(1, order)
        cut = torch.ones(self.B, self.W + 1, dtype=torch.bool, device=cls.device)
        cut[:, 1:-1] = cls[:, 1:] != cls[:, :-1]
        cut[torch.arange(self.B, device=cls.device), self.num_states.long()] = True  # after the item's last state
        code = cls | ((cut[:, 1:] & real).int() << k.LAST_BIT)
        begins = torch.where(cut[:, :-1], states, 0).cummax(1).values
        return tuple(x.to(torch.int32).contiguous() for x in (order, code, begins))


def _forward(arrays: _Arrays, log_probs: Tensor, keep: bool) -> tuple[Tensor, Tensor]:
    """``(B,)`` NLL and the forward variables (every frame's with ``keep``, else a ring of two)."""
    from . import triton_kernels as k

    rows = max(arrays.T, 1) if keep else 2
    check_memory(arrays.compute.itemsize * arrays.B * rows * (arrays.W + 2), log_probs.device,
                 f"ctc_loss (impl='triton', T={arrays.T}, S={arrays.S} states per item)",
                 "use shorter inputs or targets (memory grows as B x T x (2L + 1)), or split the batch")
    alpha = torch.full((arrays.B, rows, arrays.W + 2), -torch.inf, dtype=arrays.compute, device=log_probs.device)
    nll = torch.empty(arrays.B, dtype=arrays.compute, device=log_probs.device)
    k.ctc_forward_kernel[(arrays.B,)](
        log_probs, *log_probs.stride(), *arrays.graph_args(), alpha, rows, nll, arrays.B, arrays.W, arrays.delay,
        BLOCK=arrays.block, num_warps=arrays.warps,
    )
    return nll, alpha


def _backward(arrays: _Arrays, log_probs: Tensor, alpha: Tensor, nll: Tensor, grad_nll: Tensor | None) -> Tensor:
    """With ``grad_nll``: the ``(T, B, C)`` gradient in the scores' dtype; without: the
    ``(T, B, S)`` posteriors in the compute dtype. Overwrites ``alpha``."""
    from . import triton_kernels as k

    B, S, T, C, W = arrays.B, arrays.S, arrays.T, arrays.C, arrays.W
    device = log_probs.device
    gradient = grad_nll is not None
    if gradient:
        out = torch.zeros(T, B, C, dtype=log_probs.dtype, device=device)
        gamma = torch.empty(B, W, dtype=arrays.compute, device=device)  # one frame's posteriors per item
        gamma_strides = (0, W)
        order, code, begins = arrays.class_order()
        scale = upstream(grad_nll).to(device, arrays.compute).contiguous()
    else:
        out = gamma = torch.zeros(T, B, S, dtype=arrays.compute, device=device)
        gamma_strides = (B * S, S)
        order = code = begins = arrays.labels  # not read
        scale = nll
    k.ctc_backward_kernel[(B,)](
        log_probs, *log_probs.stride(), *arrays.graph_args(), alpha, alpha.shape[1], nll, scale, gamma,
        *gamma_strides, S, order, code, begins, out, *(out.stride() if gradient else (0, 0, 0)), B, W, C, arrays.delay,
        BLOCK=arrays.block, LOG_BLOCK=arrays.block.bit_length() - 1, GRADIENT=gradient, num_warps=arrays.warps,
    )
    return out


class _TritonCTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs: Tensor, graph: CTCGraph) -> Tensor:
        log_probs = log_probs.detach()
        arrays = _Arrays(graph, log_probs, compute_dtype(log_probs.dtype))
        nll, alpha = _forward(arrays, log_probs, keep=ctx.needs_input_grad[0])
        ctx.arrays, ctx.alpha, ctx.log_probs = arrays, alpha, log_probs
        ctx.save_for_backward(nll)  # an output kept as an attribute would be a reference cycle (output -> grad_fn -> ctx)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        # the backward pass overwrites the forward variables: a second backward (retain_graph) recomputes them
        alpha = ctx.alpha if ctx.alpha is not None else _forward(ctx.arrays, ctx.log_probs, keep=True)[1]
        ctx.alpha = None
        (nll,) = ctx.saved_tensors
        return _backward(ctx.arrays, ctx.log_probs, alpha, nll, grad_nll), None


def loss(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    """``(B,)`` negative log-likelihood (float32; float64 for float64 scores) by the Triton
    kernels, the true gradient in backward, in the scores' dtype."""
    _check_device(log_probs)
    return _TritonCTC.apply(log_probs, graph)


@torch.no_grad()
def posteriors(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    """``(T, B, S)`` state occupation by the same forward-backward."""
    _check_device(log_probs)
    arrays = _Arrays(graph, log_probs, compute_dtype(log_probs.dtype))
    check_memory(arrays.compute.itemsize * arrays.T * arrays.B * arrays.S, log_probs.device, "state_occupation",
                 "use shorter inputs or a smaller batch")
    nll, alpha = _forward(arrays, log_probs, keep=True)
    return _backward(arrays, log_probs, alpha, nll, None)


def viterbi(graph: CTCGraph, log_probs: Tensor, checkpoint_every: int | None = None) -> tuple[Tensor, Tensor]:
    """Best paths by :func:`ctclab.backends.triton_viterbi.viterbi`: ``(B, T)`` states, ``(B,)`` path scores."""
    _check_device(log_probs)
    from . import triton_viterbi

    return triton_viterbi.viterbi(graph, log_probs, checkpoint_every)


def _compiled_here(graph: CTCGraph, log_probs: Tensor) -> bool:
    """'auto' takes the compiled kernels only (not the interpreter, on a CUDA tensor)."""
    return log_probs.device.type == "cuda" and not triton_support.interpreting()


BACKEND = register(Backend(
    "triton", frozenset({"loss", "viterbi", "posteriors"}), devices=frozenset({"cuda"}), loss=loss, viterbi=viterbi,
    posteriors=posteriors,
    accepts=_compiled_here, available=triton_support.available, reads_half=True, priority=5,
    description="ctclab's Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)",
))
