"""PyTorch's own CUDA CTC kernel (cuDNN or ATen's) with its gradient made the true one: the
anchor of the GPU benchmarks (``impl='cuda-builtin'``), and ``'auto'``'s loss on CUDA only where
Triton is not installed (ctclab's Triton backend comes first).
Standard topology, no delay penalty. Runs on CPU tensors too (the built-in's CPU kernel), which
is how the test suite checks it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._inputs import frame_mask
from ..graph import CTCGraph
from . import Backend, register
from .common import DOUBLE_BACKWARD_ERROR, upstream, with_nan_items


class _CudaBuiltinCTC(torch.autograd.Function):
    """For per-item losses with upstream gradient ``g_b`` the built-in returns
    ``g_b * (exp(log_probs) - gamma)`` (its alpha and beta are those of the scores as given; only
    the ``exp`` term assumes normalised inputs), so the true gradient ``-g_b * gamma`` is that
    minus ``g_b * exp(log_probs)`` on each item's frames. Entries at ``-inf`` get 0 (their
    posterior), items without a path get 0.
    """

    @staticmethod
    def forward(ctx, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
        with torch.enable_grad():
            x = log_probs.detach().requires_grad_(True)
            nll = F.ctc_loss(x, targets, input_lengths, target_lengths, blank, reduction="none", zero_infinity=False)
        ctx.save_for_backward(x, nll, input_lengths)
        return nll.detach()

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        x, nll, input_lengths = ctx.saved_tensors
        finite = torch.isfinite(nll.detach())
        g_up = upstream(grad_nll)
        g = torch.where(finite, g_up, 0.0)
        (builtin,) = torch.autograd.grad(nll, x, g)
        inside = frame_mask(x.shape[0], input_lengths)[..., None]
        true = builtin - g[None, :, None] * x.detach().exp()
        keep = inside & finite[None, :, None] & torch.isfinite(x)
        grad = torch.where(keep, true, 0.0)
        return with_nan_items(grad, torch.isnan(nll.detach()) & (g_up != 0), input_lengths), None, None, None, None


def builtin_cuda_nll(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
    """``(B,)`` NLL by the built-in kernel with the true gradient (see :class:`_CudaBuiltinCTC`)."""
    return _CudaBuiltinCTC.apply(log_probs, targets, input_lengths, target_lengths, blank)


def loss(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    return builtin_cuda_nll(log_probs, graph.labels[:, 1::2], graph.input_lengths, graph.target_lengths, graph.blank)


BACKEND = register(Backend(
    "cuda-builtin", frozenset({"loss"}), priority=10, devices=frozenset({"cuda"}), topologies=frozenset({"standard"}),
    delay_penalty=False, loss=loss, description="PyTorch's CUDA kernel, gradient corrected (an anchor)",
))
