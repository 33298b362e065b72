"""The research path's fused step (ctclab.backends.triton_step): the log semiring's transition as
one Triton kernel each way, which impl='autograd' runs on CUDA. Here on CPU tensors under
TRITON_INTERPRET=1 (conftest.py): the step and the whole recursion against the readable ones
(values, gradients, double backward, NaN, row ends, several programs a frame), the loss against
the built-in, and the backend's choice."""
import pytest
import torch
import torch.nn.functional as F

import ctclab
from ctclab._inputs import ctc_batch
from ctclab.backends import triton_support
from ctclab.graph import NEG, TOPOLOGIES, CTCGraph
from ctclab.semiring import LOG
from ctclab.trellis import log_space_nll

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_support.available(), reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log"),  # the interpreter's log(0) = -inf
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture
def step():
    from ctclab.backends import triton_step

    return triton_step


def _frame(B, S, dtype, seed=0):
    """A frame of log variables with log-0 stand-ins, and move weights with forbidden moves."""
    g = torch.Generator().manual_seed(seed)
    alpha = (3 * torch.randn(B, S, generator=g, dtype=dtype))
    alpha[torch.rand(B, S, generator=g) < 0.2] = NEG
    weights = -torch.rand(3, B, S, generator=g, dtype=dtype)
    weights[torch.rand(3, B, S, generator=g) < 0.3] = NEG
    return alpha.to(DEVICE), weights.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [512, 8])  # 8: several programs a frame, rows split across them
def test_the_fused_step_and_its_gradient_equal_the_readable_ones(step, monkeypatch, dtype, block):
    monkeypatch.setattr(step, "BLOCK", block)
    for B, S in [(1, 1), (1, 2), (3, 7), (4, 19)]:
        alpha, weights = _frame(B, S, dtype, seed=S)
        alpha.requires_grad_(True)
        readable, fused = LOG.transition(alpha, weights), step.FUSED_LOG.transition(alpha, weights)
        torch.testing.assert_close(fused, readable, **TOLERANCE[dtype])
        upstream = torch.randn(B, S, dtype=dtype, device=DEVICE)
        (want,) = torch.autograd.grad(readable, alpha, upstream)
        (got,) = torch.autograd.grad(fused, alpha, upstream)
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_a_nan_spreads_to_the_states_that_read_it_only(step):
    alpha, weights = _frame(2, 9, torch.float32)
    alpha[1, 4] = torch.nan
    fused = step.FUSED_LOG.transition(alpha, weights)
    readable = LOG.transition(alpha, weights)
    assert torch.equal(fused.isnan(), readable.isnan())
    assert fused[1, 4:7].isnan().all() and not fused[0].isnan().any() and not fused[1, :4].isnan().any()


def test_non_contiguous_variables_and_move_weights_requiring_a_gradient(step):
    alpha, weights = _frame(5, 6, torch.float64)
    strided = alpha.t().contiguous().t().requires_grad_(True)  # (B, S) with strides (1, B)
    assert not strided.is_contiguous()
    torch.testing.assert_close(step.FUSED_LOG.transition(strided, weights), LOG.transition(strided, weights))
    learned = weights.clone().requires_grad_(True)  # a learned topology: the readable step runs
    (want,) = torch.autograd.grad(LOG.transition(alpha, learned).sum(), learned)
    (got,) = torch.autograd.grad(step.FUSED_LOG.transition(alpha, learned).sum(), learned)
    torch.testing.assert_close(got, want)


def _batch(seed, T=7, B=3, C=5, L=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(T, B, C, generator=g, dtype=dtype).log_softmax(-1).to(DEVICE)
    targets = torch.randint(1, C, (B, L), generator=g)
    targets[0, 1] = targets[0, 0]  # a repeat
    return log_probs, targets, torch.tensor([T, T - 2, 4]), torch.tensor([L, 2, 1])


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_the_recursion_with_fused_steps_equals_the_readable_one(step, topology, delay):
    log_probs, targets, il, tl = _batch(1)
    graph = CTCGraph.build(ctc_batch(log_probs, targets, il, tl), topology, delay)
    x = log_probs.clone().requires_grad_(True)
    want = log_space_nll(graph, x)
    got = log_space_nll(graph, x, step.FUSED_LOG)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (grad_want,) = torch.autograd.grad(want.sum(), x)
    (grad_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_gradgradcheck_in_float64(step):
    """Double backward differentiates the readable step: every derivative order is the readable
    recursion's."""
    log_probs, targets, il, tl = _batch(2, T=5, B=2, C=4, L=2)
    x = log_probs[:, :2].detach().clone().requires_grad_(True)
    graph = CTCGraph.build(ctc_batch(x, targets[:2], il[:2].clamp(max=5), tl[:2]))
    assert torch.autograd.gradcheck(lambda z: log_space_nll(graph, z, step.FUSED_LOG), x)
    assert torch.autograd.gradgradcheck(lambda z: log_space_nll(graph, z, step.FUSED_LOG), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_impl_with_fused_steps_matches_the_builtin(step, monkeypatch, dtype):
    """impl='autograd' takes the fused steps where ``fused_steps`` says so (CUDA with Triton;
    here made to say so on CPU), and matches the built-in, infeasible items and ragged lengths
    included."""
    from ctclab.backends import autograd

    assert not autograd.fused_steps(torch.device("cpu"))
    monkeypatch.setattr(autograd, "fused_steps", lambda device: True)
    launches = []
    original = step.LogTransition.apply
    monkeypatch.setattr(step.LogTransition, "apply", lambda *a: launches.append(1) or original(*a))
    g = torch.Generator().manual_seed(5)
    T, B, C = 9, 4, 6
    logits = torch.randn(T, B, C, generator=g, dtype=dtype)
    targets = torch.tensor([[1, 1, 2], [3, 4, 5], [2, 0, 0], [1, 2, 3]])
    il, tl = torch.tensor([9, 7, 3, 2]), torch.tensor([3, 3, 1, 3])  # item 3: 3 labels in 2 frames
    results = []
    for impl in ("autograd", "builtin"):
        x = logits.clone().to(DEVICE).requires_grad_(True)
        lp = x.log_softmax(-1)
        if impl == "builtin":
            nll = F.ctc_loss(lp, targets, il, tl, reduction="none", zero_infinity=True)
        else:
            nll = ctclab.ctc_loss(lp, targets, il, tl, reduction="none", zero_infinity=True, impl="autograd")
        (grad,) = torch.autograd.grad(nll.sum(), x)
        results.append((nll.detach(), grad))
    assert len(launches) == T - 1  # one fused transition a frame after the first
    torch.testing.assert_close(results[0][0], results[1][0], **TOLERANCE[dtype])
    torch.testing.assert_close(results[0][1], results[1][1], **TOLERANCE[dtype])
