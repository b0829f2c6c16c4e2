"""Redis lost its data (restarted without persistence, flushed): the workers write every key again from their
state within seconds, without a new event, and never an erased user's."""
from __future__ import annotations

import time

import orjson
from prometheus_client import CollectorRegistry, generate_latest

from infogap.stream import connections
from infogap.stream.observability import StatsCollector
from infogap.stream.store.keys import RedisKeys
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, running_worker

T0 = 1_732_460_000.0
N_USERS, N_ITEMS = 50, 24
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": ("shoes", "hats", "bags")[i % 3],
            "tags": [], "price": 10.0 + i, "available": True} for i in range(N_ITEMS)]
GONE = "u-gone"  # erased before the loss: never written again


def _events() -> list[dict]:
    out = []
    for u in range(N_USERS):
        user = f"u{u}"
        for k in range(4):  # overlapping baskets: co-occurrence rows for every item
            item = f"sku-{(u + 5 * k) % N_ITEMS}"
            out.append({"event_id": f"{user}-{k}", "user_id": user, "item_id": item, "type": "click",
                        "ts": T0 + u + k})
        if u % 5 == 0:  # feedback for the push campaign: experiment counters
            out.append({"event_id": f"{user}-imp", "user_id": user, "item_id": "sku-0", "type": "impression",
                        "ts": T0 + u + 5, "context": {"channel": "email", "campaign": "recs", "variant": "none"}})
    out += [{"event_id": f"{GONE}-{k}", "user_id": GONE, "item_id": f"sku-{k}", "type": "click", "ts": T0 + k}
            for k in range(3)]
    out.append({"event_id": f"{GONE}-bye", "user_id": GONE, "type": "forget", "ts": T0 + 10})
    return out


async def _keys(r, prefix: str) -> set[str]:
    return {k.decode() async for k in r.scan_iter(match=f"{prefix}*", count=1000)}


async def _delete_all(r, prefix: str) -> int:
    """What a Redis restart without persistence does to this test's keys (FLUSHALL would hit other tests)."""
    keys = list(await _keys(r, prefix))
    for i in range(0, len(keys), 500):
        await r.delete(*keys[i: i + 500])
    return len(keys)


def _recs(raw: bytes) -> list[str]:
    return [i["item_id"] for i in orjson.loads(raw)["items"]]


