"""Writers parsed back, and ``ctclab align`` end to end on a saved emission file."""
import json
import re

import numpy as np
import pytest
import torch

from ctclab import forced_align, token_spans, word_spans
from ctclab.cli import main
from ctclab.formats import to_ctm, to_json, to_srt, to_text, to_textgrid, to_vtt

VOCAB = ["<b>", "|", "a", "b", "c", "d"]


def synthetic_emissions(frames_per_token, sequence, C=len(VOCAB), blank_frames=1, seed=0):
    """Log-probs that clearly say ``sequence`` (token ids), with blanks between tokens."""
    frames = []
    for k in sequence:
        frames += [k] * frames_per_token + [0] * blank_frames
    T = len(frames)
    lp = torch.full((T, C), -6.0) + 0.1 * torch.randn(T, C, generator=torch.Generator().manual_seed(seed))
    lp[torch.arange(T), torch.tensor(frames)] = -0.05
    return lp.log_softmax(-1), frames


@pytest.fixture
def aligned():
    sequence = [2, 3, 1, 4, 5]  # "ab|cd"
    lp, frames = synthetic_emissions(3, sequence)
    ali = forced_align(lp, torch.tensor(sequence))
    spans = token_spans(ali)[0]
    words = word_spans(spans, separator=1)
    return lp, spans, words


def test_json_has_words_and_tokens_in_seconds(aligned):
    _, spans, words = aligned
    doc = json.loads(json.dumps(to_json(spans, words, VOCAB, 0.02)))
    assert [w["text"] for w in doc["words"]] == ["ab", "cd"]
    assert doc["words"][0]["start"] == pytest.approx(0.0) and doc["words"][0]["end"] == pytest.approx(7 * 0.02)
    assert [t["text"] for t in doc["tokens"]] == ["a", "b", "|", "c", "d"]
    assert all(0 < t["score"] <= 1 for t in doc["tokens"])


def test_ctm_lines(aligned):
    _, _, words = aligned
    lines = [line.split() for line in to_ctm(words, VOCAB, 0.02, "u1").splitlines()]
    assert [(l[0], l[1], l[4]) for l in lines] == [("u1", "1", "ab"), ("u1", "1", "cd")]
    assert float(lines[1][2]) == pytest.approx(words[1].start * 0.02)
    assert float(lines[1][3]) == pytest.approx(len(words[1]) * 0.02)


def test_textgrid_reads_back_with_praatio(aligned, tmp_path):
    praatio = pytest.importorskip("praatio.textgrid")
    lp, spans, words = aligned
    path = tmp_path / "a.TextGrid"
    path.write_text(to_textgrid(words, spans, VOCAB, 0.02, lp.shape[0] * 0.02))
    tg = praatio.openTextgrid(str(path), includeEmptyIntervals=False)
    entries = tg.getTier("words").entries
    assert [e.label for e in entries] == ["ab", "cd"]
    assert entries[1].start == pytest.approx(words[1].start * 0.02)
    assert [e.label for e in tg.getTier("tokens").entries] == ["a", "b", "|", "c", "d"]


def test_srt_and_vtt_cues(aligned):
    _, _, words = aligned
    srt = to_srt(words, VOCAB, 0.02, words_per_cue=1)
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n(.+)\n", srt)
    assert [c[3] for c in cues] == ["ab", "cd"] and cues[0][1] == "00:00:00,000"
    vtt = to_vtt(words, VOCAB, 0.02, words_per_cue=2)
    assert vtt.startswith("WEBVTT\n\n")
    assert re.findall(r"(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)\n(.+)\n", vtt)[0][2] == "ab cd"


def test_to_text_is_each_text_format_and_names_an_unknown_one(aligned):
    lp, spans, words = aligned
    duration = lp.shape[0] * 0.02
    assert to_text("ctm", words, spans, VOCAB, 0.02, "u1") == to_ctm(words, VOCAB, 0.02, "u1")
    assert to_text("textgrid", words, spans, VOCAB, 0.02, "u1", duration) == to_textgrid(words, spans, VOCAB, 0.02, duration)
    assert to_text("srt", words, spans, VOCAB, 0.02) == to_srt(words, VOCAB, 0.02)
    assert to_text("vtt", words, spans, VOCAB, 0.02) == to_vtt(words, VOCAB, 0.02)
    with pytest.raises(ValueError, match="format must be one of ctm, textgrid, srt, vtt, got 'json'"):
        to_text("json", words, spans, VOCAB, 0.02)


