"""Experiment metrics from a known feedback stream on real Kafka, stored in real Redis, equal hand computation."""
from __future__ import annotations

import time

import orjson
import pytest
import redis.asyncio as aioredis

from infogap.models.events import parse_event
from infogap.models.experiments import ExperimentMetrics, MetricsConfig, kafka_partition, summarize
from infogap.stream.store.redis_node import RedisStore
from infogap.stream.store.keys import RedisKeys
from tests.integration.kafka_helpers import produce, read_topic

T0 = 1_732_460_000.0
Z = 1.959963984540054
EXPERIMENT = "ranker-v2"
CFG = MetricsConfig(cost_per_message={"email": 0.25, "app": 0.05}, attribution_window_s=3600.0, shards=6)


def push(mid, user, channel, variant):
    return {"message_id": mid, "user_id": user, "channel": channel, "campaign": "winter", "variant": variant,
            "items": [{"item_id": "sku-1", "score": 1.0, "reason": "popular"}], "reason": "new picks",
            "created_at": T0, "expires_at": T0 + 86_400}


SENDS = [push("p1", "alice", "email", "A"), push("p2", "bob", "email", "A"), push("p3", "carol", "email", "B"),
         push("p4", "dave", "email", "B"), push("p5", "erin", "app", "B")]


def ev(eid, user, typ, dt, item="sku-1", **kw):
    d = {"event_id": eid, "user_id": user, "type": typ, "ts": T0 + dt, **kw}
    if typ not in ("push_open", "push_click"):
        d["item_id"] = item
    return d


def ctx(p):
    return {"channel": p["channel"], "campaign": p["campaign"], "variant": p["variant"], "message_id": p["message_id"]}


FEEDBACK = (
    [ev(f"imp-{p['message_id']}", p["user_id"], "impression", 10, context=ctx(p)) for p in SENDS]
    + [ev("a1", "alice", "push_open", 60, context={"message_id": "p1"}),
       ev("a2", "alice", "push_click", 70, context={"message_id": "p1"}),
       ev("a3", "alice", "view", 80),                                        # not feedback
       ev("a4", "alice", "purchase", 600, value=40.0),                      # last touch p1
       ev("b1", "bob", "push_open", 60, context={"message_id": "p2"}),
       ev("b2", "bob", "purchase", 60 + 3600 + 1, value=10.0),              # 1 s past the window
       ev("c1", "carol", "push_click", 100, context={"message_id": "p3"}),
       ev("c2", "carol", "purchase", 200, value=25.0, context={"message_id": "p3"}),
       ev("c3", "carol", "purchase", 300, value=5.0),                       # last touch p3: revenue only
       ev("e1", "erin", "push_open", 50, context=ctx(SENDS[4])),
       ev("e2", "erin", "push_open", 55, context=ctx(SENDS[4]))]            # second open of p5: counted once
)


