import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch
from oracle import brute_force_posteriors, brute_force_topology_nll, brute_force_weighted_paths, state_paths

import ctclab
from ctclab import alignment_targets, ctc_loss, forced_align, state_occupation
from ctclab.targets import (
    focusing_weights,
    reweight_nonblank_proportion,
    smooth_targets,
    smoothing_prior,
    target_cross_entropy,
)
from ctclab.trellis import CTCTrellis, class_posteriors
from ctclab.variants import LabelPrior, blank_penalty, entropy_regularised_ctc_loss, focal_ctc_loss

IMPLEMENTATIONS = {
    "builtin": F.ctc_loss,
    "autograd": functools.partial(ctc_loss, impl="autograd"),
    "fused": functools.partial(ctc_loss, impl="fused"),
}


def batch(seed=0, dtype=torch.float64):
    logits, targets, il, tl = random_batch(25, 4, 6, 8, seed=seed, dtype=dtype, repeats=True)
    return logits, targets, il, tl


def ctc_grad_wrt_logits(logits, targets, il, tl, loss_fn=None):
    z = logits.detach().clone().requires_grad_(True)
    loss = (loss_fn or functools.partial(ctc_loss, reduction="sum"))(z.log_softmax(-1), targets, il, tl)
    return torch.autograd.grad(loss, z)[0]


def ce_grad_wrt_logits(logits, q, weights=None):
    z = logits.detach().clone().requires_grad_(True)
    return torch.autograd.grad(target_cross_entropy(z.log_softmax(-1), q, weights), z)[0]


def test_targets_agree_across_implementations_and_are_distributions():
    logits, targets, il, tl = batch()
    lp = logits.log_softmax(-1)
    results = {name: alignment_targets(lp, targets, il, tl, ctc_loss=fn) for name, fn in IMPLEMENTATIONS.items()}
    default = alignment_targets(lp, targets, il, tl)
    for q in results.values():
        torch.testing.assert_close(q, default, rtol=1e-9, atol=1e-9)
    inside = torch.arange(25)[:, None] < il[None]
    torch.testing.assert_close(default.sum(-1)[inside], torch.ones(int(inside.sum()), dtype=default.dtype))
    assert (default.sum(-1)[~inside] == 0).all() and not default.requires_grad


def test_targets_match_brute_force_and_state_occupation():
    lp = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    target = torch.tensor([1, 2, 1])
    q = alignment_targets(lp, target, torch.tensor(5), torch.tensor(3))
    torch.testing.assert_close(q, brute_force_posteriors(lp, [1, 2, 1]))
    logits, targets, il, tl = batch(2)
    lp = logits.log_softmax(-1)
    gamma = state_occupation(lp, targets, il, tl)
    trellis = CTCTrellis.build(ctclab._inputs.ctc_batch(lp, targets, il, tl, 0))
    torch.testing.assert_close(class_posteriors(trellis, gamma, 6), alignment_targets(lp, targets, il, tl))


def test_cross_entropy_against_targets_has_the_ctc_gradient():
    """The seed's "CE grad matches", for every implementation's targets."""
    logits, targets, il, tl = batch(3)
    expected = ctc_grad_wrt_logits(logits, targets, il, tl)
    for fn in IMPLEMENTATIONS.values():
        q = alignment_targets(logits.log_softmax(-1), targets, il, tl, ctc_loss=fn)
        torch.testing.assert_close(ce_grad_wrt_logits(logits, q), expected)


def test_targets_of_infeasible_items_are_zero():
    logits, targets, il, tl = batch(4)
    il = il.clone()
    il[1] = 2
    tl = tl.clone()
    tl[1] = 5
    q = alignment_targets(logits.log_softmax(-1), targets, il, tl)
    assert (q[:, 1] == 0).all() and (q[:, 0].sum(-1)[: il[0]] > 0.99).all()


@pytest.mark.parametrize("prior", ["uniform", "nonblank", "custom"])
def test_label_smoothing_is_a_mixture_of_ctc_and_prior_cross_entropy(prior):
    logits, targets, il, tl = batch(5)
    eps = 0.2
    pi = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64) if prior == "custom" else prior
    gamma = alignment_targets(logits.log_softmax(-1), targets, il, tl)
    q = smooth_targets(gamma, eps, pi, input_lengths=il)
    prior_dist = smoothing_prior(6, pi).to(logits)
    valid = (torch.arange(25)[:, None] < il[None]).to(logits.dtype)
    z = logits.detach().clone().requires_grad_(True)
    lp = z.log_softmax(-1)
    mixture = (1 - eps) * ctc_loss(lp, targets, il, tl, reduction="sum") - eps * ((lp * prior_dist).sum(-1) * valid).sum()
    (expected,) = torch.autograd.grad(mixture, z)
    torch.testing.assert_close(ce_grad_wrt_logits(logits, q), expected)
    torch.testing.assert_close(smooth_targets(gamma, 0.0, pi, input_lengths=il), gamma)


