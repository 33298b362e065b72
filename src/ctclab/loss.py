r"""The CTC loss: ``ctc_loss`` and ``CTCLoss``, with the semantics of ``torch.nn.functional.ctc_loss``.

Two implementations of the same maths, both built on :mod:`ctclab.trellis`:

* ``impl='autograd'``: the forward recursion written in PyTorch (one Python loop over time,
  vectorised over batch and states); autograd differentiates it, to any order. It runs in
  probability space with rescaling (:mod:`ctclab.scaled`); items whose underflow it cannot
  bound, and every item under a delay penalty, run in log space (:mod:`ctclab.trellis`).
* ``impl='fused'``: an explicit forward-backward (:mod:`ctclab._fused`); the gradient is the
  posterior occupation scattered onto the classes. Fast; first derivatives only. On CPU the
  numba kernels; on CUDA (standard topology, no delay penalty) PyTorch's own CUDA kernel with
  its gradient corrected to the true one; elsewhere the pure-PyTorch log-space recursion.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ._inputs import CTCBatch, Lengths, ctc_batch
from ._memory import check_memory
from .scaled import negative_log_likelihood as scaled_nll
from .trellis import TOPOLOGIES, CTCTrellis, Topology, check_delay_penalty
from .trellis import negative_log_likelihood as trellis_nll

Reduction = Literal["none", "mean", "sum"]
Impl = Literal["auto", "autograd", "fused"]
REDUCTIONS = ("none", "mean", "sum")
IMPLS = ("auto", "autograd", "fused")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32 and float64 as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_options(reduction: str, impl: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_graph_options(topology: str, delay_penalty: float) -> None:
    """The trellis's options, checked where they are stored (e.g. :class:`CTCLoss`), not at the first call."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    check_delay_penalty(delay_penalty)


def negative_log_likelihood(
    batch: CTCBatch, impl: Impl = "auto", topology: Topology = "standard", delay_penalty: float = 0.0
) -> Tensor:
    """``(B,)`` CTC negative log-likelihood of a validated batch, in the compute dtype
    (``inf`` for items without any path)."""
    from ._fused import builtin_cuda_nll, fused_nll

    log_probs = batch.log_probs.to(compute_dtype(batch.log_probs.dtype))
    if impl != "autograd" and log_probs.device.type == "cuda" and topology == "standard" and not delay_penalty:
        # PyTorch's CUDA kernel is tens of times faster than a Python loop over time on a GPU;
        # its gradient is corrected to the true one (no trellis needed)
        return builtin_cuda_nll(log_probs, batch.targets, batch.input_lengths, batch.target_lengths, batch.blank)
    trellis = CTCTrellis.build(batch, topology, delay_penalty)
    if impl == "autograd" or log_probs.device.type != "cpu":
        # autograd keeps each frame's (B, S) forward variables and more; so does the log-space
        # forward-backward of other devices (the CPU kernels check their own scratch)
        T, B, S = log_probs.shape[0], *trellis.labels.shape
        check_memory(3 * T * B * S * log_probs.element_size(), log_probs.device,
                     f"ctc_loss (impl={impl!r}, T={T}, B={B}, S={S} states)",
                     "use shorter inputs or a smaller batch" + (" (or impl='fused' on CPU)" if impl == "autograd" else ""))
    if impl != "autograd":
        return fused_nll(trellis, log_probs)
    nll = trellis_nll(trellis, log_probs) if delay_penalty else scaled_nll(trellis, log_probs)
    if log_probs.requires_grad and torch.is_grad_enabled() and not nll.requires_grad:
        # no item has a frame (T = 0, or every input length 0): a zero gradient, not a missing graph
        nll = nll + log_probs[:0].sum()
    return nll


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
        impl: ``'fused'`` (explicit forward-backward, fastest, first derivatives only),
            ``'autograd'`` (recursion differentiated by autograd: pass it for higher-order
            gradients and for research on modified recursions) or ``'auto'`` (= ``'fused'``).
        topology: ``'standard'`` (Graves) or ``'modified'`` (k2's modified CTC topology, Laptev
            et al. 2022: the skip over a blank is allowed between equal labels too).
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
    check_options(reduction, impl)
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank)
    losses = negative_log_likelihood(batch, impl, topology, delay_penalty)
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
        check_options(reduction, impl)
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
