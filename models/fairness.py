"""Exposure, popularity bias, diversity and per-group accuracy of recommendation lists.

The figures of docs/evaluation.md beside HR@k, computed once after a prequential run
(:func:`infogap.models.evaluation.prequential`) from what it collected: the top-k lists as rows of
item indices (``-1`` for an empty slot), the stream positions of the tests, and the stream's
interactions that were new for their user (a ``(user, item)`` pair seen for the first time).

- **exposure Gini** (:func:`gini`) over the *catalogue*: how often each catalogue item appears in
  the lists, items never recommended counting 0. 0 is equal exposure, ``(n-1)/n`` all of it on one.
- **popularity** of an item at a test (:func:`popularity_before`): the users who interacted with it
  *before* the tested event (the event itself is learned after the list is made).
- **long tail** (:func:`head_thresholds`, :func:`long_tail_share`): at each test, the *head* is the
  most popular items that together take 20 % of the interactions so far, ties at the boundary
  included; every other item (never interacted with included) is long tail.
- **novelty** (:func:`novelty`): mean self-information ``-log2(pop / n_users)`` of the recommended
  items, both counted before the test; an item nobody has had yet counts as if one user had.
- **intra-list diversity** (:func:`intra_list_diversity`): mean over lists of the mean pairwise
  ``1 - Jaccard`` of the items' feature sets (MovieLens: genres).
- **HR per user group** (:func:`group_hit_rates`): HR with a Wilson 95 % interval per group, and the
  gap between the best- and the worst-served groups that have enough tested events.

Pure: numpy and the standard library.

>>> rows = np.array([[0, 1], [0, 2]])           # two lists over a catalogue of four items
>>> round(gini(np.bincount(rows.ravel(), minlength=4)), 3)  # exposure 2, 1, 1, 0
0.375
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from infogap.models import experiments

#: Share of the interactions (so far) that the head items take together.
HEAD_SHARE = 0.2
#: Fewest tested events a group needs to be compared in the best/worst gap.
MIN_GROUP_EVENTS = 1000
#: Age bands of MovieLens-1M (MovieLens-100K gives exact ages): ``age_band`` maps onto them.
AGE_BANDS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_AGE_EDGES = (18, 25, 35, 45, 50, 56)
#: User attributes read by :func:`user_groups` (``age`` is put into :data:`AGE_BANDS`).
GROUP_ATTRIBUTES = ("gender", "age", "occupation")


def gini(values: Iterable[float]) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, ``(n-1)/n`` when one has all.

    >>> gini([3, 3, 3, 3]), gini([0, 0, 0, 8]), gini([])
    (0.0, 0.75, 0.0)
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n, total = x.size, x.sum() if x.size else 0.0
    if n == 0 or total <= 0:
        return 0.0
    if x[0] < 0:
        raise ValueError("gini needs non-negative values")
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(((2.0 * ranks - n - 1.0) * x).sum() / (n * total))


def exposure(rows: np.ndarray, catalog_rows: np.ndarray) -> np.ndarray:
    """How many times each catalogue item (``catalog_rows``: item indices, ``-1`` for one never seen
    by the run) appears in the lists ``rows`` (item indices, ``-1`` for an empty slot).

    >>> exposure(np.array([[0, 1], [1, -1]]), np.array([1, 0, -1]))
    array([2, 1, 0])
    """
    rows = np.asarray(rows).ravel()
    catalog_rows = np.asarray(catalog_rows, dtype=np.int64)
    counts = np.bincount(rows[rows >= 0], minlength=max(int(catalog_rows.max(initial=-1)) + 1, 1))
    return np.where(catalog_rows >= 0, counts[np.maximum(catalog_rows, 0)], 0)


def popularity_before(pair_items: np.ndarray, pair_pos: np.ndarray, items: np.ndarray,
                      pos: np.ndarray) -> np.ndarray:
    """For each ``(items[j], pos[j])``, how many of the interactions ``(pair_items, pair_pos)`` are with
    that item at a stream position before ``pos[j]`` (vectorised: one sort, two binary searches).

    >>> popularity_before(np.array([0, 1, 0, 0]), np.array([0, 1, 2, 5]),
    ...                   np.array([[0, 1], [0, 2]]), np.array([[2, 2], [6, 6]]))
    array([[1, 1],
           [3, 0]])
    """
    pos = np.asarray(pos, dtype=np.int64)
    span = int(max(np.max(pair_pos, initial=0), pos.max(initial=0))) + 1
    return _count_before(_pair_keys(pair_items, pair_pos, span), span, items, pos)


def _pair_keys(pair_items: np.ndarray, pair_pos: np.ndarray, span: int) -> np.ndarray:
    return np.sort(np.asarray(pair_items, dtype=np.int64) * span + np.asarray(pair_pos, dtype=np.int64))


def _count_before(keys: np.ndarray, span: int, items: np.ndarray, pos: np.ndarray) -> np.ndarray:
    start = np.maximum(np.asarray(items, dtype=np.int64), 0) * span
    return np.searchsorted(keys, start + pos) - np.searchsorted(keys, start)


def head_thresholds(pair_items: Sequence[int], *, share: float = HEAD_SHARE) -> np.ndarray:
    """``t[j]``: after the first ``j`` interactions, the least popularity of a head item; an item is
    in the head iff its popularity is ``>= t[j]`` (the most popular items that together take at least
    ``share`` of the interactions, ties at the boundary included). ``t[0]`` is 1 (no head yet).

    Sequential (one pass, amortised O(1) an interaction): a histogram of the item counts and the
    interactions of the items at or above the threshold.

    >>> head_thresholds([0, 0, 1, 2, 0, 1], share=0.5).tolist()  # counts after 6: 3, 2, 1 -> head {0}
    [1, 1, 2, 2, 2, 3, 3]
    """
    counts: list[int] = []
    hist = [0, 0]  # hist[c]: items with count c (items at 0 are not tracked: never above a threshold)
    out = np.empty(len(pair_items) + 1, dtype=np.int64)
    out[0] = thr = 1
    mass = n = 0  # mass: interactions of the items with count >= thr
    for j, item in enumerate(pair_items, 1):
        if item >= len(counts):
            counts.extend([0] * (item + 1 - len(counts)))
        c = counts[item]
        counts[item] = c + 1
        n += 1
        if c >= thr:
            mass += 1
        elif c + 1 == thr:
            mass += thr
        if c:
            hist[c] -= 1
        if c + 1 == len(hist):
            hist.append(0)
        hist[c + 1] += 1
        need = share * n
        while mass - thr * hist[thr] >= need and mass - thr * hist[thr] > 0:  # the next count up still holds
            mass -= thr * hist[thr]
            thr += 1
        while mass < need and thr > 1:
            thr -= 1
            mass += thr * hist[thr]
        out[j] = thr
    return out


def long_tail_share(rows: np.ndarray, pop: np.ndarray, threshold: np.ndarray) -> float:
    """Share of the filled slots of ``rows`` whose item's popularity ``pop`` (same shape) is below the
    head threshold of its list (``threshold``, one per list); 0.0 without slots.

    >>> long_tail_share(np.array([[0, 1], [2, -1]]), np.array([[9, 1], [4, 0]]), np.array([5, 3]))
    0.3333333333333333
    """
    tail, filled = _tail(rows, pop, threshold)
    return tail / filled if filled else 0.0


def _tail(rows: np.ndarray, pop: np.ndarray, threshold: np.ndarray) -> tuple[int, int]:
    filled = np.asarray(rows) >= 0
    tail = np.asarray(pop) < np.asarray(threshold).reshape(-1, 1)
    return int((tail & filled).sum()), int(filled.sum())


def novelty(rows: np.ndarray, pop: np.ndarray, n_users: np.ndarray) -> float:
    """Mean self-information ``-log2(max(pop, 1) / n_users)`` (bits) of the filled slots of ``rows``;
    ``n_users`` has one entry per list. 0.0 without slots.

    >>> novelty(np.array([[0, 1]]), np.array([[8, 1]]), np.array([8]))  # 0 and 3 bits
    1.5
    """
    bits, filled = _self_information(rows, pop, n_users)
    return bits / filled if filled else 0.0


def _self_information(rows: np.ndarray, pop: np.ndarray, n_users: np.ndarray) -> tuple[float, int]:
    filled = np.asarray(rows) >= 0
    users = np.maximum(np.asarray(n_users, dtype=np.float64).reshape(-1, 1), 1.0)
    bits = np.log2(users) - np.log2(np.maximum(np.asarray(pop, dtype=np.float64), 1.0))
    return float(bits[filled].sum()), int(filled.sum())


def feature_masks(features: Sequence[Iterable[str] | None]) -> np.ndarray:
    """Each item's feature set as bits: shape ``(n_items, words)`` of uint64 (no feature: all zero).

    >>> feature_masks([["a", "b"], None, ["b"]])[:, 0].tolist()
    [3, 0, 2]
    """
    vocab: dict[str, int] = {}
    sets = [[vocab.setdefault(f, len(vocab)) for f in dict.fromkeys(fs)] if fs else [] for fs in features]
    words = max(1, (len(vocab) + 63) // 64)
    out = np.zeros((len(sets), words), dtype=np.uint64)
    for i, bits in enumerate(sets):
        for b in bits:
            out[i, b >> 6] |= np.uint64(1) << np.uint64(b & 63)
    return out


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)
    table = np.array([bin(b).count("1") for b in range(256)], dtype=np.int64)
    return table[x.view(np.uint8)].reshape(*x.shape[:-1], -1).sum(axis=-1)


def intra_list_diversity(rows: np.ndarray, masks: np.ndarray) -> float | None:
    """Mean over lists of the mean ``1 - |A & B| / |A | B|`` over the pairs of a list's items that both
    have features (``masks``: :func:`feature_masks`); lists without such a pair are left out, and
    ``None`` when no list has one.

    >>> m = feature_masks([["drama"], ["drama", "war"], ["comedy"], []])
    >>> intra_list_diversity(np.array([[0, 1, 2], [0, 3, -1]]), m)  # (1/2 + 1 + 1) / 3; second: no pair
    0.8333333333333334
    """
    total, lists = _ild(rows, masks)
    return total / lists if lists else None


def _ild(rows: np.ndarray, masks: np.ndarray) -> tuple[float, int]:
    """Sum over the lists with a pair of features of their mean pairwise dissimilarity, and how many."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] < 2 or not rows.size:
        return 0.0, 0
    masks = np.asarray(masks, dtype=np.uint64)
    has = np.zeros(rows.shape, dtype=bool)
    has[rows >= 0] = _popcount(masks[rows[rows >= 0]]) > 0
    m = masks[np.maximum(rows, 0)]
    total = np.zeros(rows.shape[0])
    pairs = np.zeros(rows.shape[0], dtype=np.int64)
    k = rows.shape[1]
    for a in range(k - 1):
        for b in range(a + 1, k):
            ok = has[:, a] & has[:, b]
            union = _popcount(m[:, a] | m[:, b])
            inter = _popcount(m[:, a] & m[:, b])
            total += np.where(ok, 1.0 - inter / np.maximum(union, 1), 0.0)
            pairs += ok
    lists = pairs > 0
    return float((total[lists] / pairs[lists]).sum()), int(lists.sum())


