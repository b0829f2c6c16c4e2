"""A missing output topic (issue 18, finding 11): refused at start with its name, and ``/health`` 503 with the
reason when batches stop completing while input waits (``INFOGAP_STALL_S``)."""
from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import orjson
import pytest

from infogap.stream import connections
from infogap.stream.tools import local
from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, read_topic, running_worker

T0 = 1_732_460_000.0


def ev(n: int, user: str, item: str) -> dict:
    return {"event_id": f"e-{user}-{n}", "user_id": user, "item_id": item, "type": "view", "ts": T0 + n}


async def delete_topic(settings, topic: str) -> None:
    """Delete ``topic`` and wait until the broker no longer lists it."""
    admin = connections.admin(settings)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        await wait_for(lambda: _gone(admin, topic), deadline_s=30, what=f"{topic} deleted")
    finally:
        await admin.close()


async def _gone(admin, topic: str) -> bool:
    return topic not in await admin.list_topics()


async def health(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_a_worker_started_without_its_dead_letter_topic_exits_naming_it(settings):
    await delete_topic(settings, settings.topics.dlq)
    with pytest.raises(RuntimeError, match=re.escape(settings.topics.dlq)):
        async with running_worker(settings):
            pass


async def test_health_fails_with_the_reason_when_batches_stall_behind_an_undeliverable_dead_letter(settings):
    port = free_port()
    s = settings.model_copy(update={"http_port": port, "http_host": "127.0.0.1", "stall_s": 2.0})
    async with running_worker(s) as worker:
        await produce(s, s.topics.events, [("u1", ev(1, "u1", "a"))])
        await wait_for(lambda: worker.stats.batches >= 1, what="a first batch")
        assert (await health(port))[0] == 200
        await delete_topic(s, s.topics.dlq)
        await produce(s, s.topics.events, [("u2", b"not json")])  # its dead letter cannot be delivered
        t0 = time.monotonic()
        status, body = await wait_for(lambda: _unhealthy(port), deadline_s=30, what="/health 503 for the stall")
        assert time.monotonic() - t0 < 2.0 + 5.0  # within the stall time (and a probe's slack)
        reason = body["reasons"]["progress"]
        assert "no batch completed" in reason and s.topics.dlq in reason, body
        assert body["checks"]["progress"] == "down" and body["status"] == "unhealthy"
        # the topic back: the dead letter is delivered, the batch completes, health recovers
        await asyncio.to_thread(local.ensure_topics, s)
        await wait_for(lambda: _healthy(port), deadline_s=60, what="/health 200 after the topic is back")
        assert worker.stats.dead_letters == 1 and worker.stats.events_in == 2
    dead = await read_topic(s, s.topics.dlq, until=lambda recs: len(recs) >= 1)
    assert [r.value for r in dead] == [b"not json"]


async def _unhealthy(port: int):
    got = await health(port)
    return got if got[0] == 503 else None


async def _healthy(port: int):
    got = await health(port)
    return got if got[0] == 200 else None
