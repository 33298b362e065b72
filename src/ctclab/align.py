r"""Batched Viterbi forced alignment over the CTC trellis, token and word spans, confidences.

The best path is the trellis's max-plus recursion (the loss is its log-sum-exp recursion):
:math:`\delta_t(s) = y_t(l'_s) + \max_{s' \in \{s-2, s-1, s\}} \delta_{t-1}(s')`. Backpointers are
packed 2 bits per state. On CPU a numba kernel (:func:`ctclab.backends.numba_viterbi.viterbi`,
vectorised over states, parallel over the batch, checkpointed within a memory budget for long
inputs) runs it; elsewhere the PyTorch reference (:mod:`ctclab.backends.reference`), which is
also the kernel's tested reference.

Tie-break (deterministic, both implementations): when predecessors tie, the backtrace prefers
the one furthest back in the state sequence (skip, then advance, then stay), so each state is
entered as late as an optimal path allows; the path ends in the final blank unless the last
label scores strictly higher.
"""
from __future__ import annotations

import itertools
import operator
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TypeVar

import torch
from torch import Tensor

from . import _memory, backends
from ._inputs import Lengths, check_scores, compute_dtype, ctc_batch, time_major
from .targets import state_occupation
from .trellis import NEG, STAR, CTCTrellis, Topology, add_wildcard
from .vocab import BPE_MARKER


class Alignment(tuple):
    """``(labels, scores)`` — unpacks like a pair — with more on attributes.

    It remembers the trellis it was found on (``blank``, ``topology``, ``delay_penalty``), so
    :func:`token_spans` and :func:`alignment_posteriors` read the same graph without being told.

    Attributes:
        labels: ``(B, T)`` int64, the label of every frame on the best path (blank included,
            :data:`STAR` for wildcard frames); ``blank`` at and beyond an item's input length.
        scores: ``(B, T)``, the log-prob of that label at that frame; 0 beyond the input length.
        states: ``(B, T)`` int64, the trellis state of each frame (``2i + 1`` = i-th token,
            even = blank before token ``i/2``); -1 beyond the input length.
        path_score: ``(B,)`` total log-score of the best path (the sum of ``scores``).
        aligned: ``(B,)`` bool; False for items skipped with ``skip_infeasible=True`` (no path:
            their labels are all blank, scores 0, path_score -inf).
        blank: the blank index; topology, delay_penalty: the trellis's options.
    """

    def __new__(
        cls, labels: Tensor, scores: Tensor, states: Tensor, path_score: Tensor, aligned: Tensor,
        blank: int = 0, topology: Topology = "standard", delay_penalty: float = 0.0,
    ):
        obj = super().__new__(cls, (labels, scores))
        obj.states, obj.path_score, obj.aligned = states, path_score, aligned
        obj.blank, obj.topology, obj.delay_penalty = blank, topology, delay_penalty
        return obj

    @property
    def labels(self) -> Tensor:
        return self[0]

    def item(self, b: int) -> "Alignment":
        """Item ``b`` of a batched alignment, as an unbatched one."""
        return Alignment(
            self.labels[b], self.scores[b], self.states[b], self.path_score[b], self.aligned[b],
            self.blank, self.topology, self.delay_penalty,
        )

    @property
    def scores(self) -> Tensor:
        return self[1]


