"""Writes the serving read model to Redis: pipelined, one round trip per batch.

Redis is the shared read model, never the only copy of state: everything here can be
rebuilt from the workers' state.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
import redis.asyncio as aioredis

from stream.redis_keys import RedisKeys


class RedisStore:
    """Batch writer for ``recs``, ``segment``, ``similar`` and ``trending`` keys."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, recs_ttl_s: int):
        self.client = client
        self.keys = keys
        self.recs_ttl_s = recs_ttl_s

    async def write(self, recs: Iterable[Mapping] = (), segments: Mapping[str, int | None] | None = None,
                    similar: Mapping[str, list] | None = None, rows: Mapping[str, bytes] | None = None,
                    trending: Mapping[int | None, list[tuple[str, float]]] | None = None) -> None:
        """Write one batch of results in a single pipeline (not a transaction)."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for doc in recs:
            pipe.set(k.recs(doc["user_id"]), orjson.dumps(doc), ex=self.recs_ttl_s)
            n += 1
        for user_id, seg in (segments or {}).items():
            if seg is None:
                pipe.delete(k.segment(user_id))
            else:
                pipe.set(k.segment(user_id), str(seg), ex=self.recs_ttl_s)
            n += 1
        items = {k.similar(i): orjson.dumps(neighbours) for i, neighbours in (similar or {}).items()}
        items.update((k.neighbour_row(i), row) for i, row in (rows or {}).items())
        if items:  # one command for all of them: per-command overhead dominates thousands of small SETs
            pipe.mset(items)
            n += 1
        for seg, ranked in (trending or {}).items():
            key = k.trending(seg)
            if ranked:  # written aside then renamed: readers never see a half-written or empty set
                tmp = f"{key}:next"
                pipe.delete(tmp)
                pipe.zadd(tmp, {item: float(score) for item, score in ranked})
                pipe.rename(tmp, key)
            else:
                pipe.delete(key)
            n += 1
        if n:
            await pipe.execute()

    async def erase_user(self, user_id: str) -> int:
        """Delete every key about ``user_id``; returns how many existed."""
        return await self.client.delete(*self.keys.user_keys(user_id))
