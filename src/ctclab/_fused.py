"""``impl='fused'``: explicit forward-backward as a ``torch.autograd.Function``.

The forward pass computes alpha without autograd; the backward pass computes beta and returns
the posterior occupation scattered onto the classes (the true gradient, for any log-scores).
On CPU the numba kernels of :mod:`ctclab._kernels` run the recursion (probability space,
rescaled per frame, parallel over the batch); items they flag, and every other device, use the
pure-PyTorch log-space recursion of :mod:`ctclab.trellis`, which is also the kernels' reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .trellis import CTCTrellis, class_posteriors, is_impossible, log_alpha, log_likelihood, state_posteriors

DOUBLE_BACKWARD_ERROR = (
    "impl='fused' computes first derivatives only; pass impl='autograd' to ctclab.ctc_loss for "
    "double backward, Hessian-vector products or create_graph=True"
)


def _log_space_nll(trellis: CTCTrellis, log_probs: Tensor) -> Tensor:
    ll = log_likelihood(trellis, log_alpha(trellis, trellis.emissions(log_probs)))
    return torch.where(is_impossible(ll), torch.inf, -ll)


def _log_space_grad(trellis: CTCTrellis, log_probs: Tensor) -> Tensor:
    """``(T, B, C)`` posterior occupation of each class (= -d nll / d log_probs)."""
    gamma = state_posteriors(trellis, trellis.emissions(log_probs))
    return class_posteriors(trellis, gamma, log_probs.shape[2])


class _KernelState:
    """What the CPU kernels' forward leaves for their backward."""

    def __init__(self, trellis: CTCTrellis, log_probs: Tensor):
        from . import _kernels

        labels = trellis.labels
        B, S = labels.shape
        C = log_probs.shape[2]
        present = torch.zeros(B, C, dtype=torch.bool).scatter_(1, labels, True)
        self.num_classes = present.sum(1)
        U = int(self.num_classes.max()) if B else 0
        self.classes = torch.argsort((~present).to(torch.int8), dim=1, stable=True)[:, :U].contiguous()
        self.state_class = (present.cumsum(1) - 1).gather(1, labels).contiguous()
        self.trellis = trellis
        self.skip = torch.nn.functional.pad(trellis.skip.double(), (0, 2))
        self.lp = log_probs.detach().contiguous()
        T = self.lp.shape[0]
        self.scaled = torch.empty(B, T, max(U, 1), dtype=torch.float64)
        self.alpha = torch.empty(B, T, S, dtype=self.lp.dtype)
        loglik, flagged = _kernels.forward(
            self.lp.numpy(), self.classes.numpy(), self.num_classes.numpy(), self.skip.numpy(),
            self.state_class.numpy(), trellis.num_states.numpy(), trellis.input_lengths.numpy(),
            self.scaled.numpy(), self.alpha.numpy(),
        )
        loglik = torch.from_numpy(loglik)
        # an item that has a path but whose kernel score vanished underflowed: redo in log space
        self.redo = torch.from_numpy(flagged) | (torch.isinf(loglik) & trellis.feasible)
        nll = (-loglik).to(log_probs.dtype)
        if bool(self.redo.any()):
            nll[self.redo] = _log_space_nll(trellis.select(self.redo), log_probs[:, self.redo])
        self.nll = nll

    def grad(self, grad_nll: Tensor) -> Tensor:
        from . import _kernels

        trellis = self.trellis
        finite = torch.isfinite(self.nll) & ~self.redo
        scale = torch.where(finite, grad_nll.double(), 0.0)
        grad = torch.zeros_like(self.lp)
        flagged = _kernels.backward(
            self.classes.numpy(), self.num_classes.numpy(), self.skip.numpy(), self.state_class.numpy(), trellis.num_states.numpy(),
            trellis.input_lengths.numpy(), self.alpha.numpy(), self.scaled.numpy(), scale.numpy(), grad.numpy(),
        )
        redo = (self.redo | torch.from_numpy(flagged)) & (grad_nll != 0)
        if bool(redo.any()):
            sub = -_log_space_grad(trellis.select(redo), self.lp[:, redo])
            grad[:, redo] = sub * grad_nll[redo].to(sub.dtype)[None, :, None]
        return grad


def _use_kernels(trellis: CTCTrellis, log_probs: Tensor) -> bool:
    return log_probs.device.type == "cpu" and not trellis.delay_penalty and kernels_available()


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
            ctx.kernel_state = _KernelState(trellis, log_probs)
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
        grad_nll = torch.nan_to_num(grad_nll, posinf=0.0, neginf=0.0)
        if ctx.kernel_state is not None:
            return ctx.kernel_state.grad(grad_nll), None, None
        emissions, alphas = ctx.saved_tensors
        gamma = state_posteriors(ctx.trellis, emissions, alphas)
        grad = class_posteriors(ctx.trellis, gamma, ctx.num_classes)
        return grad.mul_(-grad_nll[None, :, None]), None, None


def fused_nll(trellis: CTCTrellis, log_probs: Tensor, use_kernels: bool | None = None) -> Tensor:
    """``(B,)`` negative log-likelihood with the explicit forward-backward gradient.

    ``use_kernels``: None picks the numba kernels on CPU (when no delay penalty is set),
    False forces the pure-PyTorch log-space path."""
    if use_kernels is None:
        use_kernels = _use_kernels(trellis, log_probs)
    return _FusedCTC.apply(log_probs, trellis, use_kernels)
