"""The state topics under attack and damage, against the real Kafka and Redis: a record that would run
code runs nothing, and an unreadable snapshot stops its own partition loudly, never the others and
never by falling back to empty state (issue 18, findings 1 and 3)."""
from __future__ import annotations

import os
import pickle

import aiohttp
import orjson
import pytest
import zstandard
from aiokafka import TopicPartition

from infogap.models.experiments import kafka_partition
from infogap.stream import connections
from infogap.stream.snapshots import encode
from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, read_topic, running_worker

pytestmark = pytest.mark.slow
T0 = 1_732_460_000.0
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": f"c{i % 3}", "tags": [], "available": True}
           for i in range(12)]


class _RunsAShellCommand:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def users_by_partition(n_per: int = 3) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {p: [] for p in range(6)}
    k = 0
    while any(len(v) < n_per for v in out.values()):
        u = f"user{k}"
        p = kafka_partition(u, 6)
        if len(out[p]) < n_per:
            out[p].append(u)
        k += 1
    return out


def events_for(users: list[str], start: int, n: int = 4) -> list[tuple[str, dict]]:
    return [(u, {"event_id": f"{u}-{k}", "user_id": u, "item_id": f"sku-{(k + j) % 12}", "type": "purchase",
                 "ts": T0 + k}) for j, u in enumerate(users) for k in range(start, start + n)]


async def last_record(s, topic: str, partition: int):
    consumer = connections.consumer(s, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, end - 1)
        batch = await consumer.getmany(tp, timeout_ms=5000)
        return batch[tp][-1]
    finally:
        await consumer.stop()


async def health(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as resp:
        return resp.status, await resp.json()


async def test_hostile_and_unreadable_snapshots_stop_only_their_partitions_and_run_nothing(settings, tmp_path):
    port = free_port()
    s = settings.model_copy(update={"snapshot_interval_s": 0.3, "http_port": port, "http_host": "127.0.0.1"})
    groups = users_by_partition()
    everyone = [u for us in groups.values() for u in us]
    marker = tmp_path / "pwned"
    evil, broken = 2, 4  # the events partitions whose snapshots are replaced
    async with running_worker(s) as worker:
        await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
        await produce(s, s.topics.users, [(u, {"user_id": u, "consent": {"email": True}, "timezone": "UTC",
                                               "quiet_hours": None}) for u in everyone])
        await produce(s, s.topics.events, events_for(everyone, 0))
        await wait_for(lambda: worker.stats.events_ok >= 4 * len(everyone), what="every event applied")
    # the worker stopped with a last snapshot of every partition; now someone writes to the state topics
    pickled = zstandard.ZstdCompressor().compress(pickle.dumps((evil, 10**6, _RunsAShellCommand(str(marker)))))
    not_our_schema = encode("users", broken, 4, {"part": {"renamed": True}, "users": {}})  # a good checksum
    producer = connections.producer(s, acks="all")
    await producer.start()
    try:
        await (await producer.send(s.topics.state_users, pickled, key=f"p{evil}".encode(), partition=evil))
        await (await producer.send(s.topics.state_users, not_our_schema, key=f"p{broken}".encode(), partition=broken))
        await (await producer.send(s.topics.state_items, b"\x00garbage", key=b"p1", partition=1))
    finally:
        await producer.stop()

    async with running_worker(s) as worker:
        await wait_for(lambda: len(worker.stats.unreadable_state) == 3, what="three partitions stopped")
        assert not marker.exists()  # the pickle ran nothing
        why = worker.stats.unreadable_state
        assert "a pickle written by infogap before snapshot format 3" in why[f"{s.topics.state_users}[{evil}]"]
        assert f"partition {evil} offset" in why[f"{s.topics.state_users}[{evil}]"]
        assert "field" in why[f"{s.topics.state_users}[{broken}]"]
        assert "not an infogap snapshot" in why[f"{s.topics.state_items}[1]"]
        status, body = await health(port)
        assert status == 503 and body["checks"]["state"] == "down"
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = await resp.text()
        assert f'infogap_unreadable_state{{partition="{s.topics.state_users}[{evil}]"}} 1.0' in metrics

        # the other partitions go on, with their state; the stopped ones apply nothing (no duplicate
        # applied again, no second email), and their snapshots are left for an operator to fix
        before = worker.stats.events_ok
        await produce(s, s.topics.events, events_for(everyone, 0) + events_for(everyone, 10, 1))
        fine = [u for p, us in groups.items() if p not in (evil, broken) for u in us]
        await wait_for(lambda: worker.stats.events_ok - before >= len(fine), what="the healthy partitions' events")
        await wait_for(lambda: worker.stats.duplicates >= 4 * len(fine), what="their replayed events as duplicates")
        for u in fine:
            assert worker.engine.profile(u)["events"] == 5  # restored 4, plus the new one
        for u in groups[evil] + groups[broken]:
            assert not worker.engine.known_user(u)
        r = connections.redis_async(s)
        try:
            await wait_for(lambda: r.exists(*(f"{s.redis_prefix}recs:{u}" for u in fine)), what="recs")
        finally:
            await r.aclose()
        await wait_for(lambda: worker.stats.batches >= 3, what="a few batches (and snapshot turns)")
    assert (await last_record(s, s.topics.state_users, evil)).value == pickled
    assert (await last_record(s, s.topics.state_users, broken)).value == not_our_schema
    assert (await last_record(s, s.topics.state_items, 1)).value == b"\x00garbage"
    pushes = await read_topic(s, s.topics.push)
    stopped = set(groups[evil] + groups[broken])
    assert all(orjson.loads(m.value)["user_id"] not in stopped or orjson.loads(m.value)["created_at"] < T0 + 10
               for m in pushes)


async def test_a_pickled_snapshot_of_an_older_version_migrates_and_restores(settings):
    """The upgrade path: a partition stopped on a pickle is rewritten by `infogap state migrate`, then
    restored with every user and the offset it covered."""
    from infogap.models import Engine
    from infogap.models.user_state import export_users
    from infogap.stream.settings import load as load_settings
    from infogap.stream.tools.state_migration import migrate
    from infogap.stream.core.user_partition import UserPartition
    from infogap.models.push_policy import PushConfig

    p = 3
    users = [u for u in users_by_partition(4)[p]]
    engine = Engine(settings.engine_config(), cooc="remote", population="remote")
    for u in users:
        engine.learn_one({"event_id": f"{u}-old", "user_id": u, "item_id": "sku-1", "type": "view", "ts": T0})
    part = UserPartition.new(p, load_settings(), PushConfig())
    for u in users:
        part.touch(u)
    old = zstandard.ZstdCompressor(level=1).compress(
        pickle.dumps((p, 0, {"part": part, "users": export_users(engine, users)}), protocol=5))
    producer = connections.producer(settings, acks="all")
    await producer.start()
    try:
        await (await producer.send(settings.topics.state_users, old, key=f"p{p}".encode(), partition=p))
    finally:
        await producer.stop()
    assert await migrate(settings) == {"migrated": 1, "already format 3": 0, "refused": 0}
    async with running_worker(settings) as worker:
        await wait_for(lambda: p in worker.core.parts, what="the migrated partition restored")
        assert not worker.stats.unreadable_state
        assert all(worker.engine.known_user(u) for u in users)
