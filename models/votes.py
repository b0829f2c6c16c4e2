"""Neighbour votes: the ranker's inner loop, compiled with numba.

A user's recent items vote for their stored co-occurrence neighbours (see :mod:`models.ranker` for
the weights). With numpy this was a gather of ``k x M`` slots, a ``bincount`` into a dense array
over the whole catalog and a handful of catalog-sized passes: ~40 numpy calls per request, most of
their time spent on call overhead and on items nobody voted for. The compiled loop touches only the
voted items, applies the popularity and momentum scaling and the filters to those, and remembers
for each item the recent item that voted most for it (the anchor its reason cites), in one pass.

The arithmetic is the numpy version's, operation for operation, so the votes are bit-identical to it.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from models.scratch import scratch

_UNTOUCHED = -2


def _dense(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accumulators over the catalog (votes, best anchor vote, best anchor slot), at rest 0, -1 and
    ``_UNTOUCHED``; the kernel leaves them so again."""
    return np.zeros(size), np.full(size, -1.0), np.full(size, _UNTOUCHED, np.int64)


class _MomentumMemo:
    """Per-thread memo of the momentum factors ``((c * dc + 0.5) / (p * dp + 1)) ** momentum``: a ``pow``
    per voted item was a third of the vote kernel. An entry is used only when the item's own inputs
    (``c``, ``p``) and the call's (``dc``, ``dp``, ``momentum``, one generation number) are those it was
    computed from, so it is exact whatever changed in between; it pays off when many requests share a
    moment (a stream batch ranks all its users after learning the batch)."""

    def __init__(self, size: int):
        self.factor = np.zeros(size)
        self.count = np.zeros(size)
        self.pop = np.zeros(size)
        self.gen = np.zeros(size, np.int64)
        self.key: tuple = ()
        self.current = 0

    def generation(self, key: tuple) -> int:
        if key != self.key:
            self.key, self.current = key, self.current + 1
        return self.current


@njit(cache=True, nogil=True)
def _votes(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, n_anchor, ipop, mom_count, mom_decay, pop, pop_decay,
           momentum, available, consumed, acc, best_c, best_p, m_factor, m_count, m_pop, m_gen,
           gen):  # pragma: no cover - compiled; tested through vote()
    k, m = blocks.size, nb.shape[1]
    kd = a_dir.size
    rows = np.empty(k * m, np.int64)
    n = 0
    for h in range(k):
        b = blocks[h]
        if b == 0:  # block 0: the item has no neighbours
            continue
        base = b * m
        ws = a_sym[h]
        wd = a_dir[h] if h < kd else 0.0
        anchored = h < n_anchor
        for s in range(m):
            j = nb[b, s]
            if j < 0:
                continue
            c = sq_sym[base + s] * ws
            if h < kd:
                c += sq_dir[base + s] * wd
            if best_p[j] == _UNTOUCHED:
                best_p[j] = -1
                rows[n] = j
                n += 1
            acc[j] += c
            if anchored and c > best_c[j]:
                best_c[j] = c
                best_p[j] = h * m + s
    for i in range(consumed.size):
        j = consumed[i]
        if best_p[j] != _UNTOUCHED:
            acc[j] = -1.0  # zeroed below, after the scaling
    votes = np.empty(n)
    anchor = np.empty(n, np.int64)
    for t in range(n):
        j = rows[t]
        v = acc[j]
        anchor[t] = best_p[j]
        acc[j] = 0.0
        best_c[j] = -1.0
        best_p[j] = _UNTOUCHED
        if v < 0.0 or not available[j]:
            votes[t] = 0.0
            continue
        v *= ipop[j]
        if momentum != 0.0:
            if m_gen[j] == gen and m_count[j] == mom_count[j] and m_pop[j] == pop[j]:
                f = m_factor[j]
            else:
                mom = mom_count[j] * mom_decay + 0.5
                mom /= pop[j] * pop_decay + 1.0
                f = mom ** momentum
                m_factor[j] = f
                m_count[j] = mom_count[j]
                m_pop[j] = pop[j]
                m_gen[j] = gen
            v *= f
        votes[t] = v
    return rows[:n], votes, anchor


@njit(cache=True, nogil=True)
def _weaker(rows, votes, a, b):  # pragma: no cover - compiled
    """Whether position ``a`` ranks below ``b``: a smaller vote, or an equal vote and a higher row."""
    return votes[a] < votes[b] or (votes[a] == votes[b] and rows[a] > rows[b])


