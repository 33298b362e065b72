"""Writers for alignments: JSON, CTM, Praat TextGrid, SRT and WebVTT.

All take token/word spans (:mod:`ctclab.align`), a vocabulary (index -> token string) and the
frame shift in seconds. TextGrid is written directly: the long text format is a dozen lines of
fixed layout, and a dependency for it would be heavier than the code (the tests read our files
back with praatio to prove them valid). :func:`strict_json` writes JSON without NaN/Infinity
tokens (null instead); :func:`write_atomically` writes a file through a temporary one and a rename.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Sequence

from .align import STAR, STAR_TEXT, TokenSpan, WordSpan

#: the file extension of each format
EXTENSIONS = {"json": "json", "ctm": "ctm", "textgrid": "TextGrid", "srt": "srt", "vtt": "vtt"}


def token_text(token: int, vocab: Sequence[str]) -> str:
    return STAR_TEXT if token == STAR else vocab[token]


def word_text(word: WordSpan, vocab: Sequence[str], marker: str = "\u2581") -> str:
    """The word's ``text`` when it has one, else its tokens joined (a BPE word-start marker,
    ``'▁'``, dropped)."""
    if word.text is not None:
        return word.text
    return "".join(token_text(t.token, vocab) for t in word.tokens).replace(marker, "")


def _item(span: TokenSpan | WordSpan, text: str, frame_shift: float, offset: float) -> dict:
    item = {
        "text": text,
        "start": round(offset + span.start * frame_shift, 6),
        "end": round(offset + span.end * frame_shift, 6),
        "start_frame": span.start,
        "end_frame": span.end,
        "score": span.score,
    }
    if span.confidence is not None:
        item["confidence"] = span.confidence
    return item


def to_json(
    tokens: Sequence[TokenSpan], words: Sequence[WordSpan], vocab: Sequence[str], frame_shift: float,
    utterance: str = "utt", offset: float = 0.0,
) -> dict:
    """A JSON-ready dict: ``{"utterance", "frame_shift", "words": [...], "tokens": [...]}``, each
    entry with text, start/end seconds, start/end frames (end exclusive), score (mean emission
    probability) and, when computed, confidence (mean posterior occupancy)."""
    return {
        "utterance": utterance,
        "frame_shift": frame_shift,
        "words": [_item(w, word_text(w, vocab), frame_shift, offset) for w in words],
        "tokens": [_item(t, token_text(t.token, vocab), frame_shift, offset) for t in tokens],
    }


def finite_or_null(value):
    """``value`` (dicts, lists, tuples, floats, ...) with every NaN or infinite float made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(value) -> str:
    """Strict JSON (RFC 8259: no ``NaN`` or ``Infinity`` tokens), indented: a float that is not
    finite is written as ``null``."""
    return json.dumps(finite_or_null(value), indent=2, ensure_ascii=False, allow_nan=False)


def dumps_json(documents: Sequence[dict]) -> str:
    """One :func:`to_json` document as a JSON object, several as a list (strict JSON)."""
    return strict_json(documents[0] if len(documents) == 1 else list(documents))


def to_ctm(words: Sequence[WordSpan], vocab: Sequence[str], frame_shift: float, utterance: str = "utt", channel: int = 1, offset: float = 0.0) -> str:
    """NIST CTM: ``utterance channel start duration word confidence`` per line."""
    lines = []
    for w in words:
        conf = w.confidence if w.confidence is not None else w.score
        start = offset + w.start * frame_shift
        lines.append(f"{utterance} {channel} {start:.3f} {len(w) * frame_shift:.3f} {word_text(w, vocab)} {conf:.4f}")
    return "\n".join(lines) + ("\n" if lines else "")


def _escape_praat(text: str) -> str:
    return text.replace('"', '""')