def forced_align(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Lengths | None = None,
    target_lengths: Lengths | None = None,
    blank: int = 0,
    *,
    star: float | None = None,
    skip_infeasible: bool = False,
    checkpoint_every: int | None = None,
    max_memory: int | None = None,
    topology: Topology = "standard",
    delay_penalty: float = 0.0,
    impl: str = "auto",
    batch_first: bool = False,
) -> Alignment:
    r"""Best alignment (Viterbi path) of each target to its frames, for a whole batch at once.

    Args:
        log_probs: ``(T, B, C)`` or ``(T, C)`` log-probs (time-major, like the loss).
        targets: padded ``(B, S)`` or ``(S,)``; may contain :data:`STAR` (-1) where ``star`` is set.
        input_lengths, target_lengths: ``(B,)``; None means full length.
        blank: blank index.
        star: wildcard penalty in nats per frame, or None for no wildcard. :data:`STAR` entries in
            ``targets`` become a token that matches any stretch of audio (one frame at least)
            with per-frame score ``max_k log_probs[t, k] - star``: audio the transcript lacks
            (a missing start, end or middle) is absorbed there instead of being forced onto
            the text. Like the MMS alignment recipe's appended ``<star>`` column, but scored
            relative to the frame's best class so that real tokens win where they fit.
        skip_infeasible: items without any path of non-zero probability — the target cannot
            fit (``T_b < L_b + repeats``), or every path meets a ``-inf`` score (a target class
            that is ``-inf`` on every frame, ``star=inf``) — raise a ``ValueError`` naming them
            by default; with True they are skipped (``aligned`` False).
        checkpoint_every: keep only the scores before every K-th frame and recompute each
            segment's backpointers during the backtrace, in the states the path can pass
            through (the numba and Triton kernels): memory ``~ S (8 T/K + K/4)`` bytes per item instead of
            ``T S / 4``, for a recomputation of about ``2K / S`` of a forward pass (the forward
            pass itself then records no backpointers). None: chosen from ``max_memory``.
        max_memory: bytes the alignment's working memory (backpointers, checkpoints, for all
            items in flight at once: one per core on CPU, the whole batch on a GPU) may take when ``checkpoint_every`` is None:
            the full backpointer table if it fits, else checkpoints every ``sqrt(32 T)`` frames
            (the least memory). None: :data:`ctclab._memory.DEFAULT_VITERBI_MEMORY` (1 GiB),
            or half the memory available if that is less, so that long inputs take bounded
            memory by default. Paths and scores are the same whatever the checkpointing.
        topology: ``'standard'`` or k2's ``'modified'`` (see :class:`ctclab.CTCTrellis`).
        delay_penalty: as for :func:`ctclab.ctc_loss`; ``path_score`` then includes the entry
            weights (``scores`` stay the emission log-probs).
        impl: the backend (:mod:`ctclab.backends`): ``'auto'`` (the numba kernel on CPU, the
            Triton kernel on CUDA when triton is installed, else the PyTorch reference),
            ``'numba'``, ``'triton'`` or ``'reference'`` (``'kernel'`` and
            ``'torch'``, their former names, still work with a DeprecationWarning).
        batch_first: ``log_probs`` is ``(B, T, C)`` (Hugging Face models' logits, torchaudio's
            aligner's ``(1, T, C)``); the results are those of the time-major call.

    Returns:
        :class:`Alignment`: ``labels, scores = forced_align(...)``, both ``(B, T)`` (or ``(T,)``
        unbatched), plus ``states``, ``path_score`` and ``aligned``.

    Raises:
        ValueError: as :func:`ctclab.ctc_loss` for malformed input; NaN inside an item's frames
            (naming the item and frame); items without a path (unless ``skip_infeasible``).
    """
    impl = backends.check_impl(impl)
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise ValueError(f"max_memory must be a positive int (bytes) or None, got {max_memory!r}")
    if star is not None and not (isinstance(star, (int, float)) and star == star):
        raise TypeError(f"star must be a penalty in nats (a float) or None, got {star!r}")
    log_probs = time_major(log_probs, batch_first)
    if isinstance(log_probs, Tensor) and log_probs.is_floating_point() and log_probs.dim() in (2, 3) and star is not None:
        log_probs, targets = add_wildcard(log_probs, targets, float(star))
    elif isinstance(targets, Tensor) and bool((targets == STAR).any()):
        raise ValueError("targets contain STAR (-1) but star is None: pass star=<penalty> to use the wildcard")
    batch = ctc_batch(log_probs, targets, input_lengths, target_lengths, blank, batch_first_hint=True)
    check_scores(batch.log_probs, batch.input_lengths)
    trellis = CTCTrellis.build(batch, topology, delay_penalty)
    feasible = trellis.feasible
    if not bool(feasible.all()) and not skip_infeasible:
        bad = torch.nonzero(~feasible)[:, 0].tolist()
        raise ValueError(
            f"items {bad} cannot be aligned: their input_lengths are shorter than target length plus repeats; "
            "pass skip_infeasible=True to skip them"
        )
    lp = batch.log_probs.detach().to(compute_dtype(batch.log_probs.dtype))
    if checkpoint_every is None:
        checkpoint_every = _checkpoint_every(lp, trellis, max_memory)
    result = best_paths(trellis, lp, feasible, impl, checkpoint_every, skip_infeasible,
                        star_class=lp.shape[2] - 1 if star is not None else None)
    return result.item(0) if batch.unbatched else result


