"""Hostile input goes to the DLQ with a reason; good events around it are applied; nobody's data survives erasure."""
from __future__ import annotations

import random

import orjson

from infogap.stream import connections
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, read_topic, running_worker

T0 = 1_732_460_000.0
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": "shoes", "tags": [], "available": True}
           for i in range(10)]


def good(n: int, user: str, item: str = "sku-1", ts: float = T0) -> dict:
    return {"event_id": f"g-{user}-{n}", "user_id": user, "item_id": item, "type": "view", "ts": ts + n}


HOSTILE = {
    b"\xff\xfe\xfd not utf-8": "not valid JSON",
    b"[" * 3000 + b"]" * 3000: "not valid JSON",
    orjson.dumps({**good(0, "h"), "event_id": "x" * 20_000}): "payload is",
    b'{"event_id": "n1", "user_id": "h", "item_id": "sku-1", "type": "view", "ts": NaN}': "not valid JSON",
    b'{"event_id": "n2", "user_id": "h", "item_id": "sku-1", "type": "view", "ts": Infinity}': "not valid JSON",
    orjson.dumps({**good(0, "h"), "event_id": "p1", "ts": 0}): "field 'ts' is 0, before the earliest",
    orjson.dumps({**good(0, "h"), "event_id": "p2", "ts": 4e9}): "field 'ts' is",
    orjson.dumps({**good(0, "h"), "event_id": "w1", "user_id": {"id": 1}}): "field 'user_id' must be a string",
    orjson.dumps({**good(0, "h"), "event_id": "w2", "value": "12"}): "field 'value' must be a number",
    orjson.dumps({**good(0, "h"), "event_id": "u1", "type": "teleport"}): "unknown event type 'teleport'",
    orjson.dumps({**good(0, "h"), "event_id": "c1", "item_id": "not-in-catalog"}): "item 'not-in-catalog' is not in",
    (LATE := orjson.dumps({**good(0, "late"), "event_id": "l1", "ts": T0 - 10_000})): "late event: ",
}


async def test_fuzzed_and_hostile_payloads_go_to_the_dlq_and_good_events_pass(settings):
    s = settings.model_copy(update={"unknown_items": "dlq", "max_lateness_s": 3600.0})
    rng = random.Random(7)
    fuzz = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))) for _ in range(200)]
    records = [("late", good(1, "late"))]  # sets the partition's newest time for the late event below
    for k, raw in enumerate(list(HOSTILE) + fuzz):
        records.append(("late" if raw == LATE else "h", raw))  # keyed by its user_id, on its partition
        if k % 10 == 0:
            records.append((f"ok{k}", good(k, f"ok{k}", f"sku-{k % 10}")))
    n_good = sum(1 for _, v in records if isinstance(v, dict))
    async with running_worker(s) as worker:
        await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
        await produce(s, s.topics.events, records[:1])
        await wait_for(lambda: worker.stats.events_ok >= 1, what="the first event")
        await produce(s, s.topics.events, records[1:])
        await wait_for(lambda: worker.stats.events_in >= len(records), deadline_s=30, what="all records consumed")
        assert worker.stats.events_ok == n_good  # every good event, none of the bad
        dead = await read_topic(s, s.topics.dlq, until=lambda recs: len(recs) >= len(records) - n_good)
    assert len(dead) == len(records) - n_good
    reasons = {m.value: dict(m.headers)["reason"].decode() for m in dead}
    for raw, expected in HOSTILE.items():
        assert reasons[raw].startswith(expected), (raw[:60], reasons[raw])
    assert all(reasons[raw] for raw in fuzz)
    r = connections.redis_async(s)
    for _, v in records:
        if isinstance(v, dict):
            assert await r.exists(f"{s.redis_prefix}recs:{v['user_id']}")
    await r.aclose()


async def test_out_of_order_events_within_the_lateness_are_applied(settings):
    s = settings.model_copy(update={"max_lateness_s": 600.0})
    events = [good(1, "ooo", "sku-1", T0 + 500), good(2, "ooo", "sku-2", T0 + 100),  # 400 s late: applied
              good(3, "ooo", "sku-3", T0 - 1000)]  # 1500 s late: DLQ
    async with running_worker(s) as worker:
        await produce(s, s.topics.events, [("ooo", e) for e in events])
        await wait_for(lambda: worker.stats.events_in >= 3, what="3 records consumed")
        profile = worker.engine.profile("ooo")
    assert worker.stats.events_ok == 2 and worker.stats.dead_letters == 1
    assert worker.stats.dlq_by_reason == {"late": 1}  # keyed by reason code
    assert profile is not None


#: long enough that its bytes cannot turn up by chance in the state's float arrays (a pickle of 10 MB: "zoe" did)
ZOE = "zoe-erased-7f3c9a1e"


