"""The privacy floor: nothing published stands on fewer than ``min_users`` distinct users (docs/privacy.md).

A planted pair that one user made alone, however often, must never appear: not in ``Engine.similar``, not in
``ig:similar`` or ``ig:nbrow`` through the stream core, not in a reason, and not recommended because of it;
the same stream with the floor off (``min_users=1``) shows it, so the tests see the floor's doing.
"""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.cooc_shard import CoOccurrenceShard, PairDeltas
from infogap.models.cooccurrence import COUNT
from infogap.models.population import PopulationLearner
from infogap.models.privacy import NO_USER, PrivacyLedger, user_bit
from infogap.models.trending import Trending
from infogap.stream.core.neighbour_rows import decode_row

from .test_stream_core import CATALOG, T0, Pipeline, ev

DAY = 86_400.0


def view(n: int, user: str, item: str, t: float, typ: str = "view") -> dict:
    return {"event_id": f"e{n}-{user}", "user_id": user, "item_id": item, "type": typ, "ts": t}


def _distinct_users(n: int, prefix: str = "u") -> list[str]:
    """``n`` user ids whose bits all differ (so that n users show as n in a bitmap)."""
    out, bits, k = [], set(), 0
    while len(out) < n:
        u = f"{prefix}{k}"
        if user_bit(u) not in bits:
            bits.add(user_bit(u))
            out.append(u)
        k += 1
    return out


def _stream() -> list[dict]:
    """Twelve users view x then y (a pair they all made); one user, alone, views a and b twenty times each."""
    evs = []
    for k, u in enumerate(_distinct_users(12, "crowd")):
        evs += [view(2 * k, u, "x", T0 + 100 * k), view(2 * k + 1, u, "y", T0 + 100 * k + 10)]
    evs += [view(100 + j, "loner", "a" if j % 2 == 0 else "b", T0 + 5000 + 30 * j) for j in range(40)]
    return evs


def _engine(min_users: int = 5, **cfg) -> Engine:
    e = Engine(EngineConfig(min_users=min_users, **cfg))
    for item, title in (("a", "Alpha"), ("b", "Beta"), ("x", "Ex"), ("y", "Why")):
        e.upsert_item({"item_id": item, "title": title, "category": "c"})
    return e


def test_a_pair_one_user_made_is_never_published_nor_cited():
    e = _engine()
    e.learn_many(_stream())
    assert "b" not in [n.item_id for n in e.similar("a", 100)] and "a" not in [n.item_id for n in e.similar("b", 100)]
    assert [n.item_id for n in e.similar("x")] == ["y"]  # twelve users made that one
    co, cat = e.state.cooc, e.state.catalog
    s = co._index.get((cat.row("a") << 32) | cat.row("b"))
    assert s >= 0 and co.vals[COUNT, s] >= 19 and co.sq[1, s] > 0  # learned, and it votes (floor_votes is off)
    assert co.pair(cat.row("a"), cat.row("b"))["at_floor"] is False
    e.learn_one(view(999, "newcomer", "a", T0 + 9000))  # someone views a: b may rank, but the pair is never cited
    recs = e.recommend("newcomer", 20)
    assert "b" in [r.item_id for r in recs]
    assert not [r.reason for r in recs if "Alpha" in r.reason or "once (lift" in r.reason]
    # the same stream without the floor: the pair is published and cited
    off = _engine(min_users=1)
    off.learn_many(_stream())
    off.learn_one(view(999, "newcomer", "a", T0 + 9000))
    assert "b" in [n.item_id for n in off.similar("a")]
    assert [r.reason for r in off.recommend("newcomer", 20) if r.item_id == "b"][0].startswith("viewed together with Alpha")


def test_with_floor_votes_a_pair_below_the_floor_does_not_rank_either():
    e = _engine(floor_votes=True)
    e.learn_many(_stream())
    co, cat = e.state.cooc, e.state.catalog
    s = co._index.get((cat.row("a") << 32) | cat.row("b"))
    assert s >= 0 and co.vals[COUNT, s] >= 19 and co.sq[:, s].tolist() == [0.0, 0.0]  # learned, but no votes
    e.learn_one(view(999, "newcomer", "a", T0 + 9000))  # someone views a: b is not recommended because of a
    recs = e.recommend("newcomer", 20)
    assert "b" not in [r.item_id for r in recs] and not [r.reason for r in recs if "Alpha" in r.reason]
    assert [n.item_id for n in e.similar("x")] == ["y"]


