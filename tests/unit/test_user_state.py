"""Moving users between engines (partition rebalance): export_users / import_users."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from infogap.models import Engine, EngineConfig
from infogap.models.user_state import export_users, import_users, user_records

from .test_models_support import event, group_stream, random_stream

#: Fast decay and small bounds: renormalisations (different t0 in A and B), ring wrap-around, max_consumed.
#: Half-lives of hours, not minutes: over the 30-day stream a quiet user's figures shrink by 2**-100,
#: not by 2**-1500, which underflows doubles and empties the category mix in one engine but not the other.
FAST = EngineConfig(half_life_days=0.3, cooc_half_life_days=0.4, trending_half_life_days=0.2,
                    momentum_half_life_days=0.5, history_len=5, window=3, dir_window=2, query_len=4,
                    max_consumed=3, n_segments=3, segment_every=3)
CONFIGS = {"default": EngineConfig(), "fast": FAST}


def stream(seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """Events (ts increasing) with views, purchases (with value), rates, dismisses and item-less events;
    catalog items with categories and tags; users. Every user's last event is a purchase, so every
    moved user has owned items to filter."""
    evs, items, _ = group_stream(n_groups=2, users_per_group=4, items_per_group=8, events_per_user=15, seed=seed)
    extra = random_stream(200, n_users=6, n_items=12, seed=seed)
    items += [{"item_id": f"i{j}", "category": f"C{j % 2}", "tags": ["t"]} for j in range(0, 12, 3)]
    evs = sorted(evs + extra, key=lambda e: e["ts"])
    users = sorted({e["user_id"] for e in evs})
    last = {e["user_id"]: e for e in evs if "item_id" in e}
    evs += [event(10 ** 6 + k, u, last[u]["item_id"], evs[-1]["ts"] + 60.0 * (k + 1), "purchase", value=9.5)
            for k, u in enumerate(users)]
    return evs, items, users


def engine(cfg: EngineConfig, items: list[dict], evs: list[dict]) -> Engine:
    e = Engine(cfg)
    for it in items:
        e.upsert_item(it)
    e.learn_many(evs)
    return e


def absolute(state: dict, at: float) -> dict:
    """The users' records with decayed figures as values at time ``at`` (comparable across engines)."""
    d = math.exp(-state["lam"] * (at - state["t0"]))
    return {u: {**rec, "freq": rec["freq"] * d, "money": rec["money"] * d,
                "feats": {f: w * d for f, w in rec["feats"].items()}} for u, rec in user_records(state).items()}


def assert_same_records(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for u in a:
        ra, rb = a[u], b[u]
        assert ra.keys() == rb.keys()
        for k in ra:
            if k == "feats":
                assert ra[k].keys() == rb[k].keys()
                assert list(rb[k].values()) == pytest.approx(list(ra[k].values()), rel=1e-9)
            elif k in ("freq", "money"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-9)
            else:
                assert rb[k] == ra[k], (u, k)


def assert_same_profile(pa: dict, pb: dict) -> None:
    for k in ("recency_days", "frequency", "monetary"):
        assert pb[k] == pytest.approx(pa[k], rel=1e-9)
    assert pb["events"] == pa["events"] and pb["segment"] == pa["segment"]
    assert pb["categories"].keys() == pa["categories"].keys()  # shares are rounded to 4 decimals
    assert list(pb["categories"].values()) == pytest.approx(list(pa["categories"].values()), abs=1.01e-4)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), pick=st.integers(1, 2 ** 14 - 1), cfg=st.sampled_from(sorted(CONFIGS)))
@example(seed=7147, pick=1, cfg="default")  # CI found it: the one moved user had bought nothing
def test_moved_users_arrive_whole_in_an_engine_with_other_numbering(seed, pick, cfg):
    evs, items, users = stream(seed)
    moved = [u for k, u in enumerate(users) if pick >> (k % 14) & 1]
    a = engine(CONFIGS[cfg], items, evs)
    # B learned only the other users' events, and saw the items in another order (other rows)
    b = engine(CONFIGS[cfg], items[::-1], [e for e in evs if e["user_id"] not in moved])
    assert any(a.state.catalog.find(i["item_id"]) != b.state.catalog.find(i["item_id"]) for i in items)

    state = export_users(a, moved + ["nobody"])
    import_users(b, state)

    assert sorted(state["users"]) == sorted(moved)
    assert b.state.now == a.state.now
    assert_same_records(absolute(state, a.state.now), absolute(export_users(b, moved), b.state.now))
    n_items = len(b.state.catalog)
    for u in moved:
        assert_same_profile(a.profile(u), b.profile(u))
        assert b.segment(u) == a.segment(u)
        assert [b.state.profiles.find(u) in m for m in map(b.state.segmenter.members, range(b.config.n_segments))].count(True) == \
            (b.segment(u) is not None)
        owned = set(user_records(state)[u]["consumed"])
        assert not owned & {r.item_id for r in b.recommend(u, n_items)}
    assert all(user_records(state)[u]["consumed"] for u in moved)


