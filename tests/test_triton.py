"""ctclab's Triton kernels (impl='triton'): on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py without a GPU), on CUDA tensors with one. The conformance suite
(tests/test_conformance.py) checks them against brute-force enumeration for every topology,
delay and dtype; these tests check what it does not: parity with the built-in, edge inputs, NaN,
determinism, tiles smaller than the target, and the backend's registration.

Shapes are small: the interpreter costs milliseconds per program and frame."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ctclab
from ctclab import backends
from ctclab.backends import triton_support
from ctclab.graph import TOPOLOGIES

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_support.available(), reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log"),  # the interpreter's log(0) = -inf
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


def _loss_and_grad(impl, x, targets, il, tl, **kw):
    x = x.detach().clone().requires_grad_(True)
    nll = ctclab.ctc_loss(x, targets, il, tl, reduction="none", impl=impl, **kw)
    (grad,) = torch.autograd.grad(torch.where(torch.isinf(nll), 0.0, nll).sum(), x)  # NaN items keep upstream 1
    return nll.detach(), grad


def _hard_batch(dtype=torch.float32):
    """Repeats, an empty target, a critical length (T_b = L + repeats), an infeasible item, a
    target of one label, ragged lengths."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 6, 5, generator=g, dtype=dtype)
    targets = torch.tensor([[1, 1, 2, 2], [3, 4, 0, 0], [2, 2, 2, 0], [1, 2, 3, 4], [4, 0, 0, 0], [0, 0, 0, 0]])
    target_lengths = torch.tensor([4, 2, 3, 4, 1, 0])
    input_lengths = torch.tensor([8, 5, 5, 3, 1, 4])  # item 2: 3 + 2 repeats = 5 frames; item 3: 4 > 3 frames
    return logits, targets, input_lengths, target_lengths


def test_loss_and_gradient_through_log_softmax_match_the_builtin():
    logits, targets, il, tl = _hard_batch()
    results = {}
    for name, fn in {
        "builtin": lambda x: F.ctc_loss(x.log_softmax(-1), targets, il, tl, reduction="none", zero_infinity=True),
        "triton": lambda x: ctclab.ctc_loss(x.log_softmax(-1), targets, il, tl, reduction="none", zero_infinity=True,
                                            impl="triton"),
    }.items():
        x = logits.to(DEVICE).requires_grad_(True)
        nll = fn(x)
        (grad,) = torch.autograd.grad(nll.sum(), x)
        results[name] = nll.detach().cpu(), grad.cpu()
    (want, want_grad), (got, got_grad) = results["builtin"], results["triton"]
    assert float(got[3]) == 0 and (got_grad[:, 3] == 0).all()  # infeasible: inf made 0, no gradient
    assert math.isinf(float(ctclab.ctc_loss(logits.to(DEVICE), targets, il, tl, reduction="none", impl="triton")[3]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_and_zero_infinity_scale_the_gradient_like_the_reference(reduction):
    logits, targets, il, tl = _hard_batch(torch.float64)
    lp = logits.log_softmax(-1).to(DEVICE)
    grads = []
    for impl in ("triton", "reference"):
        x = lp.clone().requires_grad_(True)
        ctclab.ctc_loss(x, targets, il, tl, reduction=reduction, zero_infinity=True, impl=impl).backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_minus_infinity_and_very_negative_scores_match_the_reference():
    logits, targets, il, tl = _hard_batch(torch.float64)
    lp = logits.log_softmax(-1)
    lp[2:4, 0, 1] = -torch.inf  # a target class impossible on two frames: other paths remain
    lp[:, 1, 3] = -1e4  # a target class almost impossible everywhere
    lp[:, 2, :] = -torch.inf  # every class impossible: no path
    lp[0, 5, 0] = -torch.inf  # the empty target's only path blocked
    got = _loss_and_grad("triton", lp.to(DEVICE), targets, il, tl)
    want = _loss_and_grad("reference", lp, targets, il, tl)
    assert got[0][2] == math.inf and got[0][5] == math.inf
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-9, atol=1e-12)
    assert float(got[0][1]) > 1e4  # the -1e4 class costs what it scores (no clamp to a softer value)


def test_nan_read_by_an_item_makes_its_loss_and_gradient_nan_and_nothing_else():
    logits, targets, il, tl = _hard_batch()
    lp = logits.log_softmax(-1)
    clean = _loss_and_grad("triton", lp.to(DEVICE), targets, il, tl)
    bad = lp.clone()
    bad[2, 0, 1] = NAN  # class 1 is in item 0's target
    bad[6:, 1] = NAN  # item 1 has 5 frames: padding, ignored
    bad[2, 4, 3] = NAN  # a class item 4 never reads
    nll, grad = _loss_and_grad("triton", bad.to(DEVICE), targets, il, tl)
    nll, grad, clean = nll.cpu(), grad.cpu(), [c.cpu() for c in clean]
    assert torch.isnan(nll[0]) and torch.isnan(grad[: il[0], 0]).all()  # every class of its frames, as the built-in
    torch.testing.assert_close(nll[1:], clean[0][1:])
    torch.testing.assert_close(grad[:, 1:], clean[1][:, 1:])
    # a NaN guard that drops the item (upstream gradient 0) gets a clean gradient
    x = bad.to(DEVICE).requires_grad_(True)
    losses = ctclab.ctc_loss(x, targets, il, tl, reduction="none", impl="triton")
    torch.where(torch.isnan(losses), 0.0, losses).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 0] == 0).all()