def test_alignment_words_are_the_word_type_of_decoding(aligned):
    """word_spans makes ctclab.WordSpan: text with a vocabulary (BPE marker dropped), seconds
    with a frame shift; without them, None; the writers take either."""
    from ctclab import WordSpan

    lp, spans, words = aligned
    assert all(isinstance(w, WordSpan) for w in words) and [w.text for w in words] == [None, None]
    named = word_spans(spans, separator=1, vocab=VOCAB, frame_shift=0.02)
    assert [w.text for w in named] == ["ab", "cd"] and [len(w.tokens) for w in named] == [2, 2]
    assert named == [WordSpan(t, w.start, w.end, w.score, None, w.tokens, 0.02) for t, w in zip(["ab", "cd"], words)]
    assert named[1].start_time == pytest.approx(words[1].start * 0.02) and named[1].end_time == pytest.approx(words[1].end * 0.02)
    assert words[1].start_time is None and words[1].end_time is None
    assert to_json(spans, named, VOCAB, 0.02) == to_json(spans, words, VOCAB, 0.02)
    assert to_ctm(named, VOCAB, 0.02) == to_ctm(words, VOCAB, 0.02)
    bpe = ["<b>", "|", "\u2581a", "b", "\u2581c", "d"]
    assert [w.text for w in word_spans(spans[:2] + spans[3:], word_lengths=[2, 2], vocab=bpe)] == ["ab", "cd"]  # marker dropped
    with pytest.raises(ValueError, match="frame_shift"):
        word_spans(spans, separator=1, frame_shift=-0.02)
    with pytest.raises(TypeError, match="text"):
        WordSpan(tuple(spans[:2]), 0, 3, 0.5)  # the former field order (tokens first)


@pytest.fixture
def files(tmp_path):
    lp, _ = synthetic_emissions(3, [2, 3, 1, 4, 5])
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.save(lp, tmp_path / "em.pt")
    np.save(tmp_path / "em.npy", lp.numpy())
    return tmp_path


@pytest.mark.parametrize("fmt", ["json", "ctm", "textgrid", "srt", "vtt"])
def test_align_cli_end_to_end(files, fmt, capsys):
    out = files / f"out.{fmt}"
    code = main(["align", str(files / "em.pt"), "--text", "ab cd", "--vocab", str(files / "vocab.txt"),
                 "--format", fmt, "--out", str(out), "--confidence"])
    assert code == 0
    text = out.read_text()
    if fmt == "json":
        doc = json.loads(text)
        assert [w["text"] for w in doc["words"]] == ["ab", "cd"]
        assert all(0 <= w["confidence"] <= 1 for w in doc["words"])
    else:
        assert "ab" in text and "cd" in text


def test_align_cli_npy_plot_and_star(files, capsys):
    png = files / "a.png"
    assert main(["align", str(files / "em.npy"), "--text", "cd", "--vocab", str(files / "vocab.txt"),
                 "--star", "3", "--plot", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [w["text"] for w in doc["words"]] == ["cd"]
    assert doc["tokens"][0]["text"] == "<star>" and doc["words"][0]["start_frame"] >= 9
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    "args,message,status",
    [
        (["--text", "ab xz"], "'x'", 1),  # the transcript does not fit the vocabulary: data
        (["--text", "AB"], "--case", 1),
        (["--text", "ab", "--vocab", "missing.txt"], "cannot read vocabulary", 2),  # names no file: usage
        (["--text", "ab", "--blank", "9"], "--blank", 2),
    ],
)
def test_align_cli_errors(files, args, message, status, capsys):
    base = ["align", str(files / "em.pt"), "--vocab", str(files / "vocab.txt")]
    if "--vocab" in args:
        base = ["align", str(files / "em.pt")]
        args = [a if a != "missing.txt" else str(files / "missing.txt") for a in args]
    assert main(base + args) == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_align_cli_rejects_bad_emission_files(files, capsys):
    (files / "bad.npy").write_bytes(b"not numpy")
    assert main(["align", str(files / "bad.npy"), "--text", "ab", "--vocab", str(files / "vocab.txt")]) == 1
    assert "cannot read emissions" in capsys.readouterr().err
    np.save(files / "wide.npy", np.zeros((10, 9), dtype=np.float32))
    assert main(["align", str(files / "wide.npy"), "--text", "ab", "--vocab", str(files / "vocab.txt")]) == 1
    assert "has 6 tokens" in capsys.readouterr().err
