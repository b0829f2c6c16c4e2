"""Space the models keep outside their state: never pickled, never compared, so reads change nothing.

Per-thread scratch arrays over the catalog for the compiled kernels, made once and grown (doubling)
when the catalog outgrows them:

>>> a = scratch("doc.example", 10, lambda size: [0] * size)
>>> len(a), scratch("doc.example", 5, lambda size: None) is a
(1024, True)

Per-object memos of what reads derive (:func:`memo_of`), dropped with their object:

>>> class Thing: pass
>>> t = Thing(); memo_of(t)["x"] = 1; memo_of(t)
{'x': 1}
"""
from __future__ import annotations

import threading
import weakref
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


#: id(object) -> that object's memo dict. Keyed by id, each entry removed when its object goes (a
#: ``weakref.finalize``): a WeakKeyDictionary built a weak reference on every lookup, i.e. on every
#: learned event and every request.
_MEMOS: dict[int, dict] = {}


def memo_of(obj) -> dict:
    """``obj``'s memo (a dict; ``obj`` must support weak references)."""
    memo = _MEMOS.get(id(obj))
    if memo is None:
        memo = _MEMOS[id(obj)] = {}
        weakref.finalize(obj, _MEMOS.pop, id(obj), None)
    return memo


def forget_memo(obj) -> None:
    """Empty ``obj``'s memo (what it derived changed)."""
    memo = _MEMOS.get(id(obj))
    if memo:
        memo.clear()
