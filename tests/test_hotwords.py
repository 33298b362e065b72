"""Hotwords in the beam search: the bonus is the objective's (``decoder.score``), the partial
match's lookahead is taken back when the word does not complete, and it never pushes other
prefixes out of the beam."""
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctclab.decode import DEFAULT_HOTWORD_WEIGHT, BeamSearchDecoder
from ctclab.lm import NGramLM

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["<b>", "|"] + list(LETTERS)
INDEX = {c: i for i, c in enumerate(VOCAB)} | {" ": 1}
WORDS = ["forced", "alignment", "works", "the", "quick", "brown", "fox", "bugs", "bunny", "jumps", "over", "lazy", "dog"]
#: log-prob margin (nats) of the spoken class over every other at each frame, before the
#: unit noise: a confident acoustic model (the spoken class at p > 0.9999, every other below
#: e^-12 or so), well above the default hotword bonus per word (5)
CLEAR = 16.0


def tokens_of(text):
    return [INDEX[c] for c in text]


def spoken(text, seed=0, margin=CLEAR, frames_per_char=2):
    """``(T, C)`` float64 log-probs of a peaky model saying ``text``: each character (the
    space as the delimiter '|') for ``frames_per_char`` frames, then a blank frame; unit
    Gaussian logits plus ``margin`` on the spoken class."""
    frames = [k for c in text for k in [INDEX[c]] * frames_per_char + [0]]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(frames), len(VOCAB), generator=g, dtype=torch.float64)
    logits[torch.arange(len(frames)), torch.tensor(frames)] += margin
    return logits.log_softmax(-1)


def arpa_lm(tmp_path, words=WORDS):
    """A unigram LM over ``words`` (uniform)."""
    logp = -math.log10(len(words) + 1)
    lines = ["\\data\\", f"ngram 1={len(words) + 3}", "", "\\1-grams:", f"{logp:.6f}\t</s>", "-99\t<s>", "-5\t<unk>"]
    lines += [f"{logp:.6f}\t{w}" for w in words] + ["", "\\end\\", ""]
    path = tmp_path / "words.arpa"
    path.write_text("\n".join(lines))
    return NGramLM.from_arpa(path)


def assert_scores_are_the_objective(decoder, lp, hyps):
    for h in hyps:
        again = decoder.score(lp, h.tokens)
        assert h.text == again.text
        assert h.acoustic_score == pytest.approx(again.acoustic_score, abs=1e-6)
        assert h.lm_score == pytest.approx(again.lm_score, abs=1e-9)
        assert h.score == pytest.approx(again.score, abs=1e-6)


# -- the cases of the issue -------------------------------------------------------------------
@pytest.mark.parametrize("margin", [8.0, CLEAR])
@pytest.mark.parametrize("with_lm", [False, True], ids=["no-lm", "lm"])
@pytest.mark.parametrize(
    "text, hotwords",
    [
        ("forced alignment works", ["fox"]),
        ("forced alignment works", ["world"]),
        ("the quick brown fox", ["hello"]),
        ("bugs bunny", ["bugs bunny"]),
        ("bugs bunny", ["bunnyx"]),
        ("bugs bunny", ["bugs bunny rabbit", "bu", "bunnyx", "bugsy"]),
    ],
)
def test_hotwords_do_not_hijack_the_transcript(tmp_path, text, hotwords, with_lm, margin):
    # (these decoded as "fox alignment works", "forced alignment wor", "bugs", "bunny", with a
    # single hypothesis for nbest=3, when a partial match's bonus outranked the beam's pruning)
    lm = arpa_lm(tmp_path, WORDS + ["hello", "world", "rabbit"]) if with_lm else None
    lp = spoken(text, margin=margin)
    plain = BeamSearchDecoder(VOCAB, lm=lm).decode(lp)[0][0]
    decoder = BeamSearchDecoder(VOCAB, lm=lm, hotwords=hotwords)
    hyps = decoder.decode(lp, nbest=3)[0]
    assert plain.text == text and hyps[0].text == text
    assert len(hyps) == 3 and len({h.text for h in hyps}) == 3
    assert_scores_are_the_objective(decoder, lp, hyps)
    truth = decoder.score(lp, tokens_of(text))
    assert hyps[0].score == pytest.approx(truth.score, abs=1e-6)
    # the bonus is that of the hotwords in the transcript, nothing for partial matches
    expected = DEFAULT_HOTWORD_WEIGHT * len(text.split()) if text in hotwords else 0.0
    assert hyps[0].lm_score - plain.lm_score == pytest.approx(expected, abs=1e-9)
    # no pruning at all finds the same: the hotwords cost the beam nothing
    exhaustive = BeamSearchDecoder(VOCAB, lm=lm, hotwords=hotwords, beam_prune_logp=-math.inf).decode(lp)[0][0]
    assert exhaustive.tokens == hyps[0].tokens


