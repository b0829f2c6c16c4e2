"""No recommendation published in Redis cites a pair with lift <= 1 or observed fewer times than the minimum."""
from __future__ import annotations

import orjson

from infogap.stream import connections
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, running_worker
from tests.integration.test_experiment_attacks import produce_many
from tests.unit.test_reasons_and_trending import CITED, skewed_stream

async def test_published_reasons_cite_only_pairs_above_chance_with_enough_users(settings):
    settings = settings.model_copy(update={"neighbour_max_age_s": 0.0, "publish_interval_s": 0.3,
                                           "push_enabled": False})
    events = skewed_stream()  # Zipf-like popularity: many pairs meet about as often as chance has it
    users = {e["user_id"] for e in events}
    items = [{"item_id": f"i{k}", "title": f"Item {k}", "category": f"Cat{k % 3}"} for k in range(0, 80, 4)]
    r = connections.redis_async(settings)
    try:
        async with running_worker(settings) as worker:
            await produce(settings, settings.topics.items, [(it["item_id"], it) for it in items])
            # the first half builds the pairs; the second half is ranked with them in Redis
            half = len(events) // 2
            await produce_many(settings, settings.topics.events, [(e["user_id"], e) for e in events[:half]])
            await wait_for(lambda: worker.stats.events_in >= half, deadline_s=60, what="the first half processed")
            await wait_for(lambda: r.exists(f"{settings.redis_prefix}similar:i0"), what="published neighbours")
            await produce_many(settings, settings.topics.events, [(e["user_id"], e) for e in events[half:]])
            await wait_for(lambda: worker.stats.events_in >= len(events), deadline_s=60, what="every event processed")
        raws = await r.mget([f"{settings.redis_prefix}recs:{u}" for u in sorted(users)])
    finally:
        await r.aclose()
    docs = [orjson.loads(raw) for raw in raws if raw is not None]
    assert len(docs) == len(users)
    reasons = [item["reason"] for d in docs for item in d["items"]]
    cited = [CITED.search(why) for why in reasons if "together with" in why]
    assert len(cited) > 200, len(cited)  # pairs are still cited, often
    bad = [m.string if m else None for m in cited if m is None or float(m[2]) <= 1.0 or int(m[1].replace(",", "")) < 3]
    assert not bad, bad[:5]
    assert all(reasons) and not any("goes with" in why for why in reasons)
