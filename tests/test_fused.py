"""The CPU kernels of impl='fused' against the pure-PyTorch log-space path they must reproduce."""
import pytest
import torch
from conftest import random_batch

from ctclab.backends import numba_cpu, reference
from ctclab._inputs import ctc_batch
import ctclab
from ctclab.loss import ctc_loss
from ctclab.trellis import CTCTrellis


def nll_and_grad(log_probs, targets, il, tl, use_kernels, topology="standard", delay_penalty=0.0):
    x = log_probs.detach().clone().requires_grad_(True)
    trellis = CTCTrellis.build(ctc_batch(x, targets, il, tl), topology, delay_penalty)
    nll = (numba_cpu if use_kernels else reference).loss(trellis, x)
    weights = torch.linspace(0.5, 1.5, nll.shape[0], dtype=nll.dtype)
    (grad,) = torch.autograd.grad((torch.nan_to_num(nll, posinf=0.0) * weights).sum(), x)
    return nll.detach(), grad


@pytest.mark.parametrize("topology,delay", [("standard", 0.0), ("modified", 0.0), ("standard", 0.3), ("modified", 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_log_space_reference(dtype, topology, delay):
    for seed, (T, B, C, L) in enumerate([(30, 6, 5, 10), (50, 4, 12, 20), (7, 5, 3, 3), (64, 3, 40, 30)]):
        logits, targets, il, tl = random_batch(T, B, C, L, seed=seed, dtype=dtype, repeats=seed % 2 == 0)
        lp = logits.log_softmax(-1)
        got = nll_and_grad(lp, targets, il, tl, True, topology, delay)
        ref = nll_and_grad(lp, targets, il, tl, False, topology, delay)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[0], ref[0], **tol)
        torch.testing.assert_close(got[1], ref[1], **tol)


@pytest.mark.parametrize("scale", [50.0, 400.0, 3000.0])
def test_extreme_dynamic_range_matches_log_space(scale):
    """Scores spanning thousands of nats underflow in probability space; flagged items are
    recomputed in log space, so the kernels' answers stay those of the log-space recursion."""
    logits, targets, il, tl = random_batch(40, 6, 6, 12, seed=5, dtype=torch.float64)
    lp = (logits * scale).log_softmax(-1)
    got = nll_and_grad(lp, targets, il, tl, True)
    ref = nll_and_grad(lp, targets, il, tl, False)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("delay,T,L", [(3.3, 200, 3), (0.0, 3000, 40)])
def test_likelihood_bookkeeping_of_huge_and_many_frame_sums(delay, T, L):
    """The forward takes one log of the frames' sums' running product every few hundred frames,
    and the log of a sum outside [1e-100, 1e100] at once: a delay penalty whose entry factor
    reaches e^330 (frame sums near 1e143 in the first frames) and a long
    input (the product renormalised many times) give the log-space recursion's loss and gradient."""
    logits, targets, il, tl = random_batch(T, 3, 6, L, seed=8, dtype=torch.float64)
    lp = logits.log_softmax(-1)
    state = numba_cpu._KernelState(CTCTrellis.build(ctc_batch(lp, targets, il, tl), "standard", delay), lp, True)
    assert not state.log_space.any()  # the probability-space kernels, not their log-space fallback
    got = nll_and_grad(lp, targets, il, tl, True, delay_penalty=delay)
    ref = nll_and_grad(lp, targets, il, tl, False, delay_penalty=delay)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-11, atol=0.0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-10)


def test_auto_is_fused():
    logits, targets, il, tl = random_batch(10, 2, 4, 3, seed=1)
    x = logits.clone().requires_grad_(True)
    loss = ctc_loss(x.log_softmax(-1), targets, il, tl, impl="auto")
    assert torch.equal(loss, ctc_loss(x.log_softmax(-1), targets, il, tl, impl="fused"))
    with pytest.raises(RuntimeError, match="impl='autograd'"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_builtin_with_corrected_gradient_is_the_true_gradient(scale):
    """The CUDA route (built-in kernel, gradient corrected) checked with the CPU built-in:
    equal to the autograd path for unnormalised scores, -inf entries and infeasible items."""
    from ctclab.backends.cuda_builtin import builtin_cuda_nll

    logits, targets, il, tl = random_batch(20, 4, 5, 6, seed=9, dtype=torch.float64)
    scores = logits * scale  # unnormalised
    scores[:, :, 4] = -torch.inf
    targets = targets.clamp(max=3)
    il = il.clone()
    il[2] = 3  # infeasible
    tl = tl.clone()
    tl[2] = 6
    batch = ctclab._inputs.ctc_batch(scores, targets, il, tl, 0)
    x = scores.clone().requires_grad_(True)
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    nll = builtin_cuda_nll(x, batch.targets, batch.input_lengths, batch.target_lengths, 0)
    (got,) = torch.autograd.grad((torch.nan_to_num(nll, posinf=0.0) * weights).sum(), x)
    z = scores.clone().requires_grad_(True)
    ref = ctc_loss(z, targets, il, tl, reduction="none", impl="autograd")
    (expected,) = torch.autograd.grad((torch.nan_to_num(ref, posinf=0.0) * weights).sum(), z)
    torch.testing.assert_close(nll, ref.detach())
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(got).all()


def test_fused_backward_twice_through_a_retained_graph():
    logits, targets, il, tl = random_batch(30, 4, 6, 5, seed=11)
    x = logits.log_softmax(-1).detach().requires_grad_(True)
    loss = ctc_loss(x, targets, il, tl, impl="fused")
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    assert torch.allclose(x.grad, 2 * once, atol=1e-6)
    ref = x.detach().requires_grad_(True)
    ctc_loss(ref, targets, il, tl, impl="autograd").backward()
    assert torch.allclose(once, ref.grad, atol=1e-6)
    # the first gradient handed out is not touched by the second backward (nor the reverse)
    z = x.detach().requires_grad_(True)
    loss = ctc_loss(z, targets, il, tl, impl="fused", reduction="sum")
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss, z, grad_outputs=torch.tensor(3.0))
    assert torch.equal(first, kept) and second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(second, 3 * kept)


def test_a_large_gradient_reuses_memory_only_once_no_tensor_uses_it(monkeypatch):
    """The kept gradient block (numba_cpu._gradient_buffer) is handed out again only when
    nothing refers to the last gradient: not while it, a view of it or its .numpy() lives; and a
    gradient handed out is never written by a later call."""
    monkeypatch.setattr(numba_cpu, "_ALWAYS_MAPPED", 0)  # every gradient counts as large here
    monkeypatch.setattr(numba_cpu._scratch, "gradient", None, raising=False)
    logits, targets, il, tl = random_batch(20, 3, 40, 3, seed=5)  # C > 4 U: the compact layout
    lp = logits.log_softmax(-1)
    ref = lp.detach().requires_grad_(True)
    ctc_loss(ref, targets, il, tl, impl="autograd", reduction="sum").backward()

    def gradient(scale=1.0):
        x = lp.detach().requires_grad_(True)
        (scale * ctc_loss(x, targets, il, tl, impl="fused", reduction="sum")).backward()
        return x.grad

    first = gradient()
    address = first.data_ptr()
    del first
    second = gradient()
    assert second.data_ptr() == address  # nothing used it: reused
    torch.testing.assert_close(second, ref.grad)
    for keep in (lambda g: g, lambda g: g[1:], lambda g: g.numpy()):
        held, address = keep(second), second.data_ptr()
        before = second.clone()
        del second
        third = gradient(2.0)
        assert third.data_ptr() != address  # still in use: a new block
        torch.testing.assert_close(third, 2 * ref.grad)
        assert torch.equal(torch.as_tensor(held), before[-torch.as_tensor(held).shape[0]:])  # untouched
        del held
        second = third


def test_kernel_exp_matches_libm_to_double_precision():
    np = pytest.importorskip("numpy")
    from ctclab.backends.numba_kernels import exp_nonpositive

    d = -np.concatenate([np.random.default_rng(0).exponential(30.0, 10000), np.linspace(0, 707.9, 1000)])
    d = np.concatenate([d, [-np.inf, -708.5, -800.0, -1e300, 0.0, -0.0, -1e-300]])
    out = np.empty((1, d.shape[0]))
    bits = np.empty(d.shape[0], dtype=np.int64)
    exp_nonpositive(d, d.shape[0], out, 0, bits, bits.view(np.float64))
    out = out[0]
    expected = np.exp(d)
    normal = expected >= np.finfo(np.float64).tiny
    assert np.max(np.abs(out[normal] - expected[normal]) / expected[normal]) < 1e-15
    assert (out[~normal] == 0).all() and (expected[~normal] < 1e-307).all()  # flushed below e^-708


def test_kernels_give_the_same_results_on_any_number_of_threads():
    numba = pytest.importorskip("numba")
    logits, targets, il, tl = random_batch(40, 7, 6, 8, seed=31)
    x = logits.log_softmax(-1)
    expected = ctc_loss(x.double(), targets, il, tl, reduction="none", impl="autograd")
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            z = x.detach().requires_grad_(True)
            got = ctc_loss(z, targets, il, tl, reduction="none", impl="fused")
            (grad,) = torch.autograd.grad(got.sum(), z)
            torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
            if threads == 1:
                single = grad
            else:
                torch.testing.assert_close(grad, single)
    finally:
        numba.set_num_threads(before)
