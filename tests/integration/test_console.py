"""The console in headless Chromium, against a running worker fed with known events (real Kafka and Redis).

Every route is opened as a person would open it, and what they would read is asserted: a user's recommendations
with their reasons and a push held back with its rule, the planted pair's lift on the item page, a segment's
size, an experiment's interval, a dead letter's reason, the overview's numbers moving while events flow, an
item titled ``<script>alert(1)</script>`` shown as text, and an erased user gone from every page.

``INFOGAP_SCREENSHOTS=docs/console pytest tests/integration/test_console.py`` saves the pages' screenshots.
"""
from __future__ import annotations

import asyncio
import re

import orjson
import pytest

from infogap.stream.console.app import run_console
from tests.conftest import wait_for
from tests.integration.browser import Browser
from tests.integration.kafka_helpers import free_port, produce, running_worker
from tests.integration.test_experiment_attacks import produce_many

T0 = 1_732_460_000.0  # 2024-11-24 14:53 UTC
XSS_TITLE = "<script>alert(1)</script>"
CATALOG = ([{"item_id": f"i{k}", "title": f"Item {k}", "category": ["Books", "Games", "Tea"][k % 3], "price": 5.0 + k}
            for k in range(30)]
           + [{"item_id": "pa", "title": "Paper lantern", "category": "Home", "price": 12.0},
              {"item_id": "pb", "title": "Bamboo stand", "category": "Home", "price": 8.0},
              {"item_id": "xss", "title": XSS_TITLE, "category": "<img src=x onerror=alert(2)>", "price": 1.0}])


def ev(n: int, user: str, item: str | None, t: float, typ: str = "view", **extra) -> dict:
    return {"event_id": f"e-{user}-{n}", "user_id": user, "item_id": item, "type": typ, "ts": t, **extra}


def crowd(start: int = 0, users: int = 40) -> list[dict]:
    """Users of three tastes; every fourth also views the planted pair pa + pb (and nothing else goes with it)."""
    out = []
    for u in range(start, start + users):
        user = f"c{u}"
        for k in range(6):
            out.append(ev(k, user, f"i{(u % 3) + 3 * ((u + k) % 10)}", T0 + 10 * u + k))
        if u % 4 == 0:
            out += [ev(10, user, "pa", T0 + 10 * u + 7), ev(11, user, "pb", T0 + 10 * u + 8)]
    return out


@pytest.fixture
async def console(settings):
    """A worker (its HTTP server on loopback) and the console reading it; yields (settings, worker, console URL)."""
    s = settings.model_copy(update={
        "http_port": free_port(), "http_host": "127.0.0.1", "console_port": free_port(), "console_refresh_s": 0.5,
        "neighbour_max_age_s": 0.0, "publish_interval_s": 0.3, "push_min_new_items": 1,
        "experiment": {"name": "exp1", "variants": {"A": 1, "B": 1}},
        "engine": {"min_users": 1}})  # a handful of users: below the privacy floor every cell would read "< 5 users"
    s = s.model_copy(update={"console_workers": [f"http://127.0.0.1:{s.http_port}"]})
    async with running_worker(s) as worker:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_console(s, ready, stop))
        await asyncio.wait_for(ready.wait(), 30)
        try:
            yield s, worker, f"http://127.0.0.1:{s.console_port}"
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def browser():
    b = await asyncio.to_thread(Browser)
    try:
        yield b
    finally:
        await b.close()


