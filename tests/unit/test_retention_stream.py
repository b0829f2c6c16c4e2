"""The control group through the whole user stage, on the in-memory store (no server): a control user is never
pushed (the decision log says ``control_group``) but enters the cohorts; a planted stream whose true retention,
conversion and revenue per arm are known comes out within the reported 95 % intervals; an erasure takes the
user out of the stored figures; ``infogap report`` prints them.
"""
from __future__ import annotations

import random

import orjson
import pytest

from infogap.models.experiments import kafka_partition
from infogap.models.retention import DAY, ControlGroup, summarize
from infogap.stream.core.user_stage import Record
from infogap.stream.settings import Settings
from tests.unit.test_stream_core import CATALOG, N_EVENTS, T0, Pipeline

EXPERIMENT = {"name": "exp1", "variants": {"A": 1, "B": 1}}
PREFS = {"consent": {"email": True}, "timezone": "UTC", "quiet_hours": None}


class Stream:
    """A :class:`Pipeline` whose clock follows the events (they span days) and whose records carry their event's
    time as the Kafka timestamp (the partitions' watermarks move with them)."""

    def __init__(self, **settings):
        s = Settings(http_port=None, experiment=EXPERIMENT, experiment_cost_per_message={"email": 0.5}, **settings)
        self.p = p = Pipeline(s)
        self.now = T0
        p.worker.clock = p.worker.core.clock = lambda: self.now
        self.n = 0
        for item in CATALOG:
            p.side(s.topics.items, item["item_id"], item)

    def prefs(self, users) -> None:
        for user in users:
            self.p.side(self.p.s.topics.users, user, {"user_id": user, **PREFS})

    def record(self, event: dict) -> Record:
        p, user = self.p, event["user_id"]
        part = kafka_partition(user, N_EVENTS)
        offset = p.offsets.get(part, 0)
        p.offsets[part] = offset + 1
        return Record(p.s.topics.events, part, offset, user.encode(), orjson.dumps(event),
                      timestamp=int(event["ts"] * 1000))

    def event(self, user: str, typ: str, ts: float, item: str | None = "sku-1", **extra) -> dict:
        self.n += 1
        return {"event_id": f"e{self.n}", "user_id": user, "item_id": item, "type": typ, "ts": ts, **extra}

    async def run(self, events: list[dict], batch: int = 2_000) -> None:
        """The events in time order, in batches; the clock at each batch's newest event."""
        events = sorted(events, key=lambda e: e["ts"])
        for k in range(0, len(events), batch):
            chunk = events[k: k + batch]
            self.now = chunk[-1]["ts"] + 1
            await self.p.batch([self.record(e) for e in chunk])

    async def close_windows(self, at: float) -> None:
        """An event on every partition at ``at``: the watermarks pass it (less the lateness accepted)."""
        users, k = {}, 0
        while len(users) < N_EVENTS:
            users.setdefault(kafka_partition(f"clock{k}", N_EVENTS), f"clock{k}")
            k += 1
        await self.run([self.event(u, "view", at) for u in users.values()])

    async def crowd(self) -> None:
        await self.run([self.event(f"crowd{i}", "click", T0 - 3600 + i, item) for i in range(8)
                        for item in ("sku-1", "sku-2", "sku-3")])


def control_user(share: float, want: bool, start: int = 0) -> str:
    g = ControlGroup(share)
    return next(f"u{k}" for k in range(start, 10_000) if g.is_control(f"u{k}") == want)


async def test_a_control_user_gets_no_push_but_a_ghost_push_that_enters_the_cohorts():
    st = Stream(control_share=0.05)
    p = st.p
    ctl, trt = control_user(0.05, True), control_user(0.05, False)
    st.prefs([ctl, trt])
    await st.crowd()
    await st.run([st.event(ctl, "view", T0 + 100), st.event(trt, "view", T0 + 100)])
    pushes = [orjson.loads(m[1]) for m in p.producer.take(p.s.topics.push)]
    assert [m["user_id"] for m in pushes] == [trt]
    assert (await p.store.decisions(ctl))[-1] == {"rule": "control_group", "channel": "email", "at": T0 + 100}
    assert p.worker.stats.pushes_held.get("control_group") == 1
    assert await p.store.recs(ctl) is not None  # the app still has their recommendations
    stored = await p.store.read_retention("exp1")
    assert {(k.channel, k.arm, c.entered) for k, c in stored.items()} == {("email", "control", 1),
                                                                         ("email", "treated", 1)}
    variant = p.worker.core.experiment.assign(ctl)
    assert [k.variant for k in stored if k.arm == "control"] == [variant]
    assert [k.shard for k in stored if k.arm == "control"] == [kafka_partition(ctl, N_EVENTS)]


