"""Segment centers and trending across a restart or a partition move: models/population.py."""
from __future__ import annotations

from collections import Counter

import pytest

from models import Engine, EngineConfig
from models.population import export_population, import_population, reassign_segments
from models.user_state import export_users, import_users

from .test_models_support import group_stream

CFG = EngineConfig(n_segments=3)


def engine(items, evs, cfg=CFG) -> Engine:
    e = Engine(cfg)
    for it in items:
        e.upsert_item(it)
    e.learn_many(evs)
    return e


def restarted(a: Engine, items, users) -> Engine:
    """What a restarted worker holds: the catalog, then the snapshot (population first, then users)."""
    b = Engine(a.config)
    for it in items[::-1]:  # other item rows than a's
        b.upsert_item(it)
    assert import_population(b, export_population(a))
    import_users(b, export_users(a, users))
    return b


def shifted(evs, after: float, tag: str) -> list[dict]:
    return [dict(x, ts=x["ts"] - evs[0]["ts"] + after + 60.0, event_id=tag + x["event_id"]) for x in evs]


def test_a_restart_keeps_segment_ids_and_trending_and_both_learn_on_alike():
    evs, items, users = group_stream(n_groups=3, users_per_group=10, events_per_user=20)
    a = engine(items, evs)
    b = restarted(a, items, list(users))
    assert b._segmenter.centers() == a._segmenter.centers()
    assert all(b.segment(u) == a.segment(u) is not None for u in users)
    for seg in (None, 0, 1, 2):
        ta, tb = a.trending(10, segment=seg), b.trending(10, segment=seg)
        assert [i for i, _ in tb] == [i for i, _ in ta] and ta
        assert [s for _, s in tb] == pytest.approx([s for _, s in ta], rel=1e-12)
    # more events, new users among them: the same segment ids and the same lists in both (co-occurrence
    # is not in the record: the stream's rows live in the item stage and Redis)
    more, _, _ = group_stream(n_groups=3, users_per_group=14, events_per_user=10, seed=5)
    more = shifted(more, evs[-1]["ts"], "m")
    a.learn_many(more)
    b.learn_many(more)
    everyone = {x["user_id"] for x in more} | set(users)
    assert [b.segment(u) for u in sorted(everyone)] == [a.segment(u) for u in sorted(everyone)]
    assert [i for i, _ in b.trending(10, segment=1)] == [i for i, _ in a.trending(10, segment=1)]


def group_2_first(evs) -> list[dict]:
    """The same events, with group 2's sessions moved ten days earlier (still in time order)."""
    moved = [dict(x, ts=x["ts"] - 10 * 86400.0) if x["user_id"].startswith("g2-") else x for x in evs]
    return sorted(moved, key=lambda x: x["ts"])


def test_without_the_population_a_restart_renumbers_segments():
    """Why the record exists: the same users, learned again in another order, get other ids."""
    evs, items, users = group_stream(n_groups=3, users_per_group=10, events_per_user=20)
    a = engine(items, evs)
    c = engine(items, group_2_first(evs))
    ids_a = {g: Counter(a.segment(u) for u, gg in users.items() if gg == g).most_common(1)[0][0] for g in range(3)}
    ids_c = {g: Counter(c.segment(u) for u, gg in users.items() if gg == g).most_common(1)[0][0] for g in range(3)}
    assert ids_a != ids_c


def test_moved_users_land_in_the_segment_of_their_group_in_an_engine_with_its_own_centers():
    evs, items, users = group_stream(n_groups=3, users_per_group=10, events_per_user=20)
    a = engine(items, evs)
    # b learned the other users, group 2 first: its segment ids name other groups than a's
    moved = [u for u in users if u.endswith(("-u0", "-u1", "-u2"))]
    rest = [x for x in evs if x["user_id"] not in moved]
    b = engine(items, group_2_first(rest))
    group_seg_b = {g: Counter(b.segment(u) for u, gg in users.items() if gg == g and u not in moved)
                   .most_common(1)[0][0] for g in range(3)}
    group_seg_a = {g: Counter(a.segment(u) for u, gg in users.items() if gg == g).most_common(1)[0][0]
                   for g in range(3)}
    assert group_seg_a != group_seg_b  # otherwise this test proves nothing
    centers = b._segmenter.centers()

    assert not import_population(b, export_population(a))  # b keeps its own centers
    import_users(b, export_users(a, moved))
    carried = [b.segment(u) for u in moved]
    reassign_segments(b, moved)

    assert b._segmenter.centers() == centers  # no center moved
    assert [b.segment(u) for u in moved] == [group_seg_b[users[u]] for u in moved]
    assert carried != [b.segment(u) for u in moved]
    sizes = b._segmenter.sizes()
    assert sum(sizes) == len(users) and all(
        b._profiles.find(u) in b._segmenter.members(b.segment(u)) for u in moved)


def test_refusals():
    evs, items, users = group_stream(n_groups=2, users_per_group=4, events_per_user=8)
    a = engine(items, evs)
    state = export_population(a)
    with pytest.raises(ValueError, match="version"):
        import_population(Engine(CFG), {**state, "version": 0})
    with pytest.raises(ValueError, match="segment centers"):
        import_population(Engine(EngineConfig(n_segments=1)), state)
    assert not import_population(a, state)  # a has learned: it keeps what it has
    fresh = Engine(CFG)
    reassign_segments(fresh, list(users))  # nobody, no centers: nothing to do
    assert fresh.segment("g0-u0") is None
