import itertools
import math

import pytest
import torch
from conftest import random_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import brute_force_nll, collapse

from ctclab import ctc_loss
from ctclab.align import TokenSpan
from ctclab.decode import BeamSearchDecoder, greedy_decode
from ctclab.lm import LN10, NGramLM

ARPA = """\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0 <s> -0.5
-0.5 ab -0.3
-0.7 ba -0.2
-0.9 cab -0.1
-1.2 </s>

\\2-grams:
-0.2 <s> ab
-0.1 ab </s>
-0.05 ab cab

\\end\\
"""


@pytest.fixture
def lm(tmp_path):
    path = tmp_path / "lm.arpa"
    path.write_text(ARPA)
    return NGramLM.from_arpa(path)


def test_greedy_is_argmax_collapse_batched():
    logits, _, il, _ = random_batch(40, 5, 4, 3, seed=1)
    spans = greedy_decode(logits, il)
    for b in range(5):
        best = logits[: il[b], b].argmax(-1).tolist()
        assert [s.token for s in spans[b]] == collapse(best)
        for s in spans[b]:
            assert all(k == s.token for k in best[s.start : s.end])
            assert s.start == 0 or best[s.start - 1] != s.token
            assert s.end == len(best) or best[s.end] != s.token
        assert spans[b] == greedy_decode(logits[: il[b], b])[0]