def best_paths(trellis: CTCTrellis, log_probs: Tensor, feasible: Tensor, impl: str = "auto", checkpoint_every: int | None = None,
               skip_infeasible: bool = True, star_class: int | None = None) -> Alignment:
    """The batched :class:`Alignment` of a built graph: the Viterbi path of every item by the
    backend ``impl`` selects, its labels and emission scores (:func:`forced_align` after its
    checks; the decoder's word timings, on the graph it rescored with).

    Args:
        trellis: the graph; log_probs: ``(T, B, C)`` checked scores in the compute dtype;
        feasible: ``(B,)`` :attr:`CTCGraph.feasible`; checkpoint_every: as :func:`forced_align`'s.
        skip_infeasible: items without a path of non-zero probability come back unaligned
            (otherwise a ValueError); star_class: the wildcard's column, reported as :data:`STAR`.
    """
    lp = log_probs
    states, path_score = backends.select("viterbi", impl, trellis, lp).viterbi(trellis, lp, checkpoint_every)
    states = states.to(lp.device)
    path_score = path_score.to(lp.device, lp.dtype)
    aligned = feasible & (path_score > NEG / 2)
    if not bool(aligned.all()) and not skip_infeasible:
        bad = torch.nonzero(~aligned)[:, 0].tolist()
        raise ValueError(
            f"items {bad} cannot be aligned: every path through their target meets a score of -inf "
            "(a target class that is -inf on every frame it could take, or star=inf); "
            "check the transcript against the emissions, or pass skip_infeasible=True to skip them"
        )
    blank = trellis.blank
    path_score = torch.where(aligned, path_score, -torch.inf)
    read = _path_labels_cpu if lp.device.type == "cpu" else _path_labels
    states, labels, scores = read(states, aligned, trellis.labels, lp, blank)
    if star_class is not None:
        labels = torch.where(labels == star_class, STAR, labels)
    return Alignment(labels, scores, states, path_score, aligned, blank, trellis.topology, float(trellis.delay_penalty))