def test_a_pair_becomes_public_at_the_kth_distinct_user_and_not_before():
    e = _engine(min_support=1)
    users = _distinct_users(5, "p")
    for k, u in enumerate(users):
        e.learn_many([view(2 * k, u, "a", T0 + 100 * k), view(2 * k + 1, u, "b", T0 + 100 * k + 10)])
        assert ("b" in [n.item_id for n in e.similar("a")]) == (k == 4), k
    e.learn_many([view(50 + j, users[0], "x" if j % 2 else "y", T0 + 1000 + j) for j in range(30)])  # many events of one
    assert e.similar("x") == []


@pytest.mark.parametrize("floor_votes", [False, True])
def test_learn_one_and_learn_many_give_the_same_bitmaps_and_votes(floor_votes):
    evs = _stream()
    one, many = _engine(floor_votes=floor_votes), _engine(floor_votes=floor_votes)
    for x in evs:
        one.learn_one(x)
    many.learn_many(evs)
    for name in ("users", "sq", "vals"):
        assert np.array_equal(getattr(one.state.cooc, name), getattr(many.state.cooc, name)), name
    assert np.array_equal(one.state.trending.users_, many.state.trending.users_)


def test_a_trending_entry_of_fewer_than_k_users_is_not_listed():
    cfg = EngineConfig(n_segments=2, min_users=5)
    learner = PopulationLearner(cfg)
    users = _distinct_users(5)
    trends = [[k, "hot", 1, 1.0, T0 + k, user_bit(users[k % 4])] for k in range(20)]  # 4 users, 20 events
    trends += [[20 + k, "solo", 1, 50.0, T0 + 20 + k, user_bit("loner")] for k in range(20)]  # 1 user, heavy
    learner.learn({"trend": trends}, source=0)
    assert learner.trending(10, 1) == [] and learner.trending(10) == []
    learner.learn({"trend": [[40, "hot", 1, 1.0, T0 + 40, user_bit(users[4])]]}, source=0)
    assert [i for i, _ in learner.trending(10, 1)] == ["hot"] and [i for i, _ in learner.trending(10)] == ["hot"]
    learner.learn({"trend": [[41, "old", 1, 1.0, T0 + 41]] * 1}, source=0)  # an entry from before the bits: no user
    assert "old" not in [i for i, _ in learner.trending(10)]


def test_an_engines_trending_and_trend_reasons_keep_the_floor():
    e = _engine()
    e.learn_many(_stream())
    assert {i for i, _ in e.trending(10)} == {"x", "y"}  # a and b: one user
    cold = e.recommend("nobody", 10)  # (a and b may still come as the catalog's new items, not as trending)
    assert [r.item_id for r in cold if r.reason == "trending now"] and not [
        r for r in cold if r.item_id in ("a", "b") and r.reason != "new in c"]


#: the floor these tests check (EngineConfig's default may be another: docs/privacy.md)
FLOOR = EngineConfig(door_bits=0, min_support=1, min_users=5)


def _deltas() -> PairDeltas:
    eng = Engine(FLOOR, cooc="remote")
    eng.learn_many(_stream())
    return eng.drain_pair_deltas()


def test_a_cooc_record_of_the_format_before_user_bits_reads_and_adds_no_user():
    d = _deltas()
    raw = d.to_bytes()
    n = int.from_bytes(raw[:4], "big")
    head = orjson.loads(raw[4: 4 + n])
    assert head["v"] == 2 and set(d.ubit.tolist()) <= {user_bit(u) for u in {e["user_id"] for e in _stream()}}
    del head["v"]  # as written before: no version, no user bits at the end
    old_head = orjson.dumps(head)
    old = len(old_head).to_bytes(4, "big") + old_head + raw[4 + n: len(raw) - len(d)]
    back = PairDeltas.from_bytes(old)
    assert np.array_equal(back.row, d.row) and np.array_equal(back.d, d.d) and (back.ubit == NO_USER).all()
    shard = CoOccurrenceShard.for_engine(FLOOR)
    shard.apply(back, source=0)
    assert shard.similar("x", min_support=1) == [] and not shard.co.users.any()  # no user known: none at the floor
    shard.set_floor(1)
    assert [n.item_id for n in shard.similar("x", min_support=1)] == ["y"]
    with pytest.raises(ValueError, match="user bit"):
        bad = PairDeltas(**{**d.__dict__, "ubit": np.full(len(d), 64, np.uint8)})
        PairDeltas.from_bytes(bad.to_bytes())


