"""No silent wrong answers: the variants, the target helpers and the vocabulary refuse bad input
with a ValueError/TypeError naming the argument, and accept every form ``ctc_loss`` accepts."""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import brute_force_weighted_paths

import ctclab
from ctclab import Vocabulary, alignment_targets, ctc_loss
from ctclab.targets import (
    focusing_weights,
    reweight_nonblank_proportion,
    smooth_targets,
    smoothing_prior,
    target_cross_entropy,
)
from ctclab.variants import LabelPrior, blank_penalty, entropy_regularised_ctc_loss, focal_ctc_loss

VARIANTS = {"focal": focal_ctc_loss, "entropy": entropy_regularised_ctc_loss}
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(6, 2, 4, generator=g, dtype=dtype).log_softmax(-1)
    targets = torch.tensor([[1, 2, 3], [2, 2, 0]])
    return lp, targets, torch.tensor([6, 5]), torch.tensor([3, 2])


# ---------------------------------------------------------------- focal and entropy-regularised CTC


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_refuse_an_unknown_reduction(name):
    lp, targets, il, tl = small_batch()
    with pytest.raises(ValueError, match="reduction must be one of"):
        VARIANTS[name](lp, targets, il, tl, reduction="nonee")


def test_focal_refuses_an_unknown_impl():
    lp, targets, il, tl = small_batch()
    with pytest.raises(ValueError, match="impl must be one of"):
        focal_ctc_loss(lp, targets, il, tl, impl="cuda")


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_variants_accept_none_lengths_as_full_length(name, reduction):
    lp, targets, _, _ = small_batch()
    targets = torch.tensor([[1, 2, 3], [2, 1, 3]])
    full = torch.tensor([6, 6]), torch.tensor([3, 3])
    torch.testing.assert_close(
        VARIANTS[name](lp, targets, None, None, reduction=reduction),
        VARIANTS[name](lp, targets, *full, reduction=reduction),
    )


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_variants_at_zero_strength_are_ctc_loss_on_every_input_form(name, reduction):
    lp, targets, il, tl = small_batch()
    kwargs = dict(alpha=1.0, gamma=0.0) if name == "focal" else dict(beta=0.0)
    fn = VARIANTS[name]
    concatenated = torch.cat([targets[b, : tl[b]] for b in range(2)])
    for args in [(lp, targets, il, tl), (lp, concatenated, il, tl), (lp, targets, il.tolist(), tl.tolist())]:
        torch.testing.assert_close(fn(*args, reduction=reduction, **kwargs), ctc_loss(*args, reduction=reduction))
    # unbatched (T, C): a scalar, whatever the reduction, also with lengths as ints or None
    one = (lp[:, 0], targets[0], 6, 3)
    expected = ctc_loss(*one, reduction=reduction)
    assert expected.shape == ()
    torch.testing.assert_close(fn(*one, reduction=reduction, **kwargs), expected)
    torch.testing.assert_close(fn(lp[:, 0], targets[0], None, None, reduction=reduction, **kwargs), expected)
    torch.testing.assert_close(fn(lp[:, 0], targets[0], torch.tensor(6), torch.tensor(3), reduction=reduction, **kwargs), expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_forward_topology_and_delay_penalty(name):
    lp, targets, il, tl = small_batch(1)
    kwargs = dict(alpha=1.0, gamma=0.0) if name == "focal" else dict(beta=0.0)
    for options in [dict(topology="modified"), dict(delay_penalty=0.5), dict(topology="modified", delay_penalty=0.3)]:
        expected = ctc_loss(lp, targets, il, tl, reduction="none", **options)
        assert not torch.allclose(expected, ctc_loss(lp, targets, il, tl, reduction="none"))
        torch.testing.assert_close(VARIANTS[name](lp, targets, il, tl, reduction="none", **kwargs, **options), expected)
    with pytest.raises(ValueError, match="topology"):
        VARIANTS[name](lp, targets, il, tl, topology="k2")


@pytest.mark.parametrize("topology", ["standard", "modified"])
@pytest.mark.parametrize("lam", [0.0, 0.6])
def test_entropy_regularisation_with_topology_and_delay_penalty_against_brute_force(topology, lam):
    """The path entropy is that of the posterior over paths the loss itself defines: with a
    delay penalty its path weights count (H = -L - sum gamma log y + lam dL/dlam)."""
    T, target, beta = 5, [1, 1], 0.4
    lp = torch.randn(T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).log_softmax(-1)
    nll, entropy = brute_force_weighted_paths(lp, target, topology=topology, entry_weight=lambda t: -lam * (t - T / 2))
    got = entropy_regularised_ctc_loss(
        lp, torch.tensor(target), T, 2, beta=beta, reduction="sum", topology=topology, delay_penalty=lam
    )
    assert got.item() == pytest.approx(nll - beta * entropy, rel=1e-10)
    # batched and ragged: each item its own entropy
    lp2, targets, il, tl = small_batch(5)
    per_item = entropy_regularised_ctc_loss(lp2, targets, il, tl, beta=beta, reduction="none", topology=topology, delay_penalty=lam)
    for b in range(2):
        n, h = brute_force_weighted_paths(
            lp2[: il[b], b], targets[b, : tl[b]].tolist(), topology=topology, entry_weight=lambda t: -lam * (t - int(il[b]) / 2)
        )
        assert per_item[b].item() == pytest.approx(n - beta * h, rel=1e-10)


def test_entropy_regularisation_with_delay_penalty_is_twice_differentiable():
    z = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    targets, il, tl = torch.tensor([[1, 2], [2, 0]]), torch.tensor([4, 3]), torch.tensor([2, 1])
    f = lambda x: entropy_regularised_ctc_loss(x.log_softmax(-1), targets, il, tl, beta=0.3, reduction="none", delay_penalty=0.4)
    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))


