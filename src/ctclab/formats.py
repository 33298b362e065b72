"""Writers for alignments: JSON, CTM, Praat TextGrid, SRT and WebVTT.

All take token/word spans (:mod:`ctclab.align`), a vocabulary (index -> token string) and the
frame shift in seconds. TextGrid is written directly: the long text format is a dozen lines of
fixed layout, and a dependency for it would be heavier than the code (the tests read our files
back with praatio to prove them valid).
"""
from __future__ import annotations

import json
from typing import Sequence

from .align import STAR, TokenSpan, WordSpan

STAR_TEXT = "<star>"


def token_text(token: int, vocab: Sequence[str]) -> str:
    return STAR_TEXT if token == STAR else vocab[token]


def word_text(word: WordSpan, vocab: Sequence[str], marker: str = "\u2581") -> str:
    """The word's tokens joined; a BPE word-start marker (``'▁'``) is dropped."""
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


def dumps_json(documents: Sequence[dict]) -> str:
    return json.dumps(documents[0] if len(documents) == 1 else list(documents), indent=2, ensure_ascii=False)


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
