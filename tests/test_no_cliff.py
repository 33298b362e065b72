"""The fused loss's exact fallbacks in compiled code, never the PyTorch loop: items whose
probability-space underflow bound is not negligible run again tilted (numba_kernels.item_tilt:
the variables times r^s, which changes no path's score), and those it cannot vouch for either
through the log-space kernels (numba_kernels._log_forward / _log_posteriors). Checked on exactly
the inputs that trigger each (every test asserts which ran: blank-dominated frames are what the
tilt undoes; a confident model sure of random classes needs log space), against the built-in,
the log-space reference backend and finite differences; the per-state posteriors ('posteriors'
on the numba backend) too."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

import ctclab
import ctclab.trellis
from ctclab import bench
from ctclab._inputs import ctc_batch
from ctclab.backends import numba_cpu
from ctclab.cli import main
from ctclab.graph import TOPOLOGIES, CTCGraph
from ctclab.targets import state_occupation


def _hard_batch(kind, dtype=torch.float64, T=60, B=4, C=6, L=20, seed=0):
    """Logits whose trellis spans far more than float64's range in one frame: blank 40 nats above
    the rest (CTC's blank phase), or one random class 1000 nats above the rest at each frame
    ("confident": sure of classes unrelated to the targets); "plain": random logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, B, C, generator=g, dtype=torch.float64)
    if kind == "blank":
        logits[..., 0] += 40.0
    elif kind == "confident":
        logits.scatter_add_(2, torch.randint(0, C, (T, B, 1), generator=g), torch.full((T, B, 1), 1000.0, dtype=torch.float64))
    targets = torch.randint(1, C, (B, L), generator=g)
    targets[:, 1] = targets[:, 0]  # a repeat: the standard topology's skip rule matters
    il = torch.tensor([T, T - 5, T - 9, T - 2][:B])
    tl = torch.tensor([L, L - 3, L // 2, L - 1][:B])
    return logits.to(dtype), targets, il, tl


def _assert_fallback_ran(state, kind):
    """Blank-dominated items are vouched for once tilted; confident ones run in log space."""
    if kind == "blank":
        assert state.tilted.any() and not state.log_space.any(), "the inputs must trigger the tilted retry"
    elif kind == "confident":
        assert state.log_space.any(), "the inputs must trigger the log-space fallback"
    else:
        assert not (state.tilted.any() or state.log_space.any())


def _kernel_state(lp, targets, il, tl, topology="standard", delay_penalty=0.0, per_state=False):
    graph = CTCGraph.build(ctc_batch(lp, targets, il, tl), topology, delay_penalty)
    return numba_cpu._KernelState(graph, lp.detach(), need_grad=True, per_state=per_state)


def _nll_and_grad(lp, targets, il, tl, impl, **options):
    x = lp.detach().clone().requires_grad_(True)
    nll = ctclab.ctc_loss(x, targets, il, tl, reduction="none", impl=impl, **options)
    weights = torch.linspace(0.5, 1.5, nll.shape[0], dtype=nll.dtype)
    (grad,) = torch.autograd.grad((torch.where(torch.isinf(nll), 0.0, nll) * weights).sum(), x)  # NaN kept
    return nll.detach(), grad


@pytest.fixture
def no_pytorch_recursion(monkeypatch):
    """The fused loss must not fall back to the PyTorch log-space loop: the reference recursions
    (log_alpha, log_beta, state_posteriors) all step through trellis.forward / trellis.backward."""
    ctclab.backends.backends()  # import the backends before patching

    def refuse(*args, **kwargs):
        raise AssertionError("the fused loss ran the PyTorch log-space recursion")
    monkeypatch.setattr(ctclab.trellis, "forward", refuse)
    monkeypatch.setattr(ctclab.trellis, "backward", refuse)


@pytest.mark.parametrize("kind", ["blank", "confident"])
def test_fallback_matches_builtin(kind, no_pytorch_recursion):
    logits, targets, il, tl = _hard_batch(kind)
    lp = logits.log_softmax(-1)
    _assert_fallback_ran(_kernel_state(lp, targets, il, tl), kind)
    x = logits.clone().requires_grad_(True)
    ours = ctclab.ctc_loss(x.log_softmax(-1), targets, il, tl, reduction="sum", impl="fused")
    (ours_grad,) = torch.autograd.grad(ours, x)
    y = logits.clone().requires_grad_(True)
    theirs = F.ctc_loss(y.log_softmax(-1), targets, il, tl, reduction="sum")
    (theirs_grad,) = torch.autograd.grad(theirs, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("kind", ["blank", "confident"])
def test_fallback_matches_log_space_reference(kind, topology, delay, dtype, monkeypatch):
    logits, targets, il, tl = _hard_batch(kind, dtype=dtype)
    lp = logits.log_softmax(-1)
    options = dict(topology=topology, delay_penalty=delay)
    state = _kernel_state(lp, targets, il, tl, **options)
    _assert_fallback_ran(state, kind)
    got = _nll_and_grad(lp, targets, il, tl, "numba", **options)
    ref = _nll_and_grad(lp.double(), targets, il, tl, "reference", **options)
    tol = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[0].double(), ref[0], **tol)
    torch.testing.assert_close(got[1].double(), ref[1], **(tol if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)))


def test_fallback_gradient_by_finite_differences():
    """gradcheck (float64) through the log-space kernels, on unnormalised scores whose range no
    probability-space frame can hold."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 2, 4, generator=g, dtype=torch.float64) * 400).requires_grad_(True)
    targets, il, tl = torch.tensor([[1, 2, 2], [3, 1, 1]]), torch.tensor([7, 6]), torch.tensor([3, 2])
    assert _kernel_state(x, targets, il, tl).log_space[0]
    assert torch.autograd.gradcheck(
        lambda v: ctclab.ctc_loss(v, targets, il, tl, reduction="sum", impl="numba"), (x,), eps=1e-6, atol=1e-6)


def test_fallback_nan_and_impossible_items():
    """NaN on an item's band: NaN loss, NaN gradient on its frames; NaN where no complete path
    goes: ignored; a NaN after a frame every state finds -inf still counts (as in log space); an
    impossible item: inf, zero gradient. Other items of the batch are unaffected."""
    logits, targets, il, tl = _hard_batch("blank", B=4, C=8)
    targets = targets % 6 + 1  # classes 1..6, and class 7 only as item 1's last label
    targets[1, tl[1] - 1] = 7
    logits[..., 0] += 30.0  # blank 70 nats ahead: every item in log space
    lp = logits.log_softmax(-1)
    clean = _nll_and_grad(lp, targets, il, tl, "numba")
    bad = lp.clone()
    bad[10, 0, targets[0, 0]] = torch.nan  # on item 0's band
    bad[0, 1, 7] = torch.nan  # item 1, frame 0: its last label's state lies off every path
    bad[5, 2] = -torch.inf  # item 2: every class impossible at frame 5 ...
    bad[20, 2, 0] = torch.nan  # ... and a NaN later, on its band
    il_impossible = il.clone()
    il_impossible[3] = 10  # item 3: more labels than frames
    assert _kernel_state(bad, targets, il_impossible, tl).log_space[[1, 2, 3]].all()
    nll, grad = _nll_and_grad(bad, targets, il_impossible, tl, "numba")
    ref_nll, _ = _nll_and_grad(bad, targets, il_impossible, tl, "reference")
    assert torch.isnan(nll[0]) and torch.isnan(grad[: il[0], 0]).all()
    assert torch.isnan(nll[2]) and torch.isnan(ref_nll[2])
    torch.testing.assert_close(nll[1], clean[0][1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grad[:, 1], clean[1][:, 1], rtol=1e-9, atol=1e-10)
    assert nll[3] == torch.inf and (grad[:, 3] == 0).all()


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("kind", ["blank", "confident", "plain"])
def test_state_posteriors_match_reference(kind, topology, delay):
    """'posteriors' on the numba backend (state_occupation, alignment_posteriors): the fused
    kernels' per-state output, with the log-space kernels for the items they cannot vouch for."""
    logits, targets, il, tl = _hard_batch(kind)
    lp = logits.log_softmax(-1)
    state = _kernel_state(lp, targets, il, tl, topology, delay, per_state=True)
    _assert_fallback_ran(state, kind)
    options = dict(topology=topology, delay_penalty=delay)
    got = state_occupation(lp, targets, il, tl, impl="numba", **options)
    ref = state_occupation(lp, targets, il, tl, impl="reference", **options)
    assert got.shape == ref.shape == (lp.shape[0], lp.shape[1], 2 * targets.shape[1] + 1)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    assert ctclab.backends.select("posteriors", "auto", state.trellis, lp).name == "numba"


def test_bench_hard_reports_each_case_against_the_builtin(monkeypatch, capsys):
    monkeypatch.setattr(bench, "HARD_CASES", [bench.HardCase("tiny blank phase", 40, 3, 6, 12, "blank+12"),
                                              bench.HardCase("tiny -inf columns", 30, 2, 8, 6, "-inf columns")])
    assert main(["bench", "--hard", "--impl", "builtin", "--impl", "fused", "--repeats", "1", "--warmup", "0",
                 "--no-memory", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tiny blank phase: T=40 B=3 C=6 L=12" in out and "tiny -inf columns: T=30" in out
    assert out.count("loss matches: yes, grad matches: yes, CE grad matches: yes") == 2
    assert "hard inputs: fused fwd+bwd speed-up over the built-in" in out


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("log_tilt", [-3.0, 2.5])
def test_a_tilt_changes_neither_the_likelihood_nor_any_posterior(topology, delay, log_tilt):
    """The tilt's gauge (variables times r^s, moves r^(s - s'), start and final weights, the
    likelihood divided by r^(S_b - 1)) run directly with an arbitrary r on plain inputs: the same
    log-likelihood and per-state posteriors as untilted, item by item."""
    from ctclab.backends import numba_kernels as nk

    logits, targets, il, tl = _hard_batch("plain", T=30, L=8)
    lp = logits.log_softmax(-1).contiguous()
    state = _kernel_state(lp, targets, il, tl, topology, delay)
    T, S, U = lp.shape[0], state.trellis.labels.shape[1], state.classes.shape[1]
    classes, num_classes, g = state.classes, state.num_classes, state.graph
    scratch = dict(alpha=np.zeros((T, S)), scaled=np.zeros((T, U)), state=np.zeros((2, S + 2)), emit=np.zeros(S),
                   shifted=np.zeros(U), bits=np.zeros(U, dtype=np.int64))
    for b in range(lp.shape[1]):
        results = []
        for tilt in (1.0, math.exp(log_tilt)):
            occupancy = np.zeros((T, lp.shape[1], S))
            ll, _ = nk._forward(b, lp.numpy(), classes, num_classes, g, int(il[b]), delay, tilt, scratch["scaled"],
                                scratch["alpha"], scratch["state"], scratch["emit"], scratch["shifted"], scratch["bits"],
                                scratch["bits"].view(np.float64))
            nk._posteriors(b, classes, num_classes, g, int(il[b]), delay, tilt, scratch["alpha"], scratch["scaled"],
                           occupancy, False, True, np.zeros(S + 2), np.zeros(S + 2), np.zeros(S + 2), np.zeros(U),
                           np.inf)
            results.append((ll, occupancy[:, b]))
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-13)
        np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-10, atol=1e-13)


def test_the_blank_phase_benchmark_case_runs_tilted_and_matches_the_builtin(no_pytorch_recursion):
    """`ctclab bench --hard`'s blank phase (blank 12 above the rest, T=750, L=225): every item
    the untilted pass cannot vouch for is vouched for tilted, none needs log space."""
    case = bench.HARD_CASES[0]
    logits, targets, il, tl = bench.make_hard_inputs(case)
    logits = logits.double()
    state = _kernel_state(logits.log_softmax(-1), targets, il, tl)
    assert state.tilted.all() and not state.log_space.any()
    x = logits.clone().requires_grad_(True)
    ours = ctclab.ctc_loss(x.log_softmax(-1), targets, il, tl, reduction="none", impl="fused")
    (ours_grad,) = torch.autograd.grad(ours.sum(), x)
    y = logits.clone().requires_grad_(True)
    theirs = F.ctc_loss(y.log_softmax(-1), targets, il, tl, reduction="none")
    (theirs_grad,) = torch.autograd.grad(theirs.sum(), y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-9, atol=1e-10)


def test_no_tilt_where_its_estimate_is_not_finite_or_there_is_no_label():
    from ctclab.backends import numba_kernels as nk

    logits, targets, il, tl = _hard_batch("plain")
    lp = logits.log_softmax(-1).contiguous()
    lp[:, 1, targets[1, 0]] = -torch.inf  # item 1 reads a class that is impossible at every frame
    tl = tl.clone()
    tl[2] = 0
    state = _kernel_state(lp, targets, il, tl)
    tilts = [nk.item_tilt(b, lp.numpy(), state.classes, state.num_classes, state.graph, int(il[b]),
                          np.zeros(state.classes.shape[1]), np.zeros(0)) for b in range(lp.shape[1])]
    assert tilts[1] == 1.0 and tilts[2] == 1.0 and tilts[0] != 1.0 and all(math.isfinite(r) and r > 0 for r in tilts)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(T=st.integers(20, 70), L=st.integers(1, 20), C=st.integers(4, 8), blank_boost=st.sampled_from([0, 5, 12, 40, 80]),
       scale=st.sampled_from([1, 3, 10, 300]), topology=st.sampled_from(list(TOPOLOGIES)), delay=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**16))
