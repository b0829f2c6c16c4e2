"""Health, metrics and a Redis outage, against the real servers."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, running_worker

T0 = 1_732_460_000.0


async def get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read()


def ev(n, user, item, t=T0):
    return {"event_id": f"e-{user}-{n}", "user_id": user, "item_id": item, "type": "view", "ts": t + n}


async def test_health_and_metrics_endpoints(settings):
    port = free_port()
    s = settings.model_copy(update={"http_port": port, "http_host": "127.0.0.1"})
    async with running_worker(s) as worker:
        await produce(s, s.topics.events, [("u1", ev(1, "u1", "a")), ("u1", b"not json")])
        await wait_for(lambda: worker.stats.events_in >= 2, what="2 records consumed")
        status, body = await get(f"http://127.0.0.1:{port}/health")
        assert status == 200 and orjson.loads(body) == {"status": "ok", "checks": {"kafka": "up", "redis": "up", "state": "up"}}
        status, body = await get(f"http://127.0.0.1:{port}/metrics")
        text = body.decode()
        assert status == 200
        assert "infogap_events_in_total 2.0" in text
        assert 'infogap_dlq_total{reason="not_json"} 1.0' in text  # a reason code, never text of the input
        assert "infogap_freshness_seconds_count 2.0" in text
        # the item stage in this worker published (at the configured interval: no backlog here)
        assert f"infogap_publish_interval_seconds {s.publish_interval_s}" in text
        assert f"infogap_neighbour_max_age_seconds {s.neighbour_max_age_s}" in text  # and its user stage reads
        status, body = await get(f"http://127.0.0.1:{port}/stats")
        stats = orjson.loads(body)
        assert stats["events_ok"] == 1 and stats["dead_letters"] == 1 and stats["freshness_seconds"]["p50"] >= 0


async def test_health_turns_unhealthy_when_redis_is_unreachable(settings):
    port = free_port()
    s = settings.model_copy(update={"http_port": port, "http_host": "127.0.0.1",
                                    "redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with running_worker(s):
        status, body = await get(f"http://127.0.0.1:{port}/health")
    assert status == 503
    assert orjson.loads(body) == {"status": "unhealthy", "checks": {"kafka": "up", "redis": "down", "state": "up"}}


@pytest.mark.slow
async def test_a_30_second_redis_outage_loses_nothing_and_recs_catch_up(settings, tmp_path):
    """A private redis-server is stopped for 30 s mid-stream; the worker retries, then catches up."""
    redis_port, http_port = free_port(), free_port()
    s = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{redis_port}/0", "http_port": http_port,
                                    "http_host": "127.0.0.1"})
    cmd = [shutil.which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", str(tmp_path)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    r = aioredis.Redis.from_url(s.redis_url)
    try:
        await wait_for(lambda: _ping(r), what="private redis-server")
        async with running_worker(s) as worker:
            await produce(s, s.topics.events, [("before", ev(1, "before", "a"))])
            await wait_for(lambda: r.exists(f"{s.redis_prefix}recs:before"), what="recs before the outage")
            server.terminate()
            server.wait(10)
            t_down = time.monotonic()
            await produce(s, s.topics.events, [(f"during{i}", ev(1, f"during{i}", "a")) for i in range(5)])
            await wait_for(lambda: worker.stats.redis_retries > 0, what="the worker noticing the outage")
            status, body = await get(f"http://127.0.0.1:{http_port}/health")
            assert status == 503 and orjson.loads(body)["checks"]["redis"] == "down"
            await asyncio.sleep(max(0.0, 30 - (time.monotonic() - t_down)))
            server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
            await wait_for(lambda: _ping(r), what="redis-server back")
            for i in range(5):
                await wait_for(lambda: r.exists(f"{s.redis_prefix}recs:during{i}"), deadline_s=30,
                               what=f"recs of during{i} after the outage")
            # the batch that waited out the outage ends after its writes land: /health is 200 once it has
            await wait_for(lambda: worker.stats.events_ok >= 6, what="the last batch to end")
            assert worker.stats.events_ok == 6

            async def healthy() -> bool:
                return (await get(f"http://127.0.0.1:{http_port}/health"))[0] == 200

            await wait_for(healthy, what="/health 200 again")
    finally:
        server.terminate()
        server.wait(10)
        await r.aclose()


async def _ping(r) -> bool:
    try:
        return await r.ping()
    except Exception:
        return False
