"""ctclab.speech and ``ctclab align --model``: from audio files and transcripts to word timestamps.

No downloads: a tiny randomly initialised Wav2Vec2ForCTC and its processor are built from a
config and saved to a temporary folder; a small convolutional model (limited receptive field)
is saved as a ctclab model folder; the audio is made here with numpy and soundfile.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
transformers = pytest.importorskip("transformers")

from ctclab import STAR  # noqa: E402
from ctclab.speech import (AudioError, align_audio, load_acoustic_model, prepare_text, read_audio,  # noqa: E402
                           read_manifest, save_acoustic_model, shard_of, windowed_log_probs)
from ctclab.speech._extras import need  # noqa: E402
from ctclab.speech.windows import normalize  # noqa: E402
from test_cli import run  # noqa: E402  (ctclab's argv -> (status, stdout, stderr), failures in one line)

RATE = 16000
LETTERS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
SRC = str(Path(__file__).parents[1] / "src")


#: a user's own model code, importable from its folder: the factory of a ctclab model folder
TINY_CONV = """
from torch import nn


class TinyConv(nn.Module):
    \"\"\"Two valid convolutions (receptive field 45 samples, 80 samples per frame) and a linear head.\"\"\"

    def __init__(self, classes=29, channels=16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, channels, 10, 5), nn.ReLU(), nn.Conv1d(channels, channels, 8, 16), nn.ReLU())
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.net(x[:, None]).transpose(1, 2))
"""


@pytest.fixture(scope="session")
def conv_code(tmp_path_factory):
    """The folder holding ``tiny_conv.py`` (on sys.path here; on PYTHONPATH for subprocesses)."""
    folder = tmp_path_factory.mktemp("code")
    (folder / "tiny_conv.py").write_text(TINY_CONV)
    sys.path.insert(0, str(folder))
    return folder


@pytest.fixture(scope="session")
def TinyConv(conv_code):
    import tiny_conv

    return tiny_conv.TinyConv


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny Wav2Vec2ForCTC (hidden size 32, 2 layers, strides 5x4x4 = 80 samples per frame)."""
    folder = tmp_path_factory.mktemp("hf")
    vocab = ["<pad>", "|", *LETTERS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                                  word_delimiter_token="|")
    extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, padding_value=0.0,
                                                      do_normalize=True, return_attention_mask=False)
    config = transformers.Wav2Vec2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, pad_token_id=0, feat_extract_norm="group",
    )
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(folder)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def conv_dir(tmp_path_factory, TinyConv):
    folder = tmp_path_factory.mktemp("conv")
    torch.manual_seed(1)
    save_acoustic_model(folder, TinyConv(), factory="tiny_conv:TinyConv", config={"classes": 29},
                        vocabulary=["<blank>", "|", *LETTERS], blank=0, sample_rate=RATE)
    return folder


@pytest.fixture(scope="session")
def hf(hf_dir):
    return load_acoustic_model(hf_dir, device="cpu")


