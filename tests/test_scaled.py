"""The probability-space recursion behind impl='autograd' (ctclab.scaled): its transition operator,
its underflow bound (CPU kernel against the PyTorch reference) and the fallbacks that keep its
results those of the log-space recursion however extreme the scores."""
import numpy as np
import pytest
import torch
from conftest import random_batch

from ctclab import scaled, semiring
from ctclab.graph import ADVANCE, SKIP, STAY, TOPOLOGIES
from ctclab._inputs import ctc_batch
from ctclab.trellis import CTCTrellis
from ctclab.trellis import log_space_nll


def trellis_of(log_probs, targets, il, tl, topology="standard"):
    return CTCTrellis.build(ctc_batch(log_probs, targets, il, tl, 0), topology)


@pytest.mark.parametrize("unit", [False, True])  # any weights; stay and advance all 1 (a shortcut)
@pytest.mark.parametrize("small_frame", [0, semiring.SMALL_FRAME])  # the linear Function, plain ops
def test_transition_and_its_transpose_are_adjoint_and_differentiate_twice(monkeypatch, small_frame, unit):
    monkeypatch.setattr(semiring, "SMALL_FRAME", small_frame)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 7, dtype=torch.float64, generator=g).requires_grad_(True)
    b = torch.rand(3, 7, dtype=torch.float64, generator=g).requires_grad_(True)
    weights = torch.rand(3, 3, 7, dtype=torch.float64, generator=g)  # skip, advance, stay: any weights
    weights[:, :, :4] = (weights[:, :, :4] > 0.5).double()  # and 0/1 masks
    if unit:
        weights[ADVANCE:] = 1.0
    lhs = (scaled.transition(a, weights) * b).sum()
    rhs = (a * scaled.transition_transposed(b, weights)).sum()
    torch.testing.assert_close(lhs, rhs)
    # against the definition, state by state
    dense = torch.zeros(3, 7, 7, dtype=torch.float64)
    for s in range(7):
        dense[:, s, s] = weights[STAY, :, s]
        if s >= 1:
            dense[:, s, s - 1] = weights[ADVANCE, :, s]
        if s >= 2:
            dense[:, s, s - 2] = weights[SKIP, :, s]
    torch.testing.assert_close(scaled.transition(a, weights), torch.einsum("bst,bt->bs", dense, a))
    assert torch.autograd.gradgradcheck(lambda x: scaled.transition(x, weights) ** 2, (a,))
    assert torch.autograd.gradgradcheck(lambda x: scaled.transition_transposed(x, weights) ** 2, (b,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [5, 40])  # fewer classes than states, and more
def test_kernel_bound_equals_the_pytorch_reference(dtype, C):
    logits, targets, il, tl = random_batch(60, 5, C, 8, seed=C, repeats=True)
    lp = logits.log_softmax(-1).to(dtype)
    forward = scaled.scaled_forward(trellis_of(lp, targets, il, tl), lp)
    kernel = scaled.underflow_bound(forward)
    reference = scaled.reference_underflow_bound(forward, torch.float64)  # float64 backward, like the kernel
    assert (kernel > 0).all() and torch.isfinite(kernel).all()
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=0)  # float64 bounds lie near subnormals
    # in the forward's own dtype the reference also counts its backward variables' losses: larger
    assert (scaled.reference_underflow_bound(forward) >= kernel * (1 - 1e-6)).all()


