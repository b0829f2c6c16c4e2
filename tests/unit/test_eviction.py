"""Per-user state leaves memory: idle users and the least recent past a cap (issue 18, finding 9)."""
from __future__ import annotations

import tracemalloc

import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.push_policy import PushConfig, UserPrefs
from infogap.stream.settings import Settings
from infogap.stream.core.user_partition import UserPartition

T0 = 1_732_449_600.0  # 2024-11-24 12:00 UTC
DAY = 86_400.0


def view(user: str, item: str, ts: float, typ: str = "view") -> dict:
    return {"event_id": f"{user}-{item}-{ts}", "user_id": user, "type": typ, "ts": ts, "item_id": item}


def catalog(engine: Engine, n: int = 20) -> None:
    for k in range(n):
        engine.upsert_item({"item_id": f"i{k}", "title": f"Item {k}", "category": f"c{k % 4}", "tags": [f"t{k % 3}"]})


def partition(**settings) -> tuple[UserPartition, Settings]:
    s = Settings(http_port=None, **settings)
    return UserPartition.new(0, s, PushConfig(min_new_items=1)), s


def test_stale_users_are_the_idle_ones_then_the_least_recent_beyond_the_cap():
    e = Engine()
    catalog(e)
    for k in range(10):
        e.learn_one(view(f"u{k}", f"i{k}", T0 + k * DAY))
    now = T0 + 9 * DAY
    assert sorted(e.stale_users([f"u{k}" for k in range(10)], now, idle_s=6.5 * DAY)) == ["u0", "u1", "u2"]
    assert sorted(e.stale_users([f"u{k}" for k in range(10)], now, keep=4)) == [f"u{k}" for k in range(6)]
    # both: the idle ones, and of the others the least recent beyond the cap
    assert sorted(e.stale_users([f"u{k}" for k in range(10)], now, idle_s=6.5 * DAY, keep=5)) == \
        [f"u{k}" for k in range(5)]
    assert e.stale_users(["u9", "nobody"], now, idle_s=DAY) == ["nobody"]  # not held: nothing to keep
    assert e.stale_users([], now, keep=0) == [] and e.stats()["users"] == 10  # reading changes nothing


def test_an_evicted_users_row_is_reused_clean_and_a_returning_user_starts_fresh():
    e = Engine(EngineConfig(min_users=1))  # (two users: under the privacy floor of 5 nothing would be recommended)
    catalog(e)
    for k in range(6):
        e.learn_one(view("ann", f"i{k}", T0 + k, "purchase" if k % 2 else "view"))
    e.learn_one(view("bob", "i1", T0 + 10))
    rows = e.stats()["user_rows"]
    assert e.evict_users(["ann", "ann", "nobody"]) == 1
    assert not e.known_user("ann") and e.profile("ann") is None and e.segment("ann") is None
    assert sum(e.state.segmenter.sizes()) == len(e.state.profiles) == 1  # segment membership left with the row
    e.learn_one(view("cat", "i7", T0 + 20))  # takes ann's row: nothing of ann in it
    assert e.stats()["user_rows"] == rows and e.query_items("cat") == ["i7"]
    assert e.state.profiles.consumed(e.state.profiles.find("cat")).size == 0 and e.profile("cat")["events"] == 1
    assert e.profile("cat")["categories"] == {"c3": pytest.approx(0.5), "t1": pytest.approx(0.5)}
    e.learn_one(view("ann", "i9", T0 + 30))  # ann comes back: a new user
    assert e.profile("ann")["events"] == 1 and e.query_items("ann") == ["i9"]
    assert {r.item_id for r in e.recommend("ann", n=20)} & {"i1", "i3", "i5"}  # her purchases are not excluded