@pytest.mark.parametrize("name,param", [("focal", "alpha"), ("focal", "gamma"), ("entropy", "beta")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_variant_strengths_must_be_finite(name, param, value):
    lp, targets, il, tl = small_batch()
    with pytest.raises(ValueError, match=param):
        VARIANTS[name](lp, targets, il, tl, **{param: value})


@pytest.mark.parametrize("name,param", [("focal", "alpha"), ("focal", "gamma"), ("entropy", "beta")])
def test_variant_strengths_must_be_numbers(name, param):
    lp, targets, il, tl = small_batch()
    for value in ["2", None, True]:
        with pytest.raises(TypeError, match=param):
            VARIANTS[name](lp, targets, il, tl, **{param: value})


def test_focal_gradient_is_finite_at_a_zero_loss_and_a_fractional_gamma():
    # one frame, one label certain: the loss is exactly 0 and (1 - p)^gamma has an infinite slope there
    z = torch.tensor([[[-200.0, 0.0, -200.0]], [[0.0, -200.0, -200.0]]], dtype=torch.float64, requires_grad=True)
    loss = focal_ctc_loss(z.log_softmax(-1), torch.tensor([[1]]), [2], [1], gamma=0.5, reduction="sum")
    assert loss.item() < 1e-12
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(g).all()


def test_focal_zero_infinity_and_infeasible_items():
    lp, targets, il, tl = small_batch()
    il = torch.tensor([2, 5])  # item 0 cannot fit its 3 labels in 2 frames
    for name, fn in VARIANTS.items():
        losses = fn(lp, targets, il, tl, reduction="none")
        assert math.isinf(losses[0].item()) and math.isfinite(losses[1].item()), name
        zeroed = fn(lp, targets, il, tl, reduction="none", zero_infinity=True)
        assert zeroed[0].item() == 0 and zeroed[1].item() == pytest.approx(losses[1].item())


# ---------------------------------------------------------------- blank penalty and label priors


def test_blank_penalty_validates_blank_and_beta():
    lp = small_batch()[0]
    for blank in (-1, 4, 10):
        with pytest.raises(ValueError, match="blank"):
            blank_penalty(lp, 1.0, blank)
    with pytest.raises(TypeError, match="blank"):
        blank_penalty(lp, 1.0, 1.0)
    for beta in (math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            blank_penalty(lp, beta)
    with pytest.raises(TypeError, match="log_probs"):
        blank_penalty(lp.tolist(), 1.0)
    shifted = blank_penalty(lp, 2.0, blank=3)
    torch.testing.assert_close(shifted[..., 3], lp[..., 3] - 2.0)
    torch.testing.assert_close(shifted[..., :3], lp[..., :3])


def test_label_prior_validates_its_options():
    for num_classes, error in [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)]:
        with pytest.raises(error, match="num_classes"):
            LabelPrior(num_classes)
    for lam in (math.nan, math.inf):
        with pytest.raises(ValueError, match="lam"):
            LabelPrior(4, lam=lam)
    with pytest.raises(ValueError, match="momentum"):
        LabelPrior(4, momentum=math.nan)
    for blank in (-1, 4):
        with pytest.raises(ValueError, match="blank"):
            LabelPrior(4, blank=blank)


def test_label_prior_update_refuses_nan_and_keeps_its_prior():
    lp, _, il, _ = small_batch()
    prior = LabelPrior(4, momentum=0.5)
    prior.update(lp, il)
    before = prior.log_prior.clone()
    bad = lp.clone()
    bad[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        prior.update(bad, il)
    torch.testing.assert_close(prior.log_prior, before)
    # NaN beyond an item's input length is padding, ignored
    bad = lp.clone()
    bad[5, 1] = math.nan
    prior.update(bad, il)
    assert torch.isfinite(prior.log_prior).all()


def test_label_prior_update_checks_shapes_and_lengths():
    lp, _, il, _ = small_batch()
    prior = LabelPrior(4)
    with pytest.raises(ValueError, match="num_classes"):
        prior.update(lp[..., :3])
    with pytest.raises(ValueError, match="num_classes"):
        prior.adjust(lp[..., :3])
    with pytest.raises(ValueError, match="log_probs"):
        prior.update(lp[0, 0])
    with pytest.raises(ValueError, match="input_lengths"):
        prior.update(lp, [6, 6, 6])
    with pytest.raises(ValueError, match="input_lengths"):
        prior.update(lp, [7, 6])
    with pytest.raises(TypeError, match="input_lengths"):
        prior.update(lp, torch.tensor([6.0, 5.0]))


def test_label_prior_update_unbatched_and_without_frames():
    lp, _, _, _ = small_batch()
    a, b = LabelPrior(4), LabelPrior(4)
    a.update(lp[:, 0], 5)
    b.update(lp[:, :1], [5])
    torch.testing.assert_close(a.log_prior, b.log_prior)
    torch.testing.assert_close(a.log_prior.exp(), lp[:5, 0].exp().mean(0).float())
    c = LabelPrior(4)
    before = c.log_prior.clone()
    c.update(lp, [0, 0])  # nothing seen: nothing learnt
    torch.testing.assert_close(c.log_prior, before)
    assert not c.seen


# ---------------------------------------------------------------- label smoothing


def test_smooth_targets_on_one_utterance_keeps_its_shape():
    lp, targets, il, tl = small_batch()
    gamma = alignment_targets(lp, targets, il, tl)
    batched = smooth_targets(gamma[:, 1:], 0.2, "nonblank", input_lengths=il[1:])
    assert batched.shape == (6, 1, 4)
    for lengths in (5, [5], torch.tensor(5), torch.tensor([5]), torch.tensor([5], dtype=torch.int32)):
        q = smooth_targets(gamma[:, 1], 0.2, "nonblank", input_lengths=lengths)
        assert q.shape == (6, 4)
        torch.testing.assert_close(q, batched[:, 0])
    assert (q[5] == 0).all() and (q[:5].sum(-1) - 1).abs().max() < 1e-12
    assert smooth_targets(gamma[:, 1], 0.2).shape == (6, 4)


@pytest.mark.parametrize("prior", ["uniform", "nonblank"])
def test_smooth_targets_refuses_a_blank_out_of_range(prior):
    gamma = torch.full((5, 2, 4), 0.25)
    for blank in (-1, -4, 4, 7):
        with pytest.raises(ValueError, match="blank"):
            smooth_targets(gamma, 0.1, prior, blank=blank)
    with pytest.raises(TypeError, match="blank"):
        smooth_targets(gamma, 0.1, prior, blank=1.0)
    q = smooth_targets(gamma, 0.1, "nonblank", blank=3)
    torch.testing.assert_close(q[..., 3], torch.full((5, 2), 0.9 * 0.25))


def test_smooth_targets_refuses_bad_priors():
    gamma = torch.full((5, 2, 4), 0.25)
    for bad in ([0.5, math.nan, 0.25, 0.25], [0.5, math.inf, 0.0, 0.0], [1.0, -0.5, 0.25, 0.25], [0.0] * 4):
        with pytest.raises(ValueError, match="prior"):
            smooth_targets(gamma, 0.1, torch.tensor(bad))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        smooth_targets(gamma, 0.1, torch.ones(5))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        smooth_targets(gamma, 0.1, torch.ones(1, 4))
    with pytest.raises(TypeError, match="prior"):
        smooth_targets(gamma, 0.1, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="prior"):
        smooth_targets(gamma, 0.1, [0.25] * 4)
    q = smooth_targets(gamma, 0.5, torch.tensor([2, 1, 1, 0]))  # integer weights are normalised
    torch.testing.assert_close(q[0, 0], torch.tensor([0.375, 0.25, 0.25, 0.125]))


def test_smooth_targets_refuses_bad_eps_gamma_and_lengths():
    gamma = torch.full((5, 2, 4), 0.25)
    for eps in (math.nan, math.inf, -0.1, 1.5):
        with pytest.raises(ValueError, match="eps"):
            smooth_targets(gamma, eps)
    with pytest.raises(TypeError, match="eps"):
        smooth_targets(gamma, "0.1")
    for bad in (torch.ones(4), torch.ones(5, 2, 3, 4)):
        with pytest.raises(ValueError, match="gamma"):
            smooth_targets(bad, 0.1)
    with pytest.raises(TypeError, match="gamma"):
        smooth_targets(torch.ones(5, 2, 4, dtype=torch.int64), 0.1)
    for lengths in ([5], [5, 5, 5], torch.tensor([[5, 5]]), 5):
        with pytest.raises(ValueError, match="input_lengths"):
            smooth_targets(gamma, 0.1, input_lengths=lengths)
    for lengths in ([6, 5], [5, -1]):
        with pytest.raises(ValueError, match="input_lengths"):
            smooth_targets(gamma, 0.1, input_lengths=lengths)
    with pytest.raises(TypeError, match="input_lengths"):
        smooth_targets(gamma, 0.1, input_lengths=[5.0, 5.0])


def test_smoothing_prior_validates():
    with pytest.raises(ValueError, match="num_classes"):
        smoothing_prior(0)
    with pytest.raises(ValueError, match="blank"):
        smoothing_prior(4, "nonblank", blank=-1)


# ---------------------------------------------------------------- re-weighting, focusing, cross-entropy


def test_reweight_accepts_every_target_form_and_one_utterance():
    lp, targets, il, tl = small_batch(2)
    gamma = alignment_targets(lp, targets, il, tl)
    q = reweight_nonblank_proportion(gamma, targets, tl, 0.3, input_lengths=il)
    concatenated = torch.cat([targets[b, : tl[b]] for b in range(2)])
    torch.testing.assert_close(reweight_nonblank_proportion(gamma, concatenated, tl, 0.3, input_lengths=il), q)
    padded = torch.where(torch.arange(3) < tl[:, None], targets, -1)  # padding is ignored, whatever it holds
    torch.testing.assert_close(reweight_nonblank_proportion(gamma, padded, tl.tolist(), 0.3, input_lengths=il), q)
    one = reweight_nonblank_proportion(gamma[:, 1], targets[1, :2], 2, 0.3, input_lengths=5)
    assert one.shape == (6, 4)
    torch.testing.assert_close(one, q[:, 1])


def test_reweight_has_no_overflow_near_the_ends_of_a():
    lp, targets, il, tl = small_batch(2)
    gamma = alignment_targets(lp, targets, il, tl)
    inside = torch.arange(6)[:, None] < il[None]
    for a in (1e-320, 1e-200, 1 - 1e-16):
        q = reweight_nonblank_proportion(gamma, targets, tl, a, input_lengths=il)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(-1)[inside], torch.ones(int(inside.sum()), dtype=q.dtype))
    # a -> 0: the blank takes every frame where it has mass
    q = reweight_nonblank_proportion(gamma, targets, tl, 1e-320, input_lengths=il)
    assert torch.equal(q[..., 0][inside] > 0.5, gamma[..., 0][inside] > 0)


def test_reweight_refuses_bad_input():
    lp, targets, il, tl = small_batch(2)
    gamma = alignment_targets(lp, targets, il, tl)
    for a in (math.nan, math.inf, 0.0, 1.0):
        with pytest.raises(ValueError, match="a must"):
            reweight_nonblank_proportion(gamma, targets, tl, a)
    with pytest.raises(ValueError, match="targets"):
        reweight_nonblank_proportion(gamma, torch.tensor([[1, 7, 1], [2, 2, 0]]), tl, 0.3)
    with pytest.raises(ValueError, match="blank"):
        reweight_nonblank_proportion(gamma, targets, tl, 0.3, blank=-1)
    with pytest.raises(ValueError, match="target_lengths"):
        reweight_nonblank_proportion(gamma, targets, [3, 2, 1], 0.3)
    with pytest.raises(ValueError, match="input_lengths"):
        reweight_nonblank_proportion(gamma, targets, tl, 0.3, input_lengths=[7, 5])


def test_focusing_weights_refuse_bad_input_and_take_one_utterance():
    lp, targets, il, tl = small_batch(3)
    q = alignment_targets(lp, targets, il, tl)
    for g in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="g must"):
            focusing_weights(q, lp, g, il)
    with pytest.raises(ValueError, match="shape"):
        focusing_weights(q, lp[:, :1], 2.0)
    with pytest.raises(ValueError, match="input_lengths"):
        focusing_weights(q, lp, 2.0, [6])
    w = focusing_weights(q, lp, 2.0, il)
    one = focusing_weights(q[:, 1], lp[:, 1], 2.0, 5)
    assert one.shape == (6,)
    torch.testing.assert_close(one, w[:, 1])


def test_target_cross_entropy_validates_and_takes_one_utterance():
    lp, targets, il, tl = small_batch(4)
    q = alignment_targets(lp, targets, il, tl)
    with pytest.raises(ValueError, match="reduction"):
        target_cross_entropy(lp, q, reduction="nonee")
    with pytest.raises(ValueError, match="weights"):
        target_cross_entropy(lp, q, torch.ones(6, 2, 1))
    with pytest.raises(ValueError, match="weights"):
        target_cross_entropy(lp, q, torch.ones(2, 6))
    with pytest.raises(ValueError, match="log_probs"):
        target_cross_entropy(lp[0, 0], q[0, 0])
    with pytest.raises(ValueError, match="q must"):
        target_cross_entropy(lp, q[:, :1])
    per_item = target_cross_entropy(lp, q, reduction="none")
    one = target_cross_entropy(lp[:, 1], q[:, 1], torch.ones(6), reduction="none")
    assert one.shape == ()
    torch.testing.assert_close(one, per_item[1])


def test_alignment_targets_validate_their_inputs():
    lp, targets, il, tl = small_batch()
    with pytest.raises(ValueError, match="input_lengths"):
        alignment_targets(lp, targets, [6], tl)
    with pytest.raises(ValueError, match="blank"):
        alignment_targets(lp, targets, il, tl, blank=-1)
    with pytest.raises(TypeError, match="ctc_loss"):
        alignment_targets(lp, targets, il, tl, ctc_loss="builtin")
    torch.testing.assert_close(alignment_targets(lp[:, 0], targets[0], 6, 3), alignment_targets(lp, targets, il, tl)[:, 0])


# ---------------------------------------------------------------- vocabularies


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_vocabulary_with_duplicate_tokens_is_an_error_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"'a'.*lines 3 and 5"):
        Vocabulary.load(write(tmp_path, "v.txt", "<b>\n|\na\nb\na\n"))
    with pytest.raises(ValueError, match=r"'a'.*indices 2 and 4"):
        Vocabulary(("<b>", "|", "a", "b", "a"))


