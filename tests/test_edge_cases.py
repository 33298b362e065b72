"""No silent wrong answers: NaN and impossible inputs, edge shapes, memory, batch-major input,
and the Alignment's own trellis options. Each test reproduces a case that once gave a wrong
answer without a word (see the issue "No silent wrong answers")."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch
from oracle import state_paths

import ctclab
from ctclab import alignment_posteriors, alignment_targets, ctc_loss, forced_align, state_occupation, token_spans
from ctclab.backends import reference
from ctclab.backends.cuda_builtin import builtin_cuda_nll
from ctclab._memory import InsufficientMemoryError
from ctclab.trellis import CTCTrellis

NAN = float("nan")
INF = float("inf")


def small_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(10, 3, 6, generator=g, dtype=dtype).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3], [2, 2, 4], [5, 1, 1]])
    return lp, targets, torch.tensor([10, 7, 9]), torch.tensor([3, 3, 2])


def losses_and_grads(fn, lp, *args, **kw):
    x = lp.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


# the loss's implementations, including the PyTorch routes of other devices run on CPU tensors
LOSSES = {
    "builtin": lambda lp, tg, il, tl, **kw: F.ctc_loss(lp, tg, il, tl, reduction="none", **kw),
    "fused": lambda lp, tg, il, tl, **kw: ctc_loss(lp, tg, il, tl, reduction="none", impl="fused", **kw),
    "autograd": lambda lp, tg, il, tl, **kw: ctc_loss(lp, tg, il, tl, reduction="none", impl="autograd", **kw),
}


def _trellis(lp, tg, il, tl):
    return CTCTrellis.build(ctclab._inputs.ctc_batch(lp, tg, il, tl))


LOSSES["fused-torch"] = lambda lp, tg, il, tl: reference.loss(_trellis(lp, tg, il, tl), lp)
LOSSES["cuda-builtin-route"] = lambda lp, tg, il, tl: builtin_cuda_nll(lp, tg, il, tl, 0)


@pytest.fixture(params=["fused", "autograd", "autograd-float32", "fused-torch", "cuda-builtin-route"])
def loss_fn(request, monkeypatch):
    if request.param == "autograd-float32":
        monkeypatch.setattr("ctclab.scaled.SMALL_FRAME", 0)
        return LOSSES["autograd"]
    return LOSSES[request.param]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_in_a_read_score_makes_that_items_loss_and_gradient_nan(loss_fn, dtype):
    lp, tg, il, tl = small_batch(dtype=dtype)
    clean_loss, clean_grad = losses_and_grads(loss_fn, lp, tg, il, tl)
    bad = lp.clone()
    bad[3, 0, 2] = NAN  # class 2 is in item 0's target
    bad[2, 1, 0] = NAN  # blank, read by every item
    loss, grad = losses_and_grads(loss_fn, bad, tg, il, tl)
    assert torch.isnan(loss[:2]).all()
    torch.testing.assert_close(loss[2], clean_loss[2])
    for b in (0, 1):
        assert torch.isnan(grad[:, b]).any()
        assert not torch.isnan(grad[il[b]:, b]).any()  # frames beyond the input stay 0
        assert (grad[il[b]:, b] == 0).all()
    torch.testing.assert_close(grad[:, 2], clean_grad[:, 2])


def test_nan_loss_matches_the_builtin_on_every_entry_count():
    """The built-in's NaN item has a NaN gradient on every class of its frames; so does fused."""
    lp, tg, il, tl = small_batch(dtype=torch.float32)
    lp[3, 0, 2] = NAN
    ref = losses_and_grads(LOSSES["builtin"], lp, tg, il, tl)
    got = losses_and_grads(LOSSES["fused"], lp, tg, il, tl)
    assert torch.equal(torch.isnan(got[0]), torch.isnan(ref[0]))
    assert torch.equal(torch.isnan(got[1]), torch.isnan(ref[1]))


