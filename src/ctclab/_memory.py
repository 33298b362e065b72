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
