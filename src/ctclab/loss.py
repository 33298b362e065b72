r"""The CTC loss: ``ctc_loss`` and ``CTCLoss``, with the semantics of ``torch.nn.functional.ctc_loss``.

The maths is written once (:mod:`ctclab.graph`, :mod:`ctclab.semiring`); the backend registry
(:mod:`ctclab.backends`) picks who computes it:

* ``impl='autograd'``: the forward recursion written in PyTorch (one Python loop over time,
  vectorised over batch and states); autograd differentiates it, to any order. It runs in
  probability space with rescaling (:mod:`ctclab.scaled`); items whose underflow it cannot
  bound, and every item under a delay penalty, run in log space (:mod:`ctclab.trellis`).
* ``impl='fused'`` (``'auto'``): an explicit forward-backward; the gradient is the posterior
  occupation scattered onto the classes. Fast; first derivatives only. On CPU the numba
  kernels; on CUDA ctclab's Triton kernels (every topology and the delay penalty; PyTorch's own
  CUDA kernel with its gradient corrected where Triton is missing); elsewhere the PyTorch
  reference in log space.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from . import backends
from ._inputs import CTCBatch, Lengths, compute_dtype, ctc_batch, frame_mask
from .graph import CTCGraph, Topology, check_delay_penalty, check_topology

Reduction = Literal["none", "mean", "sum"]
#: ``impl`` names (:mod:`ctclab.backends`): "auto", "fused", "autograd", "numba", "triton", "reference", "cuda-builtin", ...
Impl = str
REDUCTIONS = ("none", "mean", "sum")


def check_options(reduction: str, impl: str) -> str:
    """Check ``reduction`` and ``impl``; returns ``impl``'s current name (:func:`ctclab.backends.check_impl`)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return backends.check_impl(impl)


def check_graph_options(topology: str, delay_penalty: float) -> None:
    """The graph's options, checked where they are stored (e.g. :class:`CTCLoss`), not at the first call."""
    check_topology(topology)
    check_delay_penalty(delay_penalty)


def batch_nll(
    batch: CTCBatch, impl: Impl = "auto", topology: Topology = "standard", delay_penalty: float = 0.0,
    graph: CTCGraph | None = None,
) -> Tensor:
    """``(B,)`` CTC negative log-likelihood of a validated batch, in the compute dtype
    (``inf`` for items without any path), by the backend ``impl`` selects (:mod:`ctclab.backends`);
    half-precision scores go to it uncast if it reads them natively (``Backend.reads_half``).
    ``graph``: the batch's graph if the caller built it already (then it fixes the topology and
    delay penalty)."""
    if graph is None:
        graph = CTCGraph.build(batch, topology, delay_penalty)
    backend = backends.select("loss", impl, graph, batch.log_probs)
    log_probs = batch.log_probs if backend.reads_half else batch.log_probs.to(compute_dtype(batch.log_probs.dtype))
    return _nan_if_pathless_item_reads_invalid(graph, batch.log_probs, backend.loss(graph, log_probs))


def _nan_if_pathless_item_reads_invalid(graph: CTCGraph, log_probs: Tensor, nll: Tensor) -> Tensor:
    """``nll`` with NaN (loss and gradient) for the items that have no path at all (their
    target cannot fit their frames: ``inf``, or 0 under ``zero_infinity``) but whose frames hold
    NaN or ``+inf`` in a class they read (a target class or blank), as the built-in gives: an
    ``inf`` (or 0) there would hide that the model emitted NaN. Items with paths get their NaN
    from the backends (where a state on the band reads it)."""
    if graph.all_feasible:
        return nll
    pathless = ~graph.feasible
    items = pathless.nonzero()[:, 0]
    T = log_probs.shape[0]
    read = log_probs[:, items].gather(2, graph.labels[items].unsqueeze(0).expand(T, -1, -1))  # (T, n, S)
    invalid = frame_mask(T, graph.input_lengths[items])[..., None] & (torch.isnan(read) | (read == torch.inf))
    bad = invalid.any(2).any(0)
    if not bool(bad.any()):
        return nll
    # NaN whose gradient is NaN at the invalid scores (and 0 elsewhere)
    poison = torch.where(invalid[:, bad], read[:, bad], 0.0).sum((0, 2)) * math.nan
    return nll.index_put((items[bad],), poison.to(nll.dtype))


def reduce_losses(losses: Tensor, target_lengths: Tensor, reduction: str, zero_infinity: bool) -> Tensor:
    """Apply ``zero_infinity`` and the reduction exactly as ``torch.nn.functional.ctc_loss`` does:
    'mean' divides each loss by its target length (clamped to >= 1), then averages over the batch."""
    if zero_infinity:
        losses = torch.where(torch.isinf(losses), torch.zeros((), dtype=losses.dtype, device=losses.device), losses)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return (losses / target_lengths.clamp(min=1).to(losses.dtype)).mean()


def ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    reduction: Reduction = "mean",
    zero_infinity: bool = False,
    impl: Impl = "auto",
    *,
    topology: Topology = "standard",
    delay_penalty: float = 0.0,
) -> Tensor:
    r"""Connectionist Temporal Classification loss (Graves et al. 2006).

    :math:`\mathcal{L} = -\log \sum_{\pi \in \mathcal{B}^{-1}(l)} \prod_t y_t(\pi_t)`, the negative
    log of the total score of all alignments :math:`\pi` of frames to the blank-extended target.

    Args:
        log_probs: ``(T, B, C)`` or unbatched ``(T, C)`` log-scores, time-major. Any float dtype:
            float16 and bfloat16 are computed in float32 and the loss is returned in the input dtype.
            They need not be normalised: the gradient is the true one for any log-scores.
        targets: padded ``(B, S)``, concatenated ``(sum(target_lengths),)``, or unbatched ``(S,)``
            class indices in ``[0, C)``, never ``blank``.
        input_lengths: ``(B,)`` frames of each item (int tensor on any device, or a sequence).
        target_lengths: ``(B,)`` labels of each item.
        blank: index of the blank class.
        reduction: ``'none'`` -> ``(B,)``; ``'sum'``; ``'mean'``: each loss divided by its target
            length (clamped to >= 1), then averaged over the batch.
        zero_infinity: replace infinite losses (targets that cannot fit in their frames) and their
            gradients by zero.
        impl: the backend (:mod:`ctclab.backends`): ``'auto'`` (= ``'fused'``: the fastest
            explicit forward-backward, first derivatives only — the numba kernels on CPU),
            ``'autograd'`` (the recursion differentiated by autograd: pass it for higher-order
            gradients and for research on modified recursions), or a backend by name
            (``'numba'``, ``'triton'``, ``'reference'``, ``'cuda-builtin'``).
        topology: a name in :data:`ctclab.graph.TOPOLOGIES`: ``'standard'`` (Graves),
            ``'modified'`` (k2's: the skip over a blank is allowed between equal labels too),
            ``'selfless'`` and ``'minimal'`` (Laptev et al. 2022: no self-loops on labels).
        delay_penalty: ``lam`` >= 0 of the delay penalty (k2 / icefall): every transition into a
            label state at frame t is weighted by ``exp(-lam * (t - T_b / 2))``, favouring early
            emissions; self-loops are unchanged. 0 is plain CTC.

    Returns:
        The loss, a scalar or ``(B,)`` for ``reduction='none'`` (a scalar for unbatched input),
        in the dtype of ``log_probs``. Items whose target cannot fit give ``inf`` (0 with
        ``zero_infinity``) with zero gradient.

    Gradient:
        :math:`\partial \mathcal{L} / \partial \log y_t(k) = -\gamma_t(k)`, the posterior occupation
        of class ``k`` at frame ``t``: the true gradient for any log-scores.
        ``torch.nn.functional.ctc_loss`` instead returns :math:`\exp(\log y_t(k)) - \gamma_t(k)`,
        which is the gradient of ``ctc_loss(log_softmax(x))`` with respect to the logits ``x`` folded
        into ``log_probs``: equal to the true gradient *after* a ``log_softmax`` (the chain rule
        adds the missing term), wrong for unnormalised scores. Gradients through ``log_softmax``
        agree between ctclab and the built-in.

    Raises:
        TypeError / ValueError: naming the argument, for wrong ranks, dtypes, batch sizes, lengths
            out of range, target values outside ``[0, C)`` or equal to ``blank``, unknown
            ``reduction`` or ``impl``.

    References:
        A. Graves, S. Fernández, F. Gomez, J. Schmidhuber. "Connectionist Temporal
        Classification: Labelling Unsegmented Sequence Data with Recurrent Neural Networks",
        ICML 2006, section 4.1.
    """
    impl = check_options(reduction, impl)
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    losses = batch_nll(batch, impl, topology, delay_penalty)
    loss = reduce_losses(losses, batch.target_lengths, reduction, zero_infinity)
    if batch.unbatched and reduction == "none":
        loss = loss.squeeze(0)
    return loss.to(log_probs.dtype)


class CTCLoss(nn.Module):
    """``nn.Module`` form of :func:`ctc_loss`; ``forward(log_probs, targets, input_lengths, target_lengths)``."""

    def __init__(
        self, blank: int = 0, reduction: Reduction = "mean", zero_infinity: bool = False, impl: Impl = "auto",
        *, topology: Topology = "standard", delay_penalty: float = 0.0,
    ):
        super().__init__()
        impl = check_options(reduction, impl)
        check_graph_options(topology, delay_penalty)
        self.blank = blank
        self.reduction = reduction
        self.zero_infinity = zero_infinity
        self.impl = impl
        self.topology = topology
        self.delay_penalty = delay_penalty

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths: Lengths, target_lengths: Lengths) -> Tensor:
        return ctc_loss(
            log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction, self.zero_infinity, self.impl,
            topology=self.topology, delay_penalty=self.delay_penalty,
        )

    def extra_repr(self) -> str:
        return (
            f"blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity}, impl={self.impl!r}, "
            f"topology={self.topology!r}, delay_penalty={self.delay_penalty}"
        )
