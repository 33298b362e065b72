"""CTC decoding: batched greedy (best path) decoding and prefix beam search with a word LM.

Greedy decoding takes the most probable class at every frame and collapses the result:
repeated classes merge, blanks drop out (Graves et al. 2006, section 3.2, "best path
decoding"). Vectorised over the whole batch: only the final split into per-item lists is a
Python loop, over items.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _decode_kernels as K
from ._inputs import Lengths, _lengths_tensor
from .align import TokenSpan, forced_align, token_spans
from .vocab import BPE_MARKER


def greedy_decode(log_probs: Tensor, input_lengths: Lengths | None = None, blank: int = 0) -> list[list[TokenSpan]]:
    """Best-path decoding of a batch.

    Args:
        log_probs: ``(T, B, C)`` or ``(T, C)`` log-probs (or any scores whose argmax is meant).
        input_lengths: ``(B,)`` frames of each item; None means all ``T``.
        blank: blank index.

    Returns:
        Per item, its tokens in order as :class:`TokenSpan` (``token``, ``start``/``end`` frame of
        the token's run, end exclusive, ``score`` = mean probability of the token over its run).
    """
    if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point() or log_probs.dim() not in (2, 3):
        raise TypeError("log_probs must be a floating tensor of shape (T, B, C) or (T, C)")
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(1)
    T, B, C = log_probs.shape
    if not 0 <= blank < C:
        raise ValueError(f"blank must be in [0, C) = [0, {C}), got {blank}")
    device = log_probs.device
    lengths = torch.full((B,), T, device=device) if input_lengths is None else _lengths_tensor("input_lengths", input_lengths, device).reshape(-1)
    if lengths.shape[0] != B or (B and (int(lengths.min()) < 0 or int(lengths.max()) > T)):
        raise ValueError(f"input_lengths must be (B,) = ({B},) with values in [0, {T}]")
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
    if np.isnan(scores).any():
        raise ValueError("log_probs contain NaN")
    lengths = lengths.cpu().numpy().astype(np.int64)
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


def _empty_map(entries: int) -> np.ndarray:
    """An open-addressing map of :mod:`ctclab._decode_kernels` with room for ``entries`` keys."""
    return np.full((1 << max(4, (entries - 1).bit_length()), 2), K.EMPTY, np.int64)


def _rehashed(table: np.ndarray, entries: int) -> np.ndarray:
    new = _empty_map(max(entries, 2 * len(table)))
    K.rehash(table, new)
    return new


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
    vocabulary), and a prefix of a hotword earns ``hotword_weight`` per character, kept if the
    word completes as that hotword. Prefixes are ranked by acoustic score + these.

    Args:
        vocab: index -> token string (a :class:`ctclab.Vocabulary` or a sequence).
        blank: blank index.
        beam_width: prefixes kept per frame.
        lm: a :class:`ctclab.lm.LanguageModel` (e.g. :class:`ctclab.lm.NGramLM`), or None. Its
            states must be hashable; the decoder caches scores per (state, word).
        alpha, beta: LM weight and word insertion bonus.
        hotwords: words to favour; hotword_weight: bonus per matching character.
        word_delimiter: the token that separates words (default: ``'|'`` or ``' '`` if in the
            vocabulary); BPE vocabularies (tokens starting with ``'▁'``) need none.
        token_min_logp: tokens below this log-prob at a frame are not tried there (``-inf``:
            all); blank is always tried. -5 as in pyctcdecode: a token below it carries under
            0.7% of the frame's mass.
        beam_prune_logp: prefixes this far below the best are dropped (``-inf``: none).
        unk_offset: cost of a partial word that no LM word starts with (scaled by its length
            / 6 past 6 characters, as in pyctcdecode).

    Ties are broken by the order in which prefixes first appear, so results are deterministic.
    A decoder keeps its word trie and LM score cache between calls (cleared when they grow past
    a few million entries); it is not meant to be shared between threads.
    """

    _MAX_CACHED = 4_000_000

    def __init__(
        self, vocab, blank: int = 0, beam_width: int = 100, lm=None, alpha: float = 0.5, beta: float = 1.0,
        hotwords=None, hotword_weight: float = 10.0, word_delimiter: str | None = None,
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
        for name, value in (("token_min_logp", token_min_logp), ("beam_prune_logp", beam_prune_logp)):
            if math.isnan(value) or value > 0:
                raise ValueError(f"{name} must be a log-probability offset <= 0 (or -inf), got {value}")
        self.blank = blank
        self.beam_width = beam_width
        self.lm = lm
        self.alpha, self.beta = alpha, beta
        self.hotwords = tuple(dict.fromkeys(hotwords or ()))
        self.hotword_weight = hotword_weight
        self.bpe = any(t.startswith(BPE_MARKER) for t in self.vocab)
        if word_delimiter is None and not self.bpe:
            word_delimiter = next((d for d in ("|", " ") if d in self.vocab), None)
        if word_delimiter is not None and word_delimiter not in self.vocab:
            raise ValueError(f"word_delimiter {word_delimiter!r} is not in the vocabulary")
        self.delimiter = self.vocab.index(word_delimiter) if word_delimiter is not None else None
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
        self._params = np.array([token_min_logp, beam_prune_logp, unk_offset, hotword_weight,
                                 float(lm is not None), float(bool(self._vocabulary)), float(lm is not None and not self._vocabulary),
                                 max(1, int(np.diff(self._token_offsets).max())),
                                 min(len(self.vocab), 1 + int(((self._token_kind == K.DELIMITER) | (self._token_kind == K.WORD_START)).sum()))])
        self._reset()

    def _reset(self) -> None:
        """A fresh word trie (LM vocabulary and hotwords) and LM cache."""
        letters = set(self._token_codes.tolist())
        words = [w for w in self._vocabulary or () if w and letters.issuperset(map(ord, w))]  # others cannot come up
        nodes = 2 + sum(map(len, words)) + sum(map(len, self.hotwords))
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
        for word in self.hotwords:
            K.insert_word(tuple(self._tables), np.fromiter(map(ord, word), np.int64, len(word)), K.HOT_PREFIX, K.HOTWORD, insert)
        self._states = [self.lm.begin()] if self.lm is not None else [None]
        self._state_ids = {self._states[0]: 0}
        self._end_scores: dict[int, float] = {}

    def _make_room(self, arena: list, items: int, per_item: int) -> None:
        """Enlarge the tables so that a frame of ``items`` utterances with ``per_item``
        candidates each fits (what :func:`ctclab._decode_kernels.run` checks)."""
        trie, trie_map, cache_map, _, _, pending, sizes = self._tables
        nodes = items * per_item * int(self._params[K.LONGEST_TOKEN]) if self._params[K.SPELL_WORDS] else 0
        completing = items * self.beam_width * int(self._params[K.COMPLETING])
        if int(sizes[K.TRIE_NODES]) + nodes > len(trie):
            self._tables[0] = _enlarged(trie, int(sizes[K.TRIE_NODES]) + nodes)
        if 2 * (int(sizes[K.TRIE_KEYS]) + nodes) > len(trie_map):
            self._tables[1] = _rehashed(trie_map, 2 * (int(sizes[K.TRIE_KEYS]) + nodes))
        if 2 * (int(sizes[K.CACHE_KEYS]) + completing) > len(cache_map):
            self._tables[2] = _rehashed(cache_map, 2 * (int(sizes[K.CACHE_KEYS]) + completing))
        if int(sizes[K.PENDING]) + completing > len(pending):
            self._tables[5] = _enlarged(pending, int(sizes[K.PENDING]) + completing)
        rows = int(arena[2][0]) + items * self.beam_width
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
        width = self.beam_width
        chosen = int((lp >= self.token_min_logp).sum(-1).max()) if lp.size else 0
        N = width * (2 + chosen)  # stays + children, per utterance
        arena = [np.empty((4 * B * width, 5), np.int64), np.empty((4 * B * width, 2)), np.zeros(1, np.int64)]
        arena[0][:B] = [K.NO_PARENT, K.NO_PARENT, 0, 0, 0]  # the empty prefix of every utterance
        arena[1][:B] = 0.0
        arena[2][0] = B
        beam_prefix = np.zeros((B, width), np.int64)
        beam_prefix[:, 0] = np.arange(B)
        beam_p = np.full((B, width, 2), -np.inf)
        beam_p[:, 0, 0] = 0.0
        beams = (beam_prefix, beam_p, np.ones(B, np.int64))
        candidates = (np.empty((B, N, 7), np.int64), np.empty((B, N, 3)), np.zeros(B, np.int64))
        table = np.zeros((2 + (1 << (2 * N - 1).bit_length()), 3), np.int64)  # see _decode_kernels._expand
        tokens = (self._token_kind, self._token_codes, self._token_offsets)
        t, resume = 0, False
        while True:
            status, t = K.run(t, resume, lengths, lp, self.blank, width, self._params, tokens,
                              tuple(arena), tuple(self._tables), beams, candidates, table)
            if status == K.DONE:
                break
            if status == K.NEED_LM:
                self._answer_lm()
            else:
                self._make_room(arena, int((t < lengths).sum()), N)
            resume = status == K.NEED_LM
        final_state = np.zeros((B, width), np.int64)
        final_lm = np.zeros((B, width))
        self._make_room(arena, B, 1)  # room for every prefix's last word
        while not K.finish(self._params, tuple(arena), tuple(self._tables), beams, final_state, final_lm):
            self._answer_lm()
        out = []
        for b in range(B):
            n = beams[2][b]
            acoustic = np.logaddexp(beam_p[b, :n, 0], beam_p[b, :n, 1])
            lm = final_lm[b, :n] + np.array([self._end_score(s) for s in final_state[b, :n].tolist()])
            total = acoustic + lm
            order = np.argsort(-total, kind="stable")[:nbest]
            out.append([(float(total[i]), tuple(K.tokens_of(arena[0], beam_prefix[b, i]).tolist()), float(acoustic[i]), float(lm[i]))
                        for i in order.tolist()])
        return out

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
        targets = [torch.tensor(found[b][i][1]) for b, i in which]
        items = torch.tensor([b for b, _ in which])
        alignment = forced_align(
            log_probs[:, items].double(), torch.nn.utils.rnn.pad_sequence(targets, batch_first=True),
            torch.from_numpy(lengths)[items], torch.tensor([len(x) for x in targets]), blank=self.blank, skip_infeasible=True,
        )
        for (b, i), spans in zip(which, token_spans(alignment, self.blank)):
            timings[b][i] = tuple(WordTiming(self._spell(s.token for s in word), word[0].start, word[-1].end)
                                  for word in self._word_groups(spans, lambda span: span.token))
        return timings

    def decode(self, log_probs: Tensor, input_lengths: Lengths | None = None, nbest: int = 1) -> list[list[Hypothesis]]:
        """Decode a batch: ``(T, B, C)`` or ``(T, C)`` log-probs (any float dtype, any device)
        -> per item its ``nbest`` best :class:`Hypothesis`, best first."""
        if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point() or log_probs.dim() not in (2, 3):
            raise TypeError("log_probs must be a floating tensor of shape (T, B, C) or (T, C)")
        if log_probs.dim() == 2:
            log_probs = log_probs.unsqueeze(1)
        T, B, C = log_probs.shape
        if C != len(self.vocab):
            raise ValueError(f"log_probs have {C} classes but the vocabulary has {len(self.vocab)} tokens")
        if isinstance(nbest, bool) or not isinstance(nbest, int) or nbest < 1:
            raise ValueError(f"nbest must be an int >= 1, got {nbest!r}")
        lengths = np.full(B, T, np.int64) if input_lengths is None else _lengths_tensor("input_lengths", input_lengths, torch.device("cpu")).reshape(-1).numpy().astype(np.int64)
        if len(lengths) != B or (B and (lengths.min() < 0 or lengths.max() > T)):
            raise ValueError(f"input_lengths must be (B,) = ({B},) with values in [0, {T}]")
        log_probs = log_probs.detach().cpu()
        if log_probs.dtype not in (torch.float32, torch.float64):
            log_probs = log_probs.float()
        if torch.isnan(log_probs).any():
            raise ValueError("log_probs contain NaN")
        if self._tables[6][K.TRIE_NODES] + self._tables[6][K.CACHE_SLOTS] > self._MAX_CACHED:
            self._reset()
        lp = log_probs.numpy()
        # chunks of the batch keep the candidate buffers (width * (2 + tokens tried) per item) small
        chosen = int((log_probs >= self.token_min_logp).sum(-1).max()) if log_probs.numel() else 0
        step = max(1, (1 << 25) // (72 * self.beam_width * (2 + chosen)))
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
        from .loss import ctc_loss

        if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point() or log_probs.dim() != 2:
            raise TypeError("log_probs must be a floating tensor of shape (T, C)")
        if log_probs.shape[1] != len(self.vocab):
            raise ValueError(f"log_probs have {log_probs.shape[1]} classes but the vocabulary has {len(self.vocab)} tokens")
        tokens = tuple(int(k) for k in tokens)
        if any(not 0 <= k < len(self.vocab) or k == self.blank for k in tokens):
            raise ValueError(f"tokens must be non-blank indices of the vocabulary (0..{len(self.vocab) - 1}, not {self.blank})")
        lp = log_probs.detach().double().cpu()
        acoustic = -ctc_loss(lp, torch.tensor(tokens, dtype=torch.long), torch.tensor(lp.shape[0]), torch.tensor(len(tokens)),
                             blank=self.blank, reduction="sum").item() if tokens else lp[:, self.blank].sum().item()
        words = self._words(tokens)
        lm = sum(self.hotword_weight * len(w) for w in words if w in self.hotwords)
        if self.lm is not None:
            state = self.lm.begin()
            for w in words:
                logp, state = self.lm.score(state, w if not self._vocabulary or w in self._vocabulary else "<unk>")
                lm += self.alpha * logp + self.beta
            lm += self.alpha * self.lm.end(state)
        return Hypothesis(self._text(tokens), tokens, (), acoustic, lm, acoustic + lm)

    def _text(self, tokens: tuple[int, ...]) -> str:
        return " ".join(self._words(tokens)) if (self.delimiter is not None or self.bpe) else self._spell(tokens)