def test_export_forget_import_in_place_changes_nothing():
    evs, items, users = stream(3)
    half = len(evs) // 2
    a = engine(EngineConfig(), items, evs[:half])
    twin = copy.deepcopy(a)
    moved = users[::2]
    state = export_users(a, moved)
    for u in moved:
        a.forget_user(u)
    assert not any(a.known_user(u) for u in moved)
    import_users(a, state)
    for u in users:
        assert [r.item_id for r in a.recommend(u)] == [r.item_id for r in twin.recommend(u)]
        assert a.profile(u) == twin.profile(u)
    # and both learn on identically
    a.learn_many(evs[half:])
    twin.learn_many(evs[half:])
    for u in users:
        assert [r.item_id for r in a.recommend(u)] == [r.item_id for r in twin.recommend(u)]
        assert a.profile(u) == twin.profile(u)


def test_import_replaces_existing_state_and_an_empty_engine_adopts_t0():
    evs, items, users = stream(5)
    a = engine(EngineConfig(), items, evs)
    u = evs[-1]["user_id"]  # the newest event is theirs: an engine of only this user has a's clock
    state = export_users(a, [u])
    a.learn_one({"event_id": "late", "user_id": u, "type": "purchase", "ts": a.state.now, "item_id": "brand-new"})
    import_users(a, state)
    assert user_records(export_users(a, [u])) == user_records(state)

    fresh = Engine()
    import_users(fresh, state)
    assert fresh.state.t0 == a.state.t0 and fresh.profile(u) == a.profile(u)
    assert fresh.state.catalog.find(user_records(state)[u]["hist_item"][-1]) is not None  # rows made for unknown items


def test_record_holds_ids_not_rows():
    evs, items, users = stream(7)
    a = engine(FAST, items, evs)
    state = export_users(a, users)
    known = {a.state.catalog.item_id(r) for r in range(len(a.state.catalog))}
    for rec in user_records(state).values():
        assert all(isinstance(i, str) and i in known for i in rec["hist_item"] + rec["consumed"] + [rec["last_item"]])
        assert all(isinstance(f, str) for f in rec["feats"])
        assert set(rec["hist_type"]) <= {"view", "click", "add_to_cart", "purchase", "rate", "push_open",
                                          "push_click"}


def test_state_pickles():
    evs, items, users = stream(11)
    a = engine(EngineConfig(), items, evs)
    state = export_users(a, users)
    back = pickle.loads(pickle.dumps(state))
    assert user_records(back) == user_records(state)
    b = Engine()
    import_users(b, back)
    assert all(b.profile(u) == a.profile(u) for u in users)


def test_rejects_foreign_versions_and_segments():
    evs, items, users = stream(1)
    state = export_users(engine(EngineConfig(), items, evs), users)
    with pytest.raises(ValueError, match="version"):
        import_users(Engine(), {**state, "version": 99})
    if any(rec["segment"] >= 1 for rec in user_records(state).values()):
        with pytest.raises(ValueError, match="segments"):
            import_users(Engine(EngineConfig(n_segments=1)), state)


def test_a_version_1_record_a_dict_per_user_still_imports():
    """Snapshots written before the columns: a record per user, by user id."""
    evs, items, users = stream(13)
    a = engine(FAST, items, evs)
    state = export_users(a, users)
    old = {"version": 1, "t0": state["t0"], "lam": state["lam"], "users": user_records(state)}
    b = Engine(FAST)
    import_users(b, old)
    assert all(b.profile(u) == a.profile(u) for u in users)
    assert user_records(export_users(b, users)).keys() == set(users)
