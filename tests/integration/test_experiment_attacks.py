"""Experiments against a hostile producer and end to end, on the real Kafka and Redis.

* Feedback contexts cannot make experiment segments: 5,000 clicks with random campaigns, channels,
  variants (some with ``:`` and ``|``) and message ids leave exactly the experiment's ``exp`` hashes,
  while feedback on the pushes the worker sent is counted (the CTR ``infogap report`` shows).
* A variant's ranker settings (``INFOGAP_EXPERIMENT``'s ``"overrides"``) change that variant's
  recommendations in Redis, and only that variant's.
"""
from __future__ import annotations

import asyncio
import random

import orjson

from infogap.models.experiments import Experiment, summarize
from infogap.stream import connections
from infogap.stream.store.redis_node import RedisStore
from infogap.stream.store.keys import RedisKeys
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, read_topic, running_worker

T0 = 1_732_460_000.0  # 2024-11-24 14:53 UTC: outside quiet hours in UTC
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": "shoes" if i < 6 else "hats",
            "tags": [], "price": 10.0 + i, "available": True} for i in range(12)]
FRESH_ROWS = {"neighbour_max_age_s": 0.0, "publish_interval_s": 0.3}


def ev(eid: str, user: str, typ: str, t: float, item: str | None = "sku-1", **extra) -> dict:
    d = {"event_id": eid, "user_id": user, "type": typ, "ts": t, **extra}
    if item is not None:
        d["item_id"] = item
    return d


def users_of(exp: Experiment, variant: str, n: int, stem: str) -> list[str]:
    """``n`` user ids that ``exp`` assigns to ``variant``."""
    out, k = [], 0
    while len(out) < n:
        if exp.assign(f"{stem}{k}") == variant:
            out.append(f"{stem}{k}")
        k += 1
    return out


async def produce_many(settings, topic: str, records: list[tuple[str, dict]]) -> None:
    """Send every ``(key, value)`` and wait for all the acks at once (thousands in a second)."""
    producer = connections.producer(settings, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, orjson.dumps(v), key=k.encode()) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _exp_keys(r, settings) -> set[str]:
    return {k.decode() async for k in r.scan_iter(match=f"{settings.redis_prefix}exp*", count=1000)}


async def _has_neighbours(r, settings, item: str) -> bool:
    raw = await r.get(f"{settings.redis_prefix}similar:{item}")
    return raw is not None and bool(orjson.loads(raw))


def _crowd(t0: float) -> list[dict]:
    """Eight sessions viewing sku-1, sku-2, sku-3: they go together."""
    return [ev(f"c{u}-{i}", f"crowd{u}", "view", t0 + u * 10 + i, f"sku-{i}") for u in range(8) for i in (1, 2, 3)]


async def test_hostile_feedback_contexts_make_no_experiment_segments_and_real_feedback_counts(settings):
    spec = {"name": "exp-atk", "variants": {"A": 1, "B": 1}}
    settings = settings.model_copy(update={**FRESH_ROWS, "experiment": spec})
    exp = Experiment.from_spec(spec)
    legit = users_of(exp, "A", 3, "ya") + users_of(exp, "B", 3, "yb")
    prefs = [(u, {"user_id": u, "consent": {"email": True, "app": False, "ads": False}, "timezone": "UTC",
                  "quiet_hours": [22, 8]}) for u in legit]
    r = connections.redis_async(settings)
    keys = RedisKeys(settings.redis_prefix)
    try:
        async with running_worker(settings) as worker:
            await produce(settings, settings.topics.items, [(it["item_id"], it) for it in CATALOG])
            await produce(settings, settings.topics.users, prefs)
            await produce_many(settings, settings.topics.events, [(e["user_id"], e) for e in _crowd(T0)])
            await wait_for(lambda: _has_neighbours(r, settings, "sku-1"), what="the crowd's rows in Redis")
            await produce_many(settings, settings.topics.events,
                               [(u, ev(f"{u}-1", u, "view", T0 + 200, "sku-1")) for u in legit])
            msgs = await read_topic(settings, settings.topics.push, deadline_s=30,
                                    until=lambda recs: {m.key.decode() for m in recs} >= set(legit))
            pushes = [orjson.loads(m.value) for m in msgs]
            assert sorted(p["user_id"] for p in pushes) == sorted(legit)
            assert {p["variant"] for p in pushes} == {"A", "B"} and {p["campaign"] for p in pushes} == {"recs"}

            # the attack: clicks with contexts of every shape, none of a sent message
            rng = random.Random(8)

            def word(n: int = 8) -> str:
                return "".join(rng.choice("abcxyz:|%*019") for _ in range(n))

            hostile = []
            for k in range(5_000):
                ctx = {"campaign": "c-" + word(), "channel": word(5), "variant": word(4), "message_id": "m-" + word(12)}
                if k % 10 == 0:  # the push campaign, with variants the experiment does not have
                    ctx.update(campaign="recs", variant=rng.choice(["A:B", "B|x", "a", "C", "A%3A"]), channel="email")
                user = f"h{k % 200}"
                hostile.append((user, ev(f"h-{k}", user, "click", T0 + 300 + k * 0.01, f"sku-{k % 12}", context=ctx)))
            # ...and the users' real feedback on the messages they were sent, as the channel workers report it
            real = [(p["user_id"], ev(f"{p['user_id']}-click", p["user_id"], "push_click", T0 + 400, None,
                                      context={k: p[k] for k in ("message_id", "campaign", "channel", "variant")}))
                    for p in pushes]
            await produce_many(settings, settings.topics.events, hostile + real)
            total = len(_crowd(T0)) + len(legit) + len(hostile) + len(real)
            await wait_for(lambda: worker.stats.events_in >= total, deadline_s=60, what="every event processed")
            store = RedisStore(r, keys, 60)

            async def clicks() -> int:  # of the experiment's own variants' hashes
                return sum(c.clicks for c in (await store.read_experiment("exp-atk", ["A", "B"])).values())

            await wait_for(lambda: _equals(clicks(), len(pushes)), deadline_s=30, what="the real clicks in Redis")
            exp_keys = await _exp_keys(r, settings)
            assert exp_keys == {keys.experiment("exp-atk", "A"), keys.experiment("exp-atk", "B")}, len(exp_keys)
            unattributed = sum(p.experiments.unattributed for p in worker.core.parts.values())
            overflow = sum(p.experiments.overflow for p in worker.core.parts.values())
            remembered = sum(len(p.experiments) for p in worker.core.parts.values())
            segments = sum(len(p.experiments.counts()) for p in worker.core.parts.values())

        stored = await RedisStore(r, keys, 60).read_experiment("exp-atk")
        assert {(s.campaign, s.channel, s.variant) for s in stored} <= {("recs", "email", "A"), ("recs", "email", "B")}
        for variant in ("A", "B"):
            fields = await r.hlen(keys.experiment("exp-atk", variant))
            assert fields <= 6 * 8, fields  # at most a shard's 8 counts per partition: one campaign, one channel
        # what `infogap report` shows: every message sent and clicked once, nothing from the attack
        figures = summarize(stored, by=("variant",))
        for variant in ("A", "B"):
            f = figures[(variant,)]
            assert (f.sent, f.clicks, f.ctr) == (3, 3, 1.0), (variant, f)
        assert unattributed >= len(hostile) and overflow == 0  # counted, visible on the metrics objects
        assert worker.stats.experiment_unattributed >= len(hostile)  # and on /stats and /metrics
        assert remembered == len(pushes) and segments <= 2 * 6  # state holds the sends, not the forged ids
    finally:
        await r.aclose()