def test_prefix_beam_search_without_lm_finds_the_most_probable_labelling():
    C, T = 3, 5
    for seed in range(4):
        lp = torch.randn(T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
        labellings = {tuple(collapse(p)) for p in itertools.product(range(C), repeat=T)}
        scored = sorted(((-brute_force_nll(lp, list(l)), l) for l in labellings), reverse=True)
        decoder = BeamSearchDecoder(["<b>", "x", "y"], beam_width=1000, token_min_logp=-math.inf, beam_prune_logp=-math.inf)
        hyps = decoder.decode(lp, nbest=3)[0]
        assert hyps[0].tokens == scored[0][1]
        assert hyps[0].acoustic_score == pytest.approx(scored[0][0], abs=1e-10)
        assert [h.acoustic_score for h in hyps] == pytest.approx([s for s, _ in scored[:3]], abs=1e-10)
        loss = ctc_loss(lp, torch.tensor(hyps[0].tokens), torch.tensor(T), torch.tensor(len(hyps[0].tokens)), reduction="sum")
        assert hyps[0].acoustic_score == pytest.approx(-loss.item(), abs=1e-10)


def test_batched_equals_per_item_and_float32_agrees_with_float64():
    logits, _, il, _ = random_batch(30, 4, 5, 3, seed=2, dtype=torch.float64)
    lp = logits.log_softmax(-1)
    decoder = BeamSearchDecoder(["<b>", "|", "a", "b", "c"], beam_width=8)
    batched = decoder.decode(lp, il)
    for b in range(4):
        assert decoder.decode(lp[: il[b], b])[0][0] == batched[b][0]
    single = decoder.decode(lp.float(), il)
    assert [h[0].tokens for h in single] == [h[0].tokens for h in batched]


def test_arpa_scores_match_hand_computed_back_off(lm):
    state = lm.begin()
    logp, state = lm.score(state, "ab")
    assert logp == pytest.approx(-0.2 * LN10)
    assert lm.end(state) == pytest.approx(-0.1 * LN10)
    logp, _ = lm.score(lm.begin(), "ba")  # unseen bigram: back-off(<s>) + P(ba)
    assert logp == pytest.approx((-0.5 - 0.7) * LN10)
    logp, state = lm.score(("ab",), "cab")
    assert logp == pytest.approx(-0.05 * LN10)
    assert lm.end(("ba",)) == pytest.approx((-0.2 - 1.2) * LN10)
    assert lm.score(("ab",), "zzz")[0] == pytest.approx((-0.3 - 100.0) * LN10)


def test_arpa_vocabulary(tmp_path):
    from ctclab.lm import arpa_vocabulary

    (tmp_path / "lm.arpa").write_text(ARPA)
    (tmp_path / "lm.bin").write_bytes(b"mmap lm http://kheafield.com/code format version 5\0\x01")
    assert arpa_vocabulary(tmp_path / "lm.arpa") == {"ab", "ba", "cab"}
    assert arpa_vocabulary(tmp_path / "lm.bin") is None


def emissions_for(frames, C, sharp=4.0):
    """Log-probs where each frame carries a distribution over classes given as {class: weight}."""
    lp = torch.full((len(frames), C), -sharp * 2)
    for t, dist in enumerate(frames):
        for k, w in dist.items():
            lp[t, k] = math.log(w)
    return lp.log_softmax(-1)


VOCAB = ["<b>", "|", "a", "b", "c"]


def test_lm_changes_the_result_when_acoustics_are_ambiguous(lm):
    # acoustics slightly prefer "ba", the LM strongly prefers "ab"
    frames = [{2: 0.45, 3: 0.55}, {0: 0.9}, {3: 0.45, 2: 0.55}, {0: 0.9}]
    lp = emissions_for(frames, 5)
    plain = BeamSearchDecoder(VOCAB, beam_width=16).decode(lp)[0][0]
    fused = BeamSearchDecoder(VOCAB, beam_width=16, lm=lm, alpha=1.0, beta=0.0).decode(lp)[0][0]
    assert plain.text == "ba" and fused.text == "ab"
    assert fused.lm_score == pytest.approx(-0.2 * LN10 - 0.1 * LN10)
    assert fused.words[0].text == "ab" and fused.words[0].start == 0 and fused.words[0].end == 3


def test_hotwords_change_the_result():
    frames = [{2: 0.45, 3: 0.55}, {0: 0.9}, {3: 0.45, 2: 0.55}, {0: 0.9}]
    lp = emissions_for(frames, 5)
    assert BeamSearchDecoder(VOCAB).decode(lp)[0][0].text == "ba"
    hot = BeamSearchDecoder(VOCAB, hotwords=["ab"], hotword_weight=2.0).decode(lp)[0][0]
    assert hot.text == "ab" and hot.lm_score == pytest.approx(2.0)  # one occurrence of a one-word hotword


def test_word_timings_and_bpe_vocabulary():
    vocab = ["<b>", "\u2581ab", "c", "\u2581b"]
    frames = [{1: 0.9}, {1: 0.9}, {2: 0.9}, {0: 0.9}, {3: 0.9}, {0: 0.9}]
    hyp = BeamSearchDecoder(vocab).decode(emissions_for(frames, 4))[0][0]
    assert hyp.text == "abc b"
    assert [(w.text, w.start, w.end) for w in hyp.words] == [("abc", 0, 3), ("b", 4, 5)]
    char = BeamSearchDecoder(VOCAB).decode(emissions_for([{2: 0.9}, {1: 0.9}, {4: 0.9}, {4: 0.9}], 5))[0][0]
    assert [(w.text, w.start, w.end) for w in char.words] == [("a", 0, 1), ("c", 2, 4)]


def test_decoded_words_are_word_spans_like_alignments():
    """One word type: the decoder's words are ctclab.WordSpan, those of word_spans for the
    hypothesis's best alignment (text, frames, score, tokens), in seconds with a frame shift."""
    from ctclab import WordSpan, forced_align, token_spans, word_spans

    frames = [{2: 0.9}, {3: 0.8}, {0: 0.9}, {1: 0.9}, {4: 0.7}, {4: 0.9}, {0: 0.9}]
    lp = emissions_for(frames, 5)
    hyp = BeamSearchDecoder(VOCAB, frame_shift=0.02).decode(lp)[0][0]
    assert hyp.text == "ab c" and all(isinstance(w, WordSpan) for w in hyp.words)
    spans = token_spans(forced_align(lp.double(), torch.tensor(hyp.tokens)))[0]
    assert hyp.words == tuple(word_spans(spans, separator=VOCAB.index("|"), vocab=VOCAB, frame_shift=0.02))
    ab, c = hyp.words
    assert (ab.text, ab.start, ab.end, c.text, c.start, c.end) == ("ab", 0, 2, "c", 4, 6)
    assert [s.token for s in ab.tokens] == [2, 3] and ab.confidence is None
    assert ab.score == pytest.approx((math.exp(lp[0, 2]) + math.exp(lp[1, 3])) / 2)  # mean emission probability
    assert (c.start_time, c.end_time) == (pytest.approx(0.08), pytest.approx(0.12)) and len(c) == 2
    plain = BeamSearchDecoder(VOCAB).decode(lp)[0][0].words[1]
    assert plain.frame_shift is None and plain.start_time is None and plain.end_time is None
    with pytest.raises(ValueError, match="frame_shift"):
        BeamSearchDecoder(VOCAB, frame_shift=0.0)


def test_word_timing_is_a_deprecated_word_span():
    from ctclab import WordSpan, WordTiming

    with pytest.warns(DeprecationWarning, match="WordSpan"):
        old = WordTiming("ab", 0, 3)
    assert isinstance(old, WordSpan) and (old.text, old.start, old.end, len(old)) == ("ab", 0, 3, 3)
    assert old.score is None and old.confidence is None and old.tokens == () and old.start_time is None
    with pytest.warns(DeprecationWarning, match="text"):
        assert old.word == "ab"
    with pytest.warns(DeprecationWarning):
        assert WordTiming(word="c", start=4, end=6).text == "c"
    hyp = BeamSearchDecoder(VOCAB).decode(emissions_for([{2: 0.9}, {0: 0.9}], 5))[0][0]
    with pytest.warns(DeprecationWarning):
        assert hyp.words[0].word == hyp.words[0].text == "a"  # the old attribute name on decoded words


def test_one_word_grouping_for_texts_words_and_alignments():
    """ctclab.align.group_words: a delimiter ends a word (and is dropped), a BPE word-start
    token begins one; the decoder's texts and words and word_spans follow it."""
    from ctclab.align import group_words

    assert group_words([1, 2, 3, 1, 1, 4, 1], delimiter=1) == [[2, 3], [4]]
    starts = {5, 7}.__contains__
    assert group_words([6, 5, 6, 7, 7, 6], starts_word=starts) == [[6], [5, 6], [7], [7, 6]]
    assert group_words([5, 6, 1, 7, 6], delimiter=1, starts_word=starts) == [[5, 6], [7, 6]]
    assert group_words([2, 3, 4]) == [[2, 3, 4]] and group_words([1, 1], delimiter=1) == []
    spans = [TokenSpan(k, t, t + 1, 1.0) for t, k in enumerate([2, 1, 3, 4])]
    assert group_words(spans, 1, token=lambda s: s.token) == [spans[:1], spans[2:]]
    decoder = BeamSearchDecoder(["<b>", "\u2581ab", "c", "\u2581b"])
    assert decoder._words((1, 2, 3, 3, 2)) == ["abc", "b", "bc"] and decoder._text((2, 1)) == "c ab"


def test_decoder_rejects_bad_input():
    decoder = BeamSearchDecoder(VOCAB)
    with pytest.raises(ValueError, match="classes"):
        decoder.decode(torch.zeros(4, 1, 6))
    with pytest.raises(TypeError, match="floating"):
        decoder.decode(torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="nbest"):
        decoder.decode(torch.zeros(4, 5), nbest=0)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchDecoder(VOCAB, beam_width=0)
    with pytest.raises(ValueError, match="word_delimiter"):
        BeamSearchDecoder(VOCAB, word_delimiter="#")
    with pytest.raises(ValueError, match="blank"):
        greedy_decode(torch.zeros(3, 2, 4), blank=4)
    nan = torch.zeros(4, 2, 5)
    nan[2, 1, 3] = math.nan
    with pytest.raises(ValueError, match="nan at item 1, frame 2"):
        greedy_decode(nan)
    with pytest.raises(ValueError, match="nan at item 1, frame 2"):
        decoder.decode(nan)
    with pytest.raises(ValueError, match="token_min_logp"):
        BeamSearchDecoder(VOCAB, token_min_logp=1.0)
    with pytest.raises(ValueError, match="tokens"):
        decoder.score(torch.zeros(4, 5), [0, 2])
    with pytest.raises(ValueError, match="classes"):
        decoder.score(torch.zeros(4, 6), [2])
    with pytest.raises(ValueError, match="nbest"):
        decoder.decode(torch.zeros(4, 5), nbest=1.5)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchDecoder(VOCAB, beam_width=2.5)
    with pytest.raises(ValueError, match="alpha"):
        BeamSearchDecoder(VOCAB, alpha=math.nan)
    with pytest.raises(TypeError, match="hotwords"):
        BeamSearchDecoder(VOCAB, hotwords="ab")


def test_greedy_on_rows_of_minus_inf_and_ties():
    lp = torch.full((4, 1, 3), -math.inf)
    lp[1, 0, 2] = 0.0
    lp[2, 0, 1] = lp[2, 0, 2] = -1.0  # a tie: the first class wins, as argmax has it
    spans = greedy_decode(lp)[0]
    assert [(s.token, s.start, s.end) for s in spans] == [(2, 1, 2), (1, 2, 3)]
    assert spans[0].score == pytest.approx(1.0) and spans[1].score == pytest.approx(math.exp(-1.0))


def test_decode_cli_text_and_json(tmp_path, capsys, lm):
    import json as _json

    from ctclab.cli import main

    frames = [{2: 0.45, 3: 0.55}, {0: 0.9}, {3: 0.45, 2: 0.55}, {0: 0.9}]
    torch.save(emissions_for(frames, 5), tmp_path / "em.pt")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (tmp_path / "lm.arpa").write_text(ARPA)
    base = ["decode", str(tmp_path / "em.pt"), "--vocab", str(tmp_path / "vocab.txt")]
    assert main(base) == 0 and capsys.readouterr().out.strip() == "ba"
    assert main(base + ["--lm", str(tmp_path / "lm.arpa"), "--alpha", "1", "--beta", "0"]) == 0
    assert capsys.readouterr().out.strip() == "ab"
    assert main(base + ["--hotword", "ab", "--hotword-weight", "2", "--format", "json", "--nbest", "2"]) == 0
    doc = _json.loads(capsys.readouterr().out)
    assert doc[0]["text"] == "ab" and len(doc) == 2 and doc[0]["words"][0]["word"] == "ab"
    assert main(base + ["--lm", str(tmp_path / "missing.arpa")]) == 2
    assert "cannot read LM" in capsys.readouterr().err
    assert main(base + ["--format", "json", "--frame-shift", "0.5"]) == 0
    (word,) = _json.loads(capsys.readouterr().out)[0]["words"]
    assert word == {"word": "ba", "start_frame": 0, "end_frame": 3, "start": 0.0, "end": 1.5}


def test_cli_hotword_weight_default_is_the_library_default():
    from ctclab.cli import build_parser
    from ctclab.decode import DEFAULT_HOTWORD_WEIGHT

    assert build_parser().parse_args(["decode", "em.pt", "--vocab", "v.txt"]).hotword_weight == DEFAULT_HOTWORD_WEIGHT


@pytest.mark.parametrize("vocab", [VOCAB, ["<b>", "\u2581ab", "c", "\u2581b", "a"]], ids=["characters", "bpe"])
def test_exhaustive_search_with_lm_and_hotwords_finds_the_best_scoring_labelling(lm, vocab):
    # with nothing pruned, the top hypothesis maximises acoustic + LM + hotword score over all labellings
    T, C = 5, 5
    decoder = BeamSearchDecoder(vocab, beam_width=10_000, lm=lm, alpha=0.7, beta=0.3, hotwords=["ba"], hotword_weight=0.4,
                                token_min_logp=-math.inf, beam_prune_logp=-math.inf)
    labellings = {tuple(collapse(p)) for p in itertools.product(range(C), repeat=T)}
    for seed in range(3):
        lp = torch.randn(T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
        best = max(decoder.score(lp, labelling).score for labelling in labellings)
        hyps = decoder.decode(lp, nbest=4)[0]
        assert hyps[0].score == pytest.approx(best, abs=1e-9)
        for h in hyps:  # every hypothesis's scores are those of its labelling
            again = decoder.score(lp, h.tokens)
            assert (h.acoustic_score, h.lm_score, h.text) == (pytest.approx(again.acoustic_score, abs=1e-9), pytest.approx(again.lm_score, abs=1e-9), again.text)


def test_tables_grow_and_results_do_not_depend_on_batching_or_history(lm):
    # a larger batch makes every table of the search grow several times (prefix arena, word trie,
    # LM cache); a decoder that has decoded other batches before gives the same results
    logits, _, il, _ = random_batch(60, 12, 5, 20, seed=7, dtype=torch.float64)
    lp = (3 * logits).log_softmax(-1)
    fresh = lambda: BeamSearchDecoder(VOCAB, beam_width=32, lm=lm, hotwords=["cab"], hotword_weight=1.0)  # noqa: E731
    warm = fresh()
    warm.decode(lp.flip(0), il)
    batched = warm.decode(lp, il, nbest=2)
    for b in [0, 5, 11]:
        single = fresh().decode(lp[: il[b], b], nbest=2)[0]
        assert [(h.text, h.tokens) for h in single] == [(h.text, h.tokens) for h in batched[b]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batched[b]], abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), sharp=st.floats(0.5, 6.0), bpe=st.booleans())