def test_nan_where_no_complete_path_reads_it_changes_nothing():
    """A NaN in a state no complete path can occupy at that frame (outside the band) counts for
    nothing, as for the other backends: item 0 cannot be in its last state at frame 0."""
    logits, targets, il, tl = _hard_batch()
    lp = logits.log_softmax(-1)
    bad = lp.clone()
    bad[0, 0, 2] = NAN  # class 2: item 0's states 5 and 7 (the last label), unreachable at frame 0
    got = _loss_and_grad("triton", bad.to(DEVICE), targets, il, tl)
    want = _loss_and_grad("reference", bad, targets, il, tl)
    assert torch.isfinite(got[0][0])
    torch.testing.assert_close(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_read_natively_and_get_their_gradient_in_their_dtype(dtype):
    logits, targets, il, tl = _hard_batch()
    lp = logits.log_softmax(-1).to(dtype)
    nll, grad = _loss_and_grad("triton", lp.to(DEVICE), targets, il, tl)
    assert nll.dtype == dtype and grad.dtype == dtype
    # the float32 computation of the same (rounded) scores, rounded once at the end
    want, want_grad = _loss_and_grad("reference", lp.float(), targets, il, tl)
    torch.testing.assert_close(nll.cpu(), want.to(dtype))
    torch.testing.assert_close(grad.cpu(), want_grad.to(dtype))


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_topologies_and_delay_penalty_match_the_cpu_kernels(topology):
    logits, targets, il, tl = _hard_batch(torch.float64)
    lp = logits.log_softmax(-1)
    got = _loss_and_grad("triton", lp.to(DEVICE), targets, il, tl, topology=topology, delay_penalty=0.3)
    want = _loss_and_grad("numba", lp, targets, il, tl, topology=topology, delay_penalty=0.3)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-8, atol=1e-10)


def test_two_runs_are_bitwise_equal():
    logits, targets, il, tl = _hard_batch()
    lp = logits.log_softmax(-1).to(DEVICE)
    first = _loss_and_grad("triton", lp, targets, il, tl)
    second = _loss_and_grad("triton", lp, targets, il, tl)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradient():
    logits, targets, il, tl = _hard_batch()
    x = logits.log_softmax(-1).to(DEVICE).requires_grad_(True)
    nll = ctclab.ctc_loss(x, targets, il, tl, impl="triton")
    (first,) = torch.autograd.grad(nll, x, retain_graph=True)
    (second,) = torch.autograd.grad(nll, x)  # the first backward consumed the forward variables
    assert torch.equal(first, second)


def test_targets_longer_than_a_tile_run_in_several_tiles(monkeypatch):
    """201 states on 128-state tiles (next to a one-tile item): the shifted reads cross tiles,
    a class's states sorted across two tiles are summed across them, the band skips tiles."""
    from ctclab.backends import triton_gpu

    monkeypatch.setattr(triton_gpu, "MAX_BLOCK", 128)
    g = torch.Generator().manual_seed(8)
    T, C, L = 108, 6, 100
    lp = torch.randn(T, 2, C, generator=g, dtype=torch.float64).log_softmax(-1)
    steps = torch.randint(1, C - 1, (2, L), generator=g)
    targets = steps.cumsum(1) % (C - 1) + 1  # no label equals the one before
    targets[0, 10:14] = 3  # but these repeat
    il, tl = torch.tensor([T, 40]), torch.tensor([L, 30])
    assert triton_gpu._block(2 * L + 1) == (128, 4)
    states_by_class = torch.cat([torch.tensor([L + 1]), torch.bincount(targets[0], minlength=C)[1:]]).cumsum(0)
    assert 128 not in states_by_class  # some class has states on both sides of the tile boundary
    got = _loss_and_grad("triton", lp.to(DEVICE), targets, il, tl)
    want = _loss_and_grad("reference", lp, targets, il, tl)
    assert torch.isfinite(want[0]).all()
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-8, atol=1e-10)


