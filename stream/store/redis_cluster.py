"""The store on Redis Cluster: the same writes as on one server, grouped per slot.

Redis Cluster refuses a command, script or ``MSET`` whose keys span slots. The keys about one user carry
it as a hash tag (:class:`~stream.store.keys.RedisKeys` with ``cluster=True``), so a user's
recommendations and segment share a slot; a batch's keys are grouped by slot, one
:data:`~stream.store.redis_node.SET_WITH_TTL` call or ``MSET`` per slot, and redis-py's cluster pipeline
sends each node its commands in one round trip. Scripts are sent whole (``EVAL``): a replica promoted by
a failover has no script cache.

A reader that sees a ``cooc`` partition's new token must see the rows published with it: the tokens
are written after the rows were acknowledged, not in the same ``MSET`` as on one server.

>>> from redis.crc import key_slot
>>> keys = RedisKeys("ig:", cluster=True)
>>> key_slot(keys.recs("u42").encode()) == key_slot(keys.segment("u42").encode())
True
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis
from redis.crc import key_slot

from stream.store.keys import RedisKeys
from stream.store.redis_node import REPLACE_ZSET, SET_WITH_TTL, SET_WITH_TTL_KEYS, RedisStore, translated


def by_slot(keys: Iterable[str]) -> dict[int, list[int]]:
    """Slot -> the positions of ``keys`` that hash to it, in order.

    >>> list(by_slot(["a{u1}", "b{u1}", "c"]).values())
    [[0, 1], [2]]
    """
    out: dict[int, list[int]] = {}
    for k, key in enumerate(keys):
        out.setdefault(key_slot(key.encode()), []).append(k)
    return out


class RedisClusterStore(RedisStore):
    """The store on Redis Cluster (``redis.asyncio.RedisCluster``)."""

    def __init__(self, client: aioredis.RedisCluster, keys: RedisKeys, recs_ttl_s: int):
        if not keys.cluster:
            raise ValueError("Redis Cluster needs the key layout with hash tags: RedisKeys(prefix, cluster=True)")
        super().__init__(client, keys, recs_ttl_s)

    async def _queue_set_with_ttl(self, pipe, keys: list[str], values: list) -> None:
        for positions in by_slot(keys).values():
            for i in range(0, len(positions), SET_WITH_TTL_KEYS):
                part = positions[i: i + SET_WITH_TTL_KEYS]
                pipe.eval(SET_WITH_TTL, len(part), *(keys[k] for k in part), self.recs_ttl_s,
                          *(values[k] for k in part))

    async def _queue_replace_zset(self, pipe, key: str, ranked: list[tuple[str, float]]) -> None:
        pipe.eval(REPLACE_ZSET, 1, key, *(x for item, score in ranked for x in (float(score), item)))

    def _queue_mset(self, pipe, items: dict) -> None:
        keys = list(items)
        for positions in by_slot(keys).values():
            pipe.execute_command("MSET", *(x for k in positions for x in (keys[k], items[keys[k]])))

    def _queue_delete(self, pipe, keys: list[str]) -> None:
        for positions in by_slot(keys).values():
            pipe.execute_command("DEL", *(keys[k] for k in positions))

    async def _mget(self, keys: list[str]) -> list:
        return await self.client.mget_nonatomic(keys) if keys else []

    async def write(self, recs: Iterable[Mapping] = (), segments: Mapping[str, int | None] | None = None,
                    similar: Mapping[str, list] | None = None, rows: Mapping[str, bytes] | None = None,
                    trending: Mapping[int | None, list[tuple[str, float]]] | None = None,
                    population: Mapping | None = None,
                    momentum: tuple[list[str], list[float]] | None = None,
                    rows_published: Mapping[int, str] | None = None) -> None:
        """As on one server; the rows' tokens once the rows are written."""
        await super().write(recs, segments, similar, rows, trending, population, momentum)
        if rows_published:
            await super().write(rows_published=rows_published)
