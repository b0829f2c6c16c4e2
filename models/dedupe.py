"""Counting each event once: remember event ids for a window of event time.

>>> d = Deduplicator(window_s=60)
>>> d.seen("e1", ts=1000.0), d.seen("e1", ts=1001.0), d.seen("e2", ts=1002.0)
(False, True, False)
>>> d.seen("e3", ts=2000.0), d.seen("e1", ts=2001.0)  # e1 left the window 60 s after the newest event
(False, False)
>>> back = Deduplicator(window_s=60); back.restore_state(d.to_state()); back.seen("e3", ts=2002.0), len(back)
(True, 2)
"""
from __future__ import annotations

import hashlib
from collections import deque

import numpy as np

from infogap.models.state_fields import Array, StateError, check, encode_float


class Deduplicator:
    """Event ids seen within ``window_s`` seconds (event time) of the newest event, at most ``max_ids``.

    Parameters
    ----------
    window_s
        How long, in event time, an id is remembered after the newest event seen. Ids are kept as
        8-byte digests: compact, and an erased user's id is not readable in them.
    max_ids
        Memory bound: past it the oldest ids are forgotten first.
    """

    def __init__(self, window_s: float = 86_400.0, max_ids: int = 2_000_000):
        self.window_s = window_s
        self.max_ids = max_ids
        self._ids: set[bytes] = set()
        self._order: deque[tuple[float, bytes]] = deque()
        self._newest = float("-inf")

    def __len__(self) -> int:
        return len(self._ids)

    def __getstate__(self) -> dict:
        """Pickled as two arrays (times, digests): a snapshot of a million ids in milliseconds, where the
        set and the deque of tuples took ~0.2 us an id, under the user stage's batch lock."""
        ts = np.fromiter((t for t, _ in self._order), np.float64, len(self._order))
        keys = np.frombuffer(b"".join(k for _, k in self._order), np.uint64)
        return {"window_s": self.window_s, "max_ids": self.max_ids, "newest": self._newest, "ts": ts, "keys": keys}

    def __setstate__(self, state: dict) -> None:
        if "_order" in state:  # pickled before the arrays
            self.__dict__.update(state)
            return
        self.window_s, self.max_ids, self._newest = state["window_s"], state["max_ids"], state["newest"]
        keys = [k.tobytes() for k in state["keys"]]
        self._order = deque(zip(state["ts"].tolist(), keys))
        self._ids = set(keys)

    def to_state(self) -> dict:
        """The ids as a plain tree for a snapshot: two arrays, times and 8-byte digests."""
        state = self.__getstate__()
        return {"newest": encode_float(state["newest"]), "ts": state["ts"], "keys": state["keys"]}

    def restore_state(self, state, arrays=(), where: str = "dedupe") -> None:
        """Take the ids of :meth:`to_state` (this object's window and bound apply, the oldest go first).

        >>> d = Deduplicator(window_s=60); _ = d.seen("e1", 1000.0)
        >>> e = Deduplicator(window_s=60); e.restore_state(d.to_state()); e.seen("e1", 1001.0)
        True
        """
        f = check(state, {"newest": float, "ts": Array(np.dtype(np.float64), 1),
                          "keys": Array(np.dtype(np.uint64), 1)}, where, arrays)
        if f["ts"].shape != f["keys"].shape:
            raise StateError(f"{where}: as many times as ids are needed")
        keys = [k.tobytes() for k in f["keys"]]
        self._order = deque(zip(f["ts"].tolist(), keys))
        self._ids = set(keys)
        self._newest = f["newest"]
        self._evict()

    def __contains__(self, event_id: str) -> bool:
        return _digest(event_id) in self._ids

    def seen(self, event_id: str, ts: float) -> bool:
        """True if ``event_id`` was seen in the window (a duplicate); else remember it and return False."""
        key = _digest(event_id)
        if key in self._ids:
            return True
        self._ids.add(key)
        self._order.append((ts, key))
        if ts > self._newest:
            self._newest = ts
        self._evict()
        return False

    def _evict(self) -> None:
        horizon = self._newest - self.window_s
        order, ids = self._order, self._ids
        while order and (order[0][0] < horizon or len(ids) > self.max_ids):
            ids.discard(order.popleft()[1])


def _digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=8).digest()