async def test_an_erasure_takes_the_user_out_of_the_stored_cohort_figures():
    st = Stream(control_share=0.05)
    p = st.p
    ctl, ctl2 = control_user(0.05, True), control_user(0.05, True, start=int(control_user(0.05, True)[1:]) + 1)
    trt = control_user(0.05, False)
    st.prefs([ctl, ctl2, trt])
    await st.crowd()
    await st.run([st.event(u, "view", T0 + 100) for u in (ctl, ctl2, trt)])  # (ghost) pushed
    await st.run([st.event(ctl, "view", T0 + 100 + DAY), st.event(ctl, "purchase", T0 + 2 * DAY, value=40.0)])
    await st.close_windows(T0 + 10 * DAY)
    control = summarize(await p.store.read_retention("exp1"), by=("channel",))[("email",)].control
    assert (control.entered, control.d1_users, control.d1_rate, control.revenue) == (2, 2, 0.5, 40.0)
    await st.run([st.event(ctl, "forget", T0 + 10 * DAY + 5, None)])  # a forget event, in a batch
    control = summarize(await p.store.read_retention("exp1"), by=("channel",))[("email",)].control
    assert (control.entered, control.d1_users, control.d1_rate, control.revenue) == (1, 1, 0.0, 0.0)
    # a users tombstone, outside any batch: the figures are written at once
    await p.worker._apply_side(Record(p.s.topics.users, 0, 9, ctl2.encode(), None))
    got = summarize(await p.store.read_retention("exp1"), by=("channel",))[("email",)]
    assert got.control.entered == 0 and got.treated.entered == 1
    assert not any(part.retention.knows_user(u) for part in p.worker.core.parts.values() for u in (ctl, ctl2))


# ---------------------------------------------------------------------------------------- the planted stream
#: what the generator plants, per arm: day-1 return, day-7 return, a purchase in days 2-6 (value U(10, 50))
TRUE = {"treated": {"d1": 0.6, "d7": 0.4, "conv": 0.2}, "control": {"d1": 0.3, "d7": 0.25, "conv": 0.1}}
MEAN_VALUE = 30.0


def inside(x: float, ci: tuple[float, float]) -> bool:
    return ci[0] <= x <= ci[1]


