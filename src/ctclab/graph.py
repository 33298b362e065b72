r"""The CTC graph as data: what every backend reads, and nothing else.

For a target :math:`l = (l_1, \dots, l_L)` the blank-extended sequence is
:math:`l' = (\varnothing, l_1, \varnothing, l_2, \dots, l_L, \varnothing)`, ``S = 2L + 1`` states
(Graves et al. 2006, section 4.1). From frame to frame a path may *stay* in its state, *advance*
from ``s - 1`` to ``s``, or *skip* from ``s - 2`` to ``s`` over a blank. A topology says which
of these moves exist, and with what log-weight, as three ``(B, S)`` arrays; everything else —
start and final states, the per-frame entry term of the delay penalty, the band of states a path
can occupy at each frame — is derived data here, so that a recursion (PyTorch, numba, Triton)
reads arrays instead of parity tricks or constants. A new topology is a new way to fill the
arrays (:data:`TOPOLOGIES`), never a new loop; ``docs/adding-a-variant.md`` shows how.

Topologies (Laptev, Majumdar, Ginsburg, "CTC Variations Through New WFST Topologies",
Interspeech 2022, arXiv 2110.03098; k2's ``ctc_topo(modified=...)``):

``standard``  Graves' CTC ("correct CTC"): the skip is allowed into a label that differs from
              the one two states back; equal neighbours need a blank frame between them.
``modified``  k2's modified topology (the path set of Laptev's *compact* CTC): the skip is
              allowed between equal labels too, so ``"aa"`` needs no blank frame.
``selfless``  Laptev's *selfless* CTC: no self-loops on label states (a label lasts exactly one
              frame; blanks fill the rest); the skip rule of ``standard``.
``minimal``   Laptev's *minimal* CTC: blank is the only unit with a self-loop and equal labels
              follow each other directly (``modified``'s skip rule, ``selfless``'s labels).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._inputs import CTCBatch, frame_mask

#: Finite stand-in for log(0) in the PyTorch recursions. Keeping every score finite means no
#: ``-inf - -inf`` and hence no NaN in values or gradients (pytorch issue 31829); ``exp(NEG - x)``
#: is exactly 0 for any score ``x`` a path can reach.
NEG = -1e30

Topology = Literal["standard", "modified", "selfless", "minimal"]

#: A topology's rule: ``(targets (B, L), label_states (B, S))`` numpy arrays -> which moves
#: exist into each state, ``(stay, advance, skip)`` bool ``(B, S)``. (Weights other than 0 and
#: -inf would come as float arrays in the same places.) The graph is built on the host in numpy:
#: at the shapes of a training step its few dozen whole-array operations cost microseconds, where
#: as many torch operations on small tensors cost a tenth of a millisecond or more.
TopologyRule = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _skip_into_labels(targets: np.ndarray, label_states: np.ndarray, equal_labels: bool) -> np.ndarray:
    """The skip ``s - 2 -> s`` exists into label states after the first; between equal labels
    only if ``equal_labels``."""
    skip = label_states.copy()
    skip[:, :2] = False  # no state two back of state 0 or 1
    if not equal_labels:
        skip[:, 3::2] &= targets[:, 1:] != targets[:, :-1]
    return skip


def _standard(targets: np.ndarray, label_states: np.ndarray):
    every = np.ones_like(label_states)
    return every, every, _skip_into_labels(targets, label_states, equal_labels=False)


def _modified(targets: np.ndarray, label_states: np.ndarray):
    every = np.ones_like(label_states)
    return every, every, _skip_into_labels(targets, label_states, equal_labels=True)


def _selfless(targets: np.ndarray, label_states: np.ndarray):
    return ~label_states, np.ones_like(label_states), _skip_into_labels(targets, label_states, equal_labels=False)


def _minimal(targets: np.ndarray, label_states: np.ndarray):
    return ~label_states, np.ones_like(label_states), _skip_into_labels(targets, label_states, equal_labels=True)


#: Every topology by name. Adding one is adding an entry (see ``docs/adding-a-variant.md``).
TOPOLOGIES: dict[str, TopologyRule] = {
    "standard": _standard,
    "modified": _modified,
    "selfless": _selfless,
    "minimal": _minimal,
}

#: Index of each move along the first axis of :meth:`CTCGraph.transition_weights`; the Viterbi
#: backpointers store it in 2 bits. Ties prefer the lower index (the state entered latest).
SKIP, ADVANCE, STAY = 0, 1, 2


def check_topology(topology: str) -> None:
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {tuple(TOPOLOGIES)}, got {topology!r}")


def check_delay_penalty(delay_penalty: float) -> None:
    """``delay_penalty`` must be a finite number >= 0 (0: plain CTC)."""
    if isinstance(delay_penalty, bool) or not isinstance(delay_penalty, (int, float)):
        raise TypeError(f"delay_penalty must be a number >= 0, got {type(delay_penalty).__name__}")
    if not math.isfinite(delay_penalty) or delay_penalty < 0:
        raise ValueError(
            f"delay_penalty must be finite and >= 0 (the weight lam of exp(-lam (t - T/2)); 0 is plain CTC), "
            f"got {delay_penalty!r}"
        )


class HostArrays(NamedTuple):
    """A graph's arrays as host numpy arrays (what the CPU kernels read; views of the tensors on
    CPU): see :class:`CTCGraph`."""

    labels: np.ndarray
    moves: np.ndarray
    start: np.ndarray
    final: np.ndarray
    entry: np.ndarray
    input_lengths: np.ndarray
    num_states: np.ndarray


@dataclass(frozen=True)
class CTCGraph:
    """The CTC state graph of a batch, as arrays (``S = 2 max(L) + 1`` states per item; states
    beyond an item's ``2 L + 1`` are padding, never final).

    Attributes:
        labels: ``(B, S)`` int64, the class each state emits (the blank-extended targets).
        moves: ``(3, B, S)`` float64 log-weights of the moves *into* each state, from ``s - 2``
            (:data:`SKIP`), ``s - 1`` (:data:`ADVANCE`) and ``s`` (:data:`STAY`): 0 allowed,
            ``-inf`` forbidden, any other value a weight. :attr:`skip`, :attr:`advance` and
            :attr:`stay` are its rows.
        start, final: ``(B, S)`` bool, where paths may begin (frame 0) and end (last frame).
        entry: ``(B, S)`` bool, the states whose entry (advance or skip, and start) is weighted
            by the delay penalty's per-frame term (:meth:`frame_term`): the label states.
        input_lengths, target_lengths: ``(B,)`` int64.
        blank: the blank class.
        topology: the name of the topology the moves come from.
        delay_penalty: ``lam`` >= 0 (k2 / icefall): entering a label state at frame ``t`` costs
            ``lam * (t - T_b / 2)`` nats.
    """

    labels: Tensor
    moves: Tensor
    start: Tensor
    final: Tensor
    entry: Tensor
    input_lengths: Tensor
    target_lengths: Tensor
    blank: int
    topology: str = "standard"
    delay_penalty: float = 0.0

    @classmethod
    def build(cls, batch: CTCBatch, topology: Topology = "standard", delay_penalty: float = 0.0) -> "CTCGraph":
        """The graph of a validated batch (:func:`ctclab._inputs.ctc_batch`) under ``topology``
        (a name in :data:`TOPOLOGIES`)."""
        check_topology(topology)
        check_delay_penalty(delay_penalty)
        from .backends import numba_kernels

        targets = batch.targets.cpu().numpy()
        # the blank-extended labels; start: state 0, and 1 if there is a label; final: the last
        # blank, and the last label; no way into an item's padding states (beyond ``inside``)
        labels, label_states, inside, start, final, num_states = numba_kernels.state_arrays(
            targets, batch.target_lengths.cpu().numpy(), batch.blank)
        stay, advance, skip = TOPOLOGIES[topology](targets, label_states)
        moves = numba_kernels.move_weights(skip, advance, stay, inside)  # 0 where allowed, -inf elsewhere
        device = batch.targets.device
        on_device = (lambda x: torch.from_numpy(x)) if device.type == "cpu" else (lambda x: torch.from_numpy(x).to(device))
        graph = cls(on_device(labels), on_device(moves), on_device(start), on_device(final), on_device(label_states),
                    batch.input_lengths, batch.target_lengths, batch.blank, topology, float(delay_penalty))
        # the host arrays it was made from, for the CPU kernels (no conversions per use)
        graph.__dict__["host"] = HostArrays(labels, moves, start, final, label_states, batch.input_lengths.cpu().numpy(),
                                            num_states)
        return graph

    @property
    def skip(self) -> Tensor:
        """``(B, S)`` log-weight of the move ``s - 2 -> s``."""
        return self.moves[SKIP]

    @property
    def advance(self) -> Tensor:
        """``(B, S)`` log-weight of the move ``s - 1 -> s``."""
        return self.moves[ADVANCE]

    @property
    def stay(self) -> Tensor:
        """``(B, S)`` log-weight of the self-loop ``s -> s``."""
        return self.moves[STAY]

    def select(self, items: Tensor) -> "CTCGraph":
        """The graph of a subset of the batch (``items``: indices or a bool mask)."""
        return CTCGraph(
            self.labels[items], self.moves[:, items], self.start[items], self.final[items], self.entry[items],
            self.input_lengths[items], self.target_lengths[items], self.blank, self.topology, self.delay_penalty,
        )

    @property
    def padding(self) -> Tensor:
        """``(B, S)`` bool, the states past each item's ``2 L + 1`` (no move leads into them)."""
        return torch.arange(self.labels.shape[1], device=self.labels.device) >= self.num_states[:, None]

    @functools.cached_property
    def num_states(self) -> Tensor:
        """``(B,)`` int64, ``2 L + 1`` states of each item."""
        return 2 * self.target_lengths + 1

    @functools.cached_property
    def host(self) -> HostArrays:
        """The graph's arrays as contiguous host numpy arrays (:class:`HostArrays`)."""
        numpy = lambda x: x.cpu().contiguous().numpy()  # noqa: E731
        return HostArrays(*map(numpy, (self.labels, self.moves, self.start, self.final, self.entry, self.input_lengths,
                                       self.num_states)))

    # -- derived data: distances and the band ---------------------------------------------------
    @functools.cached_property
    def _distances(self) -> tuple:
        from .backends import numba_kernels

        host = self.host
        return numba_kernels.graph_distances(host.start, host.final, host.moves, host.num_states)

    def distances(self) -> tuple[Tensor, Tensor]:
        """``(B, S)`` int64 each: the first frame at which a path can occupy each state (from a
        start state), and the fewest frames that must follow it (to a final state); a large
        number where there is none. Computed from the moves, whatever the topology."""
        device = self.labels.device
        earliest, to_end, _ = self._distances
        return tuple(torch.from_numpy(x).to(device) for x in (earliest, to_end))

    @property
    def min_frames(self) -> Tensor:
        """``(B,)`` int64, the length of the shortest path (for standard CTC ``L + repeats``; 0
        for an empty target)."""
        _, _, shortest = self._distances
        return torch.from_numpy(shortest).to(self.labels.device)

    @functools.cached_property
    def _feasible(self) -> np.ndarray:
        _, _, shortest = self._distances
        frames = self.host.input_lengths
        return (frames >= shortest) & ((frames > 0) | (shortest == 0))

    @property
    def feasible(self) -> Tensor:
        """``(B,)`` bool, whether any path fits in the item's frames."""
        return torch.from_numpy(self._feasible).to(self.labels.device)

    @property
    def all_feasible(self) -> bool:
        """Whether every item has a path that fits in its frames (:attr:`feasible`, on the host)."""
        return bool(self._feasible.all())

    def band(self, num_frames: int) -> Tensor:
        """``(B, T, 2)`` int64 ``[lo, hi)``: at frame ``t`` only states in this range can lie on
        a complete path (reachable by then, and able to reach the end in the frames left).
        Backends visit only these; derived from :meth:`distances`, for any topology."""
        return torch.from_numpy(self.host_band(num_frames)).to(self.labels.device)

    def host_band(self, num_frames: int) -> np.ndarray:
        """:meth:`band` as a host numpy array."""
        from .backends import numba_kernels

        earliest, to_end, _ = self._distances
        return numba_kernels.graph_band(earliest, to_end, self.host.input_lengths, self.host.num_states, num_frames)

    # -- what the PyTorch recursions read ------------------------------------------------------
    def emissions(self, log_probs: Tensor) -> Tensor:
        """``(T, B, C)`` log-scores -> ``(T, B, S)`` score of each state's class at each frame,
        clamped to :data:`NEG` from below so that ``-inf`` stays finite, :data:`NEG` outside the
        :meth:`band` (no complete path goes there: a NaN or ``+inf`` there must change nothing), and 0
        at frames at or beyond an item's input length (whatever padding holds there, NaN
        included, is ignored)."""
        T = log_probs.shape[0]
        index = self.labels.unsqueeze(0).expand(T, -1, -1)
        inside = frame_mask(T, self.input_lengths)[..., None]
        scores = log_probs.gather(2, index).clamp(min=NEG)
        if T and bool(((scores.detach() == torch.inf) | torch.isnan(scores.detach())).any()):
            band = self.band(T).transpose(0, 1)  # (T, B, 2)
            states = torch.arange(self.labels.shape[1], device=self.labels.device)
            in_band = (states >= band[..., :1]) & (states < band[..., 1:])
            scores = torch.where(in_band, scores, NEG)
        return torch.where(inside, scores, 0.0)

    def final_states(self) -> Tensor:
        """``(B, S)`` bool, the accepting states (:attr:`final`)."""
        return self.final

    def frame_term(self, t: int, dtype: torch.dtype) -> Tensor | None:
        """``(B,)`` log-weight of entering an :attr:`entry` state at frame ``t`` (the delay
        penalty, ``-lam (t - T_b / 2)``), or None without a penalty."""
        if not self.delay_penalty:
            return None
        return -self.delay_penalty * (t - self.input_lengths.to(dtype) / 2)

    def transition_weights(self, t: int, dtype: torch.dtype) -> Tensor:
        """``(3, B, S)`` log-weights of the moves into state ``s`` at frame ``t``, from ``s - 2``
        (:data:`SKIP`), ``s - 1`` (:data:`ADVANCE`) and ``s`` (:data:`STAY`); :data:`NEG` for
        forbidden moves."""
        weights = self.moves.to(dtype).clamp(min=NEG)
        term = self.frame_term(t, dtype)
        if term is not None:
            weights[:STAY] += term[:, None] * self.entry
        return weights

    def initial_weights(self, dtype: torch.dtype) -> Tensor:
        """``(B, S)`` log-weight of starting in each state at frame 0 (:data:`NEG` elsewhere)."""
        weights = torch.where(self.start, 0.0, NEG).to(dtype)
        term = self.frame_term(0, dtype)
        return weights if term is None else weights + term[:, None] * self.entry

    def probability_weights(self, dtype: torch.dtype) -> Tensor:
        """``(3, B, S)`` the moves' weights in probability space (``exp`` of the log-weights:
        1 allowed, 0 forbidden), without the delay penalty's frame term."""
        return self.moves.exp().to(dtype)

    def kernel_graph(self, num_frames: int, state_class: np.ndarray | None = None):
        """:class:`ctclab.backends.numba_kernels.KernelGraph` of this graph for ``num_frames``
        frames (CPU numpy arrays); ``state_class`` (``(B, S)`` int64 numpy, default: the host
        :attr:`labels`) is what the kernels index by each state."""
        from .backends import numba_kernels

        host = self.host
        earliest, to_end, _ = self._distances
        return numba_kernels.kernel_graph(
            host.labels if state_class is None else state_class, host.moves, host.start, host.final, host.entry,
            earliest, to_end, host.input_lengths, host.num_states, num_frames,
        )
