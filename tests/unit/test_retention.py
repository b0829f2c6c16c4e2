"""The control group, cohorts, retention and the ROI on the increment (models/retention.py), against answers
computed by hand; and the push policy's ``control_group`` rule."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from infogap.models.experiments import Experiment
from infogap.models.push_policy import RULES, PushConfig, PushPolicy, UserPrefs
from infogap.models.retention import (DAY, Cohort, CohortCounts, Cohorts, ControlGroup, Increment,
                                      RetentionConfig, summarize)
from infogap.models.state_fields import StateError

T = 1_700_000_000.0
Z = 1.959963984540054
EMAIL = {"email": 0.5}


def ev(user: str, typ: str, ts: float, value: float | None = None, n: list = [0]) -> dict:
    n[0] += 1
    d = {"event_id": f"e{n[0]}", "user_id": user, "type": typ, "ts": ts}
    if typ not in ("push_open", "push_click"):
        d["item_id"] = "sku-1"
    if value is not None:
        d["value"] = value
    return d


def cohorts(**kw) -> Cohorts:
    return Cohorts(RetentionConfig(cost_per_message=EMAIL, **kw))


def only(c: Cohorts, arm: str = "treated", variant: str = "none") -> CohortCounts:
    return c.counts()[Cohort(0, "recs", "email", variant, arm)]


# ---------------------------------------------------------------------------------------- the control group
def test_the_control_group_is_a_stable_hash_share_independent_of_the_variants():
    g = ControlGroup(0.1)
    users = [f"user-{k}" for k in range(20_000)]
    control = {u for u in users if g.is_control(u)}
    assert abs(len(control) / len(users) - 0.1) < 0.01
    exp = Experiment("ranker-v2", {"A": 0.5, "B": 0.5})
    share_in_b = sum(exp.assign(u) == "B" for u in control) / len(control)
    assert abs(share_in_b - 0.5) < 0.03  # a different salt: the control group is split across variants evenly
    # raising the share keeps everyone who was in it, in it
    assert control <= {u for u in users if ControlGroup(0.2).is_control(u)}
    # the same in another process (blake2b, not the salted hash())
    code = ("from infogap.models.retention import ControlGroup; g = ControlGroup(0.1); "
            "print(''.join('1' if g.is_control(f'user-{k}') else '0' for k in range(200)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == "".join("1" if u in control else "0" for u in users[:200])


@pytest.mark.parametrize("share", [-0.1, 1.0, 2, True, "0.1", float("nan")])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="share"):
        ControlGroup(share)


def test_a_control_user_is_never_sent_anything_but_the_ghost_counts_for_the_caps():
    prefs = UserPrefs("u3", {"email": True}, quiet_hours=None)  # u3 is in the control group at 0.5
    assert ControlGroup(0.5).is_control("u3") and not ControlGroup(0.5).is_control("u1")
    policy = PushPolicy(PushConfig(min_new_items=1, control_share=0.5))
    d, *others = policy.decisions(prefs, [("sku-1", 0.9, "popular")], now=T, variant="B")
    assert [(x.channel, x.rule, x.ghost) for x in others] == [("app", "no_consent", None), ("ads", "no_consent", None)]
    assert (d.channel, d.rule, d.message, d.sent) == ("email", "control_group", None, False)
    assert (d.ghost.user_id, d.ghost.channel, d.ghost.campaign, d.ghost.variant, d.ghost.created_at) == \
        ("u3", "email", "recs", "B", T)
    assert "control_group" in RULES
    assert policy.decide(prefs, [("sku-2", 0.9, "popular")], now=T + 60) == []
    # the ghost used the email cap of the day, as a send would have: the next change is held by the cap
    assert [(x.channel, x.rule) for x in policy.decisions(prefs, [("sku-3", 0.9, "popular")], now=T + 120)][0] == \
        ("email", "daily_cap")
    # a treated user is pushed as before; nobody is held with a share of 0
    assert policy.decide(UserPrefs("u1", {"email": True}, quiet_hours=None), [("sku-1", 0.9, "x")], now=T)
    assert PushPolicy(PushConfig(min_new_items=1)).decide(prefs, [("sku-1", 0.9, "x")], now=T)


# ---------------------------------------------------------------------------------------- windows
def test_returns_count_only_inside_the_day_1_and_day_7_windows_and_push_feedback_is_no_return():
    c = cohorts()
    for u in ("a", "b", "c", "d", "e"):
        c.enter(u, "recs", "email", None, T, control=False)
    c.observe_many([
        ev("a", "view", T + DAY - 1),            # before day 1
        ev("a", "view", T + 3 * DAY),            # between the windows
        ev("b", "view", T + DAY),                # day 1, first second: counts
        ev("c", "add_to_cart", T + 2 * DAY - 1),  # day 1, last second: counts
        ev("c", "view", T + 8 * DAY),            # just after day 7
        ev("d", "impression", T + DAY + 5),      # a channel's report: no return
        ev("d", "push_open", T + DAY + 6),       # push feedback: no return
        ev("d", "push_click", T + 7 * DAY + 6),
        ev("e", "view", T + 7 * DAY),            # day 7, first second
        ev("nobody", "view", T + DAY),           # no record: ignored
    ])
    c.advance(T + 8 * DAY)
    got = only(c)
    assert (got.entered, got.d1_users, got.d1_returned, got.d7_users, got.d7_returned) == (5, 5, 2, 5, 1)


def test_a_window_counts_only_once_it_has_closed_by_the_watermark():
    c = cohorts()
    c.enter("a", "recs", "email", None, T, control=False)
    c.enter("b", "recs", "email", None, T + DAY, control=False)  # a day later
    c.observe(ev("a", "view", T + 1.5 * DAY))
    c.observe(ev("a", "purchase", T + 3 * DAY, 20.0))
    c.advance(T + 2 * DAY - 1)
    assert (only(c).entered, only(c).d1_users, only(c).users_7d) == (2, 0, 0)
    c.advance(T + 2 * DAY)  # a's day-1 window closed, b's not
    assert (only(c).d1_users, only(c).d1_returned, only(c).users_7d) == (1, 1, 0)
    c.advance(T + 7 * DAY)  # a's 7-day value window closed: its purchase and its message count
    got = only(c)
    assert (got.d1_users, got.users_7d, got.conversions, got.revenue, got.messages, got.cost) == (2, 1, 1, 20.0, 1, 0.5)
    c.advance(T + 9 * DAY)
    got = only(c)
    assert (got.users_7d, got.d7_users, got.d7_returned, got.revenue_sq) == (2, 2, 0, 400.0)


def test_purchases_count_in_the_open_seven_day_window_and_later_pushes_count_as_messages():
    c = cohorts()
    c.enter("a", "recs", "email", None, T, control=False)
    c.observe_many([ev("a", "purchase", T, 99.0),                # the push's own moment: not after it
                    ev("a", "purchase", T + 60, 10.0),
                    ev("a", "purchase", T + 7 * DAY - 1, 5.0),
                    ev("a", "purchase", T + 7 * DAY, 1000.0)])   # past the window
    assert not c.enter("a", "recs", "email", None, T + 3 * DAY, control=False)  # a second message in the window
    assert not c.enter("a", "recs", "email", None, T + 8 * DAY, control=False)  # after it: not counted
    c.advance(T + 8 * DAY)
    got = only(c)
    assert (got.entered, got.conversions, got.revenue, got.revenue_sq, got.messages, got.cost) == \
        (1, 1, 15.0, 225.0, 2, 1.0)


def test_control_records_have_no_cost_and_arms_and_channels_are_separate_cohorts():
    c = cohorts()
    assert c.enter("a", "recs", "email", "B", T, control=True)
    assert c.enter("a", "recs", "app", "B", T, control=True)  # another channel: another cohort
    c.advance(T + 8 * DAY)
    got = c.counts()
    assert set(got) == {Cohort(0, "recs", "email", "B", "control"), Cohort(0, "recs", "app", "B", "control")}
    assert got[Cohort(0, "recs", "email", "B", "control")].messages == 1
    assert got[Cohort(0, "recs", "email", "B", "control")].cost == 0.0


# ---------------------------------------------------------------------------------------- figures
def test_increment_and_roi_equal_hand_computation():
    # treated: 4 users, revenue 0, 10, 20, 30 (mean 15, s^2 = 500/3); control: 0, 0, 10, 10 (mean 5, s^2 = 100/3)
    # conversions 3 of 4 vs 2 of 4; 4 messages at 0.5 = cost 2.0; day 1: 3 of 4 vs 1 of 4
    t = CohortCounts(entered=4, d1_users=4, d1_returned=3, users_7d=4, conversions=3, revenue=60.0,
                     revenue_sq=1400.0, messages=4, cost=2.0)
    c = CohortCounts(entered=4, d1_users=4, d1_returned=1, users_7d=4, conversions=2, revenue=20.0,
                     revenue_sq=200.0, messages=4)
    inc = Increment.from_counts(t, c)
    se = math.sqrt((500 / 3) / 4 + (100 / 3) / 4)  # = sqrt(50)
    assert inc.revenue == pytest.approx(40.0)  # (15 - 5) x 4
    assert inc.revenue_ci == pytest.approx((4 * (10 - Z * se), 4 * (10 + Z * se)))
    assert inc.cost == 2.0 and inc.roi == pytest.approx(19.0)  # (40 - 2) / 2
    assert inc.roi_ci == pytest.approx(((4 * (10 - Z * se) - 2) / 2, (4 * (10 + Z * se) - 2) / 2))
    assert inc.conversions == pytest.approx(1.0)  # (3/4 - 2/4) x 4
    assert inc.d1_lift == pytest.approx(0.5)

    def wilson(k, n):
        p = k / n
        centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
        half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
        return centre - half, centre + half

    (l1, u1), (l2, u2) = wilson(1, 4), wilson(3, 4)  # Newcombe's hybrid score interval of 3/4 - 1/4
    assert inc.d1_lift_ci == pytest.approx((0.5 - math.hypot(0.75 - l2, u1 - 0.25),
                                            0.5 + math.hypot(u2 - 0.75, 0.25 - l1)))
    assert inc.treated.d1_ci == pytest.approx(wilson(3, 4))
    assert inc.treated.revenue_per_user == 15.0
    assert inc.treated.revenue_per_user_ci == pytest.approx((15 - Z * math.sqrt(500 / 3 / 4),
                                                             15 + Z * math.sqrt(500 / 3 / 4)))


def test_without_a_control_arm_there_is_no_increment():
    inc = Increment.from_counts(CohortCounts(entered=5, users_7d=5, conversions=1, cost=1.0), CohortCounts())
    assert inc.control.entered == 0 and inc.conversions is None and inc.revenue is None and inc.roi is None
    assert inc.treated.conversion_rate == 0.2


def test_summarize_sums_the_shards_and_groups_the_segments():
    counts = {Cohort(0, "recs", "email", "A", "treated"): CohortCounts(entered=3, users_7d=3, conversions=1),
              Cohort(5, "recs", "email", "A", "treated"): CohortCounts(entered=1, users_7d=1, conversions=1),
              Cohort(5, "recs", "email", "A", "control"): CohortCounts(entered=2, users_7d=2),
              Cohort(0, "recs", "email", "B", "control"): CohortCounts(entered=1, users_7d=1),
              Cohort(0, "recs", "app", "B", "control"): CohortCounts()}  # nobody: left out
    got = summarize(counts)
    assert list(got) == [("recs", "email", "A"), ("recs", "email", "B")]
    a = got[("recs", "email", "A")]
    assert (a.treated.entered, a.treated.conversions, a.control.entered, a.conversions) == (4, 2, 2, 2.0)
    assert summarize(counts, by=("channel",))[("email",)].control.entered == 3
    with pytest.raises(ValueError, match="group by"):
        summarize(counts, by=("arm",))


# ---------------------------------------------------------------------------------------- erasure and bounds
def test_forget_takes_the_users_contribution_out_of_every_figure():
    def build(with_b: bool) -> Cohorts:
        c = cohorts()
        for u in ("a", "b", "c") if with_b else ("a", "c"):
            c.enter(u, "recs", "email", "A", T, control=False)
        c.enter("b", "recs", "app", "A", T, control=True) if with_b else None
        c.observe_many([ev("a", "view", T + DAY), ev("a", "purchase", T + DAY, 12.5)]
                       + ([ev("b", "view", T + DAY + 5), ev("b", "purchase", T + DAY, 7.25),
                           ev("b", "view", T + 7 * DAY)] if with_b else []))
        c.advance(T + 9 * DAY)
        return c

    c, without = build(True), build(False)
    c.drain_changed()
    c.forget_user("b")
    assert not c.knows_user("b") and len(c) == 2
    changed = c.drain_changed()
    assert set(changed) == {Cohort(0, "recs", "email", "A", "treated"), Cohort(0, "recs", "app", "A", "control")}
    assert changed[Cohort(0, "recs", "app", "A", "control")] == CohortCounts()  # written as zeros, then gone
    assert c.counts() == without.counts()
    assert Cohort(0, "recs", "app", "A", "control") not in c.counts()


def test_records_leave_after_the_horizon_and_past_the_memory_bound():
    c = cohorts(horizon_s=10 * DAY)
    c.enter("a", "recs", "email", None, T, control=False)
    c.enter("b", "recs", "email", None, T + DAY, control=False)
    c.advance(T + 10 * DAY)  # a's horizon
    assert len(c) == 1 and not c.knows_user("a") and only(c).entered == 1
    assert only(c).users_7d == 1  # b's value window closed at T + 8 d
    small = cohorts(max_records=2)
    for k, u in enumerate("xyz"):
        small.enter(u, "recs", "email", None, T + k, control=False)
    assert len(small) == 2 and not small.knows_user("x") and small.dropped == 1 and only(small).entered == 2
    with pytest.raises(ValueError, match="8 days"):
        RetentionConfig(horizon_s=7 * DAY)


def test_a_push_past_the_horizon_of_the_watermark_enters_nobody():
    c = cohorts(horizon_s=10 * DAY)
    c.advance(T + 20 * DAY)
    assert not c.enter("a", "recs", "email", None, T, control=False) and len(c) == 0 and not c.knows_user("a")


def test_the_state_round_trips_and_a_bad_one_is_refused():
    c = cohorts()
    for k in range(30):
        c.enter(f"u{k}", "recs", "email" if k % 2 else "app", "B", T + k * 3600, control=k % 3 == 0)
        c.observe(ev(f"u{k}", "purchase", T + DAY + k * 3600, float(k)))
    c.advance(T + 7.5 * DAY)
    back = cohorts()
    back.restore_state(c.to_state())
    assert back.counts() == c.counts() and len(back) == len(c) and back.watermark == c.watermark
    assert set(back.drain_changed()) == set(c.counts())  # all written again by the new owner
    # the restored object goes on as the original would
    for x in (c, back):
        x.observe(ev("u3", "view", T + 7.5 * DAY))
        x.advance(T + 9 * DAY)
    assert back.counts() == c.counts()
    state = c.to_state()
    for bad in ({**state, "cohort": np.array([99] * len(state["users"]), np.int64)},
                {**state, "stage": state["stage"] + 7},
                {**state, "cohorts": [[0, "recs", "email", "B", "pwned"]] * len(state["cohorts"])},
                {**state, "entry": state["entry"][:-1]},
                {**state, "users": "x"}):
        with pytest.raises(StateError):
            cohorts().restore_state(bad)


def test_reads_do_not_change_the_records():
    c = cohorts()
    c.enter("a", "recs", "email", None, T, control=False)
    before = c.to_state()
    c.counts(), c.figures(), c.knows_user("zz"), c.observe(ev("zz", "view", T))
    after = c.to_state()
    assert before.keys() == after.keys() and all(
        np.array_equal(before[k], after[k]) if isinstance(before[k], np.ndarray) else before[k] == after[k]
        for k in before)


def test_the_report_shows_no_figures_of_an_arm_of_fewer_than_k_users_nor_its_increment():
    """The privacy floor on the retention tables: a control arm of 3 users would tell whether each came back."""
    from rich.console import Console

    from infogap.stream.tools.cli import _retention_tables

    counts = {Cohort(0, "recs", "email", "A", "treated"): CohortCounts(entered=40, d1_users=40, d1_returned=12,
                                                                      users_7d=40, conversions=4, revenue=80.0,
                                                                      revenue_sq=1600.0, cost=4.0),
              Cohort(0, "recs", "email", "A", "control"): CohortCounts(entered=3, d1_users=3, d1_returned=1,
                                                                      users_7d=3, conversions=1, revenue=20.0,
                                                                      revenue_sq=400.0),
              Cohort(0, "winter", "app", "A", "treated"): CohortCounts(entered=6, d1_users=6, d1_returned=3),
              Cohort(0, "winter", "app", "A", "control"): CohortCounts(entered=5, d1_users=5, d1_returned=1)}

    def text(min_users: int) -> str:
        out = Console(width=120, record=True, file=open("/dev/null", "w"))
        for table in _retention_tables("recs", counts, min_users):
            out.print(table)
        return out.export_text()

    floored = text(5)
    assert "33.3%" not in floored and "< 5 users" in floored  # the 3 users' day-1 return rate is not shown
    assert "30.0%" in floored  # the treated arm of 40: shown
    assert "50.0%" in floored and "20.0%" in floored  # winter: both arms at the floor
    assert "-3.3 pts" not in floored  # recs' lift (30.0 - 33.3) would give the control arm away
    assert "33.3%" in text(1) and "-3.3 pts" in text(1)


@pytest.mark.parametrize("field,value", [("entered", "inf"), ("d1_returned", "-5"), ("d1_returned", "41"),
                                         ("conversions", "41"), ("d7_returned", "nan"), ("revenue_sq", "-1")])
def test_a_damaged_cohort_is_left_out_and_the_others_read(field, value):
    """41 returned of 40 users, a negative count, a NaN: that cohort is left out (logged), its neighbours read."""
    from infogap.stream.experiments_store import cohort_field, parse_cohort_fields

    good, bad = Cohort(0, "recs", "email", "B", "treated"), Cohort(0, "recs", "app", "B", "treated")
    sound = {"entered": "40", "d1_users": "40", "d1_returned": "20", "users_7d": "40", "conversions": "4"}
    raw = {cohort_field(c, k): v for c in (good, bad) for k, v in sound.items()}
    raw[cohort_field(bad, field)] = value
    got = parse_cohort_fields(raw)
    assert list(got) == [good] and (got[good].entered, got[good].d1_returned) == (40, 20)