def test_nan_in_a_class_no_state_reads_leaves_the_loss_and_other_entries_alone(loss_fn):
    lp, tg, il, tl = small_batch()
    bad = lp.clone()
    bad[3, 0, 5] = NAN  # class 5 is not in item 0's target
    ref_loss, ref_grad = losses_and_grads(LOSSES["builtin"], bad, tg, il, tl)
    loss, grad = losses_and_grads(loss_fn, bad, tg, il, tl)
    torch.testing.assert_close(loss, ref_loss)
    nan = torch.isnan(grad)
    assert int(nan.sum()) <= int(torch.isnan(ref_grad).sum()) == 1  # only the entry it touches, if any
    assert not nan[:, 1:].any()
    # everywhere else the true gradient: that of the NaN-free input
    _, clean_grad = losses_and_grads(loss_fn, lp, tg, il, tl)
    keep = ~nan
    keep[3, 0, 5] = False
    torch.testing.assert_close(grad[keep], clean_grad[keep])


def test_nan_beyond_an_items_length_changes_nothing(loss_fn):
    lp, tg, il, tl = small_batch()
    bad = lp.clone()
    bad[8:, 1] = NAN  # item 1 has 7 frames
    ref = losses_and_grads(loss_fn, lp, tg, il, tl)
    got = losses_and_grads(loss_fn, bad, tg, il, tl)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_nan_survives_reductions_and_zero_infinity():
    lp, tg, il, tl = small_batch()
    lp[0, 0, 0] = NAN
    for impl in ("fused", "autograd"):
        for reduction in ("mean", "sum"):
            for zero_infinity in (False, True):
                loss = ctc_loss(lp, tg, il, tl, reduction=reduction, zero_infinity=zero_infinity, impl=impl)
                assert torch.isnan(loss), (impl, reduction, zero_infinity)


def test_a_masked_nan_item_gets_a_zero_gradient():
    """A NaN guard that drops the NaN item (upstream gradient 0) gets a clean gradient."""
    lp, tg, il, tl = small_batch()
    lp[0, 0, 0] = NAN
    x = lp.clone().requires_grad_(True)
    losses = ctc_loss(x, tg, il, tl, reduction="none", impl="fused")
    torch.where(torch.isnan(losses), 0.0, losses).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 0] == 0).all()


def test_alignment_targets_of_a_nan_item_are_nan():
    lp, tg, il, tl = small_batch()
    clean = alignment_targets(lp, tg, il, tl)
    lp[4, 1, 3] = NAN
    gamma = alignment_targets(lp, tg, il, tl)
    assert torch.isnan(gamma[: il[1], 1]).all() and (gamma[il[1]:, 1] == 0).all()
    torch.testing.assert_close(gamma[:, [0, 2]], clean[:, [0, 2]])


# -- forced alignment without a path ----------------------------------------------------------

def _no_path_cases():
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(6, 2, 4, generator=g, dtype=torch.float64).log_softmax(-1)
    all_inf = lp.clone()
    all_inf[:, 1] = -INF
    class_inf = lp.clone()
    class_inf[:, 1, 3] = -INF  # item 1's target holds class 3
    targets = torch.tensor([[1, 2], [3, 1]])
    yield "all -inf", all_inf, targets, {}
    yield "a target class -inf on every frame", class_inf, targets, {}
    yield "star=inf", lp, torch.tensor([[1, 2], [-1, 1]]), {"star": INF}


@pytest.mark.parametrize("impl", ["numba", "reference"])
@pytest.mark.parametrize("case", list(_no_path_cases()), ids=lambda c: c[0])
def test_forced_align_never_returns_an_empty_alignment_silently(impl, case):
    _, lp, targets, kw = case
    with pytest.raises(ValueError, match=r"items \[1\] cannot be aligned.*skip_infeasible"):
        forced_align(lp, targets, impl=impl, **kw)
    ali = forced_align(lp, targets, impl=impl, skip_infeasible=True, **kw)
    assert ali.aligned.tolist() == [True, False]
    assert ali.path_score[1] == -INF and (ali.states[1] == -1).all()


