"""Word boundary error and character error rate of trained models on the held-out test set,
measured through the audio pipeline's own outputs (:func:`ctclab.speech.align_audio` on the
test WAV files and their transcripts, the model loaded from its folder by
:func:`ctclab.speech.load_acoustic_model`).

Methods (each word's start and end against the truth, in ms):

- ``viterbi``: the pipeline's words (the Viterbi path; a word spans its first token's first
  frame to its last token's end, in seconds from the model's frame shift);
- ``viterbi_delimiter_onset``: the same, but a word after the first starts where the path
  enters the delimiter ``|`` before it (the model learns to emit ``|`` at a word's onset);
- ``viterbi+trim``, ``viterbi_delimiter_onset+trim``: the same words, their ends moved back
  over trailing silence by :func:`ctclab.speech.trim_word_ends` (the last 5 ms stretch within
  25 dB of the word's loudest, ``--trim-db``; the threshold chosen on the training split with
  ``eval --split train``);
- ``posterior``: the frames where the word's states (its first to its last label state of the
  blank-extended target, the blanks inside it included) hold posterior occupancy >= 0.5, from
  the pipeline's emissions and the targets of its own text preparation;
- ``blank_penalty=B``: plain CTC's emissions with ``B`` nats taken off blank at alignment time
  (:func:`ctclab.variants.blank_penalty`, renormalised), aligned by the pipeline's
  :func:`ctclab.speech.corpus.align_log_probs`;
- the same for a model trained with label priors (arXiv 2406.02560): its run's ``viterbi`` and
  ``posterior``;
- ``torchaudio``: ``torchaudio.functional.forced_align`` on the same emissions and targets, run
  in its own interpreter (``benchmarks/torchaudio_forced_align.py``), its frame path turned into
  words as ctclab's is; reported with how often its path and boundaries equal ctclab's.

CER: greedy (:func:`ctclab.greedy_decode`) and prefix beam search (:class:`ctclab.BeamSearchDecoder`)
with a bigram ARPA LM of the training transcripts (:func:`ctclab.lm.write_arpa`) and without.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import ctclab
from ctclab.decode import BeamSearchDecoder, greedy_decode
from ctclab.formats import write_atomically
from ctclab.lm import NGramLM, write_arpa
from ctclab.variants import blank_penalty as penalise_blank

from ..common import edit_distance, run_label
from .data import SAMPLE_RATE, Utterance, read_split
from .train import CHECKPOINT, decode_text, load_checkpoint, save_model_folder

TORCHAUDIO_WORKER = Path(__file__).resolve().parents[4] / "benchmarks" / "torchaudio_forced_align.py"
CONFIDENCE_BINS = 5


def model_folder(run: str | Path) -> Path:
    """``run/model`` (the ctclab model folder), exported from ``run/checkpoint.pt`` if missing."""
    run = Path(run)
    folder = run / "model"
    if not (folder / "ctclab_acoustic_model.json").is_file():
        if not (run / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{str(run)!r} holds neither a model folder nor {CHECKPOINT} (train first)")
        model, state = load_checkpoint(run / CHECKPOINT)
        save_model_folder(folder, model, state["model_config"])
    return folder


def boundary_stats(signed_seconds: list[float]) -> dict:
    """Absolute error in ms: mean, median, 90th percentile, shares within 20 and 50 ms; the
    signed mean (negative = early) and the count."""
    ms = np.abs(np.asarray(signed_seconds)) * 1000
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
            "within_20ms": float((ms <= 20).mean()), "within_50ms": float((ms <= 50).mean()),
            "mean_signed": float(np.mean(signed_seconds) * 1000), "n": int(len(ms))}


def word_frames_from_states(states: list[int], word_index: tuple[int, ...], words: int) -> list[tuple[int, int]]:
    """``[start, end)`` frames of each word from a state path (state ``2j + 1`` = target ``j``)."""
    spans = [[None, None] for _ in range(words)]
    for t, s in enumerate(states):
        if s % 2 == 1 and word_index[s // 2] >= 0:
            w = word_index[s // 2]
            spans[w][0] = t if spans[w][0] is None else spans[w][0]
            spans[w][1] = t + 1
    return [(a, b) for a, b in spans]


def posterior_word_frames(log_probs: torch.Tensor, targets: tuple[int, ...], word_index: tuple[int, ...], blank: int,
                          words: int, threshold: float = 0.5) -> list[tuple[int, int]]:
    """``[start, end)`` frames where each word's states (first to last label state, inner blanks
    included) have total posterior occupancy >= ``threshold`` (the best frame if none has)."""
    gamma = ctclab.state_occupation(log_probs.double(), torch.tensor(targets), blank=blank)  # (T, S)
    out = []
    for w in range(words):
        positions = [j for j, k in enumerate(word_index) if k == w]
        occupancy = gamma[:, 2 * positions[0] + 1 : 2 * positions[-1] + 2].sum(1)
        frames = torch.nonzero(occupancy >= threshold)[:, 0]
        if len(frames) == 0:
            frames = occupancy.argmax().reshape(1)
        out.append((int(frames[0]), int(frames[-1]) + 1))
    return out


def delimiter_onsets(result, prepared, frame_shift: float) -> list[tuple[float, float]]:
    """The pipeline's word times, each word after the first starting where the delimiter token
    before it starts (this model emits its ``|`` at the onset of the next word, its first
    letter later): ``(start, end)`` seconds per word."""
    first_token = {}
    for j, w in enumerate(prepared.word_index):
        first_token.setdefault(w, j)
    out = []
    for i, word in enumerate(result.words):
        j = first_token[i]
        before = result.tokens[j - 1] if j > 0 and prepared.word_index[j - 1] == -1 else None
        out.append((before.start * frame_shift if before is not None else word.start_time, word.end_time))
    return out


class Errors:
    """Signed start and end errors (seconds) of one method, and the words' confidences."""

    def __init__(self):
        self.start, self.end, self.confidence = [], [], []

    def add(self, truth: Utterance, times: list[tuple[float, float]], confidences=None) -> None:
        for k, (word, (a, b)) in enumerate(zip(truth.words, times)):
            self.start.append(a - word.start)
            self.end.append(b - word.end)
            if confidences is not None:
                self.confidence.append(confidences[k])

    def report(self) -> dict:
        return {"start": boundary_stats(self.start), "end": boundary_stats(self.end),
                "both": boundary_stats(self.start + self.end)}


