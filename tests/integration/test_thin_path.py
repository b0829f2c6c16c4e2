"""A click goes into Kafka and comes out as recommendations in Redis and a message on `push`."""
from __future__ import annotations

import orjson
from infogap.stream import connections

from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, read_topic, running_worker

T0 = 1_732_460_000.0  # 2024-11-24 14:53 UTC: outside quiet hours in UTC
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": "shoes" if i < 6 else "hats",
            "tags": [], "price": 10.0 + i, "available": True} for i in range(12)]


def ev(n: int, user: str, item: str, t: float, typ: str = "click", **extra) -> dict:
    return {"event_id": f"e-{user}-{n}", "user_id": user, "item_id": item, "type": typ, "ts": t, **extra}


async def _redis(settings):
    return connections.redis_async(settings)


async def _has_neighbours(r, settings, item: str) -> bool:
    raw = await r.get(f"{settings.redis_prefix}similar:{item}")
    return raw is not None and bool(orjson.loads(raw))


#: A user stage ranks with neighbour rows at most neighbour_max_age_s old (plus the item stage's publish
#: interval). These tests produce a user's event right after the crowd's rows are in Redis, so the
#: worker re-reads rows at every batch instead of serving what it cached while the crowd came in.
FRESH_ROWS = {"neighbour_max_age_s": 0.0}


async def test_event_on_topic_shows_up_as_recommendations_in_redis(settings):
    settings = settings.model_copy(update=FRESH_ROWS)
    # other users build co-occurrence: sku-1 goes with sku-2 and sku-3
    history = [ev(i, f"crowd{i}", item, T0 + i) for i in range(8) for item in ("sku-1", "sku-2", "sku-3")]
    history = [dict(e, event_id=f"{e['event_id']}-{e['item_id']}") for e in history]
    r = await _redis(settings)
    async with running_worker(settings):
        await produce(settings, settings.topics.items, [(it["item_id"], it) for it in CATALOG])
        await produce(settings, settings.topics.events, [(e["user_id"], e) for e in history])
        # the item stage publishes the crowd's rows at most every publish_interval_s: alice comes after
        await wait_for(lambda: _has_neighbours(r, settings, "sku-1"), what="the crowd's rows in Redis")
        await produce(settings, settings.topics.events, [("alice", ev(1, "alice", "sku-1", T0 + 100))])
        raw = await wait_for(lambda: r.get(f"{settings.redis_prefix}recs:alice"), deadline_s=20,
                             what="ig:recs:alice in Redis")
    doc = orjson.loads(raw)
    assert doc["user_id"] == "alice"
    assert doc["model_version"] == settings.model_version
    assert doc["generated_at"] > T0
    items = [i["item_id"] for i in doc["items"]]
    assert items[:2] == ["sku-2", "sku-3"] or items[:2] == ["sku-3", "sku-2"], doc
    assert "sku-1" not in items[:2]
    assert all(i["reason"] and isinstance(i["score"], float) for i in doc["items"])
    assert 0 < await r.ttl(f"{settings.redis_prefix}recs:alice") <= settings.recs_ttl_s
    await r.aclose()


async def test_consenting_user_gets_a_push_and_non_consenting_user_does_not(settings):
    settings = settings.model_copy(update=FRESH_ROWS)
    users = [("yes", {"user_id": "yes", "consent": {"email": True, "app": False, "ads": False},
                      "timezone": "UTC", "quiet_hours": [22, 8]}),
             ("no", {"user_id": "no", "consent": {"email": False, "app": False, "ads": False},
                     "timezone": "UTC", "quiet_hours": [22, 8]})]
    crowd = [dict(ev(i, f"c{i}", f"sku-{k}", T0 + i), event_id=f"c{i}-{k}") for i in range(6) for k in range(8)]
    r = await _redis(settings)
    async with running_worker(settings):
        await produce(settings, settings.topics.items, [(it["item_id"], it) for it in CATALOG])
        await produce(settings, settings.topics.users, users)
        await produce(settings, settings.topics.events, [(e["user_id"], e) for e in crowd])
        await wait_for(lambda: _has_neighbours(r, settings, "sku-0"), what="the crowd's rows in Redis")
        await produce(settings, settings.topics.events,
                      [("yes", ev(1, "yes", "sku-0", T0 + 50)), ("no", ev(1, "no", "sku-0", T0 + 50))])
        await wait_for(lambda: r.exists(f"{settings.redis_prefix}recs:no"), what="recs for 'no'")
        msgs = await read_topic(settings, settings.topics.push,
                                until=lambda recs: any(m.key == b"yes" for m in recs), deadline_s=20)
    pushes = [orjson.loads(m.value) for m in msgs]
    mine = [p for p in pushes if p["user_id"] == "yes"]
    assert len(mine) == 1, pushes
    assert mine[0]["channel"] == "email"
    assert mine[0]["items"] and all(i["item_id"] != "sku-0" for i in mine[0]["items"])
    titles = {it["item_id"]: it["title"] for it in CATALOG}  # what the person reading it sees
    assert all(i["title"] == titles[i["item_id"]] for i in mine[0]["items"])
    assert mine[0]["reason"].startswith(f"new picks for you: {titles[mine[0]['items'][0]['item_id']]}")
    assert mine[0]["expires_at"] > mine[0]["created_at"]
    assert not [p for p in pushes if p["user_id"] == "no"]
    await r.aclose()


