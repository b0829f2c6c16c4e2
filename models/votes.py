"""Neighbour votes: the ranker's inner loop, compiled with numba.

A user's recent items vote for their stored co-occurrence neighbours (see :mod:`infogap.models.ranker` for
the weights). With numpy this was a gather of ``k x M`` slots, a ``bincount`` into a dense array
over the whole catalog and a handful of catalog-sized passes: ~40 numpy calls per request, most of
their time spent on call overhead and on items nobody voted for. The compiled loop adds each slot's
vote into a dense accumulator; the voted items are then collected (by a scan of the accumulator for
non-zero votes, a disliked item's being negative, when the catalog is small next to the ``k x M`` slots, else by marking each first
touch as it happens: the test on every slot cost more than the adds, and marking in the first case
too cost a tenth of the votes), scaled by popularity and momentum, and filtered. Which recent item
voted most for an item (the anchor its reason cites) is asked only for the items picked, by a second
pass over the newest rows.

The arithmetic is the numpy version's, operation for operation, so the votes are bit-identical to it.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from infogap.models.privacy import at_floor
from infogap.models.scratch import scratch


#: Momentum is read at the hour (its half-life is weeks): requests within an hour share the factors, so
#: the memo below spares a ``pow`` per voted item (9 of ~70 us a request on MovieLens; same HR@10).
MOMENTUM_RESOLUTION_S = 3600.0


def _positions(size: int) -> np.ndarray:
    """Pick positions over the catalog for :func:`_anchors`, at rest 0."""
    return np.zeros(size, np.int64)


def _dense(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Accumulators over the catalog (votes, touched marks), at rest 0; the kernel leaves them so."""
    return np.zeros(size), np.zeros(size, np.int8)


class _MomentumMemo:
    """Per-thread memo of the momentum factors ``((c * dc + 0.5) / (p * dp + 1)) ** momentum``: a ``pow``
    per voted item was a third of the vote kernel. An entry is used only when the item's own inputs
    (``c``, ``p``) and the call's (``dc``, ``dp``, ``momentum``, one generation number) are those it was
    computed from, so it is exact whatever changed in between; it pays off when many requests share a
    moment (a stream batch ranks all its users after learning the batch)."""

    def __init__(self, size: int):
        #: per item: factor, the count and popularity it was computed from, its generation (one cache
        #: line an item: the vote kernel reads all four for every voted item)
        self.table = np.zeros((size, 4))
        self.table[:, 3] = -1.0
        self.key: tuple = ()
        self.current = 0

    def generation(self, key: tuple) -> int:
        if key != self.key:
            self.key, self.current = key, self.current + 1
        return self.current


@njit(cache=True, nogil=True)
def _add_row(nbr, sq_sym, sq_dir, base, ws, wd, directed, acc, mark, rows, n, scan):  # pragma: no cover - compiled
    """Add one neighbour row's votes; note first touches in ``rows`` unless the votes are scanned later."""
    for s in range(nbr.size):
        j = nbr[s]
        if j < 0:
            continue
        c = sq_sym[base + s] * ws
        if directed:
            c += sq_dir[base + s] * wd
        acc[j] += c
        if not scan and mark[j] == 0:
            mark[j] = 1
            rows[n] = j
            n += 1
    return n


