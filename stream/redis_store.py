"""Writes the serving read model to Redis: pipelined, one round trip per batch.

Redis is the shared read model, never the only copy of state: everything here can be
rebuilt from the workers' state.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import orjson
import redis.asyncio as aioredis

from stream.redis_keys import RedisKeys


def encode_momentum(item_ids: list[str], values: list[float]) -> bytes:
    """Item ids (a JSON list) and their float64 values, for the internal ``ig:momentum`` key.

    >>> decode_momentum(encode_momentum(["a", "b"], [1.5, 0.25]))
    (['a', 'b'], [1.5, 0.25])
    """
    head = orjson.dumps(item_ids)
    return len(head).to_bytes(4, "little") + head + np.asarray(values, "<f8").tobytes()


def decode_momentum(raw: bytes) -> tuple[list[str], list[float]]:
    size = int.from_bytes(raw[:4], "little")
    return orjson.loads(raw[4: 4 + size]), np.frombuffer(raw[4 + size:], "<f8").tolist()


#: ``SET key value EX ttl`` for every key given (ARGV: the TTL, then the values in the keys' order), one reply
#: in all. In a pipeline redis-py spends ~30 us of client CPU per command, packing it and parsing its
#: reply; a batch's 6,000 keys (recommendations and segments of 3,000 users) took 95 ms of the worker's
#: CPU as SETs and 18 ms as this script's calls.
SET_WITH_TTL = """
local ttl = ARGV[1]
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""
#: Keys per call of :data:`SET_WITH_TTL`: Redis serves no other client while a script runs (~2 ms per 1,000).
SET_WITH_TTL_KEYS = 1000


class RedisStore:
    """Batch writer for ``recs``, ``segment``, ``similar`` and ``trending`` keys (and the population
    model the user stages read back)."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, recs_ttl_s: int):
        self.client = client
        self.keys = keys
        self.recs_ttl_s = recs_ttl_s
        self._set_with_ttl = client.register_script(SET_WITH_TTL)

    async def write(self, recs: Iterable[Mapping] = (), segments: Mapping[str, int | None] | None = None,
                    similar: Mapping[str, list] | None = None, rows: Mapping[str, bytes] | None = None,
                    trending: Mapping[int | None, list[tuple[str, float]]] | None = None,
                    population: Mapping | None = None,
                    momentum: tuple[list[str], list[float]] | None = None,
                    rows_published: Mapping[int, str] | None = None) -> None:
        """Write one batch of results in a single pipeline (not a transaction). ``rows`` are written in
        one ``MSET`` with ``rows_published`` (cooc partition -> its new token), so a reader that sees a
        token sees the rows published with it."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        n = 0
        keys, values = [], []  # set with the TTL
        for doc in recs:
            keys.append(k.recs(doc["user_id"]))
            values.append(orjson.dumps(doc))
        for user_id, seg in (segments or {}).items():
            if seg is None:
                pipe.delete(k.segment(user_id))
                n += 1
            else:
                keys.append(k.segment(user_id))
                values.append(str(seg))
        for i in range(0, len(keys), SET_WITH_TTL_KEYS):
            await self._set_with_ttl(keys[i: i + SET_WITH_TTL_KEYS],
                                     [self.recs_ttl_s, *values[i: i + SET_WITH_TTL_KEYS]], client=pipe)
            n += 1
        items = {k.similar(i): orjson.dumps(neighbours) for i, neighbours in (similar or {}).items()}
        items.update((k.neighbour_row(i), row) for i, row in (rows or {}).items())
        items.update((k.rows_published(p), token) for p, token in (rows_published or {}).items())
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
        if population is not None:
            pipe.set(k.segment_model(), orjson.dumps(population))
            n += 1
        if momentum is not None:
            pipe.set(k.momentum(), encode_momentum(*momentum))
            n += 1
        if n:
            await pipe.execute()

    async def read_population(self, n_segments: int, n: int) -> dict:
        """What :meth:`models.engine.Engine.load_population` takes, in one round trip: the population
        model (``model``; with ``at``, the time the scores are decayed to), the top ``n`` of each
        trending set (``trending``) and the momentum of every item (``momentum``); ``at`` is None
        before the learner has published."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.get(k.segment_model())
        pipe.get(k.momentum())
        segments = [None, *range(n_segments)]
        for seg in segments:
            pipe.zrevrange(k.trending(seg), 0, n - 1, withscores=True)
        raw, raw_m, *lists = await pipe.execute()
        model = orjson.loads(raw) if raw is not None else None
        trending = {seg: [(i.decode() if isinstance(i, bytes) else i, float(sc)) for i, sc in ranked]
                    for seg, ranked in zip(segments, lists)}
        return {"model": model, "trending": trending, "at": (model or {}).get("at"),
                "momentum": decode_momentum(raw_m) if raw_m is not None else None}

    async def erase_user(self, user_id: str) -> int:
        """Delete every key about ``user_id``; returns how many existed."""
        return await self.client.delete(*self.keys.user_keys(user_id))
