"""Fuzzing the public functions with hypothesis: for any input, a result or a ValueError /
TypeError naming what is wrong — never another exception, never NaN where the built-in loss is
finite, never a finite loss where the built-in is NaN."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctclab
from ctclab.targets import smooth_targets
from ctclab.variants import entropy_regularised_ctc_loss, focal_ctc_loss

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECIAL = st.sampled_from([0.0, -1.0, -30.0, -1e4, -math.inf, math.inf, math.nan, 3.0])


@st.composite
def ctc_inputs(draw, valid_only=False):
    """Small CTC inputs with NaN/inf scores anywhere; one in four also malformed (empty
    shapes, blank, lengths and targets out of range)."""
    valid_only = valid_only or draw(st.integers(0, 3)) > 0
    T = draw(st.integers(0 if not valid_only else 1, 6))
    B = draw(st.integers(0 if not valid_only else 1, 3))
    C = draw(st.integers(1 if not valid_only else 2, 5))
    L = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64] + ([] if valid_only else [torch.float16])))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(T, B, C, generator=g).log_softmax(-1) if C else torch.zeros(T, B, C)
    for _ in range(draw(st.integers(0, 3))):  # a few special values anywhere
        if lp.numel():
            lp.view(-1)[draw(st.integers(0, lp.numel() - 1))] = draw(SPECIAL)
    lp = lp.to(dtype)
    blank = draw(st.integers(-1, C)) if not valid_only else draw(st.integers(0, C - 1))
    low = 0 if not valid_only else 1
    labels = [k for k in range(C) if k != blank] or [0]
    targets = torch.tensor(draw(st.lists(st.lists(st.sampled_from(labels) if valid_only else st.integers(-1, C), min_size=L, max_size=L), min_size=B, max_size=B)), dtype=torch.long).reshape(B, L)
    il = draw(st.lists(st.integers(low - 1 if not valid_only else 0, T + (0 if valid_only else 1)), min_size=B, max_size=B))
    tl = draw(st.lists(st.integers(-1 if not valid_only else 0, L + (0 if valid_only else 1)), min_size=B, max_size=B))
    if valid_only:
        il = [min(max(i, 0), T) for i in il]
    return lp, targets, torch.tensor(il, dtype=torch.long), torch.tensor(tl, dtype=torch.long), blank


def _reads_invalid_where_it_counts(lp, targets, il, tl, blank) -> torch.Tensor:
    """``(B,)`` bool: a score the item reads is NaN or +inf at a frame and state of its band
    (:meth:`ctclab.graph.CTCGraph.band`, tested against enumerated paths), or, for an item
    whose target cannot fit its frames, at any of its frames."""
    from ctclab._inputs import ctc_batch
    from ctclab.graph import CTCGraph

    graph = CTCGraph.build(ctc_batch(lp.double(), targets, il, tl, blank))
    T = lp.shape[0]
    read = lp.double().gather(2, graph.labels.unsqueeze(0).expand(T, -1, -1))  # (T, B, S)
    invalid = (torch.isnan(read) | (read == math.inf)) & (torch.arange(T)[:, None] < graph.input_lengths)[..., None]
    band = graph.band(T).transpose(0, 1)  # (T, B, 2)
    states = torch.arange(read.shape[2])
    on_band = (states >= band[..., :1]) & (states < band[..., 1:])
    return (invalid & on_band).any(2).any(0) | (~graph.feasible & invalid.any(2).any(0))


def _outcome(fn):
    """('ok', value) or ('error', exception); ValueError/TypeError are the only errors allowed
    from ctclab (the caller asserts that)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", fn()
    except Exception as error:  # noqa: BLE001 - classified by the caller
        return "error", error


def _assert_clean_error(outcome):
    kind, value = outcome
    if kind == "error":
        assert isinstance(value, (ValueError, TypeError)), f"{type(value).__name__}: {value}"