def to_textgrid(
    words: Sequence[WordSpan], tokens: Sequence[TokenSpan], vocab: Sequence[str], frame_shift: float, duration: float
) -> str:
    """Praat TextGrid (long text format) with interval tiers ``words`` and ``tokens``; gaps
    between spans become empty intervals, as Praat requires contiguous tiers."""

    def tier(name: str, spans: list[tuple[float, float, str]]) -> list[str]:
        intervals, cursor = [], 0.0
        for start, end, text in spans:
            if start > cursor + 1e-9:
                intervals.append((cursor, start, ""))
            intervals.append((start, end, text))
            cursor = end
        if duration > cursor + 1e-9 or not intervals:
            intervals.append((cursor, duration, ""))
        out = ['        class = "IntervalTier"', f'        name = "{name}"', "        xmin = 0",
               f"        xmax = {duration:g}", f"        intervals: size = {len(intervals)}"]
        for i, (a, b, text) in enumerate(intervals, 1):
            out += [f"        intervals [{i}]:", f"            xmin = {a:g}", f"            xmax = {b:g}",
                    f'            text = "{_escape_praat(text)}"']
        return out

    word_spans = [(w.start * frame_shift, w.end * frame_shift, word_text(w, vocab)) for w in words]
    token_spans = [(t.start * frame_shift, t.end * frame_shift, token_text(t.token, vocab)) for t in tokens]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {duration:g}",
             "tiers? <exists>", "size = 2", "item []:"]
    for i, (name, spans) in enumerate((("words", word_spans), ("tokens", token_spans)), 1):
        lines.append(f"    item [{i}]:")
        lines += tier(name, spans)
    return "\n".join(lines) + "\n"


def _timestamp(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    h, rest = divmod(millis, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def _cues(words: Sequence[WordSpan], vocab: Sequence[str], frame_shift: float, words_per_cue: int, offset: float):
    if words_per_cue < 1:
        raise ValueError(f"words_per_cue must be >= 1, got {words_per_cue}")
    for i in range(0, len(words), words_per_cue):
        group = words[i : i + words_per_cue]
        yield (offset + group[0].start * frame_shift, offset + group[-1].end * frame_shift,
               " ".join(word_text(w, vocab) for w in group))


def to_srt(words: Sequence[WordSpan], vocab: Sequence[str], frame_shift: float, words_per_cue: int = 7, offset: float = 0.0) -> str:
    """SubRip subtitles, ``words_per_cue`` words per cue."""
    blocks = [f"{n}\n{_timestamp(a, ',')} --> {_timestamp(b, ',')}\n{text}\n"
              for n, (a, b, text) in enumerate(_cues(words, vocab, frame_shift, words_per_cue, offset), 1)]
    return "\n".join(blocks)


def to_vtt(words: Sequence[WordSpan], vocab: Sequence[str], frame_shift: float, words_per_cue: int = 7, offset: float = 0.0) -> str:
    """WebVTT subtitles, ``words_per_cue`` words per cue."""
    blocks = [f"{_timestamp(a, '.')} --> {_timestamp(b, '.')}\n{text}\n"
              for a, b, text in _cues(words, vocab, frame_shift, words_per_cue, offset)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_text(
    format: str, words: Sequence[WordSpan], tokens: Sequence[TokenSpan], vocab: Sequence[str], frame_shift: float,
    utterance: str = "utt", duration: float | None = None,
) -> str:
    """One utterance's alignment in a text ``format``: ``ctm``, ``textgrid`` (word and token tiers;
    ``duration`` in seconds), ``srt`` or ``vtt``."""
    if format == "ctm":
        return to_ctm(words, vocab, frame_shift, utterance)
    if format == "textgrid":
        return to_textgrid(words, tokens, vocab, frame_shift, duration)
    if format == "srt":
        return to_srt(words, vocab, frame_shift)
    if format == "vtt":
        return to_vtt(words, vocab, frame_shift)
    raise ValueError(f"format must be one of ctm, textgrid, srt, vtt, got {format!r}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write(binary file)`` into a temporary file in the same folder
    (made, with its parents, if missing), flushed to disk, then renamed over ``path``: a
    failure part-way leaves no partial file and the previous one intact."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = (os.stat(target).st_mode & 0o7777) if target.exists() else 0o666 & ~_umask()
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, mode)
        os.replace(handle.name, target)
    except BaseException:
        try:
            os.unlink(handle.name)
        except OSError:
            pass
        raise