def test_phrase_bonus_counts_consecutive_words_only_and_every_occurrence():
    decoder = BeamSearchDecoder(VOCAB, hotwords=["bugs bunny", "fox"], hotword_weight=2.0)
    lp = spoken("bugs bunny fox bunny bugs fox bugs bunny")
    hyp = decoder.decode(lp)[0][0]
    assert hyp.text == "bugs bunny fox bunny bugs fox bugs bunny"
    # two "bugs bunny" (2 words each) and two "fox"; "bunny bugs" earns nothing
    assert hyp.lm_score == pytest.approx(2.0 * (2 * 2 + 2 * 1))
    overlapping = BeamSearchDecoder(VOCAB, hotwords=["fox fox"], hotword_weight=1.0)
    assert overlapping.score(spoken("fox fox fox"), tokens_of("fox fox fox")).lm_score == pytest.approx(2 * 2.0)
    # a phrase may be written with the word delimiter too
    piped = BeamSearchDecoder(VOCAB, hotwords=["bugs|bunny"], hotword_weight=2.0)
    assert piped.hotwords == ("bugs bunny",)
    assert piped.score(lp, tokens_of("bugs bunny")).lm_score == pytest.approx(4.0)


def test_hotword_decides_between_close_readings_and_its_phrase_too():
    # 'u' and 'o' about equally likely in the second word: "bugs bonny" by a hair without hotwords
    lp = spoken("bugs bonny", margin=CLEAR)
    u, o = INDEX["u"], INDEX["o"]
    frames = [t for t in range(lp.shape[0]) if lp[t].argmax() == o]
    for t in frames:
        lp[t, u] = lp[t, o] - 0.3
    lp = lp.log_softmax(-1)
    assert BeamSearchDecoder(VOCAB).decode(lp)[0][0].text == "bugs bonny"
    for hotwords in (["bunny"], ["bugs bunny"]):
        hyp = BeamSearchDecoder(VOCAB, hotwords=hotwords).decode(lp)[0][0]
        assert hyp.text == "bugs bunny"
    # the phrase earns only where all of it is said
    assert BeamSearchDecoder(VOCAB, hotwords=["fox bunny"]).decode(lp)[0][0].text == "bugs bonny"


def test_lookahead_keeps_a_weak_hotword_in_a_narrow_beam_without_costing_the_best():
    # with one prefix kept per frame, ranking by the lookahead keeps "ab" in sight; the returned
    # hypothesis is still ranked by the objective
    frames = [{2: 0.4, 3: 0.6}, {0: 0.9}, {3: 0.4, 2: 0.6}, {0: 0.9}]
    lp = torch.full((4, 5), -8.0, dtype=torch.float64)
    for t, dist in enumerate(frames):
        for k, w in dist.items():
            lp[t, k] = math.log(w)
    lp = lp.log_softmax(-1)
    vocab = ["<b>", "|", "a", "b", "c"]
    assert BeamSearchDecoder(vocab, beam_width=1).decode(lp)[0][0].text == "ba"
    hot = BeamSearchDecoder(vocab, beam_width=1, hotwords=["ab"], hotword_weight=2.0)
    hyp = hot.decode(lp)[0][0]
    assert hyp.text == "ab" and hyp.score == pytest.approx(hot.score(lp, hyp.tokens).score, abs=1e-9)


def test_negative_weight_penalises_and_never_looks_ahead():
    lp = spoken("the quick fox")
    decoder = BeamSearchDecoder(VOCAB, hotwords=["quick"], hotword_weight=-3.0)
    hyp = decoder.decode(lp)[0][0]
    assert hyp.text == "the quick fox" and hyp.lm_score == pytest.approx(-3.0)


def test_hotword_input_errors():
    with pytest.raises(ValueError, match="at least one word"):
        BeamSearchDecoder(VOCAB, hotwords=["fox", "  "])
    with pytest.raises(TypeError, match="hotwords"):
        BeamSearchDecoder(VOCAB, hotwords="fox")
    with pytest.raises(ValueError, match="hotword_weight"):
        BeamSearchDecoder(VOCAB, hotwords=["fox"], hotword_weight=math.inf)


def test_a_thousand_hotwords_build_and_decode_quickly():
    import time

    rng = random.Random(0)
    hotwords = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9))) for _ in range(1000)]
    hotwords += [" ".join(rng.sample(WORDS, 2)) for _ in range(50)]
    lp = spoken("the quick brown fox jumps over the lazy dog")
    decoder = BeamSearchDecoder(VOCAB, hotwords=hotwords)
    decoder.decode(lp)  # compiled
    t0 = time.perf_counter()
    BeamSearchDecoder(VOCAB, hotwords=hotwords).decode(lp)
    assert time.perf_counter() - t0 < 2.0  # building the automaton and decoding: milliseconds here
    hyps = decoder.decode(lp, nbest=2)[0]
    assert hyps[0].text == "the quick brown fox jumps over the lazy dog" and len(hyps) == 2
    assert_scores_are_the_objective(decoder, lp, hyps)