def list_figures(lists: np.ndarray, tested: np.ndarray, catalog_rows: np.ndarray, pair_items: np.ndarray,
                 pair_pos: np.ndarray, first_pos: np.ndarray, masks: np.ndarray | None = None, *,
                 head_share: float = HEAD_SHARE, chunk: int = 4096) -> dict:
    """Exposure Gini, long-tail share, novelty, intra-list diversity (with ``masks``) and the head's
    size at the end, of the lists ``lists`` (item indices, ``-1`` empty) made before the events at
    stream positions ``tested``; ``pair_items``/``pair_pos``: the new ``(user, item)`` pairs in stream
    order, ``first_pos``: each user's first interaction. Empty when no list has an item. Memory is
    bounded: ``chunk`` lists at a time.

    >>> f = list_figures(np.array([[1, 0]]), np.array([3]), np.array([0, 1, 2]),
    ...                  np.array([0, 0, 1]), np.array([0, 1, 2]), np.array([0, 1]))
    >>> f["exposure_gini"], f["long_tail_share"], round(f["novelty"], 3), f["head_items"]
    (0.3333333333333333, 0.5, 0.5, 1)
    """
    lists = np.asarray(lists)
    if not lists.size or not (lists >= 0).any():
        return {}
    tested = np.asarray(tested, dtype=np.int64)
    thresholds = head_thresholds(array("q", np.asarray(pair_items, dtype=np.int64).tobytes()), share=head_share)
    span = int(max(np.max(pair_pos, initial=0), tested.max(initial=0))) + 1
    keys = _pair_keys(pair_items, pair_pos, span)
    exposed = np.zeros(max(int(lists.max()) + 1, 1), dtype=np.int64)
    tail = slots = n_lists = 0
    bits = ild = 0.0
    for s in range(0, lists.shape[0], chunk):
        rows, at = lists[s:s + chunk], tested[s:s + chunk]
        exposed += np.bincount(rows[rows >= 0], minlength=exposed.size)
        pop = _count_before(keys, span, rows, at.reshape(-1, 1))
        t, filled = _tail(rows, pop, thresholds[np.searchsorted(pair_pos, at)])
        b, _ = _self_information(rows, pop, np.searchsorted(first_pos, at))
        tail, slots, bits = tail + t, slots + filled, bits + b
        if masks is not None:
            d, n = _ild(rows, masks)
            ild, n_lists = ild + d, n_lists + n
    catalog_rows = np.asarray(catalog_rows, dtype=np.int64)
    ok = (catalog_rows >= 0) & (catalog_rows < exposed.size)
    counts = np.where(ok, exposed[np.where(ok, catalog_rows, 0)], 0)
    pair_items = np.asarray(pair_items, dtype=np.int64)
    return {"exposure_gini": gini(counts), "long_tail_share": tail / slots, "novelty": bits / slots,
            "ild": ild / n_lists if n_lists else None,
            "head_items": int((np.bincount(pair_items) >= thresholds[-1]).sum()) if pair_items.size else 0}


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``hits / n`` (:func:`infogap.models.experiments.wilson`), ``(0.0, 1.0)``
    for ``n == 0`` (a group with no tested event says nothing).

    >>> [round(v, 4) for v in wilson(20, 100)]
    [0.1334, 0.2888]
    """
    return experiments.wilson(hits, n, z) or (0.0, 1.0)


def _group_order(g: str) -> tuple[int, str]:
    return (AGE_BANDS.index(g) if g in AGE_BANDS else len(AGE_BANDS), g)


def group_hit_rates(hits: np.ndarray, labels: Sequence[str | None], *,
                    min_n: int = MIN_GROUP_EVENTS) -> dict:
    """HR per group (tested events ``n``, ``hits``, ``hr``, Wilson 95 % ``ci95``) and the ``gap``
    between the best- and the worst-served groups with at least ``min_n`` tested events (``abs``: the
    difference of their HRs, ``ratio``: best / worst, None if the worst is 0; None with fewer than two
    such groups). Events whose label is None are left out.

    >>> r = group_hit_rates(np.array([1, 0, 1, 1, 0, 0]), ["F", "F", "M", "M", "M", None], min_n=2)
    >>> r["groups"]["F"]["hr"], round(r["groups"]["M"]["hr"], 3), r["gap"]["best"], round(r["gap"]["abs"], 3)
    (0.5, 0.667, 'M', 0.167)
    """
    hits = np.asarray(hits).astype(bool)
    codes: dict[str, int] = {}
    code = np.fromiter((-1 if x is None else codes.setdefault(str(x), len(codes)) for x in labels),
                       dtype=np.int64, count=len(labels))
    known = code >= 0
    n = np.bincount(code[known], minlength=len(codes))
    h = np.bincount(code[known], weights=hits[known], minlength=len(codes)).astype(np.int64)
    groups = {}
    for name in sorted(codes, key=_group_order):
        i = codes[name]
        lo, hi = wilson(int(h[i]), int(n[i]))
        groups[name] = {"n": int(n[i]), "hits": int(h[i]), "hr": float(h[i] / n[i]), "ci95": [lo, hi]}
    compared = [g for g, v in groups.items() if v["n"] >= min_n]
    gap = None
    if len(compared) >= 2:
        best = max(compared, key=lambda g: groups[g]["hr"])
        worst = min(compared, key=lambda g: groups[g]["hr"])
        b, w = groups[best]["hr"], groups[worst]["hr"]
        gap = {"best": best, "worst": worst, "abs": b - w, "ratio": b / w if w > 0 else None,
               "groups_compared": len(compared)}
    return {"groups": groups, "gap": gap, "min_n": min_n,
            "skipped": [g for g in groups if groups[g]["n"] < min_n]}


def age_band(age: int | float | None) -> str | None:
    """The MovieLens-1M band of an age in years (:data:`AGE_BANDS`); None for None.

    >>> [age_band(a) for a in (7, 18, 24, 25, 49, 50, 56, 73)]
    ['<18', '18-24', '18-24', '25-34', '45-49', '50-55', '56+', '56+']
    """
    if age is None:
        return None
    return AGE_BANDS[int(np.searchsorted(_AGE_EDGES, float(age), side="right"))]


def user_groups(users: Iterable[Mapping], attributes: Sequence[str] = GROUP_ATTRIBUTES) -> dict[str, dict[str, str]]:
    """``user_id -> {attribute: group}`` from user records (``age`` as its band; missing ones left out).

    >>> user_groups([{"user_id": "u1", "age": 24, "gender": "M", "occupation": "technician"}])
    {'u1': {'gender': 'M', 'age': '18-24', 'occupation': 'technician'}}
    """
    out = {}
    for u in users:
        g = {}
        for a in attributes:
            v = u.get(a)
            if v is not None and v != "":
                g[a] = age_band(v) if a == "age" else str(v)
        out[str(u["user_id"])] = g
    return out
