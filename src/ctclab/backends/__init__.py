"""The backend registry: which implementation computes a CTC quantity for a call.

A backend declares what it computes (``operations``: ``'loss'`` — the likelihood and its
gradient —, ``'viterbi'``, ``'posteriors'``), where it is picked (``devices``), what graphs it runs
(``topologies``, ``delay_penalty``), whether its loss differentiates to higher orders, and any
per-call limit (``accepts``). :func:`select` picks the first registered backend that serves a
call (``impl='auto'``), or checks the one named. Every verb — :func:`ctclab.ctc_loss`,
:class:`ctclab.CTCLoss`, :func:`ctclab.forced_align`, :func:`ctclab.alignment_posteriors`,
:func:`ctclab.alignment_targets`, :func:`ctclab.state_occupation` and the variants — takes the
same ``impl`` vocabulary (:func:`impl_names`). A new backend joins the conformance suite
(``tests/test_conformance.py``) by being registered.

``impl`` names:

``'auto'``          the fastest backend that serves the call (the order of registration).
``'fused'``         the fastest explicit forward-backward (first derivatives): what ``'auto'``
                    picks for the loss.
``'autograd'``      the readable recursion differentiated by autograd (any derivative order).
``'numba'``         the CPU kernels (:mod:`ctclab.backends.numba_kernels`).
``'reference'``     the PyTorch reference recursions in log space, any device.
``'triton'``        ctclab's Triton kernels (:mod:`ctclab.backends.triton_gpu`): ``'auto'`` on
                    CUDA when Triton is installed; CPU tensors under ``TRITON_INTERPRET=1``.
``'cuda-builtin'``  PyTorch's own CUDA kernel with its gradient corrected: an anchor for
                    benchmarks (standard topology, no delay penalty); ``'auto'`` on CUDA only
                    without Triton.

Deprecated, still accepted: ``'kernel'`` (= ``'numba'``) and ``'torch'`` (= ``'reference'``),
``forced_align``'s former names.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from ..graph import CTCGraph

OPERATIONS = ("loss", "viterbi", "posteriors")

#: Former ``impl`` names -> today's.
DEPRECATED = {"kernel": "numba", "torch": "reference"}


@dataclass(frozen=True)
class Backend:
    """One implementation of some CTC operations.

    Attributes:
        name: its ``impl`` name.
        operations: what it computes, out of :data:`OPERATIONS`. Its callables:
            ``loss(graph, log_probs) -> (B,)`` negative log-likelihood (``inf`` without a path),
            differentiable; ``viterbi(graph, log_probs, checkpoint_every) -> ((B, T) states,
            (B,) path scores)``; ``posteriors(graph, log_probs) -> (T, B, S)`` state occupation.
            ``log_probs`` ``(T, B, C)`` come in the compute dtype (float32/float64), or as
            given (float16/bfloat16 too) to a backend that ``reads_half``.
        devices: device types where ``'auto'`` picks it (None: any). Named, it runs where it can.
        topologies: topologies it runs (None: any).
        delay_penalty: whether it runs a delay penalty.
        higher_order: whether its loss has derivatives beyond the first.
        accepts: a further per-call check ``(graph, log_probs) -> bool`` (None: always).
        available: whether it can run here at all (its packages installed).
        runs_on: device types it can run on when named (None: any).
        priority: ``'auto'``'s order, lowest first (the fastest backends).
        reads_half: its loss reads float16/bfloat16 ``log_probs`` natively (accumulating in
            float32) and returns their gradient in that dtype: the loss verbs hand them over
            uncast.
        description: one line for error messages and docs.
    """

    name: str
    operations: frozenset
    devices: frozenset | None = None
    topologies: frozenset | None = None
    delay_penalty: bool = True
    higher_order: bool = False
    loss: Callable[[CTCGraph, Tensor], Tensor] | None = None
    viterbi: Callable[[CTCGraph, Tensor, int | None], tuple[Tensor, Tensor]] | None = None
    posteriors: Callable[[CTCGraph, Tensor], Tensor] | None = None
    accepts: Callable[[CTCGraph, Tensor], bool] | None = None
    available: Callable[[], bool] = lambda: True
    runs_on: frozenset | None = None
    priority: int = 50
    reads_half: bool = False
    description: str = ""

    def runs(self, operation: str, graph: CTCGraph, device: str | None = None) -> bool:
        """Whether it can compute ``operation`` on ``graph`` at all (on ``device`` if given)."""
        return (
            operation in self.operations
            and (device is None or self.runs_on is None or device in self.runs_on)
            and (self.topologies is None or graph.topology in self.topologies)
            and (self.delay_penalty or not graph.delay_penalty)
            and self.available()
        )

    def serves(self, operation: str, graph: CTCGraph, log_probs: Tensor, higher_order: bool = False) -> bool:
        """Whether ``'auto'`` may pick it for this call."""
        return (
            self.runs(operation, graph)
            and (self.devices is None or log_probs.device.type in self.devices)
            and (self.higher_order or not higher_order)
            and (self.accepts is None or self.accepts(graph, log_probs))
        )


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` (replacing one of the same name), in ``'auto'``'s order by priority."""
    global _REGISTRY
    entries = [b for name, b in _REGISTRY.items() if name != backend.name] + [backend]
    _REGISTRY = {b.name: b for b in sorted(entries, key=lambda b: b.priority)}
    return backend