@SETTINGS
@given(ctc_inputs(), st.sampled_from(["fused", "autograd"]), st.sampled_from(["none", "sum", "mean", "nonee"]), st.booleans())
def test_ctc_loss_is_a_result_or_a_clear_error_and_never_contradicts_the_builtin_on_nan(inputs, impl, reduction, zero_infinity):
    lp, targets, il, tl, blank = inputs
    x = lp.clone().requires_grad_(True)
    got = _outcome(lambda: ctclab.ctc_loss(x, targets, il, tl, blank=blank, reduction=reduction, zero_infinity=zero_infinity, impl=impl))
    _assert_clean_error(got)
    if got[0] == "error":
        return
    loss = got[1]
    assert loss.dtype == lp.dtype
    if loss.requires_grad:
        _assert_clean_error(_outcome(lambda: loss.sum().backward()))
    if reduction != "none" or lp.dtype == torch.float16:
        return
    ref = _outcome(lambda: F.ctc_loss(lp.double(), targets, il, tl, blank=blank, reduction="none", zero_infinity=zero_infinity))
    if ref[0] == "error":
        return  # the built-in refuses it; ctclab may define it
    ref = ref[1].to(loss.dtype)
    # NaN or +inf read where a complete path can pass (on the graph's band), or anywhere in the
    # frames of an item that has no path: ctclab's loss is NaN. Off the band the built-in's NaN
    # is an accident of its recursion (-inf + NaN, inf - inf in states no complete path visits;
    # +inf on blank at the one frame of a pathless two-label target gives it inf), so there it is
    # no oracle: ctclab ignores what no path reads
    must_be_nan = _reads_invalid_where_it_counts(lp, targets, il, tl, blank)
    assert torch.isnan(loss[must_be_nan]).all(), (loss, ref)
    ref = torch.where(must_be_nan, math.nan, ref)
    finite = torch.isfinite(ref)
    assert torch.isfinite(loss[finite]).all(), (loss, ref)  # never NaN (or inf) where the built-in is finite
    torch.testing.assert_close(loss[finite], ref[finite], rtol=1e-3, atol=1e-3)
    # NaN only where the built-in has no finite answer either (its -inf from a +inf score, say)
    assert not finite[torch.isnan(loss)].any(), (loss, ref)


@SETTINGS
@given(ctc_inputs(), st.sampled_from(["numba", "reference"]), st.booleans(), st.sampled_from([None, 0.0, 3.0, math.inf, math.nan]))
def test_forced_align_is_an_alignment_or_a_clear_error(inputs, impl, skip, star):
    lp, targets, il, tl, blank = inputs
    if star is not None and targets.numel():
        targets = targets.clone()
        targets[:, 0] = ctclab.STAR
    got = _outcome(lambda: ctclab.forced_align(lp, targets, il, tl, blank=blank, impl=impl, skip_infeasible=skip, star=star))
    _assert_clean_error(got)
    if got[0] == "ok":
        ali = got[1]
        assert ali.aligned.any() or skip  # never a silent empty alignment
        aligned = ali.aligned
        assert torch.isfinite(ali.path_score[aligned]).all()
        spans = _outcome(lambda: ctclab.token_spans(ali))
        _assert_clean_error(spans)
        post = _outcome(lambda: ctclab.alignment_posteriors(lp, targets, ali, il, tl, star=star))
        _assert_clean_error(post)
        if post[0] == "ok":
            assert not torch.isnan(post[1]).any()


@SETTINGS
@given(ctc_inputs())
def test_targets_and_occupation_are_results_or_clear_errors(inputs):
    lp, targets, il, tl, blank = inputs
    gamma = _outcome(lambda: ctclab.alignment_targets(lp, targets, il, tl, blank=blank))
    _assert_clean_error(gamma)
    occupation = _outcome(lambda: ctclab.state_occupation(lp, targets, il, tl, blank=blank))
    _assert_clean_error(occupation)
    if occupation[0] == "ok":
        assert not torch.isnan(occupation[1]).any()
    if gamma[0] == "ok":
        _assert_clean_error(_outcome(lambda: smooth_targets(gamma[1], 0.1, blank=max(blank, 0), input_lengths=il)))


@SETTINGS
@given(ctc_inputs(), st.sampled_from(["none", "sum", "mean", "bogus"]))
def test_variants_are_results_or_clear_errors(inputs, reduction):
    lp, targets, il, tl, blank = inputs
    _assert_clean_error(_outcome(lambda: focal_ctc_loss(lp, targets, il, tl, blank=blank, reduction=reduction)))
    _assert_clean_error(_outcome(lambda: entropy_regularised_ctc_loss(lp, targets, il, tl, blank=blank, reduction=reduction)))


@SETTINGS
@given(ctc_inputs(), st.booleans())
def test_decoders_are_results_or_clear_errors(inputs, batch_first):
    lp, _, il, _, blank = inputs
    vocab = ["_", "a", "b", "|", "c"][: lp.shape[-1]] if lp.dim() == 3 else []
    x = lp.transpose(0, 1) if batch_first else lp
    _assert_clean_error(_outcome(lambda: ctclab.greedy_decode(x, il, blank=blank, batch_first=batch_first)))
    decoder = _outcome(lambda: ctclab.BeamSearchDecoder(vocab, blank=blank, beam_width=4))
    _assert_clean_error(decoder)
    if decoder[0] == "ok":
        _assert_clean_error(_outcome(lambda: decoder[1].decode(x, il, batch_first=batch_first)))
