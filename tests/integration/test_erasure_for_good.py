"""An erasure outlives every crash and restore, against the real Kafka and Redis (issue 18, finding 2):
a worker killed right after erasing a user, and a snapshot from before the erasure put back on the
state topic, bring nothing of the user back; a ``forget`` event also deletes the user's ``users``
record."""
from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from infogap.models.experiments import kafka_partition
from infogap.stream import connections
from infogap.stream.tools.bench import WorkerProcess
from infogap.stream.snapshots import SnapshotStore
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, read_topic, running_worker

pytestmark = pytest.mark.slow
T0 = 1_732_460_000.0
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": f"c{i % 3}", "tags": [], "available": True}
           for i in range(8)]
ZOE = "zoe"
OTHERS = [f"other{k}" for k in range(12)]


def purchases(user: str, start: int, n: int) -> list[tuple[str, dict]]:
    return [(user, {"event_id": f"{user}-{k}", "user_id": user, "item_id": f"sku-{k % 8}", "type": "purchase",
                    "ts": T0 + k}) for k in range(start, start + n)]


def prefs(user: str) -> tuple[str, dict]:
    return user, {"user_id": user, "consent": {"email": True}, "timezone": "UTC", "quiet_hours": None}


async def snapshot_users(s) -> dict[int, tuple[int, list[str]]]:
    """Per state.users partition: (offset covered, the users its last snapshot holds)."""
    snaps = await SnapshotStore(s, s.topics.state_users, "users").load(list(range(6)))
    return {p: (snap.offset, snap.state["users"]["users"]) for p, snap in snaps.items()}


async def raw_snapshot(s, partition: int) -> bytes:
    latest = await SnapshotStore(s, s.topics.state_users, "users").latest([partition])
    return latest[partition][1]


async def redis_keys_of(s, user: str) -> list:
    r = connections.redis_async(s)
    try:
        return [k async for k in r.scan_iter(match=f"{s.redis_prefix}*{user}*", count=1000)]
    finally:
        await r.aclose()


async def test_a_killed_worker_and_an_old_snapshot_bring_no_erased_user_back(settings, tmp_path):
    s = settings
    p = kafka_partition(ZOE, 6)
    env = {"INFOGAP_SNAPSHOT_INTERVAL_S": "0.3"}
    await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
    await produce(s, s.topics.users, [prefs(u) for u in [ZOE, *OTHERS]])
    first = WorkerProcess(s, tmp_path / "first.log", env)
    try:
        await produce(s, s.topics.events, purchases(ZOE, 0, 3) + [e for u in OTHERS for e in purchases(u, 0, 2)])
        await first.wait_until(lambda st: st["events_ok"] >= 3 + 2 * len(OTHERS), 60, "the first events")
        await wait_for(lambda: _holds(s, p, ZOE, 3), deadline_s=30, what="a snapshot holding zoe's purchases")
        before_erasure = await raw_snapshot(s, p)  # offset 3: zoe's first three purchases
        await produce(s, s.topics.events, purchases(ZOE, 3, 2))
        await first.wait_until(lambda st: st["events_ok"] >= 5 + 2 * len(OTHERS), 60, "zoe's five purchases")
        await wait_for(lambda: redis_keys_of(s, ZOE), what="zoe's recommendations in Redis")
        await produce(s, s.topics.users, [(ZOE, None)])
        await wait_for(lambda: _none(redis_keys_of(s, ZOE)), deadline_s=15, what="zoe erased from Redis")
        first.proc.kill()  # SIGKILL right after the erasure, whether or not it snapshotted since
        first.proc.wait(10)
    finally:
        first.stop()
    # the worst case: the partition's last snapshot is one from before the erasure (a replayed record)
    producer = connections.producer(s, acks="all")
    await producer.start()
    try:
        await (await producer.send(s.topics.state_users, before_erasure, key=f"p{p}".encode(), partition=p))
    finally:
        await producer.stop()

    async with running_worker(s.model_copy(update={"snapshot_interval_s": 0.3})) as survivor:
        await wait_for(lambda: survivor.stats.partitions == 6 and p in survivor.core.parts, what="partitions restored")
        await produce(s, s.topics.events, [e for u in OTHERS for e in purchases(u, 10, 1)])
        # the restore replays zoe's last two purchases (after the old snapshot's offset): not learned
        await wait_for(lambda: survivor.stats.erased_events >= 2, what="zoe's replayed events dropped")
        await wait_for(lambda: survivor.stats.events_ok >= len(OTHERS), what="the others' new events")
        assert not survivor.engine.known_user(ZOE)
        assert ZOE not in survivor.core.prefs and not survivor.core.parts[p].push.knows(ZOE)
        assert await redis_keys_of(s, ZOE) == []
        await wait_for(lambda: _newer_snapshot(s, p), what="a new snapshot of zoe's partition")
    held = await snapshot_users(s)
    assert all(ZOE not in users for _, users in held.values())
    assert all(u in {x for _, users in held.values() for x in users} for u in OTHERS)
    ledger = await read_topic(s, s.topics.erasures)
    assert len(ledger) >= 1 and all(ZOE.encode() not in m.key for m in ledger)  # digests, not ids
    pushes = await read_topic(s, s.topics.push)
    assert not [m for m in pushes if m.key == ZOE.encode() and m.timestamp / 1000 > _erased_at(ledger)]


