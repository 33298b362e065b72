"""``impl='fused'``: explicit forward-backward as a ``torch.autograd.Function``.

The forward pass runs the alpha recursion without autograd; the backward pass runs beta and
returns the posterior occupation scattered onto the classes. On CPU a numba kernel
(:mod:`ctclab._kernels`) does the same in probability space with per-frame rescaling; the
pure-PyTorch log-space version here runs on every device and is the kernel's reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .trellis import CTCTrellis, class_posteriors, is_impossible, log_alpha, log_likelihood, state_posteriors

DOUBLE_BACKWARD_ERROR = (
    "impl='fused' computes first derivatives only; pass impl='autograd' to ctclab.ctc_loss for "
    "double backward, Hessian-vector products or create_graph=True"
)


class _FusedCTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs: Tensor, trellis: CTCTrellis) -> Tensor:
        emissions = trellis.emissions(log_probs)
        alphas = log_alpha(trellis, emissions)
        ll = log_likelihood(trellis, alphas)
        ctx.trellis = trellis
        ctx.num_classes = log_probs.shape[2]
        ctx.save_for_backward(emissions, alphas)
        return torch.where(is_impossible(ll), torch.inf, -ll)

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        emissions, alphas = ctx.saved_tensors
        gamma = state_posteriors(ctx.trellis, emissions, alphas)
        grad = class_posteriors(ctx.trellis, gamma, ctx.num_classes)
        return grad.mul_(-torch.nan_to_num(grad_nll, posinf=0.0, neginf=0.0)[None, :, None]), None


def fused_nll(trellis: CTCTrellis, log_probs: Tensor) -> Tensor:
    """``(B,)`` negative log-likelihood with the explicit forward-backward gradient."""
    return _FusedCTC.apply(log_probs, trellis)