async def test_metrics_of_a_known_feedback_stream_stored_in_redis_equal_hand_computation(settings):
    await produce(settings, settings.topics.push, [(p["user_id"], p) for p in SENDS])
    await produce(settings, settings.topics.events, [(e["user_id"], e) for e in FEEDBACK])
    pushes = await read_topic(settings, settings.topics.push, until=lambda r: len(r) >= len(SENDS))
    records = await read_topic(settings, settings.topics.events, until=lambda r: len(r) >= len(FEEDBACK))

    metrics = ExperimentMetrics(CFG)
    metrics.record_sends(orjson.loads(r.value) for r in pushes)
    events = [parse_event(r.value, now=time.time()) for r in records]  # per-user order is the partition's
    metrics.observe_many(events)
    # shards are the events topic's partitions: the broker put each user where kafka_partition says
    assert all(r.partition == kafka_partition(r.key.decode(), 6) for r in records)

    r = aioredis.Redis.from_url(settings.redis_url)
    keys = RedisKeys(settings.redis_prefix)
    store = RedisStore(r, keys, 60)
    changed = metrics.drain_changed()
    segments = {(kafka_partition(p["user_id"], 6), p["channel"], p["variant"]) for p in SENDS}
    assert {(s.shard, s.channel, s.variant) for s in changed} == segments
    assert await store.write_experiment(EXPERIMENT, changed) == len(segments)
    assert await store.write_experiment(EXPERIMENT, changed) == len(segments)  # replayed: absolute values, nothing doubles
    assert await RedisStore(r, keys, 60).experiments() == {EXPERIMENT: ["A", "B"]}
    stored = await RedisStore(r, keys, 60).read_experiment(EXPERIMENT)
    assert stored == metrics.counts()
    raw = await r.hgetall(keys.experiment(EXPERIMENT, "A"))
    assert raw[f"{kafka_partition('alice', 6)}|winter|email|sent".encode()] == b"1"
    await r.aclose()

    f = summarize(stored, by=("variant", "channel"))
    a, b_email, b_app = f[("A", "email")], f[("B", "email")], f[("B", "app")]
    # A/email: p1 (alice) and p2 (bob): sent 2, cost 2 x 0.25 = 0.5; impressions 2; opens 2; click p1;
    # alice's purchase 40 by last touch -> 1 conversion, revenue 40; bob's purchase falls outside the window.
    assert (a.sent, a.impressions, a.opens, a.clicks, a.conversions, a.revenue, a.cost) == (2, 2, 2, 1, 1, 40.0, 0.5)
    assert (a.ctr, a.conversion_rate, a.revenue_per_message) == (0.5, 0.5, 20.0)
    assert a.roi == pytest.approx((40.0 - 0.5) / 0.5)  # 79
    # revenue per message: values 40 and 0 -> mean 20, s^2 = (1600 - 2 * 20^2) / 1 = 800, se = sqrt(800 / 2) = 20
    assert a.revenue_per_message_ci == pytest.approx((20 - Z * 20, 20 + Z * 20))
    assert a.roi_ci == pytest.approx(((2 * (20 - Z * 20) - 0.5) / 0.5, (2 * (20 + Z * 20) - 0.5) / 0.5))
    # B/email: p3 (carol) and p4 (dave): clicks p3; purchases 25 (by id) + 5 (last touch p3) -> 1 conversion, 30.
    assert (b_email.sent, b_email.impressions, b_email.opens, b_email.clicks, b_email.conversions,
            b_email.revenue, b_email.cost) == (2, 2, 0, 1, 1, 30.0, 0.5)
    assert b_email.roi == pytest.approx((30.0 - 0.5) / 0.5)  # 59
    # values 30 and 0 -> mean 15, s^2 = (900 - 2 * 15^2) / 1 = 450, se = sqrt(450 / 2) = 15
    assert b_email.revenue_per_message_ci == pytest.approx((15 - Z * 15, 15 + Z * 15))
    # B/app: p5 (erin): one impression, one open (the second deduplicated), cost 0.05, ROI -1.
    assert (b_app.sent, b_app.impressions, b_app.opens, b_app.clicks, b_app.revenue, b_app.cost) == \
        (1, 1, 1, 0, 0.0, 0.05)
    assert b_app.roi == pytest.approx(-1.0)
    b = summarize(stored, by=("variant",))[("B",)]
    assert (b.sent, b.revenue) == (3, 30.0) and b.cost == pytest.approx(0.55)
    assert b.roi == pytest.approx((30.0 - 0.55) / 0.55)  # 53.545...
    # Wilson of 1 click in 3 sends: p = 1/3, n = 3 -> [0.0615, 0.7923]
    assert b.ctr_ci == pytest.approx((0.0615, 0.7923), abs=1e-4)
    assert metrics.unattributed == 0


async def test_report_command_prints_the_stored_metrics(settings, monkeypatch):
    from typer.testing import CliRunner

    from infogap.stream.tools.cli import app

    metrics = ExperimentMetrics(CFG)
    metrics.record_sends(SENDS)
    metrics.observe_many(FEEDBACK)
    r = aioredis.Redis.from_url(settings.redis_url)
    await RedisStore(r, RedisKeys(settings.redis_prefix), 60).write_experiment(EXPERIMENT, metrics.drain_changed())
    await r.aclose()
    monkeypatch.setenv("INFOGAP_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("INFOGAP_REDIS_PREFIX", settings.redis_prefix)
    monkeypatch.setenv("INFOGAP_ENGINE", orjson.dumps(settings.engine).decode())  # the stream's privacy floor (off)
    monkeypatch.setenv("COLUMNS", "80")  # a terminal's default width: nothing cut short
    res = await _in_thread(CliRunner().invoke, app, ["report", "--experiment", EXPERIMENT])
    assert res.exit_code == 0, res.output
    assert f"experiment {EXPERIMENT}: engagement" in res.output and "…" not in res.output
    assert "79.00" in res.output and "59.00" in res.output  # ROI of A/email and B/email
    assert "50.0%" in res.output  # A/email CTR
    assert "[6.1%, 79.2%]" in res.output  # B's CTR interval: Wilson of 1 click in 3 sends (0.0615, 0.7923)
    res = await _in_thread(CliRunner().invoke, app, ["report", "--experiment", "nope"])
    assert res.exit_code == 1 and "no metrics" in res.output


async def _in_thread(fn, *args):
    import asyncio

    return await asyncio.to_thread(fn, *args)  # the command runs its own event loop