def test_a_shard_snapshot_without_bitmaps_restores_with_none_and_publishes_only_what_new_users_make():
    cfg = FLOOR
    shard = CoOccurrenceShard.for_engine(cfg)
    shard.apply(_deltas(), source=0)
    assert [n.item_id for n in shard.similar("x", min_support=1)] == ["y"]
    row = shard.export_row("a")  # the user stages may rank with a -> b, never cite it
    assert list(row["neighbours"]) == ["b"] and row["private"].tolist() == [0]
    assert shard.export_row("x")["neighbours"] == ["y"] and shard.export_row("x")["private"].tolist() == []
    state = shard.to_state()
    del state["co"]["users"], state["co"]["min_users"], state["co"]["vote_min_users"]  # as before the floor
    old = CoOccurrenceShard.from_state(state)
    old.set_floor(cfg.min_users)
    assert old.similar("x", min_support=1) == [] and old.export_row("x")["private"].tolist() == [0]
    strict = CoOccurrenceShard.from_state(state)
    strict.set_floor(cfg.min_users, floor_votes=True)
    assert strict.export_row("x")["neighbours"] == []
    eng = Engine(FLOOR, cooc="remote")
    users = _distinct_users(5, "new")
    eng.learn_many([view(k, u, i, T0 + 9000 + k) for k, (u, i) in enumerate((u, i) for u in users for i in "xy")])
    old.apply(eng.drain_pair_deltas(), source=1)
    assert [n.item_id for n in old.similar("x", min_support=1)] == ["y"]
    tr = Trending(n_segments=2, min_users=5)  # trending from before the bitmaps: none, so nothing listed
    tr.ensure(1)
    tr.add([0], [0], [1.0], [1.0], np.array([1], np.uint64))
    t_state = tr.to_state()
    del t_state["users_"]
    back = Trending(n_segments=2, min_users=5)
    back.restore_state(t_state)
    assert back.top(5).size == 0 and back.users_.shape == (3, tr.users_.shape[1])


@pytest.fixture(params=[False, True], ids=["votes-unfloored", "floor-votes"])
async def pipeline(request):
    """test_stream_core's pipeline, with the privacy floor at 5, on the votes too or not."""
    from infogap.stream.settings import Settings

    s = Settings(http_port=None, engine={"min_users": 5, "floor_votes": request.param})
    p = Pipeline(s)
    for item in CATALOG:
        p.side(s.topics.items, item["item_id"], item)
    yield p
    await p.close()


async def test_the_planted_pair_never_reaches_the_store_nor_a_reason(pipeline):
    p = pipeline
    assert p.worker.engine.config.min_users == 5
    crowd = _distinct_users(8, "crowd")
    await p.batch([p.record(ev(k, u, item, T0 + i), u) for i, u in enumerate(crowd)
                   for k, item in enumerate(("sku-1", "sku-2", "sku-3"))])
    await p.batch([p.record(ev(100 + j, "loner", "sku-10" if j % 2 == 0 else "sku-11", T0 + 200 + j), "loner")
                   for j in range(24)])
    await p.batch([p.record(ev(1, "alice", "sku-10", T0 + 400), "alice"),
                   p.record(ev(1, "bob", "sku-1", T0 + 400), "bob")])
    assert "sku-11" not in [n["item_id"] for n in await p.store.similar("sku-10")]  # the Redis value
    assert "sku-10" not in [n["item_id"] for n in await p.store.similar("sku-11")]
    strict = p.worker.engine.config.floor_votes
    for item in ("sku-10", "sku-11"):  # the rows the user stages rank with (Redis ig:nbrow): private, or absent
        raw = (await p.store.read_rows([item]))[0]
        row = decode_row(raw)
        other = ({"sku-10", "sku-11"} - {item}).pop()
        if strict:
            assert other not in row["neighbours"]
        else:
            assert list(row["neighbours"]).index(other) in row["private"].tolist()
    assert {"sku-2", "sku-3"} <= {n["item_id"] for n in await p.store.similar("sku-1")}  # eight users: published
    alice = orjson.loads(await p.store.recs("alice"))
    assert ("sku-11" in [i["item_id"] for i in alice["items"]]) is not strict  # votes, unless floor_votes
    assert not [i for i in alice["items"] if "Product 10" in i["reason"] or "once (lift" in i["reason"]], alice
    bob = orjson.loads(await p.store.recs("bob"))
    assert {i["item_id"] for i in bob["items"][:2]} == {"sku-2", "sku-3"}, bob  # votes of a pair of eight users
    trending = [i for i, _ in await p.store.trending(None, 20)]
    assert trending and not {"sku-10", "sku-11"} & set(trending)  # one user: not trending


