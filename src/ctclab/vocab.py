"""Vocabularies: token strings <-> class indices, and text -> target indices with word lengths."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BPE_MARKER = "\u2581"


@dataclass(frozen=True)
class Vocabulary:
    """Class index -> token string (``tokens[k]``).

    ``delimiter``: the token that separates words (``'|'`` as in wav2vec2, or ``' '``), if any;
    ``bpe``: tokens mark word starts with ``'▁'`` (sentencepiece) instead.
    """

    tokens: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """One token per line (line k is class k; a line holding one space is the space token),
        or a JSON object ``{token: index}`` as shipped with wav2vec2 models."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot read vocabulary file {str(path)!r}: {error.strerror}") from None
        if path.suffix == ".json":
            try:
                mapping = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"vocabulary {str(path)!r} is not valid JSON: {error}") from None
            if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
                raise ValueError(f"vocabulary {str(path)!r} must map tokens to the indices 0..{len(mapping) - 1}")
            tokens = [""] * len(mapping)
            for token, index in mapping.items():
                tokens[index] = token
            return cls(tuple(tokens))
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise ValueError(f"vocabulary file {str(path)!r} is empty")
        return cls(tuple(line if line == " " else line.strip("\r") for line in lines))

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
        return self.tokens.index(token)

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
