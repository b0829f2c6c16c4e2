"""A bounded local cache of item neighbour lists read from Redis ``similar:{item}``.

The ranker is synchronous and pure, so the user stage first ``prefetch``es (one MGET round trip
per batch for what is missing or stale) and then hands ``get`` to the ranker.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import orjson

from stream.redis_keys import RedisKeys


class NeighbourCache:
    """LRU of ``item_id -> neighbour list`` with entries refreshed after ``ttl_s``.

    Entries are whatever the item stage published: lists of dicts with ``item_id``, ``score``,
    ``support``, ``confidence``, ``lift``. A missing key caches as an empty list.
    """

    def __init__(self, redis, keys: RedisKeys, max_items: int = 200_000, ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.redis = redis
        self.keys = keys
        self.max_items = max_items
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, list]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def prefetch(self, item_ids: Iterable[str]) -> None:
        now = self.clock()
        stale = [i for i in dict.fromkeys(item_ids)
                 if i not in self._entries or now - self._entries[i][0] > self.ttl_s]
        self.hits += 0 if stale else 1
        if not stale:
            return
        self.misses += len(stale)
        values = await self.redis.mget([self.keys.similar(i) for i in stale])
        for item_id, raw in zip(stale, values):
            self._put(item_id, now, orjson.loads(raw) if raw else [])

    def get(self, item_id: str) -> list:
        entry = self._entries.get(item_id)
        if entry is None:
            return []
        self._entries.move_to_end(item_id)
        return entry[1]

    def invalidate(self) -> None:
        self._entries.clear()

    def _put(self, item_id: str, now: float, neighbours: list) -> None:
        self._entries[item_id] = (now, neighbours)
        self._entries.move_to_end(item_id)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)
