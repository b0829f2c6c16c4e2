"""Hostile values at the user stage's Redis keys, through a real worker, Kafka and Redis: the worker refuses them and
goes on (each once killed ``Worker.run``, and, left in Redis, every restart after it: a crash loop)."""
from __future__ import annotations

import numpy as np
import orjson

from infogap.stream import connections
from infogap.stream.core.neighbour_rows import encode_row
from infogap.stream.store.base import encode_momentum
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, running_worker


def _row(item: str, neighbour: str, **kw) -> bytes:
    row = {"item_id": item, "t": 1_732_460_000.0, "pop": 2.0, "total": 9.0, "pair_total": 4.0,
           "neighbours": [neighbour], "numbers": np.array([3]), "values": np.ones((4, 1)),
           "neighbour_pop": np.array([3.0]), **kw}
    return encode_row(row, numbering=12)


async def test_hostile_rows_a_segment_model_and_momentum_in_redis_are_refused_and_the_worker_goes_on(settings):
    """Redis holds, before the worker starts: a neighbour row whose neighbour number is 2**40 (an 8 TiB translation
    table: a MemoryError), one with infinite values (NaN scores), a segment model claiming 50 centers (a KeyError)
    and a momentum of 3 ids with 2 values (a ValueError). The worker learns every event, writes recommendations, and
    reads the learner's own model once it publishes it."""
    settings = settings.model_copy(update={"neighbour_max_age_s": 0.0, "publish_interval_s": 0.2,
                                           "push_enabled": False})
    p = settings.redis_prefix
    model = {"n_seeded": 50, "slots": {}, "centers": [[0.0] * 12], "applied": 1, "at": 1_732_460_000.0}
    r = connections.redis_async(settings)
    try:
        await r.set(f"{p}nbrow:cover", _row("cover", "kindle", numbers=np.array([2 ** 40])))
        await r.set(f"{p}nbrow:kindle", _row("kindle", "cover", values=np.full((4, 1), np.inf)))
        await r.set(f"{p}segments:model", orjson.dumps(model))
        await r.set(f"{p}momentum", encode_momentum(["kindle", "cover", "x"], [1.0, 2.0]))
        async with running_worker(settings) as worker:
            await produce(settings, settings.topics.items, [(i, {"item_id": i, "title": i, "category": "Books"})
                                                            for i in ("kindle", "cover")])
            events = [{"event_id": f"e{n}-{k}", "user_id": f"buyer{n}", "type": "purchase", "item_id": item,
                       "ts": 1_732_460_000.0 + 10 * n + k}
                      for n in range(10) for k, item in enumerate(("kindle", "cover"))]
            events.append({"event_id": "a1", "user_id": "alice", "type": "view", "item_id": "kindle",
                           "ts": 1_732_460_200.0})
            await produce(settings, settings.topics.events, [(e["user_id"], e) for e in events])
            await wait_for(lambda: worker.stats.events_ok >= len(events), what="every event learned")
            assert worker._cache.bad_rows >= 1  # the row of infinities, refused
            doc = await wait_for(lambda: r.get(f"{p}recs:alice"), what="alice's recommendations")
            assert all(np.isfinite(i["score"]) for i in orjson.loads(doc)["items"])
            # the learner's model replaces the hostile one in Redis, and is read
            await wait_for(lambda: worker.engine.state.segmenter.n_seeded > 0, what="the learner's segment model read")
            # what an operator sees: the refused row and the refused population, on /stats and /metrics
            assert worker.stats.to_dict()["redis_unreadable"] >= 2, worker.stats.to_dict()
    finally:
        await r.aclose()
