"""The Triton Viterbi kernel (ctclab.backends.triton_viterbi, forced_align(impl='triton')) against
the CPU kernel (impl='numba'): the same states, labels and alignability, path scores within float32
rounding (exactly equal where the scores are integers, so that sums are exact and ties are true
ties), on ragged batches. On CPU tensors under TRITON_INTERPRET=1 (conftest.py) without a GPU.

The conformance suite (tests/test_conformance.py) checks the kernel against brute-force path
enumeration; these tests check what it does not: ties, the wildcard, checkpointing, tiles smaller
than the target, infeasible items, native half-precision reads, compilation for sm_90.
Shapes are small: the interpreter costs milliseconds per program, frame and tile."""
import pytest
import torch
from conftest import random_batch

import ctclab
from ctclab import backends
from ctclab._inputs import ctc_batch
from ctclab.backends import triton_gpu, triton_support
from ctclab.graph import TOPOLOGIES, CTCGraph
from ctclab.trellis import STAR

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_support.available(), reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log"),  # the interpreter's log(0) = -inf
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _align_both(log_probs, targets, input_lengths, target_lengths, **options):
    """forced_align by the Triton kernel (on DEVICE) and by the CPU kernel."""
    got = ctclab.forced_align(log_probs.to(DEVICE), targets.to(DEVICE), input_lengths, target_lengths, impl="triton",
                              skip_infeasible=True, **options)
    want = ctclab.forced_align(log_probs, targets, input_lengths, target_lengths, impl="numba", skip_infeasible=True,
                               **options)
    return got, want


def _assert_same(got, want, exact=False):
    assert torch.equal(got.aligned.cpu(), want.aligned)
    assert torch.equal(got.states.cpu(), want.states)
    assert torch.equal(got.labels.cpu(), want.labels)
    assert torch.equal(got.scores.cpu(), want.scores)  # the emissions along the (same) path
    if exact:
        assert torch.equal(got.path_score.cpu(), want.path_score)
    else:  # float32 sums against the CPU kernel's float64, rounded
        torch.testing.assert_close(got.path_score.cpu(), want.path_score, rtol=2e-6, atol=1e-5)