async def test_every_page_shows_what_the_stream_knows_in_a_real_browser(console, browser):
    s, worker, url = console
    await produce(s, s.topics.items, [(it["item_id"], it) for it in CATALOG])
    await produce(s, s.topics.users, [("alice", {"user_id": "alice", "consent": {"email": True, "app": False},
                                                 "timezone": "UTC", "quiet_hours": None})])
    first = crowd()
    await produce_many(s, s.topics.events, [(e["user_id"], e) for e in first])
    await wait_for(lambda: worker.stats.events_in >= len(first), deadline_s=60, what="the crowd processed")
    await wait_for(lambda: worker.store.similar("pa"), deadline_s=30, what="pa's neighbours published")

    # --- the overview: numbers, and they move while events flow
    await browser.open(url + "/")
    total = int((await browser.wait_text("#events-total", lambda t: t.replace(",", "").isdigit()
                                         and int(t.replace(",", "")) >= len(first))).replace(",", ""))
    assert "ok" in await browser.text(".health")
    more = crowd(start=100)
    await produce_many(s, s.topics.events, [(e["user_id"], e) for e in more])
    await browser.wait_text("#events-total", lambda t: int(t.replace(",", "") or 0) >= total + len(more),
                            what="the overview's event count to move")

    # --- alice: recommendations with reasons, a push sent, then one held back with its rule
    await produce(s, s.topics.events, [("alice", ev(1, "alice", "pa", T0 + 5000))])
    await wait_for(lambda: worker.stats.pushes >= 1, deadline_s=30, what="alice's push")
    await produce(s, s.topics.events, [("alice", ev(2, "alice", "pa", T0 + 5100))])
    await browser.open(url + "/users?q=alice")
    recs = await browser.wait_text("#recs", lambda t: "pb" in t, what="alice's recommendations")
    assert re.search(r"pb .*(together|popular|trending|because|goes with|you)", recs, re.I), recs
    # held by "no material change", or, when the crowd's last pairs reached alice's ranking between her two
    # events (a new item in her top-N), by email's daily cap of one: either way held, with its rule
    decisions = await browser.wait_text(
        "#decisions", lambda t: "no material change" in t or "email held: the channel's daily cap is reached" in t,
        what="a push held back with its rule")
    assert "sent" in decisions and "message m-" in decisions
    assert "email" in decisions and "held: no consent for the channel" in decisions  # app and ads
    profile = await browser.text("#profile")
    assert "Home" in profile and ("A (exp1)" in profile or "B (exp1)" in profile), profile
    assert "Paper lantern" in await browser.text("#recent")
    await browser.screenshot("user")

    # --- the planted pair's lift on the item page; the trending rank
    await browser.open(url + "/items/pa")
    await browser.wait_text("#neighbours", lambda t: "pb" in t, what="pa's neighbours")

    async def page_and_redis_lift() -> tuple[float, float] | None:
        """pa-pb's lift on the page and in ``ig:similar``, once they agree: the item stage republishes pa while the
        last events' pairs land, and the page shows the console's last read of it."""
        rows = [line for line in (await browser.text("#neighbours")).splitlines() if line.startswith("pb")]
        live = [n["lift"] for n in await worker.store.similar("pa") if n["item_id"] == "pb"]
        if rows and live and float(rows[0].split()[-1]) == round(live[0], 2):
            return float(rows[0].split()[-1]), live[0]
        return None

    lift, expected = await wait_for(page_and_redis_lift, deadline_s=30, what="the page's pa-pb lift to be ig:similar's")
    assert lift > 1.0, (lift, expected)
    assert "Paper lantern" in await browser.text("#catalog")
    await browser.screenshot("item")

    # --- an item titled <script>alert(1)</script> is shown as text, and runs nothing
    await browser.open(url + "/items/xss")
    assert await browser.wait_text("#item-title", lambda t: t == XSS_TITLE, what="the title as text") == XSS_TITLE
    assert "<img src=x onerror=alert(2)>" in await browser.text("#catalog")
    assert not await browser.alert_open()

    # --- segments with their sizes
    await browser.open(url + "/segments")
    # the stream is quiet now (alice's last event was decided on); the page shows the console's last sample of the
    # worker, so it may lag the worker by a refresh: wait for it to show the worker's sizes, segment by segment
    held = await worker_segments(s)
    held_sizes = sorted(x["users"] for x in held if x["users"])
    assert held_sizes, held

    def page_sizes(text: str) -> list[int]:
        return sorted(n for m in re.finditer(r"\n\d+ ([\d,]+) ", text) if (n := int(m[1].replace(",", ""))))

    await browser.wait_text("#segments", lambda t: page_sizes(t) == held_sizes, deadline_s=60,
                            what=f"the segments' sizes to be the worker's {held_sizes}")
    await browser.screenshot("segments")

    # --- an experiment's figures with their interval, after a click on alice's push
    (push,) = await read_pushes(s)
    context = {k: push[k] for k in ("message_id", "campaign", "channel", "variant")}
    await produce(s, s.topics.events, [("alice", ev(3, "alice", push["items"][0]["item_id"], T0 + 5200, "push_click",
                                                    context=context))])
    await browser.open(url + "/experiments")
    figures = await browser.wait_text(".figures", lambda t: "100.0% [" in t, what="the click's CTR with its interval")
    assert push["variant"] in figures
    assert "not enough data yet" in await browser.text(".verdicts")
    await browser.screenshot("experiments")

    # --- a dead letter with its reason, its bytes as text
    await produce(s, s.topics.events, [("mallory", b'{not json <script>alert(3)</script>')])
    await browser.open(url + "/dlq")
    dlq = await browser.wait_text("#dlq-1", lambda t: "not_json" in t, what="the dead letter's reason")
    assert "<script>alert(3)</script>" in dlq and not await browser.alert_open()
    await browser.screenshot("dlq")

    # --- erasure: alice is gone from every page
    await produce(s, s.topics.events, [("alice", ev(4, "alice", None, T0 + 5300, "forget"))])
    await browser.open(url + "/users/alice")
    await browser.wait_text("#live", lambda t: "No data about this user" in t, what="alice erased from her page")
    for page in ("/segments", "/experiments", "/"):
        await browser.open(url + page)
        assert "alice" not in await browser.text("body"), page
    await browser.wait_text("#pushes-sent", lambda t: "email" in t, what="the push counted on the overview")
    await browser.screenshot("overview")  # last: the charts have the whole test's samples


async def worker_segments(s) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{s.http_port}/inspect/segments") as r:
            return (await r.json())["segments"]


async def read_pushes(s) -> list[dict]:
    from tests.integration.kafka_helpers import read_topic

    records = await read_topic(s, s.topics.push, until=lambda rs: len(rs) >= 1)
    return [orjson.loads(r.value) for r in records]
