"""The ``ctclab`` command line.

Every failure is one line on standard error, ``ctclab COMMAND: error: ...``, and exit status 2
(usage: a bad flag or value, a path that names no file) or 1 (data: an unreadable or malformed
file, shapes that contradict each other, NaN in the emissions, a text that cannot be aligned,
an output that cannot be written). Output files are written atomically: a temporary file in
the destination folder, then a rename, so a failed or interrupted write leaves the previous
file as it was. Set ``CTCLAB_TRACEBACK=1`` to see the traceback of an unexpected error.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable

from .formats import EXTENSIONS  # ctclab (hence torch) is imported with the command anyway

EMISSION_KEYS = ("logits", "log_probs", "emissions")
LENGTH_KEYS = ("input_lengths", "lengths")
PER_FILE_FORMATS = ("textgrid", "srt", "vtt")


class CommandError(Exception):
    """A failure reported in one line: ``status`` 1 for data errors, 2 for usage errors."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _usage(message: str) -> CommandError:
    return CommandError(message, 2)


def _one_line(error: BaseException) -> str:
    """The first line of an exception's message, its type when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = re.sub(r"\x1b\[[0-9;]*m", "", lines[0])
    if len(line) > 200 and ". " in line:  # torch's messages run on: keep the first sentence
        line = line[: line.index(". ") + 1]
    return line


# -- argument types ---------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        T, B, C, L = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be T,B,C,L (four integers), got {text!r}") from None
    if min(T, B, C, L) < 0 or C < 2 or T < 1 or B < 1:
        raise argparse.ArgumentTypeError(f"--shape needs T, B >= 1, C >= 2, L >= 0, got {text!r}")
    return T, B, C, L


def _finite(positive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float (``positive``: > 0); NaN and infinities are usage errors."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or (positive and value <= 0):
            raise argparse.ArgumentTypeError(f"must be a finite number{' > 0' if positive else ''}, got {text!r}")
        return value

    return parse


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


# -- files in -----------------------------------------------------------------------------------
def _require_file(flag: str, path: str | None, what: str | None = None) -> None:
    """A path given on the command line must name a file (exit 2 otherwise: a usage error)."""
    if path is None:
        return
    name = f"{what} {path!r} ({flag})" if what else f"{flag} {path!r}"
    if not os.path.exists(path):
        raise _usage(f"cannot read {name}: no such file")
    if os.path.isdir(path):
        raise _usage(f"cannot read {name}: it is a folder, not a file")


def _load_array_file(path: str, what: str):
    """The object a ``.pt``, ``.npy`` or ``.npz`` file holds: a tensor, a dict of them, or an
    ``np.lib.npyio.NpzFile``'s arrays as a dict. Raises CommandError (exit 1) for anything unreadable."""
    import numpy as np
    import torch

    suffix = Path(path).suffix.lower()
    if suffix not in (".pt", ".pth", ".npy", ".npz"):
        raise _usage(f"{what} must be a .pt, .npy or .npz file, got {path!r}")
    try:
        if os.path.getsize(path) == 0:
            raise CommandError(f"cannot read {what} from {path!r}: the file is empty")
        with open(path, "rb") as f:
            magic = f.read(6)
        numpy_file = magic.startswith((b"\x93NUMPY", b"PK"))  # .npy, or .npz (a zip archive)
        torch_file = magic.startswith((b"PK", b"\x80"))  # torch.save's zip archive, or its legacy pickle
        if not (numpy_file if suffix in (".npy", ".npz") else torch_file):
            kind = "a NumPy .npy or .npz file" if suffix in (".npy", ".npz") else "a file written by torch.save"
            raise CommandError(f"cannot read {what} from {path!r}: it is not {kind}")
        if suffix in (".npy", ".npz"):
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    return {key: loaded[key] for key in loaded.files}
            return loaded
        return torch.load(path, map_location="cpu", weights_only=True)
    except CommandError:
        raise
    except Exception as error:  # torch and numpy raise a dozen kinds for damaged files
        message = str(error)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if found:
            reason = (f"it holds a {found.group(1)}, which is not loaded (weights_only=True, for safety): "
                      "save a tensor or a dict of tensors, e.g. torch.save(outputs.logits, path) or torch.save(dict(outputs), path)")
        elif "allow_pickle" in message:
            reason = "it holds Python objects (pickled), which are not loaded: save a numeric array"
        else:
            reason = f"the file is damaged or incomplete ({_one_line(error)})"
        raise CommandError(f"cannot read {what} from {path!r}: {reason}") from None


