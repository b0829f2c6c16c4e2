"""Prequential (test-then-learn) evaluation of online recommenders, its metrics and two baselines.

The protocol of docs/evaluation.md: events are replayed in timestamp order; before each interaction of a
*known* user (one with an earlier interaction), the model is asked for its top-``k`` excluding the
items the user already has, and it is a hit if the interacted item is in that list; then the model
learns the event. Any object with ``learn_one(event)`` and ``recommend(user_id, n, exclude=...)``
can be evaluated (``models.Engine``, the baselines below, a periodically refit batch peer); the
recommendations are a list of item ids or a list of objects with an ``item_id`` attribute.

Metrics: HR@k (share of evaluated events that are hits), NDCG@k (``1/log2(rank+2)`` for a hit at
0-based ``rank``, else 0; one relevant item so the ideal DCG is 1), catalogue coverage (distinct
items ever recommended / catalogue size) and the HR curve over the stream (:func:`hr_curve`); and
from the lists and the stream, once the replay is over, the figures of :mod:`infogap.models.fairness`:
exposure Gini over the catalogue, long-tail share, novelty, intra-list diversity (with item
features) and HR per user group (with user attributes).

Pure: numpy and the standard library; time is measured only through a ``clock`` the caller passes.

>>> stream = [
...     {"user_id": "a", "item_id": "x", "type": "rate", "ts": 1.0},
...     {"user_id": "b", "item_id": "x", "type": "rate", "ts": 2.0},  # b unknown: learned, not tested
...     {"user_id": "a", "item_id": "y", "type": "rate", "ts": 3.0},  # a asks, excluding x: nothing -> miss
...     {"user_id": "b", "item_id": "y", "type": "rate", "ts": 4.0},  # b gets [y]: hit at rank 0
... ]
>>> r = prequential(Popularity(), stream, k=10)
>>> r.n_evaluated, r.hits, r.hr, r.ndcg, r.coverage
(2, 1, 0.5, 0.5, 0.5)
>>> r.exposure_gini, r.long_tail_share  # only y listed, of {x, y}; before it x had 2 of 3: the head
(0.5, 1.0)
"""
from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from infogap.models import fairness as fair

#: Event types that are interactions: they are tested (for known users) and make an item "had".
INTERACTION_TYPES = frozenset({"view", "click", "add_to_cart", "purchase", "rate"})


class OnlineRecommender(Protocol):
    """What :func:`prequential` needs from a model."""

    def learn_one(self, event: Mapping) -> None: ...

    def recommend(self, user_id: str, n: int = 10, *, exclude: Any = None) -> list: ...


@dataclass
class PrequentialResult:
    """What one prequential run measured. ``ranks[j]`` is the 0-based rank of the interacted item in
    the ``j``-th evaluated top-k (-1 for a miss); ``positions[j]`` is that event's index in the stream.
    The last fields are the figures of :mod:`infogap.models.fairness` (None when there was no list,
    ``ild`` also without item features); ``group_hr``: attribute -> :func:`~infogap.models.fairness.group_hit_rates`."""

    name: str
    k: int
    n_events: int
    n_evaluated: int
    hits: int
    hr: float
    ndcg: float
    coverage: float
    n_recommended_items: int
    catalog_size: int
    n_skipped_repeats: int
    n_excluded_returned: int
    seconds: float | None
    model_seconds: float | None
    ranks: np.ndarray = field(repr=False)
    positions: np.ndarray = field(repr=False)
    exposure_gini: float | None = None
    long_tail_share: float | None = None
    novelty: float | None = None
    ild: float | None = None
    head_items: int | None = None
    group_hr: dict = field(default_factory=dict, repr=False)

    @property
    def events_per_s(self) -> float | None:
        """Events processed (each learned, known users' interactions also tested) per second of the run."""
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.n_events / self.seconds

    def summary(self) -> dict:
        """The scalar figures as a JSON-ready dict (no arrays)."""
        return {"name": self.name, "k": self.k, f"hr@{self.k}": self.hr, f"ndcg@{self.k}": self.ndcg,
                "coverage": self.coverage, "n_events": self.n_events, "n_evaluated": self.n_evaluated,
                "hits": self.hits, "n_recommended_items": self.n_recommended_items,
                "catalog_size": self.catalog_size, "n_skipped_repeats": self.n_skipped_repeats,
                "n_excluded_returned": self.n_excluded_returned, "seconds": self.seconds,
                "model_seconds": self.model_seconds, "events_per_s": self.events_per_s,
                "exposure_gini": self.exposure_gini, "long_tail_share": self.long_tail_share,
                "novelty": self.novelty, "ild": self.ild, "head_items": self.head_items,
                "group_hr": self.group_hr}