def test_unpruned_search_is_exhaustive_for_random_inputs(tmp_path_factory, T, seed, sharp, bpe):
    # random tiny inputs: with nothing pruned the search returns the best-scoring labelling
    # (acoustic + LM + hotwords) and the exact CTC score of each hypothesis
    path = tmp_path_factory.getbasetemp() / "random.arpa"
    path.write_text(ARPA)
    vocab = ["<b>", "\u2581ab", "c", "\u2581b", "a"] if bpe else VOCAB
    decoder = BeamSearchDecoder(vocab, beam_width=100_000, lm=NGramLM.from_arpa(path), alpha=0.8, beta=0.5,
                                hotwords=["ab"], hotword_weight=0.3, token_min_logp=-math.inf, beam_prune_logp=-math.inf)
    g = torch.Generator().manual_seed(seed)
    lp = (sharp * torch.randn(T, 5, dtype=torch.float64, generator=g)).log_softmax(-1)
    labellings = {tuple(collapse(p)) for p in itertools.product(range(5), repeat=T)}
    best = max(decoder.score(lp, labelling).score for labelling in labellings)
    top = decoder.decode(lp)[0][0]
    assert top.score == pytest.approx(best, abs=1e-9)
    assert top.acoustic_score == pytest.approx(decoder.score(lp, top.tokens).acoustic_score, abs=1e-9)


