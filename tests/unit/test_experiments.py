"""Experiments: assignment, attribution and metrics on a known feedback stream, against hand computation."""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from infogap.models.events import Event
from infogap.models.experiments import (NO_VARIANT, Counts, Experiment, ExperimentMetrics, Figures, MetricsConfig, Segment,
                                kafka_partition, mean_interval, summarize, unit_hash, wilson)
from infogap.models.privacy import user_mask

Z = 1.959963984540054


def send(mid, user, channel="email", variant="A", t=1000.0, campaign="recs"):
    return {"message_id": mid, "user_id": user, "channel": channel, "campaign": campaign, "variant": variant,
            "items": [{"item_id": "sku-1", "score": 1.0, "reason": "popular"}], "created_at": t, "expires_at": t + 86400}


def fb(n, user, typ, t, *, mid=None, value=None, item="sku-1", **ctx):
    context = dict(ctx)
    if mid is not None:
        context["message_id"] = mid
    return Event(f"e{n}", user, typ, float(t), item_id=item if typ not in ("push_open", "push_click") else None,
                 value=value, context=context or None)


def ctx_of(mid, channel="email", variant="A"):
    return {"mid": mid, "channel": channel, "campaign": "recs", "variant": variant}


CFG = MetricsConfig(cost_per_message={"email": 0.5, "app": 0.1}, attribution_window_s=3600.0)


def known_stream():
    m = ExperimentMetrics(CFG)
    sends = [send("m1", "u1"), send("m2", "u2"), send("m3", "u3", variant="B"),
             send("m4", "u4", channel="app", variant="B"), send("m5", "u5", variant="B")]
    assert m.record_sends(sends) == 5
    assert m.record_send(send("m1", "u1")) is False  # the same message id again: counted once
    events = [
        fb(1, "u1", "impression", 1010, **ctx_of("m1")),
        fb(2, "u1", "impression", 1011, **ctx_of("m1")),               # re-delivered: dedupe
        fb(3, "u2", "impression", 1010, **ctx_of("m2")),
        fb(4, "u3", "impression", 1010, **ctx_of("m3", variant="B")),
        fb(5, "u5", "impression", 1010, **ctx_of("m5", variant="B")),
        fb(6, "u4", "impression", 1010, **ctx_of("m4", channel="app", variant="B")),
        fb(7, "u1", "push_open", 1100, mid="m1"),                     # by message id only
        fb(8, "u1", "push_open", 1105, mid="m1"),                     # second open of m1: dedupe
        fb(9, "u1", "push_click", 1110, mid="m1"),
        fb(10, "u1", "click", 1200),                                  # last touch m1, already clicked: dedupe
        fb(11, "u1", "purchase", 1300, value=30.0),                   # last touch m1: conversion + 30
        fb(12, "u1", "purchase", 1400, value=20.0),                   # last touch m1: + 20, no second conversion
        fb(13, "u3", "push_open", 1100, mid="m3"),
        fb(14, "u3", "purchase", 1100 + 3600 + 1, value=40.0),        # 1 s past the window: not attributed
        fb(15, "u4", "push_click", 1200, mid="m4"),
        fb(16, "u4", "purchase", 1250, mid="m4", value=10.0),
        fb(17, "u2", "purchase", 1500, value=15.0, campaign="recs", channel="email", variant="A"),  # context only
        fb(18, "u1", "view", 1500),                                    # not feedback
        fb(19, "u9", "purchase", 1500, value=99.0),                    # no context, no touch
        fb(20, "u9", "click", 1500, mid="m-unknown"),                  # unknown id, no campaign: unattributed
    ]
    attributed = m.observe_many(events)
    return m, attributed


def test_which_events_of_the_known_stream_are_attributed():
    _, attributed = known_stream()
    # attributed: events 1-13 and 15-17 = 16 (2, 8 and 10 are attributed but deduplicated);
    # not: 14 (outside the window), 18 (a view), 19 (no context, no touch), 20 (unknown message id).
    assert attributed == 16