def hit_rate(ranks: np.ndarray) -> float:
    """Share of evaluated events whose item was in the top-k (``rank >= 0``); 0.0 for none.

    >>> hit_rate(np.array([0, -1, 3, -1]))
    0.5
    """
    ranks = np.asarray(ranks)
    return float((ranks >= 0).mean()) if ranks.size else 0.0


def ndcg(ranks: np.ndarray) -> float:
    """Mean of ``1/log2(rank+2)`` over hits (0 for misses): NDCG with one relevant item.

    >>> round(ndcg(np.array([0, -1, 1, -1])), 4)  # (1 + 0 + 1/log2(3) + 0) / 4
    0.4077
    """
    ranks = np.asarray(ranks)
    if not ranks.size:
        return 0.0
    gains = np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    return float(gains.mean())


def prequential(model: OnlineRecommender, events: Iterable[Mapping], *, k: int = 10, name: str = "",
                catalog: Iterable[str] | None = None, interaction_types: Iterable[str] = INTERACTION_TYPES,
                clock: Callable[[], float] | None = None, progress: Callable[[int], None] | None = None,
                progress_every: int = 1000, item_features: Mapping[str, Iterable[str]] | None = None,
                user_groups: Mapping[str, Mapping[str, str]] | None = None,
                min_group_events: int = fair.MIN_GROUP_EVENTS,
                head_share: float = fair.HEAD_SHARE) -> PrequentialResult:
    """Replay ``events`` (timestamp order) through ``model``, testing before learning.

    Parameters
    ----------
    model
        ``learn_one(event)`` and ``recommend(user_id, n, exclude=...)``. ``exclude`` is the harness's
        own set of the user's items: read it, never mutate it.
    events
        Contract events as mappings (``user_id``, ``type``, ``ts``, ``item_id`` for item events).
        Out-of-order timestamps raise ``ValueError``.
    catalog
        The item ids of the catalogue, for coverage (recommended items outside it do not count);
        default: the distinct items of the stream's interactions.
    interaction_types
        Types that are tested and make an item the user's; other events are only learned. An
        interaction with an item the user already has is learned but not tested (it is excluded by
        the protocol so it could never be a hit); those are counted in ``n_skipped_repeats``.
    clock
        A monotonic clock in seconds (a function the caller passes); without one no time is reported.
    progress
        Called with the number of events done, every ``progress_every`` events and at the end.
    item_features
        Item id -> its features (MovieLens: genres), for the intra-list diversity; without them
        ``ild`` is None.
    user_groups
        User id -> ``{attribute: group}`` (:func:`infogap.models.fairness.user_groups`), for HR per
        group; groups with fewer than ``min_group_events`` tested events are not in the gap.
    head_share
        The head items take this share of the interactions so far (long-tail share).

    For those figures the replay keeps each list's ids, the tested user and item, and each user's
    first interaction (a few appends an event, ~0.3 us); turning the ids into item indices (every
    ``_FLUSH`` lists) is left out of ``seconds``, and the figures are computed after the clock stops.
    """
    itypes = frozenset(interaction_types)
    catalog = None if catalog is None else list(catalog)
    history: dict[str, set[str]] = {}
    stream_items: set[str] = set()
    recommended: set[str] = set()
    ranks: list[int] = []
    positions: list[int] = []
    # for the fairness figures: the lists (their ids appended to one flat list, padded with None to k,
    # turned into item indices every _FLUSH lists with the clock paused: no list is kept, so the
    # garbage collector has no more to do), the tested users and items, and each user's first
    # interaction; the stream's new (user, item) pairs are the tested events and the first interactions
    lists = _Lists(catalog, k)
    pending, flush, flush_at, pad = lists.pending, lists.flush, _FLUSH * k, [None] * k
    keep = pending.extend
    tested_users: list[str] = []
    tested_items: list[str] = []
    first_pos, first_items = array("q"), []
    paused = 0.0
    repeats = violations = 0
    model_s = 0.0
    last_ts = -math.inf
    learn, recommend = model.learn_one, model.recommend
    t_start = clock() if clock else 0.0
    pos = -1
    for pos, e in enumerate(events):
        if e.__class__ is not dict and not isinstance(e, Mapping):
            e = e.to_dict()
        ts = e["ts"]
        if ts < last_ts:
            raise ValueError(f"event {pos} ({e.get('event_id')!r}) has ts {ts} before the previous {last_ts}: "
                             f"prequential evaluation needs the events sorted by timestamp")
        last_ts = ts
        item = e.get("item_id")
        if item is None or e["type"] not in itypes:
            if clock:
                t0 = clock()
                learn(e)
                model_s += clock() - t0
            else:
                learn(e)
        else:
            user = e["user_id"]
            stream_items.add(item)
            seen = history.get(user)
            t0 = clock() if clock else 0.0
            if seen is not None:
                if item in seen:
                    repeats += 1
                else:
                    ids = recommend(user, k, exclude=seen)[:k]
                    if ids and ids[0].__class__ is not str:  # Recommendation objects
                        ids = [r if r.__class__ is str else r.item_id for r in ids]
                    recommended.update(ids)
                    if not seen.isdisjoint(ids):
                        violations += sum(map(seen.__contains__, ids))
                    ranks.append(ids.index(item) if item in ids else -1)
                    positions.append(pos)
                    keep(ids)
                    if len(ids) < k:
                        keep(pad[len(ids):])
                    tested_users.append(user)
                    tested_items.append(item)
            learn(e)
            if clock:
                model_s += clock() - t0
            if seen is None:
                history[user] = {item}
                first_pos.append(pos)
                first_items.append(item)
            else:
                seen.add(item)
                if len(pending) >= flush_at:
                    if clock:
                        t0 = clock()
                        flush()
                        paused += clock() - t0
                    else:
                        flush()
        if progress is not None and (pos + 1) % progress_every == 0:
            progress(pos + 1)
    seconds = clock() - t_start - paused if clock else None
    if progress is not None:
        progress(pos + 1)
    r = np.asarray(ranks, dtype=np.int16)
    cat = stream_items if catalog is None else set(catalog)
    size = len(cat)
    tested = np.asarray(positions, dtype=np.int64)
    figures = _fairness(lists, tested, r, tested_users, tested_items, np.frombuffer(first_pos, dtype=np.int64),
                        first_items, cat, item_features, user_groups, min_group_events, head_share)
    return PrequentialResult(
        name=name or type(model).__name__, k=k, n_events=pos + 1, n_evaluated=int(r.size),
        hits=int((r >= 0).sum()), hr=hit_rate(r), ndcg=ndcg(r),
        coverage=len(recommended & cat) / size if size else 0.0, n_recommended_items=len(recommended),
        catalog_size=size, n_skipped_repeats=repeats, n_excluded_returned=violations,
        seconds=seconds, model_seconds=model_s if clock else None,
        ranks=r, positions=tested, **figures)


