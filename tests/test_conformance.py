"""One conformance suite for every registered backend (ctclab.backends): likelihood, gradient,
Viterbi path and posteriors, for every topology, with and without a delay penalty, in every
input dtype, on a ragged batch, against brute-force enumeration of each topology's paths
(tests/oracle.py, written from the topologies' rules, not from ctclab's graph).

A new backend is tested by registering it. The ``cuda`` marker runs the same cases on a GPU."""
import functools
import gc
import math
import weakref

import pytest
import torch
from oracle import brute_force_paths

import ctclab
import ctclab.variants
from ctclab import backends
from ctclab.graph import TOPOLOGIES

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])
LAM = 0.4


def _batch():
    """A ragged batch: repeats (which separate the topologies), an item shorter than T, an item
    that fits only some topologies, padded targets."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 4, 4, generator=g, dtype=torch.float64) * 1.5
    targets = torch.tensor([[1, 1], [1, 2], [3, 0], [2, 2]])
    input_lengths = torch.tensor([5, 4, 5, 3])
    target_lengths = torch.tensor([2, 2, 1, 2])
    return logits.log_softmax(-1), targets, input_lengths, target_lengths


@functools.lru_cache(maxsize=None)
def _oracle(topology, delay, dtype):
    lp, targets, il, tl = _batch()
    lp = lp.to(dtype).double()  # the oracle sees the inputs the backend sees
    out = []
    for b in range(lp.shape[1]):
        T = int(il[b])
        weight = (lambda t, T=T: -LAM * (t - T / 2)) if delay else None
        out.append(brute_force_paths(lp[:T, b], targets[b, : tl[b]].tolist(), topology=topology, entry_weight=weight))
    return out


def _cases(operation):
    for backend in backends.backends(operation):
        for topology in TOPOLOGIES:
            for delay in (False, True):
                if (backend.topologies is None or topology in backend.topologies) and (backend.delay_penalty or not delay):
                    yield pytest.param(backend.name, topology, delay, id=f"{backend.name}-{topology}-{'delay' if delay else 'plain'}")


def _skip_unless_runs(name, device):
    backend = {b.name: b for b in backends.backends()}[name]
    if backend.runs_on is not None and device not in backend.runs_on:
        pytest.skip(f"{name} does not run on {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,topology,delay", list(_cases("loss")))
def test_loss_and_gradient(name, topology, delay, dtype, device):
    _skip_unless_runs(name, device)
    lp, targets, il, tl = _batch()
    x = lp.to(dtype).to(device).requires_grad_(True)
    nll = ctclab.ctc_loss(x, targets.to(device), il, tl, reduction="none", impl=name, topology=topology,
                          delay_penalty=LAM if delay else 0.0)
    assert nll.dtype == dtype
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(nll), nll, 0.0).sum(), x)
    tol = TOLERANCE[dtype]
    for b, (expected, post, _, _) in enumerate(_oracle(topology, delay, dtype)):
        got = float(nll[b].detach())
        if math.isinf(expected):
            assert got == math.inf and (grad[:, b] == 0).all()
            continue
        # half inputs are computed in float32 and the loss rounded to the input dtype
        assert got == pytest.approx(float(torch.tensor(expected, dtype=torch.float64).to(dtype)), rel=max(tol, torch.finfo(dtype).eps), abs=1e-12)
        # the true gradient: minus each class's posterior occupation
        ext = [0] + [c for k in targets[b, : tl[b]].tolist() for c in (k, 0)]
        want = torch.zeros(lp.shape[0], lp.shape[2], dtype=torch.float64)
        for s, k in enumerate(ext):
            want[: post.shape[0], k] -= post[:, s]
        torch.testing.assert_close(grad[:, b].double().cpu(), want, rtol=tol, atol=max(tol, torch.finfo(dtype).eps if dtype.itemsize < 4 else tol))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,topology,delay", list(_cases("viterbi")))
def test_viterbi_path(name, topology, delay, dtype, device):
    _skip_unless_runs(name, device)
    lp, targets, il, tl = _batch()
    ali = ctclab.forced_align(lp.to(dtype).to(device), targets.to(device), il, tl, impl=name, topology=topology,
                              delay_penalty=LAM if delay else 0.0, skip_infeasible=True)
    for b, (_, _, best_score, best_path) in enumerate(_oracle(topology, delay, dtype)):
        if best_path is None:
            assert not ali.aligned[b]
            continue
        assert bool(ali.aligned[b])
        assert float(ali.path_score[b]) == pytest.approx(best_score, rel=1e-6, abs=1e-9)
        assert ali.states[b, : il[b]].tolist() == best_path  # random scores: the optimum is unique


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,topology,delay", list(_cases("posteriors")))
def test_posteriors(name, topology, delay, dtype, device):
    _skip_unless_runs(name, device)
    lp, targets, il, tl = _batch()
    gamma = ctclab.state_occupation(lp.to(dtype).to(device), targets.to(device), il, tl, impl=name, topology=topology,
                                    delay_penalty=LAM if delay else 0.0)
    for b, (expected, post, _, _) in enumerate(_oracle(topology, delay, dtype)):
        S = post.shape[1]
        want = torch.zeros(gamma.shape[0], gamma.shape[2], dtype=torch.float64)
        if not math.isinf(expected):
            want[: post.shape[0], :S] = post
        torch.testing.assert_close(gamma[:, b].double().cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [b.name for b in backends.backends("loss")])
def test_a_loss_call_leaves_no_reference_cycle(name, device):
    """Once the caller drops the loss and its input, forward and backward have freed everything,
    without Python's garbage collector: an autograd context that keeps the loss it returned
    (output -> grad_fn -> context -> output) holds the call's inputs and buffers until the
    collector next runs, gigabytes at a large vocabulary, and every call then faults in fresh
    memory (the fused CPU loss's backward was 20x slower at (1000, 8, 5000, 300))."""
    _skip_unless_runs(name, device)
    lp, targets, il, tl = _batch()
    gc.collect()
    gc.disable()
    try:
        x = lp.clone().to(device).requires_grad_(True)
        nll = ctclab.ctc_loss(x, targets.to(device), il, tl, reduction="none", impl=name)
        torch.where(torch.isfinite(nll), nll, 0.0).sum().backward()
        inputs, losses = weakref.ref(x), weakref.ref(nll)
        del x, nll
        assert inputs() is None and losses() is None
    finally:
        gc.enable()


def test_every_operation_has_a_backend_and_every_backend_is_in_the_suite():
    for operation in backends.OPERATIONS:
        assert backends.backends(operation), operation
    names = {b.name for b in backends.backends()}
    assert {"numba", "reference", "autograd", "cuda-builtin"} <= names


def test_the_topologies_differ_where_they_should():
    """The oracle's four topologies give four different likelihoods on the repeat item."""
    values = {topology: _oracle(topology, False, torch.float64)[0][0] for topology in TOPOLOGIES}
    assert len({round(v, 9) for v in values.values()}) == len(TOPOLOGIES), values


def test_one_impl_vocabulary_for_every_verb():
    lp, targets, il, tl = _batch()
    verbs = {
        "ctc_loss": lambda impl: ctclab.ctc_loss(lp, targets, il, tl, impl=impl),
        "CTCLoss": lambda impl: ctclab.CTCLoss(impl=impl)(lp, targets, il, tl),
        "forced_align": lambda impl: ctclab.forced_align(lp, targets, il, tl, impl=impl, skip_infeasible=True),
        "state_occupation": lambda impl: ctclab.state_occupation(lp, targets, il, tl, impl=impl),
        "alignment_posteriors": lambda impl: ctclab.alignment_posteriors(
            lp, targets, ctclab.forced_align(lp, targets, il, tl, skip_infeasible=True), il, tl, impl=impl),
        "alignment_targets": lambda impl: ctclab.alignment_targets(lp, targets, il, tl, impl=impl),
        "focal_ctc_loss": lambda impl: ctclab.variants.focal_ctc_loss(lp, targets, il, tl, impl=impl),
    }
    for verb, call in verbs.items():
        with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'fused', "):
            call("nope")
        call("auto")
    # a named backend that cannot compute the operation says which can
    with pytest.raises(ValueError, match=r"impl='autograd' cannot compute 'viterbi'.*\['auto', ('triton', )?'numba', 'reference'\]"):
        verbs["forced_align"]("autograd")
    with pytest.raises(ValueError, match="impl='cuda-builtin' cannot compute 'loss' for topology='modified'"):
        ctclab.ctc_loss(lp, targets, il, tl, impl="cuda-builtin", topology="modified")


def test_former_impl_names_still_work_with_a_deprecation_warning():
    lp, targets, il, tl = _batch()
    for old, new in (("kernel", "numba"), ("torch", "reference")):
        with pytest.warns(DeprecationWarning, match=f"impl='{old}' is deprecated: use impl='{new}'"):
            a = ctclab.forced_align(lp, targets, il, tl, impl=old, skip_infeasible=True)
        b = ctclab.forced_align(lp, targets, il, tl, impl=new, skip_infeasible=True)
        assert torch.equal(a.states, b.states)


def test_a_registered_backend_joins_auto_by_priority():
    """What a new backend does: register, and 'auto' picks it where it serves."""
    from dataclasses import replace

    reference = {b.name: b for b in backends.backends()}["reference"]
    calls = []

    def loss(graph, log_probs):
        calls.append(graph.topology)
        return reference.loss(graph, log_probs)

    mine = replace(reference, name="test-backend", operations=frozenset({"loss"}), loss=loss, priority=1,
                   topologies=frozenset({"selfless"}))
    backends.register(mine)
    try:
        lp, targets, il, tl = _batch()
        ctclab.ctc_loss(lp, targets, il, tl, topology="selfless")
        ctclab.ctc_loss(lp, targets, il, tl, topology="standard")
        assert calls == ["selfless"]
        assert "test-backend" in backends.impl_names()
    finally:
        backends._REGISTRY.pop("test-backend")