def _integer_scores(T, B, C, seed, low=-2):
    """Integer log-scores in [low, 0]: every sum is exact in float32, so equal-score paths tie exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 1, (T, B, C), generator=g).float()


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_the_cpu_kernels_paths_on_a_ragged_batch(topology, delay):
    logits, targets, il, tl = random_batch(9, 3, 5, 3, seed=len(topology), repeats=True)
    got, want = _align_both(logits.log_softmax(-1), targets, il, tl, topology=topology, delay_penalty=delay)
    assert bool(want.aligned.any())
    _assert_same(got, want)


@pytest.mark.parametrize("delay", [0.0, 0.5])
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_ties_are_broken_as_the_cpu_kernel_breaks_them(topology, delay):
    """Item 0 scores 0 everywhere: every one of its paths ties (the delay penalty's entry terms,
    multiples of 0.25, then decide only between paths entering at different frames). The others
    have integer scores with many equal-score paths. States and path scores must be identical."""
    T, B, C = 8, 3, 4
    log_probs = _integer_scores(T, B, C, seed=3)
    log_probs[:, 0] = 0.0
    targets = torch.tensor([[1, 2, 2], [3, 3, 0], [2, 1, 2]])
    il, tl = torch.tensor([8, 7, 8]), torch.tensor([3, 2, 3])
    got, want = _align_both(log_probs, targets, il, tl, topology=topology, delay_penalty=delay)
    assert bool(want.aligned.all())
    _assert_same(got, want, exact=True)


def test_ties_across_tiles(monkeypatch):
    """Tiles of 8 states: item 0 (17 states, all scores 0) has its two final states in different
    tiles (15 and 16), the tie between them broken across tiles; item 1 ties within tiles."""
    monkeypatch.setattr(triton_gpu, "MAX_BLOCK", 8)
    log_probs = _integer_scores(12, 2, 4, seed=9)
    log_probs[:, 0] = 0.0
    targets = torch.tensor([[1, 2, 3, 1, 2, 2, 3, 1], [3, 1, 1, 2, 0, 0, 0, 0]])
    il, tl = torch.tensor([12, 10]), torch.tensor([8, 4])
    got, want = _align_both(log_probs, targets, il, tl)
    assert bool(want.aligned.all()) and int(want.states[0, 11]) == 16
    _assert_same(got, want, exact=True)


def test_star_is_one_more_class():
    """The wildcard (forced_align's star) is a class appended to the scores: nothing for the kernel."""
    T, B, C = 10, 3, 5
    log_probs = _integer_scores(T, B, C, seed=5)
    targets = torch.tensor([[STAR, 1, 2, STAR], [1, STAR, 3, 0], [STAR, 4, 0, 0]])
    il, tl = torch.tensor([10, 9, 6]), torch.tensor([4, 3, 2])
    got, want = _align_both(log_probs, targets, il, tl, star=1.0)
    assert bool(want.aligned.all()) and bool((want.labels == STAR).any())
    _assert_same(got, want, exact=True)


@pytest.mark.parametrize("every,block", [(1, 1024), (3, 8), (4, 1024), (9, 8), (50, 1024)])
def test_checkpoint_every_gives_the_same_paths(every, block, monkeypatch):
    """K = 3, 4 do not divide T; K = 9 leaves a last segment of one frame; K = 50 > T is no
    checkpointing; K = 1 checkpoints every frame. Block 8 < 11 states: several tiles per frame."""
    monkeypatch.setattr(triton_gpu, "MAX_BLOCK", block)
    logits, targets, il, tl = random_batch(10, 3, 5, 5, seed=every, repeats=True)
    il[1] = 7  # a shorter item: its own segments
    got, want = _align_both(logits.log_softmax(-1), targets, il, tl, checkpoint_every=every)
    plain = ctclab.forced_align(logits.log_softmax(-1), targets, il, tl, impl="numba", skip_infeasible=True)
    assert torch.equal(want.states, plain.states)
    _assert_same(got, want)


def test_long_targets_on_tiles_smaller_than_the_target(monkeypatch):
    """A few hundred states on tiles of 32, checkpoints every 16 frames (each segment recomputed
    in a window of at most 33 states): item 0 (301 states, 160 frames) has a narrow band that
    moves across its 10 tiles; item 1 (41 states, 50 frames) a band two tiles wide."""
    monkeypatch.setattr(triton_gpu, "MAX_BLOCK", 32)
    T, C = 160, 6
    g = torch.Generator().manual_seed(7)
    log_probs = torch.randn(T, 2, C, generator=g).log_softmax(-1)
    targets = torch.randint(1, C, (2, 150), generator=g)
    steps = torch.randint(1, C - 1, (150,), generator=g)
    targets[0] = steps.cumsum(0) % (C - 1) + 1  # no repeats: 150 labels fit 160 frames
    il, tl = torch.tensor([T, 50]), torch.tensor([150, 20])
    assert triton_gpu._block(301)[0] == 32
    got, want = _align_both(log_probs, targets, il, tl, delay_penalty=0.01, checkpoint_every=16)
    assert bool(want.aligned.all())
    _assert_same(got, want)


def test_infeasible_items_come_out_as_from_the_other_backends():
    """Too few frames for the target; a target class at -inf on every frame; no frames with an
    empty target (the empty path, score 0) and with a target (no path)."""
    logits, _, _, _ = random_batch(6, 5, 5, 2, seed=2, ragged=False)
    log_probs = logits.log_softmax(-1)
    log_probs[:, 2, 4] = -torch.inf
    targets = torch.tensor([[1, 2, 3], [1, 1, 2], [4, 1, 0], [0, 0, 0], [2, 0, 0]])
    il, tl = torch.tensor([6, 3, 6, 0, 0]), torch.tensor([3, 3, 2, 0, 1])
    got, want = _align_both(log_probs, targets, il, tl)
    assert want.aligned.tolist() == [True, False, False, True, False]
    _assert_same(got, want)
    for impl in ("triton", "numba"):
        with pytest.raises(ValueError, match=r"items \[1, 4\] cannot be aligned"):
            ctclab.forced_align(log_probs.to(DEVICE), targets.to(DEVICE), il, tl, impl=impl)
    # the backend itself: no path, no states
    graph = CTCGraph.build(ctc_batch(log_probs, targets, il, tl, 0))
    states, path = triton_gpu.BACKEND.viterbi(graph, log_probs.to(DEVICE), None)
    assert path.tolist() == [pytest.approx(float(want.path_score[0]), rel=1e-6), -torch.inf, -torch.inf, 0.0, -torch.inf]
    assert bool((states.cpu()[1:] == -1).all())


def test_nan_inside_an_item_is_refused_before_the_kernel_and_ignored_beyond_it():
    logits, targets, il, tl = random_batch(6, 2, 4, 2, seed=4, ragged=False)
    log_probs = logits.log_softmax(-1)
    il = torch.tensor([6, 4])
    log_probs[5, 1, 0] = torch.nan  # beyond item 1's frames: padding
    got, want = _align_both(log_probs, targets, il, tl)
    _assert_same(got, want)
    log_probs[2, 0, 3] = torch.nan
    with pytest.raises(ValueError, match="item 0, frame 2"):
        ctclab.forced_align(log_probs.to(DEVICE), targets.to(DEVICE), il, tl, impl="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs(dtype):
    """forced_align hands the backend float32; the kernel also reads half scores natively, with
    the result of their float32 values."""
    logits, targets, il, tl = random_batch(8, 3, 5, 3, seed=6, repeats=True)
    log_probs = logits.log_softmax(-1).to(dtype)
    got, want = _align_both(log_probs, targets, il, tl)
    _assert_same(got, want)
    graph = CTCGraph.build(ctc_batch(log_probs, targets, il, tl, 0))
    native = triton_gpu.BACKEND.viterbi(graph, log_probs.to(DEVICE), None)
    widened = triton_gpu.BACKEND.viterbi(graph, log_probs.float().to(DEVICE), None)
    assert torch.equal(native[0], widened[0]) and torch.equal(native[1], widened[1])


def test_batch_first_scores_are_read_through_their_strides():
    logits, targets, il, tl = random_batch(7, 3, 5, 3, seed=10, repeats=True)
    log_probs = logits.log_softmax(-1)
    got = ctclab.forced_align(log_probs.transpose(0, 1).to(DEVICE), targets.to(DEVICE), il, tl, impl="triton",
                              batch_first=True)
    want = ctclab.forced_align(log_probs, targets, il, tl, impl="numba")
    _assert_same(got, want)


def test_float64_scores_accumulate_in_float64():
    logits, targets, il, tl = random_batch(8, 3, 5, 3, seed=8, dtype=torch.float64, repeats=True)
    got, want = _align_both(logits.log_softmax(-1), targets, il, tl, delay_penalty=0.2)
    assert got.path_score.dtype == torch.float64
    torch.testing.assert_close(got.path_score.cpu(), want.path_score, rtol=1e-13, atol=1e-12)
    assert torch.equal(got.states.cpu(), want.states)


def test_registered_for_viterbi_and_picked_by_auto_on_cuda_only():
    logits, targets, il, tl = random_batch(4, 2, 4, 1, seed=1)
    graph = CTCGraph.build(ctc_batch(logits, targets, il, tl, 0))
    assert "triton" in {b.name for b in backends.backends("viterbi")}
    assert backends.select("viterbi", "triton", graph, logits).viterbi is triton_gpu.viterbi
    assert backends.select("viterbi", "auto", graph, logits).name == "numba"  # CPU tensors: the CPU kernel
    if torch.cuda.is_available():
        assert backends.select("viterbi", "auto", graph, logits.cuda()).name == "triton"


def test_the_kernel_compiles_for_hopper_without_spills():
    """Compiled for sm_90 without a GPU (triton_support): each specialisation the backend
    launches — one tile or several, unit moves or not, delay or not, float32/bfloat16/float64."""
    from ctclab.backends import triton_viterbi

    def signature(scores, acc):
        return {"lp_ptr": scores, "stride_t": "i32", "stride_b": "i32", "stride_c": "i32", "labels_ptr": "*i32",
                "moves_ptr": acc, "entry_ptr": acc, "flags_ptr": "*i32", "band_ptr": "*i64", "term_ptr": acc,
                "lengths_ptr": "*i32", "num_states_ptr": "*i32", "scores_ptr": acc, "rows_ptr": "*i64",
                "packed_ptr": "*u8", "packed_offsets_ptr": "*i64", "states_ptr": "*i64", "path_ptr": "*fp64",
                "B": "i32", "T": "i32", "W": "i32", "K": "i32", "ONE_TILE": "constexpr", "UNIT": "constexpr",
                "DELAY": "constexpr", "BLOCK": "constexpr"}

    cases = [("*fp32", "*fp32", True, True, False, 256), ("*fp32", "*fp32", False, False, True, 1024),
             ("*bf16", "*fp32", False, True, True, 1024), ("*fp64", "*fp64", True, False, True, 256)]
    jobs = [triton_support.Compilation(triton_viterbi._viterbi_kernel, signature(scores, acc),
                                       {"ONE_TILE": one, "UNIT": unit, "DELAY": delay, "BLOCK": block},
                                       triton_gpu._block(block)[1])
            for scores, acc, one, unit, delay, block in cases]
    for case, resources in zip(cases, triton_support.compile_many(jobs)):
        print(case, resources)
        assert resources.arch == "sm90"
        assert 0 < resources.registers <= 255
        assert resources.spill_bytes == 0, resources
