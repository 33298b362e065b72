"""CTC decoding: batched greedy (best path) decoding and prefix beam search with a word LM.

Greedy decoding takes the most probable class at every frame and collapses the result:
repeated classes merge, blanks drop out (Graves et al. 2006, section 3.2, "best path
decoding"). Vectorised over the whole batch: only the final split into per-item lists is a
Python loop, over items.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._inputs import Lengths, _lengths_tensor, frame_mask
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
    scores, labels = log_probs.detach().max(-1)  # (T, B)
    labels, scores = labels.T, scores.T  # (B, T)
    inside = frame_mask(T, lengths).T
    labels = torch.where(inside, labels, blank)
    starts = torch.ones_like(labels, dtype=torch.bool)
    starts[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run = starts.cumsum(1) - 1  # run index of every frame
    keep = starts & (labels != blank)
    item, start = keep.nonzero(as_tuple=True)
    runs_per_item = starts.sum(1)
    # end of a run = start of the next run of the same item (or the item's padded end)
    flat_starts = starts.flatten().nonzero()[:, 0]
    offsets = torch.cumsum(runs_per_item, 0) - runs_per_item
    run_index = offsets[item] + run[item, start]
    next_start = torch.cat((flat_starts, torch.tensor([B * T], device=device)))[run_index + 1]
    end = torch.minimum(next_start - item * T, torch.full_like(start, T))
    probs = scores.double().exp()
    cumulative = torch.nn.functional.pad(probs.cumsum(1), (1, 0))
    mean = (cumulative[item, end] - cumulative[item, start]) / (end - start)
    token = labels[item, start]
    counts = torch.bincount(item, minlength=B).tolist()
    rows = list(zip(token.tolist(), start.tolist(), end.tolist(), mean.tolist()))
    out, i = [], 0
    for n in counts:
        out.append([TokenSpan(*row) for row in rows[i : i + n]])
        i += n
    return out


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


@dataclass(slots=True)
class _Beam:
    """What a prefix's words give: fixed once the prefix exists."""

    lm_score: float = 0.0  # completed words: alpha * log P + beta each, hotword bonuses
    lm_state: object = None
    words: tuple = ()  # completed words
    word: str = ""  # the word being spelled
    word_length: int = 0  # its number of tokens



def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


