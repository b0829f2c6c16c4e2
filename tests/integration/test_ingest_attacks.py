"""Attacks on ingest (issue 18): a clock-skewed event, records keyed by another id, label cardinality from
input, and an event too large for its own dead letter. Each against the real Kafka and Redis."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infogap.models.events import REASON_CODES
from infogap.stream import connections
from infogap.stream.core.ingest import MAX_DLQ_VALUE_BYTES
from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, read_topic, running_worker


def view(event_id: str, user: str, ts: float, item: str = "sku-1") -> dict:
    return {"event_id": event_id, "user_id": user, "item_id": item, "type": "view", "ts": ts}


async def produce_many(settings, topic: str, records: list[tuple[bytes | None, bytes]], **options) -> None:
    """Send ``(key, value)`` pairs without waiting for each ack in turn (10,000 records in about a second)."""
    producer = connections.producer(settings, acks="all", linger_ms=5, **options)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@pytest.mark.parametrize("max_future_s", [None, 86_400.0], ids=["default-future", "future-of-a-day"])
async def test_one_clock_skewed_event_does_not_send_the_next_good_events_to_the_dlq(settings, max_future_s):
    """Finding 7: an event stamped 23 h 59 min ahead is refused (the default allowed future is minutes) or, when a
    day is allowed, applied without moving the partition's lateness watermark or dedupe horizon past its record's
    timestamp plus the allowed skew: the good events after it, 2 min to 1 h old, are all applied, a duplicate of
    an earlier one is still counted once."""
    s = settings if max_future_s is None else settings.model_copy(update={"max_future_s": max_future_s})
    now = time.time()
    before = [view(f"b{k}", "skew", now - 3600 + k, f"sku-{k}") for k in range(3)]
    ahead = view("ahead", "skew", now + 23 * 3600 + 59 * 60, "sku-9")
    after = [view(f"a{k}", "skew", now - 3600 + 60 * k + 0.5, f"sku-{k % 7}") for k in range(1, 59)]  # 59..2 min old
    again = before[0]  # the same event_id once more, after the skewed event
    records = [("skew", e) for e in before + [ahead] + after + [again]]
    r = connections.redis_async(s)
    try:
        async with running_worker(s) as worker:
            await produce(s, s.topics.events, records)
            await wait_for(lambda: worker.stats.events_in >= len(records), what="every record consumed")
            stats = worker.stats.to_dict()
            assert await r.exists(f"{s.redis_prefix}recs:skew")
            dead = await read_topic(s, s.topics.dlq) if stats["dead_letters"] else []
    finally:
        await r.aclose()
    applied_ahead = max_future_s is not None
    assert stats["events_ok"] == len(before) + len(after) + applied_ahead, (stats["dlq_by_reason"], stats)
    assert stats["duplicates"] == 1
    if applied_ahead:
        assert stats["dead_letters"] == 0
        assert worker.core.ingest.watermarks[(s.topics.events, events_partition(worker))] <= time.time() + 300 + 1
    else:
        assert stats["dlq_by_reason"] == {"ts_out_of_range": 1}
        (d,) = dead
        assert orjson.loads(d.value)["event_id"] == "ahead"
        assert dict(d.headers)["reason"].decode().startswith("field 'ts' is ")
        assert dict(d.headers)["reason_code"] == b"ts_out_of_range"


def events_partition(worker) -> int:
    (partition,) = [p for (topic, p) in worker.core.ingest.watermarks if topic == worker.topics.events]
    return partition


async def test_records_keyed_by_another_id_go_to_the_dlq_and_the_rightly_keyed_one_is_applied_once(settings):
    """Finding 10: with a null key or another user's id as key, one user's events would spread over partitions
    (caps and dedupe break): they go to the DLQ with a reason; the same event_id keyed by its user_id is applied
    once, and sent again it is a duplicate."""
    now = time.time()
    e = view("k1", "kim", now - 10)
    records = [(None, e), ("mallory", e), ("kim", e), ("kim", e), (None, view("k2", "kim", now - 5))]
    async with running_worker(settings) as worker:
        await produce(settings, settings.topics.events, records)
        await wait_for(lambda: worker.stats.events_in >= len(records), what="every record consumed")
        dead = await read_topic(settings, settings.topics.dlq, until=lambda recs: len(recs) >= 3)
        stats = worker.stats.to_dict()
    assert stats["events_ok"] == 1 and stats["duplicates"] == 1, stats
    assert stats["dlq_by_reason"] == {"key_mismatch": 3}
    assert sorted((m.key or b"", orjson.loads(m.value)["event_id"]) for m in dead) == [
        (b"", "k1"), (b"", "k2"), (b"mallory", "k1")]
    for m in dead:
        h = dict(m.headers)
        assert h["reason_code"] == b"key_mismatch"
        assert h["reason"].decode().startswith("the record key is ")
        assert "produce with key=user_id" in h["reason"].decode()


async def test_the_dlq_metric_has_a_fixed_set_of_labels_whatever_the_input(settings):
    """Finding 8: 10,000 distinct unknown types (and other bad records) make at most one series per reason code,
    and no value of the input appears on /metrics or as a /stats key."""
    port = free_port()
    s = settings.model_copy(update={"http_port": port, "http_host": "127.0.0.1"})
    now = time.time()
    n = 10_000
    secret = "pii-alice@example.com"
    bad = [(b"u", orjson.dumps({**view(f"x{i}", "u", now), "type": f"{secret}-{i}"})) for i in range(n)]
    bad += [(b"u", b"not json " + secret.encode()), (b"u", orjson.dumps({"event_id": "m1", "user_id": "u"})),
            (b"u", orjson.dumps(view("ts", "u", 12.0))), (b"other", orjson.dumps(view("key", "u", now)))]
    async with running_worker(s) as worker:
        await produce_many(s, s.topics.events, bad)
        await wait_for(lambda: worker.stats.events_in >= len(bad), deadline_s=60, what="every record consumed")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = (await resp.read()).decode()
            async with session.get(f"http://127.0.0.1:{port}/stats") as resp:
                stats = orjson.loads(await resp.read())
    series = [line for line in text.splitlines() if line.startswith("infogap_dlq_total{")]
    labels = {line.split('reason="', 1)[1].split('"', 1)[0] for line in series}
    assert labels == {"unknown_type", "not_json", "missing_field", "ts_out_of_range", "key_mismatch"}, series
    assert len(series) <= len(REASON_CODES) and labels <= REASON_CODES
    assert f'infogap_dlq_total{{reason="unknown_type"}} {float(n)}' in text
    assert secret not in text and "pii" not in text and len(text) < 20_000
    assert stats["dlq_by_reason"] == {"unknown_type": n, "not_json": 1, "missing_field": 1, "ts_out_of_range": 1,
                                      "key_mismatch": 1}


async def test_an_event_too_large_for_its_dead_letter_is_cut_and_marked_and_the_worker_goes_on(settings):
    """Finding 4(a): a 1.2 MiB event the broker accepted (its topic allows 2 MiB) is over the producer's
    max_request_size once copied to the DLQ with headers; the copy is cut, marked with its original length, and
    the worker applies the next good event (before: MessageSizeTooLargeError, on every restart)."""
    admin = connections.admin(settings)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, settings.topics.events,
                                                  configs={"max.message.bytes": str(2 * 1024 * 1024)})])
    finally:
        await admin.close()
    now = time.time()
    huge = orjson.dumps({**view("huge", "big", now), "session_id": "s", "padding": "x" * (1_200 * 1024)})
    async with running_worker(settings) as worker:
        await produce_many(settings, settings.topics.events, [(b"big", huge)], max_request_size=4 * 1024 * 1024)
        await produce(settings, settings.topics.events, [("big", view("next", "big", now))])
        await wait_for(lambda: worker.stats.events_ok >= 1, what="the good event after the huge one")
        dead = await read_topic(settings, settings.topics.dlq, until=lambda recs: len(recs) >= 1)
        assert worker.stats.events_in == 2 and worker.stats.dlq_by_reason == {"too_large": 1}
        r = connections.redis_async(settings)
        try:
            assert await r.exists(f"{settings.redis_prefix}recs:big")
        finally:
            await r.aclose()
    (d,) = dead
    h = dict(d.headers)
    assert h["truncated"] == str(len(huge)).encode()
    assert h["reason"].decode().startswith(f"payload is {len(huge)} bytes, over the limit")
    assert h["reason_code"] == b"too_large" and h["source_topic"] == settings.topics.events.encode()
    assert d.value == huge[:MAX_DLQ_VALUE_BYTES] and d.key == b"big"
