"""The OCR testbed in small: the generator's ground truth, a loss that decreases, the pipeline."""
import json
import random

import numpy as np
import pytest

pytest.importorskip("PIL")

from ctclab.examples.ocr.__main__ import main  # noqa: E402
from ctclab.examples.ocr.data import DOWNSAMPLE, make_lines, random_text, render  # noqa: E402
from ctclab.examples.ocr.train import train  # noqa: E402


def test_glyph_extents_agree_with_rendered_ink():
    rng = random.Random(1)
    for _ in range(20):
        line = render(random_text(rng), rng, noise=0.0)
        ink = np.nonzero(line.image.max(0) > 0.5)[0]
        covered = np.zeros(line.image.shape[1], dtype=bool)
        for ch, (x0, x1) in zip(line.text, line.extents):
            assert 0 <= x0 < x1 <= line.image.shape[1]
            if ch != " ":
                assert (line.image[:, x0:x1].max() > 0.5), f"no ink for {ch!r} in {line.text!r}"
                covered[max(0, x0 - 1) : x1 + 1] = True
        assert covered[ink].all(), "ink outside every glyph's extent"
        starts = [x0 for x0, _ in line.extents]
        assert starts == sorted(starts)
        frames = line.frame_extents()
        assert all(0 <= a < b <= line.image.shape[1] // DOWNSAMPLE for a, b in frames)


def test_generator_is_deterministic():
    a, b = make_lines(5, seed=3), make_lines(5, seed=3)
    assert [l.text for l in a] == [l.text for l in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))


def test_loss_decreases_in_a_tiny_run(tmp_path):
    history = train("fused", max_steps=20, minutes=10, batch_size=16, train_lines=200, val_lines=10,
                    eval_every=1e9, out=tmp_path, progress=False)
    losses = [v for _, _, v in history["steps"]]
    assert np.mean(losses[-5:]) < 0.7 * losses[0]


def test_train_eval_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--train-lines", "64", "--batch-size", "8", "--eval-lines", "8",
                 "--variant", "label_smoothing=0.1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"cer_greedy", "cer_beam", "alignment_frame_error"}
    assert set(report["alignment_frame_error"]) == {"viterbi", "posterior"}
    assert main(["eval", str(out / "model.pt"), "--lines", "4", "--beam", "4"]) == 0
    assert main(["compare", str(out), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert main(["train", "--steps", "1", "--variant", "dropout=1", "--out", str(out)]) == 2