async def test_every_key_is_written_again_from_state_after_redis_lost_its_data(settings):
    s = settings.model_copy(update={"redis_check_interval_s": 0.5})
    k = RedisKeys(s.redis_prefix)
    users = [f"u{u}" for u in range(N_USERS)]
    r = connections.redis_async(s)
    try:
        async with running_worker(s) as worker:
            await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
            events = _events()
            await produce(s, s.topics.events, [(e["user_id"], e) for e in events])

            seen: list = []

            async def settled() -> set[str] | None:
                """Every key the worker writes for these events is in Redis, and stayed so for a second with
                nothing new applied by the item stage (its cooc records all in) and nothing left to publish."""
                found = await _keys(r, s.redis_prefix)
                wanted = {k.recs(u) for u in users} | {k.similar(f"sku-{i}") for i in range(N_ITEMS)}
                wanted |= {k.neighbour_row(f"sku-{i}") for i in range(N_ITEMS)} | {k.trending(), k.segment_model()}
                exp = any(key.startswith(f"{s.redis_prefix}exp:") for key in found)
                state = (found, worker.items.core.applied, worker.items.core.population.applied)
                if not (worker.stats.events_in == len(events) and wanted <= found and exp
                        and worker.items.core.dirty == {}) or not seen or seen[0][0] != state:
                    seen[:] = [(state, time.monotonic())]
                    return None
                return found if time.monotonic() - seen[0][1] > 1.0 else None

            before = await wait_for(settled, deadline_s=30, what="every user's, item's and experiment's keys")
            assert k.recs(GONE) not in before and k.segment(GONE) not in before
            similar = await r.mget([k.similar(f"sku-{i}") for i in range(N_ITEMS)])
            exp_keys = sorted(key for key in before if key.startswith(f"{s.redis_prefix}exp:"))
            exp = [await r.hgetall(key) for key in exp_keys]
            trending = await r.zrange(k.trending(), 0, -1, withscores=True)
            assert trending and worker.stats.redis_rematerialisations == 0

            assert await _delete_all(r, s.redis_prefix) == len(before)
            in_before = worker.stats.events_in
            # no new event: everything comes back from the worker's state
            after = await wait_for(lambda: _back(r, s.redis_prefix, before), deadline_s=30,
                                   what="every key written again after Redis lost its data")
            assert worker.stats.events_in == in_before
            assert k.recs(GONE) not in after and k.segment(GONE) not in after  # erasure wins
            # each user's current recommendations (a batch's were ranked with the rows of its time)
            current = {u: [i for i, _s, _r in worker.engine.recommend(u, n=s.top_n)] for u in users}
            assert {u: _recs(raw) for u, raw in zip(users, await r.mget([k.recs(u) for u in users]))} == current
            assert all(current.values())
            assert await r.mget([k.similar(f"sku-{i}") for i in range(N_ITEMS)]) == similar
            assert [await r.hgetall(key) for key in exp_keys] == exp
            assert await r.zrange(k.trending(), 0, -1, withscores=True) == trending
            assert 0 < await r.ttl(k.recs("u0")) <= s.recs_ttl_s

            await wait_for(lambda: worker.stats.redis_rematerialise_pending == 0, deadline_s=30,
                           what="nothing left to write again")
            st = worker.stats
            assert st.redis_rematerialisations == 1
            assert st.redis_keys_rematerialised >= len(before) - 1 - sum(  # (the generation marker is not counted)
                key.startswith(f"{s.redis_prefix}nbrow-published:") for key in before)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(StatsCollector(st))
            metrics = generate_latest(registry).decode()
            assert "infogap_redis_rematerialisations_total 1.0" in metrics
            assert f"infogap_redis_keys_rematerialised_total {float(st.redis_keys_rematerialised)}" in metrics
            assert "infogap_redis_rematerialise_pending 0.0" in metrics
    finally:
        await r.aclose()


async def _back(r, prefix: str, before: set[str]) -> set[str] | None:
    found = await _keys(r, prefix)
    return found if before <= found else None


async def test_a_worker_started_on_an_emptied_redis_writes_its_restored_state_again(settings):
    """Redis lost its data while no worker ran: the next worker finds no generation marker, and what it
    restores from snapshots (recommendations, neighbour rows, trending) goes to Redis again at once."""
    s = settings.model_copy(update={"redis_check_interval_s": 0.5, "snapshot_interval_s": 0.3})
    k = RedisKeys(s.redis_prefix)
    users = [f"u{u}" for u in range(N_USERS)]
    r = connections.redis_async(s)
    try:
        async with running_worker(s) as worker:
            await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
            events = _events()
            await produce(s, s.topics.events, [(e["user_id"], e) for e in events])
            await wait_for(lambda: worker.stats.events_in == len(events), what="every event read")

            async def all_written() -> bool:
                found = await _keys(r, s.redis_prefix)
                return {k.recs(u) for u in users} | {k.similar("sku-1"), k.trending()} <= found

            await wait_for(all_written, what="the keys written")
        before = await _keys(r, s.redis_prefix)
        assert await _delete_all(r, s.redis_prefix) == len(before)
        async with running_worker(s) as again:
            async def back() -> bool:
                found = await _keys(r, s.redis_prefix)
                return {k.recs(u) for u in users} <= found and {k.similar(f"sku-{i}") for i in range(N_ITEMS)
                                                                 if k.similar(f"sku-{i}") in before} <= found
            await wait_for(back, deadline_s=30, what="the restored state's keys written again")
            assert again.stats.events_in == 0  # nothing replayed: written from the snapshots' state
            assert k.recs(GONE) not in await _keys(r, s.redis_prefix)
    finally:
        await r.aclose()