async def test_a_forget_event_deletes_the_users_record_and_stays_forgotten(settings):
    s = settings.model_copy(update={"snapshot_interval_s": 0.3})
    await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
    await produce(s, s.topics.users, [prefs(ZOE)])
    async with running_worker(s) as worker:
        await produce(s, s.topics.events, purchases(ZOE, 0, 3))
        await wait_for(lambda: worker.engine.known_user(ZOE), what="zoe learned")
        forget = {"event_id": "bye", "user_id": ZOE, "type": "forget", "ts": T0 + 5}
        await produce(s, s.topics.events, [(ZOE, forget)] + purchases(ZOE, 6, 2))  # later events: dropped
        await wait_for(lambda: worker.stats.erased_users >= 1 and worker.stats.erased_events >= 2,
                       what="zoe forgotten, her later events dropped")
        users = await read_topic(s, s.topics.users, until=lambda recs: any(r.value is None for r in recs))
        assert [r.key for r in users if r.value is None] == [ZOE.encode()]
        await wait_for(lambda: _newer_snapshot(s, kafka_partition(ZOE, 6), after=0), what="a snapshot")
        assert not worker.engine.known_user(ZOE) and ZOE not in worker.core.prefs
    assert all(ZOE not in users for _, users in (await snapshot_users(s)).values())
    assert await redis_keys_of(s, ZOE) == []
    # a worker of another group, without snapshots, reads every event again from the start: the ledger
    # keeps zoe's events before and after the forget unlearned
    fresh = s.model_copy(update={"consumer_group": s.consumer_group + "-2", "snapshot_interval_s": 0})
    async with running_worker(fresh) as again:
        await wait_for(lambda: again.stats.events_in >= 6, what="the events read again from the start")
        assert not again.engine.known_user(ZOE) and again.stats.erased_events == 5


_seen_offsets: dict = {}


async def _holds(s, p: int, user: str, n_events: int) -> bool:
    got = (await snapshot_users(s)).get(p)
    return got is not None and user in got[1] and got[0] >= n_events


async def _newer_snapshot(s, p: int, after: int | None = None) -> bool:
    consumer = connections.consumer(s, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(s.topics.state_users, p)
        end = (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()
    first = _seen_offsets.setdefault((s.topic_prefix, p), end if after is None else after)
    return end > first + 1


async def _none(awaitable) -> bool:
    return not await awaitable


def _erased_at(ledger) -> float:
    return min(m.timestamp for m in ledger) / 1000


async def test_superseded_snapshots_holding_an_erased_user_are_compacted_away(settings):
    """Finding 13: the old records of state.users stop holding an erased user once the log cleaner has
    passed (segment.ms 1 s here instead of the deployed 60 s, so the test takes tens of seconds)."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    s = settings.model_copy(update={"snapshot_interval_s": 0.3})
    admin = connections.admin(s)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.topics.state_users)])
        deployed = {c[0]: c[1] for c in described[0].resources[0][4]}
        assert int(deployed["segment.ms"]) <= 60_000 and deployed["cleanup.policy"] == "compact"
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.topics.state_users,
                                                  {"segment.ms": "1000", "min.cleanable.dirty.ratio": "0.01",
                                                   "cleanup.policy": "compact", "max.message.bytes": "67108864"})])
    finally:
        await admin.close()
    p = kafka_partition(ZOE, 6)
    await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
    async with running_worker(s) as worker:
        await produce(s, s.topics.events, purchases(ZOE, 0, 3))
        await wait_for(lambda: _holds(s, p, ZOE, 3), what="a snapshot holding zoe")
        forget = {"event_id": "bye", "user_id": ZOE, "type": "forget", "ts": T0 + 5}
        await produce(s, s.topics.events, [(ZOE, forget)])
        await wait_for(lambda: worker.stats.erased_users >= 1, what="zoe forgotten")
        k = 0

        async def no_record_holds_zoe() -> bool:
            nonlocal k
            k += 1  # keep the partition's snapshots coming (a segment rolls when a record arrives after segment.ms)
            await produce(s, s.topics.events, [(ZOE, {"event_id": f"tick-{k}", "user_id": ZOE, "type": "forget",
                                                     "ts": T0 + 6 + k})])
            records = await read_topic(s, s.topics.state_users)
            from infogap.stream.snapshots import decode
            held = [decode(r.value, "users", r.partition).state["users"]["users"] for r in records
                    if r.partition == p]
            return len(held) >= 1 and not any(ZOE in users for users in held)

        await wait_for(no_record_holds_zoe, deadline_s=120, interval_s=2, what="old snapshots compacted away")