def test_counts_and_figures_equal_hand_computation():
    m, _ = known_stream()
    c = m.counts()
    a_email = c[Segment(0, "recs", "email", "A")]
    b_email = c[Segment(0, "recs", "email", "B")]
    b_app = c[Segment(0, "recs", "app", "B")]
    # A/email: sent m1, m2 -> 2, cost 2 x 0.5 = 1.0; impressions m1, m2 = 2; opens m1 = 1; clicks m1 = 1;
    # conversions: m1 (last touch, once) + the context-only purchase of u2 = 2; revenue 30 + 20 + 15 = 65;
    # revenue per message unit: m1 50, context-only 15 -> revenue_sq = 50^2 + 15^2 = 2725.
    assert a_email == Counts(sent=2, impressions=2, opens=1, clicks=1, conversions=2, revenue=65.0,
                             revenue_sq=2725.0, cost=1.0, users=user_mask("u1") | user_mask("u2"))
    # B/email: sent m3, m5; impressions 2; open m3; u3's purchase fell outside the window.
    assert b_email == Counts(sent=2, impressions=2, opens=1, clicks=0, conversions=0, revenue=0.0,
                             revenue_sq=0.0, cost=1.0, users=user_mask("u3") | user_mask("u5"))
    # B/app: sent m4 (cost 0.1), impression, click, purchase 10 by message id.
    assert b_app == Counts(sent=1, impressions=1, opens=0, clicks=1, conversions=1, revenue=10.0,
                           revenue_sq=100.0, cost=0.1, users=user_mask("u4"))  # (users: the bitmap of who stands behind)
    assert m.unattributed == 1  # event 20

    f = Figures.from_counts(a_email)
    assert f.ctr == 0.5 and f.open_rate == 0.5 and f.conversion_rate == 1.0
    assert f.revenue_per_message == 32.5
    assert f.roi == pytest.approx((65.0 - 1.0) / 1.0)  # 64
    # revenue per message: n = 2, mean 32.5, s^2 = (2725 - 2 * 32.5^2) / 1 = 612.5, se = sqrt(612.5 / 2) = 17.5
    half = Z * 17.5
    assert f.revenue_per_message_ci == pytest.approx((32.5 - half, 32.5 + half))
    # ROI interval: revenue interval = 2 x that, minus cost 1.0, over cost 1.0
    assert f.roi_ci == pytest.approx((2 * (32.5 - half) - 1.0, 2 * (32.5 + half) - 1.0))
    # Wilson of 1/2: p = .5, z^2 = 3.8415, centre = (.5 + 3.8415/4) / (1 + 3.8415/2) = .5,
    # half = z sqrt(.25/2 + 3.8415/16) / (1 + 3.8415/2) = 1.96 * sqrt(.365091) / 2.92073 = .405469
    assert f.ctr_ci == pytest.approx((0.5 - 0.405469, 0.5 + 0.405469), abs=1e-5)

    g = Figures.from_counts(b_app)
    assert g.roi == pytest.approx((10.0 - 0.1) / 0.1)  # 99
    assert g.revenue_per_message_ci is None and g.roi_ci is None  # one message: no variance
    assert Figures.from_counts(b_email).roi == -1.0

    totals = summarize(c, by=("variant",))
    b = totals[("B",)]
    assert (b.sent, b.clicks, b.conversions, b.revenue, b.cost) == (3, 1, 1, 10.0, pytest.approx(1.1))
    assert b.roi == pytest.approx((10.0 - 1.1) / 1.1)  # 8.0909
    assert b.ctr == pytest.approx(1 / 3)


def test_wilson_against_known_values():
    lo, hi = wilson(10, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.0552, 0.1744)  # the textbook Wilson 95 % interval of 10/100
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.binomtest(37, 250).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(37, 250) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert wilson(0, 0) is None
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(12, 10) == wilson(10, 10)  # more clicks than sends (late context feedback): capped


def test_mean_interval_by_hand():
    # values 1, 2, 3, 4: mean 2.5, s^2 = 1.6667, se = sqrt(1.6667 / 4) = 0.6455
    lo, hi = mean_interval(10.0, 30.0, 4)
    assert (lo, hi) == pytest.approx((2.5 - Z * math.sqrt(5 / 3 / 4), 2.5 + Z * math.sqrt(5 / 3 / 4)))
    assert mean_interval(5.0, 25.0, 1) is None


def test_each_message_counts_one_open_click_and_conversion_but_all_revenue():
    m = ExperimentMetrics(CFG)
    m.record_send(send("m1", "u1"))
    for i in range(3):
        m.observe(fb(10 + i, "u1", "push_open", 1100 + i, mid="m1"))
        m.observe(fb(20 + i, "u1", "push_click", 1100 + i, mid="m1"))
        m.observe(fb(30 + i, "u1", "click", 1100 + i, mid="m1"))
        m.observe(fb(40 + i, "u1", "purchase", 1100 + i, mid="m1", value=5.0))
    c = m.counts()[Segment(0, "recs", "email", "A")]
    assert (c.opens, c.clicks, c.conversions, c.revenue, c.revenue_sq) == (1, 1, 1, 15.0, 225.0)


