"""Neighbour rows from the item stage, in the store, and the user stage's bounded local cache of them.

The item stage owns co-occurrence rows (partitioned by item) and writes each changed row to
``{prefix}nbrow:{item}`` (:func:`encode_row`). A user stage ranks with the rows of its users'
recent items: before ranking a batch it asks :class:`NeighbourCache` for them; rows it does not
hold, or holds for longer than ``max_age_s``, are read in one request (``MGET``) and given to the engine
(:meth:`infogap.models.engine.Engine.load_rows`); beyond ``capacity`` rows the least recently used are
dropped from the engine. So memory on a user stage is bounded by the cache, not the catalog's
pairs, and a neighbour list is at most ``max_age_s`` (plus the item stage's publish interval) old.

A row past its max age is read again only if its shard has published since: with each publish the
item stage writes a new token to ``{prefix}nbrow-published:{partition}`` in the same ``MSET`` as the
rows. Under a backlog the item stage publishes every several seconds (its publishing is paced by its
cost), and re-reading unchanged ~20 kB rows every ``max_age_s`` was a tenth of a user stage.

Reading rows is paced by its cost, as the item stage's publishing is: when reads took more than
``read_max_share`` of the time over a max age (a backlog, with thousands of rows changed every
publish), the max age grows in proportion, up to ``MAX_AGE_CAP_S``; it returns to ``max_age_s``
when reads get cheap again.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

from infogap.models import Engine
from infogap.models.cooc_shard import owner
from infogap.stream.core.neighbour_rows import decode_row
from infogap.stream.store import Store

log = logging.getLogger("infogap.neighbours")


#: A row is read again after this long even when its shard's token has not changed (say, a writer from
#: before the tokens publishing it).
UNCHANGED_MAX_S = 60.0
#: The longest the max age grows to under a backlog (reads paced by their cost).
MAX_AGE_CAP_S = 30.0
#: An item with no row in the store yet is asked again after this long (its row may be published any moment:
#: remembered as absent for the whole max age, a cold start ranked its users without neighbours for it).
ABSENT_RETRY_S = 0.25


class NeighbourCache:
    """At most ``capacity`` neighbour rows held in an engine, refreshed after ``max_age_s`` seconds if
    their shard has published since. ``partitions``: the number of ``cooc`` partitions (the shards);
    None (unknown yet) re-reads every row past its max age. ``age_s`` is the max age in force: at least
    ``max_age_s``, more while reading takes more than ``read_max_share`` of the time."""

    def __init__(self, store: Store, capacity: int = 50_000, max_age_s: float = 2.0,
                 partitions: int | None = None, read_max_share: float = 1.0):
        self.store = store
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.partitions = partitions
        self.read_max_share = read_max_share
        self.age_s = max_age_s
        self._window: tuple[float, float] | None = None  # (start, CPU seconds spent reading since)
        self._loaded: OrderedDict[str, float] = OrderedDict()  # item -> when its row was read, LRU order
        #: item -> (its shard, that shard's token before the read, when it was read)
        self._token: dict[str, tuple[int, bytes | str, float]] = {}
        self.reads = 0
        self.hits = 0
        #: rows past their max age kept because their shard had not published since
        self.unchanged = 0
        #: values at a row's key that were not a row, or that the engine could not load (see :meth:`_load`)
        self.bad_rows = 0
        self._logged_bad: set[str] = set()  # items whose bad value was logged (cleared at capacity)

    def __len__(self) -> int:
        return len(self._loaded)

    async def ensure(self, engine: Engine, items: Iterable[str], now: float) -> int:
        """Make the rows of ``items`` current in ``engine``; returns how many were read from the store."""
        loaded, token = self._loaded, self._token
        want, aged = [], []
        max_age = self.age_s
        for item in dict.fromkeys(items):
            at = loaded.get(item)
            if at is not None:
                loaded.move_to_end(item)
                if now - at < max_age:
                    self.hits += 1
                    continue
                if item in token:
                    aged.append(item)
                    continue
            want.append(item)
        if not want and not aged:
            self._pace(now, 0.0)
            return 0
        n = self.partitions
        tokens = None
        if n:  # read before the rows: a publish in between makes the rows newer than their tokens, never older
            tokens = await self.store.read_tokens(n)
            for item in aged:
                p, seen, read_at = token[item]
                if tokens[p] == seen and now - read_at < UNCHANGED_MAX_S:
                    loaded[item] = now
                    self.unchanged += 1
                else:
                    want.append(item)
        else:
            want += aged
        if not want:
            self._pace(now, 0.0)
            return 0
        raws = await self.store.read_rows(want)
        cpu = time.thread_time()  # this thread's CPU loading the rows (not the awaits: other tasks run then)
        self._load(engine, want, raws)
        self._pace(now, time.thread_time() - cpu)
        absent_at = now - max_age + min(max_age, ABSENT_RETRY_S)
        for item, raw in zip(want, raws):  # an item without a row yet is asked again soon, not at once
            loaded[item] = now if raw is not None else absent_at
            loaded.move_to_end(item)
            p = owner(item, n) if tokens is not None else 0
            if raw is not None and tokens is not None and tokens[p] is not None:
                token[item] = (p, tokens[p], now)
            else:
                token.pop(item, None)
        self.reads += len(want)
        if len(loaded) > self.capacity:
            drop = [loaded.popitem(last=False)[0] for _ in range(len(loaded) - self.capacity)]
            for item in drop:
                token.pop(item, None)
            engine.drop_rows(drop)
        return len(want)

    def _load(self, engine: Engine, items: list[str], raws: list) -> None:
        """Give the rows of ``raws`` to ``engine``: all in one call, or one by one when that call failed. A value
        that is not a row (not an item stage's), or that the engine cannot load, is logged with its key (once
        until a row is read there again), counted in ``bad_rows`` and taken as absent (its ``raws`` entry set to
        None), never fatal."""
        rows = []
        for k, raw in enumerate(raws):
            if raw is not None:
                try:
                    rows.append((k, decode_row(raw)))
                except Exception as exc:  # (decode_row raises ValueErrors; anything else, unforeseen, alike)
                    self._bad(items, raws, k, exc)
        try:
            engine.load_rows([row for _, row in rows])
        except Exception:  # which row? (a row that loads changes nothing when loaded again)
            for k, row in rows:
                try:
                    engine.load_rows([row])
                except Exception as exc:
                    self._bad(items, raws, k, exc)
        if self._logged_bad:
            self._logged_bad.difference_update(items[k] for k, raw in enumerate(raws) if raw is not None)

    def _bad(self, items: list[str], raws: list, k: int, exc: Exception) -> None:
        """``raws[k]`` is not a row: counted, logged, taken as absent."""
        raws[k] = None
        self.bad_rows += 1
        item = items[k]
        if item in self._logged_bad:
            return
        if len(self._logged_bad) >= self.capacity:
            self._logged_bad.clear()
        self._logged_bad.add(item)
        log.warning("%s does not hold a neighbour row (%s: %s); taken as absent until the item stage rewrites it",
                    self.store.keys.neighbour_row(item), type(exc).__name__, str(exc)[:200])

    def _pace(self, now: float, spent: float) -> None:
        """Count ``spent`` CPU seconds of reading; once a max age has passed, scale the max age by the
        share of the time reading took against ``read_max_share`` (within ``max_age_s`` and the cap)."""
        start, total = self._window or (now, 0.0)
        if now - start < self.age_s or now <= start:  # (a max age of 0: every call at once)
            self._window = (start, total + spent)
            return
        share = total / (now - start)  # of the window that ends now; this call's cost opens the next one
        self.age_s = min(MAX_AGE_CAP_S, max(self.max_age_s, self.age_s * share / self.read_max_share))
        self._window = (now, spent)

    def stale(self) -> None:
        """Consider every row stale (e.g. after the engine was replaced by a restored snapshot)."""
        for item in self._loaded:
            self._loaded[item] = float("-inf")
        self._token.clear()
