"""Decayed popularity ("trending"), globally and per segment, in dense numpy arrays.

Every positive item event adds its type weight to the item's global score and to its score in
the user's segment. Scores decay exponentially with ``half_life_days`` in event time, lazily:
they are stored relative to a reference time ``t0`` (``w * exp(lambda * (t - t0))``) and read as
``stored * exp(-lambda * (now - t0))``. Memory: ``(1 + n_segments) * n_items`` floats.

**Privacy floor.** Each entry (an item globally, an item in a segment) keeps a 64-bit user bitmap
(:mod:`infogap.models.privacy`): an entry is in the top lists (:meth:`Trending.top`: what is published as
``ig:trending`` and ``ig:trending:seg:{k}``, and what the ranker takes as trending candidates) only once
``min_users`` distinct users made it. Memory: ``(1 + n_segments) * n_items`` more 8-byte words.

>>> import numpy as np
>>> t = Trending(n_segments=2, capacity=4)
>>> t.ensure(3)
>>> t.add([0, 2, 2], [1, 1, -1], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
>>> t.top(2).tolist(), t.top(2, segment=1).tolist()
([2, 0], [0, 2])
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from infogap.models.privacy import floor_mask
from infogap.models.scratch import forget_memo, memo_of
from infogap.models.state_fields import Array, StateError, check, take


class Trending:
    """Global and per-segment decayed item popularity.

    Parameters
    ----------
    n_segments
        Number of segments (rows of the per-segment matrix).
    half_life_days
        Half-life of the scores in days of event time.
    capacity
        Initial number of item columns.
    min_users
        The privacy floor of the top lists (1: none).

    Examples
    --------
    >>> t = Trending(n_segments=1)
    >>> t.ensure(2)
    >>> t.add([1], [0], [2.0], [2.0])
    >>> float(t.global_[1]), float(t.segment_[0, 1]), t.global_max
    (2.0, 2.0, 2.0)
    """

    def __init__(self, n_segments: int = 8, half_life_days: float | None = 3.0,
                 momentum_half_life_days: float | None = 30.0, capacity: int = 1024, min_users: int = 1):
        self.n_segments = n_segments
        self.min_users = max(int(min_users), 1)
        self.half_life_days = half_life_days
        self.momentum_half_life_days = momentum_half_life_days
        self.capacity = capacity
        self.lam = 0.0 if not half_life_days else math.log(2.0) / (half_life_days * 86400.0)
        self.lam_m = 0.0 if not momentum_half_life_days else math.log(2.0) / (momentum_half_life_days * 86400.0)
        cap = max(int(capacity), 1)
        self.momentum_ = np.zeros(cap)
        self.global_ = np.zeros(cap)
        self.segment_ = np.zeros((n_segments, cap))
        #: per entry, the bits of the users who made it: row 0 global, row 1 + s segment s
        self.users_ = np.zeros((1 + n_segments, cap), np.uint64)
        self.global_max = 0.0
        self.segment_max = np.zeros(n_segments)
        self.n_items = 0

    #: what a snapshot holds of the scores (:mod:`infogap.models.state_fields`); the settings come from the config
    STATE = {"momentum_": Array(np.dtype(np.float64), 1), "global_": Array(np.dtype(np.float64), 1),
             "segment_": Array(np.dtype(np.float64), 2), "global_max": float,
             "segment_max": Array(np.dtype(np.float64), 1), "n_items": int}

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also state from before the privacy floor (no user known: nothing at a floor above 1)."""
        if "users_" not in state:
            state["users_"] = np.zeros((1 + state["n_segments"], state["global_"].shape[0]), np.uint64)
            state["min_users"] = 1
        self.__dict__.update(state)

    def to_state(self) -> dict:
        """The scores and user bitmaps as a plain tree (see :meth:`restore_state`)."""
        return {**take(self, self.STATE), "users_": self.users_}

    def restore_state(self, state, arrays=(), where: str = "trending") -> None:
        """Take the scores of :meth:`to_state`; refused unless they fit this object's segments.

        >>> t = Trending(n_segments=1); t.ensure(2); t.add([1], [0], [2.0], [2.0])
        >>> u = Trending(n_segments=1); u.restore_state(t.to_state()); u.top(1).tolist()
        [1]
        """
        f = check(state, self.STATE, where, arrays)
        cap = f["global_"].shape[0]
        if isinstance(state, dict) and "users_" in state:
            f["users_"] = check(state, {"users_": Array(np.dtype(np.uint64), 2)}, where, arrays)["users_"]
        else:  # from before the privacy floor: no user known, so no entry is at a floor above 1 until k new users
            f["users_"] = np.zeros((1 + self.n_segments, cap), np.uint64)
        if (f["momentum_"].shape != (cap,) or f["segment_"].shape != (self.n_segments, cap)
                or f["segment_max"].shape != (self.n_segments,) or not 0 <= f["n_items"] <= cap
                or f["users_"].shape != (1 + self.n_segments, cap)):
            raise StateError(f"{where}: the scores do not fit {self.n_segments} segments")
        scores = (f["momentum_"], f["global_"], f["segment_"], f["segment_max"], np.array([f["global_max"]]))
        if not all(np.isfinite(x).all() for x in scores):
            raise StateError(f"{where}: a score that is not a finite number")
        forget_memo(self)
        for name, v in f.items():
            setattr(self, name, v)

    def ensure(self, n_items: int) -> None:
        """Make room for ``n_items`` columns."""
        if n_items <= self.n_items:
            return
        forget_memo(self)  # the score views got longer
        self.n_items = n_items
        cap = self.global_.shape[0]
        if n_items <= cap:
            return
        new = max(n_items, 2 * cap)
        g = np.zeros(new)
        g[:cap] = self.global_
        mo = np.zeros(new)
        mo[:cap] = self.momentum_
        self.momentum_ = mo
        s = np.zeros((self.n_segments, new))
        s[:, :cap] = self.segment_
        us = np.zeros((1 + self.n_segments, new), np.uint64)
        us[:, :cap] = self.users_
        self.global_, self.segment_, self.users_ = g, s, us

    def changed(self) -> None:
        """Forget the remembered top lists: call after writing the score arrays directly."""
        forget_memo(self)

    def rescale(self, factor: float, factor_m: float = 1.0) -> None:
        """Multiply every score by ``factor`` (moving the reference time); ``factor_m`` for momentum."""
        forget_memo(self)
        self.momentum_ *= factor_m
        self.global_ *= factor
        self.segment_ *= factor
        self.global_max *= factor
        self.segment_max *= factor

    def add(self, items: list[int], segments: list[int], scaled: list[float], scaled_m: list[float],
            users=None) -> None:
        """Add scaled weights in event order; segment -1 updates the global score only.

        ``scaled_m`` feeds the slow "momentum" popularity. The maxima are kept up to date too
        (stored scores only grow between rescalings). ``users``: each entry's user bit mask (uint64,
        :mod:`infogap.models.privacy`; None: no user known).
        """
        forget_memo(self)
        if not len(items):
            return
        users = np.zeros(len(items), np.uint64) if users is None else np.asarray(users, np.uint64)
        self.global_max = _count_trends(np.asarray(items, np.int64), np.asarray(segments, np.int64),
                                        np.asarray(scaled, np.float64), np.asarray(scaled_m, np.float64), users,
                                        self.momentum_, self.global_, self.segment_, self.segment_max, self.users_,
                                        float(self.global_max))

    def at_floor(self, segment: int | None = None) -> np.ndarray:
        """Per item, whether its entry (global, or in ``segment``) has ``min_users`` users behind it."""
        return floor_mask(self.users_[0 if segment is None or segment < 0 else 1 + segment, : self.n_items],
                          self.min_users)

    def scores(self, segment: int | None = None) -> np.ndarray:
        """Scores of the items (a view, in reference-time units): global, or of one segment."""
        if segment is None or segment < 0:
            return self.global_[: self.n_items]
        return self.segment_[segment, : self.n_items]

    def top(self, n: int, segment: int | None = None) -> np.ndarray:
        """Rows of the ``n`` highest scores (positive only), best first; ties by row (read-only array).

        Remembered until the scores change: the stream learns a batch, then ranks every touched user,
        and each ranking asks for the same few lists.
        """
        memo = memo_of(self)  # {(n, segment): top rows}
        key = (n, -1 if segment is None else segment)
        out = memo.get(key)
        if out is None:
            out = memo[key] = self._top(n, segment)
            out.flags.writeable = False
        return out

    def top_kept(self, n: int, segment: int | None, keep) -> list[int]:
        """The first ``n`` rows of the ranking (:meth:`top`) for which ``keep(row)`` holds."""
        want = n
        while True:
            top = self.top(want, segment)
            out = [r for r in top.tolist() if keep(r)]
            if len(out) >= n or top.size < want:
                return out[:n]
            want *= 4

    def shows(self, r: int, segment: int | None = None) -> bool:
        """Whether item row ``r``'s entry (global, or in ``segment``) has ``min_users`` users behind it."""
        if self.min_users <= 1:
            return True
        return int(self.users_.item(0 if segment is None or segment < 0 else 1 + segment, r)).bit_count() >= self.min_users

    def _top(self, n: int, segment: int | None) -> np.ndarray:
        s = self.scores(segment)
        cand = np.flatnonzero(s > 0)
        if self.min_users > 1:  # the privacy floor, read for the scored items only
            cand = cand[floor_mask(self.users_[0 if segment is None or segment < 0 else 1 + segment, cand],
                                   self.min_users)]
        if n <= 0 or cand.size == 0:
            return cand[:0]
        if n < cand.size:
            v = s[cand]
            # the n best, widened to every item tied with the n-th best (ties break by row)
            cut = v[np.argpartition(v, v.size - n)[v.size - n]]
            cand = cand[v >= cut]
        order = np.lexsort((cand, -s[cand]))
        return cand[order[:n]]