async def test_a_planted_stream_reports_its_true_retention_increment_and_roi_within_the_intervals():
    rng = random.Random(20241124)
    share, n_users = 0.5, 4_000
    st = Stream(control_share=share)
    p = st.p
    users = [f"p{k}" for k in range(n_users)]
    group = ControlGroup(share)
    arm = {u: "control" if group.is_control(u) else "treated" for u in users}
    st.prefs(users)
    await st.crowd()
    events = []
    planted = {a: {"d1": 0, "d7": 0, "conv": 0, "revenue": 0.0} for a in TRUE}  # what was drawn, per arm
    for u in users:
        truth, tally = TRUE[arm[u]], planted[arm[u]]
        t = T0 + rng.uniform(0, 6 * 3600)  # the first visit: pushed (or ghost-pushed) then
        events.append(st.event(u, "view", t, f"sku-{rng.randrange(12)}"))
        if rng.random() < 0.5:  # between the windows: no return of day 1 or day 7
            events.append(st.event(u, "view", t + rng.uniform(2.2, 6.8) * DAY, f"sku-{rng.randrange(12)}"))
        if rng.random() < truth["d1"]:
            tally["d1"] += 1
            events.append(st.event(u, "view", t + rng.uniform(1.01, 1.99) * DAY, f"sku-{rng.randrange(12)}"))
        if rng.random() < truth["d7"]:
            tally["d7"] += 1
            events.append(st.event(u, "click", t + rng.uniform(7.01, 7.99) * DAY, f"sku-{rng.randrange(12)}"))
        if rng.random() < truth["conv"]:
            value = round(rng.uniform(10, 50), 2)
            tally["conv"] += 1
            tally["revenue"] += value
            events.append(st.event(u, "purchase", t + rng.uniform(2.0, 6.0) * DAY, f"sku-{rng.randrange(12)}",
                                   value=value))
    await st.run(events)
    await st.close_windows(T0 + 10 * DAY)

    stored = await p.store.read_retention("exp1")
    n = {a: sum(1 for u in users if arm[u] == a) for a in ("treated", "control")}
    assert 1_900 < n["control"] < 2_100
    # every user entered their arm, each variant's share of them by the experiment's own hashing
    for (campaign, channel, variant), inc in summarize(stored).items():
        assert (campaign, channel) == ("recs", "email")
        mine = [u for u in users if p.worker.core.experiment.assign(u) == variant]
        assert inc.treated.entered == sum(arm[u] == "treated" for u in mine)
        assert inc.control.entered == sum(arm[u] == "control" for u in mine)
    inc = summarize(stored, by=("channel",))[("email",)]
    t, c = inc.treated, inc.control
    assert (t.entered, c.entered, t.d7_users, c.d7_users, t.users_7d) == (n["treated"], n["control"], n["treated"],
                                                                          n["control"], n["treated"])
    # every planted return and purchase counted, no other event (the views between the windows)
    for f, a in ((t, "treated"), (c, "control")):
        assert (round(f.d1_rate * f.d1_users), round(f.d7_rate * f.d7_users), f.conversions) == \
            (planted[a]["d1"], planted[a]["d7"], planted[a]["conv"])
        assert f.revenue == pytest.approx(planted[a]["revenue"])
    figures = {"treated day 1": (TRUE["treated"]["d1"], t.d1_rate, t.d1_ci),
               "control day 1": (TRUE["control"]["d1"], c.d1_rate, c.d1_ci),
               "treated day 7": (TRUE["treated"]["d7"], t.d7_rate, t.d7_ci),
               "control day 7": (TRUE["control"]["d7"], c.d7_rate, c.d7_ci),
               "treated conversion": (TRUE["treated"]["conv"], t.conversion_rate, t.conversion_ci),
               "control conversion": (TRUE["control"]["conv"], c.conversion_rate, c.conversion_ci),
               "treated revenue/user": (TRUE["treated"]["conv"] * MEAN_VALUE, t.revenue_per_user,
                                        t.revenue_per_user_ci),
               "control revenue/user": (TRUE["control"]["conv"] * MEAN_VALUE, c.revenue_per_user,
                                        c.revenue_per_user_ci)}
    nt = t.users_7d
    true_revenue = (TRUE["treated"]["conv"] - TRUE["control"]["conv"]) * MEAN_VALUE * nt
    assert t.messages >= nt and t.cost == pytest.approx(0.5 * t.messages) and c.cost == 0.0
    figures.update({
        "day-1 lift": (TRUE["treated"]["d1"] - TRUE["control"]["d1"], inc.d1_lift, inc.d1_lift_ci),
        "day-7 lift": (TRUE["treated"]["d7"] - TRUE["control"]["d7"], inc.d7_lift, inc.d7_lift_ci),
        "incremental conversions": ((TRUE["treated"]["conv"] - TRUE["control"]["conv"]) * nt, inc.conversions,
                                    inc.conversions_ci),
        "incremental revenue": (true_revenue, inc.revenue, inc.revenue_ci),
        "ROI": ((true_revenue - inc.cost) / inc.cost, inc.roi, inc.roi_ci)})
    print("\n".join(f"{name:24} true {true:10.4f}  estimated {est:10.4f}  95 % [{ci[0]:.4f}, {ci[1]:.4f}]"
                    for name, (true, est, ci) in figures.items()))
    missed = [name for name, (true, est, ci) in figures.items() if not inside(true, ci)]
    assert not missed, missed
    # and the intervals say something: the increments are told apart from 0
    assert inc.d1_lift_ci[0] > 0.2 and inc.conversions_ci[0] > 0 and inc.roi_ci[0] > 0


