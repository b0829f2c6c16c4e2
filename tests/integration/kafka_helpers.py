"""Small helpers for integration tests: produce, read a topic, run a worker in-process."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import orjson
from aiokafka import TopicPartition

from infogap.stream import connections


def free_port() -> int:
    """A TCP port free on loopback right now (for a private server or HTTP endpoint in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def produce(settings, topic: str, records: list[tuple[bytes | str | None, bytes | dict | None]]) -> None:
    """Send ``(key, value)`` pairs in order and wait for every ack; dict values are JSON-encoded."""
    producer = connections.producer(settings, acks="all")
    await producer.start()
    try:
        for key, value in records:
            k = key.encode() if isinstance(key, str) else key
            v = orjson.dumps(value) if isinstance(value, dict) else value
            await (await producer.send(topic, v, key=k))
    finally:
        await producer.stop()


async def read_topic(settings, topic: str, *, until=None, deadline_s: float = 20.0) -> list:
    """Read ``topic`` from the beginning until ``until(records)`` holds or the deadline passes."""
    consumer = connections.consumer(settings, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    out: list = []
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            await consumer._client.force_metadata_update()
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
            if until is not None and until(out):
                break
            if until is None:
                ends = await consumer.end_offsets(parts)
                if all([await consumer.position(tp) >= ends[tp] for tp in parts]):
                    break
    finally:
        await consumer.stop()
    return out


@contextlib.asynccontextmanager
async def running_worker(settings, **kwargs):
    """A :class:`infogap.stream.worker.Worker` running as a task; stopped (and checked for errors) on exit."""
    from infogap.stream.worker import Worker

    worker = Worker(settings, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the worker's startup error
    assert worker.ready.is_set(), "worker did not become ready within 60 s"
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def model_from_snapshots(settings, item_ids: list[str]):
    """The user stage's state as its snapshots hold it, ranking with the item stage's rows and the
    population learner's segment centers and trending, as Redis holds them.

    Returns (engine, {partition: Snapshot}); the engine holds every snapshotted partition's users.
    """
    from infogap.models import Engine
    from infogap.models.user_state import import_users, users_from_state
    from infogap.stream.core.neighbour_rows import decode_row
    from infogap.stream.store.keys import RedisKeys
    from infogap.stream.store.redis_node import RedisStore
    from infogap.stream.snapshots import SnapshotStore
    
    snaps = await SnapshotStore(settings, settings.topics.state_users, "users").load(list(range(6)))
    engine = Engine(settings.engine_config(), cooc="remote", population="remote")
    for snap in snaps.values():
        import_users(engine, users_from_state(snap.state["users"], snap.arrays))
    r = connections.redis_async(settings)
    try:
        keys = RedisKeys(settings.redis_prefix)
        raws = await r.mget([keys.neighbour_row(i) for i in item_ids])
        got = await RedisStore(r, keys, 60).read_population(engine.config.n_segments, settings.trending_n)
    finally:
        await r.aclose()
    if got["at"] is not None:
        engine.load_population(got["model"], got["trending"], got["at"], got["momentum"])
    engine.load_rows(decode_row(raw) for raw in raws if raw is not None)
    return engine, snaps


def experiment_counts(snap) -> dict:
    """The experiment counters a user-stage snapshot holds: ``{Segment: Counts}``."""
    from infogap.models.experiments import ExperimentMetrics

    metrics = ExperimentMetrics()
    metrics.restore_state(snap.state["part"]["experiments"], snap.arrays)
    return metrics.counts()