# -- batch-major input, NaN, lengths that contradict the shape ----------------------------------
def test_batch_first_gives_the_time_major_results():
    logits, _, il, _ = random_batch(30, 4, 5, 3, seed=3, dtype=torch.float64)
    lp = (2 * logits).log_softmax(-1)
    batch_major = lp.transpose(0, 1).contiguous()  # (B, T, C), as Hugging Face models return
    assert greedy_decode(batch_major, il, batch_first=True) == greedy_decode(lp, il)
    decoder = BeamSearchDecoder(VOCAB, beam_width=8, hotwords=["ab"])
    assert decoder.decode(batch_major, il, nbest=2, batch_first=True) == decoder.decode(lp, il, nbest=2)
    # torchaudio's aligner takes (1, T, C): one utterance, not T one-frame ones
    one = batch_major[:1]
    assert greedy_decode(one, batch_first=True) == greedy_decode(lp[:, :1])
    assert decoder.decode(one, batch_first=True) == decoder.decode(lp[:, 0])
    with pytest.raises(TypeError, match="batch_first"):
        greedy_decode(lp, batch_first=1)


def test_lengths_that_contradict_the_shape_say_batch_first():
    lp = torch.randn(1, 40, 5).log_softmax(-1)  # (B, T, C) = (1, 40, 5) passed time-major
    decoder = BeamSearchDecoder(VOCAB)
    for decode in (greedy_decode, decoder.decode):
        with pytest.raises(ValueError, match=r"input_lengths has 1 entries but log_probs \(T, B, C\) = \(1, 40, 5\) has B=40 items.*batch_first=True"):
            decode(lp, torch.tensor([40]))
        with pytest.raises(ValueError, match=r"input_lengths go up to 40 .* has T=1 frames.*batch_first=True"):
            decode(lp, torch.full((40,), 40))
        with pytest.raises(ValueError, match=r"\(B, T, C\) = \(40, 1, 5\).*drop batch_first=True"):
            decode(lp.transpose(0, 1), torch.tensor([40]), batch_first=True)
        with pytest.warns(UserWarning, match="40 utterances of one frame each.*batch_first=True"):
            decode(lp)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy_decode(lp, torch.ones(40, dtype=torch.long))  # one-frame utterances, said so: no warning
        greedy_decode(lp, batch_first=True)


