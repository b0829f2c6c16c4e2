"""The ACLs of stream/tools/acls.py against a real broker with SASL/PLAIN and the KRaft StandardAuthorizer.

A private broker and redis-server are started by stream/tools/local.py on free ports from a temporary local_dir (the
default stack is not touched) and stopped at the end. One SASL user per role; the administrator is the only
super user besides the broker itself.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError
from pydantic import SecretStr

from infogap.stream import connections
from infogap.stream.tools import acls, local
from infogap.stream.settings import Settings, load
from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, running_worker

pytestmark = pytest.mark.slow

ADMIN = "acl-admin"
ROLE_USERS = {"worker": "acl-worker", "producers": "acl-producer", "catalog": "acl-catalog",
              "preferences": "acl-prefs", "channels": "acl-channels"}


@pytest.fixture(scope="module")
def authorized(tmp_path_factory):
    """(admin settings, passwords) of a SASL_PLAINTEXT broker that runs an authorizer, stopped on teardown."""
    root = tmp_path_factory.mktemp("acls")
    jars = local.fetch_kafka_jars(load())  # the default stack's jars (fetched once), shared through a symlink
    (root / "kafka-libs").symlink_to(jars, target_is_directory=True)
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    kport, cport, rport = ports
    pw = {user: secrets.token_urlsafe(18) for user in (ADMIN, *ROLE_USERS.values())}
    rpw = secrets.token_urlsafe(18)
    s = Settings(kafka_bootstrap=f"127.0.0.1:{kport}", kafka_controller_port=cport, kafka_heap="384m",
                 redis_url=f"redis://:{rpw}@127.0.0.1:{rport}/0", local_dir=root,
                 kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                 kafka_username=ADMIN, kafka_password=pw[ADMIN], topic_prefix="acl.", redis_prefix="acl:",
                 consumer_group="acl-workers", http_port=None, batch_timeout_ms=50)
    t0 = time.monotonic()
    try:
        local.up(s, sasl_users=pw, super_users=[ADMIN])
        logging.getLogger(__name__).info("authorizing stack up in %.1f s", time.monotonic() - t0)
        yield s, pw
    finally:
        local.down(s)  # bounded: SIGTERM, then SIGKILL after local.STOP_TIMEOUT_S
        p = local.paths(s)
        assert local._live_pid(p.kafka_pid, local._is_our_kafka(p)) is None
        assert local._live_pid(p.redis_pid, local._is_our_redis(s)) is None


def _as(s: Settings, pw: dict, role: str) -> Settings:
    user = ADMIN if role == "admin" else ROLE_USERS[role]
    return s.model_copy(update={"kafka_username": user, "kafka_password": SecretStr(pw[user])})


async def _write(s: Settings, topic: str, key: bytes = b"k", value: bytes | None = b"v") -> None:
    producer = connections.producer(s, acks="all", request_timeout_ms=10_000)
    await producer.start()
    try:
        async with asyncio.timeout(20):
            await (await producer.send(topic, value, key=key))
    finally:
        await producer.stop()


async def test_only_the_worker_writes_internal_topics(authorized):
    s, pw = authorized
    principals = acls.Principals.from_mapping({role: f"User:{user}" for role, user in ROLE_USERS.items()})
    producer, worker = _as(s, pw, "producers"), _as(s, pw, "worker")
    t = s.topics

    # the authorizer denies what no ACL allows: before the ACLs, not even the clickstream gets in
    with pytest.raises(TopicAuthorizationFailedError):
        await _write(producer, t.events)
    before = await acls.check(s, principals)
    assert len(before.missing) == len(acls.bindings(s, principals)) and not before.others_may_write
    assert before.broker == {"authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer"}

    report = await acls.apply(s, principals)
    assert report.ok, report.lines()
    assert (await acls.apply(s, principals)).ok  # idempotent

    # producers: events only
    await _write(producer, t.events, b"u1", orjson.dumps({"event_id": "e0", "user_id": "u1", "item_id": "sku-1",
                                                          "type": "view", "ts": time.time() - 5}))
    for topic in (t.state_users, t.erasures, t.cooc, t.state_items, t.push, t.items):
        with pytest.raises(TopicAuthorizationFailedError):
            await _write(producer, topic)
    # the other writers: their own topic, no internal one
    await _write(_as(s, pw, "catalog"), t.items, b"sku-0", b'{"item_id": "sku-0"}')
    for role in ("catalog", "preferences", "channels"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _write(_as(s, pw, role), t.state_users)
    # the worker may write its snapshots
    await _write(worker, t.state_users, b"probe", None)

    # the worker's grants are enough to run one: it reads items and events, writes recs to Redis
    r = connections.redis_async(s)
    try:
        async with running_worker(worker):
            await produce(_as(s, pw, "catalog"), t.items, [
                ("sku-1", {"item_id": "sku-1", "title": "Shoe", "category": "shoes", "tags": [], "price": 10.0,
                           "available": True})])
            await produce(producer, t.events, [("alice", {"event_id": "e1", "user_id": "alice", "item_id": "sku-1",
                                                          "type": "click", "ts": time.time() - 2})])
            await wait_for(lambda: r.get(f"{s.redis_prefix}recs:alice"), deadline_s=30,
                           what="recs:alice written by the worker principal")
    finally:
        await r.aclose()

    # a channel worker's principal reads push in its group and commits
    channel = connections.consumer(_as(s, pw, "channels"), t.push, group_id=f"{s.consumer_group}.channel.email",
                                   enable_auto_commit=False, auto_offset_reset="earliest")
    await channel.start()
    try:
        async with asyncio.timeout(30):
            while not channel.assignment():
                await channel.getmany(timeout_ms=200)
        await channel.commit({TopicPartition(t.push, 0): 0})
    finally:
        await channel.stop()

    # a producer cannot grant itself more; a stray grant by the administrator is named by check
    stray = acls.Binding(acls.RESOURCE["TOPIC"], s.topic_prefix, acls.PATTERN["PREFIXED"],
                         f"User:{ROLE_USERS['producers']}", acls.OPERATION["WRITE"])
    with pytest.raises(acls.AclError, match="may not create ACLs"):
        await acls.create(producer, [stray])
    await acls.create(s, [stray])
    report = await acls.check(s, principals)
    assert report.others_may_write == [stray] and not report.ok