@njit(cache=True, nogil=True)
def _top(rows, votes, k):  # pragma: no cover - compiled; tested through Votes.top
    """Positions of the k largest positive votes (ties: lower rows), by row: one pass with a min-heap
    whose root is the weakest kept (smallest vote, then highest row)."""
    heap = np.empty(max(k, 1), np.int64)
    size = 0
    for t in range(votes.size):
        if votes[t] <= 0.0:
            continue
        if size < k:  # sift up
            i = size
            size += 1
            while i > 0:
                parent = (i - 1) // 2
                p = heap[parent]
                if _weaker(rows, votes, p, t):
                    break
                heap[i] = p
                i = parent
            heap[i] = t
            continue
        if k == 0:
            break
        if _weaker(rows, votes, t, heap[0]):
            continue
        i = 0  # replace the root, sift down
        while True:
            c = 2 * i + 1
            if c >= size:
                break
            if c + 1 < size and _weaker(rows, votes, heap[c + 1], heap[c]):
                c += 1
            q = heap[c]
            if _weaker(rows, votes, t, q):
                break
            heap[i] = q
            i = c
        heap[i] = t
    out = heap[:size]
    return out[np.argsort(rows[out], kind="mergesort")]


class Votes:
    """The voted items of one request (in no particular order) with their scaled votes and anchors.

    ``anchor[t]`` is ``h * M + slot`` of the strongest vote item ``rows[t]`` got from one of the
    ``n_anchor`` most recent items (``h`` = 0 is the newest), or -1 when none of those voted for it.

    Examples
    --------
    >>> nb = np.array([[-1, -1], [2, 1], [2, -1]], np.int32)  # block 0 empty; item 0 -> block 1 ...
    >>> sq = np.array([0, 0, 4.0, 1.0, 2.0, 0])
    >>> v = vote(nb, sq * 0, sq, np.array([1, 2], np.int32), np.array([1.0, 0.5]), np.zeros(0), 1,
    ...          ipop=np.ones(3), available=np.ones(3, bool), consumed=np.zeros(0, np.int32))
    >>> v.rows.tolist(), v.votes.tolist(), v.anchor.tolist()
    ([2, 1], [5.0, 1.0], [0, 1])
    >>> v.top(1).tolist(), v.of(np.array([0, 2])).tolist()
    ([0], [0.0, 5.0])
    """

    __slots__ = ("rows", "votes", "anchor", "_order")

    def __init__(self, rows: np.ndarray, votes: np.ndarray, anchor: np.ndarray):
        self.rows, self.votes, self.anchor = rows, votes, anchor
        self._order = None

    def top(self, k: int) -> np.ndarray:
        """Positions of the (at most) ``k`` items with the largest positive votes (equal votes at the
        cut: the lower rows), by item row."""
        return _top(self.rows, self.votes, k)

    def index(self, items: np.ndarray) -> np.ndarray:
        """Positions of ``items`` in :attr:`rows`, -1 for items that got no vote."""
        if not self.rows.size:
            return np.full(len(items), -1, np.int64)
        if self._order is None:
            self._order = np.argsort(self.rows)
        srt = self.rows[self._order]
        at = np.minimum(np.searchsorted(srt, items), srt.size - 1)
        return np.where(srt[at] == items, self._order[at], -1)

    def of(self, items: np.ndarray) -> np.ndarray:
        """The votes of ``items`` (0 for items that got none)."""
        pos = self.index(items)
        return np.where(pos >= 0, self.votes[pos], 0.0) if self.rows.size else np.zeros(len(items))


def vote(nb: np.ndarray, sq_dir: np.ndarray, sq_sym: np.ndarray, blocks: np.ndarray, a_sym: np.ndarray,
         a_dir: np.ndarray, n_anchor: int, *, ipop: np.ndarray, available: np.ndarray, consumed: np.ndarray,
         mom_count: np.ndarray | None = None, mom_decay: float = 1.0, pop: np.ndarray | None = None,
         pop_decay: float = 1.0, momentum: float = 0.0) -> Votes:
    """Sum the votes of the recent items' neighbour blocks (``blocks[h]`` for the h-th newest item,
    weights ``a_sym[h]`` and, for the first ``a_dir.size`` items, ``a_dir[h]``) per neighbour, then
    scale each voted item j by ``ipop[j]`` and ``((mom_count[j] * mom_decay + 0.5) / (pop[j] *
    pop_decay + 1)) ** momentum``; items in ``consumed`` and unavailable items get 0."""
    if momentum == 0.0 or mom_count is None or pop is None:
        mom_count = pop = ipop
        momentum = 0.0
    memo = scratch("votes.memo", ipop.size, _MomentumMemo)
    gen = memo.generation((float(mom_decay), float(pop_decay), float(momentum)))
    rows, votes, anchor = _votes(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, n_anchor, ipop, mom_count,
                                 float(mom_decay), pop, float(pop_decay), float(momentum), available, consumed,
                                 *scratch("votes.dense", ipop.size, _dense), memo.factor, memo.count, memo.pop,
                                 memo.gen, gen)
    return Votes(rows, votes, anchor)
