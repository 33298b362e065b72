"""Transcripts to targets, and the alignment back to the transcript's own words.

A transcript is split on white space into words, which are what the output reports, exactly as
written (``"Hello,"``, ``"44.1"``). Each word is mapped to the model's vocabulary: Unicode NFKC,
the vocabulary's case (upper or lower when its letters are all of one case), characters the
vocabulary lacks (punctuation, symbols) dropped. A word with nothing left (``"44.1"`` for a
model without digits, a word in a script the model lacks) becomes one wildcard token
(:data:`ctclab.STAR`, see :func:`ctclab.forced_align`'s ``star``), so it still gets the time
its audio takes. Optionally such words are romanised first (``uroman``, when installed).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from ..trellis import STAR
from ..vocab import BPE_MARKER, Vocabulary

#: the wildcard's penalty (nats per frame below the frame's best class) when none is given
DEFAULT_STAR_PENALTY = 1.0


@dataclass(frozen=True)
class TranscriptWord:
    """A word of the transcript: its ``text`` as written, and the ``tokens`` (class indices)
    aligned for it; ``(STAR,)`` when nothing of it is in the vocabulary."""

    text: str
    tokens: tuple[int, ...]

    @property
    def wildcard(self) -> bool:
        return self.tokens == (STAR,)


@dataclass(frozen=True)
class PreparedText:
    """A transcript ready to align.

    Attributes:
        words: the transcript's words, in order.
        targets: the target sequence: the words' tokens, a word delimiter between words when
            the vocabulary has one, :data:`STAR` at both ends with ``star_ends``.
        word_index: for each target, the index of its word, -1 for delimiters and end stars.
    """

    words: tuple[TranscriptWord, ...]
    targets: tuple[int, ...]
    word_index: tuple[int, ...]

    @property
    def has_star(self) -> bool:
        return STAR in self.targets

    @property
    def alignable(self) -> bool:
        """Some word has tokens of the vocabulary (not only wildcards)."""
        return any(not w.wildcard for w in self.words)


def _special(token: str) -> bool:
    return len(token) > 2 and token.startswith("<") and token.endswith(">")


@lru_cache(maxsize=32)
def _lexicon(tokens: tuple[str, ...], blank: int, delimiter: str | None) -> tuple[dict[str, int], int, str]:
    """Spelling tokens -> index (blank, delimiter, space and ``<special>`` tokens excluded), the
    longest token's length, and the case to map text to (``'upper'``, ``'lower'`` or ``'keep'``)."""
    lookup = {t: k for k, t in enumerate(tokens)
              if k != blank and t != delimiter and t.strip() and not _special(t)}
    letters = "".join(t for t in lookup if any(c.isalpha() for c in t))
    case = "upper" if letters and letters == letters.upper() and letters != letters.lower() else \
           "lower" if letters and letters == letters.lower() and letters != letters.upper() else "keep"
    return lookup, max((len(t) for t in lookup), default=1), case


def _tokens_of(word: str, lookup: dict[str, int], longest: int, bpe: bool) -> list[int]:
    """Greedy longest match of ``word`` against the spelling tokens; characters no token starts
    with are dropped (the BPE word-start marker, when used, goes before the first kept one)."""
    ids: list[int] = []
    i = 0
    while i < len(word):
        for size in range(min(longest, len(word) - i), 0, -1):
            piece = word[i : i + size]
            if bpe and not ids and BPE_MARKER + piece in lookup:
                ids.append(lookup[BPE_MARKER + piece])
                break
            if piece in lookup:
                ids.append(lookup[piece])
                break
        else:
            size = 1  # not in the vocabulary: dropped from the targets (kept in the output word)
        i += size
    return ids


def _romanizer():
    try:
        import uroman
    except ImportError as error:
        raise ImportError("romanize=True needs the uroman package: pip install uroman") from error
    return uroman.Uroman()


def normalize_word(word: str, case: str) -> str:
    """NFKC, then the vocabulary's case."""
    word = unicodedata.normalize("NFKC", word)
    return word.upper() if case == "upper" else word.lower() if case == "lower" else word


def prepare_text(
    text: str, vocabulary: Vocabulary, blank: int = 0, word_delimiter: str | None = None, *,
    star_ends: bool = False, romanize: bool = False,
) -> PreparedText:
    """The transcript ``text`` as targets of ``vocabulary`` (see the module's docstring).

    Args:
        text: the transcript; words are split on white space.
        vocabulary: the model's tokens; ``blank`` its blank index.
        word_delimiter: the token between words (``'|'``); default: ``'|'`` or ``' '`` if the
            vocabulary has one, else none (words then end where their tokens do).
        star_ends: a wildcard at both ends, for audio the transcript does not cover.
        romanize: words with nothing in the vocabulary that hold letters are romanised with
            ``uroman`` before they fall back to the wildcard.

    Raises:
        ValueError: an empty transcript.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    words = text.split()
    if not words:
        raise ValueError("the transcript is empty: nothing to align")
    delimiter = word_delimiter if word_delimiter is not None else vocabulary.delimiter
    lookup, longest, case = _lexicon(tuple(vocabulary.tokens), blank, delimiter)
    bpe = vocabulary.bpe
    romanizer = None
    prepared = []
    for word in words:
        ids = _tokens_of(normalize_word(word, case), lookup, longest, bpe)
        if not ids and romanize and any(unicodedata.category(c).startswith("L") for c in word):
            romanizer = romanizer or _romanizer()
            ids = _tokens_of(normalize_word(romanizer.romanize_string(word), case), lookup, longest, bpe)
        prepared.append(TranscriptWord(word, tuple(ids) if ids else (STAR,)))
    separator = [vocabulary.index(delimiter)] if delimiter is not None and delimiter in vocabulary.tokens else []
    targets: list[int] = [STAR] if star_ends else []
    index: list[int] = [-1] if star_ends else []
    for w, word in enumerate(prepared):
        if w:
            targets += separator
            index += [-1] * len(separator)
        targets += word.tokens
        index += [w] * len(word.tokens)
    if star_ends:
        targets.append(STAR)
        index.append(-1)
    return PreparedText(tuple(prepared), tuple(targets), tuple(index))