@pytest.mark.parametrize("case", list(_no_path_cases()), ids=lambda c: c[0])
def test_kernel_and_torch_alignments_agree_on_items_without_a_path(case):
    _, lp, targets, kw = case
    a = forced_align(lp, targets, impl="numba", skip_infeasible=True, **kw)
    b = forced_align(lp, targets, impl="reference", skip_infeasible=True, **kw)
    for x, y in zip((a.labels, a.scores, a.states, a.path_score, a.aligned), (b.labels, b.scores, b.states, b.path_score, b.aligned)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("impl", ["numba", "reference"])
def test_forced_align_refuses_nan_naming_item_and_frame(impl):
    lp, tg, il, tl = small_batch()
    lp[4, 2, 5] = NAN
    with pytest.raises(ValueError, match="item 2, frame 4"):
        forced_align(lp, tg, il, tl, impl=impl)
    with pytest.raises(ValueError, match="item 2, frame 4"):
        state_occupation(lp, tg, il, tl)
    clean = small_batch()[0]
    clean[8:, 1] = NAN  # beyond item 1's 7 frames: ignored
    ref = forced_align(small_batch()[0], tg, il, tl, impl=impl)
    got = forced_align(clean, tg, il, tl, impl=impl)
    assert torch.equal(got.states, ref.states)


# -- edge shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_no_frames_at_all_behaves_like_the_builtin(impl, zero_infinity):
    targets = torch.ones(2, 2, dtype=torch.long)
    for T, il, tl in ((0, [0, 0], [2, 2]), (5, [0, 0], [2, 2]), (5, [0, 0], [0, 0]), (0, [0, 0], [0, 2])):
        x = torch.randn(T, 2, 5).log_softmax(-1).requires_grad_(True)
        loss = ctc_loss(x, targets, torch.tensor(il), torch.tensor(tl), zero_infinity=zero_infinity, impl=impl)
        if T:  # the built-in refuses T = 0
            ref = F.ctc_loss(x, targets, torch.tensor(il), torch.tensor(tl), zero_infinity=zero_infinity)
            torch.testing.assert_close(loss, ref)
        losses = [math.inf if t else 0.0 for t in tl]
        expected = torch.tensor([0.0 if zero_infinity and math.isinf(v) else v for v in losses]).div(torch.tensor(tl).clamp(min=1)).mean()
        assert loss.item() == expected.item()
        loss.backward()
        assert x.grad is not None and (x.grad == 0).all()


@pytest.mark.parametrize("bad", [-0.5, INF, -INF, NAN])
def test_delay_penalty_must_be_finite_and_non_negative(bad):
    lp, tg, il, tl = small_batch()
    for call in (
        lambda: ctc_loss(lp, tg, il, tl, delay_penalty=bad),
        lambda: ctc_loss(lp, tg, il, tl, delay_penalty=bad, impl="autograd"),
        lambda: ctclab.CTCLoss(delay_penalty=bad),
        lambda: forced_align(lp, tg, il, tl, delay_penalty=bad),
        lambda: state_occupation(lp, tg, il, tl, delay_penalty=bad),
    ):
        with pytest.raises(ValueError, match="delay_penalty must be finite and >= 0"):
            call()
    with pytest.raises(TypeError, match="delay_penalty"):
        ctc_loss(lp, tg, il, tl, delay_penalty="0.1")


def test_an_empty_batch_is_refused_everywhere():
    lp = torch.randn(5, 0, 4).log_softmax(-1)
    empty = torch.zeros(0, dtype=torch.long)
    for call in (
        lambda: ctc_loss(lp, torch.zeros(0, 2, dtype=torch.long), empty, empty),
        lambda: ctc_loss(lp, torch.zeros(0, 2, dtype=torch.long), empty, empty, impl="autograd", reduction="sum"),
        lambda: forced_align(lp, torch.zeros(0, 2, dtype=torch.long), empty, empty),
        lambda: state_occupation(lp, torch.zeros(0, 2, dtype=torch.long), empty, empty),
    ):
        with pytest.raises(ValueError, match="empty batch"):
            call()


def test_zero_dimensional_lengths_for_a_batch_of_one(impl):
    """PyTorch's own test_CTCLoss_critical_target_len: 0-D lengths with a (T, 1, C) input."""
    N, S, C = 1, 256, 10
    g = torch.Generator().manual_seed(0)
    targets = 1 + torch.randint(1, C - 1, (N, S), generator=g).cumsum(1) % (C - 1)
    assert (targets[:, 1:] != targets[:, :-1]).all()  # no repeats: T = L is the critical, feasible length
    logits = torch.randn(S, N, C, generator=g, dtype=torch.float64)
    # gradients through log_softmax, where the built-in's and the true one agree
    ref = losses_and_grads(lambda x, *a, **k: F.ctc_loss(x.log_softmax(2), *a, **k), logits, targets, torch.tensor(S), torch.tensor(S), reduction="sum")
    got = losses_and_grads(lambda x, *a, **k: ctc_loss(x.log_softmax(2), *a, **k), logits, targets, torch.tensor(S), torch.tensor(S), reduction="sum", impl=impl)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    # a 0-D length still needs a batch of one
    with pytest.raises(ValueError, match=r"input_lengths must have shape \(B,\) = \(2,\)"):
        ctc_loss(torch.randn(5, 2, 4).log_softmax(-1), torch.ones(2, 1, dtype=torch.long), torch.tensor(5), torch.tensor([1, 1]))


# -- memory --------------------------------------------------------------------------------------

def test_calls_that_cannot_fit_fail_fast_saying_how_much_and_what_to_do(monkeypatch):
    monkeypatch.setattr("ctclab._memory.ALWAYS_FITS", 0)
    monkeypatch.setattr("ctclab._memory.available_bytes", lambda device: 2**20)  # 1 MiB
    lp = torch.zeros(4000, 1, 8)
    targets = torch.ones(1, 1000, dtype=torch.long)
    for call, advice in (
        (lambda: ctc_loss(lp, targets, [4000], [1000], impl="fused"), "shorter inputs"),
        (lambda: ctc_loss(lp.requires_grad_(), targets, [4000], [1000], impl="autograd"), "shorter inputs"),
        (lambda: state_occupation(lp, targets), "shorter inputs"),
        (lambda: forced_align(lp, 1 + torch.arange(1000)[None] % 7, impl="reference"), "shorter segments"),
    ):
        with pytest.raises(InsufficientMemoryError, match=rf"would need at least \d+ MiB .* 1 MiB is available: .*{advice}"):
            call()
    # the kernel's checkpointed Viterbi fits where the full one would not; by default the
    # alignment checkpoints itself to fit the memory available
    monkeypatch.setattr("ctclab._memory.available_bytes", lambda device: 5 * 2**20)
    lp = torch.zeros(12000, 1, 8)
    target = 1 + torch.arange(1000)[None] % 7
    with pytest.raises(InsufficientMemoryError, match="checkpoint_every"):
        forced_align(lp, target, checkpoint_every=12000)
    assert forced_align(lp, target, checkpoint_every=100).aligned.all()
    assert forced_align(lp, target).aligned.all()


def test_fused_scratch_is_per_busy_thread_not_per_core(monkeypatch):
    """One long item needs one T x S buffer, however many threads the machine has."""
    shapes = []
    import ctclab.backends.numba_cpu

    real = ctclab.backends.numba_cpu._workspace
    monkeypatch.setattr("ctclab.backends.numba_cpu._workspace", lambda name, shape: shapes.append((name, shape)) or real(name, shape))
    lp, tg, il, tl = random_batch(30, 1, 5, 6, seed=1)
    ctc_loss(lp.log_softmax(-1), tg, il, tl, impl="fused")
    assert all(shape[0] == 1 for _, shape in shapes) and shapes


def test_the_issue_case_of_a_96_gb_scratch_fails_fast():
    T, L = 100_000, 30_000
    needed = 8 * T * (2 * L + 1)  # one item's forward variables
    if ctclab._memory.available_bytes(torch.device("cpu")) > needed:
        pytest.skip("this machine has the memory for it")
    with pytest.raises(InsufficientMemoryError, match="GiB"):
        ctc_loss(torch.zeros(T, 1, 4), torch.ones(1, L, dtype=torch.long), [T], [L])


# -- the Alignment's own trellis options ---------------------------------------------------------

def test_alignment_remembers_its_blank_for_spans_and_posteriors():
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(12, 2, 6, generator=g, dtype=torch.float64).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3], [0, 0, 2]])  # blank is 5: class 0 is a label here
    ali = forced_align(lp, targets, blank=5)
    assert ali.blank == 5 and ali.item(0).blank == 5
    spans = token_spans(ali)
    assert [[s.token for s in item] for item in spans] == [[1, 2, 3], [0, 0, 2]]
    # the same problem with blank moved to 0 (classes 0 and 5 swapped) gives the same frames
    swap = torch.tensor([5, 1, 2, 3, 4, 0])
    ref = forced_align(lp[..., swap], torch.where(targets == 0, 5, targets))
    assert [[(s.start, s.end) for s in item] for item in token_spans(ref)] == [[(s.start, s.end) for s in item] for item in spans]
    post = alignment_posteriors(lp, targets, ali)
    torch.testing.assert_close(post, alignment_posteriors(lp[..., swap], torch.where(targets == 0, 5, targets), ref))
    with pytest.raises(ValueError, match="blank=0 contradicts the alignment"):
        token_spans(ali, blank=0)
    with pytest.raises(ValueError, match="blank=0 contradicts the alignment"):
        alignment_posteriors(lp, targets, ali, blank=0)