def test_the_ledger_sums_epsilon_per_day_and_kind():
    led = PrivacyLedger()
    for _ in range(3):
        led.spend("2024-11-24", "similar", 0.1)
    led.spend("2024-11-25", "trending", 0.5)
    assert led.day("2024-11-24") == {"similar": pytest.approx(0.3)} and led.total("2024-11-25") == 0.5
    assert PrivacyLedger.from_state(orjson.loads(orjson.dumps(led.to_state()))).days == led.days


def _users(n: int) -> int:
    mask = 0
    for u in _distinct_users(n, "r"):
        mask |= 1 << user_bit(u)
    return mask


def test_a_report_cell_below_k_users_shows_no_figures_nor_a_total_that_gives_it_away():
    from rich.console import Console

    from infogap.models.experiments import Counts, Segment
    from infogap.stream.tools.cli import _experiment_tables

    counts = {Segment(0, "recs", "email", "A"): Counts(sent=120, clicks=9, revenue=310.5, users=_users(6)),
              Segment(1, "recs", "app", "A"): Counts(sent=3, clicks=2, revenue=77.0, users=_users(2)),
              Segment(0, "recs", "email", "B"): Counts(sent=4, clicks=1, users=_users(4)),
              Segment(1, "recs", "email", "B"): Counts(sent=40, clicks=5, users=_users(4))}  # the same 4 users
    out = Console(width=100, record=True)
    for table in _experiment_tables("exp", counts, 5):
        out.print(table)
    text = out.export_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(("A ", "B "))]
    app = [line for line in lines if " app " in line]
    assert app and all("< 5 users" in line and "77" not in line and " 3 " not in line for line in app), text
    assert all("< 5 users" in line for line in lines if line.startswith("A ") and " all " in line)  # A's total
    assert any("120" in line for line in lines if " email " in line and line.startswith("A "))  # 6 users: shown
    assert all("< 5 users" in line and "44" not in line for line in lines if line.startswith("B ")), text
    out = Console(width=100, record=True)  # the floor off: every figure
    for table in _experiment_tables("exp", counts, 1):
        out.print(table)
    text = out.export_text()
    assert "< 5 users" not in text and "77.00" in text


def test_experiment_counts_keep_their_users_bitmap_through_sends_feedback_and_shards():
    from infogap.models.experiments import Counts, ExperimentMetrics, MetricsConfig, summarize

    m = ExperimentMetrics(MetricsConfig(shards=2))
    users = _distinct_users(5, "m")
    for k, u in enumerate(users):
        m.record_send({"message_id": f"m{k}", "user_id": u, "channel": "email", "campaign": "recs", "variant": "A",
                       "items": [], "created_at": T0})
        m.record_send({"message_id": f"n{k}", "user_id": u, "channel": "email", "campaign": "recs", "variant": "A",
                       "items": [], "created_at": T0})
    f = summarize(m.counts(), by=("variant",))[("A",)]
    assert f.sent == 10 and f.users == 5 and f.shown(5) and not f.shown(6)  # shards ORed, not added
    assert len({seg.shard for seg in m.counts()}) == 2
    back = ExperimentMetrics()
    back.restore_state(orjson.loads(orjson.dumps(m.to_state(), option=orjson.OPT_SERIALIZE_NUMPY)) | {
        k: v for k, v in m.to_state().items() if hasattr(v, "dtype")})
    assert back.counts() == m.counts()
    state = m.to_state()
    state["counts"] = [row[:-1] for row in state["counts"]]  # a snapshot from before the bitmap
    old = ExperimentMetrics()
    old.restore_state(state)
    assert all(c.users == 0 and c.sent for c in old.counts().values())
    assert Counts.from_dict({k: str(v) for k, v in Counts(sent=2, users=(1 << 63) | 1).to_dict().items()}).users == \
        (1 << 63) | 1