def test_the_report_prints_the_cohort_tables_in_100_columns(monkeypatch):
    import asyncio

    from typer.testing import CliRunner

    from infogap.models.retention import Cohort, CohortCounts
    from infogap.stream.store import MemoryStore
    from infogap.stream.tools import cli

    store = MemoryStore()
    # variant B, email: treated 1,000 users, 600 back on day 1, 400 on day 7, 200 bought for 6,000 (each 30),
    # 1,200 messages at 0.5 = 600; control 1,000 users, 300 / 250 back, 100 bought for 3,000
    asyncio.run(store.write_retention("exp1", {
        Cohort(0, "recs", "email", "B", "treated"): CohortCounts(
            entered=1_000, d1_users=1_000, d1_returned=600, d7_users=1_000, d7_returned=400, users_7d=1_000,
            conversions=200, revenue=6_000.0, revenue_sq=200 * 900.0, messages=1_200, cost=600.0),
        Cohort(3, "recs", "email", "B", "control"): CohortCounts(
            entered=1_000, d1_users=1_000, d1_returned=300, d7_users=1_000, d7_returned=250, users_7d=1_000,
            conversions=100, revenue=3_000.0, revenue_sq=100 * 900.0, messages=1_150)}))

    class Closing:  # the command closes the store it opens
        def __getattr__(self, name):
            return getattr(store, name)

        async def close(self):
            pass

    monkeypatch.setattr("infogap.stream.store.open_store", lambda settings: Closing())
    monkeypatch.setenv("COLUMNS", "100")
    res = CliRunner().invoke(cli.app, ["report", "--experiment", "exp1"])
    assert res.exit_code == 0, res.output
    out = res.output
    print(out)
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 100
    assert "exp1: retention, treated vs control" in out and "exp1: increment of pushing" in out
    assert "60.0%" in out and "30.0%" in out and "[56.9%, 63.0%]" in out  # day 1, Wilson of 600 in 1,000
    assert "+30.0 pts" in out and "+3.00" in out  # day-1 lift in points, revenue per user lift
    # incremental conversions (0.1 x 1,000) and revenue (3 x 1,000)
    assert "+100.0" in out and "[+68.9, +131.0]" in out and "+3,000" in out
    assert "600.00" in out and "+4.00" in out  # cost and ROI = (3,000 - 600) / 600
    assert "first ghost push" in out and "Wilson" in out  # the definitions


# ---------------------------------------------------------------------------------------- snapshots
async def test_the_cohorts_travel_in_the_partitions_snapshot_and_an_erasure_since_wins():
    from infogap.stream.core.user_stage import UserStage
    from infogap.stream.snapshots import decode, encode

    st = Stream(control_share=0.05)
    p = st.p
    ctl = control_user(0.05, True)
    trt = control_user(0.05, False)
    st.prefs([ctl, trt])
    await st.crowd()
    await st.run([st.event(u, "view", T0 + 100) for u in (ctl, trt)])
    core = p.worker.core
    part = kafka_partition(ctl, N_EVENTS)
    assert core.parts[part].retention.knows_user(ctl)
    record = encode("users", part, 7, core.partition_state(part))
    snap = decode(record, "users", part)
    assert ctl in snap.state["part"]["retention"]["users"]

    other = UserStage(p.s, clock=lambda: T0 + 3600)
    other.restore_partition(part, snap.state, snap.arrays)
    assert other.parts[part].retention.counts() == core.parts[part].retention.counts()
    assert set(other.drain_retention()) == set(core.parts[part].retention.counts())  # written again whole

    # a snapshot from before the cohorts existed: read, with none
    old = {**snap.state, "part": {k: v for k, v in snap.state["part"].items() if k != "retention"}}
    third = UserStage(p.s, clock=lambda: T0 + 3600)
    third.restore_partition(part, old, snap.arrays)
    assert len(third.parts[part].retention) == 0

    # the user erased after the snapshot was taken: restoring it leaves no trace of them in the cohorts
    fourth = UserStage(p.s, clock=lambda: T0 + 3600)
    fourth.erasures.add(ctl)
    fourth.restore_partition(part, snap.state, snap.arrays)
    assert not fourth.parts[part].retention.knows_user(ctl)
    assert all(k.arm != "control" for k in fourth.parts[part].retention.counts())