def _brute_force_state_posteriors(lp, target, entry_weight, topology="standard"):
    T = lp.shape[0]
    seqs, ext = state_paths(T, target, topology)
    scores = []
    for seq in seqs:
        score = sum(lp[t, 0 if ext[s] is None else ext[s]].item() for t, s in enumerate(seq))
        score += sum(entry_weight(t) for t, s in enumerate(seq) if ext[s] is not None and (t == 0 or seq[t - 1] != s))
        scores.append(score)
    m = max(scores)
    weights = [math.exp(s - m) for s in scores]
    post = torch.zeros(T, len(ext), dtype=torch.float64)
    for w, seq in zip(weights, seqs):
        for t, s in enumerate(seq):
            post[t, s] += w
    return post / sum(weights)


@pytest.mark.parametrize("topology", ["standard", "modified"])
def test_posteriors_of_a_delay_penalised_alignment_come_from_its_own_trellis(topology):
    T, target, lam = 6, [1, 1, 2], 0.8
    lp = torch.randn(T, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).log_softmax(-1)
    ali = forced_align(lp, torch.tensor(target), topology=topology, delay_penalty=lam)
    assert (ali.topology, ali.delay_penalty) == (topology, lam)
    expected = _brute_force_state_posteriors(lp, target, lambda t: -lam * (t - T / 2), topology)
    torch.testing.assert_close(state_occupation(lp, torch.tensor(target), topology=topology, delay_penalty=lam), expected)
    post = alignment_posteriors(lp, torch.tensor(target), ali)
    torch.testing.assert_close(post, expected[torch.arange(T), ali.states])
    plain = alignment_posteriors(lp, torch.tensor(target), ali, delay_penalty=None)
    torch.testing.assert_close(plain, post)
    with pytest.raises(ValueError, match="delay_penalty=0.0 contradicts"):
        alignment_posteriors(lp, torch.tensor(target), ali, delay_penalty=0.0)


