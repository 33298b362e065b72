"""Audio and transcript to word timestamps: one recording (:func:`align_audio`) or a corpus
(:func:`align_corpus`: a manifest, batched, resumable, sharded across processes).

The emissions come from :func:`ctclab.speech.windows.windowed_log_probs`; the alignment is
:func:`ctclab.forced_align` over the whole recording (``checkpoint_every`` when its backpointers
would be large), its spans :func:`ctclab.token_spans`, and each word's confidence its mean
posterior occupancy (:func:`ctclab.alignment_posteriors`). For long recordings the posteriors
are computed on stretches of about :data:`POSTERIOR_SEGMENT_FRAMES` frames of the best path,
each between two of its token entries, so each stretch is conditioned on the path's position at
its ends (the forward-backward over the whole trellis would need ``T x S`` floats).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .. import formats as writers
from ..formats import EXTENSIONS
from .._inputs import required_frames
from ..align import Alignment, TokenSpan, WordSpan, alignment_posteriors, forced_align, token_spans, word_of
from ..trellis import STAR
from .audio import AudioError, read_audio
from .model import AcousticModel
from .text import DEFAULT_STAR_PENALTY, PreparedText, prepare_text
from .windows import BATCH_SECONDS, CONTEXT_SECONDS, WINDOW_SECONDS, windowed_log_probs

#: Viterbi backpointers above this many trellis cells (2 bits each) are checkpointed
CHECKPOINT_CELLS = 1 << 30
#: posteriors of the whole trellis up to this many cells (8 bytes each), else in segments
POSTERIOR_CELLS = 1 << 23
POSTERIOR_SEGMENT_FRAMES = 1500
FAILURES = "failures.jsonl"


class AlignmentError(ValueError):
    """A recording and its transcript cannot be aligned (the message says why)."""


@dataclass
class AudioAlignment:
    """The alignment of one recording to its transcript.

    Attributes:
        id: the item's id; audio: its file (None for a waveform); text: the transcript.
        duration: seconds of audio.
        words: one :class:`ctclab.WordSpan` per transcript word, ``text`` the word as written,
            frames and ``start_time``/``end_time`` in seconds, ``score`` (mean emission
            probability) and ``confidence`` (mean posterior occupancy), both in [0, 1].
        tokens: the :class:`ctclab.TokenSpan` of every target token (:data:`ctclab.STAR` for
            wildcards); delimiters included.
        vocabulary, frame_shift: the model's.
        log_probs: ``(T, C)`` emissions (kept for the picture; None once dropped).
    """

    id: str
    audio: str | None
    duration: float
    text: str
    words: list[WordSpan]
    tokens: list[TokenSpan]
    vocabulary: Sequence[str]
    frame_shift: float
    log_probs: Tensor | None = field(default=None, repr=False)

    def _seconds(self, frame: int) -> float:
        return round(min(frame * self.frame_shift, self.duration), 4)

    def to_json(self) -> dict:
        """``{id, audio, duration, text, frame_shift, words: [{word, start, end, score,
        confidence}], tokens: [{token, start, end, score, confidence}]}``, times in seconds."""
        def entry(key, text, span):
            return {key: text, "start": self._seconds(span.start), "end": self._seconds(span.end),
                    "score": span.score, "confidence": span.confidence}

        return {
            "id": self.id, "audio": self.audio, "duration": round(self.duration, 4), "text": self.text,
            "frame_shift": self.frame_shift,
            "words": [entry("word", w.text, w) for w in self.words],
            "tokens": [entry("token", writers.token_text(t.token, self.vocabulary), t) for t in self.tokens],
        }

    def render(self, format: str) -> str:
        """The alignment as ``json``, ``ctm``, ``textgrid``, ``srt`` or ``vtt`` text."""
        vocab, shift = self.vocabulary, self.frame_shift
        if format == "json":
            return writers.strict_json(self.to_json()) + "\n"
        if format not in EXTENSIONS:
            raise ValueError(f"format must be one of {', '.join(EXTENSIONS)}, got {format!r}")
        return writers.to_text(format, self.words, self.tokens, vocab, shift, self.id, self.duration)


def _segment_posteriors(log_probs: Tensor, targets: Tensor, ali: Alignment, star: float | None) -> Tensor:
    """``(T,)`` posteriors of the path's states, computed per stretch of about
    :data:`POSTERIOR_SEGMENT_FRAMES` frames cut where the path enters a token."""
    states = ali.states.tolist()
    T = len(states)
    cuts = [0]
    for t in range(1, T):
        if t - cuts[-1] >= POSTERIOR_SEGMENT_FRAMES and states[t] != states[t - 1] and states[t] % 2 == 1:
            cuts.append(t)
    cuts.append(T)
    out = torch.zeros(T, dtype=torch.float64)
    for a, b in zip(cuts, cuts[1:]):
        first = states[a] // 2  # the first token of the stretch (its blank before, when the path is there)
        last = (states[b - 1] - 1) // 2 if states[b - 1] % 2 else states[b - 1] // 2 - 1
        part = Alignment(ali.labels[a:b], ali.scores[a:b], ali.states[a:b] - 2 * first, ali.path_score,
                         ali.aligned, ali.blank)
        out[a:b] = alignment_posteriors(log_probs[a:b], targets[first : last + 1], part, star=star)
    return out


def _check_fits(frames: int, prepared: PreparedText, frame_shift: float) -> None:
    if not prepared.alignable and not prepared.has_star:
        raise AlignmentError("nothing in the transcript is in the model's vocabulary")
    need = required_frames(prepared.targets)
    if need > frames:
        raise AlignmentError(f"the transcript needs at least {need} frames ({need * frame_shift:.2f} s: one per token, "
                             f"one more between repeated tokens) but the audio gives {frames} ({frames * frame_shift:.2f} s)")


def _groups(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of ``(frames, states)`` items in batches of at most :data:`POSTERIOR_CELLS` padded
    trellis cells (at least one item each), similar lengths together."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and (len(g) + 1) * max(sizes[j][0] for j in g + [i]) * max(sizes[j][1] for j in g + [i]) <= POSTERIOR_CELLS:
            g.append(i)
        else:
            groups.append([i])
    return groups


def align_many(
    items: Sequence[tuple[Tensor, PreparedText]], blank: int, vocabulary: Sequence[str], frame_shift: float, *,
    star_penalty: float = DEFAULT_STAR_PENALTY, confidence: bool = True,
) -> list[tuple[list[WordSpan], list[TokenSpan]] | AlignmentError]:
    """Words and tokens of each recording's ``(T, C)`` log-probs aligned to its prepared
    transcript (:func:`ctclab.speech.text.prepare_text`), recordings of similar lengths in one
    batched :func:`ctclab.forced_align` and :func:`ctclab.alignment_posteriors` call.
    ``vocabulary``: the model's tokens (the log-probs must have one class each); ``blank`` its
    blank; ``frame_shift`` seconds per frame.

    Returns:
        Per item ``(words, tokens)``, or the :class:`AlignmentError` saying why it cannot be
        aligned (more tokens than frames, no path of non-zero probability, nothing alignable).
    """
    results: list = [None] * len(items)
    fits = []
    for i, (lp, prepared) in enumerate(items):
        if lp.dim() != 2 or lp.shape[1] != len(vocabulary):
            raise ValueError(f"log_probs of item {i} must be (T, {len(vocabulary)}) for the vocabulary's {len(vocabulary)} tokens, "
                             f"got shape {tuple(lp.shape)}")
        try:
            _check_fits(lp.shape[0], prepared, frame_shift)
            fits.append(i)
        except AlignmentError as error:
            results[i] = error
    sizes = [(items[i][0].shape[0], 2 * len(items[i][1].targets) + 1) for i in fits]
    for group in _groups(sizes):
        members = [fits[g] for g in group]
        lps = [items[i][0] for i in members]
        rows = [items[i][1].targets for i in members]
        T, C, S = max(lp.shape[0] for lp in lps), lps[0].shape[1], max(len(r) for r in rows)
        log_probs = torch.full((T, len(members), C), -math.log(C))  # beyond an item's length: never read
        targets = torch.full((len(members), S), 1 if blank != 1 else 0, dtype=torch.long)
        for b, (lp, row) in enumerate(zip(lps, rows)):
            log_probs[: lp.shape[0], b] = lp
            targets[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([lp.shape[0] for lp in lps])
        target_lengths = torch.tensor([len(r) for r in rows])
        star = star_penalty if any(STAR in r for r in rows) else None
        every = math.isqrt(T) + 1 if T * (2 * S + 1) > CHECKPOINT_CELLS else None
        ali = forced_align(log_probs, targets, lengths, target_lengths, blank=blank, star=star, skip_infeasible=True,
                           checkpoint_every=every)
        posteriors = None
        if confidence and len(members) == 1 and T * (2 * S + 1) > POSTERIOR_CELLS:  # one long recording
            posteriors = _segment_posteriors(log_probs[:, 0], targets[0], ali.item(0), star)[None]
        elif confidence:
            posteriors = alignment_posteriors(log_probs, targets, ali, lengths, target_lengths, star=star)
        for b, (i, spans) in enumerate(zip(members, token_spans(ali, posteriors=posteriors))):
            if not bool(ali.aligned[b]):
                results[i] = AlignmentError("every alignment of the transcript has probability 0 under the model's emissions")
                continue
            prepared = items[i][1]
            assert len(spans) == len(prepared.targets), "the path visits every target token once"
            words: list[list[TokenSpan]] = [[] for _ in prepared.words]
            for span, w in zip(spans, prepared.word_index):
                if w >= 0:
                    words[w].append(span)
            results[i] = ([dataclasses.replace(word_of(g, None, frame_shift), text=word.text)
                           for g, word in zip(words, prepared.words)], spans)
    return results


def align_log_probs(
    log_probs: Tensor, prepared: PreparedText, blank: int, vocabulary: Sequence[str], frame_shift: float, *,
    star_penalty: float = DEFAULT_STAR_PENALTY, confidence: bool = True,
) -> tuple[list[WordSpan], list[TokenSpan]]:
    """Words and tokens of one recording's ``(T, C)`` log-probs: :func:`align_many` of one.

    Raises:
        AlignmentError: the recording cannot be aligned to the transcript.
    """
    result = align_many([(log_probs, prepared)], blank, vocabulary, frame_shift, star_penalty=star_penalty, confidence=confidence)[0]
    if isinstance(result, AlignmentError):
        raise result
    return result


def align_audio(
    model: AcousticModel, audio, text: str, *, id: str | None = None, star: float | None = None,
    star_penalty: float = DEFAULT_STAR_PENALTY, romanize: bool = False, confidence: bool = True,
    window: float = WINDOW_SECONDS, context: float = CONTEXT_SECONDS, batch_seconds: float = BATCH_SECONDS,
    keep_log_probs: bool = False,
) -> AudioAlignment:
    """Align one recording to its transcript.

    Args:
        model: an :class:`AcousticModel` (:func:`ctclab.speech.load_acoustic_model`).
        audio: a file (any format soundfile reads), or a mono waveform at the model's rate.
        text: the transcript (see :mod:`ctclab.speech.text` for what is aligned).
        id: the result's id (default: the file's stem, ``'audio'`` for a waveform).
        star: a wildcard at both ends with this penalty (nats per frame), for audio the
            transcript does not cover; None: none. Also the penalty of wildcard words.
        star_penalty: the penalty of wildcard words when ``star`` is None.
        romanize: romanise words of scripts the vocabulary lacks (``uroman``).
        confidence: compute posterior confidences (forward-backward).
        window, context, batch_seconds: of :func:`ctclab.speech.windows.windowed_log_probs`.
        keep_log_probs: keep the emissions on the result (for :func:`ctclab.speech.plot.plot_audio_alignment`).

    Raises:
        AudioError: an unreadable file; AlignmentError: a transcript that cannot be aligned.
    """
    if isinstance(audio, (str, os.PathLike)):
        waveform, name = read_audio(audio, model.sample_rate), str(audio)
        id = id or Path(audio).stem
    else:
        waveform, name = torch.as_tensor(audio, dtype=torch.float32), None
        id = id or "audio"
    prepared = prepare_text(text, model.vocabulary, model.blank, model.word_delimiter, star_ends=star is not None,
                            romanize=romanize)
    log_probs = windowed_log_probs(model, [waveform], window=window, context=context, batch_seconds=batch_seconds)[0]
    aligned = align_log_probs(log_probs, prepared, model.blank, model.vocabulary, model.frame_shift,
                              star_penalty=star if star is not None else star_penalty, confidence=confidence)
    return _result(model, id, name, len(waveform), text, aligned, log_probs, keep_log_probs)


def _result(model: AcousticModel, id: str, audio: str | None, samples: int, text: str, aligned: tuple,
            log_probs: Tensor, keep: bool) -> AudioAlignment:
    words, tokens = aligned
    return AudioAlignment(id, audio, samples / model.sample_rate, text, words, tokens, model.vocabulary,
                          model.frame_shift, log_probs if keep else None)


# -- corpora ----------------------------------------------------------------------------------
class ManifestError(ValueError):
    """A manifest that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class CorpusItem:
    """One recording of a manifest: ``id``, ``audio`` (resolved path), ``text``, its ``line``."""

    id: str
    audio: Path
    text: str
    line: int = 0