async def test_erasure_leaves_no_trace_in_redis_or_state_within_5_seconds(settings):
    import time

    s = settings.model_copy(update={"experiment": {"name": "e1", "variants": {"A": 0.5, "B": 0.5}}})
    prefs = {"user_id": ZOE, "consent": {"email": True, "app": True}, "timezone": "UTC", "quiet_hours": None}
    crowd = [(f"c{i}", good(k, f"c{i}", f"sku-{k}")) for i in range(5) for k in range(6)]
    r = connections.redis_async(s)
    async with running_worker(s) as worker:
        await produce(s, s.topics.users, [(ZOE, prefs)])
        await produce(s, s.topics.events, crowd + [(ZOE, good(k, ZOE, f"sku-{k}")) for k in range(3)] + [
            (ZOE, {"event_id": "fb1", "user_id": ZOE, "type": "push_click", "ts": T0 + 9,
                     "context": {"campaign": "recs", "channel": "email", "variant": "A", "message_id": "m-1"}})])
        await wait_for(lambda: r.exists(f"{s.redis_prefix}recs:{ZOE}"), what="zoe's recs")
        parts = list(worker.core.parts.values())
        assert any(p.push.knows(ZOE) for p in parts) and any(p.experiments.knows_user(ZOE) for p in parts)
        t0 = time.monotonic()
        await produce(s, s.topics.events, [(ZOE, {"event_id": "bye", "user_id": ZOE, "type": "forget",
                                                     "ts": T0 + 10})])

        async def erased() -> bool:
            keys = [k async for k in r.scan_iter(match=f"{s.redis_prefix}*{ZOE}*", count=1000)]
            return not keys and not worker.engine.known_user(ZOE)

        await wait_for(erased, deadline_s=15, what="zoe erased from Redis and the model")
        took = time.monotonic() - t0
        state = {"engine": worker.engine, "partitions": [worker.core.partition_state(p) for p in worker.core.parts]}
    assert took < 5
    assert not worker.engine.known_user(ZOE) and worker.engine.profile(ZOE) is None
    assert not any(p.push.knows(ZOE) or p.experiments.knows_user(ZOE) or ZOE in p.users for p in parts)
    assert ZOE not in worker.core.prefs
    import pickle
    blob = pickle.dumps(state)
    assert ZOE.encode() not in blob  # not in any state store: model, snapshots (users, dedupe, push, experiments)
    await r.aclose()


async def test_bad_cooc_records_go_to_the_dlq_and_the_item_stage_goes_on(settings):
    """``cooc`` is internal, but a stray producer must not stop the item stage or the population learner."""
    bad = [  # (partition, headers, value, reason the DLQ gives)
        (1, [], b"\x00no headers", "bad cooc record: KeyError"),
        (1, [("source", b"0")], b"\x00not pair deltas", "bad cooc record: "),
        (0, [("source", b"0"), ("kind", b"population")], b"{not json", "bad cooc record: JSONDecodeError"),
        (0, [("source", b"0"), ("kind", b"population")], orjson.dumps({"trend": [[1, "sku-1", 0, "x", 1.0]]}),
         "bad cooc record: ValueError: trend entry 0"),
        (2, [("source", b"0"), ("kind", b"population")], orjson.dumps({"seg": []}),
         "bad cooc record: ValueError: population entries on cooc partition 2"),
    ]
    async with running_worker(settings) as worker:
        await produce(settings, settings.topics.items, [(it["item_id"], it) for it in CATALOG])
        producer = connections.producer(settings, acks="all")
        await producer.start()
        try:
            for partition, headers, value, _ in bad:
                await (await producer.send(settings.topics.cooc, value, partition=partition, headers=headers))
        finally:
            await producer.stop()
        dead = await read_topic(settings, settings.topics.dlq, until=lambda recs: len(recs) >= len(bad))
        # the stages go on: co-occurrence and trending from good events reach Redis
        await produce(settings, settings.topics.events,
                      [(u, good(2 * k + j, u, item)) for k, u in enumerate(("a", "b", "c"))
                       for j, item in enumerate(("sku-1", "sku-2"))])
        r = connections.redis_async(settings)
        try:
            await wait_for(lambda: r.get(f"{settings.redis_prefix}similar:sku-1"), what="ig:similar:sku-1")
            await wait_for(lambda: r.zrange(f"{settings.redis_prefix}trending", 0, -1), what="ig:trending")
        finally:
            await r.aclose()
        assert worker.items.core.applied > 0
    reasons = {m.value: dict(m.headers)["reason"].decode() for m in dead}
    for _, _, value, expected in bad:
        assert reasons[value].startswith(expected), (value, reasons[value])
    assert all(dict(m.headers)["source_topic"] == settings.topics.cooc.encode() for m in dead)
