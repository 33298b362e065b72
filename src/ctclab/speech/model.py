"""Acoustic models from local folders: load, save, and run on waveforms.

:func:`load_acoustic_model` takes

1. a local Hugging Face folder with a CTC head (``config.json``; ``AutoModelForCTC`` with its
   processor: wav2vec2, HuBERT, WavLM, data2vec, MMS), read with ``local_files_only=True`` —
   ctclab never downloads weights;
2. a torchaudio pipeline bundle (``torchaudio.pipelines.WAV2VEC2_ASR_BASE_960H``, ``MMS_FA``);
3. a live ``nn.Module`` mapping a ``(B, N)`` waveform to ``(B, T, C)`` logits, with
   ``vocabulary=``, ``sample_rate=`` (and ``blank=``, default 0);
4. a ctclab model folder (``ctclab_acoustic_model.json``, written by :func:`save_acoustic_model`):
   an importable factory, its config, a state dict, the vocabulary, blank, word delimiter and
   sample rate.

The result, an :class:`AcousticModel`, knows its vocabulary, blank, sample rate and frame shift
(from the model's strides, or measured on two input lengths), and turns waveforms into
log-probs (:meth:`AcousticModel.log_probs`; long recordings through :mod:`ctclab.speech.windows`).
"""
from __future__ import annotations

import importlib
import inspect
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..formats import write_atomically
from ..vocab import Vocabulary
from ._extras import need

#: the file that marks a ctclab model folder
MODEL_FILE = "ctclab_acoustic_model.json"
FORMAT = 1


