"""CTC decoding: batched greedy (best path) decoding and prefix beam search with a word LM.

Greedy decoding takes the most probable class at every frame and collapses the result:
repeated classes merge, blanks drop out (Graves et al. 2006, section 3.2, "best path
decoding"). Vectorised over the whole batch: only the final split into per-item lists is a
Python loop, over items.
"""
from __future__ import annotations

import math
import operator
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _decode_kernels as K
from ._inputs import CTCBatch, Lengths, check_scores, compute_dtype, decoding_batch, first_dead_frame
from .align import TokenSpan, WordSpan, _checkpoint_every, best_paths, check_frame_shift, group_words, spell, token_spans, word_of
from .graph import CTCGraph
from .loss import batch_nll
from .lm import UNK
from .vocab import BPE_MARKER

#: hotword bonus (natural log) per word of a hotword found in the transcript. A hotword then
#: outweighs acoustic (and LM) evidence against it of at most 5 nats per word, a probability
#: ratio of about 150: less than one confident CTC frame (the spoken class at p >= 0.99 against
#: an alternative at <= e^-5 = 0.007), so it decides between close readings without overriding
#: a confident model, and short hotwords (two letters) are rarely inserted where they were not
#: said. pyctcdecode's default is 10 per word: in benchmarks/decode_vs_pyctcdecode.py
#: --hotwords, 100 or 1,000 hotwords (half of them words of the sentences) then leave 22-31 of
#: 50 sentences right, against 47-49 at 5.
DEFAULT_HOTWORD_WEIGHT = 5.0


def greedy_decode(log_probs: Tensor, input_lengths: Lengths | None = None, blank: int = 0, *,
                  batch_first: bool = False) -> list[list[TokenSpan]]:
    """Best-path decoding of a batch.

    Args:
        log_probs: ``(T, B, C)``, ``(B, T, C)`` with ``batch_first``, or ``(T, C)`` log-probs
            (or any scores whose argmax is meant). NaN or +inf inside an item's frames is an
            error; beyond its length, ignored.
        input_lengths: ``(B,)`` frames of each item; None means all ``T``.
        blank: blank index.
        batch_first: ``log_probs`` is batch-major ``(B, T, C)`` (Hugging Face models' logits);
            the results are those of the time-major call on ``log_probs.transpose(0, 1)``.

    Returns:
        Per item, its tokens in order as :class:`TokenSpan` (``token``, ``start``/``end`` frame of
        the token's run, end exclusive, ``score`` = mean probability of the token over its run).
    """
    log_probs, lengths_tensor = decoding_batch(log_probs, input_lengths, batch_first)
    lengths = lengths_tensor.numpy()
    T, B, C = log_probs.shape
    if not 0 <= blank < C:
        raise ValueError(f"blank must be in [0, C) = [0, {C}), got {blank}")
    log_probs = log_probs.detach()
    if log_probs.device.type == "cpu" and log_probs.dtype in (torch.float32, torch.float64):
        # torch's max(-1) with indices is several times slower than the plain reduction amax
        scores = log_probs.amax(-1)
        labels = np.empty((T, B), np.int64)
        K.first_index_of(log_probs.contiguous().numpy(), scores.numpy(), labels)
        scores = scores.double().numpy()
    else:
        scores, labels = log_probs.max(-1)  # (T, B), on the input's device
        scores, labels = scores.cpu().double().numpy(), labels.cpu().numpy()
    if np.isnan(scores).any() or np.isposinf(scores).any():  # a row's maximum is NaN (+inf) where the row holds one
        check_scores(log_probs, lengths_tensor.to(log_probs.device))  # inside an item: an error; in padding: ignored
    tokens, starts, ends = (np.empty((B, T), np.int64) for _ in range(3))
    mean_probs, counts = np.empty((B, T)), np.empty(B, np.int64)
    K.collapse_runs(labels, scores, lengths, blank, tokens, starts, ends, mean_probs, counts)
    return [
        list(map(TokenSpan, tokens[b, :n].tolist(), starts[b, :n].tolist(), ends[b, :n].tolist(), mean_probs[b, :n].tolist()))
        for b, n in enumerate(counts.tolist())
    ]