def backends(operation: str | None = None) -> list[Backend]:
    """The registered backends in ``'auto'``'s order (those computing ``operation``)."""
    _load()
    return [b for b in _REGISTRY.values() if operation is None or operation in b.operations]


def impl_names() -> tuple[str, ...]:
    """Every ``impl`` a verb accepts."""
    _load()
    return ("auto", "fused", *_REGISTRY)


def check_impl(impl) -> str:
    """``impl`` as today's name; a ValueError for an unknown one, a DeprecationWarning for a
    former one."""
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string, one of {impl_names()}, got {type(impl).__name__}")
    if impl in DEPRECATED:
        warnings.warn(f"impl={impl!r} is deprecated: use impl={DEPRECATED[impl]!r}", DeprecationWarning, stacklevel=3)
        impl = DEPRECATED[impl]
    if impl not in impl_names():
        raise ValueError(f"impl must be one of {impl_names()}, got {impl!r}")
    return impl


def select(operation: str, impl: str, graph: CTCGraph, log_probs: Tensor) -> Backend:
    """The backend that computes ``operation`` for this call.

    ``'auto'``: the first registered that serves it; ``'fused'``: the same among first-order
    backends (for the loss); a name: that backend, if it runs the operation and the graph.

    Raises:
        ValueError: unknown ``impl``, or a named backend that cannot run this call (the message
            names those that can).
    """
    _load()
    impl = check_impl(impl)
    if impl in ("auto", "fused"):
        for backend in _REGISTRY.values():
            if backend.serves(operation, graph, log_probs) and (impl == "auto" or not backend.higher_order):
                return backend
        raise ValueError(f"no backend computes {operation!r} for topology={graph.topology!r} on {log_probs.device.type}")
    backend = _REGISTRY[impl]
    device = log_probs.device.type
    if not backend.runs(operation, graph, device):
        able = [b.name for b in _REGISTRY.values() if b.runs(operation, graph, device)]
        reason = "" if operation in backend.operations else f" (it computes {sorted(backend.operations)})"
        if operation in backend.operations and not backend.available():
            reason = " (not installed here)"
        elif operation in backend.operations and not backend.runs(operation, graph):
            reason = f" for topology={graph.topology!r}, delay_penalty={graph.delay_penalty}"
        elif operation in backend.operations:
            reason = f" on {device} tensors"
        raise ValueError(f"impl={impl!r} cannot compute {operation!r}{reason}: use one of {['auto'] + able}")
    return backend


_loaded = False


def _load() -> None:
    """Register the built-in backends (on first use: they import numba and the kernels)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import autograd, cuda_builtin, numba_cpu, reference  # noqa: F401  (each registers itself)
    from . import triton_gpu  # noqa: F401  (imports Triton only when a kernel runs)