def test_spans_and_posteriors_refuse_mismatched_arguments():
    lp, tg, il, tl = small_batch()
    ali = forced_align(lp, tg, il, tl)
    with pytest.raises(ValueError, match=r"alignment.states must have shape \(3, 9\)"):
        alignment_posteriors(lp[:9], tg, ali, il.clamp(max=9), tl)
    with pytest.raises(ValueError, match="posteriors must have the alignment's shape"):
        token_spans(ali, posteriors=torch.zeros(3, 4))
    with pytest.raises(TypeError, match="alignment must be"):
        token_spans(ali.labels)
    with pytest.raises(TypeError, match="alignment must be"):
        alignment_posteriors(lp, tg, ali.labels, il, tl)
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) or \(T,\)"):
        token_spans((torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)))


def test_loss_module_checks_and_shows_its_graph_options():
    loss = ctclab.CTCLoss(topology="modified", delay_penalty=0.1)
    assert "topology='modified'" in repr(loss) and "delay_penalty=0.1" in repr(loss)
    with pytest.raises(ValueError, match="topology must be one of"):
        ctclab.CTCLoss(topology="selfless-typo")


# -- batch-major input -------------------------------------------------------------------------

def test_batch_first_gives_the_time_major_results():
    lp, tg, il, tl = small_batch()
    ref = forced_align(lp, tg, il, tl)
    got = forced_align(lp.transpose(0, 1).contiguous(), tg, il, tl, batch_first=True)
    for x, y in zip((ref.labels, ref.scores, ref.states, ref.path_score), (got.labels, got.scores, got.states, got.path_score)):
        assert torch.equal(x, y)
    post = alignment_posteriors(lp.transpose(0, 1), tg, got, il, tl, batch_first=True)
    torch.testing.assert_close(post, alignment_posteriors(lp, tg, ref, il, tl))