#: Lists kept as given before they are turned into item indices (with the clock paused).
_FLUSH = 4096


class _Lists:
    """The top-k lists of a run as rows of item indices (``-1`` pads a short list). The replay extends
    :attr:`pending` with each list's ids, padded with None to ``k``; :meth:`flush` turns them into
    indices (4 bytes a slot). Catalogue items first, in the catalogue's order, then others as they come."""

    def __init__(self, catalog: list[str] | None, k: int):
        self.index: dict[str, int] = {}
        for i in catalog or ():
            self.index.setdefault(i, len(self.index))
        self.k = k
        self.pending: list[str | None] = []
        self._rows = array("i")

    def row(self, item: str) -> int:
        return self.index.setdefault(item, len(self.index))

    def flush(self) -> None:
        row = self.row
        self._rows.extend([-1 if i is None else row(i) for i in self.pending])
        self.pending.clear()

    def rows(self) -> np.ndarray:
        """Every list so far, shape ``(lists, k)``."""
        self.flush()
        return np.frombuffer(self._rows, dtype=np.int32).reshape(-1, self.k) if self.k > 0 else \
            np.empty((0, 0), dtype=np.int32)


def _fairness(lists: _Lists, tested: np.ndarray, ranks: np.ndarray, users: list[str], items: list[str],
              first_pos: np.ndarray, first_items: list[str], catalog: set[str],
              item_features: Mapping[str, Iterable[str]] | None, user_groups: Mapping[str, Mapping[str, str]] | None,
              min_group_events: int, head_share: float) -> dict:
    """The figures of :mod:`infogap.models.fairness` from what :func:`prequential` collected."""
    rows = lists.rows()
    # the new (user, item) pairs in stream order: the tested events and the users' first interactions
    pair_pos = np.concatenate([tested, first_pos])
    order = np.argsort(pair_pos, kind="stable")
    row = lists.row
    pair_items = np.fromiter((row(i) for i in (*items, *first_items)), dtype=np.int64, count=pair_pos.size)[order]
    catalog_rows = np.fromiter((lists.index.get(c, -1) for c in catalog), dtype=np.int64, count=len(catalog))
    masks = None if item_features is None else fair.feature_masks([item_features.get(i) for i in lists.index])
    out = fair.list_figures(rows, tested, catalog_rows, pair_items, pair_pos[order], first_pos, masks,
                            head_share=head_share)
    if out and user_groups is not None and users:
        hits = ranks >= 0
        of_user = [user_groups.get(u) or {} for u in users]
        attrs = list(dict.fromkeys(a for g in user_groups.values() for a in g))
        out["group_hr"] = {a: fair.group_hit_rates(hits, [g.get(a) for g in of_user], min_n=min_group_events)
                           for a in attrs}
    return out