def read_manifest(path: str | os.PathLike) -> list[CorpusItem]:
    """The items of a JSON-lines manifest: ``audio`` (or NeMo's ``audio_filepath``), ``text``,
    optional ``id`` (default: the audio file's stem). Relative paths are relative to the
    manifest's folder; blank lines are skipped.

    Raises:
        ManifestError: a line that is not a JSON object, lacks ``audio``/``text``, or repeats an id.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read manifest {str(path)!r}: {getattr(error, 'strerror', None) or error}") from None
    items, seen = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"manifest {str(path)!r} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{where} is not JSON: {error.msg}") from None
        if not isinstance(entry, dict):
            raise ManifestError(f"{where} must be a JSON object with audio and text, got a {type(entry).__name__}")
        audio = entry.get("audio", entry.get("audio_filepath"))
        if not isinstance(audio, str) or not audio:
            raise ManifestError(f"{where} needs \"audio\" (or \"audio_filepath\"): the audio file's path")
        text = entry.get("text")
        if not isinstance(text, str):
            raise ManifestError(f"{where} needs \"text\": the transcript, a string")
        audio_path = Path(audio) if os.path.isabs(audio) else path.parent / audio
        id = entry.get("id", Path(audio).stem)
        if not isinstance(id, str) or not id or "/" in id or "\\" in id or id in (".", ".."):
            raise ManifestError(f"{where}: id must be a non-empty string without slashes (it names the output files), got {id!r}")
        if id in seen:
            raise ManifestError(f"{where} repeats the id {id!r} of line {seen[id]}: ids must be unique "
                                "(give each item an \"id\")")
        seen[id] = number
        items.append(CorpusItem(id, audio_path, text, number))
    if not items:
        raise ManifestError(f"manifest {str(path)!r} holds no items")
    return items


def shard_of(items: Sequence[CorpusItem], shard: tuple[int, int] | None) -> list[CorpusItem]:
    """Shard ``I`` of ``N`` (counting from 0): every N-th item from the I-th, a deterministic
    share; the N shards cover the manifest exactly once."""
    if shard is None:
        return list(items)
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (I, N) with 0 <= I < N, got {shard!r}")
    return list(items[index::count])


def shard_from_environment(environ=os.environ) -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when both are set (torchrun, or a SLURM array job that sets them),
    else None. Raises ValueError for values that are not a valid rank of the world."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"RANK and WORLD_SIZE must be integers, got {environ['RANK']!r} and {environ['WORLD_SIZE']!r}") from None
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank} WORLD_SIZE={world}")
    return rank, world


def output_paths(out_dir: Path, id: str, formats_: Sequence[str]) -> list[Path]:
    return [out_dir / f"{id}.{EXTENSIONS[f]}" for f in formats_]


class Failures:
    """``failures.jsonl`` in the output folder, shared by every shard: one JSON object per line
    (``id``, ``audio``, ``reason``), rewritten atomically under a lock file."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / FAILURES
        self.lock = out_dir / f".{FAILURES}.lock"

    def _update(self, change: Callable[[list[dict]], list[dict]]) -> None:
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = []
            if self.path.exists():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
            new = change(entries)
            if new != entries or not self.path.exists():
                text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in new)
                writers.write_atomically(self.path, lambda f: f.write(text.encode("utf-8")))

    def forget(self, ids: Iterable[str]) -> None:
        """Drop the entries of ``ids`` (items about to be aligned again)."""
        ids = set(ids)
        self._update(lambda entries: [e for e in entries if e.get("id") not in ids])

    def record(self, item: CorpusItem, reason: str) -> None:
        entry = {"id": item.id, "audio": str(item.audio), "reason": reason}
        self._update(lambda entries: [e for e in entries if e.get("id") != item.id] + [entry])