def test_vocabulary_empty_lines_are_errors_but_the_space_token_is_not(tmp_path):
    with pytest.raises(ValueError, match="line 3"):
        Vocabulary.load(write(tmp_path, "v.txt", "<b>\na\n\nb\n"))
    with pytest.raises(ValueError, match="line 3"):
        Vocabulary.load(write(tmp_path, "v.txt", "<b>\r\na\r\n\r\nb\r\n"))
    with pytest.raises(ValueError, match="line 3"):
        Vocabulary.load(write(tmp_path, "v.txt", "<b>\na\n\n"))  # a trailing empty line is a line too
    vocab = Vocabulary.load(write(tmp_path, "v.txt", "<b>\n \na\nb"))
    assert vocab.tokens == ("<b>", " ", "a", "b") and vocab.delimiter == " "
    assert vocab.encode("ab a") == ([2, 3, 1, 2], [2, 1])
    assert Vocabulary.load(write(tmp_path, "v.txt", "<b>\r\n \r\na\r\n")).tokens == ("<b>", " ", "a")
    assert Vocabulary.load(write(tmp_path, "v.txt", "\ufeff<b>\na\n")).tokens == ("<b>", "a")  # byte-order mark
    with pytest.raises(ValueError, match="index 1"):
        Vocabulary(("<b>", "", "a"))