async def _equals(awaitable, want) -> bool:
    return await awaitable == want


async def test_a_variants_ranker_settings_change_its_recommendations_and_only_its(settings):
    trend_only = {"w_cooc": 0.0, "w_global": 1.0, "w_segment": 0.0, "w_content": 0.0,
                  "max_category_share": 1.0, "new_item_slots": 0}
    spec = {"name": "exp-ov", "variants": {"A": 1, "B": 1}, "overrides": {"B": trend_only}}
    settings = settings.model_copy(update={**FRESH_ROWS, "experiment": spec, "push_enabled": False})
    exp = Experiment.from_spec(spec)
    a_users, b_users = users_of(exp, "A", 2, "ua"), users_of(exp, "B", 2, "ub")
    # global trending, planted: sku-8 > sku-9 > sku-10 > sku-11 (one-view users: no pairs)
    viewers = {"sku-8": 30, "sku-9": 25, "sku-10": 20, "sku-11": 15}
    background = [ev(f"bg-{i}-{v}", f"bg-{i}-{v}", "view", T0 + 100 + k * 0.1, i)
                  for k, (i, n) in enumerate(viewers.items()) for v in range(n)]
    r = connections.redis_async(settings)
    try:
        async with running_worker(settings) as worker:
            await produce(settings, settings.topics.items, [(it["item_id"], it) for it in CATALOG])
            await produce_many(settings, settings.topics.events,
                               [(e["user_id"], e) for e in _crowd(T0) + background])
            await wait_for(lambda: _has_neighbours(r, settings, "sku-1"), what="the crowd's rows in Redis")
            # the user stage ranks with the population learner's trending once it has loaded it
            await wait_for(lambda: [i for i, _ in worker.engine.trending(4)] == list(viewers), deadline_s=30,
                           what="the planted trending loaded by the user stage")
            await produce_many(settings, settings.topics.events,
                               [(u, ev(f"{u}-1", u, "view", T0 + 500, "sku-1")) for u in a_users + b_users])

            async def recs(u: str) -> list[str] | None:
                raw = await r.get(keys.recs(u))
                return None if raw is None else [i["item_id"] for i in orjson.loads(raw)["items"]]

            keys = RedisKeys(settings.redis_prefix)
            await wait_for(lambda: _all_written(recs, a_users + b_users), what="the four users' recs in Redis")
            got = {u: await recs(u) for u in a_users + b_users}
        for u in a_users:  # A ranks with the defaults: the co-occurrence of sku-1 first
            assert set(got[u][:2]) == {"sku-2", "sku-3"}, got
        for u in b_users:  # B's settings: trending only, in its planted order
            assert got[u][:4] == list(viewers), got
            assert got[u] != got[a_users[0]]
    finally:
        await r.aclose()


async def _all_written(recs, users) -> bool:
    return all([await recs(u) for u in users])


async def test_names_with_the_stores_separators_read_back_exactly(settings):
    from infogap.models.experiments import Counts, Segment

    counts = {Segment(0, "c|1:2", "e:m|x", "v:1|%3A"): Counts(sent=2, clicks=1),
              Segment(1, "recs", "email", "B"): Counts(sent=1)}
    r = connections.redis_async(settings)
    try:
        store = RedisStore(r, RedisKeys(settings.redis_prefix), 60)
        await store.write_experiment("exp:one", counts)
        assert await store.experiments() == {"exp:one": ["B", "v:1|%3A"]}
        assert await store.read_experiment("exp:one") == counts
    finally:
        await r.aclose()