def test_feedback_before_the_send_is_still_counted_once_and_the_send_too():
    m = ExperimentMetrics(CFG)
    m.observe(fb(1, "u1", "impression", 1001, **ctx_of("m1")))
    m.record_send(send("m1", "u1"))
    m.observe(fb(2, "u1", "impression", 1002, **ctx_of("m1")))
    c = m.counts()[Segment(0, "recs", "email", "A")]
    assert (c.sent, c.impressions, c.cost) == (1, 1, 0.5)


def test_last_touch_window_is_inclusive_and_follows_the_latest_touch():
    m = ExperimentMetrics(CFG)
    m.record_send(send("m1", "u1", variant="A"))
    m.record_send(send("m2", "u1", variant="B", t=1500.0))
    m.observe(fb(1, "u1", "push_open", 2000, mid="m1"))
    assert m.observe(fb(2, "u1", "purchase", 2000 + 3600, value=1.0))  # exactly at the window: in
    m.observe(fb(3, "u1", "push_click", 3000, mid="m2"))                # newer touch: m2 takes over
    assert m.observe(fb(4, "u1", "purchase", 3100, value=2.0))
    assert not m.observe(fb(5, "u1", "purchase", 3000 + 3601, value=4.0))  # past the window of m2
    c = m.counts()
    assert c[Segment(0, "recs", "email", "A")].revenue == 1.0
    assert c[Segment(0, "recs", "email", "B")].revenue == 2.0


def test_purchase_before_the_touch_is_not_attributed():
    m = ExperimentMetrics(CFG)
    m.record_send(send("m1", "u1"))
    m.observe(fb(1, "u1", "push_open", 2000, mid="m1"))
    assert not m.observe(fb(2, "u1", "purchase", 1999, value=5.0))
    assert m.counts()[Segment(0, "recs", "email", "A")].revenue == 0.0


def test_forget_user_drops_attribution_state_and_keeps_aggregates():
    m = ExperimentMetrics(CFG)
    m.record_send(send("m1", "secret-user-1"))
    m.record_send(send("m2", "other"))
    m.observe(fb(1, "secret-user-1", "push_open", 1100, mid="m1"))
    m.forget_user("secret-user-1")
    assert not m.knows_user("secret-user-1")
    assert b"secret-user-1" not in pickle.dumps(m)
    assert not m.observe(fb(2, "secret-user-1", "purchase", 1200, value=3.0))  # no last touch any more
    c = m.counts()[Segment(0, "recs", "email", "A")]
    assert (c.sent, c.opens) == (2, 1)
    assert m.knows_user("other")


def test_message_map_is_bounded_by_event_time_and_size():
    m = ExperimentMetrics(MetricsConfig(message_ttl_s=100.0, max_messages=50, attribution_window_s=10.0))
    for i in range(40):
        m.record_send(send(f"m{i}", f"u{i}", t=1000.0 + i))
    assert len(m) == 40
    m.record_send(send("late", "uz", t=1100.5))  # horizon 1000.5: only m0 (sent at 1000) is older
    assert len(m) == 40 and "m0" not in m._messages and "m1" in m._messages
    for i in range(200):
        m.record_send(send(f"x{i}", f"v{i}", t=2000.0))
    assert len(m) == 50
    m.observe(fb(1, "v199", "push_open", 2000, mid="x199"))
    assert "v199" in m._touch
    m.observe(fb(2, "zz", "purchase", 2011, value=1.0))  # event time moves past v199's attribution window
    assert "v199" not in m._touch and not m._touch_order


def test_drain_changed_returns_only_changed_segments():
    m = ExperimentMetrics(CFG)
    m.record_send(send("m1", "u1"))
    m.record_send(send("m2", "u2", variant="B"))
    assert set(m.drain_changed()) == {Segment(0, "recs", "email", "A"), Segment(0, "recs", "email", "B")}
    assert m.drain_changed() == {}
    m.observe(fb(1, "u2", "push_open", 1100, mid="m2"))
    assert list(m.drain_changed()) == [Segment(0, "recs", "email", "B")]


def test_pickle_round_trip_continues_identically():
    m1, _ = known_stream()
    m2 = pickle.loads(pickle.dumps(m1))
    more = [fb(100, "u1", "purchase", 1600, value=7.0), fb(101, "u5", "push_open", 1600, mid="m5")]
    m1.observe_many(more)
    m2.observe_many(more)
    assert m1.counts() == m2.counts()


def test_null_variant_and_sharding():
    m = ExperimentMetrics(MetricsConfig(shards=6))
    m.record_send(dict(send("m1", "u42"), variant=None))
    assert list(m.counts()) == [Segment(kafka_partition("u42", 6), "recs", "email", NO_VARIANT)]