def test_posteriors_and_alignment_targets_match_the_reference():
    logits, targets, il, tl = _hard_batch()
    lp = logits.log_softmax(-1)
    for verb in (ctclab.state_occupation, ctclab.alignment_targets):
        got = verb(lp.to(DEVICE), targets, il, tl, impl="triton")
        torch.testing.assert_close(got.cpu(), verb(lp, targets, il, tl, impl="reference"), rtol=1e-5, atol=1e-6)
    bad = lp.clone()
    bad[1, 1, 0] = NAN
    gamma = ctclab.alignment_targets(bad.to(DEVICE), targets, il, tl, impl="triton").cpu()
    assert torch.isnan(gamma[: il[1], 1]).all() and (gamma[il[1]:, 1] == 0).all()


def test_every_topology_starts_in_the_first_two_states_and_ends_in_the_last_two():
    """What the kernels' visited-state bounds assume (ctclab.backends.triton_kernels)."""
    _, targets, il, tl = _hard_batch()
    batch = ctclab._inputs.ctc_batch(torch.zeros(8, 6, 5), targets, il, tl)
    for topology in TOPOLOGIES:
        graph = ctclab.graph.CTCGraph.build(batch, topology)
        states = torch.arange(graph.labels.shape[1])
        assert not (graph.start & (states >= 2)).any(), topology
        assert not (graph.final & (states < graph.num_states[:, None] - 2)).any(), topology


def test_registered_for_cuda_ahead_of_the_builtin_which_stays_reachable():
    by_name = {b.name: b for b in backends.backends()}
    triton, builtin = by_name["triton"], by_name["cuda-builtin"]
    assert triton.priority < builtin.priority and triton.devices == frozenset({"cuda"})
    assert triton.topologies is None and triton.delay_penalty and not triton.higher_order
    assert {"loss", "posteriors"} <= triton.operations and triton.reads_half
    assert "cuda-builtin" in backends.impl_names()
    # on CPU tensors 'auto' keeps the CPU kernels
    logits, targets, il, tl = _hard_batch()
    graph = ctclab.graph.CTCGraph.build(ctclab._inputs.ctc_batch(logits, targets, il, tl))
    assert backends.select("loss", "auto", graph, logits).name == "numba"
    assert backends.select("loss", "triton", graph, logits) is triton


def test_cpu_tensors_without_the_interpreter_say_how_to_run(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, targets, il, tl = _hard_batch()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ctclab.ctc_loss(logits.log_softmax(-1), targets, il, tl, impl="triton")


def test_the_gpu_check_runs_its_code_on_cpu_tensors(capsys, monkeypatch):
    """benchmarks/gpu_check.py runs on a GPU machine; here its every step runs on tiny shapes
    under the interpreter, so that what it executes there is at least known to run."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    if DEVICE == "cuda":
        pytest.skip("a GPU is here: run the script itself")
    assert gpu_check.main(["--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for section in ("parity", "determinism", "loss grid", "loss hard inputs", "loss autograd", "forced_align"):
        assert f"\n{section} " in table, section
    assert "FAIL" not in table and "builtin-cudnn" in table


@settings(max_examples=6, deadline=None, derandomize=True)  # few: each example costs the interpreter a second
@given(st.integers(1, 6), st.integers(1, 3), st.integers(2, 5), st.integers(0, 3), st.sampled_from(list(TOPOLOGIES)),
       st.sampled_from([0.0, 0.5]), st.floats(0.0, 0.3), st.integers(0, 2**31 - 1))
def test_random_ragged_batches_match_the_cpu_kernels(T, B, C, L, topology, delay, masked, seed):
    g = torch.Generator().manual_seed(seed)
    lp = (2 * torch.randn(T, B, C, generator=g, dtype=torch.float64)).log_softmax(-1)
    lp = lp.masked_fill(torch.rand(T, B, C, generator=g) < masked, -torch.inf)  # impossible frames and classes
    targets = torch.randint(1, C, (B, max(L, 1)), generator=g)[:, :L]
    tl = torch.randint(0, L + 1, (B,), generator=g)
    il = torch.randint(0, T + 1, (B,), generator=g)
    got = _loss_and_grad("triton", lp.to(DEVICE), targets, il, tl, topology=topology, delay_penalty=delay)
    want = _loss_and_grad("numba", lp, targets, il, tl, topology=topology, delay_penalty=delay)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-8, atol=1e-10)
