"""Synthetic speech with the true start and end of every word, from espeak-ng.

How the truth is known: every word is synthesised **separately** (espeak-ng's command line, one
process per word: ``espeak-ng --stdout -v VOICE -s SPEED -p PITCH WORD``; its C library, reached
with ctypes, is five times faster but keeps state between calls in one process, so the same
word comes out a few samples different each time and the data would not be reproducible), its
leading and trailing silence trimmed by energy (5 ms frames whose RMS is at least ``TRIM_DB`` below the word's loudest frame
are cut), and the words are joined with pauses of known length (none for about a third of the
junctions, so words also abut). A word's extent is therefore exact by construction: the samples
from its first to its last audible frame. (The other way, espeak-ng's word events from one
``espeak_Synth`` call of the whole sentence, gives only word *starts*, and those include the
pause before the word; separate synthesis is simpler and exact, at the price of no
coarticulation across words.)

Each utterance varies the voice (English voices and variants), speed (words per minute),
pitch, the pauses, the loudness and the noise (white noise at an SNR drawn per utterance), and
is resampled from espeak-ng's 22,050 Hz to 16 kHz (soxr). Everything is deterministic given the
seed. Sentences come from a small built-in grammar over :data:`WORDS` (no downloads); a sentence
is held out (test split only) when its CRC32 is divisible by 5, so the test split never
contains a training sentence, and one voice (:data:`HELD_OUT_VOICE`) is used only in the test
split.
"""
from __future__ import annotations

import json
import random
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctclab.formats import write_atomically

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050  # espeak-ng's native output rate
TRIM_DB = 40.0  # a 5 ms frame this far below the word's loudest frame is silence
TRIM_FRAME = ESPEAK_RATE // 200  # 5 ms

#: the grammar's word classes (lowercase letters only; the model's vocabulary is a-z plus "|")
WORDS = {
    "det": ["the", "a", "every", "my", "your", "this", "that", "some"],
    "adj": ["red", "green", "small", "big", "quiet", "happy", "old", "young", "bright", "dark", "cold", "warm",
            "heavy", "gentle", "little", "strange", "yellow", "clever", "lazy", "brave"],
    "noun": ["cat", "dog", "river", "garden", "teacher", "window", "mountain", "bird", "child", "table", "letter",
             "doctor", "city", "horse", "apple", "farmer", "forest", "engine", "morning", "village", "kitchen",
             "sailor", "picture", "market", "student", "bottle", "flower", "island", "rabbit", "winter"],
    "verb": ["sees", "finds", "likes", "paints", "follows", "carries", "watches", "remembers", "visits", "builds",
             "opens", "pushes", "wants", "helps", "calls", "draws", "moves", "cleans", "holds", "brings"],
    "prep": ["near", "under", "behind", "beside", "above", "inside", "across", "with"],
    "adv": ["slowly", "quickly", "often", "never", "always", "today", "again", "quietly"],
}
TEMPLATES = (
    ("det", "noun", "verb", "det", "noun"),
    ("det", "adj", "noun", "verb", "det", "noun"),
    ("det", "noun", "verb", "det", "adj", "noun", "prep", "det", "noun"),
    ("det", "adj", "noun", "adv", "verb", "det", "noun"),
    ("det", "noun", "prep", "det", "noun", "verb", "det", "adj", "noun"),
    ("adv", "det", "noun", "verb", "det", "noun"),
    ("det", "adj", "adj", "noun", "verb", "prep", "det", "noun"),
)
#: espeak-ng voice names (a language's voice file, "+" a variant) used in training and testing
TRAIN_VOICES = ("en-us", "gmw/en", "en-us+m3", "gmw/en+f2", "gmw/en-GB-x-rp+m1", "gmw/en-029+f4", "en-us+f3",
                "gmw/en-GB-x-gbcwmd+m2")
HELD_OUT_VOICE = "gmw/en-GB-scotland+f1"  # never in the training split


