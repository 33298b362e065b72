import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch
from oracle import brute_force_nll, brute_force_posteriors

import ctclab
from ctclab import ctc_loss


def concat(targets, tl):
    return torch.cat([targets[b, : tl[b]] for b in range(len(tl))])


def loss_and_grad(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x.log_softmax(-1), *args, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_builtin_over_random_grid(impl, dtype):
    g = torch.Generator().manual_seed(1234)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for case in range(24):
        T = int(torch.randint(1, 40, (1,), generator=g))
        B = int(torch.randint(1, 6, (1,), generator=g))
        C = int(torch.randint(2, 9, (1,), generator=g))
        L = int(torch.randint(0, max(1, T // 2) + 1, (1,), generator=g))
        blank = [0, C - 1, C // 2][case % 3]
        logits, targets, il, tl = random_batch(T, B, C, L, blank=blank, seed=case, dtype=dtype, repeats=case % 2 == 0)
        reduction = ["none", "mean", "sum"][case % 3]
        concatenated = case % 4 >= 2
        tg = concat(targets, tl) if concatenated else targets
        ref = loss_and_grad(F.ctc_loss, logits, tg, il, tl, blank=blank, reduction=reduction)
        got = loss_and_grad(ctc_loss, logits, tg, il, tl, blank=blank, reduction=reduction, impl=impl)
        torch.testing.assert_close(got[0], ref[0], **tol, msg=f"loss, case {case}")
        torch.testing.assert_close(got[1], ref[1], **tol, msg=f"grad, case {case}")


def test_lengths_as_lists_and_int32(impl):
    logits, targets, il, tl = random_batch(12, 3, 5, 4, seed=3)
    ref = F.ctc_loss(logits.log_softmax(-1), targets, il, tl, reduction="none")
    for lengths in ((tuple(il.tolist()), tuple(tl.tolist())), (il.tolist(), tl.tolist()), (il.int(), tl.int())):
        got = ctc_loss(logits.log_softmax(-1), targets, *lengths, reduction="none", impl=impl)
        torch.testing.assert_close(got, ref)


def test_unbatched_input(impl):
    logits, targets, il, tl = random_batch(10, 1, 5, 4, seed=4, ragged=False)
    lp = logits[:, 0].log_softmax(-1)
    for reduction in ("none", "mean", "sum"):
        ref = F.ctc_loss(lp, targets[0], torch.tensor(10), torch.tensor(4), reduction=reduction)
        got = ctc_loss(lp, targets[0], torch.tensor(10), torch.tensor(4), reduction=reduction, impl=impl)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("T,target", [(1, []), (3, [1]), (4, [1, 1]), (3, [1, 1]), (5, [1, 2, 1]), (4, [2, 2, 2]), (2, [1, 1]), (3, [1, 2, 1, 2])])
def test_brute_force_loss_and_posteriors(impl, T, target):
    """Loss against enumeration of every alignment; gradient w.r.t. log-scores is -posterior.
    Covers empty targets, repeats, the critical case T = L + repeats and infeasible targets."""
    C = 3
    lp = torch.randn(T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(T)).log_softmax(-1)
    expected = brute_force_nll(lp, target)
    x = lp.clone().requires_grad_(True)
    tg = torch.tensor(target, dtype=torch.long)
    loss = ctc_loss(x, tg, torch.tensor(T), torch.tensor(len(target)), reduction="sum", impl=impl)
    if math.isinf(expected):
        assert math.isinf(loss.item())
        return
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, -brute_force_posteriors(lp, target))


def test_true_gradient_for_unnormalised_scores_differs_from_builtin(impl):
    """ctclab's gradient is -posterior for any log-scores; the built-in's is exp(lp) - posterior."""
    T, C, target = 5, 3, [1, 2]
    scores = torch.randn(T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 + 1
    post = brute_force_posteriors(scores, target)
    args = (torch.tensor(target), torch.tensor(T), torch.tensor(2))
    x = scores.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(ctc_loss(x, *args, reduction="sum", impl=impl), x)
    torch.testing.assert_close(ours, -post)
    x = scores.clone().requires_grad_(True)
    (builtin,) = torch.autograd.grad(F.ctc_loss(x, *args, reduction="sum"), x)
    torch.testing.assert_close(builtin, scores.exp() - post)
    assert not torch.allclose(ours, builtin)
    # numerical derivative confirms which is true
    assert torch.autograd.gradcheck(lambda s: ctc_loss(s, *args, reduction="sum", impl=impl), (x,))


@pytest.mark.parametrize("normalised", [True, False])
def test_gradcheck_and_gradgradcheck_autograd(normalised):
    logits, targets, il, tl = random_batch(6, 3, 4, 3, seed=7, dtype=torch.float64, repeats=True)
    x = logits.clone().requires_grad_(True)

    def f(z):
        lp = z.log_softmax(-1) if normalised else z
        return ctc_loss(lp, targets, il, tl, reduction="none", impl="autograd")

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_fused_gradcheck_and_double_backward_raises():
    logits, targets, il, tl = random_batch(6, 3, 4, 3, seed=8, dtype=torch.float64, repeats=True)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ctc_loss(z, targets, il, tl, reduction="none", impl="fused"), (x,))
    loss = ctc_loss(x.log_softmax(-1), targets, il, tl, impl="fused")
    with pytest.raises(RuntimeError, match="impl='autograd'"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_hessian_vector_product_autograd_where_builtin_cannot():
    logits, targets, il, tl = random_batch(8, 2, 5, 3, seed=9, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    v = torch.randn_like(x)
    _, hvp = torch.autograd.functional.hvp(
        lambda z: ctc_loss(z.log_softmax(-1), targets, il, tl, impl="autograd"), x, v
    )
    eps = 1e-6
    grad = lambda z: torch.autograd.grad(ctc_loss(z.log_softmax(-1), targets, il, tl, impl="autograd"), z)[0]
    xp, xm = (x + eps * v).detach().requires_grad_(True), (x - eps * v).detach().requires_grad_(True)
    torch.testing.assert_close(hvp, (grad(xp) - grad(xm)) / (2 * eps), rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.functional.hvp(lambda z: F.ctc_loss(z.log_softmax(-1), targets, il, tl), x, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_match_float32(impl, dtype):
    logits, targets, il, tl = random_batch(20, 4, 6, 6, seed=10)
    lp = logits.log_softmax(-1).to(dtype)
    x = lp.clone().requires_grad_(True)
    loss = ctc_loss(x, targets, il, tl, reduction="none", impl=impl)
    assert loss.dtype == dtype
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert g.dtype == dtype
    ref = ctc_loss(lp.float(), targets, il, tl, reduction="none", impl=impl)
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=1e-2)


def test_masked_classes_and_very_negative_scores_stay_finite(impl):
    logits, targets, il, tl = random_batch(30, 4, 6, 8, seed=11, min_target=1)
    lp = logits.log_softmax(-1)
    lp[:, :, 5] = -torch.inf  # a class masked out everywhere (not in any target below)
    targets = targets.clamp(max=4)
    lp[::3, :, 0] = -1e4  # blank nearly forbidden on every third frame
    x = lp.clone().requires_grad_(True)
    loss = ctc_loss(x, targets, il, tl, reduction="none", impl=impl)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert (g[:, :, 5] == 0).all()
    ref = ctc_loss(lp.double(), targets, il, tl, reduction="none", impl="autograd")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-2)


def test_path_forced_through_minus_1e4_gives_finite_loss(impl):
    """A -1e4 score on the only path: the loss is large but finite (no spurious inf)."""
    lp = torch.zeros(2, 3)
    lp[0, 1] = -1e4
    lp[1, 2] = -1e4
    x = lp.clone().requires_grad_(True)
    loss = ctc_loss(x, torch.tensor([1, 2]), torch.tensor(2), torch.tensor(2), reduction="sum", impl=impl)
    assert loss.item() == pytest.approx(2e4)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g[0, 1] == -1 and g[1, 2] == -1


def test_infeasible_item_next_to_feasible_ones(impl):
    logits, targets, il, tl = random_batch(10, 3, 5, 4, seed=12, ragged=False)
    il = torch.tensor([10, 3, 10])  # item 1 cannot fit 4 labels in 3 frames
    x = logits.clone().requires_grad_(True)
    loss = ctc_loss(x.log_softmax(-1), targets, il, tl, reduction="none", impl=impl)
    assert math.isinf(loss[1].item()) and torch.isfinite(loss[[0, 2]]).all()
    (g,) = torch.autograd.grad(loss[[0, 2]].sum(), x)
    assert torch.isfinite(g).all()
    for reduction in ("mean", "sum", "none"):
        z = x.detach().clone().requires_grad_(True)
        got = ctc_loss(z.log_softmax(-1), targets, il, tl, reduction=reduction, zero_infinity=True, impl=impl)
        (gz,) = torch.autograd.grad(got.sum(), z)
        ref_z = x.detach().clone().requires_grad_(True)
        ref = F.ctc_loss(ref_z.log_softmax(-1), targets, il, tl, reduction=reduction, zero_infinity=True)
        (gr,) = torch.autograd.grad(ref.sum(), ref_z)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(gz, gr)
        assert (gz[:, 1] == 0).all()


def test_padding_frames_are_ignored_even_if_nan(impl):
    logits, targets, il, tl = random_batch(12, 3, 5, 3, seed=13)
    il = torch.tensor([12, 7, 9])
    lp = logits.log_softmax(-1)
    dirty = lp.clone()
    for b in range(3):
        dirty[il[b] :, b] = torch.nan
    x = dirty.clone().requires_grad_(True)
    loss = ctc_loss(x, targets, il, tl, reduction="none", impl=impl)
    torch.testing.assert_close(loss, ctc_loss(lp, targets, il, tl, reduction="none", impl=impl))
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(g).all()


def test_zero_length_inputs(impl):
    lp = torch.randn(4, 2, 3).log_softmax(-1)
    loss = ctc_loss(lp, torch.tensor([[1], [1]]), torch.tensor([0, 0]), torch.tensor([0, 1]), reduction="none", impl=impl)
    assert loss[0].item() == 0 and math.isinf(loss[1].item())


def test_module_forwards_options(impl):
    logits, targets, il, tl = random_batch(15, 3, 5, 4, seed=14)
    module = ctclab.CTCLoss(blank=0, reduction="sum", zero_infinity=True, impl=impl)
    assert "impl" in repr(module)
    torch.testing.assert_close(
        module(logits.log_softmax(-1), targets, il, tl),
        F.ctc_loss(logits.log_softmax(-1), targets, il, tl, reduction="sum", zero_infinity=True),
    )


BAD_INPUTS = [
    (dict(log_probs=torch.zeros(2, 3, 4, 5)), ValueError, "log_probs"),
    (dict(log_probs=torch.zeros(5, 2, 4, dtype=torch.long)), TypeError, "log_probs"),
    (dict(targets=torch.ones(3, 2, dtype=torch.long)), ValueError, "batch size"),
    (dict(targets=torch.ones(2, 2, 2, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.ones(2, 2)), TypeError, "targets"),
    (dict(input_lengths=torch.tensor([5, 6])), ValueError, "input_lengths"),
    (dict(input_lengths=torch.tensor([5, -1])), ValueError, "input_lengths"),
    (dict(input_lengths=torch.tensor([5.0, 5.0])), TypeError, "input_lengths"),
    (dict(input_lengths=torch.tensor([5, 5, 5])), ValueError, "input_lengths"),
    (dict(target_lengths=torch.tensor([2, 3])), ValueError, "target_lengths"),
    (dict(target_lengths=torch.tensor([2, -1])), ValueError, "target_lengths"),
    (dict(target_lengths=[2.0, 1.0]), TypeError, "target_lengths"),
    (dict(targets=torch.tensor([1, 2, 3]), target_lengths=torch.tensor([2, 2])), ValueError, "sum"),
    (dict(targets=torch.tensor([[1, 4], [1, 1]])), ValueError, r"\[0, C\)"),
    (dict(targets=torch.tensor([[1, -1], [1, 1]])), ValueError, r"\[0, C\)"),
    (dict(targets=torch.tensor([[1, 0], [1, 1]])), ValueError, "blank"),
    (dict(blank=4), ValueError, "blank"),
    (dict(blank=-1), ValueError, "blank"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(impl="cuda"), ValueError, "impl"),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(override, error, match):
    args = dict(
        log_probs=torch.randn(5, 2, 4).log_softmax(-1),
        targets=torch.tensor([[1, 2], [3, 1]]),
        input_lengths=torch.tensor([5, 5]),
        target_lengths=torch.tensor([2, 2]),
    )
    args.update(override)
    with pytest.raises(error, match=match):
        ctc_loss(**args)


def test_lengths_on_another_device_type_are_moved():
    # a lengths tensor that is not on log_probs' device is accepted (here: a CPU tensor view)
    logits, targets, il, tl = random_batch(8, 2, 4, 3, seed=15)
    got = ctc_loss(logits.log_softmax(-1), targets, il.int().tolist(), tl.to(torch.int32))
    torch.testing.assert_close(got, F.ctc_loss(logits.log_softmax(-1), targets, il, tl))