def _path_labels(states: Tensor, aligned: Tensor, state_labels: Tensor, log_probs: Tensor, blank: int) -> tuple[Tensor, Tensor, Tensor]:
    """What best paths read: ``(B, T)`` states (``-1`` beyond an item's frames, and for items
    not ``aligned``), the label of each frame (``blank`` where there is no state) and its score
    in ``(T, B, C)`` ``log_probs`` (0 there). ``state_labels``: ``(B, S)``, the graph's labels."""
    states = torch.where(aligned[:, None], states, -1)
    inside = states >= 0
    labels = torch.where(inside, state_labels.gather(1, states.clamp(min=0)), blank)
    scores = torch.where(inside, log_probs.transpose(0, 1).gather(2, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    return states, labels, scores


def _path_labels_cpu(states: Tensor, aligned: Tensor, state_labels: Tensor, log_probs: Tensor, blank: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_path_labels` in one compiled pass (:func:`ctclab.backends.numba_viterbi.path_labels`):
    its torch operations on small tensors took 5-8% of an alignment of B=32, T=500, L=100."""
    from .backends import numba_viterbi

    states = states.clone()
    labels = torch.empty_like(states)
    scores = torch.empty(states.shape, dtype=log_probs.dtype)
    numba_viterbi.path_labels(states.numpy(), aligned.numpy(), state_labels.numpy(), log_probs.detach().numpy(),
                              blank, labels.numpy(), scores.numpy())
    return states, labels, scores


def _checkpoint_every(log_probs: Tensor, trellis: CTCTrellis, max_memory: int | None) -> int | None:
    """The checkpoint interval of :func:`forced_align` under ``max_memory`` (see there): None
    for the full table, else the interval with the least memory. A given budget that even that
    exceeds is an error; the default one is left to the kernel's memory check."""
    T, B, _ = log_probs.shape
    S = trellis.labels.shape[1]
    # on CPU at most one item per core is in flight; a GPU kernel holds every item's table at once
    if log_probs.device.type == "cpu":
        from .backends.numba_cpu import _threads  # the kernel's threads: one item each in flight

        items = min(B, _threads())
    else:
        items = B
    full = items * _memory.viterbi_bytes(T, S, T)
    if max_memory is None:
        if full < _memory.ALWAYS_FITS:
            return None
        available = _memory.available_bytes(log_probs.device)
        budget = _memory.DEFAULT_VITERBI_MEMORY if available is None else min(_memory.DEFAULT_VITERBI_MEMORY, available // 2)
    else:
        budget = max_memory
    if full <= budget:
        return None
    every = _memory.memory_optimal_every(T)
    least = items * _memory.viterbi_bytes(T, S, every)
    if max_memory is not None and least > budget:
        raise ValueError(
            f"max_memory={max_memory} is too small: aligning {items} item(s) of {T} frames against {S} states "
            f"needs at least {least} bytes (checkpoint_every={every}); raise it or align shorter segments"
        )
    return every


def _trellis_option(name: str, given, alignment, default):
    """An option of :func:`alignment_posteriors`: the Alignment's own unless given; a given
    value that contradicts the Alignment's is an error (the posteriors would be of another graph)."""
    remembered = getattr(alignment, name, None)
    if given is None:
        return default if remembered is None else remembered
    if remembered is not None and given != remembered:
        raise ValueError(
            f"{name}={given!r} contradicts the alignment, which was found with {name}={remembered!r}: "
            f"omit {name} to use the alignment's"
        )
    return given


def alignment_posteriors(
    log_probs: Tensor,
    targets: Tensor,
    alignment: Alignment,
    input_lengths: Lengths | None = None,
    target_lengths: Lengths | None = None,
    blank: int | None = None,
    star: float | None = None,
    topology: Topology | None = None,
    *,
    delay_penalty: float | None = None,
    batch_first: bool = False,
    impl: str = "auto",
) -> Tensor:
    r"""``(B, T)`` posterior probability :math:`\gamma_t(s_t)` that frame t is occupied by the state
    the alignment put it in (forward-backward over the same trellis as the loss; 0 beyond the
    input length). Unlike emission scores, it accounts for every competing alignment of the
    transcript: a token whose boundaries could shift at little cost gets low posterior at its
    edges. Memory ``O(T * B * S)``.

    Args:
        log_probs, targets, input_lengths, target_lengths, star: those given to :func:`forced_align`.
        alignment: its result, ``states`` ``(B, T)`` (or ``(T,)``).
        blank, topology, delay_penalty: default to the alignment's own (an :class:`Alignment`
            remembers them; otherwise 0, ``'standard'``, 0).
        batch_first: ``log_probs`` is ``(B, T, C)``.
        impl: the posteriors' backend (:mod:`ctclab.backends`).

    Raises:
        ValueError: ``alignment`` does not match ``log_probs`` (shape), an option contradicts the
            alignment's, NaN inside an item's frames.
    """
    blank = _trellis_option("blank", blank, alignment, 0)
    topology = _trellis_option("topology", topology, alignment, "standard")
    delay_penalty = _trellis_option("delay_penalty", delay_penalty, alignment, 0.0)
    states = getattr(alignment, "states", None)
    if not isinstance(states, Tensor):
        raise TypeError(f"alignment must be the Alignment returned by forced_align, got {type(alignment).__name__}")
    log_probs = time_major(log_probs, batch_first)
    gamma = state_occupation(log_probs, targets, input_lengths, target_lengths, blank, topology, star,
                             delay_penalty=delay_penalty, impl=impl)
    unbatched = gamma.dim() == 2
    if unbatched:
        gamma = gamma[:, None]
    T, B, S = gamma.shape
    if states.dim() != (1 if unbatched else 2) or tuple(states.shape) != ((T,) if unbatched else (B, T)):
        expected = (T,) if unbatched else (B, T)
        raise ValueError(
            f"alignment.states must have shape {expected} to match log_probs {tuple(log_probs.shape)}, "
            f"got {tuple(states.shape)}: pass the alignment of these log_probs"
        )
    states = states.reshape(B, T).to(gamma.device)
    if bool((states >= S).any()):
        raise ValueError(f"alignment.states refer to states beyond the targets' {S}: pass the alignment of these targets")
    post = gamma.permute(1, 0, 2).gather(2, states.clamp(min=0)[..., None])[..., 0]
    post = torch.where(states >= 0, post, 0.0)
    return post[0] if unbatched else post


@dataclass(slots=True)  # not frozen, like torchaudio's: a frozen dataclass takes 4x longer to create
class TokenSpan:
    """One token of an alignment: frames ``[start, end)``.

    ``score``: mean per-frame emission probability ``exp(log_prob)`` of the token over its frames
    (what torchaudio's ``merge_tokens`` reports). ``confidence``: mean posterior occupancy of the
    token over its frames (:func:`alignment_posteriors`), None unless posteriors were given.
    """

    token: int
    start: int
    end: int
    score: float
    confidence: float | None = None

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class WordSpan:
    """A word, of an alignment (:func:`word_spans`) or of a decoded hypothesis
    (:attr:`ctclab.Hypothesis.words`): frames ``[start, end)``.

    Attributes:
        text: the word: its tokens' strings joined, a BPE word-start marker (``'▁'``) dropped
            (:func:`spell`); None when not known (:func:`word_spans` without a vocabulary).
        start, end: first frame and end frame (exclusive).
        score: frame-weighted mean of its tokens' scores (mean emission probability); None
            when not known.
        confidence: frame-weighted mean of its tokens' confidences (posterior occupancy),
            None unless they were computed (:func:`alignment_posteriors`).
        tokens: its :class:`TokenSpan` (empty when not known). Not compared: two words are
            equal when their text, frames, scores and frame shift are.
        frame_shift: seconds per frame, when known: :attr:`start_time` and :attr:`end_time`
            give the frames in seconds then (None without it).
    """

    text: str | None
    start: int
    end: int
    score: float | None = None
    confidence: float | None = None
    tokens: tuple[TokenSpan, ...] = field(default=(), compare=False)
    frame_shift: float | None = None

    def __post_init__(self) -> None:
        if self.text is not None and not isinstance(self.text, str):
            raise TypeError(f"WordSpan's first field is the word's text (a str or None), got {type(self.text).__name__}; "
                            "pass its token spans as tokens=...")
        check_frame_shift(self.frame_shift)

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def start_time(self) -> float | None:
        """The first frame in seconds (``start * frame_shift``), None without a frame shift."""
        return None if self.frame_shift is None else frames_to_seconds(self.start, self.frame_shift)

    @property
    def end_time(self) -> float | None:
        """The end frame (exclusive) in seconds, None without a frame shift."""
        return None if self.frame_shift is None else frames_to_seconds(self.end, self.frame_shift)

    @property
    def word(self) -> str | None:
        """Deprecated: :attr:`text` (the name of :class:`ctclab.decode.WordTiming`'s field)."""
        warnings.warn("WordSpan.word is deprecated: use WordSpan.text", DeprecationWarning, stacklevel=2)
        return self.text


def _spans_of_item(states: Sequence[int], labels: Sequence[int], probs: Sequence[float], post: Sequence[float] | None, blank: int) -> list[TokenSpan]:
    spans: list[TokenSpan] = []
    t, T = 0, len(states)
    while t < T:
        s, label = states[t], labels[t]
        end = t + 1
        while end < T and states[end] == s:
            end += 1
        if s >= 0 and label != blank:
            score = sum(probs[t:end]) / (end - t)
            conf = None if post is None else sum(post[t:end]) / (end - t)
            spans.append(TokenSpan(int(label), t, end, float(score), conf))
        t = end
    return spans


def token_spans(
    alignment: Alignment | tuple[Tensor, Tensor], blank: int | None = None, posteriors: Tensor | None = None
) -> list[list[TokenSpan]]:
    """Per item, the list of :class:`TokenSpan` of an alignment (blanks dropped).

    ``alignment``: the result of :func:`forced_align`, or a ``(labels, scores)`` pair of ``(B, T)``
    (or ``(T,)``) tensors — then consecutive equal non-blank labels form one token (ambiguous only
    for the modified topology, where the Alignment's ``states`` tell tokens apart).
    ``blank``: default the Alignment's own (0 for a plain pair); a different value is an error.
    ``posteriors``: optional ``(B, T)`` from :func:`alignment_posteriors` for ``confidence``.
    """
    if not isinstance(alignment, (tuple, list)) or len(alignment) != 2:
        raise TypeError("alignment must be the Alignment returned by forced_align, or a (labels, scores) pair of tensors")
    blank = _trellis_option("blank", blank, alignment, 0)
    labels, scores = alignment[0], alignment[1]
    if not isinstance(labels, Tensor) or not isinstance(scores, Tensor):
        raise TypeError("alignment must hold (labels, scores) tensors")
    if labels.dim() not in (1, 2):
        raise ValueError(f"alignment labels must be (B, T) or (T,), got shape {tuple(labels.shape)}")
    states = getattr(alignment, "states", None)
    if posteriors is not None and (not isinstance(posteriors, Tensor) or posteriors.shape != labels.shape):
        shape = tuple(posteriors.shape) if isinstance(posteriors, Tensor) else type(posteriors).__name__
        raise ValueError(
            f"posteriors must have the alignment's shape {tuple(labels.shape)} (from alignment_posteriors), got {shape}"
        )
    if labels.dim() == 1:
        labels, scores = labels[None], scores[None]
        states = None if states is None else states[None]
        posteriors = None if posteriors is None else posteriors[None]
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same shape, got {tuple(labels.shape)} and {tuple(scores.shape)}")
    if states is None:
        # a new state wherever the label changes; frames beyond the input were marked blank
        change = torch.ones_like(labels, dtype=torch.bool)
        change[:, 1:] = labels[:, 1:] != labels[:, :-1]
        states = change.cumsum(1)
    probs = scores.double().exp().tolist()
    post = None if posteriors is None else posteriors.double().tolist()
    return [
        _spans_of_item(states[b].tolist(), labels[b].tolist(), probs[b], None if post is None else post[b], blank)
        for b in range(labels.shape[0])
    ]


#: the text of the :data:`STAR` token (the wildcard of :func:`forced_align`)
STAR_TEXT = "<star>"
_Item = TypeVar("_Item")


def check_frame_shift(frame_shift: float | None) -> None:
    """A ValueError unless ``frame_shift`` is None or a number of seconds > 0."""
    if frame_shift is not None and (isinstance(frame_shift, bool) or not isinstance(frame_shift, (int, float)) or not frame_shift > 0):
        raise ValueError(f"frame_shift must be a number of seconds > 0 (or None), got {frame_shift!r}")


def group_words(
    items: Iterable[_Item], delimiter: int | None = None, starts_word: Callable[[int], bool] | None = None,
    token: Callable[[_Item], int] | None = None,
) -> list[list[_Item]]:
    """``items`` (token ids, or spans with ``token(span)`` their id) grouped into words, in
    order: a ``delimiter`` token ends a word and is dropped; a token for which
    ``starts_word(token)`` holds (a BPE word-start token, ``'▁'``) begins one; without
    either, the whole sequence is one word. Empty words are not made (two delimiters in a
    row, a leading one). The rule of :func:`word_spans` and of the decoder's words and texts."""
    words: list[list[_Item]] = []
    current: list[_Item] = []
    for item in items:
        k = item if token is None else token(item)
        if k == delimiter or (current and starts_word is not None and starts_word(k)):
            if current:
                words.append(current)
            current = [] if k == delimiter else [item]
        else:
            current.append(item)
    if current:
        words.append(current)
    return words


def spell(tokens: Iterable[int], vocab: Sequence[str]) -> str:
    """The text of token ids: their strings in ``vocab`` joined, a BPE word-start marker
    (``'▁'``) dropped; :data:`STAR` is ``<star>``."""
    return "".join(STAR_TEXT if k == STAR else vocab[k] for k in tokens).replace(BPE_MARKER, "")


def word_of(tokens: Sequence[TokenSpan], vocab: Sequence[str] | None = None, frame_shift: float | None = None) -> WordSpan:
    """The :class:`WordSpan` of consecutive token spans (at least one): their frames, the
    frame-weighted means of their scores and confidences (None if any lacks one), the text
    when ``vocab`` is given."""
    frames, score, conf = 0, 0.0, 0.0
    for s in tokens:
        n = s.end - s.start
        frames += n
        score += s.score * n
        conf = None if conf is None or s.confidence is None else conf + s.confidence * n
    text = None if vocab is None else spell([s.token for s in tokens], vocab)
    return WordSpan(text, tokens[0].start, tokens[-1].end, score / frames, None if conf is None else conf / frames,
                    tuple(tokens), frame_shift)


def word_spans(
    spans: Sequence[TokenSpan], word_lengths: Sequence[int] | None = None, separator: int | None = None, *,
    vocab: Sequence[str] | None = None, frame_shift: float | None = None,
) -> list[WordSpan]:
    """Group one item's token spans into words (:class:`WordSpan`), either by ``word_lengths``
    (tokens per word, as in torchaudio's tutorial) or at ``separator`` tokens (e.g. the index of
    ``'|'`` or space; the separators themselves are dropped: :func:`group_words`).

    ``vocab`` (index -> token string, e.g. a :class:`ctclab.Vocabulary`): fills each word's
    ``text``; ``frame_shift`` (seconds per frame): its ``start_time``/``end_time``."""
    if (word_lengths is None) == (separator is None):
        raise ValueError("pass exactly one of word_lengths or separator")
    check_frame_shift(frame_shift)
    if word_lengths is not None:
        if sum(word_lengths) != len(spans) or any(n < 1 for n in word_lengths):
            raise ValueError(f"word_lengths must be positive and sum to the {len(spans)} tokens, got {list(word_lengths)}")
        bounds = [0, *itertools.accumulate(word_lengths)]
        groups = [list(spans[a:b]) for a, b in zip(bounds, bounds[1:])]
    else:
        groups = group_words(spans, separator, token=operator.attrgetter("token"))
    return [word_of(group, vocab, frame_shift) for group in groups]


def frames_to_seconds(frames: int | float, frame_shift: float, offset: float = 0.0) -> float:
    """Frame index -> seconds: ``offset + frames * frame_shift`` (e.g. 0.02 s for wav2vec2)."""
    if frame_shift <= 0:
        raise ValueError(f"frame_shift must be > 0 seconds, got {frame_shift}")
    return offset + frames * frame_shift