@njit(cache=True, nogil=True)
def _votes(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, ipop, mom_count, mom_decay, pop, pop_decay,
           momentum, available, consumed, acc, mark, memo,
           gen):  # pragma: no cover - compiled; tested through vote()
    k, m = blocks.size, nb.shape[1]
    kd = a_dir.size
    size = ipop.size
    scan = size <= 2 * k * m
    rows = np.empty(size if scan else k * m, np.int64)
    n = 0
    for h in range(k):
        b = blocks[h]
        if b == 0:  # block 0: the item has no neighbours
            continue
        if h < kd:
            n = _add_row(nb[b], sq_sym, sq_dir, b * m, a_sym[h], a_dir[h], True, acc, mark, rows, n, scan)
        else:
            n = _add_row(nb[b], sq_sym, sq_dir, b * m, a_sym[h], 0.0, False, acc, mark, rows, n, scan)
    if scan:  # the voted items, by row (a slot's weights are positive; a disliked item's votes are negative)
        for j in range(size):
            rows[n] = j
            n += acc[j] != 0.0
    for i in range(consumed.size):
        j = consumed[i]
        if acc[j] > 0.0:
            acc[j] = -1.0  # zeroed below, after the scaling
    votes = np.empty(n)
    for t in range(n):
        j = rows[t]
        v = acc[j]
        acc[j] = 0.0
        mark[j] = 0
        if v < 0.0 or not available[j]:
            votes[t] = 0.0
            continue
        v *= ipop[j]
        if momentum != 0.0:
            c, p = mom_count[j], pop[j]
            if memo[j, 3] == gen and memo[j, 1] == c and memo[j, 2] == p:
                f = memo[j, 0]
            else:
                f = ((c * mom_decay + 0.5) / (p * pop_decay + 1.0)) ** momentum
                memo[j, 0] = f
                memo[j, 1] = c
                memo[j, 2] = p
                memo[j, 3] = gen
            v *= f
        votes[t] = v
    return rows[:n], votes


@njit(cache=True, nogil=True)
def _anchors(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, n_anchor, picks, pos, users,
             min_users):  # pragma: no cover - compiled
    """For each of ``picks``: ``h * M + slot`` of the largest vote it got from the ``n_anchor`` newest
    items (the first of equals, in the order the votes were added) through a slot at the privacy floor
    (``users``' bitmap shows ``min_users``: a reason cites it), -1 when none voted for it so."""
    m = nb.shape[1]
    kd = a_dir.size
    best = np.full(picks.size, -1.0)
    out = np.full(picks.size, -1, np.int64)
    for i in range(picks.size):
        pos[picks[i]] = i + 1
    for h in range(min(n_anchor, blocks.size)):
        b = blocks[h]
        if b == 0 or a_sym[h] < 0.0:  # (a disliked item is no reason)
            continue
        base = b * m
        for s in range(m):
            j = nb[b, s]
            if j < 0 or pos[j] == 0 or (min_users > 1 and not at_floor(users[base + s], min_users)):  # (no floor: users is empty)
                continue
            c = sq_sym[base + s] * a_sym[h]
            if h < kd:
                c += sq_dir[base + s] * a_dir[h]
            p = pos[j] - 1
            if c > best[p]:
                best[p] = c
                out[p] = h * m + s
    for i in range(picks.size):
        pos[picks[i]] = 0
    return out


#: Buckets of the top-k selection's value histogram.
_BUCKETS = 128