def test_focal_ctc_formula_and_zero_strength():
    logits, targets, il, tl = batch(6)
    z = logits.detach().clone().requires_grad_(True)
    lp = z.log_softmax(-1)
    plain = ctc_loss(lp, targets, il, tl, reduction="none")
    focal = focal_ctc_loss(lp, targets, il, tl, alpha=0.5, gamma=2.0, reduction="none")
    torch.testing.assert_close(focal, 0.5 * (1 - torch.exp(-plain)) ** 2 * plain)
    torch.testing.assert_close(focal_ctc_loss(lp, targets, il, tl, alpha=1.0, gamma=0.0), ctc_loss(lp, targets, il, tl))
    # the gradient is the chain rule through the per-utterance loss
    (g,) = torch.autograd.grad(focal.sum(), z, retain_graph=True)
    p = torch.exp(-plain.detach())
    dfocal = 0.5 * ((1 - p) ** 2 + 2 * (1 - p) * p * plain.detach())
    (g_plain,) = torch.autograd.grad((plain * dfocal).sum(), z)
    torch.testing.assert_close(g, g_plain)


def test_nonblank_proportion_reweighting_formula():
    logits, targets, il, tl = batch(7)
    gamma = alignment_targets(logits.log_softmax(-1), targets, il, tl)
    a = 0.3
    q = reweight_nonblank_proportion(gamma, targets, tl, a, input_lengths=il)
    for b in range(4):
        counts = torch.zeros(6, dtype=torch.float64)
        for k in targets[b, : tl[b]].tolist():
            counts[k] += 1
        counts[0] = (1 - a) / a * int(tl[b])
        mass = gamma[:, b].sum(0)
        expected = gamma[:, b] * torch.where(mass > 0, counts / mass, torch.zeros(()))
        expected = expected / expected.sum(-1, keepdim=True).clamp(min=1e-300)
        expected[il[b] :] = 0
        torch.testing.assert_close(q[:, b], expected)
        torch.testing.assert_close(q[: il[b], b].sum(-1), torch.ones(int(il[b]), dtype=torch.float64))


def test_focusing_weights_formula_and_zero_strength():
    logits, targets, il, tl = batch(8)
    lp = logits.log_softmax(-1)
    q = alignment_targets(lp, targets, il, tl)
    w = focusing_weights(q, lp, 2.0, il)
    for b in range(4):
        raw = (q[: il[b], b] - lp[: il[b], b].exp()).amax(-1) ** 2
        torch.testing.assert_close(w[: il[b], b], raw * il[b] / raw.sum())
        assert (w[il[b] :, b] == 0).all()
    ones = focusing_weights(q, lp, 0.0, il)
    torch.testing.assert_close(ones, (torch.arange(25)[:, None] < il[None]).double())
    # with unit weights the weighted cross-entropy is plain CTC in gradient
    torch.testing.assert_close(ce_grad_wrt_logits(logits, q, ones), ctc_grad_wrt_logits(logits, targets, il, tl))


