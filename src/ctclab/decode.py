"""CTC decoding: batched greedy (best path) decoding and prefix beam search with a word LM.

Greedy decoding takes the most probable class at every frame and collapses the result:
repeated classes merge, blanks drop out (Graves et al. 2006, section 3.2, "best path
decoding"). Vectorised over the whole batch: only the final split into per-item lists is a
Python loop, over items.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _decode_kernels as K
from ._inputs import Lengths, _lengths_tensor
from .align import TokenSpan, forced_align, token_spans
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


def _time_major(log_probs, input_lengths, batch_first: bool) -> tuple[Tensor, np.ndarray]:
    """``(T, B, C)`` log-probs and ``(B,)`` int64 lengths from what :func:`greedy_decode` and
    :meth:`BeamSearchDecoder.decode` take: ``(T, B, C)``, ``(B, T, C)`` with ``batch_first``, or
    one ``(T, C)`` utterance; lengths None (all ``T``), a tensor, a sequence or an int.

    Lengths that contradict the shape are an error that says which axis is which and mentions
    ``batch_first`` (the usual cause: Hugging Face's ``(B, T, C)`` logits passed time-major).
    Without lengths, a time-major ``(1, B, C)`` input with ``B > 1`` decodes as B one-frame
    utterances, which is legal but rarely meant: a :class:`UserWarning` says so."""
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
    if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point() or log_probs.dim() not in (2, 3):
        raise TypeError("log_probs must be a floating tensor of shape (T, B, C), (B, T, C) with batch_first=True, or (T, C)")
    layout = "(T, C)" if log_probs.dim() == 2 else "(B, T, C)" if batch_first else "(T, B, C)"
    described = f"log_probs {layout} = {tuple(log_probs.shape)}"
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(1)
    elif batch_first:
        log_probs = log_probs.transpose(0, 1)
    T, B, _ = log_probs.shape
    other = "" if layout == "(T, C)" else (
        "; pass batch_first=True for (B, T, C) input" if not batch_first else "; drop batch_first=True for (T, B, C) input")
    if input_lengths is None:
        if layout == "(T, B, C)" and T == 1 and B > 1:
            warnings.warn(f"{described} decodes as {B} utterances of one frame each; if it is one (B, T, C) = (1, {B}, "
                          f"{log_probs.shape[2]}) utterance, pass batch_first=True (or give input_lengths to silence this)",
                          UserWarning, stacklevel=3)
        return log_probs, np.full(B, T, np.int64)
    lengths = _lengths_tensor("input_lengths", input_lengths, torch.device("cpu")).reshape(-1).numpy().astype(np.int64)
    if len(lengths) != B:
        raise ValueError(f"input_lengths has {len(lengths)} entries but {described} has B={B} items{other}")
    if B and lengths.min() < 0:
        raise ValueError(f"input_lengths must be >= 0, got {int(lengths.min())}")
    if B and lengths.max() > T:
        raise ValueError(f"input_lengths go up to {int(lengths.max())} but {described} has T={T} frames{other}")
    return log_probs, lengths


def _check_scores(nan_rows: np.ndarray, inf_rows: np.ndarray, lengths: np.ndarray) -> None:
    """ValueError naming the first item (and its first frame) whose log-probs hold NaN or
    +inf inside its length, from ``(T, B)`` masks of the rows that do; beyond an item's
    length they are padding."""
    inside = (nan_rows | inf_rows) & (np.arange(nan_rows.shape[0])[:, None] < lengths[None, :])
    if inside.any():
        b = int(inside.any(0).argmax())
        t = int(inside[:, b].argmax())
        what = "NaN" if nan_rows[t, b] else "+inf"
        raise ValueError(f"log_probs hold {what} at item {b}, frame {t} (inside its input length {int(lengths[b])}): "
                         f"check the model's output ({what} beyond an item's input length is ignored)")


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
    log_probs, lengths = _time_major(log_probs, input_lengths, batch_first)
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
    _check_scores(np.isnan(scores), np.isposinf(scores), lengths)  # a row's maximum is NaN (+inf) where the row holds one
    tokens, starts, ends = (np.empty((B, T), np.int64) for _ in range(3))
    mean_probs, counts = np.empty((B, T)), np.empty(B, np.int64)
    K.collapse_runs(labels, scores, lengths, blank, tokens, starts, ends, mean_probs, counts)
    return [
        list(map(TokenSpan, tokens[b, :n].tolist(), starts[b, :n].tolist(), ends[b, :n].tolist(), mean_probs[b, :n].tolist()))
        for b, n in enumerate(counts.tolist())
    ]


@dataclass(frozen=True)
class WordTiming:
    """A decoded word and its frames ``[start, end)``."""

    word: str
    start: int
    end: int


@dataclass(frozen=True)
class Hypothesis:
    """One decoding of an utterance.

    ``acoustic_score``: log-probability of the token sequence summed over its alignments (the
    CTC score); ``lm_score``: ``alpha * log P_LM(words) + beta * len(words)`` plus hotword bonuses;
    ``score``: their sum, what hypotheses are ranked by."""

    text: str
    tokens: tuple[int, ...]
    words: tuple[WordTiming, ...]
    acoustic_score: float
    lm_score: float
    score: float


def _ctc_log_likelihoods(log_probs: np.ndarray, lengths: np.ndarray, labellings: list, blank: int) -> np.ndarray:
    """``log P(labelling | log_probs)`` over all CTC alignments (float64) for ``(T, N, C)``
    float32/float64 log-probs, ``(N,)`` frame counts and N token sequences: the exact acoustic
    score that :meth:`BeamSearchDecoder.score` and the returned hypotheses carry
    (:func:`ctclab._decode_kernels.ctc_log_likelihoods`)."""
    offsets = np.zeros(len(labellings) + 1, np.int64)
    np.cumsum([len(x) for x in labellings], out=offsets[1:])
    out = np.empty(len(labellings))
    K.ctc_log_likelihoods(np.ascontiguousarray(log_probs), np.asarray(lengths, np.int64),
                          np.array([k for x in labellings for k in x], np.int64), offsets, blank, out)
    return out


def _empty_map(entries: int) -> np.ndarray:
    """An open-addressing map of :mod:`ctclab._decode_kernels` with room for ``entries`` keys."""
    return np.full((1 << max(4, (entries - 1).bit_length()), 2), K.EMPTY, np.int64)


def _rehashed(table: np.ndarray, entries: int) -> np.ndarray:
    new = _empty_map(max(entries, 2 * len(table)))
    K.rehash(table, new)
    return new


def _hotword_automaton(phrases, weight: float) -> tuple[tuple[np.ndarray, ...], int]:
    """The hotword tables of :mod:`ctclab._decode_kernels` (Aho-Corasick automaton over code
    points) for ``phrases`` (tuples of words), and its state at the start of a transcript.

    A phrase is the pattern ``SEP w1 SEP ... wn SEP`` (:data:`~ctclab._decode_kernels.SEPARATOR`
    between words), worth ``weight * n``. Per state: ``gain``, the worth of every pattern
    that ends there (its own and, through failure links, those that end in a suffix of it);
    ``look``, the lookahead: the largest ``worth * (depth - 1) / (len - 1)`` over the patterns
    that the state (or a suffix of it) is a proper prefix of, where ``depth`` counts the
    characters of the pattern spelled, the leading separator included; 0 for a negative
    weight (a penalty is no reason to keep a prefix).

    Returns ``((hot_map, hot_fail, hot_gain, hot_look), start)``; with no phrases, one state
    (the root) that every character leads back to."""
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
    hot_map = _empty_map(2 * len(keys))
    K.fill_map(hot_map, keys, values)
    start = children[0].get(K.SEPARATOR, 0)
    return (hot_map, np.array(fail, np.int64), np.array(gain), np.array(look)), start


def _enlarged(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with at least ``rows`` rows (at least twice as many), contents kept."""
    out = np.empty((max(rows, 2 * len(array)),) + array.shape[1:], array.dtype)
    out[: len(array)] = array
    return out


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

    Ties are broken by the order in which prefixes first appear, so results are deterministic.
    A decoder keeps its word trie and LM score cache between calls (cleared when they grow past
    a few million entries); it is not meant to be shared between threads.
    """

    _MAX_CACHED = 4_000_000
    #: bytes per candidate of the search's buffers (8 int64 and 4 float64 fields, see
    #: :mod:`ctclab._decode_kernels`); batches are decoded in chunks that keep them near 32 MiB
    _CANDIDATE_BYTES = 8 * 8 + 4 * 8
    _CANDIDATE_BUFFER = 1 << 25
    #: prefixes the beam keeps per hypothesis asked for (``nbest > 1``), whatever
    #: ``beam_prune_logp`` says (and beyond ``beam_width`` if need be): a transcript comes with
    #: variants that differ only in delimiters ("a b", "a b|", "a||b"), which are reported once
    _NBEST_MARGIN = 3
    #: the beam's acoustic score falls short of the exact one by the paths it pruned: 0.1 nat
    #: typically, 0.4 at the 90th percentile, 3 at the 99th (benchmarks/decode_vs_pyctcdecode.py
    #: emissions); beyond the nbest best by it, prefixes within this of the nbest-th exact score
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
    ):
        self.vocab = tuple(vocab)
        if not 0 <= blank < len(self.vocab):
            raise ValueError(f"blank must be in [0, {len(self.vocab)}), got {blank}")
        if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("hotword_weight", hotword_weight), ("unk_offset", unk_offset)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(hotwords, str) or any(not isinstance(w, str) for w in hotwords or ()):
            raise TypeError("hotwords must be a list of words (strings), not a single string")
        hotwords = list(hotwords or ())
        for name, value in (("token_min_logp", token_min_logp), ("beam_prune_logp", beam_prune_logp)):
            if math.isnan(value) or value > 0:
                raise ValueError(f"{name} must be a log-probability offset <= 0 (or -inf), got {value}")
        self.blank = blank
        self.beam_width = beam_width
        self.lm = lm
        self.alpha, self.beta = alpha, beta
        self.hotword_weight = hotword_weight
        self.bpe = any(t.startswith(BPE_MARKER) for t in self.vocab)
        if word_delimiter is None and not self.bpe:
            word_delimiter = next((d for d in ("|", " ") if d in self.vocab), None)
        if word_delimiter is not None and word_delimiter not in self.vocab:
            raise ValueError(f"word_delimiter {word_delimiter!r} is not in the vocabulary")
        self.delimiter = self.vocab.index(word_delimiter) if word_delimiter is not None else None
        phrases = {}
        for hotword in hotwords:
            words = tuple((hotword.replace(word_delimiter, " ") if word_delimiter else hotword).split())
            if not words:
                raise ValueError(f"hotwords must hold at least one word each, got {hotword!r}")
            phrases.setdefault(words, None)
        self._hot_phrases = tuple(phrases)
        self._hot_by_length: dict[int, set] = {}
        for words in self._hot_phrases:
            self._hot_by_length.setdefault(len(words), set()).add(words)
        self.hotwords = tuple(" ".join(words) for words in self._hot_phrases)
        self.token_min_logp = token_min_logp
        self.beam_prune_logp = beam_prune_logp
        self.unk_offset = unk_offset
        kinds, codes, offsets = [], [], [0]
        for k, text in enumerate(self.vocab):
            kind = K.BLANK if k == blank else K.DELIMITER if k == self.delimiter else K.WORD_START if self._starts_word(k) else K.PLAIN
            spelled = "" if kind in (K.BLANK, K.DELIMITER) else text.replace(BPE_MARKER, "")
            kinds.append(kind)
            codes += map(ord, spelled)
            offsets.append(len(codes))
        self._token_kind = np.array(kinds, np.int64)
        self._token_codes = np.array(codes, np.int64)
        self._token_offsets = np.array(offsets, np.int64)
        self._vocabulary = getattr(lm, "vocabulary", None) if lm is not None else None
        letters = set(self._token_codes.tolist())
        spellable = [words for words in self._hot_phrases if letters.issuperset(map(ord, "".join(words)))]  # others never match
        self._hot, self._hot_start = _hotword_automaton(spellable, hotword_weight)
        self._params = np.array([token_min_logp, beam_prune_logp, unk_offset, float(bool(spellable)),
                                 float(lm is not None), float(bool(self._vocabulary)), float(lm is not None and not self._vocabulary),
                                 max(1, int(np.diff(self._token_offsets).max())),
                                 min(len(self.vocab), 1 + int(((self._token_kind == K.DELIMITER) | (self._token_kind == K.WORD_START)).sum())),
                                 1.0])
        self._reset()

    def _reset(self) -> None:
        """A fresh word trie (LM vocabulary) and LM cache."""
        letters = set(self._token_codes.tolist())
        words = [w for w in self._vocabulary or () if w and letters.issuperset(map(ord, w))]  # others cannot come up
        nodes = 2 + sum(map(len, words))
        self._tables = [
            np.zeros((nodes, 4), np.int64),  # trie: parent, code point, flags, depth (root: all 0)
            _empty_map(2 * nodes),  # trie children
            _empty_map(1024),  # LM cache keys -> slots
            np.empty(512), np.empty(512, np.int64),  # LM cache: scores, next states
            np.empty(512, np.int64),  # pending keys
            np.zeros(8, np.int64),  # sizes
        ]
        self._tables[0][K.OTHER_WORD] = [0, -1, 0, 0]
        self._tables[6][K.TRIE_NODES] = 2
        insert = self._params.copy()
        insert[K.SPELL_WORDS] = 1.0
        for word in words:
            K.insert_word(tuple(self._tables), np.fromiter(map(ord, word), np.int64, len(word)), K.LM_PREFIX, K.LM_WORD, insert)
        self._states = [self.lm.begin()] if self.lm is not None else [None]
        self._state_ids = {self._states[0]: 0}
        self._end_scores: dict[int, float] = {}

    def _widths(self, nbest: int) -> tuple[int, int, int]:
        """``(width, extra, keep)``: prefixes the beam keeps by score (``beam_width``, or more
        for a large ``nbest``), those it keeps on top for their hotword lookahead, and the
        fewest it keeps whatever ``beam_prune_logp`` says."""
        keep = nbest if nbest == 1 else self._NBEST_MARGIN * nbest
        width = max(self.beam_width, keep)
        extra = math.ceil(self._HOTWORD_EXTRA * width) if self._params[K.HAS_HOTWORDS] else 0
        return width, extra, keep

    def _make_room(self, arena: list, items: int, per_item: int, cap: int) -> None:
        """Enlarge the tables so that a frame of ``items`` utterances with ``per_item``
        candidates and ``cap`` beam prefixes each fits (what :func:`ctclab._decode_kernels.run` checks)."""
        trie, trie_map, cache_map, _, _, pending, sizes = self._tables
        nodes = items * per_item * int(self._params[K.LONGEST_TOKEN]) if self._params[K.SPELL_WORDS] else 0
        completing = items * cap * int(self._params[K.COMPLETING])
        if int(sizes[K.TRIE_NODES]) + nodes > len(trie):
            self._tables[0] = _enlarged(trie, int(sizes[K.TRIE_NODES]) + nodes)
        if 2 * (int(sizes[K.TRIE_KEYS]) + nodes) > len(trie_map):
            self._tables[1] = _rehashed(trie_map, 2 * (int(sizes[K.TRIE_KEYS]) + nodes))
        if 2 * (int(sizes[K.CACHE_KEYS]) + completing) > len(cache_map):
            self._tables[2] = _rehashed(cache_map, 2 * (int(sizes[K.CACHE_KEYS]) + completing))
        if int(sizes[K.PENDING]) + completing > len(pending):
            self._tables[5] = _enlarged(pending, int(sizes[K.PENDING]) + completing)
        rows = int(arena[2][0]) + items * cap
        if rows > len(arena[0]):
            arena[0], arena[1] = _enlarged(arena[0], rows), _enlarged(arena[1], rows)

    def _starts_word(self, token: int) -> bool:
        return self.bpe and self.vocab[token].startswith(BPE_MARKER)

    def _spell(self, tokens) -> str:
        return "".join(self.vocab[t] for t in tokens).replace(BPE_MARKER, "")

    def _answer_lm(self) -> None:
        """Score the (state, word) pairs the kernels asked for; fill the cache."""
        keys, codes, offsets = K.take_pending(tuple(self._tables))
        text = codes.tobytes().decode("utf-32-le" if sys.byteorder == "little" else "utf-32-be")
        offsets = offsets.tolist()
        scores, next_states = np.empty(len(keys)), np.empty(len(keys), np.int64)
        for i, key in enumerate(keys.tolist()):
            node = key & K.UNKNOWN_WORD
            word = "<unk>" if node == K.UNKNOWN_WORD else text[offsets[i] : offsets[i + 1]]
            logp, after = self.lm.score(self._states[key >> 32], word)
            sid = self._state_ids.setdefault(after, len(self._states))
            if sid == len(self._states):
                self._states.append(after)
            scores[i], next_states[i] = self.alpha * logp + self.beta, sid
        slots = int(self._tables[6][K.CACHE_SLOTS]) + len(keys)
        if slots > len(self._tables[3]):
            self._tables[3], self._tables[4] = _enlarged(self._tables[3], slots), _enlarged(self._tables[4], slots)
        K.store_answers(tuple(self._tables), keys, scores, next_states)

    def _end_score(self, state: int) -> float:
        score = self._end_scores.get(state)
        if score is None:
            score = self._end_scores[state] = self.alpha * self.lm.end(self._states[state]) if self.lm is not None else 0.0
        return score

    # -- search -------------------------------------------------------------------------------
    def _search(self, lp: np.ndarray, lengths: np.ndarray, nbest: int) -> list[list[tuple]]:
        """Beam search over a chunk: per item, up to ``nbest`` ``(score, tokens, acoustic, lm)``."""
        B = lp.shape[1]
        width, extra, keep = self._widths(nbest)
        cap = width + extra
        chosen = int((lp >= self.token_min_logp).sum(-1).max()) if lp.size else 0
        N = cap * (2 + chosen)  # stays + children, per utterance
        arena = [np.empty((4 * B * cap, 6), np.int64), np.empty((4 * B * cap, 3)), np.zeros(1, np.int64)]
        hot_start = self._hot_start
        arena[0][:B] = [K.NO_PARENT, K.NO_PARENT, 0, 0, 0, hot_start]  # the empty prefix of every utterance
        arena[1][:B] = [0.0, 0.0, self._hot[3][hot_start]]
        arena[2][0] = B
        params = self._params.copy()
        params[K.MIN_KEEP] = keep
        beam_prefix = np.zeros((B, cap), np.int64)
        beam_prefix[:, 0] = np.arange(B)
        beam_p = np.full((B, cap, 2), -np.inf)
        beam_p[:, 0, 0] = 0.0
        beams = (beam_prefix, beam_p, np.ones(B, np.int64))
        candidates = (np.empty((B, N, 8), np.int64), np.empty((B, N, 4)), np.zeros(B, np.int64))
        # the per-frame merge map of _decode_kernels._expand: row 0 + a power of two >= 2 * N rows
        # (at least 16, where its mask starts) + 1
        table = np.zeros((2 + max(16, 1 << (2 * N - 1).bit_length()), 3), np.int64)
        tokens = (self._token_kind, self._token_codes, self._token_offsets)
        t, resume = 0, False
        while True:
            status, t = K.run(t, resume, lengths, lp, self.blank, width, extra, params, tokens,
                              tuple(arena), tuple(self._tables), self._hot, beams, candidates, table)
            if status == K.DONE:
                break
            if status == K.NEED_LM:
                self._answer_lm()
            else:
                self._make_room(arena, int((t < lengths).sum()), N, cap)
            resume = status == K.NEED_LM
        final_state = np.zeros((B, cap), np.int64)
        final_lm = np.zeros((B, cap))
        self._make_room(arena, B, 1, cap)  # room for every prefix's last word
        while not K.finish(params, tuple(arena), tuple(self._tables), self._hot, beams, final_state, final_lm):
            self._answer_lm()
        pools = []  # per item: (beam score, prefix, LM score), best first
        for b in range(B):
            n = beams[2][b]
            acoustic = np.logaddexp(beam_p[b, :n, 0], beam_p[b, :n, 1])
            lm = final_lm[b, :n] + np.array([self._end_score(s) for s in final_state[b, :n].tolist()])
            total = acoustic + lm
            pools.append([(float(total[i]), int(beam_prefix[b, i]), float(lm[i]))
                          for i in np.argsort(-total, kind="stable").tolist() if total[i] > -np.inf])
        return self._select(lp, lengths, nbest, pools, arena[0])

    def _select(self, lp: np.ndarray, lengths: np.ndarray, nbest: int, pools: list, arena_ints: np.ndarray) -> list[list[tuple]]:
        """Per item, its ``nbest`` best hypotheses ``(score, tokens, acoustic, lm)`` by their
        exact scores (those of :meth:`score`), from the final beam's prefixes.

        The beam's acoustic score of a prefix is a lower bound (the paths it pruned are
        missing; by a tenth of a nat typically, by several at times), so the ``nbest`` best by
        it are rescored over all alignments, then the next ones whose beam score comes within
        :data:`_RESCORE_MARGIN` of the ``nbest``-th exact score (a few at most), and the
        best by exact score are kept. Labellings with the same text count once (for
        ``nbest > 1``)."""
        position = [0] * len(pools)
        texts: list[set] = [set() for _ in pools]

        def take(b: int, limit: int, floor: float) -> list[tuple]:
            out = []
            while position[b] < len(pools[b]) and len(out) < limit:
                total, prefix, lm = pools[b][position[b]]
                if total < floor:
                    break
                position[b] += 1
                tokens = tuple(K.tokens_of(arena_ints, prefix).tolist())
                text = self._text(tokens) if nbest > 1 else None
                if text is not None and text in texts[b]:  # "a b" and "a b|" are one transcript
                    continue
                texts[b].add(text)
                out.append((tokens, lm))
            return out

        def rescored(taken: list[list[tuple]]) -> list[list[tuple]]:
            which = [(b, tokens, lm) for b, hyps in enumerate(taken) for tokens, lm in hyps]
            out = [[] for _ in taken]
            if which:
                items = np.array([b for b, _, _ in which])
                acoustic = _ctc_log_likelihoods(lp[:, items], lengths[items], [tokens for _, tokens, _ in which], self.blank)
                for (b, tokens, lm), a in zip(which, acoustic.tolist()):
                    out[b].append((a + lm, tokens, a, lm))
            return out

        found = rescored([take(b, nbest, -math.inf) for b in range(len(pools))])
        bars = [min(h[0] for h in hyps) - self._RESCORE_MARGIN if len(hyps) == nbest else math.inf for hyps in found]
        more = rescored([take(b, self._RESCORE_EXTRA * nbest, bars[b]) if bars[b] < math.inf else [] for b in range(len(pools))])
        # best first by exact score; ties keep the beam's order
        return [sorted(a + b, key=lambda h: -h[0])[:nbest] for a, b in zip(found, more)]

    def _word_groups(self, items, token=lambda item: item) -> list[list]:
        """``items`` (tokens, or spans with ``token(span)`` their token) grouped into words: a
        delimiter ends a word and is dropped, a BPE word-start token begins one; without either,
        the whole sequence is one word."""
        words, current = [], []
        for item in items:
            k = token(item)
            if k == self.delimiter or (self._starts_word(k) and current):
                if current:
                    words.append(current)
                current = [] if k == self.delimiter else [item]
            else:
                current.append(item)
        if current:
            words.append(current)
        return words

    def _words(self, tokens: tuple[int, ...]) -> list[str]:
        return [self._spell(word) for word in self._word_groups(tokens)]

    def _timings(self, log_probs: Tensor, lengths: np.ndarray, found: list[list[tuple]]) -> list[list[tuple[WordTiming, ...]]]:
        """Word frames of every hypothesis, from its best alignment (one batched
        :func:`ctclab.forced_align` over all of them)."""
        which = [(b, i) for b, hyps in enumerate(found) for i, h in enumerate(hyps) if h[1]]
        timings = [[()] * len(hyps) for hyps in found]
        if not which:
            return timings
        items = np.array([b for b, _ in which])
        longest = max(len(found[b][i][1]) for b, i in which)
        targets = np.zeros((len(which), longest), np.int64)
        for row, (b, i) in enumerate(which):
            targets[row, : len(found[b][i][1])] = found[b][i][1]
        # numpy gathers (one thread): torch's threaded small ops wait on busy cores
        alignment = forced_align(
            torch.from_numpy(log_probs.numpy()[:, items].astype(np.float64)), torch.from_numpy(targets),
            torch.from_numpy(lengths[items]), torch.tensor([len(found[b][i][1]) for b, i in which]), blank=self.blank, skip_infeasible=True,
        )
        for (b, i), spans in zip(which, token_spans(alignment, self.blank)):
            timings[b][i] = tuple(WordTiming(self._spell(s.token for s in word), word[0].start, word[-1].end)
                                  for word in self._word_groups(spans, lambda span: span.token))
        return timings

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
        log_probs, lengths = _time_major(log_probs, input_lengths, batch_first)
        T, B, C = log_probs.shape
        if C != len(self.vocab):
            raise ValueError(f"log_probs have {C} classes but the vocabulary has {len(self.vocab)} tokens")
        if isinstance(nbest, bool) or not isinstance(nbest, int) or nbest < 1:
            raise ValueError(f"nbest must be an int >= 1, got {nbest!r}")
        log_probs = log_probs.detach().cpu()
        if log_probs.dtype not in (torch.float32, torch.float64):
            log_probs = log_probs.float()
        nan, inf = torch.isnan(log_probs), torch.isposinf(log_probs)
        if bool(nan.any()) or bool(inf.any()):
            _check_scores(nan.any(-1).numpy(), inf.any(-1).numpy(), lengths)
            # in padding only: nothing reads those frames, -inf keeps them out of the buffer sizes
            log_probs = log_probs.masked_fill(nan | inf, -math.inf)
        dead = (log_probs == -math.inf).all(-1).numpy() & (np.arange(T)[:, None] < lengths[None, :])
        if dead.any():  # no transcript has a non-zero probability: there is nothing to rank
            b = int(dead.any(0).argmax())
            raise ValueError(f"log_probs of item {b} are -inf for every class at frame {int(dead[:, b].argmax())} "
                             "(inside its input length): no transcript has a non-zero probability")
        if self._tables[6][K.TRIE_NODES] + self._tables[6][K.CACHE_SLOTS] > self._MAX_CACHED:
            self._reset()
        lp = log_probs.numpy()
        # chunks of the batch keep the candidate buffers (beam * (2 + tokens tried) per item) small
        chosen = int((log_probs >= self.token_min_logp).sum(-1).max()) if log_probs.numel() else 0
        width, extra, _ = self._widths(nbest)
        step = max(1, self._CANDIDATE_BUFFER // (self._CANDIDATE_BYTES * (width + extra) * (2 + chosen)))
        found = []
        for lo in range(0, B, step):
            found += self._search(np.ascontiguousarray(lp[:, lo : lo + step]), lengths[lo : lo + step], nbest)
        timings = self._timings(log_probs, lengths, found)
        out = []
        for hyps, words in zip(found, timings):
            out.append([Hypothesis(self._text(tokens), tokens, w, acoustic, lm, score)
                        for (score, tokens, acoustic, lm), w in zip(hyps, words)])
        return out

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
        lp = log_probs.detach().cpu()
        lp = (lp if lp.dtype in (torch.float32, torch.float64) else lp.double()).numpy()[:, None]
        _check_scores(np.isnan(lp).any(-1), np.isposinf(lp).any(-1), np.array([lp.shape[0]]))
        acoustic = float(_ctc_log_likelihoods(lp, np.array([lp.shape[0]]), [tokens], self.blank)[0])
        words = self._words(tokens)
        lm = self._hotword_bonus(words)
        if self.lm is not None:
            state = self.lm.begin()
            for w in words:
                logp, state = self.lm.score(state, w if not self._vocabulary or w in self._vocabulary else "<unk>")
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
        return " ".join(self._words(tokens)) if (self.delimiter is not None or self.bpe) else self._spell(tokens)
