"""Audio in: any format soundfile reads (WAV, FLAC, OGG/Vorbis, MP3 with libsndfile >= 1.1, ...),
mixed down to mono and resampled (soxr, high quality) to the model's rate, in blocks: a long
file is never held at its own rate and channel count, only as the mono result."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._extras import need

#: frames read per block (about 20 s at 48 kHz)
BLOCK = 1 << 20


class AudioError(ValueError):
    """A recording cannot be read: the message names the file and why."""


def _soundfile():
    return need("soundfile")


def _open(path: Path):
    sf = _soundfile()
    if not path.exists():
        raise AudioError(f"cannot read audio {str(path)!r}: no such file")
    if path.is_dir():
        raise AudioError(f"cannot read audio {str(path)!r}: it is a folder")
    try:
        return sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        reason = getattr(error, "error_string", None) or str(error).splitlines()[0]
        raise AudioError(f"cannot read audio {str(path)!r}: not a sound file soundfile can read ({reason})") from None


def audio_duration(path: str | Path) -> float:
    """Seconds of audio in a file, from its header (nothing decoded)."""
    with _open(Path(path)) as f:
        return f.frames / f.samplerate


def resample(waveform: Tensor | np.ndarray, from_rate: int, to_rate: int) -> Tensor:
    """A mono ``(N,)`` waveform from ``from_rate`` to ``to_rate`` Hz (soxr, high quality)."""
    x = np.ascontiguousarray(torch.as_tensor(waveform).detach().cpu().numpy(), dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"waveform must be mono (N,), got shape {x.shape}")
    if from_rate == to_rate:
        return torch.from_numpy(x.copy())
    return torch.from_numpy(np.ascontiguousarray(need("soxr").resample(x, from_rate, to_rate, quality="HQ"), dtype=np.float32))


def read_audio(source: str | os.PathLike, sample_rate: int) -> Tensor:
    """A recording as a mono float32 ``(N,)`` tensor at ``sample_rate`` Hz: channels averaged,
    resampled with soxr when the file's rate differs, read in blocks.

    Raises:
        AudioError (a ValueError): a missing, unreadable, damaged or empty file, naming it.
    """
    path = Path(source)
    with _open(path) as f:
        rate, total = f.samplerate, f.frames
        if total == 0:
            raise AudioError(f"cannot read audio {str(path)!r}: it holds no samples")
        stream = None if rate == sample_rate else need("soxr").ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
        out = np.empty(int(total * sample_rate / rate) + 64, dtype=np.float32)
        filled, done = 0, 0
        try:
            while done < total:
                block = f.read(min(BLOCK, total - done), dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                done += len(block)
                mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
                if stream is not None:
                    mono = stream.resample_chunk(np.ascontiguousarray(mono), last=done >= total)
                if filled + len(mono) > len(out):
                    out = np.resize(out, filled + len(mono))
                out[filled : filled + len(mono)] = mono
                filled += len(mono)
        except (RuntimeError, OSError) as error:
            raise AudioError(f"cannot read audio {str(path)!r}: the file is damaged ({str(error).splitlines()[0]})") from None
    if filled == 0:
        raise AudioError(f"cannot read audio {str(path)!r}: it holds no samples")
    return torch.from_numpy(out[:filled])


#: Loudness below a word's loudest stretch, in dB, that counts as the silence after it
#: (:func:`trim_word_ends`); chosen on the speech testbed's training split, not its test set.
TRIM_DROP_DB = 25.0
#: The hop of :func:`trim_word_ends`' loudness, in seconds.
TRIM_HOP_SECONDS = 0.005


def trim_word_ends(times, waveform, sample_rate: int, drop_db: float = TRIM_DROP_DB,
                   hop_seconds: float = TRIM_HOP_SECONDS) -> list[tuple[float, float]]:
    """Word ends moved back over the silence a word's last token held on to: each ``(start,
    end)`` (seconds) ends after the last ``hop_seconds`` stretch inside it whose energy is within
    ``drop_db`` of the word's loudest. CTC alignments end a word where its last token's frames
    end, and a model that lets tokens hold their frames (label priors, arXiv 2406.02560) keeps
    the last one through the pause that follows, up to the next word; the loudness of the audio
    says where the word stopped. Starts are kept; a word never ends before its first hop.

    Args:
        times: ``(start, end)`` seconds per word (e.g. the words of :func:`ctclab.speech.align_audio`).
        waveform: the recording, mono ``(N,)`` (tensor or array) at ``sample_rate``.
        drop_db: how far below the word's loudest stretch the ends are cut (> 0).
        hop_seconds: the stretch the loudness is measured over (> 0).

    Raises:
        ValueError: a non-positive ``drop_db`` or ``hop_seconds``, or ``sample_rate``; a
            waveform that is not 1-D or holds NaN or infinity.
    """
    for name, value in (("drop_db", drop_db), ("hop_seconds", hop_seconds), ("sample_rate", sample_rate)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    audio = np.asarray(waveform.detach().cpu() if isinstance(waveform, Tensor) else waveform, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"waveform must be mono (N,), got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("waveform holds NaN or infinity")
    hop = max(1, int(round(hop_seconds * sample_rate)))
    n = len(audio) // hop
    energy_db = 10 * np.log10(np.square(audio[: n * hop]).reshape(n, hop).mean(1) + 1e-20)
    out = []
    for start, end in times:
        first = min(max(int(start * sample_rate) // hop, 0), n)
        last = min(max(first + 1, -(-int(end * sample_rate) // hop)), n)
        stretch = energy_db[first:last]
        if not len(stretch):
            out.append((start, end))
            continue
        loud = np.nonzero(stretch >= stretch.max() - drop_db)[0]
        out.append((start, min(end, (first + loud[-1] + 1) * hop / sample_rate)))
    return out
