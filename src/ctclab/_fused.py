"""``impl='fused'``: explicit forward-backward as a ``torch.autograd.Function``.

The forward pass computes alpha without autograd; the backward pass computes beta and returns
the posterior occupation scattered onto the classes (the true gradient, for any log-scores).
On CPU the numba kernels of :mod:`ctclab._kernels` run the recursion (probability space,
rescaled per frame, parallel over the batch; they compute beta at forward time, see
:class:`_KernelState`); items whose underflow they cannot bound, and every other device, use
the pure-PyTorch log-space recursion of :mod:`ctclab.trellis`, which is also their reference.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from ._inputs import frame_mask
from ._memory import check_memory
from .trellis import (
    CTCTrellis,
    class_posteriors,
    is_impossible,
    log_alpha,
    log_likelihood,
    negative_log_likelihood,
    state_posteriors,
)

DOUBLE_BACKWARD_ERROR = (
    "impl='fused' computes first derivatives only; pass impl='autograd' to ctclab.ctc_loss for "
    "double backward, Hessian-vector products or create_graph=True"
)


def _log_space_grad(trellis: CTCTrellis, log_probs: Tensor) -> Tensor:
    """``(T, B, C)`` posterior occupation of each class (= -d nll / d log_probs)."""
    gamma = state_posteriors(trellis, trellis.emissions(log_probs))
    return class_posteriors(trellis, gamma, log_probs.shape[2])


#: Largest relative error from underflow (bounded by :func:`ctclab._kernels.forward_backward`) that an
#: item may carry before it is recomputed in log space.
_MAX_UNDERFLOW_ERROR = 1e-13


_scratch = threading.local()


def _workspace(name: str, shape: tuple[int, ...]) -> Tensor:
    """A float64 scratch tensor of ``shape``, reused across calls of the same thread: the kernels'
    forward variables and scaled emissions live only during one forward, and fresh pages each
    call cost page faults."""
    numel = math.prod(shape)
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float64)
        setattr(_scratch, name, buffer)
    return buffer[:numel].view(shape)


class _KernelState:
    """The CPU kernels' forward-backward of a batch.

    The posteriors are computed at forward time when a gradient will be needed: the exactness
    check (:func:`ctclab._kernels.forward_backward`) needs the backward variables anyway, and an
    item's forward variables then live only in its thread's scratch buffer. Without a gradient
    only items whose forward pass lost mass to underflow run the backward check."""

    def __init__(self, trellis: CTCTrellis, log_probs: Tensor, need_grad: bool):
        from . import _kernels

        C = log_probs.shape[2]
        self.num_classes, self.classes, self.state_class = map(
            torch.from_numpy, _kernels.class_tables(trellis.labels.numpy(), C)
        )
        U = self.classes.shape[1]
        self.skip = torch.nn.functional.pad(trellis.skip.double(), (0, 2))
        self.lp = log_probs.detach().contiguous()
        self.trellis = trellis
        # the kernel writes the posteriors straight into the gradient's layout (T, B, C) when the
        # vocabulary is small (backward: one multiplication), else compactly, (T, B, U), scattered
        # onto the classes in backward (a (T, B, C) buffer held from forward to backward would
        # double the loss's memory for vocabularies of thousands)
        self.compact = C > 2 * U
        loglik, error, self.occupancy = self._run(need_grad)
        # underflow that may matter, or a vanished score where a path exists: log space
        self.redo = error > _MAX_UNDERFLOW_ERROR
        vanished = loglik == -torch.inf
        if bool(vanished.any()):
            self.redo |= vanished & trellis.feasible
        self.nan = torch.isnan(loglik)  # the item read a NaN score: NaN loss, NaN gradient
        nll = (-loglik).to(log_probs.dtype)
        if bool(self.redo.any()):
            nll[self.redo] = negative_log_likelihood(trellis.select(self.redo), log_probs[:, self.redo])
        self.nll = nll

    def _run(self, need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The kernels' log-likelihoods, error bounds and (with ``need_grad``) posteriors."""
        import numba

        from . import _kernels

        trellis = self.trellis
        T, B, C = self.lp.shape
        S = trellis.labels.shape[1]
        U = self.classes.shape[1]
        columns = torch.arange(U).expand(B, U).contiguous() if self.compact else self.classes
        shape = (T, B, U if self.compact else C) if need_grad else (0, 0, 0)
        # scratch per thread, and no more threads than items: one long item needs one T x S buffer
        threads = max(1, min(numba.get_num_threads(), B))
        check_memory(
            8 * threads * T * (S + U) + self.lp.element_size() * math.prod(shape), self.lp.device,
            f"ctc_loss (fused, T={T}, S={S} states per item)",
            "use shorter inputs or targets (memory grows as T x (2L + 1) per item), or split the batch",
        )
        occupancy = torch.empty(shape, dtype=self.lp.dtype)  # every entry written by the kernel
        scaled = _workspace("scaled", (threads, T, max(U, 1)))
        alpha = _workspace("alpha", (threads, T, S))
        # items handed out one at a time to whichever thread is free: a thread slowed by a busy
        # neighbour no longer holds up the other's last items
        chunk = numba.set_parallel_chunksize(1)
        all_threads = numba.get_num_threads()
        numba.set_num_threads(threads)  # thread ids index the scratch: at most `threads` of them
        try:
            loglik, error = map(torch.from_numpy, _kernels.forward_backward(
                self.lp.numpy(), self.classes.numpy(), columns.numpy(), self.num_classes.numpy(), self.skip.numpy(),
                self.state_class.numpy(), trellis.num_states.numpy(), trellis.input_lengths.numpy(),
                float(trellis.delay_penalty), need_grad, occupancy.numpy(), alpha.numpy(), scaled.numpy(),
            ))
        finally:
            numba.set_num_threads(all_threads)
            numba.set_parallel_chunksize(chunk)
        return loglik, error, occupancy

    def grad(self, grad_nll: Tensor) -> Tensor:
        """``(T, B, C)`` gradient for upstream ``(B,)`` ``grad_nll``. The posteriors' buffer
        becomes the gradient (scaled in place, no copy); a second backward through a retained
        graph recomputes them."""
        from . import _kernels

        occupancy = self.occupancy if self.occupancy is not None else self._run(True)[2]
        self.occupancy = None  # handed out: autograd may keep it as the .grad
        scale = -torch.where(torch.isfinite(self.nll), grad_nll, 0.0).to(self.lp.dtype)
        if self.compact:
            grad = torch.empty_like(self.lp)
            _kernels.scatter_posteriors(
                occupancy.numpy(), self.classes.numpy(), self.num_classes.numpy(), scale.numpy(), grad.numpy()
            )
        else:
            grad = occupancy.mul_(scale[None, :, None])
        redo = self.redo & (grad_nll != 0)
        if bool(redo.any()):
            sub = -_log_space_grad(self.trellis.select(redo), self.lp[:, redo])
            grad[:, redo] = sub * grad_nll[redo].to(sub.dtype)[None, :, None]
        return with_nan_items(grad, self.nan & (grad_nll != 0), self.trellis.input_lengths)


