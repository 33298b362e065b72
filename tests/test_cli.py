"""``ctclab align`` and ``ctclab decode`` fail in one line with the right exit status, read
padded, batch-major and Hugging Face style inputs, and write their files atomically."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ctclab.cli import main
from test_formats_cli import VOCAB, synthetic_emissions

A, B_, C_, D, SEP = 2, 3, 4, 5, 1  # token ids of VOCAB


def run(argv, capsys):
    """``(status, stdout, stderr)`` of ``ctclab argv``; a failure must be one line, no traceback."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if status != 0:
        assert err.count("\n") == 1 and err.startswith("ctclab"), err
    return status, out, err


def strict_loads(text):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def sequence_of(words):
    ids = {"a": A, "b": B_, "c": C_, "d": D}
    seq = []
    for i, word in enumerate(words):
        seq += ([SEP] if i else []) + [ids[ch] for ch in word]
    return seq


@pytest.fixture
def work(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    lp, _ = synthetic_emissions(3, sequence_of(["ab", "cd"]))  # (20, 6)
    torch.save(lp, tmp_path / "em.pt")
    return tmp_path


def align(work, *extra, emissions="em.pt", text=("--text", "ab cd")):
    return ["align", work / emissions, *text, "--vocab", work / "vocab.txt", *extra]


def decode(work, *extra, emissions="em.pt"):
    return ["decode", work / emissions, "--vocab", work / "vocab.txt", *extra]


# -- unreadable emission files: exit 1, one line ---------------------------------------------------
class ModelOutput(OrderedDict):
    """Like transformers' ModelOutput: torch.save(outputs) pickles the class, which
    weights_only loading refuses."""


def _bad_files(work):
    real = (work / "em.pt").read_bytes()
    np.save(work / "real.npy", np.zeros((20, 6), np.float32))
    real_npy = (work / "real.npy").read_bytes()
    return {
        "empty.pt": b"", "empty.npy": b"", "truncated.pt": real[: len(real) // 2], "truncated.npy": real_npy[:100],
        "garbage.pt": b"hello, not a tensor\n" * 5, "garbage.npy": b"not numpy at all", "garbage.npz": b"PK\x03\x04junk",
    }


@pytest.mark.parametrize("command", ["align", "decode"])
@pytest.mark.parametrize("name", ["empty.pt", "empty.npy", "truncated.pt", "truncated.npy", "garbage.pt", "garbage.npy", "garbage.npz"])
def test_damaged_emission_files_fail_in_one_line(work, capsys, command, name):
    (work / name).write_bytes(_bad_files(work)[name])
    argv = align(work, emissions=name) if command == "align" else decode(work, emissions=name)
    status, out, err = run(argv, capsys)
    assert status == 1 and out == ""
    assert f"cannot read emissions from {str(work / name)!r}" in err


@pytest.mark.parametrize(
    "content,message",
    [
        ([1.0, 2.0], "got a list"),
        (torch.zeros(20, 6, dtype=torch.long), "floating-point"),
        (torch.zeros(20), "(T, C) or (T, B, C)"),
        (torch.zeros(2, 20, 1, 6), "(T, C) or (T, B, C)"),
        ({"hidden_states": torch.zeros(20, 6), "other": torch.zeros(3)}, "none is 'logits'"),
        (ModelOutput(logits=torch.zeros(20, 6)), "torch.save(dict(outputs), path)"),
    ],
    ids=["list", "ints", "1-d", "4-d", "dict-without-logits", "model-output-object"],
)
def test_non_tensor_emission_files_fail_in_one_line(work, capsys, content, message):
    torch.save(content, work / "x.pt")
    status, out, err = run(align(work, emissions="x.pt"), capsys)
    assert status == 1 and out == "" and message in err


def test_pickled_npy_and_unknown_suffix_and_missing_file(work, capsys):
    np.save(work / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    status, _, err = run(align(work, emissions="objects.npy"), capsys)
    assert status == 1 and "Python objects" in err
    (work / "x.wav").write_bytes(b"RIFF")
    assert run(align(work, emissions="x.wav"), capsys)[0] == 2
    status, _, err = run(align(work, emissions="missing.pt"), capsys)
    assert status == 2 and "no such file" in err


# -- argument values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--star", "nan"), ("--star", "inf"), ("--frame-shift", "0"), ("--frame-shift", "-1"),
                                        ("--frame-shift", "inf"), ("--frame-shift", "nan"), ("--frame-shift", "x")])
def test_non_finite_or_non_positive_values_are_usage_errors(work, capsys, flag, value):
    status, out, err = run(align(work, flag, value), capsys)
    assert status == 2 and out == "" and flag in err


@pytest.mark.parametrize("flag,value", [("--alpha", "nan"), ("--beta", "inf"), ("--beam", "0"), ("--nbest", "-1")])
def test_decode_values_are_usage_errors(work, capsys, flag, value):
    assert run(decode(work, flag, value), capsys)[0] == 2


# -- outputs: folders, atomic writes ------------------------------------------------------------------
def test_out_and_plot_into_missing_folders_create_them(work, capsys):
    out, png = work / "a" / "b" / "out.json", work / "c" / "d" / "x.png"
    assert run(align(work, "--out", out, "--plot", png), capsys)[0] == 0
    assert [w["text"] for w in strict_loads(out.read_text())["words"]] == ["ab", "cd"]
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json"]  # no temporary files left
    assert sorted(p.name for p in png.parent.iterdir()) == ["x.png"]


def test_read_only_folder_is_refused_before_computing(work, capsys, monkeypatch):
    read_only = work / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    loaded = []
    monkeypatch.setattr("ctclab.cli.load_emissions", lambda *a: loaded.append(a))
    for flags in (["--out", read_only / "x.json"], ["--out", read_only / "new" / "x.json"], ["--plot", read_only / "x.png"],
                  ["--out-dir", read_only / "d"]):
        status, out, err = run(align(work, *flags), capsys)
        assert status == 1 and out == "" and "not writable" in err and flags[0] in err
    assert loaded == [] and list(read_only.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_chmod_read_only_folder_is_refused(work, capsys):
    read_only = work / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        status, _, err = run(align(work, "--out", read_only / "x.json"), capsys)
        assert status == 1 and "not writable" in err
    finally:
        read_only.chmod(0o700)


def test_out_that_is_a_folder_is_a_usage_error(work, capsys):
    assert run(align(work, "--out", work), capsys)[0] == 2


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(work, capsys, monkeypatch):
    out = work / "out" / "x.json"
    out.parent.mkdir()
    out.write_text("previous")

    def fail(fd):  # the data is in the temporary file by now: the write fails part-way
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    status, _, err = run(align(work, "--out", out), capsys)
    assert status == 1 and "cannot write --out" in err and "No space left" in err
    assert out.read_text() == "previous" and sorted(p.name for p in out.parent.iterdir()) == ["x.json"]


def test_a_killed_write_keeps_the_previous_file(work):
    out = work / "x.ctm"
    out.write_text("previous")
    script = (
        "import os, signal, sys\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from ctclab.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    argv = [str(a) for a in align(work, "--format", "ctm", "--out", out)]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert out.read_text() == "previous"


def test_written_files_get_the_usual_permissions(work, capsys):
    old = os.umask(0o022)
    try:
        assert run(align(work, "--out", work / "new.json"), capsys)[0] == 0
        assert (work / "new.json").stat().st_mode & 0o777 == 0o644  # not tempfile's 0o600
        (work / "kept.json").write_text("x")
        (work / "kept.json").chmod(0o640)
        assert run(align(work, "--out", work / "kept.json"), capsys)[0] == 0
        assert (work / "kept.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# -- strict JSON ------------------------------------------------------------------------------------
def test_decode_json_is_strict(work, capsys, monkeypatch):
    from ctclab.decode import Hypothesis

    def fake(self, log_probs, input_lengths=None, nbest=1):
        return [[Hypothesis("ab", (A, B_), (), -math.inf, math.nan, -math.inf)]]

    monkeypatch.setattr("ctclab.decode.BeamSearchDecoder.decode", fake)
    status, out, _ = run(decode(work, "--format", "json"), capsys)
    assert status == 0 and "Infinity" not in out and "NaN" not in out
    (hyp,) = strict_loads(out)
    assert hyp["text"] == "ab" and hyp["acoustic_score"] is None and hyp["lm_score"] is None and hyp["score"] is None


def test_a_frame_with_no_probability_is_refused_not_decoded_to_minus_infinity(work, capsys):
    lp = torch.load(work / "em.pt")
    lp[5] = -math.inf  # before: decode --format json printed "acoustic_score": -Infinity
    torch.save(lp, work / "dead.pt")
    status, out, err = run(decode(work, "--format", "json", emissions="dead.pt"), capsys)
    assert status == 1 and out == "" and "frame 5" in err


def test_align_json_writer_is_strict():
    from ctclab.formats import dumps_json

    text = dumps_json([{"words": [{"score": math.nan, "confidence": math.inf, "start": 0.5}]}])
    assert strict_loads(text) == {"words": [{"score": None, "confidence": None, "start": 0.5}]}


# -- several utterances ---------------------------------------------------------------------------
WORDS = ["ab", "c", "d", "a", "b", "cd", "a", "b", "c"]  # 9 words: two cues of at most 7 words


@pytest.fixture
def four(work):
    texts = [WORDS[k:] + WORDS[:k] for k in range(4)]  # rotations: same length, different words
    lps = [synthetic_emissions(2, sequence_of(t), seed=k)[0] for k, t in enumerate(texts)]
    torch.save(torch.stack(lps, 1), work / "em4.pt")  # (T, 4, C)
    (work / "texts.txt").write_text("".join(" ".join(t) + "\n" for t in texts))
    return texts


def align4(work, *extra):
    return align(work, *extra, emissions="em4.pt", text=("--text-file", work / "texts.txt"))


def test_several_utterances_json_is_a_list_and_ctm_concatenates(work, four, capsys):
    status, out, _ = run(align4(work, "--format", "json"), capsys)
    docs = strict_loads(out)
    assert status == 0 and [d["utterance"] for d in docs] == ["utt-1", "utt-2", "utt-3", "utt-4"]
    assert [[w["text"] for w in d["words"]] for d in docs] == four
    status, out, _ = run(align4(work, "--format", "ctm", "--out", work / "all.ctm"), capsys)
    lines = [line.split() for line in (work / "all.ctm").read_text().splitlines()]
    assert [l[0] for l in lines] == [f"utt-{b}" for b in range(1, 5) for _ in WORDS]
    assert [l[4] for l in lines] == [w for t in four for w in t]


@pytest.mark.parametrize("fmt,ext", [("textgrid", "TextGrid"), ("srt", "srt"), ("vtt", "vtt")])
def test_several_utterances_into_out_dir_give_one_valid_file_each(work, four, capsys, fmt, ext):
    out_dir = work / "per" / "utterance"
    assert run(align4(work, "--format", fmt, "--out-dir", out_dir), capsys)[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [f"utt-{b}.{ext}" for b in range(1, 5)]
    for b, words in enumerate(four, 1):
        path = out_dir / f"utt-{b}.{ext}"
        if fmt == "textgrid":
            textgrid = pytest.importorskip("praatio.textgrid")
            tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
            assert [e.label for e in tg.getTier("words").entries] == words
        elif fmt == "srt":
            cues = re.findall(r"(?m)^(\d+)\n\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d\n(.+)\n", path.read_text())
            assert [int(n) for n, _ in cues] == [1, 2]  # numbered within each file
            assert " ".join(text for _, text in cues).split() == words
        else:
            text = path.read_text()
            assert text.startswith("WEBVTT\n\n") and text.count(" --> ") == 2


@pytest.mark.parametrize("fmt", ["textgrid", "srt", "vtt"])
def test_several_utterances_into_one_file_of_a_one_utterance_format_are_refused(work, four, capsys, fmt):
    for where in (["--out", work / f"x.{fmt}"], []):
        status, out, err = run(align4(work, "--format", fmt, *where), capsys)
        assert status == 2 and out == "" and "--out-dir" in err
    assert not (work / f"x.{fmt}").exists()


def test_an_empty_line_in_the_text_file_names_its_line(work, four, capsys):
    (work / "texts.txt").write_text("ab c\n\nab\nab\nab\n")
    status, _, err = run(align4(work), capsys)
    assert status == 1 and "line 2" in err


# -- lengths, batch-major input, Hugging Face style files ------------------------------------------------
@pytest.fixture
def padded(work):
    """Two utterances; the first (20 frames) padded to 30 with frames that say 'd' loudly."""
    first, _ = synthetic_emissions(3, sequence_of(["ab", "cd"]))
    pad = torch.full((10, len(VOCAB)), -8.0)
    pad[:, D] = 0.0
    first = torch.cat([first, pad.log_softmax(-1)])
    second, _ = synthetic_emissions(5, sequence_of(["cd", "ab"]), seed=1)  # 30 frames
    lp = torch.stack([first, second], 1)  # (30, 2, C)
    torch.save(lp, work / "padded.pt")
    (work / "two.txt").write_text("ab cd\ncd ab\n")
    return lp


def align2(work, *extra, emissions="padded.pt"):
    return align(work, *extra, emissions=emissions, text=("--text-file", work / "two.txt"))


def last_end(out):
    return [d["words"][-1]["end_frame"] for d in strict_loads(out)]


def test_lengths_keep_padded_frames_out_of_the_alignment(work, padded, capsys):
    assert last_end(run(align2(work), capsys)[1]) == [30, 29]  # the padding taken for 'd'
    assert last_end(run(align2(work, "--lengths", "20,30"), capsys)[1]) == [19, 29]
    (work / "lengths.txt").write_text("20\n30\n")
    assert last_end(run(align2(work, "--lengths", work / "lengths.txt", "--confidence"), capsys)[1]) == [19, 29]
    torch.save({"log_probs": padded, "input_lengths": torch.tensor([20, 30])}, work / "with_lengths.pt")
    assert last_end(run(align2(work, emissions="with_lengths.pt"), capsys)[1]) == [19, 29]
    np.savez(work / "with_lengths.npz", log_probs=padded.numpy(), lengths=np.array([20, 30]))
    assert last_end(run(align2(work, emissions="with_lengths.npz"), capsys)[1]) == [19, 29]
    assert run(align2(work, "--lengths", "20,30", "--plot", work / "first.png"), capsys)[0] == 0  # cut to 20 frames
    assert (work / "first.png").stat().st_size > 1000


def test_lengths_that_do_not_fit_are_refused(work, padded, capsys):
    for value, message in (("20", "1 value(s) for 2"), ("20,31", "[0, 30]"), ("20,x", "nor a file"), ("-3", "frame counts")):
        status, out, err = run(align2(work, "--lengths", value), capsys)
        assert status in (1, 2) and out == "" and message in err


def test_padding_may_hold_nan_but_the_frames_may_not(work, padded, capsys):
    lp = padded.clone()
    lp[25, 0] = math.nan  # beyond the first utterance's 20 frames
    torch.save(lp, work / "nan.pt")
    assert run(align2(work, "--lengths", "20,30", emissions="nan.pt"), capsys)[0] == 0
    lp[4, 1, 2] = math.nan
    torch.save(lp, work / "nan.pt")
    status, _, err = run(align2(work, "--lengths", "20,30", emissions="nan.pt"), capsys)
    assert status == 1 and "NaN" in err and "utterance 2, frame 4" in err
    status, _, err = run(decode(work, "--lengths", "20,30", emissions="nan.pt"), capsys)
    assert status == 1 and "NaN" in err


def test_batch_first_gives_the_time_major_results(work, padded, capsys):
    torch.save(padded.transpose(0, 1).contiguous(), work / "bf.pt")
    time_major = run(align2(work, "--lengths", "20,30", "--confidence"), capsys)
    batch_major = run(align2(work, "--lengths", "20,30", "--confidence", "--batch-first", emissions="bf.pt"), capsys)
    assert time_major[0] == batch_major[0] == 0 and time_major[1] == batch_major[1]
    time_major = run(decode(work, "--lengths", "20,30", "--format", "json", emissions="padded.pt"), capsys)
    batch_major = run(decode(work, "--lengths", "20,30", "--format", "json", "--batch-first", emissions="bf.pt"), capsys)
    assert time_major[0] == batch_major[0] == 0 and time_major[1] == batch_major[1]
    assert [h[0]["text"] for h in strict_loads(time_major[1])] == ["ab cd", "cd ab"]


def test_batch_major_input_without_the_flag_is_refused_with_a_hint(work, padded, capsys):
    lp = torch.load(work / "em.pt")
    torch.save(lp[None], work / "one.pt")  # (1, T, C), as torchaudio's aligner takes
    status, out, err = run(decode(work, emissions="one.pt"), capsys)  # before: 20 lines of junk, exit 0
    assert status == 1 and out == "" and "--batch-first" in err
    status, out, err = run(align(work, emissions="one.pt"), capsys)
    assert status == 1 and "--batch-first" in err
    assert run(align(work, "--batch-first", emissions="one.pt"), capsys)[1] == run(align(work), capsys)[1]
    torch.save(padded.transpose(0, 1).contiguous(), work / "bf.pt")  # (2, 30, C)
    status, _, err = run(align2(work, "--lengths", "20,30", emissions="bf.pt"), capsys)
    assert status == 1 and "--batch-first" in err
    status, _, err = run(align2(work, "--batch-first", emissions="padded.pt"), capsys)
    assert status == 1 and "drop --batch-first" in err


def test_few_frames_many_utterances_warns(work, capsys):
    torch.save(torch.randn(3, 5, len(VOCAB)).log_softmax(-1), work / "wide.pt")
    status, out, err = run(decode(work, emissions="wide.pt"), capsys)
    assert status == 0 and "warning" in err and "--batch-first" in err and len(out.splitlines()) == 5


def same_alignment(out, expected):
    """The same words and frames, scores equal up to rounding (normalising logits again is exact
    only up to float32 rounding)."""
    got, want = ([d] if isinstance(d, dict) else d for d in (strict_loads(out), strict_loads(expected)))
    frames = lambda docs: [[(w["text"], w["start_frame"], w["end_frame"]) for w in d["words"]] for d in docs]
    scores = lambda docs: [w["score"] for d in docs for w in d["words"]]
    return frames(got) == frames(want) and scores(got) == pytest.approx(scores(want), abs=1e-5)


def test_hugging_face_logits_dict_and_npz_are_read(work, padded, capsys):
    expected = run(align2(work, "--lengths", "20,30"), capsys)[1]
    shift = torch.randn(2, 30, 1, generator=torch.Generator().manual_seed(0))
    logits = padded.transpose(0, 1) * 1.0 + shift  # a per-frame shift: unnormalised logits
    torch.save(dict(logits=logits), work / "hf.pt")  # torch.save(dict(outputs), ...) of a model output
    assert same_alignment(run(align2(work, "--lengths", "20,30", "--batch-first", emissions="hf.pt"), capsys)[1], expected)
    np.savez(work / "hf.npz", logits=logits.numpy())
    assert same_alignment(run(align2(work, "--lengths", "20,30", "--batch-first", emissions="hf.npz"), capsys)[1], expected)
    np.savez(work / "only.npz", padded.numpy())  # a single unnamed array
    assert run(align2(work, "--lengths", "20,30", emissions="only.npz"), capsys)[1] == expected


def test_unnormalised_emissions_need_log_softmax(work, capsys):
    torch.save(torch.load(work / "em.pt") + 3.0, work / "logits.pt")
    status, out, err = run(align(work, emissions="logits.pt"), capsys)
    assert status == 1 and out == "" and "--log-softmax" in err
    assert same_alignment(run(align(work, "--log-softmax", emissions="logits.pt"), capsys)[1], run(align(work), capsys)[1])
    torch.save(torch.load(work / "em.pt").exp(), work / "probs.pt")  # probabilities, not their log
    assert run(decode(work, emissions="probs.pt"), capsys)[0] == 1


# -- alignments without a path, unexpected errors ------------------------------------------------------
def test_an_alignment_with_no_path_is_an_error_not_an_empty_word_list(work, capsys):
    lp = torch.full((20, len(VOCAB)), -math.inf)
    lp[:, 0] = math.log(0.6)
    lp[:, A] = math.log(0.4)  # 'b' has probability 0 everywhere
    torch.save(lp, work / "no_b.pt")
    status, out, err = run(align(work, "--text", "ab", emissions="no_b.pt"), capsys)  # before: exit 0, "words": []
    assert status == 1 and out == "" and "'utt'" in err and "cannot be aligned" in err and "probability 0" in err
    status, out, err = run(align(work, "--text", "ab cd ab cd ab cd ab cd", emissions="em.pt"), capsys)
    assert status == 1 and "needs at least" in err


def test_unexpected_errors_are_one_line_unless_asked(work, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nand a second line")

    monkeypatch.setattr("ctclab.align.forced_align", broken)
    status, _, err = run(align(work), capsys)
    assert status == 1 and "RuntimeError: boom" in err and "CTCLAB_TRACEBACK" in err
    monkeypatch.setenv("CTCLAB_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main([str(a) for a in align(work)])


def test_plot_alignment_writes_paths_atomically_and_file_objects(work):
    import io

    import matplotlib.pyplot as plt

    from ctclab import forced_align
    from ctclab.plot import plot_alignment

    lp = torch.load(work / "em.pt")
    target = torch.tensor(sequence_of(["ab", "cd"]))
    fig = plot_alignment(lp, target, forced_align(lp, target), VOCAB, out=work / "pics" / "a.svg")
    buffer = io.BytesIO()
    plot_alignment(lp, target, forced_align(lp, target), VOCAB, out=buffer)
    plt.close("all")
    assert fig is not None and (work / "pics" / "a.svg").read_text().lstrip().startswith("<?xml")
    assert [p.name for p in (work / "pics").iterdir()] == ["a.svg"] and buffer.getvalue().startswith(b"\x89PNG")
