r"""The log semiring's transition as one Triton kernel each way: the per-frame step of the
research path (``impl='autograd'``) on CUDA.

The readable recursion (:func:`ctclab.semiring.forward` in the log semiring) runs each frame as
:func:`ctclab.semiring.predecessors` (a pad, a stack, an add) and a log-sum-exp over the three
moves (max, subtract, clamp, exp, sum, log, add): about ten kernel launches a frame forward and
as many backward. On a GPU each launch costs microseconds of host time while the arithmetic
costs nanoseconds, so the research path ran ~45x slower than the built-in at the seed's shape.
:data:`FUSED_LOG` is the same semiring whose :meth:`~FusedLogSemiring.transition` is
:class:`LogTransition`: one launch forward, one backward, computing

.. math::
    \text{out}(s) = \log \sum_{m \in \{\text{skip}, \text{advance}, \text{stay}\}}
        e^{\alpha(s - d_m) + w^m(s)}, \qquad
    \frac{\partial L}{\partial \alpha(s)} = \sum_m g(s + d_m)\, e^{\alpha(s) + w^m(s + d_m) - \text{out}(s + d_m)}

with :math:`d = (2, 1, 0)` and the readable version's conventions (a missing predecessor counts
:data:`ctclab.graph.NEG`; differences below ``log(tiny) + 1`` are clamped before ``exp``; NaN
propagates). What the recursion computes is unchanged: the graph, the emissions, the loop over
frames and the likelihood are the readable code's; only the step is compiled.

Higher derivatives: the fused backward is used when no graph of the backward is being built
(``create_graph=False``, what training does). When one is (double backward, Hessian-vector
products), :class:`LogTransition`'s backward differentiates the readable step
(:meth:`ctclab.semiring.LogSemiring.transition`) instead, so every derivative order is that of
the readable recursion. So is the gradient with respect to move weights that require one (a
learned topology): the readable step runs then.

Elementwise kernels over the ``B * S`` states of a frame, ``BLOCK`` states a program: the
shifted reads ``alpha(s - 1)``, ``alpha(s - 2)`` (forward), ``g(s + 1)``, ``g(s + 2)`` (backward)
are masked at the item's row ends (a missing predecessor is set to ``NEG`` after the load, in the
accumulation type: a load's ``other`` would round it through float32). Arithmetic in float32
(float64 for float64 variables); variables are stored in their own dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..graph import NEG as _NEG_VALUE
from ..semiring import LogSemiring, log_sum_floor

NEG = tl.constexpr(_NEG_VALUE)
#: States per program.
BLOCK = 512


@triton.jit
def _max(a, b):
    """``max(a, b)``, NaN if either is (like ``torch.amax`` and ``clamp``)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _arrivals(alpha_ptr, weights_ptr, i, s, inside, BS):
    """What arrives in flat state ``i`` (state ``s`` of its item) by skip, advance, stay:
    ``alpha(s - d_m) + w^m(s)``, in the accumulation type."""
    acc_ty = tl.float64 if alpha_ptr.dtype.element_ty == tl.float64 else tl.float32
    a0 = tl.load(alpha_ptr + i, mask=inside, other=0.0).to(acc_ty)
    a1 = tl.where(s >= 1, tl.load(alpha_ptr + i - 1, mask=inside & (s >= 1), other=0.0).to(acc_ty), NEG)
    a2 = tl.where(s >= 2, tl.load(alpha_ptr + i - 2, mask=inside & (s >= 2), other=0.0).to(acc_ty), NEG)
    skip = a2 + tl.load(weights_ptr + i, mask=inside, other=0.0).to(acc_ty)
    advance = a1 + tl.load(weights_ptr + BS + i, mask=inside, other=0.0).to(acc_ty)
    stay = a0 + tl.load(weights_ptr + 2 * BS + i, mask=inside, other=0.0).to(acc_ty)
    return skip, advance, stay


