"""What the loss backends share: the upstream gradient's rules and NaN items."""
from __future__ import annotations

import torch
from torch import Tensor

from .._inputs import frame_mask

DOUBLE_BACKWARD_ERROR = (
    "this loss backend computes first derivatives only; pass impl='autograd' to ctclab.ctc_loss for "
    "double backward, Hessian-vector products or create_graph=True"
)


def with_nan_items(grad: Tensor, nan_items: Tensor, input_lengths: Tensor) -> Tensor:
    """``grad`` ``(T, B, C)`` with NaN on every frame of the ``(B,)`` ``nan_items`` (items whose
    loss is NaN because a score they read is NaN), as the built-in has it: a NaN loss must not
    come with a finite gradient. Items whose upstream gradient is 0 (masked out) keep 0."""
    if not bool(nan_items.any()):
        return grad
    inside = frame_mask(grad.shape[0], input_lengths) & nan_items[None, :]
    return grad.masked_fill_(inside[..., None], torch.nan)


def upstream(grad_nll: Tensor) -> Tensor:
    """The upstream ``(B,)`` gradient with infinities made 0 (an infinite loss has none);
    NaN stays NaN."""
    return torch.nan_to_num(grad_nll, nan=torch.nan, posinf=0.0, neginf=0.0)
