"""The reference backend: the PyTorch recursions in log space (:mod:`ctclab.trellis`), on any
device. Loss by an explicit forward-backward (first derivatives), Viterbi by the max semiring,
posteriors by forward times backward. The other backends are tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._memory import check_memory
from ..graph import NEG, CTCGraph
from ..semiring import MaxTimes, forward
from ..trellis import class_posteriors, is_impossible, log_alpha, log_likelihood, state_posteriors
from . import Backend, register
from .common import DOUBLE_BACKWARD_ERROR, upstream, with_nan_items


def check_recursion_memory(graph: CTCGraph, log_probs: Tensor, what: str, copies: int = 3) -> None:
    """The PyTorch recursions keep ``copies`` ``(T, B, S)`` tensors or more: refuse a call that
    cannot fit (:func:`ctclab._memory.check_memory`)."""
    T, B, S = log_probs.shape[0], *graph.labels.shape
    check_memory(copies * T * B * S * log_probs.element_size(), log_probs.device, f"{what} (T={T}, B={B}, S={S} states)",
                 "use shorter inputs or a smaller batch")


class _LogSpaceCTC(torch.autograd.Function):
    """Forward: alpha without autograd's graph; backward: the posteriors (the true gradient,
    ``-gamma``, for any log-scores)."""

    @staticmethod
    def forward(ctx, log_probs: Tensor, graph: CTCGraph) -> Tensor:
        ctx.graph = graph
        ctx.num_classes = log_probs.shape[2]
        emissions = graph.emissions(log_probs)
        alphas = log_alpha(graph, emissions)
        ctx.save_for_backward(emissions, alphas)
        ll = log_likelihood(graph, alphas)
        return torch.where(is_impossible(ll), torch.inf, -ll)

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        grad_nll = upstream(grad_nll)
        emissions, alphas = ctx.saved_tensors
        gamma = state_posteriors(ctx.graph, emissions, alphas).nan_to_num_(nan=0.0)
        grad = class_posteriors(ctx.graph, gamma, ctx.num_classes).mul_(-grad_nll[None, :, None])
        nan_items = torch.isnan(log_likelihood(ctx.graph, alphas)) & (grad_nll != 0)
        return with_nan_items(grad, nan_items, ctx.graph.input_lengths), None


def loss(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    """``(B,)`` negative log-likelihood, explicit forward-backward in log space."""
    check_recursion_memory(graph, log_probs, "ctc_loss (impl='reference')")
    return _LogSpaceCTC.apply(log_probs, graph)


class _Frames:
    """The emissions of each frame on demand, float64 (a ``(T, B, S)`` table would cost 64 bits
    per state and frame; the backpointers cost 2)."""

    def __init__(self, graph: CTCGraph, log_probs: Tensor):
        self.graph, self.log_probs = graph, log_probs

    def __len__(self) -> int:
        return self.log_probs.shape[0]

    def __getitem__(self, t: int) -> Tensor:
        return self.log_probs[t].gather(1, self.graph.labels).double().clamp(min=NEG)


def viterbi(graph: CTCGraph, log_probs: Tensor, checkpoint_every: int | None = None) -> tuple[Tensor, Tensor]:
    """Batched Viterbi in float64: :func:`ctclab.semiring.forward` in the max semiring, its
    winning moves packed 2 bits per state; the CPU kernel's reference. ``(T, B, C)`` log-probs
    -> ``(B, T)`` states, ``(B,)`` path scores. Memory: the packed backpointers,
    ``T * B * S / 4`` bytes (``checkpoint_every`` is the kernel's; not used here)."""
    T, B, _ = log_probs.shape
    S = graph.labels.shape[1]
    device = log_probs.device
    check_memory(T * B * ((S + 3) // 4 + 8) + 64 * B * S, device, "forced_align (impl='reference')",
                 "align shorter segments (the CPU kernel also takes checkpoint_every)")
    # an item without frames has the empty path if its target is empty, else none
    no_frames = torch.where(graph.target_lengths == 0, 0.0, NEG).double()
    if T == 0:
        return torch.full((B, 0), -1, dtype=torch.int64, device=device), no_frames
    width = (S + 3) // 4
    packed = torch.zeros(T, B, width, dtype=torch.uint8, device=device)
    shifts = (2 * torch.arange(4, device=device)).repeat(width)[:S].to(torch.uint8)
    semiring = MaxTimes()
    last = torch.full((B, S), NEG, dtype=torch.float64, device=device)

    def visit(t: int, inflow: Tensor, delta: Tensor) -> Tensor:
        nonlocal last
        if t:  # the winning move into each state (first maximum: skip > advance > stay)
            codes = F.pad(semiring.moves.to(torch.uint8) << shifts, (0, 4 * width - S))
            packed[t] = codes.view(B, width, 4).sum(-1, dtype=torch.uint8)
        last = torch.where(graph.input_lengths[:, None] == t + 1, delta, last)
        return delta

    forward(graph, _Frames(graph, log_probs), semiring, visit)
    # the best final state; ties: the highest (the final blank before the last label)
    best = torch.where(graph.final, last, NEG).flip(1).max(1)
    state = S - 1 - best.indices
    path_score = torch.where(graph.input_lengths == 0, no_frames, best.values)
    states = torch.full((B, T), -1, dtype=torch.int64, device=device)
    items = torch.arange(B, device=device)
    for t in range(T - 1, -1, -1):
        inside = t < graph.input_lengths
        states[:, t] = torch.where(inside, state, -1)
        code = (packed[t, items, state.clamp(min=0) >> 2] >> (2 * (state.clamp(min=0) & 3)).to(torch.uint8)) & 3
        state = torch.where(inside & (t > 0), state - (2 - code.long()), state)
    return states, path_score


@torch.no_grad()
def posteriors(graph: CTCGraph, log_probs: Tensor) -> Tensor:
    """``(T, B, S)`` state occupation by forward times backward in log space."""
    check_recursion_memory(graph, log_probs, "state_occupation", copies=4)
    return state_posteriors(graph, graph.emissions(log_probs))


BACKEND = register(Backend(
    "reference", frozenset({"loss", "viterbi", "posteriors"}), priority=50, loss=loss, viterbi=viterbi, posteriors=posteriors,
    description="the PyTorch recursions in log space, any device",
))
