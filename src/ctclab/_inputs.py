"""Validation and normalisation of CTC inputs (shared by loss, alignment, targets and decoding).

Every public entry point funnels its arguments through :func:`ctc_batch`, which checks them
before any computation and returns one canonical, batch-padded form. The decoders, which take
no targets and accept an empty batch, funnel theirs through :func:`decoding_batch` and the same
score checks (:func:`check_scores`, :func:`first_dead_frame`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

Lengths = Union[Tensor, Sequence[int], int]


@dataclass(frozen=True)
class CTCBatch:
    """Canonical CTC inputs.

    Attributes:
        log_probs: ``(T, B, C)`` floating tensor (the caller's dtype and device).
        targets: ``(B, S)`` int64, padded; entries at or beyond ``target_lengths`` are ``blank``.
        input_lengths: ``(B,)`` int64 on ``log_probs.device``.
        target_lengths: ``(B,)`` int64 on ``log_probs.device``.
        blank: index of the blank class.
        unbatched: True when the caller passed ``(T, C)`` log-probs.
        max_input_length: ``max(input_lengths)`` as a Python int.
    """

    log_probs: Tensor
    targets: Tensor
    input_lengths: Tensor
    target_lengths: Tensor
    blank: int
    unbatched: bool
    max_input_length: int


def _lengths_tensor(name: str, value: Lengths, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers (int32 or int64), got dtype {value.dtype}")
        return value.to(device=device, dtype=torch.int64)
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)):
        raise TypeError(f"{name} must be a tensor, a sequence of ints or an int, got {type(value).__name__}")
    items = [value] if isinstance(value, int) else list(value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold integers, got {item!r}")
    return torch.tensor(items if not isinstance(value, int) else value, dtype=torch.int64, device=device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype CTC is computed in: half-precision inputs in float32, float32 and float64 as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def frame_mask(num_frames: int, input_lengths: Tensor) -> Tensor:
    """``(T, B)`` bool: frame ``t`` lies inside item ``b``'s input length."""
    return torch.arange(num_frames, device=input_lengths.device)[:, None] < input_lengths[None, :]


def first_invalid(log_probs: Tensor, input_lengths: Tensor) -> tuple[int, int, float] | None:
    """``(item, frame, value)`` of the first NaN or ``+inf`` inside an item's frames of
    ``(T, B, C)`` scores, or None. Beyond an item's input length is padding and does not count."""
    if not log_probs.numel():
        return None
    top = float(log_probs.detach().amax())  # one reduction; NaN if any NaN
    if top == top and top != torch.inf:
        return None
    bad = torch.isnan(log_probs) | (log_probs == torch.inf)
    bad = bad.any(-1) & frame_mask(log_probs.shape[0], input_lengths)
    if not bool(bad.any()):
        return None
    t, b = (int(i) for i in bad.nonzero()[0])
    value = float(log_probs[t, b][torch.isnan(log_probs[t, b]) | (log_probs[t, b] == torch.inf)][0])
    return b, t, value


def check_scores(log_probs: Tensor, input_lengths: Tensor, name: str = "log_probs") -> None:
    """Raise a ValueError naming the first item and frame whose scores hold NaN or ``+inf``
    (inside its input length): for alignment and posteriors, where neither has a meaningful
    answer (``-inf``, probability 0, is fine)."""
    where = first_invalid(log_probs, input_lengths)
    if where is not None:
        b, t, value = where
        raise ValueError(
            f"{name} hold {value} at item {b}, frame {t} (inside its input length): "
            "log-scores must be finite or -inf; check the model's output (what lies beyond an item's input length is ignored)"
        )


def time_major(log_probs: Tensor, batch_first: bool) -> Tensor:
    """``(B, T, C)`` -> ``(T, B, C)`` when ``batch_first`` (a view); anything else unchanged."""
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
    if batch_first and isinstance(log_probs, Tensor) and log_probs.dim() == 3:
        return log_probs.transpose(0, 1)
    return log_probs


def _checked_log_probs(log_probs: Tensor, blank: int) -> tuple[Tensor, bool]:
    """``log_probs`` as ``(T, B, C)`` and whether it came unbatched; checks its type, rank,
    batch and ``blank``."""
    if not isinstance(log_probs, Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    if not log_probs.is_floating_point():
        raise TypeError(f"log_probs must be a floating tensor (float16/bfloat16/float32/float64), got {log_probs.dtype}")
    if log_probs.dim() not in (2, 3):
        raise ValueError(f"log_probs must be (T, B, C) or (T, C), got shape {tuple(log_probs.shape)}")
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs = log_probs.unsqueeze(1)
    T, B, C = log_probs.shape
    if B == 0:
        raise ValueError("log_probs hold an empty batch (B = 0, shape (T, 0, C)): pass at least one item")
    if C < 1:
        raise ValueError("log_probs must have at least one class (C >= 1)")
    if isinstance(blank, bool) or not isinstance(blank, int):
        raise TypeError(f"blank must be an int, got {type(blank).__name__}")
    if not 0 <= blank < C:
        raise ValueError(f"blank must be in [0, C) = [0, {C}), got {blank}")
    return log_probs, unbatched


def _host_lengths(name: str, value: Lengths | None, size: int, default: int) -> np.ndarray:
    """``value`` as int64 numpy on the host (None: ``default`` for each of ``size`` items)."""
    if value is None:
        return np.full(size, default, dtype=np.int64)
    return _lengths_tensor(name, value, torch.device("cpu")).numpy()


def _checked_lengths(log_probs: Tensor, targets: np.ndarray, input_lengths, target_lengths, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """``(B,)`` int64 input and target lengths as host arrays (None: full length), in range.
    (Checked in numpy: a handful of torch reductions and syncs cost more than the whole graph.)"""
    T, B, _ = log_probs.shape
    if target_lengths is None and targets.ndim != 2:
        raise ValueError("target_lengths may be omitted only with padded (B, S) targets")
    input_lengths = _host_lengths("input_lengths", input_lengths, B, T)
    target_lengths = _host_lengths("target_lengths", target_lengths, targets.shape[0], targets.shape[-1])
    if B == 1:  # a 0-D length for a batch of one, as the built-in accepts
        input_lengths, target_lengths = input_lengths.reshape(-1), target_lengths.reshape(-1)
    for name, lengths in (("input_lengths", input_lengths), ("target_lengths", target_lengths)):
        if lengths.ndim != 1 or lengths.shape[0] != B:
            raise ValueError(
                f"{name} must have shape (B,) = ({B},) to match log_probs (T, B, C) = {tuple(log_probs.shape)}, "
                f"got {tuple(lengths.shape)}{hint}"
            )
    if int(input_lengths.min()) < 0:
        raise ValueError("input_lengths must be >= 0")
    if int(input_lengths.max()) > T:
        raise ValueError(f"input_lengths must be <= T = {T} (log_probs.shape[0]), got {int(input_lengths.max())}{hint}")
    if int(target_lengths.min()) < 0:
        raise ValueError("target_lengths must be >= 0")
    return input_lengths, target_lengths


def _padded_targets(targets: np.ndarray, target_lengths: np.ndarray, B: int) -> np.ndarray:
    """Padded ``(B, S)`` or concatenated ``(sum(target_lengths),)`` targets -> ``(B, max L)``
    (entries beyond an item's length unspecified)."""
    width = int(target_lengths.max())
    if targets.ndim == 2:
        if targets.shape[0] != B:
            raise ValueError(f"targets has batch size {targets.shape[0]}, log_probs has {B}")
        if width > targets.shape[1]:
            raise ValueError(f"target_lengths must be <= the padded target width {targets.shape[1]}, got {width}")
        return targets[:, :width]
    if targets.ndim != 1:
        raise ValueError(f"targets must be (B, S) padded or 1-D concatenated, got shape {tuple(targets.shape)}")
    total = int(target_lengths.sum())
    if targets.shape[0] != total:
        raise ValueError(f"concatenated 1-D targets must have length sum(target_lengths) = {total}, got {targets.shape[0]}")
    if not total:
        return np.zeros((B, width), dtype=np.int64)
    offsets = np.cumsum(target_lengths) - target_lengths
    index = offsets[:, None] + np.arange(width)
    return targets[np.minimum(index, total - 1)]


def required_frames(targets: Sequence[int]) -> int:
    """Frames the shortest standard CTC path through ``targets`` takes: one per token, one more
    between repeated tokens (a blank must separate them)."""
    return len(targets) + sum(1 for a, b in zip(targets, targets[1:]) if a == b)


def ctc_batch(
    log_probs: Tensor,
    targets: Tensor | None,
    input_lengths: Lengths | None,
    target_lengths: Lengths | None,
    blank: int = 0,
    *,
    check_target_values: bool = True,
    batch_first_hint: bool = False,
) -> CTCBatch:
    """Check CTC inputs and bring them to the canonical padded, batched form.

    Accepts what ``torch.nn.functional.ctc_loss`` accepts: ``log_probs`` ``(T, B, C)`` or ``(T, C)``;
    ``targets`` padded ``(B, S)``, concatenated ``(sum(target_lengths),)`` or unbatched ``(S,)``;
    lengths as int tensors (any device, 0-D for a batch of one), sequences or ints. ``None``
    lengths mean "full length" (the whole time axis, the whole padded target row).
    ``batch_first_hint``: the caller takes ``batch_first``; errors from lengths that would fit
    batch-major input say so.

    Raises:
        TypeError: non-floating ``log_probs``, non-integer targets or lengths.
        ValueError: wrong ranks, batch-size mismatches, lengths out of range, target values outside
            ``[0, C)`` or equal to ``blank``, ``blank`` outside ``[0, C)``, an empty batch (B = 0:
            like the built-in, which refuses it; every reduction of nothing would be made up).
    """
    log_probs, unbatched = _checked_log_probs(log_probs, blank)
    T, B, C = log_probs.shape
    device = log_probs.device
    if targets is None:
        raise TypeError("targets must be a tensor of class indices, got None")
    if not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    targets = targets.detach().cpu().numpy().astype(np.int64, copy=False)
    if unbatched:
        if targets.ndim != 1:
            raise ValueError(f"unbatched (T, C) log_probs need 1-D targets (S,), got shape {tuple(targets.shape)}")
        targets = targets[None]
    hint = "; if log_probs is batch-major (B, T, C), pass batch_first=True" if batch_first_hint and not unbatched else ""
    input_lengths, target_lengths = _checked_lengths(log_probs, targets, input_lengths, target_lengths, hint)
    padded = _padded_targets(targets, target_lengths, B)
    valid = np.arange(padded.shape[1]) < target_lengths[:, None]
    if check_target_values and padded.size:
        bad = valid & ((padded < 0) | (padded >= C) | (padded == blank))
        if bad.any():
            b, s = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"targets must be class indices in [0, C) = [0, {C}) other than blank={blank}; "
                f"item {b} position {s} holds {int(padded[b, s])}"
            )
    padded = np.where(valid, padded, blank)
    on_device = (lambda x: torch.from_numpy(x)) if device.type == "cpu" else (lambda x: torch.from_numpy(x).to(device))
    return CTCBatch(
        log_probs=log_probs,
        targets=on_device(padded),
        input_lengths=on_device(input_lengths),
        target_lengths=on_device(target_lengths),
        blank=blank,
        unbatched=unbatched,
        max_input_length=int(input_lengths.max()),
    )


def decoding_batch(log_probs, input_lengths: Lengths | None, batch_first: bool) -> tuple[Tensor, Tensor]:
    """``(T, B, C)`` scores and ``(B,)`` int64 CPU lengths from what the decoders take:
    ``(T, B, C)``, ``(B, T, C)`` with ``batch_first`` (through :func:`time_major`), or one
    ``(T, C)`` utterance; lengths None (all ``T``), a tensor, a sequence or an int
    (:func:`_lengths_tensor`). An empty batch is legal here (it decodes to nothing), unlike in
    :func:`ctc_batch`, whose other checks (targets, blank) a decoder has no use for.

    Lengths that contradict the shape are an error that says which axis is which and which way
    to set ``batch_first`` (the usual cause: Hugging Face's ``(B, T, C)`` logits passed
    time-major). Without lengths, a time-major ``(1, B, C)`` input with ``B > 1`` decodes as B
    one-frame utterances, which is legal but rarely meant: a :class:`UserWarning` says so (at
    the caller of the function that calls this one)."""
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
    if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point() or log_probs.dim() not in (2, 3):
        raise TypeError("log_probs must be a floating tensor of shape (T, B, C), (B, T, C) with batch_first=True, or (T, C)")
    layout = "(T, C)" if log_probs.dim() == 2 else "(B, T, C)" if batch_first else "(T, B, C)"
    described = f"log_probs {layout} = {tuple(log_probs.shape)}"
    log_probs = log_probs.unsqueeze(1) if log_probs.dim() == 2 else time_major(log_probs, batch_first)
    T, B, C = log_probs.shape
    other = "" if layout == "(T, C)" else (
        "; pass batch_first=True for (B, T, C) input" if not batch_first else "; drop batch_first=True for (T, B, C) input")
    if input_lengths is None:
        if layout == "(T, B, C)" and T == 1 and B > 1:
            warnings.warn(f"{described} decodes as {B} utterances of one frame each; if it is one (B, T, C) = (1, {B}, {C}) "
                          "utterance, pass batch_first=True (or give input_lengths to silence this)", UserWarning, stacklevel=3)
        return log_probs, torch.full((B,), T, dtype=torch.int64)
    lengths = _lengths_tensor("input_lengths", input_lengths, torch.device("cpu")).reshape(-1)
    if len(lengths) != B:
        raise ValueError(f"input_lengths has {len(lengths)} entries but {described} has B={B} items{other}")
    if B and int(lengths.min()) < 0:
        raise ValueError(f"input_lengths must be >= 0, got {int(lengths.min())}")
    if B and int(lengths.max()) > T:
        raise ValueError(f"input_lengths go up to {int(lengths.max())} but {described} has T={T} frames{other}")
    return log_probs, lengths


def first_dead_frame(log_probs: Tensor, input_lengths: Tensor) -> tuple[int, int] | None:
    """``(item, frame)`` of the first frame inside an item's input length where every class of
    ``(T, B, C)`` scores is ``-inf`` (no path through it has a non-zero probability), or None.
    Beyond an item's input length is padding and does not count."""
    if not log_probs.numel():
        return None
    # a row's maximum is -inf where every class is (NaN where one is NaN: not dead)
    dead = (log_probs.amax(-1) == -torch.inf) & frame_mask(log_probs.shape[0], input_lengths.to(log_probs.device))
    if not bool(dead.any()):
        return None
    t, b = (int(i) for i in dead.nonzero()[0])
    return b, t
