"""Kafka with SASL/PLAIN and Redis with passwords (requirepass and an ACL user) on loopback.

A second broker and a second redis-server are started by stream/tools/local.py on free ports from a temporary
local_dir (the default stack is not touched) and stopped at the end. Every client is built by
stream/connections.py from the settings, as the worker builds its own.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time

import orjson
import pytest
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr
from redis.exceptions import AuthenticationError

from infogap.stream import connections
from infogap.stream.tools import local
from infogap.stream.settings import Settings, load
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, read_topic, running_worker

pytestmark = pytest.mark.slow

APP_USER, OTHER_USER, ACL_USER = "infogap-app", "reporting", "app-reader"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """(settings, passwords) of a SASL_PLAINTEXT broker and a password-protected Redis, stopped on teardown."""
    root = tmp_path_factory.mktemp("secured")
    jars = local.fetch_kafka_jars(load())  # the default stack's jars (fetched once), shared through a symlink
    (root / "kafka-libs").symlink_to(jars, target_is_directory=True)
    kport, cport, rport = _free_ports(3)
    pw = {name: secrets.token_urlsafe(18) for name in ("app", "other", "redis", "acl")}
    s = Settings(kafka_bootstrap=f"127.0.0.1:{kport}", kafka_controller_port=cport, kafka_heap="384m",
                 redis_url=f"redis://:{pw['redis']}@127.0.0.1:{rport}/0", local_dir=root,
                 kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                 kafka_username=APP_USER, kafka_password=pw["app"], redis_prefix="sec:", consumer_group="sec-workers",
                 http_port=None, batch_timeout_ms=50)
    t0 = time.monotonic()
    try:
        local.up(s, sasl_users={APP_USER: pw["app"], OTHER_USER: pw["other"]}, redis_users={ACL_USER: pw["acl"]})
        logging.getLogger(__name__).info("secured stack up in %.1f s", time.monotonic() - t0)
        yield s, pw
    finally:
        local.down(s)  # bounded: SIGTERM, then SIGKILL after local.STOP_TIMEOUT_S
        p = local.paths(s)
        assert local._live_pid(p.kafka_pid, local._is_our_kafka(p)) is None
        assert local._live_pid(p.redis_pid, local._is_our_redis(s)) is None


def _with(s: Settings, **update) -> Settings:
    return s.model_copy(update=update)


async def test_sasl_produce_consume_and_redis_auth_round_trip(secured):
    s, pw = secured
    topic = s.topics.cooc
    await connections.check(s)
    await produce(s, topic, [("k1", b"hello over SASL")])
    got = await read_topic(s, topic, until=lambda recs: len(recs) >= 1, deadline_s=20)  # connections.consumer
    assert [(r.key, r.value) for r in got] == [(b"k1", b"hello over SASL")]

    # a second SASL user of the same broker
    await connections.check_kafka(_with(s, kafka_username=OTHER_USER, kafka_password=SecretStr(pw["other"])))

    # Redis: the default user's password (given in the URL), then an ACL user (given in settings)
    r = connections.redis_async(s)
    try:
        await r.set("sec:probe", "1")
        assert await r.get("sec:probe") == b"1"
    finally:
        await r.aclose()
    acl = _with(s, redis_username=ACL_USER, redis_password=SecretStr(pw["acl"]))
    await connections.check_redis(acl)
    r = connections.redis_sync(acl)
    try:
        r.set("sec:acl", "2")
        assert r.get("sec:acl") == b"2" and r.acl_whoami() == ACL_USER
    finally:
        r.close()


async def test_wrong_credentials_fail_with_a_clear_error(secured):
    s, pw = secured
    wrong = SecretStr("not-" + pw["app"])
    with pytest.raises(connections.CredentialsRefused, match="Invalid username or password") as info:
        await connections.check_kafka(_with(s, kafka_password=wrong), timeout_s=10)
    assert f"user={APP_USER}" in str(info.value) and wrong.get_secret_value() not in str(info.value)
    with pytest.raises(connections.CredentialsRefused, match="Invalid username or password"):
        await connections.check_kafka(_with(s, kafka_username="nobody"), timeout_s=10)
    with pytest.raises(connections.CredentialsRefused, match="another INFOGAP_KAFKA_SECURITY_PROTOCOL"):
        await connections.check_kafka(_with(s, kafka_security_protocol="PLAINTEXT"), timeout_s=10)
    # what aiokafka itself says, without the check first: it does not get through either
    producer = connections.producer(_with(s, kafka_password=wrong), request_timeout_ms=5000)
    try:
        with pytest.raises(KafkaConnectionError):
            async with asyncio.timeout(30):
                await producer.start()
    finally:
        await producer.stop()

    for bad in (_with(s, redis_password=SecretStr("wrong")), _with(s, redis_password=None),
                _with(s, redis_username=ACL_USER, redis_password=SecretStr(pw["redis"]))):
        with pytest.raises(connections.CredentialsRefused, match="Redis at .* refused the login"):
            await connections.check_redis(bad)
    r = connections.redis_sync(_with(s, redis_password=SecretStr("wrong")))
    with pytest.raises(AuthenticationError, match="invalid username-password pair"):
        r.set("sec:x", "1")
    r.close()


async def test_worker_consumes_with_sasl_and_writes_to_password_protected_redis(secured, caplog):
    s, pw = secured
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="aiokafka")  # the CLI, if a test ran it, quietens aiokafka
    t0 = time.time()
    event = {"event_id": "sec-e1", "user_id": "alice", "item_id": "sku-1", "type": "click", "ts": t0 - 5}
    r = connections.redis_async(s)
    try:
        async with running_worker(s):
            await produce(s, s.topics.items, [("sku-1", {"item_id": "sku-1", "title": "Shoe", "category": "shoes",
                                                         "tags": [], "price": 10.0, "available": True})])
            await produce(s, s.topics.events, [("alice", event)])
            raw = await wait_for(lambda: r.get(f"{s.redis_prefix}recs:alice"), deadline_s=30,
                                 what="recs:alice in the password-protected Redis")
        doc = orjson.loads(raw)
        assert doc["user_id"] == "alice" and doc["generated_at"] >= t0
    finally:
        await r.aclose()
    text = caplog.text
    assert "Authenticated as infogap-app via PLAIN" in text  # aiokafka logged the login: the capture works
    for secret in pw.values():
        assert secret not in text


async def test_pseudonymised_worker_writes_no_raw_user_id_and_the_client_reads_by_raw_id(secured):
    from infogap.stream.client import InfogapClient
    from infogap.stream.pseudonym import Pseudonymizer

    s, _ = secured
    s = _with(s, pseudonym_key=SecretStr(secrets.token_hex(32)), redis_prefix="psec:", consumer_group="psec-workers")
    pseudo = Pseudonymizer.from_settings(s)("bob-raw-7")
    t0 = time.time()
    r = connections.redis_async(s)
    try:
        async with running_worker(s):
            await produce(s, s.topics.users, [("bob-raw-7", {"user_id": "bob-raw-7", "consent": {"email": True},
                                                             "timezone": "UTC", "quiet_hours": None})])
            await produce(s, s.topics.events, [("bob-raw-7", {"event_id": "psec-e1", "user_id": "bob-raw-7",
                                                              "item_id": "sku-1", "type": "view", "ts": t0 - 5})])
            await wait_for(lambda: r.exists("psec:recs:bob-raw-7", f"psec:recs:{pseudo}"), deadline_s=30,
                           what="recs of bob under either id")
        keys = [k.decode() async for k in r.scan_iter("psec:*")]
        values = [await r.get(k) for k in keys if await r.type(k) == b"string"]
    finally:
        await r.aclose()
    assert f"psec:recs:{pseudo}" in keys
    assert not any("bob-raw-7" in k for k in keys) and not any(b"bob-raw-7" in v for v in values if v)
    client = InfogapClient.from_settings(s)
    try:
        recs = client.recommendations("bob-raw-7")
        assert recs is not None and recs.user_id == "bob-raw-7"
    finally:
        client.client.close()