@pytest.mark.parametrize("every", [1, 2, 3, 7])
def test_loss_does_not_depend_on_how_often_the_mass_is_divided(monkeypatch, every):
    logits, targets, il, tl = random_batch(40, 4, 6, 10, seed=5)
    lp = logits.log_softmax(-1).double().requires_grad_(True)
    trellis = trellis_of(lp, targets, il, tl)
    expected = log_space_nll(trellis, lp)
    (expected_grad,) = torch.autograd.grad(expected.sum(), lp)
    monkeypatch.setattr(scaled, "_normalise_every", lambda emissions: every)
    forward = scaled.scaled_forward(trellis, lp)
    assert forward.certified().all()
    (grad,) = torch.autograd.grad(-forward.log_likelihood.sum(), lp)
    torch.testing.assert_close(-forward.log_likelihood, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_the_bound_covers_the_float32_error_on_long_utterances():
    """Long random utterances: the forward and backward masses drift far apart, float32 loses what
    matters for some items. Every item the bound certifies is within it (plus rounding) of the
    exact float64 log-space value; those it does not certify are the ones with real errors."""
    logits, targets, il, tl = random_batch(400, 6, 8, 120, seed=21)
    lp = logits.log_softmax(-1)
    trellis = trellis_of(lp, targets, il, tl)
    forward = scaled.scaled_forward(trellis, lp)
    exact = log_space_nll(trellis, lp.double())
    certified = forward.certified()
    bound = scaled.underflow_bound(forward)
    relative = (-forward.log_likelihood.double() - exact).abs()  # error of a log = relative error
    rounding = 1e-6 * exact.abs()
    assert not certified.all() and certified.any()
    assert (relative[certified] <= bound[certified] + rounding[certified]).all()


def test_uncertified_items_are_redone_in_float64_tilted_then_log_space(monkeypatch):
    logits, targets, il, tl = random_batch(400, 6, 8, 120, seed=21)
    lp = logits.log_softmax(-1).requires_grad_(True)
    trellis = trellis_of(lp, targets, il, tl)
    monkeypatch.setattr(scaled, "SMALL_FRAME", 0)  # float32 first, as for large frames
    calls = []
    certified_nll = scaled._certified_nll

    def spy(trellis, log_probs, dtype, tilt=None):
        calls.append((dtype, trellis.labels.shape[0], tilt))
        return certified_nll(trellis, log_probs, dtype, tilt)

    monkeypatch.setattr(scaled, "_certified_nll", spy)
    nll = scaled.scaled_nll(trellis, lp)
    assert calls[0][:2] == (torch.float32, 6) and calls[0][2] is None
    assert calls[1][0] == torch.float64 and 0 < calls[1][1] < 6 and calls[1][2].shape == (calls[1][1],)
    assert nll.dtype == torch.float32
    exact = log_space_nll(trellis, lp.double())
    torch.testing.assert_close(nll.double(), exact, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(nll.sum(), lp)
    (exact_grad,) = torch.autograd.grad(exact.sum(), lp)
    torch.testing.assert_close(grad.double(), exact_grad.double(), rtol=1e-4, atol=1e-5)


def test_scores_beyond_float64s_range_fall_back_to_log_space(monkeypatch):
    """Logits scaled by 150: within a frame the scores span hundreds of nats, beyond what float64
    probabilities hold. Some items keep a finite but untrustworthy probability-space likelihood;
    the bound sends them to log space, and results stay those of the log-space recursion."""
    logits, targets, il, tl = random_batch(30, 6, 5, 8, seed=3)
    lp = (150 * logits).log_softmax(-1).double().requires_grad_(True)
    trellis = trellis_of(lp, targets, il, tl)
    forward = scaled.scaled_forward(trellis, lp)
    assert (torch.isfinite(forward.log_likelihood) & ~forward.certified()).any()
    fallbacks = []
    monkeypatch.setattr(scaled, "log_space_nll", lambda tr, x: fallbacks.append(tr.labels.shape[0]) or log_space_nll(tr, x))
    nll = scaled.scaled_nll(trellis, lp)
    assert fallbacks and fallbacks[0] < 6  # some items, not all
    exact = log_space_nll(trellis, lp)
    torch.testing.assert_close(nll, exact, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(nll.sum(), lp)
    (exact_grad,) = torch.autograd.grad(exact.sum(), lp)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-9, atol=1e-12)


def test_delay_penalty_and_half_dtypes_are_refused_with_a_pointer():
    logits, targets, il, tl = random_batch(10, 2, 4, 3, seed=1)
    batch = ctc_batch(logits.log_softmax(-1), targets, il, tl, 0)
    with pytest.raises(ValueError, match="log_alpha"):
        scaled.scaled_forward(CTCTrellis.build(batch, delay_penalty=0.1), batch.log_probs)
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        scaled.scaled_forward(CTCTrellis.build(batch), batch.log_probs, torch.float16)


def test_without_the_cpu_kernel_the_pytorch_bound_gives_the_same_results(monkeypatch):
    """What other devices run: the bound in PyTorch (in the forward's dtype, more conservative)."""
    logits, targets, il, tl = random_batch(400, 6, 8, 120, seed=21)
    lp = logits.log_softmax(-1).requires_grad_(True)
    trellis = trellis_of(lp, targets, il, tl)
    with_kernel = scaled.scaled_nll(trellis, lp)
    monkeypatch.setattr("ctclab.backends.numba_cpu.available", lambda: False)
    monkeypatch.setattr(scaled, "SMALL_FRAME", 0)
    forward = scaled.scaled_forward(trellis, lp)
    torch.testing.assert_close(scaled.underflow_bound(forward), scaled.reference_underflow_bound(forward))
    without = scaled.scaled_nll(trellis, lp)
    torch.testing.assert_close(without, with_kernel, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(without.sum(), lp)
    (expected,) = torch.autograd.grad(log_space_nll(trellis, lp.double()).sum(), lp)
    torch.testing.assert_close(grad.double(), expected.double(), rtol=1e-4, atol=1e-5)


def test_second_derivatives_across_the_log_space_fallback():
    """Item 0 falls back to log space, items 1-2 stay in probability space: the stitched loss
    still has exact first and second derivatives."""
    logits, targets, il, tl = random_batch(8, 3, 4, 3, seed=0, dtype=torch.float64)
    lp = (200 * logits).log_softmax(-1)
    forward = scaled.scaled_forward(trellis_of(lp, targets, il, tl), lp)
    assert forward.certified().tolist() == [False, True, True]
    x = (lp / 200).detach().requires_grad_(True)  # gradcheck's finite differences need moderate scores

    def f(z):
        scores = 200 * z
        return scaled.scaled_nll(trellis_of(scores, targets, il, tl), scores)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_a_tilt_changes_neither_the_likelihood_nor_its_gradient(topology):
    """TiltedProbability's gauge with arbitrary tilts, one per item: the same log-likelihood and
    gradient as untilted; its underflow bound the same on CPU (numba, tilted_graph) as the
    PyTorch reference."""
    logits, targets, il, tl = random_batch(25, 4, 6, 6, seed=4, dtype=torch.float64)
    lp = logits.log_softmax(-1).requires_grad_(True)
    trellis = trellis_of(lp, targets, il, tl, topology)
    tilt = torch.tensor([0.05, 1.0, 7.0, 300.0], dtype=torch.float64)
    plain, tilted = scaled.scaled_forward(trellis, lp), scaled.scaled_forward(trellis, lp, tilt=tilt)
    torch.testing.assert_close(tilted.log_likelihood, plain.log_likelihood, rtol=1e-13, atol=1e-13)
    (want,) = torch.autograd.grad(plain.log_likelihood.sum(), lp)
    (got,) = torch.autograd.grad(tilted.log_likelihood.sum(), lp)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(scaled.underflow_bound(tilted), scaled.reference_underflow_bound(tilted),
                               rtol=1e-9, atol=1e-300)


def test_the_tilt_estimate_is_the_cpu_kernels(monkeypatch):
    """scaled.item_tilts (any device) and numba_kernels.item_tilt (inside the fused kernel) are the
    same estimate: blank-dominated items get r > 1, items without labels 1."""
    from ctclab.backends import numba_cpu, numba_kernels

    logits, targets, il, tl = random_batch(40, 5, 7, 9, seed=8, dtype=torch.float64)
    logits[..., 0] += torch.linspace(0, 20, 5, dtype=torch.float64)  # more blank-dominated item by item
    tl[4] = 0
    lp = logits.log_softmax(-1)
    trellis = trellis_of(lp, targets, il, tl)
    state = numba_cpu._KernelState(trellis, lp, need_grad=False)
    # the kernel's two ways of summing the scores (every class's rows, the item's classes
    # gathered) give the same tilts, bit for bit
    kernel, gathered = ([numba_kernels.item_tilt(b, lp.numpy(), state.classes, state.num_classes, state.graph,
                                                 int(il[b]), np.zeros(state.classes.shape[1]), np.zeros(sums))
                         for b in range(5)] for sums in (lp.shape[2], 0))
    assert kernel == gathered
    ours = scaled.item_tilts(trellis, lp)
    torch.testing.assert_close(ours, torch.tensor(kernel, dtype=torch.float64), rtol=1e-12, atol=0)
    assert ours[4] == 1.0 and (ours[1:4].diff() > 0).all() and ours[3] > 1


def test_the_blank_phase_runs_tilted_not_in_log_space(monkeypatch):
    """`ctclab bench --hard`'s blank phase (blank 12 above the rest, T=750, L=225; two of its
    items): not even float64 vouches for them untilted; the tilted float64 pass does, and nothing
    reaches the log-space loop."""
    from ctclab import bench

    logits, targets, il, tl = bench.make_hard_inputs(bench.HARD_CASES[0])
    lp = logits[:, :2].log_softmax(-1).requires_grad_(True)
    targets, il, tl = targets[:2], il[:2], tl[:2]
    trellis = trellis_of(lp, targets, il, tl)
    assert not scaled.scaled_forward(trellis, lp.double()).certified().any()
    monkeypatch.setattr(scaled, "log_space_nll", lambda *a: pytest.fail("the log-space loop ran"))
    nll = scaled.scaled_nll(trellis, lp)
    (grad,) = torch.autograd.grad(nll.sum(), lp)
    monkeypatch.undo()
    x = lp.detach().double().requires_grad_(True)
    exact = log_space_nll(trellis, x)
    (exact_grad,) = torch.autograd.grad(exact.sum(), x)
    torch.testing.assert_close(nll.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tilt", [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0, 2.0, 1.0]),
                                  torch.tensor([1.0, -1.0, 2.0, 1.0]), torch.tensor([1.0, float("nan"), 2.0, 1.0])])
def test_a_bad_tilt_is_refused_naming_it(tilt):
    logits, targets, il, tl = random_batch(10, 4, 5, 3, seed=1, dtype=torch.float64)
    lp = logits.log_softmax(-1)
    with pytest.raises(ValueError, match="tilt must hold one positive finite number per item"):
        scaled.scaled_forward(trellis_of(lp, targets, il, tl), lp, tilt=tilt.double())
