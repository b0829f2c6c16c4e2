"""The ranker's blend, filters and diversity over its candidates, compiled with numba.

Given the candidate rows (sorted) and their neighbour votes, one compiled call blends the scores
(``w_cooc * votes / max(votes) + segment trending + global trending + extra``, added in that order,
as :mod:`infogap.models.ranker` documents), orders the candidates best first (ties: the lower row), and walks
them keeping what the user may get: not had, not blocked, available, at most ``cap`` per category.
When the cap leaves fewer than ``n``, the capped items fill the rest and ``relaxed`` says so.

Items the caller excludes by id (``exclude=`` of a request) are found after the walk: the picked
ids are checked and any excluded row is blocked for a second walk. The result is the one an inline
check would give, because a row that is not picked never changed what was picked.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from infogap.models.scratch import scratch

#: marks over the catalog (all zero at rest; the kernel leaves them so)
_HAD, _BLOCKED = 1, 2


@njit(cache=True, nogil=True)
def _choose(cand, votes, w_cooc, seg_row, w_seg, glob, w_glob, extra, category, available, consumed, blocked, n,
            cap, marks):  # pragma: no cover - compiled; tested through choose()
    m = cand.size
    score = np.zeros(m)
    if votes.size:
        mx = votes.max()
        if mx > 0:
            score += votes * (w_cooc / mx)
    if seg_row.size:
        score += seg_row[cand] * w_seg
    if glob.size:
        score += glob[cand] * w_glob
    if extra.size:
        score += extra
    order = np.argsort(-score, kind="mergesort")
    for i in range(consumed.size):
        marks[consumed[i]] = _HAD
    for i in range(blocked.size):
        marks[blocked[i]] = _BLOCKED
    n_cat = 1
    for i in range(m):
        n_cat = max(n_cat, category[cand[i]] + 1)
    used = np.zeros(n_cat, np.int64)
    keep = np.empty(min(n, m), np.int64)
    skipped = np.empty(m, np.int64)
    n_keep = n_skip = 0
    for j in range(m):
        r = cand[order[j]]
        if marks[r] != 0 or not available[r]:
            continue
        c = category[r]
        if c >= 0:
            if used[c] >= cap:
                skipped[n_skip] = j
                n_skip += 1
                continue
            used[c] += 1
        keep[n_keep] = j
        n_keep += 1
        if n_keep == n:
            break
    for i in range(consumed.size):
        marks[consumed[i]] = 0
    for i in range(blocked.size):
        marks[blocked[i]] = 0
    relaxed = n_skip > 0 and n_keep < n
    fill = min(n - n_keep, n_skip)
    out = np.empty(n_keep + fill, np.int64)
    out[:n_keep] = keep[:n_keep]
    out[n_keep:] = skipped[:fill]
    return order, score, out, relaxed


class Choice(NamedTuple):
    """What :func:`choose` picked: ``order`` of the candidates best first, their blended ``score`` (in
    candidate order), ``keep`` (positions in ``order`` of the picked items, best first) and whether
    the category cap had to be ``relaxed``."""

    order: np.ndarray
    score: np.ndarray
    keep: np.ndarray
    relaxed: bool


def choose(cand: np.ndarray, votes: np.ndarray, w_cooc: float, seg_row: np.ndarray, w_seg: float,
           glob: np.ndarray, w_glob: float, extra: np.ndarray, *, category: np.ndarray, available: np.ndarray,
           consumed: np.ndarray, n: int, cap: int, exclude=None, item_ids=None) -> Choice:
    """Blend, order and pick at most ``n`` of ``cand`` (see the module docstring). Empty arrays leave a
    component out; ``w_seg`` and ``w_glob`` already divide by the trending maxima. ``exclude`` is a
    container of item ids (``item_ids[row]`` gives a row's id).

    Examples
    --------
    >>> cat = np.array([0, 0, 1, 1])
    >>> c = choose(np.array([0, 1, 2, 3]), np.array([4.0, 3.0, 2.0, 1.0]), 1.0, np.zeros(0), 0.0, np.zeros(0), 0.0,
    ...            np.zeros(0), category=cat, available=np.ones(4, bool), consumed=np.array([1], np.int32), n=2,
    ...            cap=1)
    >>> c.order[c.keep].tolist(), c.relaxed
    ([0, 2], False)
    >>> c = choose(np.array([0, 1, 2, 3]), np.array([4.0, 3.0, 2.0, 1.0]), 1.0, np.zeros(0), 0.0, np.zeros(0), 0.0,
    ...            np.zeros(0), category=cat, available=np.ones(4, bool), consumed=np.zeros(0, np.int32), n=2,
    ...            cap=1, exclude={"a"}, item_ids=["a", "b", "c", "d"])
    >>> c.order[c.keep].tolist()
    [1, 2]
    """
    marks = scratch("selection.marks", available.size, lambda size: np.zeros(size, np.int8))
    blocked = np.zeros(0, np.int64)
    while True:
        order, score, keep, relaxed = _choose(cand, votes, float(w_cooc), seg_row, float(w_seg), glob, float(w_glob),
                                              extra, category, available, consumed, blocked, int(n), int(cap), marks)
        if not exclude:
            return Choice(order, score, keep, bool(relaxed))
        rows = cand[order[keep]].tolist()
        out = [r for r in rows if item_ids[r] in exclude]
        if not out:
            return Choice(order, score, keep, bool(relaxed))
        blocked = np.r_[blocked, out]


#: What :func:`why` names as the component that contributed most to a picked item (the candidate
#: sources of :mod:`infogap.models.candidate_sources` follow, numbered from ``len(PARTS)``).
PARTS = ("cooc", "segment", "global", "content")
_NO_PART = np.zeros(0, np.int64)


@njit(cache=True, nogil=True)
def _why(sel, cand, votes, w_cooc, seg_row, w_seg, glob, w_glob, extra, extra_part, anchor, items, types, m, vals,
         block):  # pragma: no cover - compiled; tested through the ranker's reasons
    n = sel.size
    dom = np.full(n, -1, np.int64)
    a_row = np.full(n, -1, np.int64)
    count = np.zeros(n, np.int64)
    n_pair = np.zeros(n)
    a_type = np.zeros(n, np.int64)
    mx = votes.max() if votes.size else 0.0
    scale = w_cooc / mx if mx > 0 else 0.0
    for i in range(n):
        j = sel[i]
        r = cand[j]
        best, which = -np.inf, -1
        if mx > 0 and votes[j] * scale > best:
            best, which = votes[j] * scale, 0
        if seg_row.size and seg_row[r] * w_seg > best:
            best, which = seg_row[r] * w_seg, 1
        if glob.size and glob[r] * w_glob > best:
            best, which = glob[r] * w_glob, 2
        if extra.size and extra[j] > best:
            best, which = extra[j], extra_part[j] if extra_part.size else 3
        if not best > 0:
            continue
        dom[i] = which
        if which != 0 or anchor[i] < 0:
            continue
        at = anchor[i]
        a = items[at // m]
        slot = block[a] * m + at % m
        a_row[i] = a
        count[i] = int(vals[3, slot])
        n_pair[i] = vals[2, slot]
        for f in range(items.size):  # the item's newest occurrence in the history
            if items[f] == a:
                a_type[i] = types[f]
                break
    return dom, a_row, count, n_pair, a_type


def why(sel: np.ndarray, cand: np.ndarray, votes: np.ndarray, w_cooc: float, seg_row: np.ndarray, w_seg: float,
        glob: np.ndarray, w_glob: float, extra: np.ndarray, *, anchor: np.ndarray, items: np.ndarray,
        types: np.ndarray, cooc, extra_part: np.ndarray | None = None
        ) -> tuple[list[int], dict[int, tuple[int, int, float, int]]]:
    """For the picked candidates ``cand[sel]`` (components as :func:`choose` takes them): the index in
    :data:`PARTS` of the component that contributed most to each (the first of equals; -1 when none
    did; ``extra_part``, when given, names each candidate's part of ``extra``), and for those the votes
    made, the recent history item that voted most (``anchor``: each pick's from
    :meth:`infogap.models.votes.Votes.anchors`, ``items``/``types``: the history newest first) as
    ``{row: (history item, pair count, lift, its newest event type code)}``."""
    dom, a_row, count, n_pair, a_type = _why(sel, cand, votes, float(w_cooc), seg_row, float(w_seg), glob,
                                             float(w_glob), extra, _NO_PART if extra_part is None else extra_part,
                                             anchor, items, types, cooc.n_neighbours, cooc.vals, cooc.block)
    rows = cand[sel]
    has = a_row >= 0
    lift = cooc.lift(a_row[has], rows[has], n_pair[has], count[has])
    anchors = dict(zip(rows[has].tolist(), zip(a_row[has].tolist(), count[has].tolist(), lift.tolist(),
                                               a_type[has].tolist())))
    return dom.tolist(), anchors
