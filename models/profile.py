"""Per-user state: decayed behaviour vectors, RFM, bounded recent history and consumed items.

A user's *behaviour vector* has two parts:

- over items: the last ``history_len`` item events (item row, time, type weight) in a ring buffer
  (preallocated ``[n_users, history_len]`` numpy arrays). Reading it (:meth:`Profiles.item_vector`)
  sums the weights per item, decayed to the read time;
- over categories and tags: a small dict feature id -> decayed weight (at most ``max_features``
  entries; the weakest is dropped). An event adds its type weight, split over the item's features.

**Decay** is exponential with ``half_life_days``, applied lazily: weights are stored relative to a
reference time ``t0`` shared with the engine (``w * exp(lambda * (t - t0))``), so an update is one
addition, and a read multiplies by ``exp(-lambda * (now - t0))``, i.e. ``w * exp(-lambda * (now - t))``.

**RFM**: recency (time since the last event), frequency (decayed event count) and monetary value
(decayed sum of the events' ``value``).

Items the user purchased or rated (the engine's ``exclude_types``) are kept, at most
``max_consumed`` of them (oldest dropped first), so they can be filtered out of recommendations.

>>> p = Profiles(history_len=4)
>>> u = p.row("u1")
>>> p.find("u1") == u, p.find("nobody") is None
(True, True)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter

import numpy as np
from numba import njit


#: The history ring's arrays and their empty value.
_HIST_FIELDS = (("hist_item", -1), ("hist_ts", 0.0), ("hist_w", 0.0), ("hist_type", 0), ("hist_rating", 0.0))
#: A user's scalars (lists of :class:`Profiles`) and their dtype in :meth:`Profiles.get_rows`.
ROW_SCALARS = (("n_events", np.int64), ("n_push", np.int64), ("last_item", np.int64), ("first_ts", np.float64),
               ("last_ts", np.float64), ("freq", np.float64), ("money", np.float64), ("segment", np.int64))


def _ring_order(h: int) -> np.ndarray:
    """``[h, h]``: row ``c % h`` holds the ring positions ``(c - 1 - k) % h`` of the entries newest first."""
    return (np.arange(h)[:, None] - 1 - np.arange(h)[None, :]) % h


def records(cols: Mapping[str, np.ndarray]) -> list[dict]:
    """The users of :meth:`Profiles.get_rows` columns one by one, as :meth:`Profiles.set_row` takes them:
    plain Python values, the history and ``consumed`` as lists, ``feats`` as a dict."""
    n = len(cols["n_push"])
    scalars = [cols[name].tolist() for name, _ in ROW_SCALARS]
    hist = [cols[name].tolist() for name, _ in _HIST_FIELDS]
    cons, feat_key, feat_val = cols["consumed"].tolist(), cols["feat_key"].tolist(), cols["feat_val"].tolist()
    h_end, c_end, f_end = (np.cumsum(cols[name]).tolist() for name in ("hist_len", "consumed_len", "feat_len"))
    out, h0, c0, f0 = [], 0, 0, 0
    for j in range(n):
        rec = {name: col[j] for (name, _), col in zip(ROW_SCALARS, scalars)}
        rec.update((name, col[h0: h_end[j]]) for (name, _), col in zip(_HIST_FIELDS, hist))
        rec["consumed"] = cons[c0: c_end[j]]
        rec["feats"] = dict(zip(feat_key[f0: f_end[j]], feat_val[f0: f_end[j]]))
        h0, c0, f0 = h_end[j], c_end[j], f_end[j]
        out.append(rec)
    return out


class Profiles:
    """Users' decayed vectors, RFM figures, ring-buffer histories and consumed-item sets.

    Parameters
    ----------
    history_len
        Items remembered per user (ring buffer length).
    half_life_days
        Half-life of the behaviour vector, frequency and monetary value.
    max_features
        Categories/tags remembered per user.
    max_consumed
        Purchased/rated items remembered per user for exclusion.
    capacity
        Initial number of user rows.

    Examples
    --------
    >>> p = Profiles(history_len=3)
    >>> u = p.row("u1")
    >>> p.push(u, item=7, ts=1.0, w=2.0); p.push(u, item=9, ts=2.0, w=1.0)
    >>> p.history(u, 10)[0].tolist()
    [9, 7]
    """

    def __init__(self, history_len: int = 50, half_life_days: float | None = 7.0, max_features: int = 32,
                 max_consumed: int = 5000, capacity: int = 1024):
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        self.history_len = history_len
        self.half_life_days = half_life_days
        self.max_features = max_features
        self.max_consumed = max_consumed
        self.capacity = capacity
        self.lam = 0.0 if not half_life_days else math.log(2.0) / (half_life_days * 86400.0)
        cap = max(int(capacity), 1)
        self._index: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        # hot per-user scalars touched once per event: plain lists are the fastest Python containers
        self.n_events: list[int] = []
        self.n_push: list[int] = []
        self.last_item: list[int] = []
        self.first_ts: list[float] = []
        self.last_ts: list[float] = []
        self.freq: list[float] = []
        self.money: list[float] = []
        self.segment: list[int] = []
        self.feats: list[dict[int, float]] = []
        self._cons_set: list[set[int]] = []
        self._cons_arr: list[np.ndarray | None] = []
        self._cons_n: list[int] = []
        h = history_len
        self.hist_item = np.full((cap, h), -1, np.int32)
        self.hist_ts = np.zeros((cap, h))
        self.hist_w = np.zeros((cap, h))
        self.hist_type = np.zeros((cap, h), np.int8)
        self.hist_rating = np.zeros((cap, h))  # the event's rating, 0 for none
        #: ring positions of a user's entries, newest first, by ring head: ``ring_order[c % h, k]`` is where
        #: the k-th most recent of ``c`` entries is (``(c - 1 - k) % h``); what the compiled steps index with
        self.ring_order = _ring_order(h)

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a snapshot from before ``hist_rating`` (no ratings then) or ``ring_order``."""
        self.__dict__.update(state)
        if "hist_rating" not in state:
            self.hist_rating = np.zeros(self.hist_type.shape)
        if "ring_order" not in state:
            self.ring_order = _ring_order(self.history_len)

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        return len(self._index)

    def find(self, user_id: str) -> int | None:
        """The row of ``user_id`` or None (read only)."""
        return self._index.get(user_id)

    @property
    def n_rows(self) -> int:
        """User rows allocated: in use or free for reuse."""
        return len(self._ids)

    @property
    def n_consumed(self) -> int:
        """Owned items remembered, over all users."""
        return sum(self._cons_n)

    def recent_positions(self, r: int, k: int) -> np.ndarray:
        """Ring positions of user ``r``'s ``k`` most recent entries, newest first (``k`` at most the
        entries held; a view of :attr:`ring_order`).

        >>> p = Profiles(history_len=3); u = p.row("u")
        >>> for item in (7, 8, 9, 10): p.push(u, item=item, ts=0.0, w=1.0)
        >>> p.hist_item[u, p.recent_positions(u, 3)].tolist()
        [10, 9, 8]
        """
        return self.ring_order[self.n_push[r] % self.history_len, :k]

    def user_id(self, row: int) -> str | None:
        """The id of a row (None for a freed row)."""
        return self._ids[row]

    def row(self, user_id: str) -> int:
        """The row of ``user_id``, created (reusing a forgotten user's row) when unknown."""
        r = self._index.get(user_id)
        if r is not None:
            return r
        if self._free:
            r = self._free.pop()
            self._ids[r] = user_id
        else:
            r = len(self._ids)
            if r >= self.hist_item.shape[0]:
                self._grow(2 * self.hist_item.shape[0])
            self._ids.append(user_id)
            for lst, v in ((self.n_events, 0), (self.n_push, 0), (self.last_item, -1), (self.first_ts, math.nan),
                           (self.last_ts, math.nan), (self.freq, 0.0), (self.money, 0.0), (self.segment, -1),
                           (self._cons_n, 0)):
                lst.append(v)
            self.feats.append({})
            self._cons_set.append(set())
            self._cons_arr.append(None)
        self._index[user_id] = r
        return r

    def _grow(self, cap: int) -> None:
        old = self.hist_item.shape[0]
        for name, fill in _HIST_FIELDS:
            a = getattr(self, name)
            out = np.full((cap, self.history_len), fill, a.dtype)
            out[:old] = a
            setattr(self, name, out)

    def forget(self, user_id: str) -> int | None:
        """Erase every per-user trace of ``user_id``; returns the freed row (or None)."""
        r = self._index.get(user_id)
        if r is None:
            return None
        self.release([r])
        return r

    def release(self, rows: Sequence[int]) -> None:
        """Clear user ``rows`` (in use, distinct) and free them for :meth:`row` to reuse: the arrays keep
        their size, so a bounded number of users in use bounds the memory.

        >>> p = Profiles(history_len=2, capacity=2)
        >>> u, v = p.row("u1"), p.row("u2"); p.push(u, item=3, ts=1.0, w=1.0)
        >>> p.release([u, v]); len(p), p.row("u3") in (u, v), p.hist_item.shape[0], p.history(u, 2)[0].size
        (0, True, 2, 0)
        """
        if not len(rows):
            return
        rows = sorted(rows)  # in memory order: a third of the time of rows in a set's order
        index, ids, h = self._index, self._ids, self.history_len
        # the ring entries written so far: the last min(n_push, h) positions (as in get_rows)
        c = np.array([self.n_push[r] for r in rows], np.int64)
        k = np.minimum(c, h)
        first = np.repeat(np.cumsum(k) - k, k)
        at = np.repeat(np.asarray(rows, np.int64), k)
        pos = (np.repeat(c - k, k) + np.arange(first.size) - first) % h
        for name, fill in _HIST_FIELDS:
            getattr(self, name)[at, pos] = fill
        for r in rows:
            del index[ids[r]]
            ids[r] = None
        for lst, v in ((self.n_events, 0), (self.n_push, 0), (self.last_item, -1), (self.first_ts, math.nan),
                       (self.last_ts, math.nan), (self.freq, 0.0), (self.money, 0.0), (self.segment, -1),
                       (self._cons_arr, None), (self._cons_n, 0)):
            for r in rows:
                lst[r] = v
        feats, cons = self.feats, self._cons_set
        for r in rows:
            feats[r] = {}
            cons[r] = set()
        self._free.extend(rows)

    def last_seen(self, user_ids: Sequence[str]) -> np.ndarray:
        """The last event time of each of ``user_ids`` (-inf for an unknown user or one without events).

        >>> p = Profiles(); p.last_ts[p.row("a")] = 5.0; _ = p.row("b")
        >>> p.last_seen(["a", "b", "zed"]).tolist()
        [5.0, -inf, -inf]
        """
        rows = list(map(self._index.get, user_ids))
        if None in rows:
            last = self.last_ts
            ts = np.array([last[r] if r is not None else -math.inf for r in rows], np.float64)
        else:
            ts = np.array([self.last_ts[r] for r in rows] if len(rows) < 2 else itemgetter(*rows)(self.last_ts),
                          np.float64)
        ts[np.isnan(ts)] = -math.inf
        return ts

    def rescale(self, factor: float) -> None:
        """Multiply every decayed quantity by ``factor`` (moving the reference time)."""
        self.freq = [x * factor for x in self.freq]
        self.money = [x * factor for x in self.money]
        for d in self.feats:
            for k in d:
                d[k] *= factor

    def get_rows(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """Everything kept for user ``rows``, column by column, in this object's row space (item rows,
        feature ids), with ``freq``, ``money`` and feature weights relative to the engine's ``t0``:

        - the scalars of :data:`ROW_SCALARS`, one per user;
        - the history ``hist_*`` (oldest first), ``consumed`` (oldest first) and the features
          ``feat_key``/``feat_val`` of all users one after another, with ``hist_len``,
          ``consumed_len`` and ``feat_len`` per user.

        >>> p = Profiles(history_len=2)
        >>> u, v = p.row("u1"), p.row("u2")
        >>> for k in range(3): p.push(u, item=k, ts=float(k), w=1.0)
        >>> cols = p.get_rows([u, v]); cols["hist_item"].tolist(), cols["hist_len"].tolist(), cols["n_push"].tolist()
        ([1, 2], [2, 0], [3, 0])
        >>> rec = records(cols)[0]; rec["hist_item"], rec["n_push"]
        ([1, 2], 3)
        >>> q = Profiles(history_len=3); w = q.row("u1"); q.set_row(w, rec)
        >>> records(q.get_rows([w]))[0]["hist_item"], q.n_push[w]
        ([1, 2], 2)
        """
        n, h = len(rows), self.history_len
        pick = itemgetter(*rows) if n > 1 else (lambda lst: [lst[r] for r in rows])
        out = {name: np.array(pick(getattr(self, name)), dt) for name, dt in ROW_SCALARS}
        c = out["n_push"]
        k = np.minimum(c, h)
        end = np.cumsum(k)
        first = np.repeat(end - k, k)  # each entry's user's first position in the flat arrays
        r = np.repeat(np.asarray(rows, np.int64), k)
        src = (np.repeat(c - k, k) + np.arange(first.size) - first) % h  # entries c - k .. c - 1, oldest first
        for name, _ in _HIST_FIELDS:
            out[name] = getattr(self, name)[r, src]
        out["hist_len"] = k
        n_cons = pick(self._cons_n)
        out["consumed"] = np.concatenate([np.zeros(0, np.int32)] + [a[:m] for a, m in zip(pick(self._cons_arr), n_cons)
                                                                    if m])
        out["consumed_len"] = np.array(n_cons, np.int64)
        feats = pick(self.feats)
        out["feat_key"] = np.fromiter(chain.from_iterable(feats), np.int64)
        out["feat_val"] = np.fromiter(chain.from_iterable(d.values() for d in feats), np.float64)
        out["feat_len"] = np.fromiter(map(len, feats), np.int64, n)
        return out

    def set_row(self, r: int, rec: Mapping) -> None:
        """Overwrite user row ``r`` with a record of :func:`records` (of this row space). Within this
        object's bounds: the newest ``history_len`` history entries and ``max_consumed`` consumed
        items are kept, and the weakest features dropped beyond ``max_features``; from a shorter ring,
        ``n_push`` becomes the number of entries, so that every entry the ring head reaches is valid."""
        for name in ("n_events", "n_push", "last_item", "first_ts", "last_ts", "freq", "money", "segment"):
            getattr(self, name)[r] = rec[name]
        d = dict(rec["feats"])
        while len(d) > self.max_features:
            del d[min(d, key=lambda k: (d[k], k))]
        self.feats[r] = d
        cons = list(rec["consumed"])
        cons = cons[max(len(cons) - self.max_consumed, 0):]
        self._cons_set[r] = set(cons)
        self._cons_arr[r] = np.asarray(cons, np.int32) if cons else None
        self._cons_n[r] = len(cons)
        h = self.history_len
        k = min(len(rec["hist_item"]), h)
        c = rec["n_push"] if k == min(rec["n_push"], h) else k
        self.n_push[r] = c
        idx = np.arange(c - k, c) % h
        for name, fill in _HIST_FIELDS:
            a = getattr(self, name)
            a[r] = fill
            vals = rec.get(name)
            if vals is None:  # a record from before this field: no ratings
                continue
            a[r, idx] = vals[len(vals) - k:]

    # ------------------------------------------------------------------ updates
    def learn(self, r: int, ts: float, scale: float, value: float | None, item: int = -1,
              feats: tuple[int, ...] = (), w: float = 0.0, owned: bool = False,
              against: bool = False) -> tuple[int, int, float]:
        """User ``r``'s event at ``ts``, the whole profile step (``scale`` = ``exp(lambda (ts - t0))``):

        - any event counts: the user's number of events, first and last time, decayed frequency and
          monetary ``value``;
        - an event on item row ``item`` (-1: none; ``feats``, its features) adds its weight ``w`` (any
          sign) to the category/tag vector, and makes the item the user's if ``owned``;
        - with a positive weight it takes the next history entry, unless ``item`` is the user's last
          entry's (a repeat enters nothing); with a negative weight only when ``against`` (a disliked item: its
          entry votes against its neighbours, even right after an entry of the same item). The ring arrays are
          written by the caller
          (:func:`infogap.models.learn_core.learn_event` and ``learn_many``'s batch step).

        Returns the user's number of events with this one, the history entry's number (the entries
        before it; -1 for none) and the last event time before it (NaN for none).

        >>> p = Profiles(history_len=2); u = p.row("u")
        >>> p.learn(u, 10.0, 1.0, 5.0), p.learn(u, 4.0, 1.0, None), p.rfm(u, 10.0, 1.0)["monetary"]
        ((1, -1, nan), (2, -1, 10.0), 5.0)
        >>> [p.learn(u, 11.0, 1.0, None, item, (0,), 1.0)[1] for item in (7, 7, 8)], p.last_item[u], p.mix(u)
        ([0, -1, 1], 8, {0: 1.0})
        """
        n = self.n_events[r] + 1
        self.n_events[r] = n
        prev_ts = self.last_ts[r]
        if not prev_ts >= ts:
            self.last_ts[r] = ts
        if n == 1:
            self.first_ts[r] = ts
        self.freq[r] += scale
        if value is not None:
            self.money[r] += value * scale
        if item < 0:
            return n, -1, prev_ts
        if feats and w != 0.0:
            self.add_features(r, feats, w * scale)
        if owned:
            self.consume(r, item)
        if against and w < 0.0:
            c = self.n_push[r]
            self.n_push[r] = c + 1
            return n, c, prev_ts
        if not w > 0.0 or item == self.last_item[r]:
            return n, -1, prev_ts
        c = self.n_push[r]
        self.n_push[r] = c + 1
        self.last_item[r] = item
        return n, c, prev_ts

    def add_features(self, r: int, feats: tuple[int, ...], w: float) -> None:
        """Add ``w`` (already scaled) split over ``feats`` to the user's category/tag vector."""
        if not feats:
            return
        d = self.feats[r]
        share = w / len(feats)
        for f in feats:
            d[f] = d.get(f, 0.0) + share
        if len(d) > self.max_features:
            weakest = min(d, key=lambda k: (d[k], k))
            del d[weakest]

    def consume(self, r: int, item: int) -> None:
        """Remember that the user has ``item`` (purchased, rated or dismissed); the oldest goes first
        once ``max_consumed`` items are remembered."""
        s = self._cons_set[r]
        if item in s:
            return
        arr = self._cons_arr[r]
        n = self._cons_n[r]
        if n >= self.max_consumed:
            s.discard(int(arr[0]))
            arr[: n - 1] = arr[1:n].copy()
            n -= 1
        elif arr is None or n == arr.shape[0]:
            grown = np.full(min(max(8, 2 * n), self.max_consumed), -1, np.int32)
            if arr is not None:
                grown[:n] = arr[:n]
            arr = grown
        arr[n] = item
        s.add(item)
        self._cons_arr[r] = arr
        self._cons_n[r] = n + 1

    def push(self, r: int, item: int, ts: float, w: float, type_code: int = 0, rating: float = 0.0) -> None:
        """Append one item event to the user's history (single-event path)."""
        c = self.n_push[r]
        write_entry(self.hist_item, self.hist_ts, self.hist_w, self.hist_type, self.hist_rating, r, c % self.history_len,
                    item, float(ts), float(w), type_code, float(rating))
        self.n_push[r] = c + 1
        self.last_item[r] = item

    def write_entries(self, users: np.ndarray, entries: np.ndarray, items: np.ndarray, ts: np.ndarray, w: np.ndarray,
                      types: np.ndarray, ratings: np.ndarray) -> None:
        """Write history entries (their numbers ``entries``, taken by :meth:`learn`) into the ring, in order:
        an entry that the ring has no room for any more is overwritten by a later one, as one at a time."""
        _write_entries(self.hist_item, self.hist_ts, self.hist_w, self.hist_type, self.hist_rating,
                       np.asarray(users, np.int64), np.asarray(entries, np.int64) % self.history_len,
                       np.asarray(items, np.int64), np.asarray(ts, np.float64), np.asarray(w, np.float64),
                       np.asarray(types, np.int64), np.asarray(ratings, np.float64))

    # ------------------------------------------------------------------ reading
    def consumed(self, r: int) -> np.ndarray:
        """Rows of the items the user has (purchased/rated/dismissed), oldest first (a view)."""
        arr = self._cons_arr[r]
        return arr[: self._cons_n[r]] if arr is not None else np.zeros(0, np.int32)

    def has(self, r: int, item: int) -> bool:
        """Whether the user has ``item``."""
        return item in self._cons_set[r]

    def history(self, r: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The user's last ``n`` history entries, newest first: (items, ts, weights)."""
        c = self.n_push[r]
        k = min(n, c, self.history_len)
        if k == 0:
            return np.zeros(0, np.int32), np.zeros(0), np.zeros(0)
        idx = (c - 1 - np.arange(k)) % self.history_len
        return self.hist_item[r, idx], self.hist_ts[r, idx], self.hist_w[r, idx]

    def item_vector(self, r: int, now: float, lam: float | None = None) -> dict[int, float]:
        """Decayed item weights from the history ring (item row -> weight at ``now``)."""
        lam = self.lam if lam is None else lam
        items, ts, w = self.history(r, self.history_len)
        out: dict[int, float] = {}
        for i, t, x in zip(items.tolist(), ts.tolist(), w.tolist()):
            out[i] = out.get(i, 0.0) + x * math.exp(-lam * max(now - t, 0.0))
        return out

    def mix(self, r: int) -> dict[int, float]:
        """The user's category/tag mix: non-negative shares summing to 1 (empty when none)."""
        d = self.feats[r]
        if not d:
            return {}
        tot = sum(d.values())
        if tot > 0 and min(d.values()) > 0:  # (all positive, as with the default weights: no filtering)
            return {k: v / tot for k, v in d.items()}
        tot = sum(v for v in d.values() if v > 0)
        return {k: v / tot for k, v in d.items() if v > 0} if tot > 0 else {}

    def rfm(self, r: int, now: float, decay: float) -> dict[str, float]:
        """Recency (days), frequency (decayed events) and monetary (decayed value) at ``now``."""
        last = self.last_ts[r]
        rec = (now - last) / 86400.0 if math.isfinite(last) and math.isfinite(now) else math.nan
        return {"recency_days": max(rec, 0.0) if rec == rec else rec,
                "frequency": self.freq[r] * decay, "monetary": self.money[r] * decay}


@njit(cache=True, nogil=True)
def write_entry(hist_item, hist_ts, hist_w, hist_type, hist_rating, u, j, item, ts, w, typ,
                rating):  # pragma: no cover - compiled
    """The history step: user row ``u``'s ring position ``j`` holds the entry (item, time, pair weight, type code,
    rating or 0). The one definition: :meth:`Profiles.write_entries` (``learn_many``), :meth:`Profiles.push` and
    the one-event kernel (:mod:`infogap.models.learn_core`) write with it."""
    hist_item[u, j] = item
    hist_ts[u, j] = ts
    hist_w[u, j] = w
    hist_type[u, j] = typ
    hist_rating[u, j] = rating


@njit(cache=True, nogil=True)
def _write_entries(hist_item, hist_ts, hist_w, hist_type, hist_rating, users, positions, items, ts, w, types,
                   ratings):  # pragma: no cover - compiled
    """:func:`write_entry` of each entry in turn."""
    for k in range(users.size):
        write_entry(hist_item, hist_ts, hist_w, hist_type, hist_rating, users[k], positions[k], items[k], ts[k], w[k],
                    types[k], ratings[k])
