
import pytest
import torch
from conftest import random_batch
from oracle import alignments, collapse

from ctclab.align import (
    STAR,
    alignment_posteriors,
    forced_align,
    frames_to_seconds,
    token_spans,
    word_spans,
)

IMPLS = ["numba", "reference"]


def best_brute_force(lp, target):
    T, C = lp.shape
    paths = alignments(T, C, target)
    scores = [sum(float(lp[t, k]) for t, k in enumerate(p)) for p in paths]
    return max(scores)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,target", [(1, [1]), (3, [1]), (4, [1, 1]), (5, [1, 2, 1]), (5, [2, 2]), (6, [1, 2, 2]), (4, [])])
def test_path_is_the_exact_maximum(impl, T, target):
    for seed in range(3):
        lp = torch.randn(T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
        ali = forced_align(lp, torch.tensor(target, dtype=torch.long), impl=impl)
        assert ali.path_score.item() == pytest.approx(best_brute_force(lp, target), abs=1e-12)
        assert ali.scores.sum().item() == pytest.approx(ali.path_score.item(), abs=1e-12)
        assert collapse(ali.labels.tolist()) == target
        torch.testing.assert_close(ali.scores, lp.gather(1, ali.labels[:, None])[:, 0])


def test_ties_are_broken_the_same_documented_way():
    """Uniform emissions: every alignment ties. Both implementations return the same path, the
    one whose states are entered as late as possible."""
    lp = torch.full((6, 4), -1.0)
    target = torch.tensor([1, 2])
    paths = [forced_align(lp, target, impl=impl).labels.tolist() for impl in IMPLS]
    assert paths[0] == paths[1] == [0, 0, 0, 1, 2, 0]
    rep = [forced_align(lp, torch.tensor([1, 1]), impl=impl).labels.tolist() for impl in IMPLS]
    assert rep[0] == rep[1] == [0, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("topology,delay", [("standard", 0.0), ("modified", 0.0), ("standard", 0.4)])
def test_batch_equals_per_item_and_kernel_equals_torch(topology, delay):
    logits, targets, il, tl = random_batch(40, 6, 7, 12, seed=3, repeats=True)
    lp = logits.log_softmax(-1)
    kernel = forced_align(lp, targets, il, tl, impl="numba", topology=topology, delay_penalty=delay)
    reference = forced_align(lp, targets, il, tl, impl="reference", topology=topology, delay_penalty=delay)
    torch.testing.assert_close(kernel.path_score, reference.path_score)
    assert torch.equal(kernel.states, reference.states)
    for b in range(6):
        one = forced_align(lp[: il[b], b], targets[b, : tl[b]], impl="numba", topology=topology, delay_penalty=delay)
        assert torch.equal(one.labels, kernel.labels[b, : il[b]])
        assert (kernel.labels[b, il[b] :] == 0).all() and (kernel.scores[b, il[b] :] == 0).all()


@pytest.mark.parametrize("every", [1, 3, 7, 1000])
def test_checkpointing_gives_the_same_path(every):
    logits, targets, il, tl = random_batch(50, 4, 6, 15, seed=4)
    lp = logits.log_softmax(-1)
    full = forced_align(lp, targets, il, tl)
    ckpt = forced_align(lp, targets, il, tl, checkpoint_every=every)
    assert torch.equal(full.states, ckpt.states)
    torch.testing.assert_close(full.path_score, ckpt.path_score)


def test_infeasible_items_raise_or_are_skipped():
    lp = torch.randn(5, 3, 4).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3], [1, 1, 1], [2, 3, 1]])
    il = torch.tensor([5, 4, 5])  # item 1 needs 3 labels + 2 blanks = 5 frames
    with pytest.raises(ValueError, match=r"items \[1\]"):
        forced_align(lp, targets, il)
    ali = forced_align(lp, targets, il, skip_infeasible=True)
    assert ali.aligned.tolist() == [True, False, True]
    assert (ali.labels[1] == 0).all() and ali.path_score[1] == -torch.inf
    assert collapse(ali.labels[0].tolist()) == [1, 2, 3]


