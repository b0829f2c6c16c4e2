"""The app-backend client reads what the worker wrote: recs, neighbours, trending, segments."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from infogap.models import Engine
from infogap.stream import connections
from infogap.stream.client import InfogapClient
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, running_worker

T0 = 1_732_460_000.0
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": "shoes" if i % 2 else "hats",
            "tags": [], "available": True} for i in range(8)]


async def test_the_client_reads_what_the_worker_wrote(settings):
    s = settings.model_copy(update={"publish_interval_s": 0.0})
    events = [{"event_id": f"e{u}-{k}", "user_id": f"u{u}", "item_id": f"sku-{(u + k) % 4}", "type": "purchase",
               "ts": T0 + 10 * u + k} for u in range(12) for k in range(3)]
    pure = Engine(s.engine_config())  # the item stage's rows and trending equal a pure engine's on the same events
    for it in CATALOG:
        pure.upsert_item(it)
    pure.learn_many(events)
    expected_similar, expected_trending = pure.similar("sku-1", n=s.similar_n), pure.trending(n=5)
    client = InfogapClient(connections.redis_sync(s), s.redis_prefix)
    async with running_worker(s) as worker:
        await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
        await produce(s, s.topics.events, [(e["user_id"], e) for e in events])
        await wait_for(lambda: worker.stats.events_ok >= len(events), what="all events applied")
        # trending is published by the population learner on its own cadence, after the events are applied;
        # the four items are bought 9 times each, so the order is decided by recency alone
        await wait_for(lambda: [i for i, _ in client.trending(n=5)] == [i for i, _ in expected_trending],
                       what=f"ig:trending ordered as the pure engine's {expected_trending}")
        # segments come from the population model: a user it reached after their last event has ig:segment now,
        # and shows it in ig:recs from their next event (CHANGELOG), here one that changes no item's figures
        await wait_for(lambda: client.segment("u3") is not None, what="u3's segment from the population model")
        await produce(s, s.topics.events, [("u3", {"event_id": "e3-open", "user_id": "u3", "type": "push_open",
                                                   "ts": T0 + 200})])
        await wait_for(lambda: worker.stats.events_ok >= len(events) + 1, what="u3's next event applied")
        expected_segment = worker.engine.segment("u3")
        await wait_for(lambda: getattr(client.recommendations("u3"), "segment", "none yet") == expected_segment,
                       what=f"u3's recs written again with segment {expected_segment}")
    raw = orjson.loads(await asyncio.to_thread(connections.redis_sync(s).get, f"{s.redis_prefix}recs:u3"))
    recs = await asyncio.to_thread(client.recommendations, "u3")
    assert recs is not None and recs.user_id == "u3" and recs.model_version == s.model_version
    assert [(i.item_id, i.score, i.reason) for i in recs.items] == [(r["item_id"], r["score"], r["reason"])
                                                                    for r in raw["items"]]
    owned = {e["item_id"] for e in events if e["user_id"] == "u3"}
    assert recs.items and not owned & {i.item_id for i in recs.items} and all(i.reason for i in recs.items)
    assert recs.segment == expected_segment == client.segment("u3")
    similar = client.similar("sku-1")
    assert expected_similar
    got, want = {n.item_id: n.lift for n in similar}, {n.item_id: n.lift for n in expected_similar}
    assert got.keys() == want.keys() and all(got[i] == pytest.approx(want[i], rel=1e-6) for i in want)
    assert similar and all(n.support >= 2 for n in similar)  # rare pairs are not published
    trending = client.trending(n=5)
    assert [i for i, _ in trending] == [i for i, _ in expected_trending]
    assert [sc for _, sc in trending] == pytest.approx([sc for _, sc in expected_trending], rel=1e-9)
    assert client.recommendations("nobody") is None