def hr_curve(result: PrequentialResult, *, window: int = 5000, points: int = 200) -> dict[str, list]:
    """HR@k along the stream at up to ``points`` checkpoints over the evaluated events.

    ``x`` is the stream position (events so far) of each checkpoint, ``hr_window`` the hit rate of
    the last ``window`` evaluated events, ``hr_cumulative`` the hit rate of all evaluated so far.

    >>> r = PrequentialResult("m", 10, 8, 4, 2, 0.5, 0.5, 0.0, 0, 0, 0, 0, None, None,
    ...                       ranks=np.array([-1, 0, -1, 0]), positions=np.array([1, 3, 5, 7]))
    >>> hr_curve(r, window=2, points=2)
    {'x': [4, 8], 'hr_window': [0.5, 0.5], 'hr_cumulative': [0.5, 0.5]}
    """
    n = int(result.ranks.size)
    if n == 0:
        return {"x": [], "hr_window": [], "hr_cumulative": []}
    hits = np.concatenate([[0], np.cumsum(result.ranks >= 0)])
    ends = np.unique(np.linspace(0, n, num=min(points, n) + 1).astype(np.int64)[1:])
    starts = np.maximum(ends - window, 0)
    return {"x": (result.positions[ends - 1] + 1).tolist(),
            "hr_window": ((hits[ends] - hits[starts]) / (ends - starts)).tolist(),
            "hr_cumulative": (hits[ends] / ends).tolist()}


