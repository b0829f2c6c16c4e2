"""The ranker's blend, filters and diversity over its candidates, compiled with numba.

Given the candidate rows (sorted) and their neighbour votes, one compiled call blends the scores
(``w_cooc * votes / max(votes) + segment trending + global trending + extra``, added in that order,
as :mod:`models.ranker` documents), orders the candidates best first (ties: the lower row), and walks
them keeping what the user may get: not had, not blocked, available, at most ``cap`` per category.
When the cap leaves fewer than ``n``, the capped items fill the rest and ``relaxed`` says so.

Items the caller excludes by id (``exclude=`` of a request) are found after the walk: the picked
ids are checked and any excluded row is blocked for a second walk. The result is the one an inline
check would give, because a row that is not picked never changed what was picked.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
from numba import njit

_scratch = threading.local()

_HAD, _BLOCKED = 1, 2


def _marks(n_items: int) -> np.ndarray:
    """A per-thread ``int8`` array of zeros over the catalog; the kernel leaves it all zero again."""
    m = getattr(_scratch, "marks", None)
    if m is None or m.size < n_items:
        m = np.zeros(max(n_items, 2 * (0 if m is None else m.size), 1024), np.int8)
        _scratch.marks = m
    return m


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
    marks = _marks(available.size)
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
