"""The batch writer against the real Redis: every user's recommendations and segment, with the TTL;
neighbour rows as a user stage's cache reads them."""
from __future__ import annotations

import numpy as np
import orjson

from infogap.models import Engine
from infogap.models.cooc_shard import owner
from infogap.stream import connections
from infogap.stream.core.neighbour_rows import encode_row
from infogap.stream.neighbour_cache import NeighbourCache
from infogap.stream.store.keys import RedisKeys
from infogap.stream.store.redis_node import SET_WITH_TTL_KEYS, RedisStore


async def test_a_batch_larger_than_one_script_call_writes_every_key_with_its_ttl(settings):
    r = connections.redis_async(settings)
    keys = RedisKeys(settings.redis_prefix)
    store = RedisStore(r, keys, recs_ttl_s=600)
    n = SET_WITH_TTL_KEYS + 7  # recommendations and segments: three script calls
    docs = [{"user_id": f"u{i}", "items": [{"item_id": f"i{i}", "score": 0.5, "reason": "trending now"}],
             "segment": i % 3, "generated_at": 1.0, "model_version": "t"} for i in range(n)]
    await r.set(keys.segment("gone"), "2")
    try:
        await store.write(recs=docs, segments={**{f"u{i}": i % 3 for i in range(n)}, "gone": None})
        got = await r.mget([keys.recs(f"u{i}") for i in range(n)])
        assert [orjson.loads(g) for g in got] == docs
        assert await r.mget([keys.segment(f"u{i}") for i in range(n)]) == [str(i % 3).encode() for i in range(n)]
        for key in (keys.recs("u0"), keys.recs(f"u{n - 1}"), keys.segment(f"u{n - 1}")):
            assert 0 < await r.ttl(key) <= 600, key
        assert await r.exists(keys.segment("gone")) == 0  # a user without a segment now has no key
        await r.script_flush()  # Redis restarted meanwhile: the script is loaded again
        await store.write(recs=docs[:1])
        assert orjson.loads(await r.get(keys.recs("u0"))) == docs[0]
    finally:
        await r.aclose()


async def test_a_user_stage_reads_a_row_again_once_its_shard_has_published_it_again(settings):
    """The item stage writes rows with its shard's token (``RedisStore.write``); the cache keeps a row
    past its max age while the token stands, and reads the new one after the next publish."""
    r = connections.redis_async(settings)
    keys = RedisKeys(settings.redis_prefix)
    store = RedisStore(r, keys, recs_ttl_s=600)
    engine, cache = Engine(), NeighbourCache(store, capacity=10, max_age_s=2.0, partitions=4)
    p = owner("a", 4)

    def row(neighbour: str) -> bytes:
        return encode_row({"item_id": "a", "t": 1000.0, "pop": 10.0, "total": 100.0, "pair_total": 50.0,
                           "neighbours": [neighbour], "numbers": np.array([1]), "values": np.full((4, 1), 5.0),
                           "neighbour_pop": np.array([10.0])})

    try:
        await store.write(rows={"a": row("b")}, rows_published={p: "first"})
        assert await cache.ensure(engine, ["a"], 100.0) == 1
        assert [nb.item_id for nb in engine.similar("a")] == ["b"]
        await r.set(keys.neighbour_row("a"), row("c"))  # not a publish: no new token
        assert await cache.ensure(engine, ["a"], 103.0) == 0
        assert [nb.item_id for nb in engine.similar("a")] == ["b"]
        await store.write(rows={"a": row("d")}, rows_published={p: "second"})
        assert await cache.ensure(engine, ["a"], 104.0) == 0  # within its max age again
        assert await cache.ensure(engine, ["a"], 106.5) == 1
        assert [nb.item_id for nb in engine.similar("a")] == ["d"]
    finally:
        await r.delete(keys.neighbour_row("a"), keys.rows_published(p))
        await r.aclose()


def test_a_ttl_redis_would_refuse_is_refused_when_the_settings_are_read():
    import pytest
    from pydantic import ValidationError

    from infogap.stream.settings import Settings

    with pytest.raises(ValidationError, match="recs_ttl_s"):
        Settings(recs_ttl_s=0)