def test_label_prior_and_blank_penalty_are_emission_shifts():
    logits, targets, il, tl = batch(9)
    lp = logits.log_softmax(-1)
    prior = LabelPrior(6, lam=0.5, momentum=0.5)
    torch.testing.assert_close(prior.adjust(lp), lp + 0.5 * math.log(6))
    prior.update(lp, il)
    valid = torch.arange(25)[:, None] < il[None]
    first = lp.exp()[valid].mean(0)
    torch.testing.assert_close(prior.log_prior, first.float().log())
    prior.update(lp, il)
    torch.testing.assert_close(prior.log_prior.exp(), first.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prior.adjust(lp), lp - 0.5 * first.log(), rtol=1e-5, atol=1e-6)
    assert LabelPrior(6, lam=0.0).adjust(lp) is lp
    shifted = blank_penalty(lp, 1.5)
    torch.testing.assert_close(shifted[..., 0], lp[..., 0] - 1.5)
    torch.testing.assert_close(shifted[..., 1:], lp[..., 1:])
    assert blank_penalty(lp, 0.0) is lp
    # unnormalised scores: the fused and autograd paths agree (true gradient)
    x = shifted.clone().requires_grad_(True)
    g1 = torch.autograd.grad(ctc_loss(x, targets, il, tl, impl="fused"), x)[0]
    g2 = torch.autograd.grad(ctc_loss(x, targets, il, tl, impl="autograd"), x)[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("impl", ["autograd", "fused"])
@pytest.mark.parametrize("T,target", [(3, [1, 1]), (4, [1, 1, 2]), (5, [2, 2, 2]), (4, [1, 2])])
def test_modified_topology_against_its_paths(impl, T, target):
    lp = torch.randn(T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(T)).log_softmax(-1)
    tg = torch.tensor(target)
    got = ctc_loss(lp, tg, torch.tensor(T), torch.tensor(len(target)), reduction="sum", impl=impl, topology="modified")
    assert got.item() == pytest.approx(brute_force_topology_nll(lp, target, topology="modified"), rel=1e-12)
    seqs, ext = state_paths(T, target, "modified")
    best = max(sum(float(lp[t, 0 if ext[s] is None else ext[s]]) for t, s in enumerate(seq)) for seq in seqs)
    for align_impl in ("numba", "reference"):
        ali = forced_align(lp, tg, topology="modified", impl=align_impl)
        assert ali.path_score.item() == pytest.approx(best, abs=1e-12)
    if target == [1, 1]:  # "aa" fits in 2 frames without a blank only in the modified topology
        assert math.isinf(ctc_loss(lp[:2], tg, torch.tensor(2), torch.tensor(2), impl=impl).item())
        assert math.isfinite(ctc_loss(lp[:2], tg, torch.tensor(2), torch.tensor(2), impl=impl, topology="modified").item())


@pytest.mark.parametrize("impl", ["autograd", "fused"])
def test_delay_penalty_against_brute_force_and_zero_strength(impl):
    T, target, lam = 5, [1, 2], 0.7
    lp = torch.randn(T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).log_softmax(-1)
    expected, _ = brute_force_weighted_paths(lp, target, entry_weight=lambda t: -lam * (t - T / 2))
    got = ctc_loss(lp, torch.tensor(target), torch.tensor(T), torch.tensor(2), reduction="sum", impl=impl, delay_penalty=lam)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    logits, targets, il, tl = batch(10)
    plain = ctc_loss(logits.log_softmax(-1), targets, il, tl, reduction="none", impl=impl)
    torch.testing.assert_close(ctc_loss(logits.log_softmax(-1), targets, il, tl, reduction="none", impl=impl, delay_penalty=0.0), plain)


def test_entropy_regularisation_entropy_and_double_backward():
    T, target = 5, [1, 2]
    lp = torch.randn(T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).log_softmax(-1)
    nll, entropy = brute_force_weighted_paths(lp, target)
    beta = 0.3
    got = entropy_regularised_ctc_loss(lp, torch.tensor(target), torch.tensor(T), torch.tensor(2), beta=beta, reduction="sum")
    assert got.item() == pytest.approx(nll - beta * entropy, rel=1e-10)
    logits, targets, il, tl = random_batch(6, 2, 4, 2, seed=11, dtype=torch.float64)
    z = logits.clone().requires_grad_(True)
    f = lambda x: entropy_regularised_ctc_loss(x.log_softmax(-1), targets, il, tl, beta=beta, reduction="none")
    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))
    torch.testing.assert_close(
        entropy_regularised_ctc_loss(z.log_softmax(-1), targets, il, tl, beta=0.0),
        ctc_loss(z.log_softmax(-1), targets, il, tl),
    )


def test_variant_argument_errors():
    lp = torch.randn(5, 2, 4).log_softmax(-1)
    with pytest.raises(ValueError, match="eps"):
        smooth_targets(lp.exp(), 1.5)
    with pytest.raises(ValueError, match="prior"):
        smooth_targets(lp.exp(), 0.1, "zipf")
    with pytest.raises(ValueError, match="gamma"):
        focal_ctc_loss(lp, torch.tensor([[1], [2]]), [5, 5], [1, 1], gamma=-1.0)
    with pytest.raises(ValueError, match="a must"):
        reweight_nonblank_proportion(lp.exp(), torch.tensor([[1], [2]]), [1, 1], 1.0)
    with pytest.raises(ValueError, match="topology"):
        ctc_loss(lp, torch.tensor([[1], [2]]), [5, 5], [1, 1], topology="k2")
