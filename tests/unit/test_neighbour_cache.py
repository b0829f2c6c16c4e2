"""The user stage's bounded cache of neighbour rows: when it asks Redis again (fakes, no servers)."""
from __future__ import annotations

import asyncio

from stream.neighbour_cache import ABSENT_RETRY_S, NeighbourCache
from stream.redis_keys import RedisKeys


class _Redis:
    def __init__(self):
        self.rows: dict[str, bytes] = {}
        self.asked: list[list[str]] = []

    async def mget(self, keys):
        self.asked.append(list(keys))
        return [self.rows.get(k) for k in keys]


class _Engine:
    def __init__(self):
        self.loaded = 0

    def load_rows(self, rows):
        self.loaded += len(list(rows))

    def drop_rows(self, ids):
        pass


def test_a_missing_row_is_asked_again_soon_and_a_present_one_after_its_max_age(monkeypatch):
    monkeypatch.setattr("stream.neighbour_cache.decode_row", lambda raw: {"raw": raw})
    redis, engine, keys = _Redis(), _Engine(), RedisKeys("t:")
    cache = NeighbourCache(redis, keys, capacity=10, max_age_s=2.0)

    async def ensure(items, now):
        return await cache.ensure(engine, items, now)

    assert asyncio.run(ensure(["a", "b"], 100.0)) == 2  # neither published yet
    redis.rows[keys.neighbour_row("a")] = b"row-a"
    assert asyncio.run(ensure(["a", "b"], 100.0 + ABSENT_RETRY_S / 2)) == 0  # not at once
    assert asyncio.run(ensure(["a", "b"], 100.0 + ABSENT_RETRY_S)) == 2  # soon: "a" is there now
    assert engine.loaded == 1
    assert asyncio.run(ensure(["a"], 101.0)) == 0  # a row it has is fresh for max_age_s
    assert asyncio.run(ensure(["a"], 100.0 + ABSENT_RETRY_S + 2.0)) == 1