@njit(cache=True, nogil=True)
def _top(rows, votes, k):  # pragma: no cover - compiled; tested through Votes.top
    """Positions of the k largest positive votes (ties: lower rows), by row.

    A floor under the k-th largest vote is found first: half the largest, lowered until k votes reach it
    (on MovieLens the k-th largest of ~900 is ~0.6 of the largest, so ~10 % of the votes pass), counting
    and selecting them in one pass. Only those are kept, and a histogram of them over ``_BUCKETS`` equal
    slices of ``[floor, max]`` finds the slice the k-th largest falls in; everything above it is in, and
    that slice's own few items are ranked exactly (vote, then row). A heap or a quickselect spent most
    of their time on mispredicted comparisons, and a histogram of every vote on its float-to-int
    conversions; four interleaved histograms keep repeated buckets from waiting on each other's
    counts."""
    n = votes.size
    mx0 = mx1 = mx2 = mx3 = 0.0  # four of each: one chain of max/min waited ~4 cycles a vote
    mn0 = mn1 = mn2 = mn3 = np.inf
    m = 0
    t = 0
    while t + 4 <= n:
        v0, v1, v2, v3 = votes[t], votes[t + 1], votes[t + 2], votes[t + 3]
        mx0, mx1, mx2, mx3 = max(mx0, v0), max(mx1, v1), max(mx2, v2), max(mx3, v3)
        mn0 = min(mn0, v0 if v0 > 0.0 else np.inf)
        mn1 = min(mn1, v1 if v1 > 0.0 else np.inf)
        mn2 = min(mn2, v2 if v2 > 0.0 else np.inf)
        mn3 = min(mn3, v3 if v3 > 0.0 else np.inf)
        m += (v0 > 0.0) + (v1 > 0.0) + (v2 > 0.0) + (v3 > 0.0)
        t += 4
    while t < n:
        v = votes[t]
        mx0 = max(mx0, v)
        if v > 0.0:
            mn0 = min(mn0, v)
            m += 1
        t += 1
    mx, mn = max(max(mx0, mx1), max(mx2, mx3)), min(min(mn0, mn1), min(mn2, mn3))
    if k <= 0 or m == 0:
        return np.empty(0, np.int64)
    if m <= k:
        out = np.empty(m, np.int64)
        o = 0
        for t in range(n):
            out[o] = t
            o += votes[t] > 0.0
    else:
        lo = mx * 0.5
        sel = np.empty(n, np.int64)
        while True:  # ends: at lo == mn all m > k positive votes count
            lo = max(lo, mn)
            ns = 0
            for t in range(n):  # counted and selected in one pass, without a branch (a store each)
                sel[ns] = t
                ns += votes[t] >= lo
            if ns >= k:
                break
            lo *= 0.125
        span = mx - lo
        scale = (_BUCKETS - 1) / span if span > 0.0 else 0.0  # bucket 1 + int((v - lo) * scale) rises with v
        hist = np.zeros((4, _BUCKETS + 1), np.int32)
        i = 0
        while i + 4 <= ns:
            for q in range(4):
                hist[q, 1 + int((votes[sel[i + q]] - lo) * scale)] += 1
            i += 4
        while i < ns:
            hist[0, 1 + int((votes[sel[i]] - lo) * scale)] += 1
            i += 1
        above = 0
        cut = _BUCKETS
        while True:
            c = hist[0, cut] + hist[1, cut] + hist[2, cut] + hist[3, cut]
            if above + c >= k:
                break
            above += c
            cut -= 1
        out = np.empty(k, np.int64)
        edge = np.empty(ns, np.int64)
        o = ne = 0
        for i in range(ns):
            t = sel[i]
            b = 1 + int((votes[t] - lo) * scale)
            out[o] = t
            o += b > cut
            edge[ne] = t
            ne += b == cut
        if ne > 64:  # many equal or near-equal votes: sort (row, then vote: stable)
            e = edge[:ne]
            by_row = e[np.argsort(rows[e], kind="mergesort")]
            edge = by_row[np.argsort(-votes[by_row], kind="mergesort")]
        else:
            for i in range(1, ne):  # the edge bucket, best first (insertion: it holds few)
                x = edge[i]
                j = i - 1
                while j >= 0 and (votes[x] > votes[edge[j]]
                                  or (votes[x] == votes[edge[j]] and rows[x] < rows[edge[j]])):
                    edge[j + 1] = edge[j]
                    j -= 1
                edge[j + 1] = x
        for i in range(k - o):
            out[o + i] = edge[i]
    for i in range(1, out.size):  # by row (insertion: nearly sorted already when the rows are)
        x = out[i]
        j = i - 1
        while j >= 0 and rows[out[j]] > rows[x]:
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = x
    return out