def test_json_vocabulary_indices_must_be_distinct_integers(tmp_path):
    ok = Vocabulary.load(write(tmp_path, "v.json", json.dumps({"<pad>": 0, "|": 1, "a": 2})))
    assert ok.tokens == ("<pad>", "|", "a")
    with pytest.raises(ValueError, match=r"index 1.*'\|'.*'a'"):
        Vocabulary.load(write(tmp_path, "v.json", '{"<pad>": 0, "|": 1, "a": 1}'))
    for bad in ('{"<pad>": 0, "a": 1.0}', '{"<pad>": 0, "a": "1"}', '{"<pad>": false, "a": true}', '{"<pad>": 0, "a": null}'):
        with pytest.raises(ValueError, match="integer"):
            Vocabulary.load(write(tmp_path, "v.json", bad))
    with pytest.raises(ValueError, match=r"'a'.*more than once"):
        Vocabulary.load(write(tmp_path, "v.json", '{"<pad>": 0, "a": 1, "a": 1}'))
    with pytest.raises(ValueError, match="0..2"):
        Vocabulary.load(write(tmp_path, "v.json", '{"<pad>": 0, "a": 1, "b": 3}'))
    with pytest.raises(ValueError, match="empty"):
        Vocabulary.load(write(tmp_path, "v.json", '{"": 0, "a": 1}'))
    with pytest.raises(ValueError, match="empty"):
        Vocabulary.load(write(tmp_path, "v.json", "{}"))
    with pytest.raises(ValueError, match="object"):
        Vocabulary.load(write(tmp_path, "v.json", '["a", "b"]'))