def test_wildcard_absorbs_audio_missing_from_the_transcript():
    # audio says "3 3 1 2" but the transcript only has "1 2": frames 0-5 belong to nothing in it
    T, C = 12, 4
    frames = [3, 0, 3, 0, 0, 0, 1, 1, 0, 2, 2, 0]
    lp = torch.full((T, C), -8.0)
    lp[torch.arange(T), torch.tensor(frames)] = -0.01
    plain = forced_align(lp, torch.tensor([1, 2]))
    starred = forced_align(lp, torch.tensor([STAR, 1, 2]), star=2.0)
    assert collapse(starred.labels.tolist(), blank=0) == [STAR, 1, 2]
    spans = token_spans(starred)[0]
    assert [(s.token, s.start) for s in spans][1:] == [(1, 6), (2, 9)]
    assert starred.path_score > plain.path_score
    with pytest.raises(ValueError, match="star"):
        forced_align(lp, torch.tensor([STAR, 1, 2]))


def test_token_and_word_spans():
    labels = torch.tensor([[0, 1, 1, 0, 2, 3, 3, 0, 4, 0]])
    scores = torch.log(torch.tensor([[0.9, 0.8, 0.6, 0.9, 0.5, 1.0, 0.5, 0.9, 0.7, 0.9]]))
    (spans,) = token_spans((labels, scores))
    assert [(s.token, s.start, s.end) for s in spans] == [(1, 1, 3), (2, 4, 5), (3, 5, 7), (4, 8, 9)]
    assert spans[0].score == pytest.approx(0.7) and len(spans[0]) == 2
    words = word_spans(spans, word_lengths=[2, 2])
    assert [(w.start, w.end) for w in words] == [(1, 5), (5, 9)]
    assert words[0].score == pytest.approx((0.7 * 2 + 0.5) / 3)
    by_separator = word_spans(spans, separator=3)
    assert [(w.start, w.end, len(w.tokens)) for w in by_separator] == [(1, 5, 2), (8, 9, 1)]
    assert frames_to_seconds(50, 0.02) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="word_lengths"):
        word_spans(spans, word_lengths=[1, 1])
    with pytest.raises(ValueError, match="exactly one"):
        word_spans(spans)
    with pytest.raises(ValueError, match="frame_shift"):
        frames_to_seconds(1, 0)


def test_repeated_tokens_are_separate_spans():
    lp = torch.full((5, 3), -5.0)
    lp[[0, 2], 1] = 0.0
    lp[[1, 3, 4], 0] = 0.0
    ali = forced_align(lp, torch.tensor([1, 1]))
    assert [(s.token, s.start, s.end) for s in token_spans(ali)[0]] == [(1, 0, 1), (1, 2, 3)]


def test_posterior_confidence_is_a_probability_and_is_one_on_a_forced_path():
    logits, targets, il, tl = random_batch(30, 3, 5, 6, seed=6)
    lp = logits.log_softmax(-1)
    ali = forced_align(lp, targets, il, tl)
    post = alignment_posteriors(lp, targets, ali, il, tl)
    assert ((post >= 0) & (post <= 1 + 1e-6)).all()
    spans = token_spans(ali, posteriors=post)
    assert all(0 <= s.confidence <= 1 + 1e-6 for item in spans for s in item)
    # T = L: a single path, every frame certain
    forced = forced_align(lp[:3, 0], torch.tensor([1, 2, 3]))
    assert torch.allclose(alignment_posteriors(lp[:3, 0], torch.tensor([1, 2, 3]), forced), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(targets=torch.tensor([[0, 1]])), ValueError, "blank"),
        (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
        (dict(impl="gpu"), ValueError, "impl"),
        (dict(star="x"), TypeError, "star"),
        (dict(log_probs=torch.zeros(4, 1, 3, dtype=torch.long)), TypeError, "log_probs"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(log_probs=torch.randn(4, 1, 3).log_softmax(-1), targets=torch.tensor([[1, 2]]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        forced_align(**args)
