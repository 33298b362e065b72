"""Former names that keep working, with a DeprecationWarning."""
from __future__ import annotations

import functools
import warnings
from typing import Callable


def renamed(function: Callable, old: str) -> Callable:
    """``function`` under its former name ``old``: same behaviour, a DeprecationWarning per call."""

    @functools.wraps(function)
    def former(*args, **kwargs):
        warnings.warn(f"{old} is deprecated: use {function.__module__}.{function.__name__}", DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    return former
