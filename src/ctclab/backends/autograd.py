"""The autograd backend: the recursion in plain PyTorch, differentiated by autograd to any
order (:mod:`ctclab.scaled` in probability space with rescaling and its exactness guard; the
log-space recursion of :mod:`ctclab.trellis` under a delay penalty). For research on modified
recursions, double backward and Hessian-vector products."""
from __future__ import annotations

import torch
from torch import Tensor

from ..graph import CTCGraph
from ..scaled import scaled_nll
from ..trellis import log_space_nll
from . import Backend, register
from .reference import check_recursion_memory


def loss(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    check_recursion_memory(graph, log_probs, "ctc_loss (impl='autograd')")
    nll = log_space_nll(graph, log_probs) if graph.delay_penalty else scaled_nll(graph, log_probs)
    if log_probs.requires_grad and torch.is_grad_enabled() and not nll.requires_grad:
        # no item has a frame (T = 0, or every input length 0): a zero gradient, not a missing graph
        nll = nll + log_probs[:0].sum()
    return nll


BACKEND = register(Backend(
    "autograd", frozenset({"loss"}), priority=90, higher_order=True, loss=loss,
    description="the recursion differentiated by autograd (any derivative order)",
))
