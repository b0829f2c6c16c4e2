"""Redis error replies (issue 18, finding 5), against private redis-servers: out of memory under ``maxmemory`` +
``noeviction``, a read-only replica after a failover, and keys of the wrong type at infogap keys.

OOM and READONLY are outages: the worker lives, retries the whole write, answers ``/health`` 503 with the
reason and commits nothing until the batch is written. A key of the wrong type is named in the log and a
metric, and overwritten (a write) or reported (a read), never fatal.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess

import aiohttp
import orjson
import redis.asyncio as aioredis

from infogap.stream import connections
from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce

T0 = 1_732_460_000.0  # 2024-11-24 14:53 UTC: outside quiet hours in UTC
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": "shoes", "tags": [], "price": 10.0 + i,
            "available": True} for i in range(8)]


def ev(n: int, user: str, item: str, t: float = T0, typ: str = "view") -> dict:
    return {"event_id": f"e-{user}-{n}-{item}", "user_id": user, "item_id": item, "type": typ, "ts": t + n}


@contextlib.asynccontextmanager
async def private_redis(tmp_path, name: str = "r"):
    """A redis-server of this test's own on a free loopback port; yields (url, client)."""
    port = free_port()
    work = tmp_path / name
    work.mkdir()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    try:
        await wait_for(lambda: _ping(client), what=f"private redis-server on {port}")
        yield url, client
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(10)


async def _ping(client) -> bool:
    try:
        return await client.ping()
    except Exception:
        return False


@contextlib.asynccontextmanager
async def worker_task(settings):
    """A worker running as a task: yields (worker, alive), ``alive()`` raising the worker's error if it died."""
    from infogap.stream.worker import Worker

    worker = Worker(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert worker.ready.is_set(), "worker did not become ready within 60 s"

    def alive() -> bool:
        if task.done():
            task.result()  # the worker's error, if it died of one
            raise AssertionError("the worker stopped")
        return True

    try:
        yield worker, alive
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 30)