def test_fixed_shard_for_one_metrics_object_per_partition():
    m = ExperimentMetrics(MetricsConfig(shards=6, shard=4))
    m.record_send(send("m1", "u42"))
    m.observe(fb(1, "u42", "push_open", 1100, **ctx_of("m-other")))
    assert {s.shard for s in m.counts()} == {4}


def test_counts_round_trip_through_strings():
    c = Counts(sent=3, impressions=2, opens=1, clicks=1, conversions=1, revenue=12.5, revenue_sq=156.25, cost=0.3)
    assert Counts.from_dict({k: str(v).encode() if False else str(v) for k, v in c.to_dict().items()}) == c


# ------------------------------------------------------------------------------------------ assignment
def test_assignment_is_deterministic_across_processes():
    users = [f"u{i}" for i in range(50)]
    exp = Experiment("ranker-v2", {"A": 0.5, "B": 0.5})
    here = [exp.assign(u) for u in users]
    code = ("from infogap.models.experiments import Experiment; e = Experiment('ranker-v2', {'A': 0.5, 'B': 0.5});"
            f"print(','.join(e.assign(f'u{{i}}') for i in range(50)))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, cwd=os.getcwd())
        assert out.stdout.strip().split(",") == here


def test_split_proportions_within_binomial_tolerance():
    weights = {"A": 0.2, "B": 0.3, "C": 0.5}
    exp = Experiment("split-check", weights)
    n = 20_000
    counts = {v: 0 for v in weights}
    for i in range(n):
        counts[exp.assign(f"user-{i}")] += 1
    for v, p in weights.items():
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[v] - n * p) < 4 * sd, (v, counts[v], n * p, sd)


def test_different_experiments_shuffle_independently():
    a = Experiment("exp-one", {"A": 1, "B": 1})
    b = Experiment("exp-two", {"A": 1, "B": 1})
    same = sum(a.assign(f"u{i}") == b.assign(f"u{i}") for i in range(4000))
    assert abs(same - 2000) < 4 * math.sqrt(4000 * 0.25)


def test_overrides_and_validation():
    exp = Experiment.from_spec({"name": "x", "variants": {"A": 1, "B": 3},
                                "overrides": {"B": {"max_category_share": 0.3}}})
    assert exp.overrides_for("B") == {"max_category_share": 0.3} and exp.overrides_for("A") == {}
    exp.overrides_for("B")["max_category_share"] = 9  # a copy
    assert exp.overrides_for("B") == {"max_category_share": 0.3}
    for bad in ({"name": "", "variants": {"A": 1}}, {"name": "x", "variants": {}},
                {"name": "x", "variants": {"A": 0}}, {"name": "x", "variants": {"A:1": 1}},
                {"name": "x", "variants": {"A": 1}, "overrides": {"Z": {}}},
                {"name": "x", "variants": {"A": 1}, "overrides": {"A": {"diversity": 0.3}}}):  # not a ranker setting
        with pytest.raises(ValueError):
            Experiment.from_spec(bad)
    assert pickle.loads(pickle.dumps(exp)).assign("u1") == exp.assign("u1")


@hsettings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.integers(1, 64))
def test_kafka_partition_matches_the_kafka_client(key, n):
    from aiokafka.partitioner import murmur2

    assert kafka_partition(key, n) == (murmur2(key.encode()) & 0x7FFFFFFF) % n


def test_unit_hash_is_uniform_enough():
    xs = [unit_hash("h", i) for i in range(10_000)]
    assert all(0 <= x < 1 for x in xs)
    assert abs(sum(xs) / len(xs) - 0.5) < 0.02


# ------------------------------------------------------------------------------------------ hostile contexts
STRICT = MetricsConfig(cost_per_message={"email": 0.5, "app": 0.1}, campaigns=frozenset({"recs"}),
                       variants=frozenset({"A", "B"}), max_segments=6)


def test_context_feedback_counts_only_for_known_campaigns_and_variants():
    m = ExperimentMetrics(STRICT)
    m.record_send(send("m1", "u1", campaign="other"))  # a send always counts, whatever its campaign
    assert m.observe(fb(1, "u1", "click", 1100, campaign="recs", channel="email", variant="A"))
    assert m.observe(fb(2, "u1", "click", 1100, campaign="recs", channel="email"))  # no variant: "none"
    assert not m.observe(fb(3, "u1", "click", 1100, campaign="evil", channel="email", variant="A"))
    assert not m.observe(fb(4, "u1", "click", 1100, campaign="recs", channel="email", variant="A:x"))
    assert m.observe(fb(5, "u1", "click", 1100, mid="m1"))  # a sent message: by its id
    assert m.observe(fb(6, "u1", "click", 1100, campaign="recs", channel="fax|x", variant="B"))  # unknown channel
    assert set(m.counts()) == {Segment(0, "other", "email", "A"), Segment(0, "recs", "email", "A"),
                               Segment(0, "recs", "email", NO_VARIANT), Segment(0, "recs", "unknown", "B")}
    assert (m.unattributed, m.overflow) == (2, 0)