def test_vocabulary_constructor_validates():
    with pytest.raises(ValueError, match="empty"):
        Vocabulary(())
    with pytest.raises(TypeError, match="tokens"):
        Vocabulary("abc")
    with pytest.raises(TypeError, match="tokens"):
        Vocabulary(("a", 1))
    assert Vocabulary(["<b>", "a"]).tokens == ("<b>", "a")
    assert hash(Vocabulary(["<b>", "a"])) == hash(Vocabulary(("<b>", "a")))
    with pytest.raises(ValueError, match="'z'.*not in the vocabulary"):
        Vocabulary(("<b>", "a")).index("z")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Vocabulary(("<b>", "a")).encode("ab")


TOKENS = st.lists(st.text(alphabet="ab| ", max_size=3), min_size=0, max_size=6)


@PROPERTY
@given(TOKENS)
def test_vocabulary_property_index_and_encode_agree_or_it_is_an_error(tokens):
    try:
        vocab = Vocabulary(tuple(tokens))
    except ValueError as error:
        assert not tokens or "" in tokens or len(set(tokens)) < len(tokens), error
        return
    assert len(set(tokens)) == len(tokens) and "" not in tokens
    for k, token in enumerate(tokens):
        assert vocab.index(token) == k
        if token.split() == [token]:  # words are split on white space
            assert vocab.encode(token) == ([k], [1])


