"""Train the character CTC acoustic model on the synthetic speech with ctclab's loss, and save it
as a ctclab model folder (``ctclab.speech.load_acoustic_model`` loads it)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ctclab.decode import greedy_decode
from ctclab.formats import write_atomically

from ..common import edit_distance, fit, make_criterion, parse_variant
from .data import SAMPLE_RATE, Utterance, make_split, read_split
from .model import BLANK, VOCABULARY, WORD_DELIMITER, AcousticCNNLSTM, build

FACTORY = "ctclab.examples.speech.model:build"
CHECKPOINT = "checkpoint.pt"


def encode(text: str) -> list[int]:
    """Class ids of ``text``: its letters, with the word delimiter ``|`` between words."""
    return [VOCABULARY.index(c) for c in WORD_DELIMITER.join(text.split())]


def decode_text(tokens) -> str:
    """Class ids -> text, delimiters as spaces (the inverse of :func:`encode` on its outputs)."""
    return " ".join("".join(VOCABULARY[t] for t in tokens).replace(WORD_DELIMITER, " ").split())


def collate(utterances: list[Utterance], model: AcousticCNNLSTM):
    """``((waveforms (B, N_max), lengths (B,)), targets (B, S), input_lengths, target_lengths)``."""
    lengths = torch.tensor([len(u.audio) for u in utterances])
    waveforms = torch.zeros(len(utterances), int(lengths.max()))
    for i, u in enumerate(utterances):
        waveforms[i, : len(u.audio)] = torch.from_numpy(u.audio)
    ids = [encode(u.text) for u in utterances]
    longest = max(len(t) for t in ids)
    targets = torch.tensor([t + [1] * (longest - len(t)) for t in ids])
    return (waveforms, lengths), targets, model.frames(lengths), torch.tensor([len(t) for t in ids])


def log_probs_of(model: AcousticCNNLSTM, inputs) -> torch.Tensor:
    """``(T, B, C)`` log-probs of a collated batch's ``(waveforms, lengths)``."""
    waveforms, _ = inputs
    return model(waveforms).log_softmax(-1).transpose(0, 1)


@torch.no_grad()
def greedy_cer(model: AcousticCNNLSTM, utterances: list[Utterance], batch_size: int = 16) -> float:
    errors = total = 0
    for i in range(0, len(utterances), batch_size):
        chunk = utterances[i : i + batch_size]
        inputs, _, il, _ = collate(chunk, model)
        for u, spans in zip(chunk, greedy_decode(log_probs_of(model, inputs), il, blank=BLANK)):
            errors += edit_distance(decode_text(s.token for s in spans), u.text)
            total += len(u.text)
    return errors / max(total, 1)


def save_model_folder(folder: str | Path, model: AcousticCNNLSTM, config: dict) -> None:
    """The ctclab model folder (``ctclab_acoustic_model.json`` + weights) of ``model``."""
    from ctclab.speech import save_acoustic_model

    save_acoustic_model(folder, model, factory=FACTORY, config=config, vocabulary=list(VOCABULARY), blank=BLANK,
                        word_delimiter=WORD_DELIMITER, sample_rate=SAMPLE_RATE)


def load_checkpoint(path: str | Path) -> tuple[AcousticCNNLSTM, dict]:
    """The model of a training checkpoint (eval mode) and the checkpoint's ``model_config``/``config``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build(**state["model_config"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def _checkpoint_path(run: str | Path) -> Path:
    """``run/checkpoint.pt`` of a training run's folder, or ``run`` itself when it is a file."""
    path = Path(run)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"init_from {str(run)!r} is neither a training run's folder (with {CHECKPOINT}) "
                                "nor a checkpoint file")
    return path


def train(data: str | Path, loss: str = "fused", variant: str | None = None, minutes: float = 10.0,
          max_steps: int | None = None, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
          val_utterances: int = 100, eval_every: float = 60.0, out: str | Path = "runs/speech",
          model_config: dict | None = None, progress: bool = True, train_limit: int | None = None,
          init_from: str | Path | None = None) -> dict:
    """Train :class:`AcousticCNNLSTM` on ``data/train`` (made by ``python -m ctclab.examples.speech
    data``) for ``minutes`` of training wall time (or ``max_steps``), with greedy CER on
    ``val_utterances`` fresh held-out-sentence utterances (seed ``seed + 1000``, not the test
    set) every ``eval_every`` seconds. Writes ``out/checkpoint.pt`` (and, at every validation,
    the model folder ``out/model`` when :mod:`ctclab.speech` is there) and ``out/history.json``;
    returns the history. ``variant``: as for the OCR testbed, e.g. ``label_prior=0.3``.
    ``init_from``: a training run's folder (or its ``checkpoint.pt``) to fine-tune: the model
    starts from its weights and architecture (``model_config`` must then be None or the same),
    with a fresh optimiser; label priors fine-tune a model that already aligns, as in
    arXiv 2406.02560."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if init_from is None:
        model_config = dict(model_config or {})
        model = build(**model_config)
    else:
        model, state = load_checkpoint(_checkpoint_path(init_from))
        if model_config is not None and dict(model_config) != state["model_config"]:
            raise ValueError(f"model_config {model_config} differs from init_from's {state['model_config']}: "
                             "pass none (the checkpoint's is used)")
        model_config = dict(state["model_config"])
        model.train()
    criterion = make_criterion(loss, parse_variant(variant), blank=BLANK)
    pool = sorted(read_split(Path(data) / "train", train_limit), key=lambda u: len(u.audio))
    if not pool:
        raise ValueError(f"no training utterances in {str(Path(data) / 'train')!r}")
    validation = make_split(val_utterances, seed + 1000, "test")
    config = dict(loss=loss, variant=variant, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed,
                  data=str(data), train_utterances=len(pool), model=model_config,
                  init_from=None if init_from is None else str(init_from))

    def batch(rng: random.Random):
        first = rng.randrange(max(1, len(pool) - batch_size + 1))  # a window of similar lengths: little padding
        return collate(pool[first : first + batch_size], model)

    def checkpoint():
        state = {"model": model.state_dict(), "model_config": model_config, "config": config}
        if criterion.prior is not None:
            state["log_prior"] = criterion.prior.log_prior.clone()
        write_atomically(out / CHECKPOINT, lambda f: torch.save(state, f))
        try:
            save_model_folder(out / "model", model, model_config)
        except ImportError:  # ctclab.speech not there: the checkpoint alone (export later)
            pass

    history = fit(model, batch, log_probs_of, criterion, lambda: greedy_cer(model, validation), checkpoint, config,
                  minutes=minutes, max_steps=max_steps, lr=lr, seed=seed, eval_every=eval_every, progress=progress)
    if criterion.prior is not None:
        history["log_prior"] = criterion.prior.log_prior.tolist()
    write_atomically(out / "history.json", lambda f: f.write(json.dumps(history).encode()))
    return history


def make_data(out: str | Path, train_utterances: int, test_utterances: int, seed: int = 0) -> dict:
    """``out/train`` and ``out/test`` (:func:`ctclab.examples.speech.data.write_split`); the test
    split uses seed ``seed + 1`` and only held-out sentences. Returns counts and hours."""
    from .data import write_split

    report = {}
    for split, count, s in (("train", train_utterances, seed), ("test", test_utterances, seed + 1)):
        utterances = make_split(count, s, split)
        write_split(Path(out) / split, utterances)
        report[split] = {"utterances": count, "hours": round(float(np.sum([u.duration for u in utterances])) / 3600, 3)}
    return report