def test_nan_inside_an_item_is_named_and_nan_in_padding_is_ignored():
    g = torch.Generator().manual_seed(4)
    lp = (3 * torch.randn(12, 3, 5, generator=g)).log_softmax(-1)
    lengths = torch.tensor([12, 7, 9])
    decoder = BeamSearchDecoder(VOCAB, beam_width=8)
    clean_greedy, clean_beam = greedy_decode(lp, lengths), decoder.decode(lp, lengths, nbest=2)
    padded = lp.clone()
    padded[7:, 1] = math.nan  # beyond item 1's 7 frames
    padded[9:, 2, 3] = math.nan
    assert greedy_decode(padded, lengths) == clean_greedy
    assert decoder.decode(padded, lengths, nbest=2) == clean_beam
    padded[10:, 1, 2] = math.inf
    assert greedy_decode(padded, lengths) == clean_greedy
    assert decoder.decode(padded, lengths, nbest=2) == clean_beam
    bad = padded.clone()
    bad[5, 2, 1] = math.nan
    bad[6, 0, 4] = math.inf
    for decode in (greedy_decode, decoder.decode):  # the first frame that holds one, the first item there
        with pytest.raises(ValueError, match="nan at item 2, frame 5 "):
            decode(bad, lengths)
        with pytest.raises(ValueError, match="nan at item 2, frame 5 "):
            decode(bad.transpose(0, 1), lengths, batch_first=True)
        bad[5, 2, 1] = 0.0
        with pytest.raises(ValueError, match="inf at item 0, frame 6 "):
            decode(bad, lengths)
        bad[5, 2, 1] = math.nan
    with pytest.raises(ValueError, match="nan at item 0, frame 5 "):
        decoder.score(bad[:, 2], [2])
    dead = lp.clone()
    dead[8:, 1] = -math.inf  # beyond item 1's 7 frames: padding
    assert decoder.decode(dead, lengths, nbest=2) == clean_beam
    dead[3, 2] = -math.inf
    with pytest.raises(ValueError, match="item 2 are -inf for every class at frame 3"):
        decoder.decode(dead, lengths)


