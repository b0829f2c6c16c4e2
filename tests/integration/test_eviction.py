"""A flood of one-event user ids against the real Kafka and Redis: the worker keeps at most the cap of users
per partition, the latest users get recommendations, and a restore brings back at most the cap
(issue 18, finding 9)."""
from __future__ import annotations

import time

import orjson
import pytest

from infogap.stream import connections
from infogap.stream.store.keys import RedisKeys
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, running_worker

pytestmark = pytest.mark.slow
CAP, USERS = 500, 5_000


def held(worker) -> dict[int, int]:
    """Users held per events partition, after checking that the engine holds exactly those."""
    users = {p: len(part.users) for p, part in worker.core.parts.items()}
    assert worker.engine.stats()["users"] == sum(users.values())
    return users


async def test_a_flood_of_one_event_users_keeps_at_most_the_cap_per_partition(settings):
    # the user stage alone: it holds every per-user state, and writes the recommendations
    s = settings.model_copy(update={"max_users_per_partition": CAP, "snapshot_interval_s": 0.5,
                                    "batch_max_records": 1_000, "stages": "users"})
    t0 = time.time() - USERS - 60.0
    ids = [f"flood-{k}" for k in range(USERS)]
    events = [(u, {"event_id": f"e{k}", "user_id": u, "type": "view", "item_id": f"i{k % 40}", "ts": t0 + k})
              for k, u in enumerate(ids)]
    keys = RedisKeys(s.redis_prefix)
    r = connections.redis_async(s)
    try:
        async with running_worker(s) as worker:
            await produce(s, s.topics.events, events)
            await wait_for(lambda: worker.stats.events_in >= USERS, deadline_s=120, what="5,000 events processed")
            per_partition = held(worker)
            assert len(per_partition) == 6 and all(n <= CAP for n in per_partition.values()), per_partition
            assert sum(per_partition.values()) >= 6 * (CAP - CAP // 10)  # evicted down to 90 % at least
            # each partition's latest users are held; everyone's recommendations are in Redis, evicted or not
            # (eviction is not an erasure: they expire with their TTL)
            latest, first = ids[-60:], ids[:60]
            assert all(worker.engine.known_user(u) for u in latest)
            assert not any(worker.engine.known_user(u) for u in first)
            docs = [orjson.loads(raw) for raw in await r.mget([keys.recs(u) for u in latest + first])]
            assert all(d is not None and d["items"] for d in docs)
            assert [d["user_id"] for d in docs] == latest + first
            assert await r.ttl(keys.recs(first[0])) > 0
            # a user who comes back after eviction starts fresh: one event in their history
            await produce(s, s.topics.events, [(first[0], {"event_id": "back", "user_id": first[0], "type": "view",
                                                           "item_id": "i7", "ts": t0 + USERS})])
            await wait_for(lambda: worker.engine.known_user(first[0]), what="the returning user learned")
            assert worker.engine.profile(first[0])["events"] == 1 and worker.engine.query_items(first[0]) == ["i7"]
        # the worker stopped with a last checkpoint: a new one restores at most the cap per partition
        async with running_worker(s) as again:
            await wait_for(lambda: len(again.core.parts) == 6, deadline_s=60, what="six partitions restored")
            restored = held(again)
            assert all(0 < n <= CAP for n in restored.values()), restored
            assert all(again.engine.known_user(u) for u in latest + [first[0]])
            assert not any(again.engine.known_user(u) for u in first[1:])
    finally:
        await r.aclose()