def is_held_out(sentence: str) -> bool:
    """Whether ``sentence`` belongs to the test split (stable across runs and machines)."""
    return zlib.crc32(sentence.encode()) % 5 == 0


def random_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS[kind]) for kind in rng.choice(TEMPLATES))


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """int16 samples at :data:`ESPEAK_RATE` of ``text`` spoken by espeak-ng's command line
    (``espeak-ng --stdout -v VOICE -s SPEED -p PITCH TEXT``, one process per call)."""
    command = ["espeak-ng", "--stdout", "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "--", text]
    try:
        done = subprocess.run(command, capture_output=True, check=True)
    except FileNotFoundError:
        raise RuntimeError("the speech testbed needs espeak-ng (Debian/Ubuntu: apt-get install espeak-ng)") from None
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"espeak-ng failed for {text!r} in voice {voice!r}: {error.stderr.decode().strip()}") from None
    wav = done.stdout
    if wav[:4] != b"RIFF" or wav[36:40] != b"data" or int.from_bytes(wav[24:28], "little") != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote no {ESPEAK_RATE} Hz WAV for {text!r} in voice {voice!r}")
    return np.frombuffer(wav[44:], dtype="<i2")  # the header's sizes are unset on a pipe: read to the end


def audible_extent(samples: np.ndarray, frame: int = TRIM_FRAME, trim_db: float = TRIM_DB) -> tuple[int, int]:
    """``[start, end)`` from the first to the last ``frame``-sample frame whose RMS is within
    ``trim_db`` of the loudest frame's."""
    x = samples.astype(np.float64)
    frames = -(-len(x) // frame)
    padded = np.zeros(frames * frame)
    padded[: len(x)] = x
    rms = np.sqrt((padded.reshape(frames, frame) ** 2).mean(1))
    loud = np.nonzero(rms >= rms.max() * 10 ** (-trim_db / 20))[0]
    if rms.max() == 0 or len(loud) == 0:
        raise ValueError("a synthesised word is silent")
    return int(loud[0]) * frame, min(len(x), (int(loud[-1]) + 1) * frame)


@dataclass(frozen=True)
class Word:
    """One word of an utterance and its true extent in seconds (``end`` exclusive)."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Utterance:
    """``audio`` float32 ``(N,)`` at :data:`SAMPLE_RATE` in [-1, 1]; its ``text`` (words joined by
    single spaces); ``words`` with their true extents; how it was made (``voice``, ``speed``,
    ``pitch``, ``snr_db``)."""

    id: str
    audio: np.ndarray
    text: str
    words: tuple[Word, ...]
    voice: str
    speed: int
    pitch: int
    snr_db: float

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def truth(self) -> dict:
        return {"id": self.id, "text": self.text, "voice": self.voice, "speed": self.speed, "pitch": self.pitch,
                "snr_db": self.snr_db, "words": [{"word": w.text, "start": w.start, "end": w.end} for w in self.words]}


def synthesise(text: str, rng: random.Random, voice: str, noise: bool = True, uid: str = "utt") -> Utterance:
    """One utterance of ``text`` in ``voice`` with speed, pitch, pauses, gain and noise drawn from ``rng``."""
    import soxr

    speed, pitch = rng.randint(130, 200), rng.randint(25, 75)
    pieces = [np.zeros(int(ESPEAK_RATE * rng.uniform(0.1, 0.35)))]
    position, spans = len(pieces[0]), []
    for i, word in enumerate(text.split()):
        if i:
            pause = 0.0 if rng.random() < 0.3 else rng.uniform(0.03, 0.3)
            pieces.append(np.zeros(int(ESPEAK_RATE * pause)))
            position += len(pieces[-1])
        samples = espeak(word, voice, speed, pitch)
        a, b = audible_extent(samples)
        pieces.append(samples[a:b].astype(np.float64) / 32768.0)
        spans.append((word, position, position + b - a))
        position += b - a
    pieces.append(np.zeros(int(ESPEAK_RATE * rng.uniform(0.1, 0.35))))
    audio = soxr.resample(np.concatenate(pieces), ESPEAK_RATE, SAMPLE_RATE)
    gain = rng.uniform(0.3, 0.9) / max(1e-9, float(np.abs(audio).max()))
    audio = audio * gain
    snr_db = rng.uniform(15.0, 35.0) if noise else float("inf")
    if noise:
        speech_power = float(np.mean(np.concatenate([audio[round(s * SAMPLE_RATE / ESPEAK_RATE): round(e * SAMPLE_RATE / ESPEAK_RATE)] for _, s, e in spans]) ** 2))
        sigma = np.sqrt(speech_power / 10 ** (snr_db / 10))
        audio = audio + np.random.default_rng(rng.randrange(2**32)).normal(0.0, sigma, len(audio))
    words = tuple(Word(w, s / ESPEAK_RATE, e / ESPEAK_RATE) for w, s, e in spans)
    return Utterance(uid, np.clip(audio, -1, 1).astype(np.float32), text, words, voice, speed, pitch, round(snr_db, 2))


def make_split(count: int, seed: int, split: str = "train", noise: bool = True) -> list[Utterance]:
    """``count`` utterances of the ``'train'`` or ``'test'`` split (disjoint sentences; the test
    split speaks a third of its utterances in :data:`HELD_OUT_VOICE`), deterministic in ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    utterances = []
    while len(utterances) < count:
        text = random_sentence(rng)
        if is_held_out(text) != (split == "test"):
            continue
        voice = HELD_OUT_VOICE if split == "test" and rng.random() < 1 / 3 else rng.choice(TRAIN_VOICES)
        utterances.append(synthesise(text, rng, voice, noise, uid=f"{split}-{seed}-{len(utterances):05d}"))
    return utterances


def write_split(folder: str | Path, utterances: list[Utterance]) -> Path:
    """Write ``folder/wav/<id>.wav`` (16-bit PCM), ``folder/manifest.jsonl`` (``id``, ``audio``
    relative to the folder, ``text``: what ``ctclab align --manifest`` reads) and
    ``folder/truth.jsonl`` (the true word extents). Returns the manifest's path."""
    import soundfile

    folder = Path(folder)
    for utt in utterances:
        write_atomically(folder / "wav" / f"{utt.id}.wav", lambda f, u=utt: soundfile.write(f, u.audio, SAMPLE_RATE, subtype="PCM_16", format="WAV"))
    manifest = "".join(json.dumps({"id": u.id, "audio": f"wav/{u.id}.wav", "text": u.text}) + "\n" for u in utterances)
    truth = "".join(json.dumps(u.truth()) + "\n" for u in utterances)
    write_atomically(folder / "manifest.jsonl", lambda f: f.write(manifest.encode()))
    write_atomically(folder / "truth.jsonl", lambda f: f.write(truth.encode()))
    return folder / "manifest.jsonl"


def read_split(folder: str | Path, limit: int | None = None) -> list[Utterance]:
    """The utterances :func:`write_split` wrote (audio read back from the WAV files)."""
    import soundfile

    folder = Path(folder)
    if not (folder / "truth.jsonl").is_file():
        raise FileNotFoundError(f"no speech data in {str(folder)!r} (make it with: python -m ctclab.examples.speech data)")
    utterances = []
    for line in (folder / "truth.jsonl").read_text().splitlines()[:limit]:
        t = json.loads(line)
        audio, rate = soundfile.read(folder / "wav" / f"{t['id']}.wav", dtype="float32")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{t['id']}.wav is at {rate} Hz, expected {SAMPLE_RATE}")
        words = tuple(Word(w["word"], w["start"], w["end"]) for w in t["words"])
        utterances.append(Utterance(t["id"], audio, t["text"], words, t["voice"], t["speed"], t["pitch"], t["snr_db"]))
    return utterances
