"""The global control group against the real Kafka and Redis: a control user's recommendations are written but no
push goes out (the decision log says ``control_group``), both arms' cohorts land in ``ig:ret:*``, ``infogap
report`` prints them, and a ``forget`` takes the user out of them."""
from __future__ import annotations

import asyncio
import re


from infogap.models.retention import ControlGroup
from infogap.stream import connections
from infogap.stream.store import open_store
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, read_topic, running_worker
from tests.unit.test_console_pages import _client as console_client

T0 = 1_732_460_000.0  # 2024-11-24 14:53 UTC: outside quiet hours
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": f"c{i % 3}", "tags": [], "available": True}
           for i in range(8)]
PREFS = {"consent": {"email": True}, "timezone": "UTC", "quiet_hours": None}


def view(n: int, user: str, item: str, t: float) -> tuple[str, dict]:
    return user, {"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": "view", "ts": t}


async def test_a_control_user_is_ghost_pushed_and_both_arms_reach_redis_the_report_and_the_console(settings, monkeypatch):
    from typer.testing import CliRunner

    from infogap.stream.tools.cli import app

    s = settings.model_copy(update={"neighbour_max_age_s": 0.0, "control_share": 0.5})
    group = ControlGroup(0.5)
    ctl, trt = "u3", "u1"
    assert group.is_control(ctl) and not group.is_control(trt)
    await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
    await produce(s, s.topics.users, [(u, {"user_id": u, **PREFS}) for u in (ctl, trt)])
    store = open_store(s)
    r = connections.redis_async(s)
    try:
        async with running_worker(s):
            await produce(s, s.topics.events, [view(k, f"crowd{u}", it["item_id"], T0 + k)
                                               for u in range(6) for k, it in enumerate(CATALOG)])
            await wait_for(lambda: r.exists(f"{s.redis_prefix}similar:sku-0"), deadline_s=30, what="neighbour rows")
            await produce(s, s.topics.events, [view(1, ctl, "sku-0", T0 + 100), view(1, trt, "sku-0", T0 + 100)])

            async def both_arms() -> bool:
                got = await store.read_retention("recs")
                return {k.arm for k in got} == {"treated", "control"}

            await wait_for(both_arms, deadline_s=30, what="both arms' cohorts in Redis")
            pushes = await read_topic(s, s.topics.push, until=lambda recs: len(recs) >= 1, deadline_s=30)
            assert [m.key for m in pushes] == [trt.encode()]
            assert await r.exists(f"{s.redis_prefix}recs:{ctl}")  # the app still reads their recommendations
            assert (await store.decisions(ctl))[-1]["rule"] == "control_group"

            monkeypatch.setenv("INFOGAP_REDIS_URL", s.redis_url)
            monkeypatch.setenv("INFOGAP_REDIS_PREFIX", s.redis_prefix)
            monkeypatch.setenv("COLUMNS", "100")
            res = await asyncio.to_thread(CliRunner().invoke, app, ["report", "--experiment", "recs"])
            assert res.exit_code == 0, res.output
            assert "recs: retention, treated vs control" in res.output and "…" not in res.output
            assert "none recs email" in res.output and "control" in res.output
            # one user an arm: the privacy floor shows no rate (a figure like "100.0%")
            assert "< 5 users" in res.output and not re.search(r"\d%", res.output), res.output
            # the console's experiments page, from this Redis, with the default privacy floor (the fixture's is off)
            client = await console_client(s.model_copy(update={"engine": {}}), store)
            try:
                html = await (await client.get("/experiments")).text()
            finally:
                await client.close()
            assert "recs: retention, treated vs control" in html and "&lt; 5 users" in html

            await produce(s, s.topics.events, [(ctl, {"event_id": "f1", "user_id": ctl, "type": "forget",
                                                      "ts": T0 + 200})])

            async def control_gone() -> bool:
                return {k.arm for k in await store.read_retention("recs")} == {"treated"}

            await wait_for(control_gone, deadline_s=15, what="the erased control user out of the cohorts")
            raw = await r.hgetall(store.keys.retention("recs"))
            entered = {k.decode(): int(v) for k, v in raw.items() if k.endswith(b"|entered")}
            assert sorted(entered.values()) == [0, 1], entered  # the control cohort written as zeros
    finally:
        await store.close()
        await r.aclose()