def test_nbest_larger_than_the_beam_still_returns_nbest():
    lp = emissions_for([{2: 0.9}, {0: 0.9}, {3: 0.9}, {1: 0.9}, {4: 0.9}], 5)
    hyps = BeamSearchDecoder(VOCAB, beam_width=1).decode(lp, nbest=4)[0]
    assert len(hyps) == 4 and len({h.text for h in hyps}) == 4 and hyps[0].text == "ab c"


# -- kenlm missing --------------------------------------------------------------------------------
def test_kenlm_missing_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from ctclab.lm import KenLM, load_lm

    monkeypatch.setitem(sys.modules, "kenlm", None)  # import kenlm raises ImportError
    arpa, binary = tmp_path / "lm.arpa", tmp_path / "lm.bin"
    arpa.write_text(ARPA)
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\0\x01")
    with pytest.raises(ImportError, match=r"pip install kenlm.*NGramLM"):
        KenLM(arpa)
    with pytest.raises(ValueError, match=r"not an ARPA text file.*pip install kenlm"):
        load_lm(binary)
    with pytest.raises(ValueError, match=r"pip install kenlm.*NGramLM"):
        load_lm(arpa, backend="kenlm")
    assert isinstance(load_lm(arpa), NGramLM)  # ARPA text: ctclab's own reader