async def test_noise_on_published_counts_spends_epsilon_per_publish_and_day():
    from infogap.models.privacy import PrivacyLedger
    from infogap.stream.core.item_shards import ItemShards
    from infogap.stream.core.user_stage import Record
    from infogap.stream.privacy import PublishNoise
    from infogap.stream.settings import Settings
    from infogap.stream.store import MemoryStore, RedisKeys

    settings = Settings(http_port=None, privacy_epsilon=0.5, similar_n=50)
    cfg = EngineConfig(door_bits=0, min_support=1)
    shards = ItemShards(settings, cfg)
    assert shards.noise is not None and shards.noise.epsilon == 0.5
    clock = [T0]
    shards.noise = PublishNoise(0.5, rng=np.random.default_rng(7), clock=lambda: clock[0])
    exact = CoOccurrenceShard.for_engine(cfg)
    for p in (0, 1):
        shards.take(p)
    store = MemoryStore(RedisKeys("t:"), 600)
    for day, n in ((0, 2), (1, 1)):  # two publishes on the first day, one on the next
        for k in range(n):
            users = Engine(cfg, cooc="remote", population="remote")
            users.learn_many([view(j, u, i, T0 + day * DAY + 100 * k + j) for j, (u, i) in
                              enumerate((u, i) for u in _distinct_users(6, f"d{day}k{k}") for i in "xy")])
            deltas = users.drain_pair_deltas()
            exact.apply(deltas, source=10 * day + k)
            batch = orjson.dumps(users.drain_population())
            shards.apply(0, [Record("cooc", 0, 0, None, deltas.to_bytes(), headers=(("source", f"{10 * day + k}".encode()),)),
                             Record("cooc", 0, 1, None, batch, headers=(("source", f"{10 * day + k}".encode()),
                                                                        ("kind", b"population")))])
            clock[0] = T0 + day * DAY + 100 * k
            pub = shards.publication()
            while pub.encode(250):
                pass
            await store.write(**pub.write())
    published = await store.similar("x")
    truth = exact.similar("x", 50, min_support=1)
    assert [n["item_id"] for n in published] == ["y"] and published[0]["support"] != pytest.approx(truth[0].support)
    led = PrivacyLedger.from_state(orjson.loads((await store.read_privacy(2))[0]))
    assert led.day("2024-11-24") == {"similar": pytest.approx(1.0), "trending": pytest.approx(1.0)}
    assert led.day("2024-11-25") == {"similar": pytest.approx(0.5), "trending": pytest.approx(0.5)}
    assert (await store.read_privacy(2))[1] is None  # partition 1 published nothing
    assert shards.noise.spent == {"similar": pytest.approx(1.5), "trending": pytest.approx(1.5)}
    back = ItemShards(settings, cfg)  # the ledger is in the partition's snapshot
    back.restore(0, orjson.loads(orjson.dumps(shards.state(0), option=orjson.OPT_SERIALIZE_NUMPY))
                 | {"shard": shards.state(0)["shard"], "population": shards.state(0)["population"]})
    assert back.ledgers[0].days == led.days


def test_the_report_prints_the_epsilon_spent_per_day(monkeypatch):
    from rich.console import Console

    import infogap.stream.store as store_mod
    import infogap.stream.tools.cli as cli
    from infogap.stream.settings import Settings
    from infogap.stream.store import MemoryStore, RedisKeys

    store = MemoryStore(RedisKeys("t:"), 600)
    ledgers = [PrivacyLedger(), PrivacyLedger()]
    for _ in range(3):
        ledgers[0].spend("2024-11-24", "similar", 0.5)
    ledgers[0].spend("2024-11-24", "trending", 0.5)
    ledgers[1].spend("2024-11-24", "similar", 0.5)
    ledgers[1].spend("2024-11-25", "similar", 0.5)
    import asyncio
    asyncio.run(store.write(privacy={p: orjson.dumps(led.to_state()) for p, led in enumerate(ledgers)}))

    class _Kept(MemoryStore):
        async def close(self):  # (the report closes its store; this one is read again below)
            pass

    store.__class__ = _Kept
    monkeypatch.setattr(store_mod, "open_store", lambda settings: store)
    out = Console(width=100, record=True)
    monkeypatch.setattr(cli, "console", out)
    assert cli._print_privacy_budget(Settings(http_port=None))
    text = out.export_text()
    day1 = [c.strip() for c in next(line for line in text.splitlines() if "2024-11-24" in line).strip(" │").split("│")]
    assert day1 == ["2024-11-24", "2", "0.5", "5", "2.5"], text  # similar 4 x 0.5, trending 0.5; 5 publishes; total 2.5
    assert "2024-11-25" in text
