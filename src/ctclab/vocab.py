"""Vocabularies: token strings <-> class indices, and text -> target indices with word lengths."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

BPE_MARKER = "\u2581"


def _listing(items) -> str:
    """``[3]`` -> ``'3'``, ``[3, 5]`` -> ``'3 and 5'``, ``[1, 3, 5]`` -> ``'1, 3 and 5'``."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _token_problem(tokens: tuple[str, ...], where: str, first: int) -> str | None:
    """What is wrong with ``tokens`` (empty tokens, then duplicates), positions named as
    ``where`` (``'index'`` or ``'line'``) numbered from ``first``; None if nothing."""
    plural = "indices" if where == "index" else where + "s"
    empty = [k + first for k, t in enumerate(tokens) if t == ""]
    if empty:
        fix = (
            "remove it, or write a single space for the space token"
            if where == "line" else "give every class a non-empty token, e.g. '<blank>' for the blank"
        )
        return f"empty token at {where if len(empty) == 1 else plural} {_listing(empty)}: {fix}"
    positions: dict[str, list[int]] = {}
    for k, t in enumerate(tokens):
        positions.setdefault(t, []).append(k + first)
    duplicates = [(t, ks) for t, ks in positions.items() if len(ks) > 1]
    if duplicates:
        listed = "; ".join(f"{t!r} at {plural} {_listing(ks)}" for t, ks in duplicates)
        return f"duplicate tokens ({listed}): every class needs its own token (encode and index would disagree)"
    return None


class _Pairs(list):
    """A JSON object as its (key, value) pairs, duplicates kept."""


def _json_tokens(text: str, name: str) -> tuple[str, ...]:
    """The tokens of a wav2vec2-style JSON vocabulary ``{token: index}``, checked: an object,
    each token once, the indices exactly the integers ``0..n-1``."""
    try:
        pairs = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as error:
        raise ValueError(f"vocabulary {name} is not valid JSON: {error}") from None
    if not isinstance(pairs, _Pairs):
        raise ValueError(f"vocabulary {name} must be a JSON object {{token: index}}, got a {type(pairs).__name__}")
    if not pairs:
        raise ValueError(f"vocabulary {name} is empty")
    seen: dict[str, int] = {}
    for token, _ in pairs:
        seen[token] = seen.get(token, 0) + 1
    repeated = [t for t, n in seen.items() if n > 1]
    if repeated:
        raise ValueError(f"vocabulary {name} lists the tokens {', '.join(map(repr, repeated))} more than once")
    for token, index in pairs:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"vocabulary {name}: the index of {token!r} must be an integer, got {index!r}")
    holders: dict[int, list[str]] = {}
    for token, index in pairs:
        holders.setdefault(index, []).append(token)
    shared = [(i, ts) for i, ts in sorted(holders.items()) if len(ts) > 1]
    if shared:
        listed = "; ".join(f"index {i} is given to {_listing(map(repr, ts))}" for i, ts in shared)
        raise ValueError(f"vocabulary {name}: {listed}; each class index needs exactly one token")
    n = len(pairs)
    if sorted(holders) != list(range(n)):
        missing = sorted(set(range(n)) - set(holders))
        raise ValueError(
            f"vocabulary {name} must map its {n} tokens to the indices 0..{n - 1}; "
            f"missing {_listing(missing)}, out of range {_listing(sorted(set(holders) - set(range(n))))}"
        )
    tokens = [""] * n
    for token, index in pairs:
        tokens[index] = token
    return tuple(tokens)


@dataclass(frozen=True)
class Vocabulary:
    """Class index -> token string (``tokens[k]``).

    ``delimiter``: the token that separates words (``'|'`` as in wav2vec2, or ``' '``), if any;
    ``bpe``: tokens mark word starts with ``'▁'`` (sentencepiece) instead.

    Tokens must be non-empty strings, each once (``index`` and ``encode`` need one class per
    token): anything else is a ValueError naming the offending indices. A list is accepted and
    stored as a tuple.
    """

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        tokens = self.tokens
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
            raise TypeError(f"tokens must be a sequence of strings (one per class), got {type(tokens).__name__}")
        tokens = tuple(tokens)
        for k, token in enumerate(tokens):
            if not isinstance(token, str):
                raise TypeError(f"tokens must be strings, got {token!r} ({type(token).__name__}) at index {k}")
        if not tokens:
            raise ValueError("the vocabulary is empty: tokens must hold one string per class")
        problem = _token_problem(tokens, "index", 0)
        if problem is not None:
            raise ValueError(f"vocabulary: {problem}")
        object.__setattr__(self, "tokens", tokens)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """One token per line (line k + 1 is class k; a line holding exactly one space is the
        space token; an empty line is an error), or a JSON object ``{token: index}`` as shipped
        with wav2vec2 models (``.json``). A UTF-8 byte-order mark is ignored.

        Raises:
            ValueError: an unreadable or empty file, an empty line, a token listed twice (naming
                the lines), invalid JSON, JSON indices that are not the integers ``0..n-1``,
                each once.
        """
        path = Path(path)
        name = repr(str(path))
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as error:
            raise ValueError(f"cannot read vocabulary file {name}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"vocabulary file {name} is not UTF-8 text: {error.reason} at byte {error.start}") from None
        if path.suffix == ".json":
            return cls(_json_tokens(text, name))
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise ValueError(f"vocabulary file {name} is empty")
        tokens = tuple(line if line == " " else line.strip("\r") for line in lines)
        problem = _token_problem(tokens, "line", 1)
        if problem is not None:
            raise ValueError(f"vocabulary file {name}: {problem}")
        return cls(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> str:
        return self.tokens[index]

    @property
    def delimiter(self) -> str | None:
        return next((d for d in ("|", " ") if d in self.tokens), None)

    @property
    def bpe(self) -> bool:
        return any(t.startswith(BPE_MARKER) for t in self.tokens)

    def index(self, token: str) -> int:
        """The class of ``token``; a ValueError naming it when it is not in the vocabulary."""
        try:
            return self.tokens.index(token)
        except ValueError:
            raise ValueError(f"token {token!r} is not in the vocabulary") from None

    def encode(self, text: str, case: str = "keep") -> tuple[list[int], list[int]]:
        """Text -> (token indices, tokens per word). Words are split on white space and tokenised
        by greedy longest match; a delimiter token, when the vocabulary has one, is put between
        words (it is not counted in the lengths)."""
        if case not in ("keep", "upper", "lower"):
            raise ValueError(f"case must be 'keep', 'upper' or 'lower', got {case!r}")
        if case != "keep":
            text = text.upper() if case == "upper" else text.lower()
        lookup = {t: i for i, t in enumerate(self.tokens) if t}
        longest = max(len(t) for t in lookup)
        ids: list[int] = []
        lengths: list[int] = []
        words = text.split()
        if not words:
            raise ValueError("text is empty: nothing to align")
        for w, word in enumerate(words):
            if w and self.delimiter is not None:
                ids.append(lookup[self.delimiter])
            piece = BPE_MARKER + word if self.bpe else word
            count, i = 0, 0
            while i < len(piece):
                for size in range(min(longest, len(piece) - i), 0, -1):
                    if piece[i : i + size] in lookup:
                        ids.append(lookup[piece[i : i + size]])
                        i += size
                        count += 1
                        break
                else:
                    hint = " (try --case upper/lower)" if piece[i].swapcase() in lookup else ""
                    raise ValueError(f"text contains {piece[i]!r} (in word {word!r}), which is not in the vocabulary{hint}")
            lengths.append(count)
        return ids, lengths
