"""Per-thread scratch space over the catalog for the compiled kernels: made once, grown (doubling)
when the catalog outgrows it, never part of a model's state.

>>> a = scratch("doc.example", 10, lambda size: [0] * size)
>>> len(a), scratch("doc.example", 5, lambda size: None) is a
(1024, True)
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_local = threading.local()


def scratch(name: str, n_items: int, make: Callable[[int], T]) -> T:
    """This thread's ``make(size)`` under ``name``, with ``size >= n_items`` (made anew when too small)."""
    held = getattr(_local, name, None)
    if held is None or held[0] < n_items:
        size = max(n_items, 2 * (held[0] if held else 0), 1024)
        held = (size, make(size))
        setattr(_local, name, held)
    return held[1]
