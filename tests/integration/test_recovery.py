"""Crash recovery (kill -9 mid-stream) and a broker restart, against the real servers."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from infogap.stream import connections
from infogap.stream.tools import local
from infogap.stream.tools.bench import WorkerProcess
from infogap.stream.store.redis_node import RedisStore
from infogap.stream.store.keys import RedisKeys
from infogap.stream.tools.synthetic import SyntheticStream
from tests.conftest import wait_for
from tests.integration.kafka_helpers import experiment_counts, free_port, model_from_snapshots, produce, running_worker

pytestmark = pytest.mark.slow
NOON = 1_732_449_600.0  # 2024-11-24 12:00 UTC
EXPERIMENT = {"name": "exp1", "variants": {"A": 0.5, "B": 0.5}}


def stream_with_feedback(n: int = 6_000) -> tuple[list, list, list[str]]:
    """Synthetic events plus context-attributed purchases; users with consent and no quiet hours."""
    synth = SyntheticStream(n_users=300, n_items=200, groups=6, seed=3)
    events = synth.events(n, start_ts=NOON, per_second=5.0)
    for k, e in enumerate(events):
        if k % 50 == 0:
            e.update(type="purchase", value=10.0 + k % 7,
                     context={"campaign": "winter", "channel": "email", "variant": "A" if k % 100 else "B"})
    users = sorted({e["user_id"] for e in events})
    prefs = [(u, {"user_id": u, "consent": {"email": True, "app": k % 2 == 0}, "timezone": "UTC",
                  "quiet_hours": None}) for k, u in enumerate(users)]
    return events, prefs, users


async def run_to_end(s, tmp_path, name: str, events, *, crash_after: int | None = None) -> None:
    env = {"INFOGAP_SNAPSHOT_INTERVAL_S": "0.5", "INFOGAP_EXPERIMENT": orjson.dumps(EXPERIMENT).decode(),
           "INFOGAP_EXPERIMENT_CAMPAIGNS": '["winter"]',  # its feedback is attributed by context alone
           "INFOGAP_BATCH_MAX_RECORDS": "500",
           "INFOGAP_ENGINE": '{"min_users": 1}'}  # (the privacy floor off: a few hundred users, full top-10s)
    worker = WorkerProcess(s, tmp_path / f"{name}.log", env)
    try:
        if crash_after is not None:
            await worker.wait_until(lambda st: st["events_in"] >= crash_after, 120, f"{crash_after} events in")
            worker.proc.kill()  # SIGKILL: no checkpoint, no commit, no goodbye
            worker.proc.wait(10)
            worker.stop()
            worker = WorkerProcess(s, tmp_path / f"{name}-restarted.log", env)
        # done when the group's committed offsets reach the end of events (commits follow snapshots)
        await wait_for(lambda: _caught_up(s), deadline_s=180, interval_s=0.5, what=f"{name} caught up")
    finally:
        worker.stop()  # SIGTERM: a last checkpoint


async def _caught_up(s) -> bool:
    from aiokafka import TopicPartition

    consumer = connections.consumer(s, group_id=s.consumer_group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(s.topics.events, p) for p in range(6)]
        ends = await consumer.end_offsets(tps)
        committed = [await consumer.committed(tp) or 0 for tp in tps]
        return all(c >= ends[tp] for c, tp in zip(committed, tps))
    finally:
        await consumer.stop()


async def test_kill_9_mid_stream_then_restart_equals_an_uninterrupted_run(scoped_settings, tmp_path):
    events, prefs, users = stream_with_feedback()
    runs = {}
    for name, crash in (("calm", None), ("crash", len(events) // 3)):
        s = scoped_settings()
        await produce(s, s.topics.users, prefs)
        await produce(s, s.topics.events, [(e["user_id"], e) for e in events])
        await run_to_end(s, tmp_path, name, events, crash_after=crash)
        runs[name] = s

    items = [f"i{k}" for k in range(200)]
    (calm_engine, calm), (crash_engine, crash) = [await model_from_snapshots(runs[n], items) for n in ("calm", "crash")]
    assert {p: snap.offset for p, snap in calm.items()} == {p: snap.offset for p, snap in crash.items()}
    # The model after the stream: events of different partitions interleave in batches in an order that
    # differs between any two runs (crash or not), and the shared item statistics (co-occurrence pruned to
    # top-M, decayed trending) are not exactly order-independent; so the same events give the same model up
    # to that interleaving. Each user's events are applied once and in order (their partition's order).
    overlaps = []
    for u in users:
        a = {r.item_id for r in calm_engine.recommend(u, n=10)}
        b = {r.item_id for r in crash_engine.recommend(u, n=10)}
        overlaps.append(len(a & b) / max(1, len(a | b)))
    assert sum(overlaps) / len(overlaps) >= 0.7, f"mean top-10 Jaccard {sum(overlaps) / len(overlaps):.3f}"
    for u in users:
        assert crash_engine.known_user(u)
    # experiment counters. Feedback attributed by context (here: purchases of the "winter" campaign) is
    # exact: none lost, none twice. Pushes *sent* depend on each user's top-N when it was decided, so on
    # batch boundaries, which a crash moves: they agree within 35 %.
    stored = {}
    for name, s in runs.items():
        r = connections.redis_async(s)
        stored[name] = await RedisStore(r, RedisKeys(s.redis_prefix), 60).read_experiment("exp1")
        await r.aclose()
    for name, snaps in (("calm", calm), ("crash", crash)):
        assert stored[name] == {seg: c for snap in snaps.values()
                                for seg, c in experiment_counts(snap).items()}
    winter = {n: {seg: c for seg, c in st.items() if seg.campaign == "winter"} for n, st in stored.items()}
    assert winter["crash"] == winter["calm"]
    revenue = sum(c.revenue for c in winter["calm"].values())
    assert revenue == sum(e.get("value", 0) for e in events if e.get("context"))
    sent = {n: sum(c.sent for seg, c in st.items() if seg.campaign == "recs") for n, st in stored.items()}
    # Measured 476-595 pushes over about fifteen runs, two runs up to 22 % apart: each user's top-N also
    # depends on when the user stage last loaded the population learner's trending (every
    # publish_interval_s), so the count is a timing-dependent figure; this bound catches pushes lost or
    # sent twice wholesale; the exact checks are the counters and the attributed feedback above.
    assert sent["calm"] > 0 and abs(sent["crash"] - sent["calm"]) <= 0.35 * sent["calm"], sent
    # what users see in Redis is a view computed when each user was last active; its exact content depends on
    # how partitions interleave in batches, which differs even between two uninterrupted runs. The model behind
    # it is equal (above); here: every user's view exists after the crash too, with a full top-10.
    r = {name: connections.redis_async(s) for name, s in runs.items()}
    for u in users:
        for n in ("calm", "crash"):
            doc = orjson.loads(await r[n].get(f"{runs[n].redis_prefix}recs:{u}"))
            assert doc["user_id"] == u and len(doc["items"]) == 10
    for c in r.values():
        await c.aclose()


async def test_the_worker_waits_through_a_broker_restart(local_stack, tmp_path):
    """A private broker is stopped and started again under a running worker: it recovers by itself."""
    s = local_stack.model_copy(update={
        "kafka_bootstrap": f"127.0.0.1:{free_port()}", "kafka_controller_port": free_port(),
        "local_dir": tmp_path / "kafka-private", "redis_prefix": "test:restart:", "consumer_group": "g-restart",
        "http_port": None, "batch_timeout_ms": 50, "snapshot_interval_s": 0.5})
    await asyncio.to_thread(local.up, s)
    r = connections.redis_async(s)
    try:
        async with running_worker(s) as worker:
            await produce(s, s.topics.events, [("before", {"event_id": "b1", "user_id": "before", "item_id": "a",
                                                           "type": "view", "ts": NOON})])
            await wait_for(lambda: r.exists("test:restart:recs:before"), what="recs before the restart")
            await asyncio.to_thread(local.down, s)
            await asyncio.sleep(3)  # the worker sees the broker gone
            await asyncio.to_thread(local.up, s)
            await produce(s, s.topics.events, [("after", {"event_id": "a1", "user_id": "after", "item_id": "a",
                                                          "type": "view", "ts": NOON + 1})])
            await wait_for(lambda: r.exists("test:restart:recs:after"), deadline_s=90,
                           what="recs of an event produced after the restart")
            # the recs are in Redis before the batch ends (its pushes and deltas are acked after): wait for it
            await wait_for(lambda: worker.stats.events_in >= 2, what="the batch to end")
            assert worker.stats.events_ok == 2
    finally:
        await asyncio.to_thread(local.down, s)
        await r.delete("test:restart:recs:before", "test:restart:recs:after",
                       "test:restart:segment:before", "test:restart:segment:after")
        await r.aclose()
