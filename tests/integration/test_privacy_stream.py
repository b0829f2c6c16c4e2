"""The privacy floor through a real worker, Kafka and Redis (the stream's other tests turn it off).

Six people buy a tea and a cup (a pair of six distinct users); one person, alone, views a lamp and a rug six
times (a pair of one user, of larger support than any). With the floor at 5, what app backends read from Redis
never shows the lone pair: not in ``ig:similar``, not cited in anyone's ``ig:recs`` reasons, not in ``ig:trending``.
The internal rows the user stages rank with (``ig:nbrow``) hold it only marked private, or, under
``floor_votes``, not at all (and then nobody is recommended the rug because of the lamp).
"""
from __future__ import annotations

import orjson
import pytest

from infogap.stream import connections
from infogap.stream.core.neighbour_rows import decode_row
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, running_worker
from tests.unit.test_privacy import _distinct_users

T0 = 1_732_460_000.0
ITEMS = [("tea", "Green tea"), ("cup", "Tea cup"), ("lamp", "Desk lamp"), ("rug", "Wool rug")]


def _events() -> list[dict]:
    evs = []
    for n, u in enumerate(_distinct_users(6, "crowd")):
        evs += [{"event_id": f"c{n}-{i}", "user_id": u, "type": "purchase", "item_id": item, "ts": T0 + 10 * n + i}
                for i, item in enumerate(("tea", "cup"))]
    evs += [{"event_id": f"l{j}", "user_id": "loner", "type": "view", "item_id": "lamp" if j % 2 == 0 else "rug",
             "ts": T0 + 100 + j} for j in range(12)]
    return evs


#: then, once the rows are published: alice views the lamp, bob the tea
LATER = [{"event_id": "a1", "user_id": "alice", "type": "view", "item_id": "lamp", "ts": T0 + 200},
         {"event_id": "b1", "user_id": "bob", "type": "view", "item_id": "tea", "ts": T0 + 200}]


@pytest.mark.parametrize("floor_votes", [False, True], ids=["votes-unfloored", "floor-votes"])
async def test_a_pair_one_person_made_never_reaches_what_app_backends_read(settings, floor_votes):
    settings = settings.model_copy(update={"engine": {"min_users": 5, "floor_votes": floor_votes},
                                           "neighbour_max_age_s": 0.0, "publish_interval_s": 0.2,
                                           "push_enabled": False})
    r = connections.redis_async(settings)
    p = settings.redis_prefix
    try:
        async with running_worker(settings) as worker:
            await produce(settings, settings.topics.items,
                          [(i, {"item_id": i, "title": t, "category": "Home"}) for i, t in ITEMS])
            events = _events()
            await produce(settings, settings.topics.events, [(e["user_id"], e) for e in events])
            await wait_for(lambda: worker.stats.events_in >= len(events), deadline_s=60, what="the events processed")

            async def similar(item: str) -> list[str]:
                raw = await r.get(f"{p}similar:{item}")
                return [n["item_id"] for n in orjson.loads(raw)] if raw else []

            await wait_for(lambda: similar("tea"), deadline_s=30, what="tea's neighbours published")
            assert await similar("tea") == ["cup"]  # six users: published

            async def lamp_row():
                raw = (await worker.store.read_rows(["lamp"]))[0]
                return decode_row(raw) if raw is not None else None
            # the lamp's row as the user stages read it: the rug in it marked private, or absent under floor_votes
            row = await wait_for(lamp_row, deadline_s=30, what="the lamp's row")
            neighbours = list(row["neighbours"])
            if floor_votes:
                assert "rug" not in neighbours
            else:
                assert neighbours.index("rug") in row["private"].tolist()
            await produce(settings, settings.topics.events, [(e["user_id"], e) for e in LATER])
            await wait_for(lambda: r.get(f"{p}recs:alice"), deadline_s=30, what="alice's recommendations")
            await wait_for(lambda: r.get(f"{p}recs:bob"), deadline_s=30, what="bob's recommendations")
            await wait_for(lambda: worker.store.trending(None, 20), deadline_s=30, what="the trending list")

            assert await similar("lamp") == [] and await similar("rug") == []  # one person: never published
            alice = orjson.loads(await r.get(f"{p}recs:alice"))["items"]
            assert not [x for x in alice if "Desk lamp" in x["reason"] or "once (lift" in x["reason"]], alice
            if floor_votes:
                assert "rug" not in [x["item_id"] for x in alice]
            bob = orjson.loads(await r.get(f"{p}recs:bob"))["items"]
            assert bob[0]["item_id"] == "cup" and "Green tea 6 times" in bob[0]["reason"], bob
            trending = [i for i, _ in await worker.store.trending(None, 20)]
            assert not {"lamp", "rug"} & set(trending), trending  # one person: not trending
    finally:
        await r.aclose()