def test_returned_scores_are_exact_ctc_scores_despite_pruning():
    # the beam's own sum covers only the paths it kept; the returned acoustic scores are the
    # full CTC log-likelihoods (here against torch's implementation), with -inf entries too
    logits, _, il, _ = random_batch(40, 6, 5, 3, seed=5, dtype=torch.float64)
    lp = (2 * logits).log_softmax(-1)
    lp[torch.rand(lp.shape, generator=torch.Generator().manual_seed(6)) < 0.1] = -math.inf
    decoder = BeamSearchDecoder(VOCAB, beam_width=4, beam_prune_logp=-3.0)
    for b, hyps in enumerate(decoder.decode(lp, il, nbest=3)):
        assert len(hyps) == 3
        for h in hyps:
            nll = torch.nn.functional.ctc_loss(lp[: il[b], b], torch.tensor(h.tokens, dtype=torch.long), torch.tensor(int(il[b])),
                                               torch.tensor(len(h.tokens)), reduction="sum")
            assert h.acoustic_score == pytest.approx(-nll.item(), abs=1e-9)


def test_prefixes_just_below_the_nbest_by_beam_score_are_rescored_and_can_win(monkeypatch):
    # a narrow beam's score of a prefix misses the paths it pruned: the decoder rescores the best
    # by beam score together with those within _RESCORE_MARGIN of them, and ranks by exact score
    labels = ["<b>", "a", "b", "c"]
    extras = BeamSearchDecoder._RESCORE_EXTRA
    gained = 0
    for seed in range(30):
        lp = (torch.randn(10, 4, generator=torch.Generator().manual_seed(seed)) * 2).log_softmax(-1)
        tops = {}
        for extra in (0, extras):
            monkeypatch.setattr(BeamSearchDecoder, "_RESCORE_EXTRA", extra)
            decoder = BeamSearchDecoder(labels, beam_width=2, beam_prune_logp=-1000.0, token_min_logp=-1000.0)
            top = decoder.decode(lp)[0][0]
            assert top.score == pytest.approx(decoder.score(lp, top.tokens).score, abs=1e-9)  # exact, not the beam's
            tops[extra] = top.score
        assert tops[extras] >= tops[0] - 1e-12  # rescoring more prefixes never loses
        gained += tops[extras] > tops[0] + 1e-9
    assert gained >= 3  # and here it finds better transcripts than the n best by beam score alone