def test_context_message_ids_are_not_remembered_when_campaigns_are_checked():
    m = ExperimentMetrics(STRICT)
    for k in range(100):
        m.observe(fb(k, "u1", "impression", 1000 + k, mid=f"forged-{k}", campaign="recs", channel="email", variant="A"))
    assert len(m) == 0 and b"forged" not in pickle.dumps(m)
    assert m.counts()[Segment(0, "recs", "email", "A")].impressions == 100  # counted, as without an id


def test_segments_made_from_contexts_are_capped_and_the_overflow_counted():
    m = ExperimentMetrics(MetricsConfig(max_segments=5))  # no known lists: any campaign, the cap still holds
    m.record_send(send("m1", "u1"))
    for k in range(1000):
        m.observe(fb(k, "u1", "click", 1100, campaign=f"c{k}", channel="email", variant=f"v{k}"))
    assert len(m.counts()) == 5 and m.overflow == 996  # the send's segment and four from contexts
    assert m.observe(fb(5000, "u1", "click", 1100, campaign="c0", channel="email", variant="v0"))  # a known one
    assert m.observe(fb(5001, "u1", "push_click", 1100, mid="m1"))
    assert m.counts()[Segment(0, "recs", "email", "A")].clicks == 1


def test_metrics_pickled_before_the_checks_restore_with_their_defaults():
    m = ExperimentMetrics(CFG)
    old = object.__new__(MetricsConfig)  # as an older version pickled it: the fields of then only
    for name in ("cost_per_message", "attribution_window_s", "message_ttl_s", "max_messages", "shards", "shard"):
        object.__setattr__(old, name, getattr(CFG, name))
    m.config = old
    state = dict(m.__dict__)
    del state["overflow"]
    back = ExperimentMetrics.__new__(ExperimentMetrics)
    back.__setstate__(state)  # what unpickling an older snapshot calls (its config lacks the new fields)
    assert (back.config.campaigns, back.config.max_segments, back.overflow) == (None, 1_000, 0)
    assert back.config.cost_per_message == CFG.cost_per_message
    back.reconfigure(STRICT)
    assert not back.observe(fb(1, "u1", "click", 1100, campaign="evil", channel="email", variant="A"))


def test_store_fields_and_keys_escape_the_separators():
    from infogap.stream.experiments_store import escape, field_name, parse_fields, unescape

    seg = Segment(3, "a|b:c%7C", "e|m:x", "v")
    raw = {field_name(seg, "clicks"): "2", field_name(seg, "sent"): "4"}
    assert parse_fields("v", raw) == {seg: Counts(sent=4, clicks=2)}
    for s in ("A", "x:y", "a|b", "%3A", "%", "::||%%", ""):
        assert unescape(escape(s)) == s and ":" not in escape(s) and "|" not in escape(s)


@pytest.mark.parametrize("field,value", [
    ("sent", "inf"), ("sent", "nan"), ("sent", "-5"), ("sent", "1e300"), ("revenue", "nan"), ("cost", "-1"),
    ("revenue_sq", "-1"), ("users", "-1"), ("users", "1e5"), ("users", "abc"), ("users", "1" * 5000),
    ("clicks", b"\xff"), ("sent", "9" * 100)])
def test_a_stored_value_no_worker_writes_leaves_out_its_cell_and_only_it(field, value):
    """A damaged field hides its segment (logged), never the others; ``users`` of -1 must not read as 64 users."""
    from infogap.stream.experiments_store import field_name, parse_fields

    bad, good = Segment(0, "recs", "app", "B"), Segment(0, "recs", "email", "B")
    raw = {field_name(good, "sent"): "4", field_name(good, "users"): "31", field_name(bad, "sent"): "4",
           field_name(bad, field): value}
    assert parse_fields("B", raw) == {good: Counts(sent=4, users=31)}


def test_a_shard_field_that_is_not_ascii_digits_is_ignored():
    from infogap.stream.experiments_store import parse_cohort_fields, parse_fields

    assert parse_fields("B", {"²|recs|email|sent": "1", "1234567|recs|email|sent": "1"}) == {}
    assert parse_cohort_fields({"²|recs|email|B|treated|entered": "1"}) == {}