def load_emissions(path: str):
    """``(emissions, lengths, logits)`` from a ``.pt`` file holding a tensor or a dict (as saved from
    a Hugging Face model's output: ``torch.save(dict(outputs), path)``) with a ``logits``,
    ``log_probs`` or ``emissions`` tensor, a ``.npy`` array, or a ``.npz`` archive with one of
    those keys (or a single array). ``lengths`` comes from an ``input_lengths`` or ``lengths``
    entry when there is one (else None); ``logits`` is True when the emissions came under the
    ``logits`` key (they will be normalised). Shapes are checked by the caller."""
    import numpy as np
    import torch

    data = _load_array_file(path, "emissions")
    lengths, logits = None, False
    if isinstance(data, dict):
        key = next((k for k in EMISSION_KEYS if k in data), None)
        if key is None:
            arrays = [k for k, v in data.items() if isinstance(v, (torch.Tensor, np.ndarray)) and k not in LENGTH_KEYS]
            if len(arrays) != 1:
                raise CommandError(f"cannot read emissions from {path!r}: it holds a dict with keys {sorted(map(str, data))}, "
                                   "and none is 'logits', 'log_probs' or 'emissions'")
            key = arrays[0]
        length_key = next((k for k in LENGTH_KEYS if k in data), None)
        lengths = data[length_key] if length_key is not None else None
        logits, data = key == "logits", data[key]
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.floating):
            raise CommandError(f"emissions in {path!r} must be floating-point log-probs, got an array of {data.dtype}")
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, torch.Tensor):
        raise CommandError(f"emissions in {path!r} must be a tensor of log-probs (T, C) or (T, B, C), got a {type(data).__name__}")
    if not data.is_floating_point():
        raise CommandError(f"emissions in {path!r} must be floating-point log-probs, got a tensor of {data.dtype}")
    if data.dim() not in (2, 3) or min(data.shape) < 1:
        raise CommandError(f"emissions in {path!r} must be (T, C) or (T, B, C) (or (B, T, C) with --batch-first), "
                           f"got shape {tuple(data.shape)}")
    data = data.detach()
    if lengths is not None:
        lengths = _as_lengths(lengths, f"the lengths in {path!r}")
    return data, lengths, logits


def _as_lengths(value, what: str):
    import numpy as np
    import torch

    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise CommandError(f"{what} must be integers, got {type(value).__name__}") from None
    if tensor.is_floating_point() and bool((tensor != tensor.round()).any()):
        raise CommandError(f"{what} must be whole numbers of frames")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise CommandError(f"{what} must be integers, got {tensor.dtype}")
    return tensor.reshape(-1).long()


def _read_lengths(text: str):
    """``--lengths``: comma-separated frame counts, or a file (.pt, .npy, or text) holding them."""
    if re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
        import torch

        return torch.tensor([int(v) for v in text.split(",")])
    if re.fullmatch(r"[\s\d,+-]+", text):
        raise _usage(f"--lengths must be frame counts >= 0 separated by commas (e.g. 120,98), got {text!r}")
    if not os.path.isfile(text):
        raise _usage(f"--lengths {text!r} is neither frame counts separated by commas (e.g. 120,98) nor a file")
    if Path(text).suffix.lower() in (".pt", ".pth", ".npy", ".npz"):
        data = _load_array_file(text, "--lengths")
        if isinstance(data, dict):
            key = next((k for k in LENGTH_KEYS if k in data), None)
            if key is None:
                raise CommandError(f"--lengths {text!r} holds a dict without {' or '.join(LENGTH_KEYS)}")
            data = data[key]
        return _as_lengths(data, f"--lengths {text!r}")
    try:
        words = Path(text).read_text(encoding="utf-8").replace(",", " ").split()
        import torch

        return torch.tensor([int(w) for w in words])
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"cannot read --lengths {text!r}: {_one_line(error)}") from None
    except ValueError:
        raise CommandError(f"--lengths {text!r} must hold whole numbers of frames separated by spaces, commas or newlines") from None


# -- files out ----------------------------------------------------------------------------------
def _check_output(flag: str, path: str | None, folder: bool = False) -> None:
    """Before anything is computed: ``path`` (or, for ``folder``, the folder) can be written —
    missing folders will be created — else CommandError naming the flag."""
    if path is None:
        return
    target = Path(path)
    if folder:
        if target.exists() and not target.is_dir():
            raise _usage(f"{flag} {path!r} is a file, not a folder")
    elif target.is_dir() or path.endswith(("/", os.sep)):
        raise _usage(f"{flag} {path!r} is a folder: give a file name")
    ancestor = (target if folder else target.parent).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _usage(f"{flag} {path!r}: {str(ancestor)!r} is a file, so no folder can be made there")
    problem = None if os.access(ancestor, os.W_OK | os.X_OK) else "is not writable"
    if problem is None:
        try:  # permissions can say yes where writes fail (root, read-only mounts): try one
            tempfile.TemporaryFile(dir=ancestor, prefix=".ctclab-probe-").close()
        except OSError as error:
            problem = f"cannot be written ({error.strerror or _one_line(error)})"
    if problem is not None:
        raise CommandError(f"cannot write {flag} {path!r}: the folder {str(ancestor)!r} {problem}")