class Progress:
    """A one-line progress bar on a stream: items, audio hours per second, time left."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.seconds, self.start = total, 0, 0.0, time.monotonic()
        self.stream, self.enabled = stream or sys.stderr, enabled and total > 0

    def update(self, audio_seconds: float) -> None:
        self.done += 1
        self.seconds += audio_seconds
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        left = elapsed / self.done * (self.total - self.done)
        width = 24
        bar = "#" * (width * self.done // self.total)
        self.stream.write(f"\r[{bar:<{width}}] {self.done}/{self.total} items, {self.seconds / 3600 / elapsed:.3g} h audio/s, "
                          f"{time.strftime('%H:%M:%S', time.gmtime(left))} left ")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class CorpusSummary:
    """What :func:`align_corpus` did: ids ``aligned``, ``skipped`` (outputs already there,
    ``resume``), ``failed`` (id -> reason), and the audio seconds aligned."""

    aligned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    audio_seconds: float = 0.0


def _remove_stale_temporaries(out_dir: Path, names: set[str]) -> None:
    """Temporary files an interrupted run of these items left (``write_atomically``'s
    ``.<name>.*.tmp``): the outputs they were to become are written again."""
    for entry in os.scandir(out_dir):
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            target = entry.name[1:].rsplit(".", 2)[0]
            if target in names:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def align_corpus(
    model: AcousticModel, items: Sequence[CorpusItem] | str | os.PathLike, out_dir: str | os.PathLike, *,
    formats: Sequence[str] = ("json",), resume: bool = False, shard: tuple[int, int] | None = None,
    batch_seconds: float = BATCH_SECONDS, window: float = WINDOW_SECONDS, context: float = CONTEXT_SECONDS,
    star: float | None = None, star_penalty: float = DEFAULT_STAR_PENALTY, romanize: bool = False, confidence: bool = True,
    plot_dir: str | os.PathLike | None = None, progress: bool = False, on_item: Callable[[str], None] | None = None,
) -> CorpusSummary:
    """Align every item of a manifest (or of a list of :class:`CorpusItem`) and write
    ``out_dir/<id>.<ext>`` for each format, atomically.

    Recordings are read and their windows batched together up to ``batch_seconds`` of audio per
    forward pass. Items that cannot be aligned (missing or damaged audio, a transcript too long
    for its audio, nothing alignable) go to ``out_dir/failures.jsonl`` and the run goes on.

    Args:
        model: the :class:`AcousticModel`.
        items: a manifest path (:func:`read_manifest`) or its items.
        out_dir: the output folder (made if missing).
        formats: any of ``json``, ``ctm``, ``textgrid``, ``srt``, ``vtt``.
        resume: skip items whose outputs all exist (nothing of theirs is rewritten); items with
            some outputs get only the missing ones.
        shard: ``(I, N)``: this process's share (:func:`shard_of`); None: everything.
        batch_seconds, window, context: as :func:`ctclab.speech.windows.windowed_log_probs`.
        star, star_penalty, romanize, confidence: as :func:`align_audio` (without confidences
            the JSON's ``confidence`` is null).
        plot_dir: also draw each item's picture there (``<id>.png``).
        progress: a progress bar on standard error.
        on_item: called with each id once its outputs are written (or it failed).

    Returns:
        A :class:`CorpusSummary`.
    """
    for f in formats:
        if f not in EXTENSIONS:
            raise ValueError(f"formats must be among {', '.join(EXTENSIONS)}, got {f!r}")
    items = read_manifest(items) if isinstance(items, (str, os.PathLike)) else list(items)
    mine = shard_of(items, shard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = Path(plot_dir) if plot_dir is not None else None
    summary = CorpusSummary()
    todo: list[tuple[CorpusItem, list[str]]] = []
    for item in mine:
        wanted = [f for f, p in zip(formats, output_paths(out, item.id, formats)) if not (resume and p.exists())]
        if plots is not None and not (resume and (plots / f"{item.id}.png").exists()):
            wanted.append("plot")
        if wanted:
            todo.append((item, wanted))
        else:
            summary.skipped.append(item.id)
    failures = Failures(out)
    failures.forget(item.id for item, _ in todo)
    _remove_stale_temporaries(out, {p.name for item, _ in todo for p in output_paths(out, item.id, formats)})
    bar = Progress(len(todo), enabled=progress)
    delay = float(os.environ.get("CTCLAB_TEST_ITEM_DELAY", "0") or 0)  # tests interrupt a run between items
    start = 0
    while start < len(todo):
        group, waves, seconds = [], [], 0.0
        while start < len(todo) and (not group or seconds < batch_seconds):
            item, wanted = todo[start]
            start += 1
            try:
                wave = read_audio(item.audio, model.sample_rate)
            except AudioError as error:
                _fail(summary, failures, item, str(error), bar, on_item)
                continue
            group.append((item, wanted))
            waves.append(wave)
            seconds += len(wave) / model.sample_rate
        if not group:
            continue
        try:
            log_probs = windowed_log_probs(model, waves, window=window, context=context, batch_seconds=batch_seconds)
        except ValueError:  # one recording the model cannot take (too short for a frame): each on its own
            log_probs = []
            for (item, _), wave in zip(group, waves):
                try:
                    log_probs += windowed_log_probs(model, [wave], window=window, context=context, batch_seconds=batch_seconds)
                except ValueError as error:
                    log_probs.append(error)
        ready = []  # (item, wanted, wave, log_probs, prepared text)
        for (item, wanted), wave, lp in zip(group, waves, log_probs):
            if isinstance(lp, ValueError):
                _fail(summary, failures, item, f"{item.audio}: {str(lp).splitlines()[0]}", bar, on_item)
                continue
            try:
                ready.append((item, wanted, wave, lp, prepare_text(item.text, model.vocabulary, model.blank, model.word_delimiter,
                                                                   star_ends=star is not None, romanize=romanize)))
            except ValueError as error:
                _fail(summary, failures, item, str(error).splitlines()[0], bar, on_item)
        alignments = align_many([(lp, prepared) for _, _, _, lp, prepared in ready], model.blank, model.vocabulary, model.frame_shift,
                                star_penalty=star if star is not None else star_penalty, confidence=confidence)
        for (item, wanted, wave, lp, _), aligned in zip(ready, alignments):
            if delay:
                time.sleep(delay)
            if isinstance(aligned, AlignmentError):
                _fail(summary, failures, item, str(aligned).splitlines()[0], bar, on_item)
                continue
            result = _result(model, item.id, str(item.audio), len(wave), item.text, aligned, lp, "plot" in wanted)
            for f in wanted:
                if f == "plot":
                    from .plot import plot_audio_alignment

                    plot_audio_alignment(wave, model.sample_rate, result, out=plots / f"{item.id}.png", close=True)
                else:
                    text = result.render(f)
                    _write_text(out / f"{item.id}.{EXTENSIONS[f]}", text)
            summary.aligned.append(item.id)
            summary.audio_seconds += result.duration
            bar.update(result.duration)
            if on_item is not None:
                on_item(item.id)
    return summary


def _write_text(path: Path, text: str) -> None:
    writers.write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def _fail(summary: CorpusSummary, failures: Failures, item: CorpusItem, reason: str, bar: Progress, on_item) -> None:
    summary.failed[item.id] = reason
    failures.record(item, reason)
    bar.update(0.0)
    if on_item is not None:
        on_item(item.id)