async def health(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as resp:
        return resp.status, orjson.loads(await resp.read())


async def committed(settings) -> int:
    """Sum of the offsets the worker's group committed on ``events``."""
    admin = connections.admin(settings)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(settings.consumer_group)
    finally:
        await admin.close()
    return sum(max(0, om.offset) for tp, om in got.items() if tp.topic == settings.topics.events)


async def _outage_then_recovery(settings, client, worker, alive, http_port: int, users: list[str], what: str,
                                code: str) -> None:
    """Events come in while Redis refuses writes: the worker lives, retries, is unhealthy (``code`` in the
    reason) and commits nothing; the caller's ``recover`` ends the refusal (see the tests)."""
    keys = [f"{settings.redis_prefix}recs:{u}" for u in users]
    await produce(settings, settings.topics.events, [(u, ev(1, u, "sku-1")) for u in users])
    await wait_for(lambda: alive() and worker.stats.redis_retries >= 3, deadline_s=30,
                   what=f"the worker retrying writes {what}")
    status, body = await health(http_port)
    assert status == 503, body
    assert body["checks"]["redis"] == "down" and code in body["reasons"]["redis"], body
    assert not await client.exists(*keys)
    assert await committed(settings) == 0  # nothing committed while the batch is not written
    alive()


async def _all_written(settings, client, worker, alive, http_port: int, users: list[str]) -> None:
    for u in users:
        raw = await wait_for(lambda: alive() and client.get(f"{settings.redis_prefix}recs:{u}"), deadline_s=30,
                             what=f"recs of {u} after the outage")
        assert orjson.loads(raw)["user_id"] == u
    async def all_committed() -> bool:  # (the batches after the outage commit one by one)
        return await committed(settings) == len(users)

    await wait_for(all_committed, what="every offset committed once written")
    status, body = await wait_for(lambda: _healthy(http_port), what="/health 200 again")
    assert worker.stats.events_ok == len(users)
    alive()


async def _healthy(port: int):
    got = await health(port)
    return got if got[0] == 200 else None


async def test_redis_out_of_memory_is_an_outage_and_every_batch_lands_whole_after_it(settings, tmp_path):
    async with private_redis(tmp_path) as (url, client):
        http_port = free_port()
        s = settings.model_copy(update={"redis_url": url, "http_port": http_port, "http_host": "127.0.0.1",
                                        "snapshot_interval_s": 0.0})  # offsets committed after every batch
        async with worker_task(s) as (worker, alive):
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", "1")  # every write refused: "OOM command not allowed ..."
            users = [f"oom{i}" for i in range(5)]
            await _outage_then_recovery(s, client, worker, alive, http_port, users, "refused for memory", "OOM")
            await client.config_set("maxmemory", "0")
            await _all_written(s, client, worker, alive, http_port, users)


async def test_a_read_only_replica_after_a_failover_is_an_outage_until_it_is_a_primary_again(settings, tmp_path):
    async with private_redis(tmp_path, "primary") as (url, client), \
            private_redis(tmp_path, "other") as (other_url, _other):
        http_port = free_port()
        s = settings.model_copy(update={"redis_url": url, "http_port": http_port, "http_host": "127.0.0.1",
                                        "snapshot_interval_s": 0.0})
        async with worker_task(s) as (worker, alive):
            port = int(other_url.rsplit(":", 1)[1].split("/")[0])
            await client.replicaof("127.0.0.1", port)  # the worker's Redis is now a replica: READONLY
            await wait_for(lambda: _replica_in_sync(client), what="the replica in sync")
            users = [f"ro{i}" for i in range(5)]
            await _outage_then_recovery(s, client, worker, alive, http_port, users, "on a replica", "READONLY")
            await client.replicaof("NO", "ONE")
            await _all_written(s, client, worker, alive, http_port, users)


async def _replica_in_sync(client) -> bool:
    info = await client.info("replication")
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


async def test_keys_of_the_wrong_type_are_named_and_overwritten_and_the_worker_lives(settings, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    async with private_redis(tmp_path) as (url, client):
        s = settings.model_copy(update={"redis_url": url, "neighbour_max_age_s": 0.0})
        p = s.redis_prefix
        wrong = {f"{p}recs:yes": "list", f"{p}segments:model": "list", f"{p}trending": "string",
                 f"{p}exp:recs:none": "string"}  # the push campaign's hash (no experiment set: variant "none")
        for key, kind in wrong.items():
            await (client.lpush(key, "not infogap's") if kind == "list" else client.set(key, "not infogap's"))
        users = [("yes", {"user_id": "yes", "consent": {"email": True, "app": False, "ads": False},
                          "timezone": "UTC", "quiet_hours": [22, 8]})]
        crowd = [dict(ev(i, f"c{i}", f"sku-{k}", typ="click"), event_id=f"c{i}-{k}") for i in range(6)
                 for k in range(8)]
        async with worker_task(s) as (worker, alive):
            await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
            await produce(s, s.topics.users, users)
            await produce(s, s.topics.events, [(e["user_id"], e) for e in crowd])
            await wait_for(lambda: alive() and client.exists(f"{p}similar:sku-0"), deadline_s=30,
                           what="the crowd's rows in Redis")
            await produce(s, s.topics.events, [("yes", ev(50, "yes", "sku-0", typ="click"))])
            raw = await wait_for(lambda: alive() and _string(client, f"{p}recs:yes"), deadline_s=30,
                                 what="recs of 'yes' over the list at its key")
            assert orjson.loads(raw)["user_id"] == "yes"
            await wait_for(lambda: alive() and _type_is(client, f"{p}exp:recs:none", b"hash"), deadline_s=30,
                           what="the campaign's experiment hash over the string at its key")
            assert int(await client.hget(f"{p}exp:recs:none", next(
                f for f in await client.hkeys(f"{p}exp:recs:none") if f.endswith(b"|sent")))) == 1
            # read by the user stage, written by the item stage: reported until the item stage rewrites them
            await wait_for(lambda: alive() and _type_is(client, f"{p}segments:model", b"string"), deadline_s=30,
                           what="the population model rewritten")
            await wait_for(lambda: alive() and _type_is(client, f"{p}trending", b"zset"), deadline_s=30,
                           what="trending rewritten")
            assert worker.stats.redis_wrong_type >= 2
            alive()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key in (f"{p}exp:recs:none", f"{p}segments:model"):
        assert key in logged and "WRONGTYPE" in logged, logged[-2000:]


async def _string(client, key):
    return await client.get(key) if await client.type(key) == b"string" else None


async def _type_is(client, key, kind: bytes) -> bool:
    return await client.type(key) == kind