def test_batch_major_input_without_batch_first_is_named_in_the_error():
    lp = torch.randn(1, 40, 5).log_softmax(-1)  # (B, T, C) from a Hugging Face model, B = 1
    with pytest.raises(ValueError, match="batch_first=True"):
        forced_align(lp, torch.tensor([[1, 2]]), input_lengths=torch.tensor([40]))
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        forced_align(lp, torch.tensor([[1, 2]]), batch_first="yes")


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_item_without_a_path_that_reads_nan_is_nan_not_inf_or_zero(impl, value):
    # item 1's target "1 1 4" needs 4 frames and has 2: no path, loss inf (0 under zero_infinity);
    # a NaN (or +inf) in a class it reads must still show, as the built-in's NaN does
    torch.manual_seed(0)
    lp = torch.randn(3, 3, 5, dtype=torch.float64).log_softmax(-1)
    lp[1, 1, 4] = value  # read by item 1 (class 4 is in its target), inside its 2 frames
    lp[0, 2, 3] = value  # item 2 has no path either, but class 3 is not one it reads
    targets = torch.tensor([[1, 2, 0], [1, 1, 4], [1, 1, 1]])
    il, tl = torch.tensor([3, 2, 2]), torch.tensor([2, 3, 3])
    builtin = F.ctc_loss(lp, targets, il, tl, reduction="none", zero_infinity=True)
    for zero_infinity in (False, True):
        x = lp.clone().requires_grad_(True)
        loss = ctclab.ctc_loss(x, targets, il, tl, reduction="none", zero_infinity=zero_infinity, impl=impl)
        assert torch.isnan(loss[1]) and torch.isnan(builtin[1])
        assert loss[2] == (0.0 if zero_infinity else math.inf)  # what it does not read changes nothing
        torch.testing.assert_close(loss[0], builtin[0])
        loss.sum().backward()
        assert torch.isnan(x.grad[:, 1]).any() and not torch.isnan(x.grad[:, 0]).any()
        if impl == "fused":  # (the autograd recursion's gradient of a pathless item is NaN if any score of its frames is)
            assert not torch.isnan(x.grad[:, 2]).any()