def with_nan_items(grad: Tensor, nan_items: Tensor, input_lengths: Tensor) -> Tensor:
    """``grad`` ``(T, B, C)`` with NaN on every frame of the ``(B,)`` ``nan_items`` (items whose
    loss is NaN because a score they read is NaN), as the built-in has it: a NaN loss must not
    come with a finite gradient. Items whose upstream gradient is 0 (masked out) keep 0."""
    if not bool(nan_items.any()):
        return grad
    inside = frame_mask(grad.shape[0], input_lengths) & nan_items[None, :]
    return grad.masked_fill_(inside[..., None], torch.nan)


def _upstream(grad_nll: Tensor) -> Tensor:
    """The upstream ``(B,)`` gradient with infinities made 0 (an infinite loss has none);
    NaN stays NaN."""
    return torch.nan_to_num(grad_nll, nan=torch.nan, posinf=0.0, neginf=0.0)


def _use_kernels(trellis: CTCTrellis, log_probs: Tensor) -> bool:
    # entry weights exp(-lam (t - T/2)) must stay inside float64's range in probability space
    delay_ok = abs(trellis.delay_penalty) * log_probs.shape[0] / 2 < 500
    return log_probs.device.type == "cpu" and delay_ok and kernels_available()


def kernels_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


class _FusedCTC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs: Tensor, trellis: CTCTrellis, use_kernels: bool) -> Tensor:
        ctx.trellis = trellis
        if use_kernels:
            ctx.kernel_state = _KernelState(trellis, log_probs, need_grad=ctx.needs_input_grad[0])
            return ctx.kernel_state.nll
        ctx.kernel_state = None
        ctx.num_classes = log_probs.shape[2]
        emissions = trellis.emissions(log_probs)
        alphas = log_alpha(trellis, emissions)
        ctx.save_for_backward(emissions, alphas)
        ll = log_likelihood(trellis, alphas)
        return torch.where(is_impossible(ll), torch.inf, -ll)

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        grad_nll = _upstream(grad_nll)
        if ctx.kernel_state is not None:
            return ctx.kernel_state.grad(grad_nll), None, None
        emissions, alphas = ctx.saved_tensors
        gamma = state_posteriors(ctx.trellis, emissions, alphas).nan_to_num_(nan=0.0)
        grad = class_posteriors(ctx.trellis, gamma, ctx.num_classes).mul_(-grad_nll[None, :, None])
        nan_items = torch.isnan(log_likelihood(ctx.trellis, alphas)) & (grad_nll != 0)
        return with_nan_items(grad, nan_items, ctx.trellis.input_lengths), None, None