@njit(cache=True, nogil=True)
def count_trend(i, s, x, xm, ubit, momentum, glob, seg_scores, segment_max, users,
                global_max):  # pragma: no cover - compiled
    """The trending step of one positive event on item ``i`` in segment ``s`` (-1: none): ``x`` into its
    global and segment scores (and their maxima), ``xm`` into its momentum, the user's bit mask ``ubit`` into the
    entries' bitmaps. Returns the new global maximum.
    The one definition: :meth:`Trending.add` runs it for a batch, the one-event kernel
    (:mod:`infogap.models.learn_core`) for one event."""
    momentum[i] += xm
    glob[i] += x
    users[0, i] |= ubit
    if glob[i] > global_max:
        global_max = glob[i]
    if s >= 0:
        users[1 + s, i] |= ubit
        seg_scores[s, i] += x
        if seg_scores[s, i] > segment_max[s]:
            segment_max[s] = seg_scores[s, i]
    return global_max


@njit(cache=True, nogil=True)
def _count_trends(items, segments, x, xm, ubits, momentum, glob, seg_scores, segment_max, users,
                  global_max):  # pragma: no cover - compiled
    """:func:`count_trend` of each entry in turn."""
    for j in range(items.size):
        global_max = count_trend(items[j], segments[j], x[j], xm[j], ubits[j], momentum, glob, seg_scores, segment_max,
                                 users, global_max)
    return global_max
