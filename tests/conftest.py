import os
import sys

import pytest
import torch

# Without a GPU, ctclab's Triton kernels run on CPU tensors in Triton's interpreter. The variable
# must be set before triton is first imported (../shared/TRITON-NOTES.md), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


def random_batch(T, B, C, L, *, blank=0, seed=0, dtype=torch.float32, repeats=False, min_target=0, ragged=True):
    """Random logits and a ragged batch of targets that fit their inputs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, B, C, generator=g, dtype=dtype)
    labels = [k for k in range(C) if k != blank]
    targets = torch.tensor(labels)[torch.randint(len(labels), (B, L), generator=g)]
    if repeats and L > 1:
        targets[:, 1] = targets[:, 0]
    tl = torch.randint(min_target, L + 1, (B,), generator=g) if ragged else torch.full((B,), L)
    il = torch.randint(max(1, T // 2), T + 1, (B,), generator=g) if ragged else torch.full((B,), T)
    il[0] = T
    # keep every item feasible: T_b >= L_b + repeats_b
    reps = torch.stack([(targets[b, 1 : tl[b]] == targets[b, : tl[b] - 1]).sum() if tl[b] > 1 else torch.tensor(0) for b in range(B)])
    il = torch.maximum(il, (tl + reps).clamp(max=T))
    tl = torch.where(tl + reps > il, torch.zeros_like(tl), tl)
    return logits, targets, il, tl


@pytest.fixture(params=["autograd", "autograd-float32", "fused"])
def impl(request, monkeypatch):
    """The loss implementations; "autograd-float32" is the autograd path made to run its
    recursion in float32 however small the frames (normally only large frames do)."""
    if request.param == "autograd-float32":
        monkeypatch.setattr("ctclab.scaled.SMALL_FRAME", 0)
        return "autograd"
    return request.param
