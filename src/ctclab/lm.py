"""Word n-gram language models for decoding: an ARPA reader with back-off, scored in Python,
and the small interface any LM implements (begin a sentence, score a word, end it)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol

LN10 = math.log(10.0)
#: the word that stands for every word outside an LM's vocabulary (ARPA files' and kenlm's)
UNK = "<unk>"

State = tuple[str, ...]


class LanguageModel(Protocol):
    """What :class:`ctclab.BeamSearchDecoder` asks of a word LM. Scores are natural logs."""

    def begin(self) -> State:
        """The state at the start of a sentence."""

    def score(self, state: State, word: str) -> tuple[float, State]:
        """``log P(word | state)`` and the state after the word."""

    def end(self, state: State) -> float:
        """``log P(</s> | state)``."""


class NGramLM:
    """An ARPA back-off n-gram model: ``P(w | h) = p(h, w)`` if the n-gram is listed, otherwise
    ``b(h) * P(w | h[1:])`` (Katz back-off as written in ARPA files). Log10 in the file, natural
    logs out. Unknown words score as ``<unk>`` when the model has it, else ``unk_logp`` (-100 in log10, as kenlm substitutes)."""

    def __init__(self, probs: dict[State, float], backoffs: dict[State, float], order: int, unk_logp: float = -100.0 * LN10):
        self.probs = probs
        self.backoffs = backoffs
        self.order = order
        self.unk_logp = unk_logp
        self.vocabulary = {gram[0] for gram in probs if len(gram) == 1}

    @classmethod
    def from_arpa(cls, path: str | Path, unk_logp: float = -100.0 * LN10) -> "NGramLM":
        probs: dict[State, float] = {}
        backoffs: dict[State, float] = {}
        order, section = 0, None
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ValueError(f"cannot read ARPA file {str(path)!r}: {error.strerror}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("ngram ") or line == "\\data\\":
                if line.startswith("ngram "):
                    order = max(order, int(line.split()[1].split("=")[0]))
                continue
            if line == "\\end\\":
                break
            if line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:].split("-")[0])
                continue
            if section is None:
                continue
            fields = line.split()
            if len(fields) not in (section + 1, section + 2):
                raise ValueError(f"{path}:{number}: expected log10 prob, {section} words and an optional back-off")
            gram = tuple(fields[1 : section + 1])
            probs[gram] = float(fields[0]) * LN10
            if len(fields) == section + 2:
                backoffs[gram] = float(fields[-1]) * LN10
        if not probs:
            raise ValueError(f"{path}: no n-grams found (is it an ARPA file?)")
        return cls(probs, backoffs, order or max(len(g) for g in probs), unk_logp)

    def begin(self) -> State:
        return ("<s>",)

    def _logp(self, context: State, word: str) -> float:
        gram = context + (word,)
        if gram in self.probs:
            return self.probs[gram]
        if not context:
            return self.probs.get((UNK,), self.unk_logp)
        return self.backoffs.get(context, 0.0) + self._logp(context[1:], word)

    def score(self, state: State, word: str) -> tuple[float, State]:
        context = state[-(self.order - 1) :] if self.order > 1 else ()
        logp = self._logp(context, word)
        new = (context + (word,))[-(self.order - 1) :] if self.order > 1 else ()
        while new and new not in self.probs:  # keep only the context the model can use
            new = new[1:]
        return logp, new

    def end(self, state: State) -> float:
        return self.score(state, "</s>")[0]


def arpa_vocabulary(path: str | Path) -> set[str] | None:
    """The words of an ARPA file's unigram section (None for a file that is not ARPA text, such
    as a kenlm binary)."""
    words: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            if f.readline().strip() != "\\data\\":
                return None
            inside = False
            for line in f:
                line = line.strip()
                if line == "\\1-grams:":
                    inside = True
                elif inside and line.startswith("\\"):
                    break
                elif inside and line:
                    words.add(line.split()[1])
    except (OSError, UnicodeDecodeError, IndexError):
        return None
    return words - {"<s>", "</s>", UNK}


class KenLM:
    """:class:`LanguageModel` over the ``kenlm`` package (``pip install kenlm``), for large models.
    ``vocabulary``: the LM's words (read from an ARPA file's unigrams; None for binaries), which
    lets the decoder penalise partial words no LM word starts with."""

    def __init__(self, path: str | Path):
        try:
            import kenlm
        except ImportError:
            raise ImportError(
                "ctclab.KenLM needs the kenlm package: pip install kenlm "
                "(for an ARPA file, ctclab's own reader needs nothing: ctclab.NGramLM.from_arpa(path))"
            ) from None

        self.model = kenlm.Model(str(path))
        self._kenlm = kenlm
        self.vocabulary = arpa_vocabulary(path)

    def begin(self):
        state = self._kenlm.State()
        self.model.BeginSentenceWrite(state)
        return state

    def score(self, state, word: str):
        out = self._kenlm.State()
        return self.model.BaseScore(state, word, out) * LN10, out

    def end(self, state) -> float:
        out = self._kenlm.State()
        return self.model.BaseScore(state, "</s>", out) * LN10


def _is_arpa(path: str | Path) -> bool:
    """Whether the file starts as ARPA text does (``\\data\\``, blank lines before it allowed)."""
    try:
        with open(path, "rb") as f:
            return f.read(4096).lstrip().startswith(b"\\data\\")
    except OSError:
        return False


def load_lm(path: str | Path, backend: str = "auto"):
    """An ARPA (or, with kenlm, binary) LM: ``backend='kenlm'`` needs the kenlm package,
    ``'python'`` uses :class:`NGramLM`, ``'auto'`` prefers kenlm when it is installed.

    Raises:
        ValueError: an unknown backend, a missing file, or a file that needs kenlm (a binary
            ``.bin``/``.klm``, or ``backend='kenlm'``) when kenlm is not installed: the message
            says to ``pip install kenlm`` (or to use an ARPA file, which :class:`NGramLM` reads).
    """
    if backend not in ("auto", "kenlm", "python"):
        raise ValueError(f"backend must be 'auto', 'kenlm' or 'python', got {backend!r}")
    if not Path(path).exists():
        raise ValueError(f"cannot read LM file {str(path)!r}: no such file")
    if backend != "python":
        try:
            return KenLM(path)
        except ImportError:
            if backend == "kenlm":
                raise ValueError("backend='kenlm' needs the kenlm package: pip install kenlm "
                                 "(or backend='python' for an ARPA file: ctclab's own reader, NGramLM)") from None
            if not _is_arpa(path):
                raise ValueError(f"{str(path)!r} is not an ARPA text file (a kenlm binary?): reading it needs the kenlm "
                                 "package, pip install kenlm; ctclab's own reader (NGramLM) takes ARPA files only") from None
    return NGramLM.from_arpa(path)


def write_arpa(sentences: Iterable[str], path: str | Path) -> None:
    """Write a word bigram ARPA file estimated from ``sentences`` (words split on white space):
    absolute discounting (d = 0.5) with back-off weights to the unigrams, ``<s>``/``</s>`` added.
    Written atomically; :meth:`NGramLM.from_arpa` reads it."""
    from .formats import write_atomically

    uni, bi = Counter(), Counter()
    for s in sentences:
        w = ["<s>"] + s.split() + ["</s>"]
        uni.update(w)
        bi.update(zip(w, w[1:]))
    total = sum(uni.values()) - uni["<s>"]
    p1 = {w: (c / total if w != "<s>" else 1e-99) for w, c in uni.items()}
    follow = Counter()
    for (a, _), c in bi.items():
        follow[a] += c
    kinds = Counter(a for a, _ in bi.keys())
    p2 = {(a, b): (c - 0.5) / follow[a] for (a, b), c in bi.items()}
    seen = Counter()
    for a, b in bi:
        seen[a] += p1[b]
    lines = ["\\data\\", f"ngram 1={len(uni)}", f"ngram 2={len(bi)}", "", "\\1-grams:"]
    for w in uni:
        left = 0.5 * kinds[w] / follow[w] if follow[w] else 1.0
        bo = math.log10(left / max(1e-12, 1 - seen[w])) if follow[w] else 0.0
        lp = -99.0 if w == "<s>" else math.log10(p1[w])
        lines.append(f"{lp:.6f}\t{w}\t{bo:.6f}")
    lines += ["", "\\2-grams:"] + [f"{math.log10(p):.6f}\t{a} {b}" for (a, b), p in p2.items()] + ["", "\\end\\", ""]
    write_atomically(path, lambda f: f.write("\n".join(lines).encode("utf-8")))
