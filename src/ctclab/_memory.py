"""Fail fast on calls that cannot fit in memory, before allocating anything.

A CTC call's memory is known from its shapes (the forward variables are ``T x S`` per item, the
Viterbi backpointers ``T x S / 4`` bytes): a call that needs more than the machine has would
otherwise spend minutes swapping, or be killed, instead of saying what to change.
"""
from __future__ import annotations

import os

import torch


class InsufficientMemoryError(MemoryError, ValueError):
    """A call needs more memory than the device has available. Both a ``MemoryError`` and a
    ``ValueError`` (the arguments' sizes are what is wrong)."""


def available_bytes(device: torch.device) -> int | None:
    """Memory that ``device`` can still hand out, in bytes, or None where it cannot be told.
    CPU: Linux's ``MemAvailable`` (free plus reclaimable cache), else the physical memory.
    CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.0f} MiB"


#: Calls needing less than this are not checked: asking the system costs a file read (tens of
#: microseconds, a percent of a small loss call), and a machine without this much free memory
#: fails elsewhere first.
ALWAYS_FITS = 64 * 2**20


def check_memory(nbytes: int, device: torch.device, what: str, advice: str) -> None:
    """Raise :class:`InsufficientMemoryError` if a call of ``what`` needing at least ``nbytes``
    cannot fit on ``device``, saying how much it needs, how much there is, and ``advice``.
    ``nbytes`` is a lower bound of the call's memory: a call refused here could never succeed."""
    if nbytes < ALWAYS_FITS:
        return
    available = available_bytes(torch.device(device))
    if available is not None and nbytes > available:
        raise InsufficientMemoryError(
            f"{what} would need at least {_gib(nbytes)} of memory on {torch.device(device).type}, "
            f"{_gib(available)} is available: {advice}"
        )


#: Default budget of a Viterbi alignment's working memory (``forced_align(max_memory=None)``):
#: this much, or half the memory available now if that is less. Inputs whose full backpointer
#: table fits take it (no recomputation at all); longer ones are checkpointed, which costs a
#: small fraction of a forward pass (see :func:`ctclab.backends.numba_viterbi.viterbi`), so the
#: budget only has to keep a long input from taking a large share of the machine. 1 GiB holds
#: the full table of an hour of 20 ms frames against 1,300 tokens (T * (2L + 1) / 4 bytes).
DEFAULT_VITERBI_MEMORY = 2**30


def viterbi_bytes(T: int, S: int, every: int) -> int:
    """Working memory of one item's Viterbi, ``T`` frames, ``S`` states, checkpoints every
    ``every`` frames (``>= T``: none, the full table): the backpointers of a segment (2 bits
    per state and frame), the checkpoints (``S + 4`` float64 before every segment but the
    first) and the kernel's rows (scores, emissions, weights, codes)."""
    K = max(1, min(every, T))
    row = 4 * ((S + 3) // 4) + 4
    checkpoints = 8 * row * (-(-T // K)) if K < T else 0
    return K * (row // 4) + checkpoints + 8 * 9 * row


def memory_optimal_every(T: int) -> int:
    """The checkpoint interval with the least memory: ``8 S T / K`` bytes of checkpoints against
    ``K S / 4`` of backpointers balance at ``K = sqrt(32 T)`` (whatever ``S``)."""
    return max(1, min(T, round((32 * T) ** 0.5)))