def fused_nll(trellis: CTCTrellis, log_probs: Tensor, use_kernels: bool | None = None) -> Tensor:
    """``(B,)`` negative log-likelihood with the explicit forward-backward gradient.

    ``use_kernels``: None picks the numba kernels on CPU (unless a delay penalty's weights
    would leave float64's range), False forces the pure-PyTorch log-space path."""
    if use_kernels is None:
        use_kernels = _use_kernels(trellis, log_probs)
    return _FusedCTC.apply(log_probs, trellis, use_kernels)


class _CudaBuiltinCTC(torch.autograd.Function):
    """On CUDA, the built-in kernel (cuDNN or ATen's) with its gradient made the true one.

    For per-item losses with upstream gradient ``g_b`` the built-in returns
    ``g_b * (exp(log_probs) - gamma)`` (its alpha and beta are those of the scores as given; only
    the ``exp`` term assumes normalised inputs), so the true gradient ``-g_b * gamma`` is that
    minus ``g_b * exp(log_probs)`` on each item's frames. Entries at ``-inf`` get 0 (their
    posterior), items without a path get 0.
    """

    @staticmethod
    def forward(ctx, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
        import torch.nn.functional as F

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
        upstream = _upstream(grad_nll)
        g = torch.where(finite, upstream, 0.0)
        (builtin,) = torch.autograd.grad(nll, x, g)
        T = x.shape[0]
        inside = frame_mask(T, input_lengths)[..., None]
        true = builtin - g[None, :, None] * x.detach().exp()
        keep = inside & finite[None, :, None] & torch.isfinite(x)
        grad = torch.where(keep, true, 0.0)
        return with_nan_items(grad, torch.isnan(nll.detach()) & (upstream != 0), input_lengths), None, None, None, None


def builtin_cuda_nll(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
    """``(B,)`` NLL by the built-in CUDA kernel with the true gradient (see :class:`_CudaBuiltinCTC`)."""
    return _CudaBuiltinCTC.apply(log_probs, targets, input_lengths, target_lengths, blank)