async def test_bad_records_go_to_the_dlq_with_reasons_and_good_ones_around_them_are_processed(settings):
    oversize = orjson.dumps(dict(ev(9, "bob", "sku-1", T0), padding="x" * (settings.max_event_bytes + 10)))
    records = [
        ("g1", ev(1, "g1", "sku-1", T0)),
        ("bad", b'{"event_id": "x1", "user_id": '),  # malformed JSON
        ("g2", ev(1, "g2", "sku-2", T0)),
        ("bad", orjson.dumps({"event_id": "x2", "user_id": "bad", "item_id": "sku-1", "ts": T0})),  # no type
        ("bad", orjson.dumps({"event_id": "x3", "user_id": "bad", "item_id": "sku-1", "type": "view",
                              "ts": "yesterday"})),  # wrong type of ts
        ("bob", oversize),
        ("g3", ev(1, "g3", "sku-3", T0)),
    ]
    r = await _redis(settings)
    async with running_worker(settings) as worker:
        await produce(settings, settings.topics.events, records)
        for user in ("g1", "g2", "g3"):
            await wait_for(lambda: r.exists(f"{settings.redis_prefix}recs:{user}"), what=f"recs for {user}")
        dead = await read_topic(settings, settings.topics.dlq, until=lambda recs: len(recs) >= 4)
        await wait_for(lambda: worker.stats.events_in >= len(records), what="the batch to end")
        assert worker.stats.events_ok == 3
    assert len(dead) == 4
    by_value = {m.value: m for m in dead}  # different keys land on different partitions: no global order
    expected = {
        records[1][1]: "not valid JSON",
        records[3][1]: "missing required field 'type'",
        records[4][1]: "field 'ts' 'yesterday' is not ISO-8601",
        oversize: f"payload is {len(oversize)} bytes, over the limit of {settings.max_event_bytes} bytes",
    }
    assert set(by_value) == set(expected)  # the raw bytes, untouched
    for raw, reason in expected.items():
        headers = dict(by_value[raw].headers)
        assert headers["reason"].decode().startswith(reason), headers
        assert headers["source_topic"] == settings.topics.events.encode()
    assert not await r.exists(f"{settings.redis_prefix}recs:bad", f"{settings.redis_prefix}recs:bob")
    await r.aclose()


async def test_a_duplicate_event_id_is_counted_once(settings):
    e = ev(1, "dup", "sku-1", T0)
    async with running_worker(settings) as worker:
        await produce(settings, settings.topics.events, [("dup", e), ("dup", e), ("dup", ev(2, "dup", "sku-2", T0 + 1))])
        await wait_for(lambda: worker.stats.events_in >= 3, what="3 records consumed")
    assert worker.stats.duplicates == 1
    assert worker.stats.events_ok == 2
    assert worker.engine.known_user("dup")


async def test_users_tombstone_and_forget_event_erase_the_user_from_redis_and_state(settings):
    r = await _redis(settings)
    async with running_worker(settings) as worker:
        await produce(settings, settings.topics.users, [("ann", {"user_id": "ann", "consent": {"app": True}}),
                                                        ("ben", {"user_id": "ben", "consent": {"app": True}})])
        await produce(settings, settings.topics.events, [("ann", ev(1, "ann", "sku-1", T0)),
                                                         ("ben", ev(1, "ben", "sku-1", T0))])
        for u in ("ann", "ben"):
            await wait_for(lambda: r.exists(f"{settings.redis_prefix}recs:{u}"), what=f"recs for {u}")
        await produce(settings, settings.topics.users, [("ann", None)])
        await produce(settings, settings.topics.events,
                      [("ben", {"event_id": "f1", "user_id": "ben", "type": "forget", "ts": T0 + 5})])
        for u in ("ann", "ben"):
            await wait_for(lambda: not worker.engine.known_user(u), deadline_s=15, what=f"{u} forgotten")
            keys = [f"{settings.redis_prefix}recs:{u}", f"{settings.redis_prefix}segment:{u}"]

            async def gone():
                return await r.exists(*keys) == 0

            await wait_for(gone, deadline_s=15, what=f"{u}'s keys deleted")
        assert "ann" not in worker.core.prefs and "ben" not in worker.core.prefs
        assert not any(p.push.knows("ann") or p.push.knows("ben") for p in worker.core.parts.values())
    await r.aclose()
