"""The user stage's bounded cache of neighbour rows: when it asks Redis again (fakes, no servers)."""
from __future__ import annotations

import asyncio

import pytest

from infogap.models.cooc_shard import owner
from infogap.stream.neighbour_cache import ABSENT_RETRY_S, UNCHANGED_MAX_S, NeighbourCache
from infogap.stream.store import MemoryStore, RedisKeys


class _Redis(MemoryStore):
    """The in-memory store, with the values at its keys set directly and every read recorded (as keys)."""

    def __init__(self):
        super().__init__(RedisKeys("t:"))
        self.rows = self._values
        self.asked: list[list[str]] = []

    async def read_rows(self, items):
        self.asked.append([self.keys.neighbour_row(i) for i in items])
        return await super().read_rows(items)

    async def read_tokens(self, partitions):
        self.asked.append([self.keys.rows_published(p) for p in range(partitions)])
        return await super().read_tokens(partitions)


class _Engine:
    def __init__(self):
        self.loaded = 0

    def load_rows(self, rows):
        self.loaded += len(list(rows))

    def drop_rows(self, ids):
        pass


def test_a_missing_row_is_asked_again_soon_and_a_present_one_after_its_max_age(monkeypatch):
    monkeypatch.setattr("infogap.stream.neighbour_cache.decode_row", lambda raw: {"raw": raw})
    redis, engine, keys = _Redis(), _Engine(), RedisKeys("t:")
    cache = NeighbourCache(redis, capacity=10, max_age_s=2.0)

    async def ensure(items, now):
        return await cache.ensure(engine, items, now)

    assert asyncio.run(ensure(["a", "b"], 100.0)) == 2  # neither published yet
    redis.rows[keys.neighbour_row("a")] = b"row-a"
    assert asyncio.run(ensure(["a", "b"], 100.0 + ABSENT_RETRY_S / 2)) == 0  # not at once
    assert asyncio.run(ensure(["a", "b"], 100.0 + ABSENT_RETRY_S)) == 2  # soon: "a" is there now
    assert engine.loaded == 1
    assert asyncio.run(ensure(["a"], 101.0)) == 0  # a row it has is fresh for max_age_s
    assert asyncio.run(ensure(["a"], 100.0 + ABSENT_RETRY_S + 2.0)) == 1


def test_a_row_past_its_max_age_is_read_again_only_when_its_shard_has_published_since(monkeypatch):
    monkeypatch.setattr("infogap.stream.neighbour_cache.decode_row", lambda raw: {"raw": raw})
    redis, engine, keys = _Redis(), _Engine(), RedisKeys("t:")
    cache = NeighbourCache(redis, capacity=10, max_age_s=2.0, partitions=3)
    shard = {i: owner(i, 3) for i in ("a", "b", "c", "d")}
    a, b = sorted(shard, key=shard.get)[0], sorted(shard, key=shard.get)[-1]
    assert shard[a] != shard[b]
    for item in (a, b):
        redis.rows[keys.neighbour_row(item)] = f"row-{item}".encode()
        redis.rows[keys.rows_published(shard[item])] = b"t1"

    def ensure(items, now):
        redis.asked.clear()
        return asyncio.run(cache.ensure(engine, items, now))

    assert ensure([a, b], 100.0) == 2
    assert ensure([a, b], 103.0) == 0  # past the max age, neither shard has published since
    assert redis.asked == [[keys.rows_published(p) for p in range(3)]] and cache.unchanged == 2
    assert ensure([a, b], 104.0) == 0  # and they count as fresh again for max_age_s
    assert redis.asked == []
    redis.rows[keys.rows_published(shard[a])] = b"t2"
    assert ensure([a, b], 106.5) == 1
    assert redis.asked[-1] == [keys.neighbour_row(a)]
    cache.stale()  # e.g. users restored from a snapshot: everything is read again
    assert ensure([a, b], 107.0) == 2
    assert ensure([a, b], 100.0 + UNCHANGED_MAX_S + 10) == 2  # unchanged tokens do not keep a row forever
    assert engine.loaded == 7


def test_without_a_token_a_row_past_its_max_age_is_read_again(monkeypatch):
    """Rows written by an item stage that writes no token (or with the partition count unknown)."""
    monkeypatch.setattr("infogap.stream.neighbour_cache.decode_row", lambda raw: {"raw": raw})
    redis, engine, keys = _Redis(), _Engine(), RedisKeys("t:")
    redis.rows[keys.neighbour_row("a")] = b"row-a"
    for partitions in (2, None):
        cache = NeighbourCache(redis, capacity=10, max_age_s=2.0, partitions=partitions)
        assert asyncio.run(cache.ensure(engine, ["a"], 100.0)) == 1
        assert asyncio.run(cache.ensure(engine, ["a"], 103.0)) == 1


def test_reading_rows_is_paced_by_its_cost(monkeypatch):
    """Loading rows that took a quarter of the time (a backlog) stretches the max age until it would
    take the share allowed; cheap reads bring it back to max_age_s."""
    cpu = [0.0]
    monkeypatch.setattr("infogap.stream.neighbour_cache.time.thread_time", lambda: cpu[0])
    monkeypatch.setattr("infogap.stream.neighbour_cache.decode_row", lambda raw: {"raw": raw})
    redis, keys = _Redis(), RedisKeys("t:")

    class Slow(_Engine):
        cost = 0.5  # CPU seconds a load takes

        def load_rows(self, rows):
            super().load_rows(rows)
            cpu[0] += self.cost

    engine = Slow()
    for item in ("a", "b"):
        redis.rows[keys.neighbour_row(item)] = b"row"
    cache = NeighbourCache(redis, capacity=10, max_age_s=2.0, read_max_share=0.05)
    now = 100.0
    for _ in range(3):  # every row is past its age and read again: 0.5 s of each 2 s
        asyncio.run(cache.ensure(engine, ["a", "b"], now))
        now += 2.0
    assert cache.age_s == pytest.approx(10.0)  # 2 s x 25 % / 5 %
    assert asyncio.run(cache.ensure(engine, ["a"], now)) == 0  # 2 s old: kept now
    engine.cost = 0.0
    for _ in range(3):
        now += 10.0
        asyncio.run(cache.ensure(engine, ["a", "b"], now))
    assert cache.age_s == 2.0


def test_a_max_age_of_zero_reads_every_time(monkeypatch):
    monkeypatch.setattr("infogap.stream.neighbour_cache.decode_row", lambda raw: {"raw": raw})
    redis, engine, keys = _Redis(), _Engine(), RedisKeys("t:")
    redis.rows[keys.neighbour_row("a")] = b"row-a"
    cache = NeighbourCache(redis, capacity=10, max_age_s=0.0, read_max_share=0.05)
    assert [asyncio.run(cache.ensure(engine, ["a"], now)) for now in (5.0, 5.0, 6.0)] == [1, 1, 1]
    assert cache.age_s == 0.0