def _write_output(flag: str, path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    from . import formats

    try:
        formats.write_atomically(path, write)
    except OSError as error:
        raise CommandError(f"cannot write {flag} {str(path)!r}: {error.strerror or _one_line(error)}") from None


def _write_text(flag: str, path: str | Path, text: str) -> None:
    _write_output(flag, path, lambda f: f.write(text.encode("utf-8")))


# -- bench --------------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    from . import bench

    _check_output("--json", args.json)
    shapes = list(args.shape or [])
    if args.grid:
        shapes += bench.GRID
    shapes = shapes or ([] if args.hard else [bench.SEED_SHAPE])
    progress = (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
    results = bench.run(
        shapes, device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
        memory=not args.no_memory, impls=args.impl or ("builtin", "autograd", "fused"), progress=progress,
        hard=bench.HARD_CASES if args.hard else (),
    )
    print(bench.format_results(results))
    if args.json:
        _write_text("--json", args.json, bench.to_json(results))
    return 0


# -- emissions, checked -------------------------------------------------------------------------
def _load_vocab(args: argparse.Namespace):
    from .vocab import Vocabulary

    vocab = Vocabulary.load(args.vocab)
    if not 0 <= args.blank < len(vocab):
        raise _usage(f"--blank must be a class index in [0, {len(vocab)}) for the {len(vocab)} tokens of --vocab, got {args.blank}")
    return vocab


def _emissions(args: argparse.Namespace, vocab, command: str, utterances: int | None = None):
    """Time-major ``(T, B, C)`` log-probs and ``(B,)`` lengths from EMISSIONS, checked: layout
    against ``utterances`` (the number of texts) and the lengths, classes against the
    vocabulary, no NaN or infinity, log-probs (``--log-softmax`` or a ``logits`` entry
    normalise). Frames beyond an utterance's length are made uniform, so they can do no harm."""
    import torch

    raw, file_lengths, logits = load_emissions(args.emissions)
    shape = tuple(raw.shape)
    tolerance = {torch.float64: 1e-3, torch.float32: 1e-2}.get(raw.dtype, 5e-2)  # of log-sum-exp = 0
    if raw.dtype not in (torch.float32, torch.float64):
        raw = raw.float()
    if raw.dim() == 2:
        batch, layout = raw[:, None], "(T, C)"
    elif args.batch_first:
        batch, layout = raw.transpose(0, 1), "(B, T, C) (--batch-first)"
    else:
        batch, layout = raw, "(T, B, C)"
    T, B, C = batch.shape
    other = None  # (frames, utterances) the other layout would give
    if raw.dim() == 3:
        other = (shape[0], shape[1]) if args.batch_first else (shape[1], shape[0])
    flip = "drop --batch-first (they look time-major, (T, B, C))" if args.batch_first else "pass --batch-first (they look batch-major, (B, T, C))"
    where = f"EMISSIONS {args.emissions!r} of shape {shape} read as {layout}"

    if utterances is not None and B != utterances:
        hint = f": {flip}" if other is not None and other[1] == utterances else ""
        raise CommandError(f"{where} hold {B} utterance(s) but {utterances} text(s) were given{hint}")
    if utterances is None and raw.dim() == 3 and not args.batch_first:
        if T == 1 and B > 1:
            raise CommandError(f"{where} are {B} utterances of one frame each: {flip}")
        if T < B:
            print(f"ctclab {command}: warning: {where} have fewer frames ({T}) than utterances ({B}): "
                  f"if they are (B, T, C), pass --batch-first", file=sys.stderr)

    lengths, source = file_lengths, f"the lengths in {args.emissions!r}"
    if args.lengths is not None:
        lengths, source = _read_lengths(args.lengths), "--lengths"
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    elif lengths.numel() != B or bool((lengths < 0).any()) or bool((lengths > T).any()):
        fits_other = (other is not None and lengths.numel() == other[1] and lengths.numel() > 0
                      and bool((lengths >= 0).all()) and int(lengths.max()) <= other[0])
        problem = (f"has {lengths.numel()} value(s) for {B} utterance(s)" if lengths.numel() != B
                   else f"must be in [0, {T}] frames, got {lengths.tolist()}")
        raise CommandError(f"{source} {problem} of {where}" + (f": {flip}" if fits_other else ""))

    if C != len(vocab):
        raise CommandError(f"{where} have {C} classes but --vocab {args.vocab!r} has {len(vocab)} tokens")
    valid = torch.arange(T)[:, None] < lengths[None, :]  # (T, B)
    uniform = torch.tensor(-math.log(C), dtype=batch.dtype)
    batch = torch.where(valid[..., None], batch, uniform)
    bad = torch.isnan(batch).any(-1)
    if bool(bad.any()):
        t, b = (int(v) for v in torch.nonzero(bad)[0])
        raise CommandError(f"EMISSIONS {args.emissions!r} contain NaN ({int(bad.sum())} frame(s), the first: utterance {b + 1}, frame {t} counting from 0)")
    bad = (batch == math.inf).any(-1)
    if bool(bad.any()):
        t, b = (int(v) for v in torch.nonzero(bad)[0])
        raise CommandError(f"EMISSIONS {args.emissions!r} contain +inf ({int(bad.sum())} frame(s), the first: utterance {b + 1}, frame {t} counting from 0)")
    if args.log_softmax or logits:
        if bool((batch == -math.inf).all(-1).any()):
            t, b = (int(v) for v in torch.nonzero((batch == -math.inf).all(-1))[0])
            raise CommandError(f"EMISSIONS {args.emissions!r} are logits with every class -inf at utterance {b + 1}, frame {t} (counting from 0): they cannot be normalised")
        batch = batch.log_softmax(-1)
    else:
        total = batch.double().logsumexp(-1)  # 0 for log-probs
        bad = ~(total.abs() <= tolerance)
        if bool(bad.any()):
            t, b = (int(v) for v in torch.nonzero(bad)[0])
            raise CommandError(
                f"EMISSIONS {args.emissions!r} are not log-probabilities: at utterance {b + 1}, frame {t} (counting from 0) the probabilities "
                f"sum to {math.exp(float(total[t, b])):.4g}, not 1; if they are logits pass --log-softmax "
                "(probabilities: save their log)")
    return batch, lengths


# -- align --------------------------------------------------------------------------------------
def _read_texts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The transcripts, and how to name each in messages."""
    if args.text is not None:
        return [args.text], ["--text"]
    try:
        lines = Path(args.text_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"cannot read --text-file {args.text_file!r}: {getattr(error, 'strerror', None) or _one_line(error)}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise CommandError(f"--text-file {args.text_file!r} is empty: it needs one transcript per utterance of EMISSIONS")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise CommandError(f"line {number} of --text-file {args.text_file!r} is empty: every utterance of EMISSIONS needs its transcript")
    return lines, [f"line {n} of --text-file {args.text_file!r}" for n in range(1, len(lines) + 1)]


def _align(args: argparse.Namespace) -> int:
    """``ctclab align``: audio with ``--model`` (:func:`_align_audio`), else EMISSIONS with
    ``--vocab`` and their transcripts."""
    import torch

    from .align import STAR, alignment_posteriors

    if args.model is not None:
        return _align_audio(args)
    _check_emissions_arguments(args)
    vocab = _load_vocab(args)
    texts, names = _read_texts(args)
    if args.format in PER_FILE_FORMATS and len(texts) > 1 and args.out_dir is None:
        raise _usage(f"--format {args.format} holds one utterance per file but {len(texts)} transcripts were given: "
                     f"pass --out-dir DIR to write one {EXTENSIONS[args.format]} file per utterance")

    batch, lengths = _emissions(args, vocab, "align", utterances=len(texts))
    encoded = []
    for text, name in zip(texts, names):
        try:
            encoded.append(vocab.encode(text, args.case))
        except ValueError as error:
            raise CommandError(f"{name}: {error}") from None
    star = [STAR] if args.star is not None else []
    rows = [star + ids + star for ids, _ in encoded]
    width = max(len(r) for r in rows)
    pad = 1 if args.blank != 1 else 0
    targets = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    target_lengths = torch.tensor([len(r) for r in rows])
    ids = [args.utterance] if len(texts) == 1 else [f"{args.utterance}-{b + 1}" for b in range(len(texts))]
    ali = _align_rows(args, batch, lengths, rows, targets, target_lengths, ids, names)
    posteriors = None
    if args.confidence:
        posteriors = alignment_posteriors(batch, targets, ali, lengths, target_lengths, args.blank, star=args.star)
    documents = _emission_documents(args, vocab, ali, posteriors, lengths, encoded, ids, names)
    figure = None
    if args.plot:  # drawn before anything is written: a failure here leaves no outputs half done
        from .plot import plot_alignment
        from .targets import state_occupation

        n = int(lengths[0])
        target = targets[0, : target_lengths[0]]
        occupation = state_occupation(batch[:n, 0], target, blank=args.blank, star=args.star)
        figure = plot_alignment(batch[:n, 0], target, ali.item(0), vocab, args.blank, occupation)
    _write_documents(args, ids, documents)
    if figure is not None:
        _save_figure(figure, args.plot, dpi=110)
    return 0


def _check_emissions_arguments(args: argparse.Namespace) -> None:
    """``ctclab align EMISSIONS``'s usage errors: what can be told from the arguments alone,
    before anything is read or computed. Fills in the defaults of the emissions mode."""
    for flag in ("manifest", "device", "shard", "plot_dir"):
        if getattr(args, flag) is not None:
            raise _usage(f"--{flag.replace('_', '-')} needs --model DIR (an acoustic model)")
    if args.resume or args.romanize:
        raise _usage(f"--{'resume' if args.resume else 'romanize'} needs --model DIR (an acoustic model)")
    if args.emissions is None:
        raise _usage("give EMISSIONS (a .pt, .npy or .npz file) with --vocab, or --model DIR with audio")
    if args.vocab is None:
        raise _usage("EMISSIONS need --vocab (the tokens of their classes)")
    if args.text is None and args.text_file is None:
        raise _usage("give the transcript: --text or --text-file")
    if len(args.format) != 1:
        raise _usage(f"--format takes one format for EMISSIONS, got {','.join(args.format)}")
    args.format = args.format[0]
    args.blank = 0 if args.blank is None else args.blank
    args.utterance = "utt" if args.utterance is None else args.utterance
    if args.out is not None and args.out_dir is not None:
        raise _usage("give --out or --out-dir, not both")
    if re.search(r"\s", args.utterance) or not args.utterance:
        raise _usage(f"--utterance must be one word without spaces (it is a CTM field), got {args.utterance!r}")
    if args.out_dir is not None and (re.search(r"[/\\]", args.utterance) or args.utterance in (".", "..")):
        raise _usage(f"--utterance {args.utterance!r} names the files in --out-dir: use no slashes")
    _check_output("--out", args.out)
    _check_output("--out-dir", args.out_dir, folder=True)
    _check_output("--plot", args.plot)
    if args.plot:
        _check_plot_format(args.plot)
    for flag, path, what in (("EMISSIONS", args.emissions, "emissions"), ("--vocab", args.vocab, "vocabulary file"),
                             ("--text-file", args.text_file, None)):
        _require_file(flag, path, what)


def _align_rows(args, batch, lengths, rows, targets, target_lengths, ids, names):
    """The alignment of every utterance; a CommandError naming the first that has no path and why."""
    from ._inputs import required_frames
    from .align import forced_align

    try:
        ali = forced_align(batch, targets, lengths, target_lengths, blank=args.blank, star=args.star, skip_infeasible=True)
    except ValueError as error:
        raise CommandError(f"cannot align: {_one_line(error)}") from None
    failed = [b for b in range(len(rows)) if not bool(ali.aligned[b])]
    if failed:
        b = failed[0]
        need, have = required_frames(rows[b]), int(lengths[b])
        why = (f"its text needs at least {need} frames (one per token, one more between repeated tokens) but it has {have}"
               if need > have else "every path through the emissions gives some token of its text probability 0")
        more = f" ({len(failed)} utterances cannot: {', '.join(ids[i] for i in failed[:5])}{', ...' if len(failed) > 5 else ''})" if len(failed) > 1 else ""
        raise CommandError(f"utterance {ids[b]!r} ({names[b]}) cannot be aligned: {why}{more}")
    return ali


def _emission_documents(args, vocab, ali, posteriors, lengths, encoded, ids, names) -> list:
    """One document per utterance in ``args.format``: a JSON object, or the format's text."""
    from . import formats
    from .align import STAR, token_spans, word_spans

    delimiter = vocab.index(vocab.delimiter) if vocab.delimiter is not None else None
    documents = []
    for b, spans in enumerate(token_spans(ali, blank=args.blank, posteriors=posteriors)):
        text_spans = [s for s in spans if s.token != STAR]
        grouping = dict(separator=delimiter) if delimiter is not None else dict(word_lengths=encoded[b][1])
        words = word_spans(text_spans, **grouping, vocab=vocab, frame_shift=args.frame_shift)
        if not words:
            raise CommandError(f"utterance {ids[b]!r} ({names[b]}) aligned to no words")
        if args.format == "json":
            documents.append(formats.to_json(spans, words, vocab, args.frame_shift, ids[b]))
        else:
            duration = int(lengths[b]) * args.frame_shift
            documents.append(formats.to_text(args.format, words, spans, vocab, args.frame_shift, ids[b], duration))
    return documents


def _write_documents(args, ids, documents) -> None:
    """The documents to ``--out-dir`` (one file per utterance), ``--out`` or stdout, atomically."""
    from . import formats

    if args.out_dir is not None:
        for name, document in zip(ids, documents):
            text = formats.dumps_json([document]) + "\n" if args.format == "json" else document
            _write_text("--out-dir", Path(args.out_dir) / f"{name}.{EXTENSIONS[args.format]}", text)
        return
    text = formats.dumps_json(documents) + "\n" if args.format == "json" else "".join(documents)
    if args.out:
        _write_text("--out", args.out, text)
    else:
        sys.stdout.write(text)


def _save_figure(figure, path: str, dpi: int) -> None:
    """Write a matplotlib ``figure`` to ``--plot`` ``path`` atomically, then close it."""
    import matplotlib.pyplot as plt

    try:
        _write_output("--plot", path, lambda f: figure.savefig(f, format=_plot_format(path), dpi=dpi))
    finally:
        plt.close(figure)


def _plot_format(path: str) -> str:
    return Path(path).suffix[1:].lower() or "png"


def _check_plot_format(path: str) -> None:
    try:
        from .plot import _pyplot

        _pyplot()
    except ImportError as error:
        raise CommandError(f"--plot: {error}") from None
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    if _plot_format(path) not in supported:
        raise _usage(f"--plot {path!r}: matplotlib writes {', '.join(sorted(supported))}, not {_plot_format(path)!r}")


# -- align from audio ---------------------------------------------------------------------------
def _format_list(text: str) -> list[str]:
    """``--format``: one format, or (with --manifest) several separated by commas."""
    names = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in EXTENSIONS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"must be json, ctm, textgrid, srt or vtt (several separated by commas), got {text!r}")
    return list(dict.fromkeys(names))


def _shard(text: str) -> tuple[int, int]:
    """``--shard I/N``: shard I (counting from 0) of N."""
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not found or not 0 <= int(found.group(1)) < int(found.group(2)):
        raise argparse.ArgumentTypeError(f"must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(found.group(1)), int(found.group(2))


def _audio_usage(args: argparse.Namespace) -> None:
    """The usage errors of ``align --model``, before anything is loaded."""
    for flag, given in (("--lengths", args.lengths), ("--batch-first", args.batch_first), ("--log-softmax", args.log_softmax),
                        ("--case", args.case != "keep"),
                        ("--frame-shift", args.frame_shift != 0.02)):
        if given:
            raise _usage(f"{flag} is for EMISSIONS files, not --model (case and frame shift follow the model)")
    if args.manifest is not None:
        if args.emissions is not None:
            raise _usage(f"give an audio file or --manifest, not both (got {args.emissions!r})")
        if args.text is not None or args.text_file is not None:
            raise _usage("--manifest items carry their own text: drop --text/--text-file")
        if args.out_dir is None:
            raise _usage("--manifest needs --out-dir DIR (one file per item and format)")
        for flag, given in (("--out", args.out), ("--plot", args.plot), ("--utterance", args.utterance)):
            if given is not None:
                raise _usage(f"{flag} is for one audio file; with --manifest use --out-dir" + (" and --plot-dir" if flag == "--plot" else ""))
    else:
        if args.emissions is None:
            raise _usage("--model needs an audio file (or --manifest M.jsonl)")
        if args.text is None and args.text_file is None:
            raise _usage("give the transcript of the audio: --text or --text-file")
        for flag, given in (("--resume", args.resume), ("--shard", args.shard), ("--plot-dir", args.plot_dir)):
            if given:
                raise _usage(f"{flag} is for --manifest corpora")
        if args.out is not None and args.out_dir is not None:
            raise _usage("give --out or --out-dir, not both")
        if len(args.format) > 1 and args.out_dir is None:
            raise _usage(f"several formats ({','.join(args.format)}) need --out-dir DIR")
        if args.utterance is not None and (not args.utterance or re.search(r"[\s/\\]", args.utterance)):
            raise _usage(f"--utterance must be one word without spaces or slashes, got {args.utterance!r}")
    if os.path.exists(args.model) and not os.path.isdir(args.model):
        raise _usage(f"--model {args.model!r} is a file: give the model's folder")
    if not os.path.exists(args.model):
        raise _usage(f"cannot read --model {args.model!r}: no such folder (ctclab does not download models; "
                     "see the README, 'From audio to word timestamps')")
    _require_file("AUDIO", args.emissions, "audio file")
    _require_file("--manifest", args.manifest, "manifest")
    _require_file("--text-file", args.text_file)
    _check_output("--out", args.out)
    _check_output("--out-dir", args.out_dir, folder=True)
    _check_output("--plot", args.plot)
    _check_output("--plot-dir", args.plot_dir, folder=True)
    if args.plot or args.plot_dir:
        _check_plot_format(args.plot or "x.png")


def _align_audio(args: argparse.Namespace) -> int:
    _audio_usage(args)
    try:
        from . import speech
    except ImportError as error:
        raise CommandError(str(error)) from None
    try:
        shard = args.shard or speech.shard_from_environment()
    except ValueError as error:
        raise _usage(str(error)) from None
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    try:
        model = speech.load_acoustic_model(args.model, device=device, vocabulary=args.vocab, blank=args.blank)
    except ImportError as error:
        raise CommandError(str(error)) from None
    options = dict(window=args.window, context=args.context, batch_seconds=args.batch_seconds, star=args.star,
                   romanize=args.romanize, confidence=args.confidence is not False)
    if args.manifest is not None:
        items = speech.read_manifest(args.manifest)
        progress = args.progress if args.progress is not None else sys.stderr.isatty()
        try:
            summary = speech.align_corpus(model, items, args.out_dir, formats=args.format, resume=args.resume, shard=shard,
                                          plot_dir=args.plot_dir, progress=progress, **options)
        except OSError as error:
            raise CommandError(f"cannot write --out-dir {args.out_dir!r}: {error.strerror or _one_line(error)}") from None
        if summary.failed:
            first = next(iter(summary.failed.items()))
            failures = Path(args.out_dir) / speech.corpus.FAILURES
            raise CommandError(f"{len(summary.failed)} of {len(summary.failed) + len(summary.aligned)} items could not be "
                               f"aligned (listed in {str(failures)!r}; the first, {first[0]!r}: {first[1]})")
        return 0
    text = args.text
    if text is None:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"cannot read --text-file {args.text_file!r}: {getattr(error, 'strerror', None) or _one_line(error)}") from None
    try:
        result = speech.align_audio(model, args.emissions, text, id=args.utterance, keep_log_probs=bool(args.plot), **options)
    except speech.AlignmentError as error:
        raise CommandError(f"cannot align {args.emissions!r} to its transcript: {_one_line(error)}") from None
    if args.plot:  # drawn before anything is written: a failure here leaves no outputs half done
        figure = speech.plot_audio_alignment(speech.read_audio(args.emissions, model.sample_rate), model.sample_rate, result)
    if args.out_dir is not None:
        for f in args.format:
            _write_text("--out-dir", Path(args.out_dir) / f"{result.id}.{EXTENSIONS[f]}", result.render(f))
    elif args.out is not None:
        _write_text("--out", args.out, result.render(args.format[0]))
    else:
        sys.stdout.write(result.render(args.format[0]))
    if args.plot:
        _save_figure(figure, args.plot, dpi=100)
    return 0


# -- decode -------------------------------------------------------------------------------------
def _decode(args: argparse.Namespace) -> int:
    from . import formats
    from .decode import BeamSearchDecoder
    from .lm import load_lm

    for flag, path, what in (("EMISSIONS", args.emissions, "emissions"), ("--vocab", args.vocab, "vocabulary file"),
                             ("--lm", args.lm, "LM file")):
        _require_file(flag, path, what)
    vocab = _load_vocab(args)
    emissions, lengths = _emissions(args, vocab, "decode")
    lm = load_lm(args.lm) if args.lm else None
    decoder = BeamSearchDecoder(vocab, blank=args.blank, beam_width=args.beam, lm=lm, alpha=args.alpha, beta=args.beta,
                                hotwords=args.hotword, hotword_weight=args.hotword_weight, frame_shift=args.frame_shift)
    results = decoder.decode(emissions, lengths, nbest=args.nbest)
    if args.format == "text":
        for hyps in results:
            print("\n".join(h.text for h in hyps))
    else:
        doc = [[{"text": h.text, "tokens": list(h.tokens), "acoustic_score": h.acoustic_score, "lm_score": h.lm_score,
                 "score": h.score, "words": [{"word": w.text, "start_frame": w.start, "end_frame": w.end,
                                              "start": w.start_time, "end": w.end_time}
                                             for w in h.words]} for h in hyps] for hyps in results]
        print(formats.strict_json(doc[0] if len(doc) == 1 else doc))
    return 0


# -- parser -------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage first), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``ctclab`` command line: every subcommand and option, declared in one place (one
    ``add_argument`` per option, which is why it runs past 80 lines: split up, the CLI's
    surface would be scattered over helpers that do nothing else)."""
    from .decode import DEFAULT_HOTWORD_WEIGHT  # loaded already: ctclab imports its decoder

    parser = _Parser(prog="ctclab", description="CTC loss, alignment and decoding on PyTorch.",
                                     epilog="Errors: exit status 2 for usage, 1 for data (set CTCLAB_TRACEBACK=1 for tracebacks).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the built-in CTC loss against ctclab's autograd and fused paths")
    b.add_argument("--shape", type=_shape, action="append", help="T,B,C,L (repeatable); default: the seed's 128,256,32,60")
    b.add_argument("--grid", action="store_true", help="add the standard grid of six shapes")
    b.add_argument("--hard", action="store_true", help="add the hard inputs (blank phase, confident and wrong, long inputs, "
                   "peaky, -inf columns); alone: only those")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    b.add_argument("--repeats", type=_at_least_one, default=10, help="timed runs per implementation (median reported)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--impl", action="append", choices=["builtin", "autograd", "fused"], help="subset to run (repeatable)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--json", metavar="FILE", help="write machine-readable results")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=_bench)

    def emission_arguments(align: bool) -> argparse.ArgumentParser:
        """What align and decode both read (align: EMISSIONS and --vocab optional, --model replaces them)."""
        p = _Parser(add_help=False)
        p.add_argument(
            "emissions", metavar="EMISSIONS" if not align else "INPUT", nargs="?" if align else None,
            help=("with --model: the audio file (any format soundfile reads); without: " if align else "")
            + "(T, C) or (T, B, C) (with --batch-first (B, T, C)) as .pt (a tensor, or a dict with 'logits', 'log_probs' "
              "or 'emissions', and optionally 'input_lengths'), .npy or .npz (the same keys); 'logits' are normalised "
              "(log-softmax), other emissions must be log-probs unless --log-softmax is given")
        p.add_argument("--vocab", required=not align, help="one token per line (line k = class k), or a JSON {token: index}"
                       + (" (with EMISSIONS)" if align else ""))
        p.add_argument("--blank", type=int, default=None if align else 0,
                       help="class index of blank (default 0" + ("; with --model: the model's)" if align else ")"))
        p.add_argument("--frame-shift", type=_finite(positive=True), default=0.02,
                       help="seconds per frame (default 0.02)")
        p.add_argument("--log-softmax", action="store_true", help="EMISSIONS are logits: normalise them first")
        p.add_argument("--batch-first", action="store_true",
                       help="EMISSIONS are batch-major (B, T, C), as Hugging Face models return them")
        p.add_argument("--lengths", metavar="N,N,...|FILE",
                       help="frames of each utterance of padded EMISSIONS (comma-separated, or a .pt/.npy/text file); "
                            "default: an 'input_lengths' entry of EMISSIONS, else all frames")
        return p

    a = sub.add_parser("align", parents=[emission_arguments(True)],
                       help="forced alignment of a transcript to emissions, or (--model) to audio, with word timings",
                       usage="%(prog)s EMISSIONS --vocab V (--text T | --text-file F) [...]\n"
                             "       %(prog)s --model DIR AUDIO --text T [--format F] [--out F] [--plot F.png]\n"
                             "       %(prog)s --model DIR --manifest M.jsonl --out-dir DIR [--format json,textgrid,...] [--resume] "
                             "[--shard I/N] [...]")
    text = a.add_mutually_exclusive_group()
    text.add_argument("--text", help="the transcript")
    text.add_argument("--text-file", help="transcripts, one line per utterance of EMISSIONS")
    a.add_argument("--format", type=_format_list, default=["json"],
                   help="json (a list for several utterances), ctm (lines of all utterances), or one utterance per file: "
                        "textgrid, srt, vtt (several utterances need --out-dir); with --manifest a comma-separated list")
    a.add_argument("--out", metavar="FILE", help="write there instead of standard output (missing folders are made)")
    a.add_argument("--out-dir", metavar="DIR", help="write one file per utterance there: DIR/<utterance>.<format>")
    a.add_argument("--plot", metavar="PNG", help="draw the alignment picture (first utterance; with --model: waveform, "
                                                 "emissions and words)")
    a.add_argument("--star", type=_finite(), metavar="PENALTY",
                   help="wildcard at start and end: audio the text lacks is absorbed there")
    a.add_argument("--case", choices=["keep", "upper", "lower"], default="keep", help="change the text's case before lookup")
    a.add_argument("--confidence", action=argparse.BooleanOptionalAction, default=None,
                   help="add posterior-based confidences (forward-backward; default: off for EMISSIONS, on with --model)")
    a.add_argument("--utterance", default=None, help="utterance id for CTM/JSON and --out-dir file names (default utt; "
                                                      "with --model the audio file's stem); several utterances are ID-1, ID-2, ...")
    speech = a.add_argument_group("from audio (--model; needs pip install 'ctclab[speech]')")
    speech.add_argument("--model", metavar="DIR", help="a local acoustic model folder: Hugging Face (config.json) or ctclab "
                                                       "(ctclab_acoustic_model.json); never downloaded")
    speech.add_argument("--manifest", metavar="JSONL", help="a corpus: JSON lines with audio (or audio_filepath), text and "
                                                            "an optional id; needs --out-dir")
    speech.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available; under torchrun "
                                                       "cuda:LOCAL_RANK)")
    speech.add_argument("--resume", action="store_true", help="skip items whose outputs exist (nothing is rewritten)")
    speech.add_argument("--batch-seconds", type=_finite(positive=True), default=120.0,
                        help="audio seconds per forward pass, windows of several files together (default 120)")
    speech.add_argument("--window", type=_finite(positive=True), default=30.0, help="seconds per window of long audio (default 30)")
    speech.add_argument("--context", type=_finite(), default=3.0, help="seconds of context either side of a window (default 3)")
    speech.add_argument("--shard", type=_shard, metavar="I/N", help="take shard I of N (from 0) of the manifest "
                                                                     "(default: RANK/WORLD_SIZE when set)")
    speech.add_argument("--plot-dir", metavar="DIR", help="with --manifest: a picture per item, DIR/<id>.png")
    speech.add_argument("--romanize", action="store_true", help="romanise words of scripts the model lacks (needs uroman)")
    speech.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on standard error (default: when it is a terminal)")
    a.set_defaults(func=_align)

    d = sub.add_parser("decode", parents=[emission_arguments(False)], help="prefix beam search decoding with an optional word n-gram LM")
    d.add_argument("--lm", help="ARPA word n-gram LM (kenlm is used when installed, else ctclab's reader)")
    d.add_argument("--alpha", type=_finite(), default=0.5, help="LM weight")
    d.add_argument("--beta", type=_finite(), default=1.0, help="word insertion bonus")
    d.add_argument("--beam", type=_at_least_one, default=100)
    d.add_argument("--hotword", action="append", help="a word to favour (repeatable)")
    d.add_argument("--hotword-weight", type=_finite(), default=DEFAULT_HOTWORD_WEIGHT,
                   help=f"bonus (natural log) per word of a hotword found in the transcript (default {DEFAULT_HOTWORD_WEIGHT:g})")
    d.add_argument("--nbest", type=_at_least_one, default=1)
    d.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: one line per hypothesis; json: strict JSON (a score that is not finite is null)")
    d.set_defaults(func=_decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here
    prefix = f"ctclab {args.command}: error:"
    try:
        return args.func(args)
    except CommandError as error:
        print(f"{prefix} {error}", file=sys.stderr)
        return error.status
    except ValueError as error:  # the library's checks of the data
        print(f"{prefix} {_one_line(error)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of standard output went away (e.g. `| head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("CTCLAB_TRACEBACK"):
            raise
        print(f"{prefix} unexpected {type(error).__name__}: {_one_line(error)} (set CTCLAB_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