class WordTiming(WordSpan):
    """Deprecated: decoded words are :class:`ctclab.WordSpan`, the word type of alignment too
    (``text``, ``start``/``end`` frames, ``score``, ``confidence``, ``tokens``; ``word`` is
    ``text``). ``WordTiming(word, start, end)`` still makes one, with a DeprecationWarning."""

    def __init__(self, word: str, start: int, end: int):
        warnings.warn("ctclab.WordTiming is deprecated: decoded words are ctclab.WordSpan (WordTiming's word is its text)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(word, start, end)


@dataclass(frozen=True)
class Hypothesis:
    """One decoding of an utterance.

    ``acoustic_score``: log-probability of the token sequence summed over its alignments (the
    CTC score); ``lm_score``: ``alpha * log P_LM(words) + beta * len(words)`` plus hotword bonuses;
    ``score``: their sum, what hypotheses are ranked by. ``words``: :class:`ctclab.WordSpan`
    per word (text, frames from the hypothesis's best alignment, seconds with the decoder's
    ``frame_shift``, mean emission probability as ``score``, tokens); empty from
    :meth:`BeamSearchDecoder.score`."""

    text: str
    tokens: tuple[int, ...]
    words: tuple[WordSpan, ...]
    acoustic_score: float
    lm_score: float
    score: float


def _hypotheses_graph(log_probs: np.ndarray, lengths: np.ndarray, labellings: list, blank: int) -> tuple[CTCBatch, CTCGraph]:
    """The CTC batch and graph of N labellings against their utterances' ``(T, N, C)``
    log-probs (read in float64) and ``(N,)`` frame counts: what the decoder rescores its
    hypotheses on, and times the chosen ones' words on."""
    N = len(labellings)
    target_lengths = np.fromiter(map(len, labellings), np.int64, N)
    targets = np.full((N, int(target_lengths.max(initial=0))), blank, np.int64)
    for row, tokens in enumerate(labellings):
        targets[row, : len(tokens)] = tokens
    frames = np.asarray(lengths, np.int64)
    batch = CTCBatch(torch.from_numpy(np.asarray(log_probs, np.float64)), torch.from_numpy(targets), torch.from_numpy(frames),
                     torch.from_numpy(target_lengths), blank, unbatched=False, max_input_length=int(frames.max(initial=0)))
    return batch, CTCGraph.build(batch)


def _log_likelihoods(batch: CTCBatch, graph: CTCGraph) -> np.ndarray:
    """``(N,)`` float64 ``log P(labelling | log_probs)`` over all CTC alignments (-inf where no
    path spells it): the loss's own forward recursion (:func:`ctclab.loss.batch_nll`, the
    backend ``'auto'`` picks: the numba kernels on CPU). The exact acoustic score that
    :meth:`BeamSearchDecoder.score` and the returned hypotheses carry."""
    with torch.no_grad():
        return -batch_nll(batch, graph=graph).numpy()


def _hotword_automaton(phrases, weight: float) -> tuple[K.Hotwords, int]:
    """The hotword automaton of :mod:`ctclab._decode_kernels` (Aho-Corasick over code points,
    :class:`~ctclab._decode_kernels.Hotwords`) for ``phrases`` (tuples of words), and its state
    at the start of a transcript.

    A phrase is the pattern ``SEP w1 SEP ... wn SEP`` (:data:`~ctclab._decode_kernels.SEPARATOR`
    between words), worth ``weight * n``. Per state: ``gain``, the worth of every pattern
    that ends there (its own and, through failure links, those that end in a suffix of it);
    ``look``, the lookahead: the largest ``worth * (depth - 1) / (len - 1)`` over the patterns
    that the state (or a suffix of it) is a proper prefix of, where ``depth`` counts the
    characters of the pattern spelled, the leading separator included; 0 for a negative
    weight (a penalty is no reason to keep a prefix).

    Returns ``(automaton, start)``; with no phrases, one state (the root) that every character
    leads back to."""
    children: list[dict[int, int]] = [{}]
    depth, own_gain, look = [0], [0.0], [0.0]
    for words in phrases:
        codes = [K.SEPARATOR]
        for word in words:
            codes += [*map(ord, word), K.SEPARATOR]
        worth = weight * len(words)
        node = 0
        for i, code in enumerate(codes):
            if code not in children[node]:
                children[node][code] = len(children)
                children.append({})
                depth.append(depth[node] + 1)
                own_gain.append(0.0)
                look.append(0.0)
            node = children[node][code]
            if i + 1 < len(codes):  # a proper prefix: part of the worth in sight
                look[node] = max(look[node], max(0.0, worth) * i / (len(codes) - 1))
        own_gain[node] += worth
    fail = [0] * len(children)
    gain = own_gain[:]
    queue = list(children[0].values())
    for node in queue:  # breadth first: a state's failure link is shallower, hence done
        for code, child in children[node].items():
            f = fail[node]
            while f and code not in children[f]:
                f = fail[f]
            fail[child] = children[f][code] if node and code in children[f] else 0
            gain[child] += gain[fail[child]]
            look[child] = max(look[child], look[fail[child]])
            queue.append(child)
    keys = np.array([node * K.CHARS + code for node, edges in enumerate(children) for code in edges], np.int64)
    values = np.array([child for edges in children for child in edges.values()], np.int64)
    moves = K.empty_map(len(keys))
    K.fill_map(moves, keys, values)
    start = children[0].get(K.SEPARATOR, 0)
    return K.Hotwords(moves, np.array(fail, np.int64), np.array(gain), np.array(look)), start


def _check_settings(classes: int, blank, beam_width, alpha, beta, hotwords, hotword_weight, token_min_logp, beam_prune_logp,
                    unk_offset) -> None:
    """:class:`BeamSearchDecoder`'s arguments checked: an error that names the one at fault."""
    if not 0 <= blank < classes:
        raise ValueError(f"blank must be in [0, {classes}), got {blank}")
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
    for name, value in (("alpha", alpha), ("beta", beta), ("hotword_weight", hotword_weight), ("unk_offset", unk_offset)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if isinstance(hotwords, str) or any(not isinstance(w, str) for w in hotwords or ()):
        raise TypeError("hotwords must be a list of words (strings), not a single string")
    for name, value in (("token_min_logp", token_min_logp), ("beam_prune_logp", beam_prune_logp)):
        if math.isnan(value) or value > 0:
            raise ValueError(f"{name} must be a log-probability offset <= 0 (or -inf), got {value}")


def _phrases(hotwords, word_delimiter: str | None) -> tuple[tuple[str, ...], ...]:
    """Each hotword as its words (split at spaces, or at the word delimiter), in order, once."""
    phrases = {}
    for hotword in hotwords:
        words = tuple((hotword.replace(word_delimiter, " ") if word_delimiter else hotword).split())
        if not words:
            raise ValueError(f"hotwords must hold at least one word each, got {hotword!r}")
        phrases.setdefault(words, None)
    return tuple(phrases)


class BeamSearchDecoder:
    """CTC prefix beam search (Hannun et al., "First-Pass Large Vocabulary Continuous Speech
    Recognition using Bi-Directional Recurrent DNNs", arXiv 1408.2873) with word-level LM fusion,
    for a whole batch at once (numba kernels, :mod:`ctclab._decode_kernels`).

    Each prefix (collapsed token sequence) carries the probability of the paths that end in blank
    and of those that end in its last token; equal prefixes reached by different paths merge.
    A word is scored by the LM when it completes (at a delimiter token, at a BPE word-start
    token, or at the end): ``alpha * log P_LM(word | history) + beta``. While a word is being
    spelled, a prefix that no LM word starts with costs ``unk_offset`` (when the LM lists its
    vocabulary).

    Hotwords: every occurrence of a hotword in the transcript, as whole words (a phrase such as
    ``"bugs bunny"``: as consecutive words; overlapping occurrences all count), earns
    ``hotword_weight`` per word of the hotword. That bonus is part of the objective
    (:meth:`score`), counted when the hotword's last word completes. While a hotword is being
    spelled, its prefix also carries a lookahead, the bonus times the share of the hotword's
    characters spelled so far, so that it survives a narrow beam; the lookahead is taken back as
    soon as the text leaves the hotword and is never part of a returned score. Prefixes are
    ranked by acoustic score + LM + lookahead, but ``beam_prune_logp`` is measured from the best
    acoustic + LM score, without lookaheads: a hotword being spelled never pushes other prefixes
    out of the beam. A hotword therefore wins only where the acoustics and LM prefer the
    alternative by less than its bonus.

    The returned hypotheses carry exact scores, those of :meth:`score`: their acoustic score is
    recomputed over all alignments (the beam's own sum lacks the paths it pruned), and they are
    ranked by it.

    Args:
        vocab: index -> token string (a :class:`ctclab.Vocabulary` or a sequence).
        blank: blank index.
        beam_width: prefixes kept per frame.
        lm: a :class:`ctclab.lm.LanguageModel` (e.g. :class:`ctclab.lm.NGramLM`), or None. Its
            states must be hashable; the decoder caches scores per (state, word).
        alpha, beta: LM weight and word insertion bonus.
        hotwords: words or phrases to favour (words separated by spaces, or by the word
            delimiter); hotword_weight: bonus (natural log) per word of a hotword found in the
            transcript (:data:`DEFAULT_HOTWORD_WEIGHT`: 5; pyctcdecode's 10 means the same,
            per word). A negative weight penalises the hotwords.
        word_delimiter: the token that separates words (default: ``'|'`` or ``' '`` if in the
            vocabulary); BPE vocabularies (tokens starting with ``'▁'``) need none.
        token_min_logp: tokens below this log-prob at a frame are not tried there (``-inf``:
            all); blank is always tried. -5 as in pyctcdecode: a token below it carries under
            0.7% of the frame's mass.
        beam_prune_logp: prefixes this far below the best are dropped (``-inf``: none); the
            ``nbest`` best are kept whatever their distance, so that ``nbest`` hypotheses come
            back whenever the search meets that many.
        unk_offset: cost of a partial word that no LM word starts with (scaled by its length
            / 6 past 6 characters, as in pyctcdecode).
        frame_shift: seconds per frame (0.02 for wav2vec2), or None: the returned words'
            ``start_time``/``end_time`` (:class:`ctclab.WordSpan`) are in seconds then.

    Ties are broken by the order in which prefixes first appear, so results are deterministic.
    A decoder keeps its word trie and LM score cache between calls (cleared when they grow past
    a few million entries); it is not meant to be shared between threads.
    """

    #: the word trie and LM cache are cleared when they hold more than this many nodes and
    #: answers together (some 250 MB: 64 bytes per trie node, about 50 per answer, in tables
    #: that grow by doubling): a stream of new spellings would otherwise grow them without end,
    #: and a fresh start costs only the LM's questions again
    _MAX_CACHED = 4_000_000
    #: the candidate buffers (K.CANDIDATE_BYTES per candidate, beam * (2 + tokens tried) per
    #: item) of one chunk of the batch stay near 32 MiB: memory bounded whatever the batch size
    #: (a 2,000-utterance batch at beam 100 with 5 tokens tried per frame would take 130 MiB),
    #: while a chunk still holds enough utterances (about 500 there) to share the per-call work
    _CANDIDATE_BUFFER = 1 << 25
    #: arena rows to start a search with, per beam prefix of every utterance: four frames' worth
    #: of new prefixes (it grows by doubling when the search needs more)
    _ARENA_FRAMES = 4
    #: room for this many LM answers in a fresh cache: a few KB, since without an LM it stays
    #: empty (it grows by doubling)
    _CACHE_START = 512
    #: prefixes the beam keeps per hypothesis asked for (``nbest > 1``), whatever
    #: ``beam_prune_logp`` says (and beyond ``beam_width`` if need be): a transcript comes with
    #: variants that differ only in delimiters ("a b", "a b|", "a||b"), which are reported once
    _NBEST_MARGIN = 3
    #: the beam's acoustic score falls short of the exact one by the paths it pruned: 0.1 nat
    #: typically, 0.4 at the 90th percentile, 3 at the 99th (benchmarks/decode_vs_pyctcdecode.py
    #: emissions); beyond the nbest best by it, prefixes within this of the nbest-th's beam score
    #: are rescored too (up to _RESCORE_EXTRA per hypothesis asked for)
    _RESCORE_MARGIN = 1.0
    _RESCORE_EXTRA = 2
    #: prefixes kept for their hotword lookahead on top of the beam, per prefix of the beam:
    #: room for hotwords that the acoustics rate low without taking any place from those that
    #: score best (see :func:`ctclab._decode_kernels._prune`)
    _HOTWORD_EXTRA = 0.5

    def __init__(
        self, vocab, blank: int = 0, beam_width: int = 100, lm=None, alpha: float = 0.5, beta: float = 1.0,
        hotwords=None, hotword_weight: float = DEFAULT_HOTWORD_WEIGHT, word_delimiter: str | None = None,
        token_min_logp: float = -5.0, beam_prune_logp: float = -10.0, unk_offset: float = -10.0,
        frame_shift: float | None = None,
    ):
        self.vocab = tuple(vocab)
        _check_settings(len(self.vocab), blank, beam_width, alpha, beta, hotwords, hotword_weight, token_min_logp,
                        beam_prune_logp, unk_offset)
        self.blank = blank
        self.beam_width = beam_width
        self.lm = lm
        self.alpha, self.beta = alpha, beta
        self.hotword_weight = hotword_weight
        self.token_min_logp = token_min_logp
        self.beam_prune_logp = beam_prune_logp
        self.unk_offset = unk_offset
        self.frame_shift = frame_shift
        check_frame_shift(frame_shift)
        self.bpe = any(t.startswith(BPE_MARKER) for t in self.vocab)
        if word_delimiter is None and not self.bpe:
            word_delimiter = next((d for d in ("|", " ") if d in self.vocab), None)
        if word_delimiter is not None and word_delimiter not in self.vocab:
            raise ValueError(f"word_delimiter {word_delimiter!r} is not in the vocabulary")
        self.delimiter = self.vocab.index(word_delimiter) if word_delimiter is not None else None
        self._hot_phrases = _phrases(hotwords or (), word_delimiter)
        self._hot_by_length: dict[int, set] = {}
        for words in self._hot_phrases:
            self._hot_by_length.setdefault(len(words), set()).add(words)
        self.hotwords = tuple(" ".join(words) for words in self._hot_phrases)
        self._tokens = self._token_tables()
        self._vocabulary = getattr(lm, "vocabulary", None) if lm is not None else None
        letters = set(self._tokens.codes.tolist())
        spellable = [words for words in self._hot_phrases if letters.issuperset(map(ord, "".join(words)))]  # others never match
        self._hot, self._hot_start = _hotword_automaton(spellable, hotword_weight)
        kind = self._tokens.kind
        self._params = K.Params(
            blank=blank, token_min_logp=float(token_min_logp), beam_prune_logp=float(beam_prune_logp), unk_offset=float(unk_offset),
            has_hotwords=bool(spellable), has_lm=lm is not None, has_vocabulary=bool(self._vocabulary),
            spell_words=lm is not None and not self._vocabulary, longest_token=max(1, int(np.diff(self._tokens.offsets).max())),
            completing=min(len(self.vocab), 1 + int(((kind == K.DELIMITER) | (kind == K.WORD_START)).sum())),
            width=beam_width, extra=0, min_keep=1)
        self._reset()

    def _token_tables(self) -> K.Tokens:
        """What each vocabulary entry is and spells, for the kernels."""
        kinds, codes, offsets = [], [], [0]
        for k, text in enumerate(self.vocab):
            kind = K.BLANK if k == self.blank else K.DELIMITER if k == self.delimiter else K.WORD_START if self._starts_word(k) else K.PLAIN
            spelled = "" if kind in (K.BLANK, K.DELIMITER) else text.replace(BPE_MARKER, "")
            kinds.append(kind)
            codes += map(ord, spelled)
            offsets.append(len(codes))
        return K.Tokens(np.array(kinds, np.int64), np.array(codes, np.int64), np.array(offsets, np.int64))

    def _reset(self) -> None:
        """A fresh word trie (LM vocabulary) and LM cache."""
        letters = set(self._tokens.codes.tolist())
        words = [w for w in self._vocabulary or () if w and letters.issuperset(map(ord, w))]  # others cannot come up
        self._trie = K.new_trie(K.RESERVED_NODES + sum(map(len, words)))
        self._cache = K.new_cache(self._CACHE_START)
        insert = self._params._replace(spell_words=True)
        for word in words:
            K.insert_word(self._trie, np.fromiter(map(ord, word), np.int64, len(word)), K.LM_PREFIX, K.LM_WORD, insert)
        self._states = [self.lm.begin()] if self.lm is not None else [None]
        self._state_ids = {self._states[0]: 0}
        self._end_scores: dict[int, float] = {}

    def _widths(self, nbest: int) -> tuple[int, int, int]:
        """``(width, extra, keep)``: prefixes the beam keeps by score (``beam_width``, or more
        for a large ``nbest``), those it keeps on top for their hotword lookahead, and the
        fewest it keeps whatever ``beam_prune_logp`` says."""
        keep = nbest if nbest == 1 else self._NBEST_MARGIN * nbest
        width = max(self.beam_width, keep)
        extra = math.ceil(self._HOTWORD_EXTRA * width) if self._params.has_hotwords else 0
        return width, extra, keep

    @staticmethod
    def _candidates_per_prefix(tried: int) -> int:
        """Candidates a beam prefix can make at a frame where ``tried`` classes reach
        ``token_min_logp``: it stays, grows by each of them, or by the best token when none does."""
        return 2 + tried

    def _make_room(self, prefixes: K.Prefixes, items: int, per_item: int, width: int) -> K.Prefixes:
        """The tables grown for a frame of ``items`` utterances with ``per_item`` candidates and
        ``width`` beam prefixes each (:func:`ctclab._decode_kernels.make_room`)."""
        prefixes, self._trie, self._cache = K.make_room(prefixes, self._trie, self._cache, items, per_item, width, self._params)
        return prefixes

    def _starts_word(self, token: int) -> bool:
        return self.bpe and self.vocab[token].startswith(BPE_MARKER)

    def _answer_lm(self) -> None:
        """Score the (state, word) pairs the kernels asked for; fill the cache."""
        keys, codes, offsets = K.take_pending_plain(tuple(self._trie), tuple(self._cache))
        text = codes.tobytes().decode("utf-32-le" if sys.byteorder == "little" else "utf-32-be")
        offsets = offsets.tolist()
        scores, next_states = np.empty(len(keys)), np.empty(len(keys), np.int64)
        for i, key in enumerate(keys.tolist()):
            node = key & K.UNKNOWN_WORD
            word = UNK if node == K.UNKNOWN_WORD else text[offsets[i] : offsets[i + 1]]
            logp, after = self.lm.score(self._states[key >> K.STATE_SHIFT], word)
            sid = self._state_ids.setdefault(after, len(self._states))
            if sid == len(self._states):
                self._states.append(after)
            scores[i], next_states[i] = self.alpha * logp + self.beta, sid
        answers = int(self._cache.counts[K.N_ANSWERS]) + len(keys)
        self._cache = self._cache._replace(score=K.grown(self._cache.score, answers), next_state=K.grown(self._cache.next_state, answers))
        K.store_answers_plain(tuple(self._cache), keys, scores, next_states)

    def _end_score(self, state: int) -> float:
        score = self._end_scores.get(state)
        if score is None:
            score = self._end_scores[state] = self.alpha * self.lm.end(self._states[state]) if self.lm is not None else 0.0
        return score

    # -- search -------------------------------------------------------------------------------
    def _search(self, lp: np.ndarray, lengths: np.ndarray, nbest: int) -> list[list[tuple]]:
        """Beam search over a chunk: per item, up to ``nbest`` ``(score, tokens, acoustic, lm, words)``."""
        B = lp.shape[1]
        width, extra, keep = self._widths(nbest)
        cap = width + extra
        tried = int((lp >= self.token_min_logp).sum(-1).max()) if lp.size else 0
        N = cap * self._candidates_per_prefix(tried)  # candidates per utterance and frame, at most
        params = self._params._replace(width=width, extra=extra, min_keep=keep)
        prefixes, beams, candidates, merge = K.new_search(B, cap, N, self._ARENA_FRAMES * B * cap, self._hot, self._hot_start)
        t, resume = 0, False
        while True:
            status, t = K.run_plain(t, resume, lengths, lp, *map(tuple, (params, self._tokens, prefixes, self._trie, self._cache,
                                                                         self._hot, beams, candidates, merge)))
            if status == K.DONE:
                break
            if status == K.NEED_LM:
                self._answer_lm()
            else:
                prefixes = self._make_room(prefixes, int((t < lengths).sum()), N, cap)
            resume = status == K.NEED_LM
        final_state = np.zeros((B, cap), np.int64)
        final_lm = np.zeros((B, cap))
        prefixes = self._make_room(prefixes, B, 1, cap)  # room for every prefix's last word
        while not K.finish_plain(*map(tuple, (params, prefixes, self._trie, self._cache, self._hot, beams)), final_state, final_lm):
            self._answer_lm()
        pools = []  # per item: (beam score, prefix, LM score), best first
        for b in range(B):
            n = beams.size[b]
            acoustic = np.logaddexp(beams.p_blank[b, :n], beams.p_label[b, :n])
            lm = final_lm[b, :n] + np.array([self._end_score(s) for s in final_state[b, :n].tolist()])
            total = acoustic + lm
            pools.append([(float(total[i]), int(beams.prefix[b, i]), float(lm[i]))
                          for i in np.argsort(-total, kind="stable").tolist() if total[i] > -np.inf])
        return self._select(lp, lengths, nbest, pools, prefixes.ints)

    def _select(self, lp: np.ndarray, lengths: np.ndarray, nbest: int, pools: list, prefix_ints: np.ndarray) -> list[list[tuple]]:
        """Per item, its ``nbest`` best hypotheses ``(score, tokens, acoustic, lm, words)`` by their
        exact scores (those of :meth:`score`), from the final beam's prefixes, their words timed
        on the same graph (:meth:`_timed_words`).

        The beam's acoustic score of a prefix is a lower bound (the paths it pruned are
        missing; by a tenth of a nat typically, by several at times), so the ``nbest`` best by
        it are rescored over all alignments, together with the next ones whose beam score comes
        within :data:`_RESCORE_MARGIN` of the ``nbest``-th one's (a few at most; the exact score
        is at least the beam's, so these include every prefix within the margin of the
        ``nbest``-th exact score), in one call of the loss's forward recursion, and the best by
        exact score are kept. Labellings with the same text count once (for ``nbest > 1``)."""
        position = [0] * len(pools)
        texts: list[set] = [set() for _ in pools]

        def take(b: int, limit: int, floor: float) -> list[tuple]:
            out = []
            while position[b] < len(pools[b]) and len(out) < limit:
                total, prefix, lm = pools[b][position[b]]
                if total < floor:
                    break
                position[b] += 1
                tokens = tuple(K.tokens_of(prefix_ints, prefix).tolist())
                text = self._text(tokens) if nbest > 1 else None
                if text is not None and text in texts[b]:  # "a b" and "a b|" are one transcript
                    continue
                texts[b].add(text)
                out.append((tokens, lm, total))
            return out

        taken = [take(b, nbest, -math.inf) for b in range(len(pools))]
        for b, hyps in enumerate(taken):
            if len(hyps) == nbest:
                hyps += take(b, self._RESCORE_EXTRA * nbest, hyps[-1][2] - self._RESCORE_MARGIN)
        which = [(b, tokens, lm) for b, hyps in enumerate(taken) for tokens, lm, _ in hyps]
        found: list[list[tuple]] = [[] for _ in taken]
        if not which:
            return found
        batch, graph = _hypotheses_graph(lp[:, [b for b, _, _ in which]], lengths[[b for b, _, _ in which]],
                                         [tokens for _, tokens, _ in which], self.blank)
        for row, ((b, tokens, lm), a) in enumerate(zip(which, _log_likelihoods(batch, graph).tolist())):
            found[b].append((a + lm, tokens, a, lm, row))
        # best first by exact score; ties keep the beam's order
        found = [sorted(hyps, key=lambda h: -h[0])[:nbest] for hyps in found]
        words = self._timed_words(batch, graph, [h[4] for hyps in found for h in hyps])
        return [[(score, tokens, acoustic, lm, words[row]) for score, tokens, acoustic, lm, row in hyps] for hyps in found]

    def _word_groups(self, items, token=None) -> list[list]:
        """``items`` (tokens, or spans with ``token(span)`` their token) grouped into words
        (:func:`ctclab.align.group_words`: at the delimiter, at BPE word-start tokens)."""
        return group_words(items, self.delimiter, self._starts_word if self.bpe else None, token)

    def _words(self, tokens: tuple[int, ...]) -> list[str]:
        return [spell(word, self.vocab) for word in self._word_groups(tokens)]

    def _timed_words(self, batch: CTCBatch, graph: CTCGraph, rows: list[int]) -> dict[int, tuple[WordSpan, ...]]:
        """The words (:class:`ctclab.WordSpan`) of the hypotheses in ``rows`` of the rescoring
        batch and graph, timed by each one's best alignment (:func:`ctclab.align.best_paths`, one
        batched Viterbi on the same graph); ``()`` for an empty hypothesis."""
        words = {row: () for row in rows}
        rows = [row for row in rows if int(batch.target_lengths[row])]
        if not rows:
            return words
        chosen = torch.tensor(rows)
        sub = graph.select(chosen)
        lp = batch.log_probs[:, chosen]
        alignment = best_paths(sub, lp, sub.feasible, checkpoint_every=_checkpoint_every(lp, sub, None))
        for row, spans in zip(rows, token_spans(alignment, self.blank)):
            words[row] = tuple(word_of(group, self.vocab, self.frame_shift)
                               for group in self._word_groups(spans, operator.attrgetter("token")))
        return words

    def decode(self, log_probs: Tensor, input_lengths: Lengths | None = None, nbest: int = 1, *,
               batch_first: bool = False) -> list[list[Hypothesis]]:
        """Decode a batch.

        Args:
            log_probs: ``(T, B, C)``, ``(B, T, C)`` with ``batch_first``, or ``(T, C)``
                log-probs (any float dtype, any device). NaN or +inf inside an item's frames,
                or a frame where every class is -inf, is an error; beyond its length, ignored.
            input_lengths: ``(B,)`` frames of each item; None means all ``T``.
            nbest: hypotheses per item: that many whenever the search meets that many distinct
                transcripts (labellings that differ only in delimiters, "a b" and "a b|", count
                once, by the best of them); the beam keeps at least ``3 * nbest`` prefixes, past
                ``beam_width`` and ``beam_prune_logp`` if need be.
            batch_first: ``log_probs`` is batch-major ``(B, T, C)`` (Hugging Face models'
                logits); the results are those of the time-major call.

        Returns:
            Per item its ``nbest`` best :class:`Hypothesis`, best first; each one's scores are
            :meth:`score`'s for its tokens.
        """
        if isinstance(nbest, bool) or not isinstance(nbest, int) or nbest < 1:
            raise ValueError(f"nbest must be an int >= 1, got {nbest!r}")
        log_probs, lengths = self._checked(log_probs, input_lengths, batch_first)
        if self._trie.size[0] + self._cache.counts[K.N_ANSWERS] > self._MAX_CACHED:
            self._reset()
        lp = log_probs.numpy()
        # chunks of the batch keep the candidate buffers small (_CANDIDATE_BUFFER)
        tried = int((log_probs >= self.token_min_logp).sum(-1).max()) if log_probs.numel() else 0
        width, extra, _ = self._widths(nbest)
        step = max(1, self._CANDIDATE_BUFFER // (K.CANDIDATE_BYTES * (width + extra) * self._candidates_per_prefix(tried)))
        found = []
        for lo in range(0, lp.shape[1], step):
            found += self._search(np.ascontiguousarray(lp[:, lo : lo + step]), lengths[lo : lo + step], nbest)
        return [[Hypothesis(self._text(tokens), tokens, words, acoustic, lm, score) for score, tokens, acoustic, lm, words in hyps]
                for hyps in found]

    def _checked(self, log_probs, input_lengths, batch_first: bool) -> tuple[Tensor, np.ndarray]:
        """:meth:`decode`'s input as ``(T, B, C)`` float32/float64 CPU log-probs and ``(B,)``
        int64 lengths, checked (:func:`ctclab._inputs.decoding_batch`, :func:`~ctclab._inputs.check_scores`,
        :func:`~ctclab._inputs.first_dead_frame`); NaN and +inf in padding made -inf (nothing
        reads those frames; -inf keeps them out of the buffer sizes)."""
        log_probs, lengths = decoding_batch(log_probs, input_lengths, batch_first)
        if log_probs.shape[2] != len(self.vocab):
            raise ValueError(f"log_probs have {log_probs.shape[2]} classes but the vocabulary has {len(self.vocab)} tokens")
        log_probs = log_probs.detach().cpu()
        log_probs = log_probs.to(compute_dtype(log_probs.dtype))
        row_max = log_probs.amax(-1).numpy()  # (T, B): NaN (+inf) where a row holds one, -inf where all are -inf
        if not (row_max < math.inf).all():
            check_scores(log_probs, lengths)  # inside an item: an error naming it and the frame
            log_probs = log_probs.masked_fill(torch.isnan(log_probs) | torch.isposinf(log_probs), -math.inf)
            row_max = log_probs.amax(-1).numpy()
        dead = first_dead_frame(log_probs, lengths) if (row_max == -math.inf).any() else None
        if dead is not None:  # no transcript has a non-zero probability: there is nothing to rank
            raise ValueError(f"log_probs of item {dead[0]} are -inf for every class at frame {dead[1]} "
                             "(inside its input length): no transcript has a non-zero probability")
        return log_probs, lengths.numpy()

    def score(self, log_probs: Tensor, tokens) -> Hypothesis:
        """What the search maximises, for a given token sequence: the exact CTC score of
        ``tokens`` given ``(T, C)`` log-probs (all alignments, :func:`ctclab.ctc_loss`) plus the
        LM and hotword score of its words. For rescoring, and to tell search errors from model
        errors: a decoder that returns a hypothesis scoring below another one made a search error.
        """
        if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point() or log_probs.dim() != 2:
            raise TypeError("log_probs must be a floating tensor of shape (T, C)")
        if log_probs.shape[1] != len(self.vocab):
            raise ValueError(f"log_probs have {log_probs.shape[1]} classes but the vocabulary has {len(self.vocab)} tokens")
        tokens = tuple(int(k) for k in tokens)
        if any(not 0 <= k < len(self.vocab) or k == self.blank for k in tokens):
            raise ValueError(f"tokens must be non-blank indices of the vocabulary (0..{len(self.vocab) - 1}, not {self.blank})")
        lp = log_probs.detach().cpu()[:, None]
        check_scores(lp, torch.tensor([lp.shape[0]]))
        lp = lp.to(compute_dtype(lp.dtype)).numpy()
        acoustic = float(_log_likelihoods(*_hypotheses_graph(lp, np.array([lp.shape[0]]), [tokens], self.blank))[0])
        words = self._words(tokens)
        lm = self._hotword_bonus(words)
        if self.lm is not None:
            state = self.lm.begin()
            for w in words:
                logp, state = self.lm.score(state, w if not self._vocabulary or w in self._vocabulary else UNK)
                lm += self.alpha * logp + self.beta
            lm += self.alpha * self.lm.end(state)
        return Hypothesis(self._text(tokens), tokens, (), acoustic, lm, acoustic + lm)

    def _hotword_bonus(self, words: list[str]) -> float:
        """``hotword_weight`` per word of every occurrence of a hotword (phrase) in ``words``,
        overlapping occurrences included: the rule the search's automaton applies."""
        words = tuple(w for w in words if w)  # an empty word (a lone BPE marker) is no boundary to the search
        found = sum(n * sum(words[i : i + n] in phrases for i in range(len(words) - n + 1)) for n, phrases in self._hot_by_length.items())
        return self.hotword_weight * found

    def _text(self, tokens: tuple[int, ...]) -> str:
        return " ".join(self._words(tokens)) if (self.delimiter is not None or self.bpe) else spell(tokens, self.vocab)
