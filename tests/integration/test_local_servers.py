"""The local Kafka and Redis that ``infogap.stream.tools.local.up`` starts (settings from the environment).

The shared servers are never stopped here; ``down`` is tested on a second instance with its own ports and
``local_dir``.
"""
from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infogap.stream.tools import local
from infogap.stream.settings import COMPACTED_TOPICS, TOPIC_PARTITIONS

pytestmark = pytest.mark.integration


async def _topic_layout(bootstrap: str, names: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """name -> partition count, name -> cleanup.policy."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        parts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)
                 if t["error_code"] == 0}
        resources = [ConfigResource(ConfigResourceType.TOPIC, n, configs={"cleanup.policy": None}) for n in names]
        policy = {}
        for resp in await admin.describe_configs(resources):
            for res in resp.resources:
                policy[res[3]] = dict((e[0], e[1]) for e in res[4])["cleanup.policy"]
        return parts, policy
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_up_is_idempotent_and_fast(local_stack):
    local.up(local_stack)
    before = local.status(local_stack)
    t0 = time.monotonic()
    local.up(local_stack)
    elapsed = time.monotonic() - t0
    after = local.status(local_stack)
    assert elapsed < 3.0, f"a second up() took {elapsed:.1f} s"
    assert after["kafka"]["answering"] and after["redis"]["answering"]
    assert (after["kafka"]["pid"], after["redis"]["pid"]) == (before["kafka"]["pid"], before["redis"]["pid"])


def test_contract_topics_have_the_right_partitions_and_compaction(local_stack):
    names = local_stack.topics.all()
    parts, policy = asyncio.run(_topic_layout(local_stack.kafka_bootstrap, list(names.values())))
    assert parts == {names[c]: n for c, n in TOPIC_PARTITIONS.items()}
    for contract, real in names.items():
        assert ("compact" in policy[real]) == (contract in COMPACTED_TOPICS), (real, policy[real])
    assert local.status(local_stack)["topics"] == parts


def test_ensure_topics_honours_the_prefix_and_is_repeatable(local_stack):
    s = local_stack.model_copy(update={"topic_prefix": f"itl{uuid.uuid4().hex[:8]}."})
    names = list(s.topics.all().values())
    try:
        local.ensure_topics(s)
        local.ensure_topics(s)  # existing topics are fine
        parts, policy = asyncio.run(_topic_layout(s.kafka_bootstrap, names))
        assert parts == {s.topics.all()[c]: n for c, n in TOPIC_PARTITIONS.items()}
        assert policy[s.topics.users] == "compact" and policy[s.topics.events] == "delete"
    finally:
        asyncio.run(_delete_topics(s.kafka_bootstrap, names))


async def test_round_trip_through_kafka_with_a_consumer_group(local_stack):
    """Produce, consume in a group, commit: the aiokafka 0.14 paths the worker relies on, against Kafka 4.3."""
    bootstrap = local_stack.kafka_bootstrap
    topic, group = f"itl-rt-{uuid.uuid4().hex[:8]}", f"itl-g-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(topic, 3, 1)])
        assert [e[1] for e in resp.topic_errors] == [0]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            sent = {f"u{i}".encode(): f'{{"n": {i}}}'.encode() for i in range(20)}
            for key, value in sent.items():
                await producer.send(topic, value, key=key, headers=[("src", b"itl")])
            await producer.flush()
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        got: dict[bytes, bytes] = {}
        try:
            deadline = time.monotonic() + 30
            while len(got) < len(sent) and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    for msg in batch:
                        assert msg.headers == (("src", b"itl"),)
                        got[msg.key] = msg.value
            await consumer.commit()
            committed = 0
            for tp in consumer.assignment():
                committed += await consumer.committed(tp) or 0
        finally:
            await consumer.stop()
        assert got == sent
        assert committed == len(sent)
        offsets = await admin.list_consumer_group_offsets(group)
        assert sum(o.offset for o in offsets.values()) == len(sent)
    finally:
        await admin.delete_topics([topic])
        await admin.close()


def test_redis_answers(local_stack):
    client = redis.Redis.from_url(local_stack.redis_url)
    key = f"itl:{uuid.uuid4().hex}"
    try:
        assert client.ping()
        client.set(key, b"1", ex=60)
        assert client.get(key) == b"1"
    finally:
        client.delete(key)
        client.close()


async def test_up_works_inside_a_running_event_loop(local_stack):
    local.up(local_stack)  # sync API called from async code: must not trip over the running loop
    assert local.status(local_stack)["kafka"]["answering"]


@pytest.mark.slow
def test_second_instance_up_down_up_down(local_stack, tmp_path):
    """Other ports, other local_dir: up starts both, down stops exactly those, data survives a restart,
    and the shared servers are untouched."""
    shared_before = local.status(local_stack)
    kport, cport, rport = _free_ports(3)
    s = local_stack.model_copy(update={
        "kafka_bootstrap": f"127.0.0.1:{kport}", "kafka_controller_port": cport,
        "redis_url": f"redis://127.0.0.1:{rport}/0", "local_dir": tmp_path, "topic_prefix": ""})
    shared_libs = local.fetch_kafka_jars(local_stack)  # no-op when fetched; reuse the jars, do not copy 45 MB
    (tmp_path / "kafka-libs").symlink_to(shared_libs, target_is_directory=True)
    try:
        local.up(s)
        st = local.status(s)
        assert st["kafka"]["answering"] and st["kafka"]["managed"]
        assert st["redis"]["answering"] and st["redis"]["managed"]
        assert st["topics"] == dict(zip(s.topics.all().values(), TOPIC_PARTITIONS.values()))
        pids = st["kafka"]["pid"], st["redis"]["pid"]
        assert set(pids).isdisjoint({shared_before["kafka"]["pid"], shared_before["redis"]["pid"]})

        local.down(s)
        st = local.status(s)
        assert not st["kafka"]["answering"] and not st["redis"]["answering"]
        assert st["kafka"]["pid"] is None and st["redis"]["pid"] is None
        for pid in pids:
            assert local._gone(pid)

        local.up(s)  # restart on the formatted storage: topics are still there
        st = local.status(s)
        assert st["kafka"]["answering"] and st["topics"][s.topics.events] == TOPIC_PARTITIONS["events"]
    finally:
        local.down(s)

    shared_after = local.status(local_stack)
    assert shared_after["kafka"]["answering"] and shared_after["redis"]["answering"]
    assert shared_after["kafka"]["pid"] == shared_before["kafka"]["pid"]
    assert shared_after["redis"]["pid"] == shared_before["redis"]["pid"]