class Votes:
    """The voted items of one request (in no particular order) with their scaled votes.

    Examples
    --------
    >>> nb = np.array([[-1, -1], [2, 1], [2, -1]], np.int32)  # block 0 empty; item 0 -> block 1 ...
    >>> sq = np.array([0, 0, 4.0, 1.0, 2.0, 0])
    >>> v = vote(nb, sq * 0, sq, np.array([1, 2], np.int32), np.array([1.0, 0.5]), np.zeros(0),
    ...          ipop=np.ones(3), available=np.ones(3, bool), consumed=np.zeros(0, np.int32))
    >>> sorted(zip(v.rows.tolist(), v.votes.tolist()))
    [(1, 1.0), (2, 5.0)]
    >>> v.rows[v.top(1)].tolist(), v.of(np.array([0, 2])).tolist()
    ([2], [0.0, 5.0])

    ``anchors(items, n_anchor)``: for each item, ``h * M + slot`` of the strongest vote it got from one of
    the ``n_anchor`` most recent items (``h`` = 0 is the newest), -1 when none of those voted for it; with
    ``users`` (per slot bitmaps) and ``min_users``, through a slot at that privacy floor only:

    >>> v.anchors(np.array([2, 1, 0]), 1).tolist()
    [0, 1, -1]
    >>> users = np.array([0, 0, 0b11, 0b1, 0, 0], np.uint64)  # two users made slot 2 (item 2), one slot 3
    >>> v.anchors(np.array([2, 1, 0]), 1, users, min_users=2).tolist()
    [0, -1, -1]
    """

    __slots__ = ("rows", "votes", "_order", "_inputs")

    def __init__(self, rows: np.ndarray, votes: np.ndarray, inputs: tuple = ()):
        self.rows, self.votes = rows, votes
        self._order = None
        self._inputs = inputs  # (nb, sq_dir, sq_sym, blocks, a_sym, a_dir, n_items): what anchors() re-reads

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

    def anchors(self, items: np.ndarray, n_anchor: int, users: np.ndarray | None = None,
                min_users: int = 1) -> np.ndarray:
        """Where each of ``items`` (distinct rows) got its strongest vote among the ``n_anchor`` newest
        items, through a slot at the privacy floor ``min_users`` of ``users`` (see the class example)."""
        if not self._inputs or not len(items):
            return np.full(len(items), -1, np.int64)
        *inputs, size = self._inputs
        pos = scratch("votes.pos", size, _positions)
        users = _NO_USERS if users is None or min_users <= 1 else users
        return _anchors(*inputs, int(n_anchor), np.asarray(items, np.int64), pos, users, int(min_users))


_NO_USERS = np.zeros(0, np.uint64)  # (no floor: the bitmaps are not read)


def vote(nb: np.ndarray, sq_dir: np.ndarray, sq_sym: np.ndarray, blocks: np.ndarray, a_sym: np.ndarray,
         a_dir: np.ndarray, *, ipop: np.ndarray, available: np.ndarray, consumed: np.ndarray,
         mom_count: np.ndarray | None = None, mom_decay: float = 1.0, pop: np.ndarray | None = None,
         pop_decay: float = 1.0, momentum: float = 0.0) -> Votes:
    """Sum the votes of the recent items' neighbour blocks (``blocks[h]`` for the h-th newest item,
    weights ``a_sym[h]`` and, for the first ``a_dir.size`` items, ``a_dir[h]``) per neighbour, then
    scale each voted item j by ``ipop[j]`` and ``((mom_count[j] * mom_decay + 0.5) / (pop[j] *
    pop_decay + 1)) ** momentum``; items in ``consumed`` and unavailable items get 0. Neighbours are
    item rows below ``ipop.size``."""
    if momentum == 0.0 or mom_count is None or pop is None:
        mom_count = pop = ipop
        momentum = 0.0
    memo = scratch("votes.memo", ipop.size, _MomentumMemo)
    gen = memo.generation((float(mom_decay), float(pop_decay), float(momentum)))
    rows, votes = _votes(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, ipop, mom_count, float(mom_decay), pop,
                         float(pop_decay), float(momentum), available, consumed, *scratch("votes.dense", ipop.size,
                                                                                          _dense),
                         memo.table, gen)
    return Votes(rows, votes, (nb, sq_dir, sq_sym, blocks, a_sym, a_dir, ipop.size))
