"""An ``unsubscribe`` event turns the channel's consent off in the user's ``users`` record within seconds, and no
later push of the worker uses that channel, against the real Kafka and Redis."""
from __future__ import annotations

import time

import orjson

from infogap.stream import connections
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, read_topic, running_worker

T0 = 1_732_460_000.0  # 2024-11-24 14:53 UTC: outside quiet hours
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": f"c{i % 3}", "tags": [], "available": True}
           for i in range(8)]
BOTH = {"consent": {"email": True, "app": True}, "timezone": "UTC", "quiet_hours": None}


def view(n: int, user: str, item: str, t: float) -> tuple[str, dict]:
    return user, {"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": "view", "ts": t}


def pushes_of(records, user: str) -> list[dict]:
    return [orjson.loads(m.value) for m in records if m.key == user.encode()]


async def test_an_unsubscribe_turns_email_off_in_the_users_record_and_later_pushes_skip_email(settings):
    s = settings.model_copy(update={"neighbour_max_age_s": 0.0, "push_min_new_items": 1})
    await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
    await produce(s, s.topics.users, [(u, {"user_id": u, **BOTH}) for u in ("nina", "omar")])
    r = connections.redis_async(s)
    try:
        async with running_worker(s) as worker:
            # a crowd makes neighbour rows, so that nina's and omar's views have something to push
            await produce(s, s.topics.events, [view(k, f"crowd{u}", it["item_id"], T0 + k)
                                               for u in range(6) for k, it in enumerate(CATALOG)])

            async def rows() -> bool:
                raw = await r.get(f"{s.redis_prefix}similar:sku-0")
                return raw is not None and len(orjson.loads(raw)) >= 3

            await wait_for(rows, deadline_s=30, what="the crowd's neighbour rows in Redis")
            assert worker.core.prefs["nina"].consent == {"email": True, "app": True}
            unsubscribe = {"event_id": "unsub-m-1", "user_id": "nina", "type": "unsubscribe", "ts": T0 + 50,
                           "context": {"channel": "email", "campaign": "recs", "message_id": "m-1"}}
            sent_at = time.monotonic()
            await produce(s, s.topics.events, [("nina", unsubscribe)])

            def email_off(recs) -> bool:
                return any(m.key == b"nina" and m.value is not None
                           and orjson.loads(m.value)["consent"].get("email") is False for m in recs)

            users = await read_topic(s, s.topics.users, until=email_off, deadline_s=30)
            assert email_off(users), "no users record with nina's email consent off within 10 s"
            took = time.monotonic() - sent_at
            (record,) = [m for m in users if m.key == b"nina" and m.value is not None and email_off([m])]
            assert orjson.loads(record.value) == {"user_id": "nina", "consent": {"email": False, "app": True},
                                                  "timezone": "UTC", "quiet_hours": None}
            # the worker reads its own record back: the same preferences
            await wait_for(lambda: worker.core.prefs["nina"].consent == {"email": False, "app": True},
                           deadline_s=30, what="nina's preferences read back")
            # nina and omar (who did not unsubscribe) view the same item: omar gets email and app, nina app only
            await produce(s, s.topics.events, [view(1, "nina", "sku-0", T0 + 100), view(1, "omar", "sku-0", T0 + 100)])

            def both_pushed(recs) -> bool:
                return bool(pushes_of(recs, "nina")) and len(pushes_of(recs, "omar")) >= 2

            pushes = await read_topic(s, s.topics.push, until=both_pushed, deadline_s=30)
            assert both_pushed(pushes), "no pushes for nina and omar within 15 s"
            assert sorted(m["channel"] for m in pushes_of(pushes, "omar")) == ["app", "email"]
            assert [m["channel"] for m in pushes_of(pushes, "nina")] == ["app"]
            assert worker.stats.consent_withdrawn == 1
    finally:
        await r.aclose()
    assert took < 10