def torchaudio_paths(python: str, items: list[tuple[torch.Tensor, tuple[int, ...]]]) -> list[list[int]]:
    """Frame labels of ``torchaudio.functional.forced_align`` for each ``(log_probs (T, C), targets)``,
    run by ``python`` (an interpreter with torchaudio) on ``benchmarks/torchaudio_forced_align.py``."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        arrays = {f"lp{i}": lp.float().numpy() for i, (lp, _) in enumerate(items)}
        arrays.update({f"tg{i}": np.asarray(tg, np.int32) for i, (_, tg) in enumerate(items)})
        np.savez(data, count=len(items), **arrays)
        subprocess.run([python, str(TORCHAUDIO_WORKER), data, out], check=True)
        result = np.load(out)
        return [result[f"labels{i}"].tolist() for i in range(len(items))]


def states_of_labels(labels: list[int], targets: tuple[int, ...], blank: int) -> list[int]:
    """The state path of a frame-label path through ``targets`` (a label repeated in consecutive
    frames stays in its state; a new label advances)."""
    states, j, previous = [], -1, blank
    for label in labels:
        if label == blank:
            states.append(2 * (j + 1))
        else:
            if not (label == previous and states and states[-1] % 2 == 1):
                j += 1
            states.append(2 * j + 1)
        previous = label
    return states


def cer(hypotheses: list[str], references: list[str]) -> float:
    return sum(edit_distance(h, r) for h, r in zip(hypotheses, references)) / max(1, sum(len(r) for r in references))


def calibration(errors: Errors, bins: int = CONFIDENCE_BINS) -> dict:
    """Mean word boundary error (ms, |start| and |end| averaged) per confidence quantile bin,
    and Spearman's rank correlation between confidence and that error."""
    conf = np.asarray(errors.confidence)
    err = (np.abs(errors.start) + np.abs(errors.end)) / 2 * 1000
    edges = np.quantile(conf, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    table = [{"confidence_from": float(edges[i]), "confidence_to": float(edges[i + 1]),
              "mean_error_ms": float(err[which == i].mean()) if (which == i).any() else None,
              "words": int((which == i).sum())} for i in range(bins)]
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = float(np.corrcoef(rank(conf), rank(err))[0, 1]) if len(conf) > 2 else float("nan")
    return {"bins": table, "spearman": rho, "confidence": conf.tolist(), "error_ms": err.tolist()}


def evaluate(runs: list[str | Path], data: str | Path, utterances: int = 600, blank_penalty_nats=(0.5, 1.0, 2.0),
             blank_penalty: float | None = None, beam: int = 32, torchaudio_python: str | None = None,
             plots: int = 3, out: str | Path = "runs/speech-eval", alpha: float = 0.5, beta: float = 1.0,
             trim_db: float | None = None, split: str = "test") -> dict:
    """Evaluate each training run in ``runs`` on the first ``utterances`` of ``data/test``
    (``split='train'``: of the training split, to choose settings such as ``trim_db``, the
    ``+trim`` methods' threshold, default :data:`ctclab.speech.audio.TRIM_DROP_DB`, without
    looking at the test set); write
    ``out/report.json`` and the pictures (``out/boundaries-*.png``, ``out/errors.png``,
    ``out/calibration.png``); return the report (without per-word lists)."""
    from ctclab.speech import align_audio, load_acoustic_model, prepare_text, trim_word_ends
    from ctclab.speech.audio import TRIM_DROP_DB
    from ctclab.speech.corpus import align_log_probs

    out = Path(out)
    data = Path(data)
    folders = [model_folder(run) for run in runs]  # before anything is written
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if trim_db is not None and not 0 < trim_db < float("inf"):
        raise ValueError(f"trim_db (--trim-db) must be a finite number of dB > 0, got {trim_db!r}")
    test = read_split(data / split, utterances)
    if not test:
        raise ValueError(f"no {split} utterances in {str(data / split)!r}")
    trim = {} if trim_db is None else {"drop_db": trim_db}
    arpa = out / "train-bigram.arpa"
    write_arpa([json.loads(line)["text"] for line in (data / "train" / "manifest.jsonl").read_text().splitlines()], arpa)
    lm = NGramLM.from_arpa(arpa)
    penalties = sorted({*blank_penalty_nats, *([blank_penalty] if blank_penalty else [])})
    report = {"split": split, "utterances": len(test), "words": sum(len(u.words) for u in test),
              "trim_db": TRIM_DROP_DB if trim_db is None else trim_db, "runs": {}}
    figures = {}
    for run, folder in zip(runs, folders):
        history = json.loads((Path(run) / "history.json").read_text()) if (Path(run) / "history.json").is_file() else None
        label = run_label(history["config"]) if history else Path(run).name
        model = load_acoustic_model(folder, device="cpu")
        methods = {"viterbi": Errors(), "viterbi_delimiter_onset": Errors(), "viterbi+trim": Errors(),
                   "viterbi_delimiter_onset+trim": Errors(), "posterior": Errors(),
                   **{f"blank_penalty={b:g}": Errors() for b in penalties}}
        emissions, kept = [], []
        for i, u in enumerate(test):
            print(f"\r{label}: aligning {i + 1}/{len(test)}", end="", file=sys.stderr, flush=True)
            result = align_audio(model, data / split / "wav" / f"{u.id}.wav", u.text, id=u.id, keep_log_probs=True)
            lp = result.log_probs
            prepared = prepare_text(u.text, model.vocabulary, model.blank, model.word_delimiter)
            methods["viterbi"].add(u, [(w.start_time, w.end_time) for w in result.words], [w.confidence for w in result.words])
            shift = model.frame_shift
            onsets = delimiter_onsets(result, prepared, shift)
            methods["viterbi_delimiter_onset"].add(u, onsets)
            methods["viterbi+trim"].add(u, trim_word_ends([(w.start_time, w.end_time) for w in result.words], u.audio, SAMPLE_RATE, **trim))
            methods["viterbi_delimiter_onset+trim"].add(u, trim_word_ends(onsets, u.audio, SAMPLE_RATE, **trim))
            frames = posterior_word_frames(lp, prepared.targets, prepared.word_index, model.blank, len(u.words))
            methods["posterior"].add(u, [(a * shift, b * shift) for a, b in frames])
            for b in penalties:
                words, _ = align_log_probs(penalise_blank(lp, b, model.blank).log_softmax(-1), prepared, model.blank,
                                           model.vocabulary, shift, confidence=False)
                methods[f"blank_penalty={b:g}"].add(u, [(w.start_time, w.end_time) for w in words])
            emissions.append((lp, prepared))
            if len(kept) < plots:
                kept.append((u, result))
        print(file=sys.stderr)
        if torchaudio_python:
            torchaudio_report, methods["torchaudio"] = compare_torchaudio(torchaudio_python, emissions, test, model)
        lengths = torch.tensor([lp.shape[0] for lp, _ in emissions])
        batch = torch.nn.utils.rnn.pad_sequence([lp for lp, _ in emissions])  # (T, B, C)
        refs = [u.text for u in test]
        hyps_greedy = [decode_text(s.token for s in spans) for spans in greedy_decode(batch, lengths, blank=model.blank)]
        tokens = list(model.vocabulary.tokens)
        with_lm = BeamSearchDecoder(tokens, model.blank, beam_width=beam, lm=lm, alpha=alpha, beta=beta, word_delimiter="|")
        no_lm = BeamSearchDecoder(tokens, model.blank, beam_width=beam, word_delimiter="|")
        hyps_lm = [h[0].text for h in with_lm.decode(batch, lengths)]
        hyps_beam = [h[0].text for h in no_lm.decode(batch, lengths)]
        entry = {"label": label, "model": str(folder),
                 "training": ({"steps": len(history["steps"]), "minutes": history["steps"][-1][1] / 60,
                               "val_cer": history["evals"][-1][2]} if history else None),
                 "cer": {"greedy": cer(hyps_greedy, refs), f"beam{beam}": cer(hyps_beam, refs),
                         f"beam{beam}+bigram_lm": cer(hyps_lm, refs)},
                 "boundaries_ms": {name: e.report() for name, e in methods.items()},
                 "calibration": calibration(methods["viterbi"])}
        if torchaudio_python:
            entry["torchaudio"] = torchaudio_report
        report["runs"][str(run)] = entry
        figures[label] = (methods, kept, model)
    draw(report, figures, out)
    slim = json.loads(json.dumps(report))
    for entry in slim["runs"].values():
        entry["calibration"].pop("confidence")
        entry["calibration"].pop("error_ms")
    write_atomically(out / "report.json", lambda f: f.write(json.dumps(slim, indent=2).encode()))
    return slim


def compare_torchaudio(python: str, emissions, test: list[Utterance], model) -> tuple[dict, Errors]:
    """torchaudio's forced_align on the same emissions: how often its frame path, and its word
    boundaries, equal ctclab's (ties between equally good paths may be broken differently;
    then the path scores are equal), and its errors."""
    items = [(lp, prepared.targets) for lp, prepared in emissions]
    labels = torchaudio_paths(python, items)
    errors = Errors()
    same_path = same_words = 0
    score_gap = 0.0
    for (lp, prepared), u, path in zip(emissions, test, labels):
        states = states_of_labels(path, prepared.targets, model.blank)
        theirs = word_frames_from_states(states, prepared.word_index, len(u.words))
        errors.add(u, [(a * model.frame_shift, b * model.frame_shift) for a, b in theirs])
        ours = ctclab.forced_align(lp, torch.tensor(prepared.targets), blank=model.blank)
        ours_words = word_frames_from_states(ours.states.tolist(), prepared.word_index, len(u.words))
        same_path += ours.labels.tolist() == path
        same_words += ours_words == theirs
        their_score = float(lp.double()[torch.arange(len(path)), torch.tensor(path)].sum())
        score_gap = max(score_gap, abs(their_score - float(ours.path_score)))
    n = len(test)
    return {"same_frame_path": same_path / n, "same_word_boundaries": same_words / n,
            "max_path_score_difference": score_gap}, errors


def draw(report: dict, figures: dict, out: Path) -> None:
    """The pipeline's figure for a few test files with the true boundaries over it; the error
    distribution of every method; confidence against boundary error."""
    from ctclab.plot import _pyplot
    from ctclab.speech import plot_audio_alignment

    plt = _pyplot()
    for label, (_, kept, model) in figures.items():
        for u, result in kept:
            fig = plot_audio_alignment(torch.from_numpy(u.audio), model.sample_rate, result,
                                       title=f"{label}: {u.id} ({u.voice}); dashed black = true word boundaries")
            for ax in fig.axes:
                for w in u.words:
                    ax.axvline(w.start, color="black", linestyle="--", linewidth=0.8)
                    ax.axvline(w.end, color="black", linestyle=":", linewidth=0.8)
            name = label.replace(" ", "").replace("+", "_").replace("=", "")
            write_atomically(out / f"boundaries-{name}-{u.id}.png", lambda f, fig=fig: fig.savefig(f, format="png", dpi=90))
            plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab10")
    for r, (label, (methods, _, _)) in enumerate(figures.items()):
        for m, (name, e) in enumerate(methods.items()):
            for ax, side in zip(axes, ("start", "end")):
                ms = np.sort(np.abs(getattr(e, side))) * 1000
                ax.plot(ms, np.linspace(0, 1, len(ms)), color=colours(m % 10), linestyle=("-", "--", ":", "-.")[r % 4],
                        label=f"{label}: {name}")
    for ax, side in zip(axes, ("start", "end")):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel(f"|word {side} error| (ms)")
        ax.set_ylabel("share of words")
        ax.axvline(20, color="grey", linewidth=0.5)
        ax.axvline(50, color="grey", linewidth=0.5)
        ax.legend(fontsize=6)
    fig.tight_layout()
    write_atomically(out / "errors.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for entry in report["runs"].values():
        cal = entry["calibration"]
        ax.scatter(cal["confidence"], cal["error_ms"], s=2, alpha=0.25)
        centres = [(b["confidence_from"] + b["confidence_to"]) / 2 for b in cal["bins"]]
        ax.plot(centres, [b["mean_error_ms"] for b in cal["bins"]], marker="o",
                label=f"{entry['label']} (Spearman {cal['spearman']:.2f})")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("word confidence (mean posterior occupancy)")
    ax.set_ylabel("word boundary error (ms, mean of |start|, |end|)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomically(out / "calibration.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