@triton.jit(do_not_specialize=["BS", "S"])
def log_transition_kernel(alpha_ptr, weights_ptr, out_ptr, BS, S, floor, BLOCK: tl.constexpr):
    """``out(s) = log sum_m exp(alpha(s - d_m) + w^m(s))`` for the ``BS = B * S`` states of one
    frame: ``alpha`` ``(B, S)``, ``weights`` ``(3, B, S)`` (skip, advance, stay), contiguous."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < BS
    skip, advance, stay = _arrivals(alpha_ptr, weights_ptr, i, i % S, inside, BS)
    shift = _max(_max(skip, advance), stay)
    total = tl.exp(_max(skip - shift, floor)) + tl.exp(_max(advance - shift, floor)) + tl.exp(_max(stay - shift, floor))
    tl.store(out_ptr + i, (tl.log(total) + shift).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _share(g_ptr, out_ptr, x, j, ok, floor):
    """``g(j) exp(max(x - out(j), floor))``: what state ``j``'s upstream gradient sends back
    along the move whose arrival is ``x``; 0 where there is no state ``j``."""
    g = tl.load(g_ptr + j, mask=ok, other=0.0).to(x.dtype)
    out = tl.load(out_ptr + j, mask=ok, other=0.0).to(x.dtype)
    return tl.where(ok, g * tl.exp(_max(x - out, floor)), 0.0)


@triton.jit(do_not_specialize=["BS", "S"])
def log_transition_backward_kernel(alpha_ptr, weights_ptr, out_ptr, g_ptr, grad_ptr, BS, S, floor,
                                   BLOCK: tl.constexpr):
    """``grad(s) = sum_m g(s + d_m) exp(alpha(s) + w^m(s + d_m) - out(s + d_m))``: the
    gradient of :func:`log_transition_kernel` with respect to ``alpha``, given the upstream
    ``g`` and the forward's ``out`` (all ``(B, S)``, contiguous)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < BS
    s = i % S
    acc_ty = tl.float64 if alpha_ptr.dtype.element_ty == tl.float64 else tl.float32
    a = tl.load(alpha_ptr + i, mask=inside, other=0.0).to(acc_ty)
    one, two = inside & (s + 1 < S), inside & (s + 2 < S)
    stay = a + tl.load(weights_ptr + 2 * BS + i, mask=inside, other=0.0).to(acc_ty)
    advance = a + tl.load(weights_ptr + BS + i + 1, mask=one, other=0.0).to(acc_ty)
    skip = a + tl.load(weights_ptr + i + 2, mask=two, other=0.0).to(acc_ty)
    grad = (_share(g_ptr, out_ptr, skip, i + 2, two, floor) + _share(g_ptr, out_ptr, advance, i + 1, one, floor)
            + _share(g_ptr, out_ptr, stay, i, inside, floor))
    tl.store(grad_ptr + i, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _grid(alpha: Tensor) -> tuple[int]:
    return (triton.cdiv(alpha.numel(), BLOCK),)


class LogTransition(torch.autograd.Function):
    """``(B, S)`` log forward variables and ``(3, B, S)`` move log-weights -> ``(B, S)``
    :meth:`ctclab.semiring.LogSemiring.transition`, one kernel each way (module docstring)."""

    @staticmethod
    def forward(ctx, alpha: Tensor, weights: Tensor) -> Tensor:
        out = torch.empty_like(alpha, memory_format=torch.contiguous_format)
        if alpha.numel():
            log_transition_kernel[_grid(alpha)](alpha.contiguous(), weights.to(alpha.dtype).contiguous(), out,
                                                alpha.numel(), alpha.shape[1], log_sum_floor(alpha.dtype), BLOCK=BLOCK)
        ctx.save_for_backward(alpha, weights, out)  # the inputs themselves: double backward needs their history
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        alpha, weights, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the readable step's derivative, to any order
            with torch.enable_grad():
                readable = LogSemiring.transition(FUSED_LOG, alpha, weights)
            return torch.autograd.grad(readable, alpha, grad, create_graph=True)[0], None
        grad_alpha = torch.empty_like(alpha, memory_format=torch.contiguous_format)
        if alpha.numel():
            log_transition_backward_kernel[_grid(alpha)](
                alpha.contiguous(), weights.to(alpha.dtype).contiguous(), out, grad.to(alpha.dtype).contiguous(),
                grad_alpha, alpha.numel(), alpha.shape[1], log_sum_floor(alpha.dtype), BLOCK=BLOCK)
        return grad_alpha, None


class FusedLogSemiring(LogSemiring):
    """The log semiring with the transition fused into one kernel each way (:class:`LogTransition`);
    the readable step where the move weights require a gradient."""

    def transition(self, alpha: Tensor, weights: Tensor) -> Tensor:
        if weights.requires_grad:
            return super().transition(alpha, weights)
        return LogTransition.apply(alpha, weights)


FUSED_LOG = FusedLogSemiring()