# ---------------------------------------------------------------------------------------------- baselines
class _ItemScores:
    """Item scores in a growable numpy array with an id-to-row map, and an exact top-n excluding a set."""

    def __init__(self) -> None:
        self._row: dict[str, int] = {}
        self._ids: list[str] = []
        self._scores = np.zeros(64)

    def _row_of(self, item: str) -> int:
        row = self._row.get(item)
        if row is None:
            row = self._row[item] = len(self._ids)
            self._ids.append(item)
            if row >= self._scores.size:
                self._scores = np.concatenate([self._scores, np.zeros(self._scores.size)])
        return row

    def _top(self, n: int, exclude: Any) -> list[str]:
        m = len(self._ids)
        if m == 0 or n <= 0:
            return []
        scores = self._scores[:m]
        if exclude:
            rows = [r for r in map(self._row.get, exclude) if r is not None]
            if rows:
                scores = scores.copy()
                scores[rows] = -np.inf
        want = min(n, m)
        if want < m:
            cand = np.argpartition(-scores, want - 1)[:want]
        else:
            cand = np.arange(m)
        cand = cand[np.lexsort((cand, -scores[cand]))]  # best first, ties by first appearance
        ids = self._ids
        return [ids[r] for r in cand.tolist() if scores[r] != -np.inf]


def _fields(event: Any) -> tuple[str | None, str, float]:
    if event.__class__ is not dict and not isinstance(event, Mapping):
        event = event.to_dict()
    return event.get("item_id"), event["type"], float(event["ts"])


class Popularity(_ItemScores):
    """Most interacted-with items so far (each interaction counts 1), excluding the given items.

    >>> p = Popularity()
    >>> for item in "abcb":
    ...     p.learn_one({"user_id": "u", "item_id": item, "type": "view", "ts": 0.0})
    >>> p.recommend("anyone", 2), p.recommend("anyone", 2, exclude={"b"})
    (['b', 'a'], ['a', 'c'])
    """

    def __init__(self, interaction_types: Iterable[str] = INTERACTION_TYPES):
        super().__init__()
        self.interaction_types = frozenset(interaction_types)

    def learn_one(self, event: Mapping) -> None:
        item, etype, _ = _fields(event)
        if item is not None and etype in self.interaction_types:
            row = self._row_of(item)  # may grow the array: take the row before indexing
            self._scores[row] += 1.0

    def recommend(self, user_id: str, n: int = 10, *, exclude: Any = None) -> list[str]:
        return self._top(n, exclude)


class DecayedPopularity(_ItemScores):
    """Popularity where an interaction's weight halves every ``half_life_days`` (time from the events).

    Forward decay: an event at time ``t`` adds ``2**((t - t_ref)/half_life)``; ranking at any time is
    the same as with weights decayed to that time, and ``t_ref`` moves forward before overflow.

    >>> d = DecayedPopularity(half_life_days=1.0)
    >>> for item, day in [("old", 0), ("old", 0), ("old", 0), ("new", 3), ("new", 3)]:
    ...     d.learn_one({"user_id": "u", "item_id": item, "type": "view", "ts": day * 86400.0})
    >>> d.recommend("u", 2)  # 3 * 2**-3 < 2
    ['new', 'old']
    >>> round(d.score("old", at=3 * 86400.0), 3)
    0.375
    """

    def __init__(self, half_life_days: float = 7.0, interaction_types: Iterable[str] = INTERACTION_TYPES):
        if not half_life_days > 0:
            raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
        super().__init__()
        self.half_life_days = half_life_days
        self.interaction_types = frozenset(interaction_types)
        self._rate = math.log(2.0) / (half_life_days * 86400.0)
        self._t_ref: float | None = None

    def learn_one(self, event: Mapping) -> None:
        item, etype, ts = _fields(event)
        if item is None or etype not in self.interaction_types:
            return
        if self._t_ref is None:
            self._t_ref = ts
        x = self._rate * (ts - self._t_ref)
        if x > 500.0:  # rescale everything to a later reference before exp overflows
            self._scores *= math.exp(-x)
            self._t_ref, x = ts, 0.0
        row = self._row_of(item)
        self._scores[row] += math.exp(x)

    def score(self, item_id: str, *, at: float) -> float:
        """The item's decayed weight at time ``at`` (0.0 if never seen)."""
        row = self._row.get(item_id)
        if row is None or self._t_ref is None:
            return 0.0
        return float(self._scores[row] * math.exp(-self._rate * (at - self._t_ref)))

    def recommend(self, user_id: str, n: int = 10, *, exclude: Any = None) -> list[str]:
        return self._top(n, exclude)
