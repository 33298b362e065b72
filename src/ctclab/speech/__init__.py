"""From audio and transcript to word timestamps (the ``speech`` extra: transformers, soundfile, soxr).

- :mod:`~ctclab.speech.model`: acoustic models from local folders (:func:`load_acoustic_model`,
  :func:`save_acoustic_model`, :class:`AcousticModel`);
- :mod:`~ctclab.speech.audio`: reading and resampling audio (:func:`read_audio`);
- :mod:`~ctclab.speech.windows`: emissions of long recordings in windows (:func:`windowed_log_probs`);
- :mod:`~ctclab.speech.text`: transcripts to targets and back to the transcript's words (:func:`prepare_text`);
- :mod:`~ctclab.speech.corpus`: :func:`align_audio` (one recording) and :func:`align_corpus` (a manifest);
- :mod:`~ctclab.speech.plot`: waveform, emissions and word segments (:func:`plot_audio_alignment`).

The optional packages are imported when first used; without them the error says
``pip install 'ctclab[speech]'``.
"""
from .audio import AudioError, audio_duration, read_audio, resample, trim_word_ends
from .corpus import (AlignmentError, AudioAlignment, CorpusItem, CorpusSummary, ManifestError, align_audio, align_corpus,
                     read_manifest, shard_from_environment, shard_of)
from .model import AcousticModel, load_acoustic_model, save_acoustic_model
from .text import PreparedText, TranscriptWord, prepare_text
from .windows import windowed_log_probs

__all__ = [
    "AcousticModel",
    "AlignmentError",
    "AudioAlignment",
    "AudioError",
    "CorpusItem",
    "CorpusSummary",
    "ManifestError",
    "PreparedText",
    "TranscriptWord",
    "align_audio",
    "align_corpus",
    "audio_duration",
    "load_acoustic_model",
    "plot_audio_alignment",
    "prepare_text",
    "read_audio",
    "read_manifest",
    "resample",
    "save_acoustic_model",
    "shard_from_environment",
    "shard_of",
    "trim_word_ends",
    "windowed_log_probs",
]


def __getattr__(name: str):
    if name == "plot_audio_alignment":  # matplotlib only when a picture is drawn
        from .plot import plot_audio_alignment

        return plot_audio_alignment
    raise AttributeError(f"module 'ctclab.speech' has no attribute {name!r}")
