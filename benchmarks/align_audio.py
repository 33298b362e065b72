"""Audio to word timestamps: audio hours aligned per second, emissions and alignment timed
separately, and peak memory for one long recording.

The model is randomly initialised (no downloads): wav2vec2-base's feature encoder and
transformer width (7 conv layers of 512 channels, strides 5x2x2x2x2x2x2 = 320 samples per
frame, hidden size 768, 12 heads, feed-forward 3072) with ``--layers`` transformer layers
(base has 12), a 32-token character vocabulary. Its emissions are meaningless, so the
alignment's work is what an alignment of real speech costs (the trellis does not depend on the
values), not its accuracy. The corpus: utterances of 8-20 s of synthetic audio with random
transcripts at 15 characters per second (read speech).

Measured:
1. a corpus (``--corpus-minutes``): emissions (windowed, batched by ``--batch-seconds``) and
   alignment (Viterbi, posterior confidences, words) separately; the whole ``align_corpus``
   (reading audio, writing JSON) too;
2. the corpus's Viterbi alignment through torchaudio's ``forced_align`` looped over items,
   against ``ctclab.forced_align`` on the same emissions (``benchmarks/_align_worker.py``, each in
   its own process; torchaudio in its own interpreter, see align_vs_torchaudio.py); also one
   ``--ta-long-minutes`` recording;
3. one ``--long-minutes`` recording (default 60) through ``align_audio``'s steps in a fresh
   process: emission time, alignment time, and its peak resident memory (``ru_maxrss``). With
   ``--long-model narrow`` (the default) its model has the same strides, frames and vocabulary
   but 32 channels: the memory is then that of the audio, the emissions and the alignment (the
   model's share is bounded by ``--batch-seconds`` anyway), measured in minutes instead of
   the hours of a busy CPU's convolutions; ``--long-model same`` uses the corpus's model.

    python benchmarks/align_audio.py [--threads 1] [--torchaudio-python /tmp/ta-venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RATE = 16000
CHARS_PER_SECOND = 15
HERE = Path(__file__).parent
WORKER = str(HERE / "_align_worker.py")
sys.path.insert(0, str(HERE))


def build_model(folder: Path, layers: int, narrow: bool = False) -> None:
    """wav2vec2-base's widths with ``layers`` transformer layers; ``narrow``: the same strides,
    frames and vocabulary with 32 channels (the long recording's memory is then the
    alignment's, and its run time not hours of a CPU's convolutions)."""
    import transformers

    vocab = ["<pad>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'", "<s>", "</s>", "<unk>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True, return_attention_mask=False)
    widths = dict(conv_dim=(32,) * 7, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4) if narrow else {}
    config = transformers.Wav2Vec2Config(vocab_size=len(vocab), num_hidden_layers=layers, pad_token_id=0, **widths)
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(folder)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)


def synthetic(seconds: float, seed: int) -> tuple[np.ndarray, str]:
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    audio = (g.standard_normal(len(t)) * (0.2 + 0.1 * np.sin(2 * np.pi * 3 * t))).astype(np.float32) * 0.3
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    chars = int(seconds * CHARS_PER_SECOND)
    words, n = [], 0
    while n < chars:
        k = int(g.integers(2, 9))
        words.append("".join(g.choice(letters, k)))
        n += k + 1
    return audio, " ".join(words)


def make_corpus(folder: Path, minutes: float) -> Path:
    import soundfile as sf

    g = np.random.default_rng(1)
    lines, total, k = [], 0.0, 0
    while total < minutes * 60:
        seconds = float(g.uniform(8, 20))
        audio, text = synthetic(seconds, k)
        sf.write(folder / f"utt{k:04d}.wav", audio, RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio": f"utt{k:04d}.wav", "text": text}))
        total, k = total + seconds, k + 1
    manifest = folder / "corpus.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_worker(python: str, impl: str, path: str, repeats: int = 1) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run([python, WORKER, impl, path, str(repeats), out.name], check=True, env=env)
        return json.load(open(out.name))


def corpus_benchmark(args, model_dir: Path, work: Path) -> None:
    from ctclab.speech import load_acoustic_model, prepare_text, read_audio, read_manifest, windowed_log_probs
    from ctclab.speech.corpus import align_corpus, align_log_probs, align_many

    model = load_acoustic_model(model_dir, device=args.device)
    manifest = make_corpus(work, args.corpus_minutes)
    items = read_manifest(manifest)
    waves = [read_audio(i.audio, RATE) for i in items]
    hours = sum(len(w) for w in waves) / RATE / 3600
    windowed_log_probs(model, [waves[0][: RATE * 2]])  # warm-up
    t0 = time.perf_counter()
    emissions = windowed_log_probs(model, waves, batch_seconds=args.batch_seconds)
    t_emit = time.perf_counter() - t0
    prepared = [prepare_text(i.text, model.vocabulary, model.blank, model.word_delimiter) for i in items]
    align_log_probs(emissions[0], prepared[0], model.blank, model.vocabulary, model.frame_shift)  # JIT warm-up
    t0 = time.perf_counter()
    for lp, p in zip(emissions, prepared):
        align_log_probs(lp, p, model.blank, model.vocabulary, model.frame_shift)
    t_align_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    align_many(list(zip(emissions, prepared)), model.blank, model.vocabulary, model.frame_shift)
    t_align = time.perf_counter() - t0
    t0 = time.perf_counter()
    align_many(list(zip(emissions, prepared)), model.blank, model.vocabulary, model.frame_shift, confidence=False)
    t_viterbi = time.perf_counter() - t0
    t0 = time.perf_counter()
    align_corpus(model, manifest, work / "aligned", batch_seconds=args.batch_seconds)
    t_corpus = time.perf_counter() - t0
    print(f"corpus: {len(items)} utterances, {hours * 60:.1f} min of audio")
    print(f"  emissions: {t_emit:.2f} s ({hours / t_emit:.4f} h audio/s, {hours * 3600 / t_emit:.1f}x real time)")
    print(f"  alignment (Viterbi + posterior confidences + words, batched as align_corpus does): {t_align:.3f} s "
          f"({hours / t_align:.2f} h audio/s; one recording at a time {t_align_one:.3f} s); "
          f"Viterbi and words only: {t_viterbi:.3f} s ({hours / t_viterbi:.2f} h audio/s)")
    print(f"  together: {hours / (t_emit + t_align):.4f} h audio/s; align_corpus end to end (read, emit, align, write JSON): "
          f"{t_corpus:.2f} s ({hours / t_corpus:.4f} h audio/s)")

    if args.torchaudio_python:
        T = max(lp.shape[0] for lp in emissions)
        L = max(len(p.targets) for p in prepared)
        lp = torch.zeros(T, len(items), emissions[0].shape[1])
        targets = torch.ones(len(items), L, dtype=torch.long)
        for b, (e, p) in enumerate(zip(emissions, prepared)):
            lp[: e.shape[0], b] = e
            targets[b, : len(p.targets)] = torch.tensor(p.targets)
        path = str(work / "corpus.npz")
        np.savez(path, log_probs=lp.numpy(), targets=targets.numpy(),
                 input_lengths=np.array([e.shape[0] for e in emissions]), target_lengths=np.array([len(p.targets) for p in prepared]))
        compare("corpus Viterbi", args.torchaudio_python, path, hours)
        minutes = args.ta_long_minutes
        _, text = synthetic(minutes * 60, 99)  # random emissions of the model's frames: the Viterbi's work is the same
        frames = int(model.num_frames(int(minutes * 60 * RATE)))
        e = torch.randn(frames, len(model.vocabulary), generator=torch.Generator().manual_seed(0)).log_softmax(-1)
        p = prepare_text(text, model.vocabulary, model.blank, model.word_delimiter)
        np.savez(path, log_probs=e[:, None].numpy(), targets=np.array([p.targets]), input_lengths=np.array([e.shape[0]]),
                 target_lengths=np.array([len(p.targets)]))
        compare(f"one {minutes:g}-minute recording's Viterbi (random emissions, T={e.shape[0]}, S={2 * len(p.targets) + 1})",
                args.torchaudio_python, path, minutes / 60)


def compare(name: str, python: str, path: str, hours: float) -> None:
    ta = run_worker(python, "torchaudio", path)
    ours = run_worker(sys.executable, "ctclab", path)
    diff = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(ours["scores"], ta["scores"]))
    print(f"  {name}: torchaudio forced_align loop {ta['median_s']:.3f} s ({hours / ta['median_s']:.2f} h audio/s, "
          f"peak +{ta['peak_mb']:.0f} MB); ctclab.forced_align {ours['median_s']:.3f} s ({hours / ours['median_s']:.2f} h audio/s, "
          f"peak +{ours['peak_mb']:.0f} MB): {ta['median_s'] / ours['median_s']:.1f}x; max rel path-score diff {diff:.1e}")


def status_mb(key: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024


def write_long_recording(path: Path, minutes: float) -> str:
    """A ``minutes`` synthetic recording written a minute at a time (16-bit WAV); its transcript."""
    import soundfile as sf

    texts = []
    with sf.SoundFile(path, "w", RATE, 1, "PCM_16") as f:
        for k in range(int(round(minutes))):
            audio, text = synthetic(60.0, 1000 + k)
            f.write(audio)
            texts.append(text)
    return " ".join(texts)


def long_recording(model_dir: str, audio: str, device: str, batch_seconds: float) -> None:
    """In a fresh process: one recording through align_audio's steps; times and peak memory
    (the peak resident set, VmHWM, reset after the model is loaded)."""
    from ctclab.speech import load_acoustic_model, prepare_text, read_audio, windowed_log_probs
    from ctclab.speech import corpus

    text = Path(audio).with_suffix(".txt").read_text()
    model = load_acoustic_model(model_dir, device=device)
    windowed_log_probs(model, [torch.zeros(RATE)])  # warm-up
    corpus.align_log_probs(windowed_log_probs(model, [torch.zeros(RATE * 5)])[0],
                           prepare_text("A B", model.vocabulary, model.blank, "|"), model.blank, model.vocabulary, 0.02)
    base = status_mb("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # the peak resident set from here on
    t0 = time.perf_counter()
    wave = read_audio(audio, RATE)
    lp = windowed_log_probs(model, [wave], batch_seconds=batch_seconds)[0]
    t_emit = time.perf_counter() - t0
    after_emit = status_mb("VmHWM:")
    prepared = prepare_text(text, model.vocabulary, model.blank, model.word_delimiter)
    calls = {}

    def timed(name, function):
        def run(*a, **k):
            t = time.perf_counter()
            out = function(*a, **k)
            calls[name] = calls.get(name, 0.0) + time.perf_counter() - t
            return out
        return run

    corpus.forced_align = timed("viterbi", corpus.forced_align)
    corpus.alignment_posteriors = timed("posteriors", corpus.alignment_posteriors)
    t0 = time.perf_counter()
    words, _ = corpus.align_log_probs(lp, prepared, model.blank, model.vocabulary, model.frame_shift)
    t_align = time.perf_counter() - t0
    peak = status_mb("VmHWM:")
    hours = len(wave) / RATE / 3600
    print(f"one {hours * 60:.0f}-minute recording (T={lp.shape[0]} frames, {len(prepared.targets)} target tokens, "
          f"{len(words)} words): emissions {t_emit:.1f} s ({hours / t_emit:.4f} h audio/s), alignment {t_align:.1f} s "
          f"({hours / t_align:.4f} h audio/s: Viterbi {calls.get('viterbi', 0):.1f} s, posteriors {calls.get('posteriors', 0):.1f} s); "
          f"peak RSS {peak:.0f} MB ({peak - base:+.0f} MB over the {base:.0f} MB of the loaded model and libraries; "
          f"{after_emit - base:+.0f} MB after reading the audio and the emissions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (wav2vec2-base: 12)")
    parser.add_argument("--corpus-minutes", type=float, default=10.0)
    parser.add_argument("--long-minutes", type=float, default=60.0, help="the long recording (0: skip)")
    parser.add_argument("--long-model", choices=["narrow", "same"], default="narrow", help="the long recording's model")
    parser.add_argument("--ta-long-minutes", type=float, default=10.0, help="the long recording torchaudio aligns")
    parser.add_argument("--batch-seconds", type=float, default=120.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all)")
    parser.add_argument("--torchaudio-python", help="an interpreter with torchaudio (e.g. /tmp/ta-venv/bin/python)")
    parser.add_argument("--no-corpus", action="store_true", help="only the long recording")
    parser.add_argument("--long-only", nargs=2, metavar=("MODEL_DIR", "AUDIO"), help=argparse.SUPPRESS)  # step 3's process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.long_only:
        long_recording(*args.long_only, args.device, args.batch_seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model_dir.mkdir()
        build_model(model_dir, args.layers)
        print(f"model: wav2vec2-base widths, {args.layers} transformer layers, random weights; device {args.device}; "
              f"torch threads {torch.get_num_threads()}")
        if not args.no_corpus:
            corpus_benchmark(args, model_dir, work)
        if args.long_minutes > 0:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", **({"NUMBA_NUM_THREADS": str(args.threads)} if args.threads else {}))
            audio = work / "long.wav"
            audio.with_suffix(".txt").write_text(write_long_recording(audio, args.long_minutes))
            if args.long_model == "narrow":
                model_dir = work / "narrow"
                model_dir.mkdir()
                build_model(model_dir, 2, narrow=True)
            print(f"long recording's model: {'32 channels, 2 layers, wav2vec2-base strides' if args.long_model == 'narrow' else 'the same'}",
                  flush=True)
            subprocess.run([sys.executable, __file__, "--long-only", str(model_dir), str(audio),
                            "--device", args.device, "--batch-seconds", str(args.batch_seconds)]
                           + (["--threads", str(args.threads)] if args.threads else []), check=True, env=env)


if __name__ == "__main__":
    main()