class BeamSearchDecoder:
    """CTC prefix beam search (Hannun et al., "First-Pass Large Vocabulary Continuous Speech
    Recognition using Bi-Directional Recurrent DNNs", arXiv 1408.2873) with word-level LM fusion.

    Each prefix (collapsed token sequence) carries the probability of the paths that end in blank
    and of those that end in its last token; equal prefixes reached by different paths merge.
    A word is scored by the LM when it completes (at a delimiter token, at a BPE word-start
    token, or at the end): ``alpha * log P_LM(word | history) + beta``. While a word is being
    spelled, a prefix that cannot become an LM word costs ``unk_offset`` and a prefix of a hotword
    earns ``hotword_weight`` per token, kept if the word completes as that hotword.

    Args:
        vocab: index -> token string (a :class:`ctclab.Vocabulary` or a sequence).
        blank: blank index.
        beam_width: prefixes kept per frame.
        lm: a :class:`ctclab.lm.LanguageModel` (e.g. :class:`ctclab.lm.NGramLM`), or None.
        alpha, beta: LM weight and word insertion bonus.
        hotwords: words to favour; hotword_weight: bonus per matching token.
        word_delimiter: the token that separates words (default: ``'|'`` or ``' '`` if in the
            vocabulary); BPE vocabularies (tokens starting with ``'▁'``) need none.
        token_min_logp: tokens below this log-prob at a frame are not tried there (``-inf``: all).
        beam_prune_logp: prefixes this far below the best are dropped (``-inf``: none).
        unk_offset: cost of a partial word that no LM word starts with.

    Ties are broken by the order in which prefixes first appear (then by token sequence among
    the final hypotheses), so results are deterministic.
    """

    def __init__(
        self, vocab, blank: int = 0, beam_width: int = 100, lm=None, alpha: float = 0.5, beta: float = 1.0,
        hotwords=None, hotword_weight: float = 10.0, word_delimiter: str | None = None,
        token_min_logp: float = -10.0, beam_prune_logp: float = -10.0, unk_offset: float = -10.0,
    ):
        self.vocab = tuple(vocab)
        if not 0 <= blank < len(self.vocab):
            raise ValueError(f"blank must be in [0, {len(self.vocab)}), got {blank}")
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        self.blank = blank
        self.beam_width = beam_width
        self.lm = lm
        self.alpha, self.beta = alpha, beta
        self.hotwords = frozenset(hotwords or ())
        self.hotword_prefixes = {w[:i] for w in self.hotwords for i in range(1, len(w) + 1)}
        self.hotword_weight = hotword_weight
        self.bpe = any(t.startswith(BPE_MARKER) for t in self.vocab)
        self._texts = [t.replace(BPE_MARKER, "") for t in self.vocab]
        self._word_starts = [self.bpe and t.startswith(BPE_MARKER) for t in self.vocab]
        if word_delimiter is None and not self.bpe:
            word_delimiter = next((d for d in ("|", " ") if d in self.vocab), None)
        if word_delimiter is not None and word_delimiter not in self.vocab:
            raise ValueError(f"word_delimiter {word_delimiter!r} is not in the vocabulary")
        self.delimiter = self.vocab.index(word_delimiter) if word_delimiter is not None else None
        self.token_min_logp = token_min_logp
        self.beam_prune_logp = beam_prune_logp
        self.unk_offset = unk_offset
        words = getattr(lm, "vocabulary", None)
        self.lm_prefixes = {w[:i] for w in words for i in range(1, len(w) + 1)} if words else None

    # -- words --------------------------------------------------------------------------------
    def _spell(self, tokens) -> str:
        return "".join(self.vocab[t] for t in tokens).replace(BPE_MARKER, "")

    def _starts_word(self, token: int) -> bool:
        return self.bpe and self.vocab[token].startswith(BPE_MARKER)

    def _partial_score(self, beam: _Beam) -> float:
        if not beam.word_length:
            return 0.0
        score = 0.0
        if self.lm_prefixes is not None and beam.word not in self.lm_prefixes:
            score += self.unk_offset
        if beam.word in self.hotword_prefixes:
            score += self.hotword_weight * beam.word_length
        return score

    def _complete_word(self, beam: _Beam) -> tuple:
        """(lm_score, lm_state, words) after the word being spelled completes."""
        if not beam.word_length:
            return beam.lm_score, beam.lm_state, beam.words
        score, state = beam.lm_score, beam.lm_state
        if self.lm is not None:
            logp, state = self.lm.score(state, beam.word)
            score += self.alpha * logp + self.beta
        if beam.word in self.hotwords:
            score += self.hotword_weight * beam.word_length
        return score, state, beam.words + (beam.word,)

    def _extend(self, parent: _Beam, token: int) -> _Beam:
        """A new prefix: ``parent`` + ``token``."""
        text = self._texts[token]
        if token == self.delimiter or (self._word_starts[token] and parent.word_length):
            score, state, words = self._complete_word(parent)
            if token == self.delimiter:
                return _Beam(score, state, words)
            return _Beam(score, state, words, text, 1)
        return _Beam(parent.lm_score, parent.lm_state, parent.words, parent.word + text, parent.word_length + 1)

    # -- search -------------------------------------------------------------------------------
    def _decode_one(self, lp, nbest: int) -> list[Hypothesis]:
        # Prefixes are interned as integer ids (a trie): a dict keyed by (parent id, token)
        # instead of whole token tuples, which Python would rehash at every lookup. What depends
        # only on the prefix (LM state and score, partial-word score) is computed once, there.
        root = _Beam(lm_state=self.lm.begin() if self.lm is not None else None)
        prefixes = [root]  # id -> _Beam holding the prefix's static information
        parents, last_tokens = [-1], [-1]
        static = [0.0]  # lm_score + partial-word score, per id
        children: dict[tuple[int, int], int] = {}

        def child(pid: int, token: int) -> int:
            key = (pid, token)
            cid = children.get(key)
            if cid is None:
                beam = self._extend(prefixes[pid], token)
                cid = len(prefixes)
                children[key] = cid
                prefixes.append(beam)
                parents.append(pid)
                last_tokens.append(token)
                static.append(beam.lm_score + self._partial_score(beam))
            return cid

        beams: dict[int, list[float]] = {0: [0.0, -math.inf]}  # id -> [log p ends in blank, log p ends in label]
        blank, logaddexp, width, prune = self.blank, _logaddexp, self.beam_width, self.beam_prune_logp
        for row in lp:
            candidates = [k for k, y in enumerate(row) if y >= self.token_min_logp and k != blank]
            if not candidates:
                candidates = [max((k for k in range(len(row)) if k != blank), key=row.__getitem__)]
            y_blank = row[blank]
            nxt: dict[int, list[float]] = {}
            for pid, (p_blank, p_label) in beams.items():
                total = logaddexp(p_blank, p_label)
                stay = nxt.setdefault(pid, [-math.inf, -math.inf])
                stay[0] = logaddexp(stay[0], total + y_blank)
                last = last_tokens[pid]
                for k in candidates:
                    y = row[k]
                    grown = nxt.setdefault(child(pid, k), [-math.inf, -math.inf])
                    if k == last:
                        stay[1] = logaddexp(stay[1], p_label + y)  # a repeat collapses
                        grown[1] = logaddexp(grown[1], p_blank + y)  # a blank between: a new token
                    else:
                        grown[1] = logaddexp(grown[1], total + y)
            scored = [(logaddexp(b, l) + static[pid], -pid) for pid, (b, l) in nxt.items()]
            kept = heapq.nlargest(width, scored)
            floor = kept[0][0] + prune
            beams = {-neg: nxt[-neg] for score, neg in kept if score >= floor}
        finals = []
        for pid, (p_blank, p_label) in beams.items():
            beam = prefixes[pid]
            lm_score, state, words = self._complete_word(beam)
            if self.lm is not None:
                lm_score += self.alpha * self.lm.end(state)
            tokens = []
            node = pid
            while node > 0:
                tokens.append(last_tokens[node])
                node = parents[node]
            acoustic = logaddexp(p_blank, p_label)
            finals.append((acoustic + lm_score, tuple(reversed(tokens)), acoustic, lm_score, words))
        finals.sort(key=lambda f: (-f[0], f[1]))
        return [self._hypothesis(lp, *f) for f in finals[:nbest]]

    def _hypothesis(self, lp, score, tokens, acoustic, lm_score, words) -> Hypothesis:
        """Word timings from the best alignment of the hypothesis (:func:`ctclab.forced_align`)."""
        text = " ".join(words) if (self.delimiter is not None or self.bpe) else self._spell(tokens)
        timings = []
        if tokens:
            spans = token_spans(forced_align(torch.tensor(lp), torch.tensor(tokens), blank=self.blank), self.blank)[0]
            current = []
            for span in spans + [None]:
                boundary = span is None or span.token == self.delimiter or (self._starts_word(span.token) and current)
                if boundary and current:
                    timings.append(WordTiming(self._spell(s.token for s in current), current[0].start, current[-1].end))
                    current = []
                if span is not None and span.token != self.delimiter:
                    current.append(span)
        return Hypothesis(text, tokens, tuple(timings), acoustic, lm_score, score)

    def decode(self, log_probs: Tensor, input_lengths: Lengths | None = None, nbest: int = 1) -> list[list[Hypothesis]]:
        """Decode a batch: ``(T, B, C)`` or ``(T, C)`` log-probs (any dtype and device) -> per item
        its ``nbest`` best :class:`Hypothesis`, best first."""
        if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point() or log_probs.dim() not in (2, 3):
            raise TypeError("log_probs must be a floating tensor of shape (T, B, C) or (T, C)")
        if log_probs.dim() == 2:
            log_probs = log_probs.unsqueeze(1)
        T, B, C = log_probs.shape
        if C != len(self.vocab):
            raise ValueError(f"log_probs have {C} classes but the vocabulary has {len(self.vocab)} tokens")
        if nbest < 1:
            raise ValueError(f"nbest must be >= 1, got {nbest}")
        lengths = [T] * B if input_lengths is None else _lengths_tensor("input_lengths", input_lengths, torch.device("cpu")).reshape(-1).tolist()
        if len(lengths) != B or any(not 0 <= n <= T for n in lengths):
            raise ValueError(f"input_lengths must be (B,) = ({B},) with values in [0, {T}]")
        rows = log_probs.detach().double().cpu().transpose(0, 1).tolist()
        return [self._decode_one(rows[b][: lengths[b]], nbest) for b in range(B)]