def speechlike(seconds: float, rate: int = RATE, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Noise bursts with pauses, amplitude-modulated: something for the model to chew on."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = (np.sin(2 * np.pi * 2.5 * t) > -0.3) * (0.3 + 0.2 * np.sin(2 * np.pi * 0.7 * t))
    mono = (g.standard_normal(len(t)) * envelope + 0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32) * 0.3
    return mono if channels == 1 else np.stack([mono] * channels, 1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A manifest (relative paths) with good items, a 44.1 kHz stereo FLAC, a missing file, a
    corrupt file and an impossible transcript (too long for its audio)."""
    root = tmp_path_factory.mktemp("corpus")
    audio = root / "audio"
    audio.mkdir()
    sf.write(audio / "one.wav", speechlike(2.0, seed=1), RATE)
    sf.write(audio / "two.wav", speechlike(3.0, seed=2), RATE)
    sf.write(audio / "stereo.flac", speechlike(2.5, 44100, channels=2, seed=3), 44100)
    sf.write(audio / "short.wav", speechlike(0.2, seed=4), RATE)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    entries = [
        {"audio": "audio/one.wav", "text": "Hello, world!"},
        {"audio_filepath": "audio/two.wav", "text": "It cost 44.1 dollars; fine."},
        {"audio": "audio/stereo.flac", "text": "stereo sound", "id": "stereo"},
        {"audio": "audio/missing.wav", "text": "nothing here"},
        {"audio": "audio/corrupt.wav", "text": "broken file"},
        {"audio": "audio/short.wav", "text": "far too many words for a fifth of a second of audio"},
    ]
    manifest = root / "corpus.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return manifest


GOOD = {"one", "two", "stereo"}
BAD = {"missing", "corrupt", "short"}


def check_document(doc, text):
    assert set(doc) >= {"id", "audio", "duration", "text", "words", "tokens"}
    assert doc["text"] == text
    assert [w["word"] for w in doc["words"]] == text.split()  # the transcript's own words
    times = [t for w in doc["words"] for t in (w["start"], w["end"])]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= doc["duration"]
    for w in doc["words"]:
        assert w["start"] < w["end"]
        assert 0 <= w["score"] <= 1 and 0 <= w["confidence"] <= 1 + 1e-9
    token_times = [t for k in doc["tokens"] for t in (k["start"], k["end"])]
    assert token_times == sorted(token_times) and token_times[-1] <= doc["duration"]


# -- models ---------------------------------------------------------------------------------------
def test_hugging_face_folder_knows_its_vocabulary_blank_rate_and_frame_shift(hf, hf_dir):
    assert hf.vocabulary.tokens[:3] == ("<pad>", "|", "A") and len(hf.vocabulary) == 32  # + <s> </s> <unk>
    assert hf.blank == 0 and hf.sample_rate == RATE and hf.word_delimiter == "|" and hf.normalize
    assert hf.samples_per_frame == 80 and hf.frame_shift == 80 / RATE  # from the strides, not 0.02
    x = torch.randn(2, 8000)
    lp, frames = hf.log_probs(x)
    assert lp.shape == (2, frames[0], 32) and int(frames[0]) == int(hf.module._get_feat_extract_output_lengths(8000))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(()), atol=1e-5)


def test_ctclab_model_folder_round_trip_and_measured_frame_shift(conv_dir, TinyConv):
    model = load_acoustic_model(conv_dir, device="cpu")
    meta = json.loads((conv_dir / "ctclab_acoustic_model.json").read_text())
    assert meta["format"] == 1 and meta["factory"] == "tiny_conv:TinyConv" and meta["weights"] == "model.pt"
    assert model.samples_per_frame == 80 and model.blank == 0 and model.word_delimiter == "|"
    torch.manual_seed(1)
    reference = TinyConv()  # the same seed: the saved weights
    x = torch.randn(1, 4000)
    assert torch.allclose(model.log_probs(x)[0], reference(x).log_softmax(-1), atol=1e-6)


def test_live_module_needs_vocabulary_and_sample_rate(TinyConv):
    with pytest.raises(ValueError, match="sample_rate"):
        load_acoustic_model(TinyConv(), device="cpu", vocabulary=["<b>", "|", *LETTERS])
    with pytest.raises(ValueError, match="vocabulary"):
        load_acoustic_model(TinyConv(), device="cpu", sample_rate=RATE)
    with pytest.raises(ValueError, match="29 output classes but the vocabulary 3"):
        load_acoustic_model(TinyConv(), device="cpu", vocabulary=["<b>", "a", "b"], sample_rate=RATE)
    model = load_acoustic_model(TinyConv(), device="cpu", vocabulary=["<b>", "|", *LETTERS], sample_rate=RATE)
    assert model.samples_per_frame == 80


def test_not_a_model_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        load_acoustic_model(tmp_path / "nope", device="cpu")
    with pytest.raises(ValueError, match="neither config.json"):
        load_acoustic_model(tmp_path, device="cpu")


def test_missing_extra_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install 'ctclab\[speech\]'"):
        need("ctclab_no_such_module")


# -- audio ----------------------------------------------------------------------------------------
def test_read_audio_mixes_down_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    left, right = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t) * 0.5
    sf.write(tmp_path / "s.flac", np.stack([left, right], 1).astype(np.float32) * 0.5, 44100)
    x = read_audio(tmp_path / "s.flac", RATE)
    assert x.dtype == torch.float32 and x.dim() == 1 and abs(len(x) - RATE) <= 2
    expected = 0.375 * np.sin(2 * np.pi * 440 * np.arange(len(x)) / RATE)  # the mean of the channels
    assert np.abs(x.numpy()[200:-200] - expected[200:-200]).max() < 5e-3


def test_unreadable_audio_names_the_file(tmp_path):
    with pytest.raises(AudioError, match="missing.wav.*no such file"):
        read_audio(tmp_path / "missing.wav", RATE)
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="bad.wav.*not a sound file"):
        read_audio(tmp_path / "bad.wav", RATE)


# -- windows --------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_seconds", [0.5, 100.0])
def test_windowed_emissions_equal_a_full_pass_for_a_limited_receptive_field(conv_dir, batch_seconds):
    model = load_acoustic_model(conv_dir, device="cpu")
    waves = [torch.from_numpy(speechlike(s, seed=k)) for k, s in enumerate((7.3, 0.6, 4.01))]
    windowed = windowed_log_probs(model, waves, window=1.0, context=0.25, batch_seconds=batch_seconds)
    for w, lp in zip(waves, windowed):
        full = model.log_probs(w[None])[0][0]
        assert lp.shape == full.shape
        torch.testing.assert_close(lp, full, atol=1e-5, rtol=1e-5)


def test_windowed_wav2vec2_has_the_full_pass_frames(hf):
    wave = torch.from_numpy(speechlike(9.1))
    windowed = windowed_log_probs(hf, [wave, wave[:5000]], window=2.0, context=0.5, batch_seconds=5)
    full = hf.log_probs(normalize(wave)[None])[0][0]
    assert windowed[0].shape == full.shape == (int(hf.num_frames(len(wave))), 32)
    assert windowed[1].shape[0] == int(hf.num_frames(5000))
    # the first window's frames away from its right edge saw what the full pass saw locally
    assert torch.isfinite(windowed[0]).all()


# -- text -----------------------------------------------------------------------------------------
def test_prepare_text_keeps_words_drops_unknown_characters_and_stars_the_unalignable(hf):
    p = prepare_text("Hello, world! 44.1 don't ｆｕｌｌ", hf.vocabulary, hf.blank, hf.word_delimiter, star_ends=True)
    assert [w.text for w in p.words] == ["Hello,", "world!", "44.1", "don't", "ｆｕｌｌ"]
    v = hf.vocabulary.index
    assert p.words[0].tokens == tuple(v(c) for c in "HELLO")  # upper case: the vocabulary's
    assert p.words[2].tokens == (STAR,) and p.words[2].wildcard
    assert p.words[3].tokens == tuple(v(c) for c in "DON'T") and p.words[4].tokens == tuple(v(c) for c in "FULL")  # NFKC
    assert p.targets[0] == p.targets[-1] == STAR and p.targets.count(v("|")) == 4
    assert len(p.targets) == len(p.word_index) and p.word_index[1] == 0 and p.word_index[-1] == -1
    with pytest.raises(ValueError, match="empty"):
        prepare_text("   ", hf.vocabulary)


def test_align_audio_returns_the_transcripts_words_with_times(hf, tmp_path):
    sf.write(tmp_path / "x.wav", speechlike(3.0), RATE)
    text = "Hello, world! It's 44.1 кошка."
    result = align_audio(hf, tmp_path / "x.wav", text)
    doc = result.to_json()
    check_document(doc, text)
    assert doc["id"] == "x" and doc["duration"] == 3.0
    assert len(result.tokens) == len(prepare_text(text, hf.vocabulary, 0, "|").targets)
    star = align_audio(hf, tmp_path / "x.wav", "Hello world", star=2.0)
    assert star.tokens[0].token == STAR and star.tokens[-1].token == STAR


# -- the command: one file ------------------------------------------------------------------------
def test_single_file_command(hf_dir, corpus, tmp_path, capsys):
    wav = corpus.parent / "audio" / "two.wav"
    status, out, _ = run(["align", "--model", hf_dir, wav, "--text", "It cost 44.1 dollars; fine."], capsys)
    assert status == 0
    check_document(json.loads(out), "It cost 44.1 dollars; fine.")
    status, out, _ = run(["align", "--model", hf_dir, wav, "--text", "It cost 44.1 dollars; fine.", "--format", "ctm"], capsys)
    assert status == 0 and [line.split()[4] for line in out.splitlines()] == ["It", "cost", "44.1", "dollars;", "fine."]
    status, out, _ = run(["align", "--model", hf_dir, wav, "--text", "It cost", "--no-confidence"], capsys)
    assert status == 0 and [w["confidence"] for w in json.loads(out)["words"]] == [None, None]
    pytest.importorskip("matplotlib")
    status, _, _ = run(["align", "--model", hf_dir, wav, "--text", "It cost", "--format", "textgrid",
                        "--out", tmp_path / "g.TextGrid", "--plot", tmp_path / "p.png"], capsys)
    assert status == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert '"It"' in (tmp_path / "g.TextGrid").read_text()


def test_single_file_that_cannot_be_aligned_is_a_data_error(hf_dir, corpus, capsys):
    status, _, err = run(["align", "--model", hf_dir, corpus.parent / "audio" / "short.wav", "--text", "word " * 20], capsys)
    assert status == 1 and "needs at least" in err
    status, _, err = run(["align", "--model", hf_dir, corpus.parent / "audio" / "corrupt.wav", "--text", "a"], capsys)
    assert status == 1 and "corrupt.wav" in err


@pytest.mark.parametrize("extra, message", [
    ([], "--text"),
    (["--text", "x", "--resume"], "--resume"),
    (["--text", "x", "--shard", "2/2"], "--shard"),
    (["--text", "x", "--lengths", "3"], "--lengths"),
    (["--text", "x", "--format", "json,ctm"], "--out-dir"),
    (["--text", "x", "--format", "xml"], "--format"),
])
def test_bad_usage_is_one_line_and_status_2(hf_dir, corpus, capsys, extra, message):
    status, _, err = run(["align", "--model", hf_dir, corpus.parent / "audio" / "one.wav", *extra], capsys)
    assert status == 2 and message in err


def test_bad_corpus_usage_is_one_line_and_status_2(hf_dir, corpus, tmp_path, capsys, monkeypatch):
    base = ["align", "--model", hf_dir, "--manifest", corpus]
    assert "--out-dir" in run(base, capsys)[2]
    assert run(base + ["--out-dir", tmp_path, "--text", "x"], capsys)[0] == 2
    assert run(["align", "--model", tmp_path / "none", "--manifest", corpus, "--out-dir", tmp_path], capsys)[0] == 2
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, _, err = run(base + ["--out-dir", tmp_path], capsys)
    assert status == 2 and "RANK" in err


# -- the command: corpora -------------------------------------------------------------------------
def outputs(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if not p.name.startswith(".")}


def test_manifest_outputs_failures_and_resume(hf_dir, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the manifest's folder, not here
    out = tmp_path / "aligned"
    argv = ["align", "--model", hf_dir, "--manifest", corpus, "--out-dir", out, "--format", "json,textgrid",
            "--batch-seconds", "4"]
    status, _, err = run(argv, capsys)
    assert status == 1 and "3 of 6 items" in err and "failures.jsonl" in err
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {f["id"]: f["reason"] for f in failures}
    assert set(reasons) == BAD
    assert "no such file" in reasons["missing"] and "not a sound file" in reasons["corrupt"]
    assert "needs at least" in reasons["short"]
    texts = {item.id: item.text for item in read_manifest(corpus)}
    for id in GOOD:
        doc = json.loads((out / f"{id}.json").read_text())
        check_document(doc, texts[id])
        assert doc["id"] == id and Path(doc["audio"]).exists()
        assert (out / f"{id}.TextGrid").read_text().startswith('File type = "ooTextFile"')
    assert abs(json.loads((out / "stereo.json").read_text())["duration"] - 2.5) < 1e-3  # 44.1 kHz stereo
    assert {p for p in outputs(out)} == {f"{i}.{e}" for i in GOOD for e in ("json", "TextGrid")} | {"failures.jsonl"}

    before = outputs(out)
    status, _, _ = run(argv + ["--resume"], capsys)
    assert status == 1  # the failures are tried again, and fail again
    after = outputs(out)
    assert {k: v for k, v in after.items() if k != "failures.jsonl"} == {k: v for k, v in before.items() if k != "failures.jsonl"}
    assert {json.loads(line)["id"] for line in (out / "failures.jsonl").read_text().splitlines()} == BAD


def test_two_shards_cover_the_manifest_once_and_rank_world_size_shard_alike(hf_dir, corpus, tmp_path, capsys, monkeypatch):
    items = read_manifest(corpus)
    shares = [shard_of(items, (i, 2)) for i in range(2)]
    assert sorted(i.id for s in shares for i in s) == sorted(i.id for i in items)
    good = corpus.parent / "good.jsonl"
    good.write_text("".join(line + "\n" for line in corpus.read_text().splitlines()[:3]))
    written = []
    for i in range(2):
        status, _, _ = run(["align", "--model", hf_dir, "--manifest", good, "--out-dir", tmp_path / f"s{i}", "--shard", f"{i}/2"], capsys)
        assert status == 0
        written.append({p.stem for p in (tmp_path / f"s{i}").glob("*.json")})
    assert not written[0] & written[1] and written[0] | written[1] == GOOD
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(["align", "--model", hf_dir, "--manifest", good, "--out-dir", tmp_path / "env"], capsys)[0] == 0
    assert {p.stem for p in (tmp_path / "env").glob("*.json")} == written[1]


def test_interrupted_run_leaves_no_partial_files_and_resumes(conv_dir, conv_code, corpus, tmp_path):
    manifest = tmp_path / "many.jsonl"
    audio = corpus.parent / "audio"
    manifest.write_text("".join(json.dumps({"audio": str(audio / "one.wav"), "text": "hello world", "id": f"item{k}"}) + "\n"
                                for k in range(6)))
    out = tmp_path / "out"
    path = os.pathsep.join([SRC, str(conv_code), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, CTCLAB_TEST_ITEM_DELAY="1")
    argv = [sys.executable, "-m", "ctclab", "align", "--model", str(conv_dir), "--manifest", str(manifest), "--out-dir", str(out),
            "--batch-seconds", "100"]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # a loaded machine can take a minute to start Python and torch
    while not list(out.glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("*.json"))
    assert 1 <= len(done) < 6, "the run was to be killed mid-corpus"
    for path in done:
        check_document(json.loads(path.read_text()), "hello world")  # complete, never partial
    first = outputs(out)
    env.pop("CTCLAB_TEST_ITEM_DELAY")
    assert subprocess.run(argv + ["--resume"], env=env, capture_output=True).returncode == 0
    final = outputs(out)
    assert {p for p in final if p.endswith(".json")} == {f"item{k}.json" for k in range(6)}
    assert all(final[name] == first[name] for name in first if name.endswith(".json"))  # not rewritten
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_plot_dir_draws_one_picture_per_item(hf_dir, corpus, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    good = tmp_path / "two.jsonl"
    good.write_text("".join(json.dumps({"audio": str(corpus.parent / "audio" / f"{n}.wav"), "text": "some words here"}) + "\n"
                            for n in ("one", "two")))
    status, _, _ = run(["align", "--model", hf_dir, "--manifest", good, "--out-dir", tmp_path / "o", "--plot-dir", tmp_path / "p"], capsys)
    assert status == 0 and sorted(p.name for p in (tmp_path / "p").iterdir()) == ["one.png", "two.png"]


def test_long_recordings_posteriors_in_segments_match_the_whole_trellis(monkeypatch):
    from ctclab import alignment_posteriors, forced_align
    from ctclab.speech import corpus as corpus_module

    g = torch.Generator().manual_seed(0)
    L, T, C = 120, 900, 12
    targets = torch.randint(1, C, (L,), generator=g)
    targets[1::2] = torch.where(targets[1::2] == targets[:-1:2], targets[1::2] % (C - 1) + 1, targets[1::2])
    # emissions peaked on a path through the targets, with noise: a confident model
    frames = torch.sort(torch.randperm(T - 2, generator=g)[:L] + 1).values
    truth = torch.zeros(T, dtype=torch.long)
    for i, f in enumerate(frames.tolist()):
        truth[f] = targets[i]
    logits = torch.randn(T, C, generator=g) + 6 * torch.nn.functional.one_hot(truth, C)
    lp = logits.log_softmax(-1)
    ali = forced_align(lp, targets)
    whole = alignment_posteriors(lp, targets, ali)
    monkeypatch.setattr(corpus_module, "POSTERIOR_SEGMENT_FRAMES", 10**9)
    torch.testing.assert_close(corpus_module._segment_posteriors(lp, targets, ali, None), whole.double())  # one segment
    monkeypatch.setattr(corpus_module, "POSTERIOR_SEGMENT_FRAMES", 100)
    parts = corpus_module._segment_posteriors(lp, targets, ali, None)
    assert parts.shape == whole.shape and bool(((parts >= 0) & (parts <= 1 + 1e-9)).all())
    assert float((parts - whole.double()).abs().mean()) < 0.02


def test_readme_example_runs(hf_dir, tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_acoustic_model" in b)
    sf.write(tmp_path / "speech.wav", speechlike(4.0), RATE)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(block.replace("models/wav2vec2-base-960h", str(hf_dir)), namespace)
    assert [w.text for w in namespace["result"].words] == ["Hello,", "world!", "It", "costs", "44.1", "dollars."]
    assert namespace["document"]["words"][4]["word"] == "44.1"


@pytest.mark.slow
def test_torchrun_splits_a_corpus_across_processes(conv_dir, conv_code, corpus, tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("three Python processes: run with -m slow (the RANK/WORLD_SIZE test covers the sharding)")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this interpreter")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(corpus.parent / "audio" / "one.wav"), "text": "hello world",
                                            "id": f"x{k}"}) + "\n" for k in range(5)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(conv_code), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "ctclab", "align", "--model", str(conv_dir),
                           "--manifest", str(manifest), "--out-dir", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == [f"x{k}.json" for k in range(5)]


def test_romanize_without_uroman_says_how_to_install(hf):
    try:
        import uroman  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install uroman"):
            prepare_text("кошка", hf.vocabulary, hf.blank, romanize=True)
    else:  # romanised: aligned as letters, not as a wildcard
        assert not prepare_text("кошка", hf.vocabulary, hf.blank, romanize=True).words[0].wildcard
    assert prepare_text("кошка", hf.vocabulary, hf.blank).words[0].wildcard  # without romanize: a wildcard


def test_batched_alignment_equals_one_recording_at_a_time(hf):
    from ctclab.speech.corpus import AlignmentError, align_many

    waves = [torch.from_numpy(speechlike(s, seed=k)) for k, s in enumerate((2.0, 3.5, 1.2, 0.1))]
    texts = ["Hello, world!", "one two three 44.1 four", "short", "too many words for a tenth of a second"]
    items = [(lp, prepare_text(t, hf.vocabulary, hf.blank, hf.word_delimiter)) for lp, t in zip(windowed_log_probs(hf, waves), texts)]
    together = align_many(items, hf.blank, hf.vocabulary, hf.frame_shift)
    assert isinstance(together[3], AlignmentError) and "needs at least" in str(together[3])
    for item, batched in zip(items[:3], together[:3]):
        (alone,) = align_many([item], hf.blank, hf.vocabulary, hf.frame_shift)
        assert [(w.text, w.start, w.end) for w in batched[0]] == [(w.text, w.start, w.end) for w in alone[0]]
        assert [(t.token, t.start, t.end) for t in batched[1]] == [(t.token, t.start, t.end) for t in alone[1]]
        for a, b in zip(batched[0], alone[0]):
            assert a.score == pytest.approx(b.score, rel=1e-5) and a.confidence == pytest.approx(b.confidence, rel=1e-5, abs=1e-9)


def test_trim_word_ends_cuts_the_silence_a_word_held_and_nothing_else():
    from ctclab.speech import trim_word_ends

    rate = 16000
    t = np.arange(rate) / rate
    audio = np.zeros(rate, np.float32)
    audio[1600:6400] = 0.5 * np.sin(2 * np.pi * 220 * t[1600:6400])  # a "word" from 0.1 to 0.4 s
    audio[9600:12800] = 0.1 * np.sin(2 * np.pi * 330 * t[9600:12800])  # a quieter one, 0.6-0.8 s
    audio += 1e-4 * np.random.default_rng(0).standard_normal(rate).astype(np.float32)  # a noise floor
    # the first aligned word held on to the pause up to 0.6 s; the second ends where it should
    (s1, e1), (s2, e2) = trim_word_ends([(0.08, 0.6), (0.6, 0.8)], torch.from_numpy(audio), rate)
    assert (s1, s2) == (0.08, 0.6)  # starts are kept
    assert e1 == pytest.approx(0.4, abs=0.006)  # cut back to the tone's end
    assert e2 == pytest.approx(0.8, abs=1e-9)  # nothing to cut: the word is loud to its end
    # a word of silence only is left as it is; an end never moves later
    assert trim_word_ends([(0.9, 0.95)], audio, rate)[0][1] <= 0.95
    for bad in ({"drop_db": 0}, {"hop_seconds": -1.0}, {"drop_db": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            trim_word_ends([(0.0, 0.1)], audio, rate, **bad)
    with pytest.raises(ValueError, match="NaN"):
        trim_word_ends([(0.0, 0.1)], np.full(100, np.nan), rate)
    with pytest.raises(ValueError, match="mono"):
        trim_word_ends([(0.0, 0.1)], np.zeros((2, 100)), rate)