@dataclass(eq=False)
class AcousticModel:
    """A CTC acoustic model ready to run: waveform at ``sample_rate`` -> log-probs per frame.

    Attributes:
        module: the ``nn.Module`` (in eval mode, on ``device``).
        vocabulary: class index -> token string (:class:`ctclab.Vocabulary`), one per output class.
        blank: the blank's class index.
        sample_rate: the rate the model takes, in Hz.
        samples_per_frame: input samples per output frame (the product of the strides).
        word_delimiter: the token between words (``'|'``), None if words are separated by a
            ``' '`` token or not at all.
        normalize: the model expects each recording zero-mean, unit-variance (Hugging Face's
            ``do_normalize``).
        padding: how a batch of unequal inputs is given: ``'attention_mask'`` (Hugging Face
            models that take one), ``'zeros'`` (those that do not: zero-padded, as their
            feature extractor does), or None (inputs are only batched with inputs of the same
            length — generic modules, whose frames for a padded input cannot be told).
        name: where the model came from, for messages.
    """

    module: nn.Module
    vocabulary: Vocabulary
    blank: int
    sample_rate: int
    samples_per_frame: int
    word_delimiter: str | None = None
    normalize: bool = False
    padding: str | None = None
    name: str = "model"
    _run: Callable[[Tensor, Tensor], Tensor] | None = field(default=None, repr=False)
    _frames: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    @property
    def frame_shift(self) -> float:
        """Seconds per output frame (``samples_per_frame / sample_rate``; 0.02 for wav2vec2)."""
        return self.samples_per_frame / self.sample_rate

    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> "AcousticModel":
        self.module.to(device)
        return self

    def num_frames(self, num_samples: Tensor | int) -> Tensor:
        """Output frames for inputs of ``num_samples`` samples (a ``(B,)`` tensor or an int):
        the model's own length formula where it has one, else ``num_samples // samples_per_frame``."""
        n = torch.as_tensor(num_samples, dtype=torch.long)
        if self._frames is not None:
            return self._frames(n).long().clamp(min=0)
        return n // self.samples_per_frame

    @torch.inference_mode()
    def log_probs(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One forward pass over a batch.

        Args:
            waveforms: ``(B, N)`` float waveforms at :attr:`sample_rate` (already normalised if
                :attr:`normalize`), padded with zeros beyond ``lengths``.
            lengths: ``(B,)`` samples of each; None means all ``N``.

        Returns:
            ``(log_probs, frames)``: ``(B, T, C)`` float32 log-softmax on the model's device,
            and ``(B,)`` valid frames of each item.
        """
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (B, N), got shape {tuple(waveforms.shape)}")
        B, N = waveforms.shape
        lengths = torch.full((B,), N, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long().cpu()
        if self.padding is None and bool((lengths != N).any()):
            raise ValueError(f"{self.name} takes only batches of equal lengths (it has no padding rule), got lengths {lengths.tolist()}")
        x = waveforms.to(self.device, torch.float32)
        out = self._run(x, lengths) if self._run is not None else self.module(x)
        logits = _logits_of(out)
        if logits.dim() != 3 or logits.shape[0] != B:
            raise ValueError(f"{self.name} must return (B, T, C) logits for a (B, N) waveform, got shape {tuple(logits.shape)}")
        if logits.shape[2] != len(self.vocabulary):
            raise ValueError(f"{self.name} returns {logits.shape[2]} classes but its vocabulary has {len(self.vocabulary)} tokens")
        frames = self.num_frames(lengths).clamp(max=logits.shape[1]) if self.padding is not None else torch.full((B,), logits.shape[1])
        return logits.float().log_softmax(-1), frames

    def emissions(self, audio, **options) -> Tensor:
        """``(T, C)`` log-probs of one recording (a path, or a waveform at :attr:`sample_rate`),
        computed in windows (:func:`ctclab.speech.windows.windowed_log_probs`, ``options``
        passed on), on the CPU."""
        from .audio import read_audio
        from .windows import windowed_log_probs

        waveform = read_audio(audio, self.sample_rate) if isinstance(audio, (str, Path)) else torch.as_tensor(audio)
        return windowed_log_probs(self, [waveform], **options)[0]


def _logits_of(out: Any) -> Tensor:
    """The logits of a module's output: a tensor, a Hugging Face output's ``.logits``, or the
    first element of a tuple (torchaudio's ``(emissions, lengths)``)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the acoustic model must return (B, T, C) logits, got a {type(out).__name__}")


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is available: use device='cpu'")
    return device


def _vocabulary(vocabulary, size: int | None, where: str) -> Vocabulary:
    if vocabulary is None:
        raise ValueError(f"{where}: pass vocabulary= (a list of tokens, index = class, or a vocabulary file)")
    if isinstance(vocabulary, Vocabulary):
        vocab = vocabulary
    elif isinstance(vocabulary, (str, Path)):
        vocab = Vocabulary.load(vocabulary)
    else:
        vocab = Vocabulary(tuple(vocabulary))
    if size is not None and len(vocab) != size:
        raise ValueError(f"{where}: the model has {size} output classes but the vocabulary {len(vocab)} tokens")
    return vocab


def _check_blank(blank, vocab: Vocabulary, where: str) -> int:
    if isinstance(blank, bool) or not isinstance(blank, int) or not 0 <= blank < len(vocab):
        raise ValueError(f"{where}: blank must be a class index in [0, {len(vocab)}), got {blank!r}")
    return blank


def _check_sample_rate(sample_rate, where: str) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not sample_rate > 0 or sample_rate != int(sample_rate):
        raise ValueError(f"{where}: sample_rate must be a whole number of Hz > 0, got {sample_rate!r}")
    return int(sample_rate)


def _delimiter(word_delimiter, vocab: Vocabulary, where: str) -> str | None:
    if word_delimiter is None:
        return vocab.delimiter if vocab.delimiter == "|" else None
    if word_delimiter not in vocab.tokens:
        raise ValueError(f"{where}: word_delimiter {word_delimiter!r} is not in the vocabulary")
    return word_delimiter


def _accepts_lengths(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


@torch.inference_mode()
def _measure_samples_per_frame(run: Callable[[Tensor], Tensor], sample_rate: int, device: torch.device, where: str) -> int:
    """Samples per frame from the frame counts of two inputs (1 s and 2 s)."""
    counts = []
    for seconds in (1, 2):
        x = torch.zeros(1, seconds * sample_rate, device=device)
        counts.append(_logits_of(run(x)).shape[1])
    if counts[1] <= counts[0]:
        raise ValueError(f"{where}: cannot measure the frame shift: 1 s and 2 s of audio give {counts[0]} and {counts[1]} frames")
    return max(1, round(sample_rate / (counts[1] - counts[0])))


def _generic(module: nn.Module, vocabulary, blank, sample_rate, word_delimiter, device, name: str,
             normalize: bool = False) -> AcousticModel:
    where = f"acoustic model {name}"
    rate = _check_sample_rate(sample_rate, where) if sample_rate is not None else None
    if rate is None:
        raise ValueError(f"{where}: pass sample_rate= (the rate the module takes, in Hz)")
    module = module.to(device).eval()
    takes_lengths = _accepts_lengths(module)
    run = (lambda x, n: module(x, n.to(x.device))) if takes_lengths else (lambda x, n: module(x))
    spf = getattr(module, "samples_per_frame", None)
    if not (isinstance(spf, int) and spf > 0):
        spf = _measure_samples_per_frame(lambda x: run(x, torch.tensor([x.shape[1]])), rate, device, where)
    with torch.inference_mode():
        size = _logits_of(run(torch.zeros(1, max(rate, 4 * spf), device=device), torch.tensor([max(rate, 4 * spf)]))).shape[-1]
    vocab = _vocabulary(vocabulary, size, where)
    blank = _check_blank(0 if blank is None else blank, vocab, where)
    return AcousticModel(module, vocab, blank, rate, int(spf), _delimiter(word_delimiter, vocab, where), normalize,
                         None, name, run)


# -- Hugging Face -----------------------------------------------------------------------------
def _hf_vocabulary(tokenizer, size: int) -> list[str]:
    tokens = [f"<unused-{k}>" for k in range(size)]
    for token, index in tokenizer.get_vocab().items():
        if 0 <= index < size:
            tokens[index] = token
    return tokens


def _huggingface(folder: Path, device, vocabulary, blank, sample_rate) -> AcousticModel:
    transformers = need("transformers")
    transformers.logging.set_verbosity_error()  # its progress bars and notices are not ctclab's output
    transformers.utils.logging.disable_progress_bar()
    where = f"acoustic model {str(folder)!r}"
    try:
        module = transformers.AutoModelForCTC.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{where} is not a Hugging Face CTC model folder: {str(error).splitlines()[0]}") from None
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = getattr(processor, "tokenizer", processor)
        extractor = getattr(processor, "feature_extractor", None)
    except (OSError, ValueError, KeyError, TypeError):
        processor, tokenizer, extractor = None, None, None
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        if vocabulary is None:
            raise ValueError(f"{where} has no tokenizer (vocab.json): pass vocabulary=")
        tokenizer = None
    size = module.config.vocab_size
    vocab = _vocabulary(vocabulary if vocabulary is not None else _hf_vocabulary(tokenizer, size), size, where)
    if blank is None:
        blank = module.config.pad_token_id if module.config.pad_token_id is not None else getattr(tokenizer, "pad_token_id", 0)
    blank = _check_blank(blank, vocab, where)
    rate = sample_rate if sample_rate is not None else getattr(extractor, "sampling_rate", None)
    if rate is None:
        raise ValueError(f"{where} has no feature extractor (preprocessor_config.json) giving the sample rate: pass sample_rate=")
    rate = _check_sample_rate(rate, where)
    delimiter = getattr(tokenizer, "word_delimiter_token", None) if tokenizer is not None else None
    delimiter = delimiter if delimiter in vocab.tokens else None
    module = module.to(device).eval()
    strides = getattr(module.config, "conv_stride", None)
    spf = math.prod(strides) if strides else None
    frames = getattr(module, "_get_feat_extract_output_lengths", None)
    if spf is None:
        spf = _measure_samples_per_frame(lambda x: module(input_values=x), rate, device, where)
    use_mask = bool(getattr(extractor, "return_attention_mask", False))

    def run(x: Tensor, lengths: Tensor) -> Tensor:
        if not use_mask:
            return module(input_values=x)
        mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.device, torch.long)
        return module(input_values=x, attention_mask=mask)

    return AcousticModel(module, vocab, blank, rate, int(spf), _delimiter(delimiter, vocab, where),
                         bool(getattr(extractor, "do_normalize", False)), "attention_mask" if use_mask else "zeros",
                         str(folder), run, frames)


# -- torchaudio -------------------------------------------------------------------------------
def _is_torchaudio_bundle(obj) -> bool:
    return type(obj).__module__.startswith("torchaudio") and hasattr(obj, "get_model") and hasattr(obj, "sample_rate")


def _torchaudio(bundle, device, vocabulary, blank) -> AcousticModel:
    if vocabulary is None:
        try:
            vocabulary = list(bundle.get_labels(star=None))  # MMS_FA: no <star> column (ctclab has its own)
        except TypeError:
            vocabulary = list(bundle.get_labels())
    module = bundle.get_model()
    return _generic(module, vocabulary, blank, int(bundle.sample_rate), None, device, type(bundle).__name__)


# -- ctclab model folders -------------------------------------------------------------------------
def _import_factory(spec: str, where: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{where}: factory must be 'module:callable', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{where}: cannot import the factory {spec!r}: {error}") from None
    if not callable(target):
        raise ValueError(f"{where}: the factory {spec!r} is not callable")
    return target


def _ctclab_folder(folder: Path, device) -> AcousticModel:
    where = f"acoustic model {str(folder)!r}"
    try:
        meta = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: cannot read {MODEL_FILE}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: {MODEL_FILE} must be a JSON object with \"format\": {FORMAT}")
    missing = [k for k in ("factory", "weights", "vocabulary", "sample_rate") if k not in meta]
    if missing:
        raise ValueError(f"{where}: {MODEL_FILE} lacks {', '.join(missing)}")
    factory = _import_factory(meta["factory"], where)
    config = meta.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config in {MODEL_FILE} must be a JSON object (the factory's keyword arguments)")
    module = factory(**config)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{where}: the factory {meta['factory']!r} returned a {type(module).__name__}, not an nn.Module")
    try:
        state = torch.load(folder / meta["weights"], map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        raise ValueError(f"{where}: cannot load the weights {meta['weights']!r}: {str(error).splitlines()[0]}") from None
    return _generic(module, meta["vocabulary"], meta.get("blank", 0), meta["sample_rate"], meta.get("word_delimiter"),
                    device, str(folder), bool(meta.get("normalize", False)))


def load_acoustic_model(
    path_or_module, device: str | torch.device | None = None, vocabulary: Sequence[str] | str | Path | None = None,
    blank: int | None = None, sample_rate: int | None = None,
) -> AcousticModel:
    """An :class:`AcousticModel` from a local folder (Hugging Face or ctclab), a torchaudio
    bundle, or a live ``nn.Module``. Nothing is downloaded.

    Args:
        path_or_module: a folder with ``config.json`` (Hugging Face: ``AutoModelForCTC`` and its
            processor) or ``ctclab_acoustic_model.json`` (:func:`save_acoustic_model`); a
            torchaudio pipeline bundle; or an ``nn.Module`` mapping ``(B, N)`` float waveforms
            (and optionally ``(B,)`` lengths in samples) to ``(B, T, C)`` logits.
        device: ``'cpu'``, ``'cuda'``, ... (default: CUDA when available, else CPU).
        vocabulary: tokens (index = class) or a vocabulary file (:meth:`ctclab.Vocabulary.load`);
            required for a module, overrides a folder's.
        blank: the blank class (default: the model's pad token for Hugging Face, 0 otherwise).
        sample_rate: in Hz; required for a module, overrides a folder's.

    Raises:
        ValueError: a path that is not a model folder, a vocabulary that does not match the
            model's classes, a missing sample rate; ImportError without the ``speech`` extra.
    """
    device = _device(device)
    if isinstance(path_or_module, AcousticModel):
        return path_or_module.to(device)
    if isinstance(path_or_module, nn.Module):
        return _generic(path_or_module, vocabulary, blank, sample_rate, None, device, type(path_or_module).__name__)
    if _is_torchaudio_bundle(path_or_module):
        return _torchaudio(path_or_module, device, vocabulary, blank)
    if not isinstance(path_or_module, (str, Path)):
        raise TypeError(f"load_acoustic_model takes a model folder, a torchaudio bundle or an nn.Module, got {type(path_or_module).__name__}")
    folder = Path(path_or_module)
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else "a file, not a model folder"
        raise ValueError(f"acoustic model {str(folder)!r}: {what} (give a local folder with config.json or {MODEL_FILE}; "
                         "ctclab does not download models)")
    if (folder / MODEL_FILE).is_file():
        model = _ctclab_folder(folder, device)
        if vocabulary is not None or blank is not None or sample_rate is not None:
            model = _generic(model.module, vocabulary or model.vocabulary.tokens, model.blank if blank is None else blank,
                             sample_rate or model.sample_rate, model.word_delimiter, device, model.name, model.normalize)
        return model
    if (folder / "config.json").is_file():
        return _huggingface(folder, device, vocabulary, blank, sample_rate)
    raise ValueError(f"acoustic model {str(folder)!r} holds neither config.json (Hugging Face) nor {MODEL_FILE} (ctclab)")


def save_acoustic_model(
    folder: str | Path, module: nn.Module, *, factory: str | Callable[..., nn.Module], config: dict | None = None,
    vocabulary: Sequence[str], blank: int = 0, word_delimiter: str | None = None, sample_rate: int,
    normalize: bool = False,
) -> Path:
    """Write a ctclab model folder: ``model.pt`` (the state dict) and ``ctclab_acoustic_model.json``,
    each atomically, so :func:`load_acoustic_model` rebuilds the module as ``factory(**config)``.

    Args:
        folder: made if missing.
        module: the trained module (its ``state_dict`` is saved, on the CPU).
        factory: ``'package.module:callable'``, or the callable itself (it must be importable).
        config: the factory's keyword arguments (JSON-serialisable).
        vocabulary: the tokens, index = class.
        blank, word_delimiter, sample_rate: as :class:`AcousticModel`'s (word_delimiter None: a
            ``'|'`` token if there is one).
        normalize: the module expects zero-mean, unit-variance recordings.

    Returns:
        The folder.
    """
    if callable(factory):
        factory = f"{factory.__module__}:{factory.__qualname__}"
    where = "save_acoustic_model"
    _import_factory(factory, where)
    vocab = _vocabulary(vocabulary, None, where)
    meta = {
        "format": FORMAT, "factory": factory, "config": dict(config or {}), "weights": "model.pt",
        "vocabulary": list(vocab.tokens), "blank": _check_blank(blank, vocab, where),
        "word_delimiter": _delimiter(word_delimiter, vocab, where), "sample_rate": _check_sample_rate(sample_rate, where),
        "normalize": bool(normalize),
    }
    try:
        text = json.dumps(meta, indent=2, ensure_ascii=False)
    except TypeError as error:
        raise ValueError(f"{where}: config must be JSON-serialisable: {error}") from None
    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(folder / "model.pt", lambda f: f.write(buffer.getvalue()))
    write_atomically(folder / MODEL_FILE, lambda f: f.write((text + "\n").encode("utf-8")))
    return folder