# ---------------------------------------------------------------- properties: a result or a clear error


# strengths beyond 1e6 overflow the loss to +-inf by design; NaN and infinities must be refused
FLOATS = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0.0, 0.5, 1.0, 2.0, math.nan, math.inf, -math.inf]))
LENGTHS = st.one_of(
    st.none(), st.integers(-2, 8), st.lists(st.integers(-1, 8), max_size=3),
    st.builds(torch.tensor, st.lists(st.integers(0, 7), min_size=2, max_size=2)),
)


def finite_or_raises(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except (ValueError, TypeError):
        return None
    return out


@PROPERTY
@given(st.sampled_from(list(VARIANTS)), FLOATS, FLOATS, st.sampled_from(["none", "mean", "sum", "nonee", None]),
       LENGTHS, LENGTHS, st.booleans())
def test_variants_property_result_or_clear_error(name, s1, s2, reduction, il, tl, unbatched):
    lp, targets, _, _ = small_batch(7)
    if unbatched:
        lp, targets = lp[:, 0], targets[0]
    kwargs = dict(alpha=s1, gamma=s2) if name == "focal" else dict(beta=s1)
    out = finite_or_raises(VARIANTS[name], lp, targets, il, tl, reduction=reduction, **kwargs)
    if out is not None:
        assert not torch.isnan(out).any()
        assert reduction in ("none", "mean", "sum") and all(math.isfinite(v) for v in kwargs.values())


@PROPERTY
@given(st.integers(1, 4), st.sampled_from([(6, 2), (6,), (6, 1), (2, 6, 2), ()]), FLOATS, st.integers(-5, 6),
       st.sampled_from(["uniform", "nonblank", "zipf", "tensor", "nan-tensor"]), LENGTHS)
def test_smooth_targets_property_result_or_clear_error(C, shape, eps, blank, prior, il):
    gamma = torch.rand(*shape, C, generator=torch.Generator().manual_seed(C))
    pi = {"tensor": torch.rand(C) + 0.1, "nan-tensor": torch.full((C,), math.nan)}.get(prior, prior)
    q = finite_or_raises(smooth_targets, gamma, eps, pi, blank, il)
    if q is not None:
        assert q.shape == gamma.shape and torch.isfinite(q).all()
        assert 0 <= blank < C and 0 <= eps <= 1


TARGETS_8 = alignment_targets(*small_batch(8)[:2], None, small_batch(8)[3])


@PROPERTY
@given(FLOATS, FLOATS, st.sampled_from(["none", "sum", "mean", "x"]), LENGTHS, st.booleans())
def test_target_helpers_property_result_or_clear_error(a, g, reduction, il, unbatched):
    lp, targets, _, tl = small_batch(8)
    q = TARGETS_8
    if unbatched:
        lp, q, targets, tl = lp[:, 0], q[:, 0], targets[0], 3
    for out in (
        finite_or_raises(reweight_nonblank_proportion, q, targets, tl, a, input_lengths=il),
        finite_or_raises(focusing_weights, q, lp, g, il),
        finite_or_raises(target_cross_entropy, lp, q, None, reduction),
    ):
        if out is not None:
            assert torch.isfinite(out).all()


@PROPERTY
@given(st.integers(-2, 5), FLOATS, FLOATS, LENGTHS, st.booleans())
def test_priors_property_result_or_clear_error(blank, beta, lam, il, nan):
    lp = small_batch(9)[0].clone()
    if nan:
        lp[0, 0, 1] = math.nan
    shifted = finite_or_raises(blank_penalty, lp, beta, blank)
    if shifted is not None and not nan:
        assert torch.isfinite(shifted).all()
    try:
        prior = LabelPrior(4, lam=lam, blank=blank % 4)
    except ValueError:
        assert not math.isfinite(lam)
        return
    before = prior.log_prior.clone()
    try:
        prior.update(lp, il)
    except (ValueError, TypeError):
        torch.testing.assert_close(prior.log_prior, before)
    assert torch.isfinite(prior.log_prior).all() and torch.isfinite(prior.adjust(lp[1:])).all()
