"""The vectorised Viterbi kernel (ctclab.backends.numba_viterbi): the reference's paths and
tie-breaks on exact ties, checkpointing that changes nothing, the memory budget, and the
generated code."""
import numba
import pytest
import torch
from conftest import random_batch

import ctclab.backends.numba_viterbi
from ctclab import forced_align
from ctclab._memory import memory_optimal_every, viterbi_bytes
from ctclab.graph import TOPOLOGIES

CASES = [(topology, delay) for topology in TOPOLOGIES for delay in (0.0, 1.0)]


def integer_scores(T, B, C, seed, spread=2):
    """Scores in {-spread, ..., 0}: whole numbers, so every sum is exact and many paths tie
    exactly (the tie-break decides)."""
    return -torch.randint(0, spread + 1, (T, B, C), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("topology,delay", CASES)
def test_exact_ties_are_broken_as_by_the_reference(topology, delay):
    """Integer scores (and an integer delay term: lam = 1, even T) make ties exact and
    frequent; the kernel, full and checkpointed, returns the reference's path, state by state."""
    for seed in range(4):
        _, targets, il, tl = random_batch(16, 5, 4, 6, seed=seed, repeats=True)
        il = il - il % 2  # T_b / 2 whole: the delay's entry terms are integers too
        lp = integer_scores(16, 5, 4, seed, spread=1 + seed % 2)
        kw = dict(topology=topology, delay_penalty=delay, skip_infeasible=True)
        reference = forced_align(lp, targets, il, tl, impl="reference", **kw)
        for every in (None, 1, 3, 16):
            kernel = forced_align(lp, targets, il, tl, impl="numba", checkpoint_every=every, **kw)
            assert torch.equal(kernel.aligned, reference.aligned)
            assert torch.equal(kernel.states, reference.states), (seed, every)
            assert torch.equal(kernel.path_score, reference.path_score)


def test_uniform_scores_enter_every_state_as_late_as_possible():
    """Every path ties: the documented rule (skip, then advance, then stay; the final blank)
    enters 1 ("a"), 3 ("b"), 5 ("a") and the final blank on the last frames, skipping blanks."""
    lp = torch.zeros(9, 1, 3, dtype=torch.float64)
    target = torch.tensor([[1, 2, 1]])
    for every in (None, 2):
        ali = forced_align(lp, target, checkpoint_every=every)
        assert ali.states[0].tolist() == [0, 0, 0, 0, 0, 1, 3, 5, 6]


@pytest.mark.parametrize("topology,delay", CASES)
def test_checkpointing_changes_neither_paths_nor_scores(topology, delay):
    """Segments much shorter than the target: each is recomputed in a window of the states
    (2K + 1 of them) that the path can pass through, not the whole band."""
    logits, targets, il, tl = random_batch(300, 3, 6, 60, seed=7)
    lp = logits.log_softmax(-1)
    kw = dict(topology=topology, delay_penalty=delay, skip_infeasible=True)
    full = forced_align(lp, targets, il, tl, **kw)
    for every in (1, 2, 5, 17, 299, 300):
        ckpt = forced_align(lp, targets, il, tl, checkpoint_every=every, **kw)
        assert torch.equal(full.states, ckpt.states), every
        assert torch.equal(full.path_score, ckpt.path_score), every


def test_a_small_budget_checkpoints_automatically(monkeypatch):
    T, L = 4000, 300
    logits, targets, il, tl = random_batch(T, 1, 12, L, seed=2, ragged=False)
    lp = logits.log_softmax(-1)
    seen = []
    kernel = ctclab.backends.numba_viterbi.viterbi
    monkeypatch.setattr(ctclab.backends.numba_viterbi, "viterbi", lambda *a: seen.append(a[3]) or kernel(*a))
    full = forced_align(lp, targets, il, tl)
    S = 2 * L + 1
    budget = viterbi_bytes(T, S, T) // 4  # the full table does not fit
    ckpt = forced_align(lp, targets, il, tl, max_memory=budget)
    assert seen == [T, memory_optimal_every(T)]
    assert viterbi_bytes(T, S, seen[1]) <= budget < viterbi_bytes(T, S, T)
    assert torch.equal(full.states, ckpt.states)
    assert torch.equal(full.path_score, ckpt.path_score)
    # an explicit interval wins over the budget
    forced_align(lp, targets, il, tl, max_memory=budget, checkpoint_every=7)
    assert seen[-1] == 7


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1GB", float("nan")])
def test_bad_max_memory_is_refused_naming_it(bad):
    lp = torch.randn(10, 4).log_softmax(-1)
    with pytest.raises(ValueError, match="max_memory"):
        forced_align(lp, torch.tensor([1, 2]), max_memory=bad)


def test_a_budget_nothing_fits_in_is_refused_naming_it():
    lp = torch.randn(2000, 4).log_softmax(-1)
    with pytest.raises(ValueError, match=r"max_memory=1000 is too small"):
        forced_align(lp, torch.tensor([1, 2] * 100), max_memory=1000)


def _host_has(feature):
    import llvmlite.binding as llvm

    return any(f == "+" + feature for f in llvm.get_host_cpu_features().flatten().split(","))


@pytest.mark.skipif(not _host_has("avx2"), reason="checks the x86 AVX2 / AVX-512 code numba emits for this machine")
def test_the_step_compiles_to_vector_code():
    """The frame step (compares, maxima, selects over float64 states in a vector register,
    codes converted to bytes a vector at a time) is vector code on x86: 4 states in a ymm
    register with AVX2, 8 in a zmm register where the host has AVX-512 (LLVM then selects
    through mask registers, ``{%k}``, instead of ``vblendvpd``)."""
    nv = ctclab.backends.numba_viterbi

    @numba.njit
    def frame(log_probs, t, b, labels, prev, w, e, emit, lo, hi, out, codes, row):
        nv._gather(log_probs, t, b, labels, lo, hi, emit)
        nv._step(prev, w, e, emit, lo, hi, out, codes)
        nv._pack(codes, lo, hi, row)

    import numpy as np

    S = 12
    w = nv.Rows(*(np.zeros(S) for _ in range(5)))
    for dtype, widen in ((np.float64, ()), (np.float32, ("vcvtps2pd",))):
        frame(np.zeros((1, 1, 3), dtype=dtype), 0, 0, np.zeros((1, S), dtype=np.int64), np.zeros(S + 4), w, 0.0,
              np.zeros(S, dtype=dtype), 0, S, np.zeros(S + 4), np.zeros(S, dtype=np.uint8), np.zeros(S // 4, dtype=np.uint8))
    avx512 = _host_has("avx512f")
    register = "%zmm" if avx512 else "%ymm"
    for signature in frame.signatures:
        asm = frame.inspect_asm(signature).splitlines()
        lines = [line for line in asm if register in line]
        for instruction in ("vmaxpd", "vcmpltpd", "vaddpd", "vmulpd", "vcvttpd2dq"):
            assert any(instruction in line for line in lines), instruction
        if avx512:  # compares write mask registers, which the selects read
            assert any("vcmpltpd" in line and "%k" in line for line in lines)
        else:
            assert any("vblendvpd" in line for line in lines)
        # a float32 row is widened a vector at a time
        assert any("vcvtps2pd" in line for line in lines) == (str(signature[0].dtype) == "float32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_path_labels_on_cpu_are_those_of_the_torch_operations(dtype):
    """The CPU's one-pass reading of the paths (labels, scores, states of unaligned items) is
    exactly what the torch operations (the GPU's) give: paths that end early (-1 beyond an
    item's frames), items not aligned, and scores read through a non-contiguous (batch-first)
    view; the caller's states are left as they were."""
    from ctclab import align

    g = torch.Generator().manual_seed(0)
    T, B, C, S = 9, 5, 6, 7
    state_labels = torch.randint(0, C, (B, S), generator=g)
    states = torch.randint(0, S, (B, T), generator=g)
    states[1, 4:] = -1
    states[3, :] = -1
    aligned = torch.tensor([True, True, False, True, False])
    for log_probs in (torch.randn(T, B, C, generator=g, dtype=dtype),
                      torch.randn(B, T, C, generator=g, dtype=dtype).transpose(0, 1)):
        given = states.clone()
        expected = align._path_labels(states, aligned, state_labels, log_probs, 0)
        got = align._path_labels_cpu(given, aligned, state_labels, log_probs, 0)
        assert torch.equal(given, states)
        for e, o in zip(expected, got):
            assert e.dtype == o.dtype and torch.equal(e, o)
        assert bool((got[0][2] == -1).all()) and bool((got[1][2] == 0).all()) and bool((got[2][4] == 0).all())
