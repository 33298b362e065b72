"""The autograd backend: the recursion in plain PyTorch, differentiated by autograd to any
order. For research on modified recursions, double backward and Hessian-vector products.

On CPU, :mod:`ctclab.scaled`: probability space with rescaling and its exactness guard (a few
multiply-adds a frame; items the guard cannot vouch for again in float64, then in log space),
and the log-space recursion of :mod:`ctclab.trellis` under a delay penalty. On CUDA with Triton,
the log-space recursion with its per-frame step fused into one kernel each way
(:mod:`ctclab.backends.triton_step`): a GPU's cost is launches, not arithmetic, and log space
needs no guard, no host synchronisation per frame and no fallback."""
from __future__ import annotations

import torch
from torch import Tensor

from ..graph import CTCGraph
from ..scaled import scaled_nll
from ..trellis import log_space_nll
from . import Backend, register, triton_support
from .reference import check_recursion_memory


def fused_steps(device: torch.device) -> bool:
    """Whether the recursion runs with fused steps on ``device``: CUDA tensors with Triton
    compiled (not interpreted)."""
    return device.type == "cuda" and triton_support.runs_on("cuda")


def loss(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    check_recursion_memory(graph, log_probs, "ctc_loss (impl='autograd')")
    if fused_steps(log_probs.device):
        from .triton_step import FUSED_LOG

        nll = log_space_nll(graph, log_probs, FUSED_LOG)
    elif graph.delay_penalty:
        nll = log_space_nll(graph, log_probs)
    else:
        nll = scaled_nll(graph, log_probs)
    if log_probs.requires_grad and torch.is_grad_enabled() and not nll.requires_grad:
        # no item has a frame (T = 0, or every input length 0): a zero gradient, not a missing graph
        nll = nll + log_probs[:0].sum()
    return nll


BACKEND = register(Backend(
    "autograd", frozenset({"loss"}), priority=90, higher_order=True, loss=loss,
    description="the recursion differentiated by autograd (any derivative order)",
))