def test_eviction_differs_from_erasure_push_state_stays_within_its_windows():
    part, s = partition(user_idle_evict_s=10 * DAY, max_users_per_partition=0)
    e = Engine(EngineConfig(min_users=1))  # (two users: under the privacy floor of 5 nothing would be recommended)
    catalog(e)
    prefs = UserPrefs("ann", {"app": True}, quiet_hours=None)
    e.learn_one(view("ann", "i1", T0))
    part.touch("ann")
    assert part.push.decide(prefs, e.recommend("ann", n=3), now=T0)  # a push: the daily cap counts it
    e.learn_one(view("bob", "i2", T0 + 11 * DAY))
    part.touch("bob")
    assert part.evict(e, T0 + 11 * DAY, 2, s) == ["ann"]
    assert not e.known_user("ann") and part.users == {"bob"}
    assert not part.push.knows("ann")  # its repeat window (7 days) and the day of its send are over

    part2, s2 = partition(user_idle_evict_s=DAY, max_users_per_partition=0)
    e.learn_one(view("cid", "i1", T0 + 11 * DAY))
    part2.touch("cid")
    prefs = UserPrefs("cid", {"app": True}, quiet_hours=None)
    assert part2.push.decide(prefs, e.recommend("cid", n=3), now=T0 + 11 * DAY)
    assert part2.evict(e, T0 + 13 * DAY, 1, s2) == ["cid"]
    assert part2.push.knows("cid")  # pushed 2 days ago: still within the repeat window, the state stays
    assert not part2.push.evict_user("cid", float("-inf"))  # no event time to tell: kept


def test_sweeps_are_amortised_over_the_cap_or_event_time_and_events():
    class Counting(Engine):
        sweeps = 0

        def stale_users(self, *args, **kwargs):
            Counting.sweeps += 1
            return super().stale_users(*args, **kwargs)

    part, s = partition(user_idle_evict_s=0, max_users_per_partition=100)
    e = Counting()
    catalog(e)
    ts = T0
    for k in range(1_000):  # one event a minute, one batch of 10 events each
        ts = T0 + 60.0 * k
        e.learn_one(view(f"u{k}", f"i{k % 20}", ts))
        part.touch(f"u{k}")
        if k % 10 == 9:
            part.evict(e, ts, 10, s)
            assert len(part.users) <= 100 and e.stats()["users"] <= 100
    # a sweep only over the cap, down to 90 users: then every 2 batches (of 10 new users), from the 110th user
    assert Counting.sweeps == len(range(109, 1_000, 20)) == 45
    part2, s = partition(user_idle_evict_s=30 * DAY, max_users_per_partition=0, user_evict_every_s=3_600.0)
    e2 = Counting()
    catalog(e2)
    Counting.sweeps = 0
    for k in range(1_000):  # no cap: only an idle sweep per hour of event time (and a quarter of the users)
        ts = T0 + 60.0 * k
        e2.learn_one(view(f"u{k % 50}", f"i{k % 20}", ts))
        part2.touch(f"u{k % 50}")
        if k % 10 == 9:
            part2.evict(e2, ts, 10, s)
    assert Counting.sweeps == len(range(9, 1_000, 60)) == 17  # the first batch's, then one an hour


@pytest.mark.slow
def test_a_flood_of_one_event_users_leaves_at_most_the_cap_and_bounded_memory():
    """200,000 one-event user ids through the worker's engine (co-occurrence and population learned
    elsewhere) and partition, in batches of 2,000 (the path ``Worker.process`` takes), cap 10,000."""
    part, s = partition(max_users_per_partition=10_000)
    e = Engine(EngineConfig(), cooc="remote", population="remote")
    catalog(e, 200)
    batch, n, traced_from = 2_000, 200_000, 160_000

    def learn(k0: int) -> None:
        evs = [view(f"flood-{k}", f"i{k % 200}", T0 + k * 0.01) for k in range(k0, k0 + batch)]
        e.learn_many(evs)
        e.drain_pair_deltas(), e.drain_population()  # what the worker sends on
        for ev in evs:
            part.touch(ev["user_id"])
        part.evict(e, evs[-1]["ts"], batch, s)
        assert e.stats()["users"] <= 10_000 and len(part.users) <= 10_000

    for k0 in range(0, traced_from, batch):
        learn(k0)
    rows = e.stats()["user_rows"]
    tracemalloc.start()  # the last 40,000 users: what they leave allocated once learned (and evicted)
    try:
        for k0 in range(traced_from, n, batch):
            learn(k0)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    st = e.stats()
    assert st["users"] <= 10_000 and e.known_user(f"flood-{n - 1}") and not e.known_user("flood-0")
    assert st["user_rows"] == rows <= 10_000 + batch  # rows are reused: the arrays stopped growing
    # measured 6.4 MB (the 9,000 users held at the end were all created in the traced part); kept (no cap),
    # the same 40,000 users took 51 MB, and the flood's 200,000 grew the history arrays to 262,144 rows (380 MB)
    assert grown < 20 * 2**20, f"{grown / 2**20:.1f} MB"