# -- properties over random sentences and hotword lists ----------------------------------------
def absent_words(rng, text, n):
    """Random letter strings that are no substring of ``text`` (so no word, prefix or part of
    a word in it)."""
    out = []
    while len(out) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 7)))
        if w not in text:
            out.append(w)
    return out


@st.composite
def sentences_and_hotwords(draw):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5))
    text = " ".join(words)
    rng = random.Random(draw(st.integers(0, 2**31 - 1)))
    kinds = draw(st.lists(st.sampled_from(["present", "absent", "prefix", "prefix+x", "phrase", "absent phrase"]), max_size=6))
    hotwords = []
    for kind in kinds:
        w = rng.choice(words)
        if kind == "present":
            hotwords.append(w)
        elif kind == "absent":
            hotwords += absent_words(rng, text, 1)
        elif kind == "prefix":
            hotwords.append(w[: rng.randint(1, len(w) - 1)] if len(w) > 1 else w)
        elif kind == "prefix+x":  # spelled in the audio but never completed
            hotwords.append(w + rng.choice(LETTERS))
        elif kind == "phrase":
            i = rng.randrange(len(words))
            hotwords.append(" ".join(words[i : i + rng.randint(1, 3)]))
        else:
            hotwords.append(f"{w} {absent_words(rng, text, 1)[0]}")
    return text, hotwords, rng.randint(0, 2**31 - 1)


@settings(max_examples=25, deadline=None)
@given(case=sentences_and_hotwords(), weight=st.sampled_from([DEFAULT_HOTWORD_WEIGHT, 1.0, 12.0, 20.0]),
       beam=st.sampled_from([1, 2, 16, 100]), nbest=st.integers(1, 3))
def test_no_search_error_against_the_truth(case, weight, beam, nbest):
    # whatever the hotwords (said, absent, prefixes of words said, phrases) and weight, the
    # result scores at least as high as the spoken sentence under the objective, and every
    # hypothesis carries its exact objective
    text, hotwords, seed = case
    lp = spoken(text, seed=seed)
    decoder = BeamSearchDecoder(VOCAB, beam_width=beam, hotwords=hotwords, hotword_weight=weight)
    hyps = decoder.decode(lp, nbest=nbest)[0]
    assert hyps[0].score >= decoder.score(lp, tokens_of(text)).score - 1e-6
    assert len(hyps) == nbest and len({h.text for h in hyps}) == nbest
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert_scores_are_the_objective(decoder, lp, hyps)


@settings(max_examples=25, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=5), n=st.sampled_from([1, 5, 50]),
       seed=st.integers(0, 2**31 - 1), with_phrases=st.booleans())
def test_absent_hotwords_leave_the_transcript_alone(tmp_path_factory, words, n, seed, with_phrases):
    text = " ".join(words)
    rng = random.Random(seed)
    hotwords = absent_words(rng, text, n)
    if with_phrases:  # a word said, followed by one not said
        hotwords += [f"{rng.choice(words)} {w}" for w in absent_words(rng, text, 3)]
    lp = spoken(text, seed=seed)
    lm = arpa_lm(tmp_path_factory.mktemp("lm")) if seed % 2 else None
    plain = BeamSearchDecoder(VOCAB, lm=lm).decode(lp, nbest=2)[0]
    hot = BeamSearchDecoder(VOCAB, lm=lm, hotwords=hotwords).decode(lp, nbest=2)[0]
    assert hot[0].text == plain[0].text == text
    assert hot[0].tokens == plain[0].tokens and hot[0].score == pytest.approx(plain[0].score, abs=1e-9)
    assert len(hot) == 2


def test_batched_hotword_decoding_equals_one_by_one():
    texts = ["bugs bunny", "the quick brown fox", "forced alignment works", "fox"]
    lps = [spoken(t, seed=i) for i, t in enumerate(texts)]
    batch = torch.nn.utils.rnn.pad_sequence(lps)
    decoder = BeamSearchDecoder(VOCAB, hotwords=["bugs bunny", "fox", "forc", "alignmentx"])
    batched = decoder.decode(batch, [len(x) for x in lps], nbest=2)
    for lp, hyps in zip(lps, batched):
        alone = decoder.decode(lp, nbest=2)[0]
        assert [(h.tokens, h.text) for h in hyps] == [(h.tokens, h.text) for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-9)
    assert [h[0].text for h in batched] == texts
