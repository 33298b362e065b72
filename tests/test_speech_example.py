"""The speech testbed in small: the generator's truth, a loss that decreases, the model folder
through the audio pipeline, and data -> train -> eval -> compare end to end."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

if shutil.which("espeak-ng") is None:
    pytest.skip("the speech testbed needs espeak-ng (apt-get install espeak-ng)", allow_module_level=True)
pytest.importorskip("soxr")
pytest.importorskip("soundfile")

from ctclab.examples.speech.__main__ import main  # noqa: E402
from ctclab.examples.speech.data import (HELD_OUT_VOICE, SAMPLE_RATE, TRIM_DB, is_held_out, make_split,  # noqa: E402
                                         read_split, write_split)
from ctclab.examples.speech.evaluate import states_of_labels, word_frames_from_states  # noqa: E402
from ctclab.examples.speech.model import VOCABULARY, build  # noqa: E402
from ctclab.examples.speech.train import decode_text, encode, load_checkpoint, train  # noqa: E402

TINY = dict(channels=32, hidden=32)


def frame_rms(x: np.ndarray, frame: int = SAMPLE_RATE // 200) -> np.ndarray:
    n = len(x) // frame
    return np.sqrt((x[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(1))


def test_extents_hold_the_words_energy_and_the_gaps_are_silent():
    for u in make_split(12, seed=4, split="train", noise=False) + make_split(4, seed=4, split="test", noise=False):
        x = u.audio.astype(np.float64)
        inside = np.zeros(len(x), dtype=bool)
        starts = []
        for w in u.words:
            a, b = round(w.start * SAMPLE_RATE), round(w.end * SAMPLE_RATE)
            assert 0 < a < b < len(x)
            inside[a:b] = True
            starts.append(a)
            word = x[a:b]
            # tight: audible at both ends (the trimmed 5 ms frames' RMS is within TRIM_DB of the
            # loudest frame's; 8 ms at the ends cover such a frame after resampling)
            level = frame_rms(word).max() * 10 ** (-(TRIM_DB + 3) / 20)
            edge = SAMPLE_RATE * 8 // 1000
            assert np.abs(word[:edge]).max() >= level and np.abs(word[-edge:]).max() >= level, (u.text, w)
        assert starts == sorted(starts) and [w.text for w in u.words] == u.text.split()
        assert all(p.end <= n.start for p, n in zip(u.words, u.words[1:])), "extents overlap"
        energy = x ** 2
        assert energy[inside].sum() >= 0.999 * energy.sum(), u.text
        # gaps (and the ends) are silent: nothing louder than the trimmed level (resampling rings a little)
        assert np.abs(x[~inside]).max() <= 0.05 * np.abs(x).max(), u.text


def test_generator_is_deterministic_and_the_test_split_is_held_out():
    a, b = make_split(3, seed=7), make_split(3, seed=7)
    assert [u.text for u in a] == [u.text for u in b] and [u.words for u in a] == [u.words for u in b]
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b))
    c = make_split(3, seed=8)
    assert not all(np.array_equal(x.audio[:1000], y.audio[:1000]) for x, y in zip(a, c))
    train_split, test_split = make_split(60, seed=0), make_split(30, seed=1, split="test")
    assert not {u.text for u in train_split} & {u.text for u in test_split}
    assert all(not is_held_out(u.text) for u in train_split) and all(is_held_out(u.text) for u in test_split)
    assert HELD_OUT_VOICE not in {u.voice for u in train_split} and HELD_OUT_VOICE in {u.voice for u in test_split}
    noisy = make_split(2, seed=3)
    assert all(np.isfinite(u.snr_db) and 15 <= u.snr_db <= 35 for u in noisy)


def test_written_split_reads_back(tmp_path):
    utterances = make_split(3, seed=2)
    manifest = write_split(tmp_path, utterances)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [(d["id"], d["text"]) for d in lines] == [(u.id, u.text) for u in utterances]
    back = read_split(tmp_path)
    assert [u.words for u in back] == [u.words for u in utterances]
    assert all(np.abs(x.audio - y.audio).max() <= 1 / 32768 for x, y in zip(back, utterances))  # 16-bit PCM


def test_encode_and_decode_are_inverse():
    ids = encode("the  red cat")
    assert "".join(VOCABULARY[i] for i in ids) == "the|red|cat"
    assert decode_text(ids) == "the red cat"


def test_model_maps_waveforms_to_frames_of_its_shift():
    model = build(**TINY).eval()
    for n in (16000, 16159, 16320, 33333):
        logits = model(torch.randn(2, n))
        assert logits.shape == (2, model.frames(n), len(VOCABULARY))
    assert model.samples_per_frame == 320


def test_loss_decreases_in_a_tiny_run(tmp_path):
    write_split(tmp_path / "train", make_split(40, seed=0))
    history = train(tmp_path, max_steps=20, batch_size=8, val_utterances=2, eval_every=1e9, out=tmp_path / "run",
                    model_config=TINY, progress=False)
    losses = [v for _, _, v in history["steps"]]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.7 * losses[0]


def test_init_from_starts_from_the_runs_weights(tmp_path):
    write_split(tmp_path / "train", make_split(8, seed=0))
    small = dict(batch_size=4, val_utterances=1, eval_every=1e9, progress=False)
    train(tmp_path, max_steps=2, out=tmp_path / "a", model_config=TINY, **small)
    start, _ = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    # lr 0: the fine-tuned run's parameters are its starting ones, not a fresh model's (the
    # batch norms' running statistics move with every training forward, so parameters only)
    train(tmp_path, max_steps=1, lr=0.0, out=tmp_path / "b", init_from=tmp_path / "a", seed=0, **small)
    tuned, state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    fresh = build(**TINY)  # trained two steps, "a" is not where a model starts
    assert state["model_config"] == TINY and state["config"]["init_from"] == str(tmp_path / "a")
    start_parameters = dict(start.named_parameters())
    for name, value in tuned.named_parameters():
        torch.testing.assert_close(value, start_parameters[name], rtol=0, atol=0)
    assert any(not torch.equal(v, start_parameters[n]) for n, v in fresh.named_parameters())
    # it trains from there: a step at the default lr moves the weights
    train(tmp_path, max_steps=1, out=tmp_path / "d", init_from=tmp_path / "a" / "checkpoint.pt", **small)
    moved, _ = load_checkpoint(tmp_path / "d" / "checkpoint.pt")
    assert any(not torch.equal(v, start_parameters[n]) for n, v in moved.named_parameters())
    with pytest.raises(ValueError, match="model_config"):
        train(tmp_path, max_steps=1, out=tmp_path / "e", init_from=tmp_path / "a", model_config={}, **small)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(tmp_path, max_steps=1, out=tmp_path / "e", init_from=tmp_path / "missing", **small)


def test_model_folder_loads_through_the_audio_pipeline(tmp_path):
    speech = pytest.importorskip("ctclab.speech")
    write_split(tmp_path / "train", make_split(8, seed=0))
    train(tmp_path, max_steps=2, batch_size=4, val_utterances=1, eval_every=1e9, out=tmp_path / "run",
          model_config=TINY, progress=False)
    loaded = speech.load_acoustic_model(tmp_path / "run" / "model", device="cpu")
    assert list(loaded.vocabulary.tokens) == list(VOCABULARY) and loaded.blank == 0
    assert loaded.sample_rate == SAMPLE_RATE and loaded.frame_shift == pytest.approx(0.02)
    assert loaded.word_delimiter == "|"
    u = make_split(1, seed=9, split="test")[0]
    emissions = loaded.emissions(torch.from_numpy(u.audio))
    with torch.no_grad():
        own = loaded.module(torch.from_numpy(u.audio)[None]).log_softmax(-1)[0]
    assert emissions.shape == own.shape
    torch.testing.assert_close(emissions, own, atol=1e-4, rtol=1e-4)
    result = speech.align_audio(loaded, torch.from_numpy(u.audio), u.text)
    assert [w.text for w in result.words] == u.text.split()


def test_state_path_is_recovered_from_frame_labels():
    import ctclab

    g = torch.Generator().manual_seed(0)
    targets = (3, 3, 1, 5, 7, 7, 7, 1, 2)
    word_index = (0, 0, -1, 1, 1, 1, 1, -1, 2)
    lp = torch.randn(40, len(VOCABULARY), generator=g).log_softmax(-1)
    ali = ctclab.forced_align(lp, torch.tensor(targets))
    assert states_of_labels(ali.labels.tolist(), targets, 0) == ali.states.tolist()
    words = word_frames_from_states(ali.states.tolist(), word_index, 3)
    spans = ctclab.token_spans(ali)[0]
    assert words == [(spans[0].start, spans[1].end), (spans[3].start, spans[6].end), (spans[8].start, spans[8].end)]


def test_data_train_eval_compare_end_to_end(tmp_path, capsys):
    pytest.importorskip("ctclab.speech")
    pytest.importorskip("matplotlib")
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "eval"
    assert main(["data", "--out", str(data), "--train", "12", "--test", "4"]) == 0
    assert main(["train", "--data", str(data), "--steps", "2", "--batch-size", "4", "--val", "2", "--out", str(run)]) == 0
    assert main(["train", "--data", str(data), "--steps", "2", "--batch-size", "4", "--val", "2",
                 "--variant", "label_prior=0.3", "--out", str(tmp_path / "prior")]) == 0
    torchaudio = os.environ.get("CTCLAB_TORCHAUDIO_PYTHON")
    args = ["eval", str(run), str(tmp_path / "prior"), "--data", str(data), "--utterances", "4", "--beam", "4",
            "--plots", "1", "--out", str(out), "--trim-db", "30"] + (["--torchaudio-python", torchaudio] if torchaudio else [])
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["utterances"] == 4 and report["split"] == "test" and report["trim_db"] == 30
    for entry in report["runs"].values():
        assert set(entry["cer"]) == {"greedy", "beam4", "beam4+bigram_lm"}
        assert {"viterbi", "viterbi+trim", "viterbi_delimiter_onset+trim", "posterior", "blank_penalty=1"} <= set(entry["boundaries_ms"])
        for stats in entry["boundaries_ms"].values():
            assert stats["start"]["n"] == stats["end"]["n"] == report["words"]
        if torchaudio:
            assert entry["torchaudio"]["same_word_boundaries"] == 1.0
    assert [r["label"] for r in report["runs"].values()] == ["fused", "fused + label_prior=0.3"]
    for picture in ("errors.png", "calibration.png"):
        assert (out / picture).stat().st_size > 1000
    assert len(list(out.glob("boundaries-*.png"))) == 2
    assert main(["compare", str(run), str(tmp_path / "prior"), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert main(["train", "--data", str(data), "--steps", "1", "--variant", "dropout=1", "--out", str(run)]) == 2
    assert main(["eval", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    assert "error:" in capsys.readouterr().err