def test_any_mix_of_blank_dominance_and_confidence_gives_the_log_space_result(T, L, C, blank_boost, scale, topology,
                                                                              delay, seed):
    """Whatever path an item takes (untilted; tilted, first or after an untilted pass; log space:
    blank boosts and logit scales span all three), the fused loss and gradient are the
    log-space reference's (float64)."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(T, 3, C, generator=g, dtype=torch.float64)
    logits[..., 0] += blank_boost
    L = min(L, T // 2)
    targets = torch.randint(1, C, (3, L), generator=g)
    il, tl = torch.tensor([T, T - 3, T // 2 + 1]), torch.tensor([L, max(L - 1, 0), min(L, T // 4)])
    lp = logits.log_softmax(-1)
    options = dict(topology=topology, delay_penalty=delay)
    got = _nll_and_grad(lp, targets, il, tl, "numba", **options)
    ref = _nll_and_grad(lp, targets, il, tl, "reference", **options)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("L, blank_boost", [(1, 0.0), (10, 5.0)])
def test_frames_whose_variables_are_far_below_their_sum_keep_exact_finite_gradients(L, blank_boost):
    """Two cases the property test above found (logits x300, T=20): a frame whose z fell near
    float64's smallest number (1 / z overflowed: an inf and a NaN in the gradient), and a
    tilted item whose backward variables lost mass that was divided by a tiny sum afterwards
    (a posterior of 1.3e-6 read as 0 while the bound vouched for it)."""
    g = torch.Generator().manual_seed(20)
    logits = 300 * torch.randn(20, 3, 4, generator=g, dtype=torch.float64)
    logits[..., 0] += blank_boost
    targets = torch.randint(1, 4, (3, L), generator=g)
    il, tl = torch.tensor([20, 17, 11]), torch.tensor([L, max(L - 1, 0), min(L, 5)])
    lp = logits.log_softmax(-1)
    got = _nll_and_grad(lp, targets, il, tl, "numba")
    ref = _nll_and_grad(lp, targets, il, tl, "reference")
    assert torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-8, atol=1e-10)
