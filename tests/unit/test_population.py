"""One segment model and one trending for many user stages: models/population.py and the engine's
``population="remote"`` mode."""
from __future__ import annotations

import zlib
from collections import Counter

import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.population import PopulationLearner, check_batch

from .test_models_support import adjusted_rand_index, group_stream, random_stream

CFG = EngineConfig(n_segments=3)


def lists(learner: PopulationLearner, n: int = 1000) -> dict:
    return {None: learner.trending(n), **{s: learner.trending(n, segment=s) for s in range(CFG.n_segments)}}


def run_stages(evs, items, n_stages: int, chunk: int = 30) -> tuple[list[Engine], PopulationLearner]:
    """User stages (users split by a hash, as partitions are) feeding one learner in chunks, each
    loading the learner's model and trending after every chunk, as the stream does (a chunk is a few
    minutes of these sessions: the stream reloads every ``publish_interval_s``)."""
    stages = [Engine(CFG, population="remote") for _ in range(n_stages)]
    for st in stages:
        for it in items:
            st.upsert_item(it)
    learner = PopulationLearner(CFG)
    for start in range(0, len(evs), chunk):
        part = evs[start:start + chunk]
        for p, st in enumerate(stages):
            mine = [e for e in part if zlib.crc32(e["user_id"].encode()) % n_stages == p]
            before = st.n_learned
            st.learn_many(mine)
            batch = st.drain_population()
            if batch:
                assert all(before <= e[0] < st.n_learned for e in batch["seg"] + batch["trend"])
                learner.learn(batch, source=p)
        for st in stages:
            st.load_population(learner.model(), lists(learner), learner.now)
    return stages, learner


def test_the_learner_counts_what_a_local_engine_counts():
    evs, items, _ = group_stream(n_groups=3, users_per_group=10, events_per_user=20)
    local = Engine(CFG)
    for it in items:
        local.upsert_item(it)
    local.learn_many(evs)
    _, learner = run_stages(evs, items, n_stages=2)
    ours, theirs = learner.trending(10), local.trending(10)
    assert [i for i, _ in ours] == [i for i, _ in theirs]
    assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], rel=1e-9)


def test_users_of_two_stages_share_one_segment_numbering():
    evs, items, groups = group_stream(n_groups=3, users_per_group=12, events_per_user=25)
    for chunk in (10, 100):
        stages, learner = run_stages(evs, items, n_stages=2, chunk=chunk)
        for g in range(3):  # a group's users are in the same segment, whichever stage holds them
            by_stage = [Counter(st.segment(u) for u, gg in groups.items() if gg == g and st.known_user(u))
                        for st in stages]
            assert by_stage[0].most_common(1)[0][0] == by_stage[1].most_common(1)[0][0] is not None
            assert sum(c.most_common(1)[0][1] for c in by_stage) >= 10  # of 12
        # each stage ranks with the learner's trending, in every segment
        for st in stages:
            for s in range(3):
                assert [i for i, _ in st.trending(5, segment=s)] == [i for i, _ in learner.trending(5, segment=s)]
    # Online k-means depends on the order of its samples; reloading often (small chunks: the stream
    # reloads every publish_interval_s) it finds the three groups here, like a local engine does
    stages, learner = run_stages(evs, items, n_stages=2, chunk=10)
    seg = {u: next(st.segment(u) for st in stages if st.known_user(u)) for u in groups}
    assert adjusted_rand_index(list(groups.values()), [seg[u] for u in groups]) >= 0.9
    assert learner.model()["n_seeded"] == 3 and learner.applied > len(evs)


def test_a_replayed_batch_counts_nothing_twice():
    evs = random_stream(300, n_users=20, n_items=15, seed=4)
    st = Engine(CFG, population="remote")
    st.learn_many(evs)
    batch = st.drain_population()
    a, b = PopulationLearner(CFG), PopulationLearner(CFG)
    assert a.learn(batch, source=0) == len(batch["seg"]) + len(batch["trend"])
    assert a.learn(batch, source=0) == 0  # replayed after a crash: skipped
    assert a.learn(batch, source=1) > 0  # another source has its own numbering
    b.learn(batch, source=0)
    half = {k: v[len(v) // 2:] for k, v in batch.items()}
    assert b.learn(half, source=0) == 0
    assert a.trending(5) != b.trending(5) and a.hwm == {0: b.hwm[0], 1: b.hwm[0]}


def test_remote_engine_emits_the_same_entries_one_by_one_and_a_load_replaces_its_trending():
    evs = random_stream(400, n_users=25, n_items=20, seed=9)
    one, many = Engine(CFG, population="remote"), Engine(CFG, population="remote")
    for e in evs:
        one.learn_one(e)
    many.learn_many(evs)
    batch = many.drain_population()
    assert one.drain_population() == batch
    assert one.drain_population() is None
    users = {e["user_id"] for e in evs}
    assert all(one.segment(u) is None for u in users)  # no centers yet
    assert one.trending(3)  # its own events count until a load
    assert one.load_population(None, {None: [("elsewhere", 5.0)]}, at=evs[-1]["ts"]) == []
    assert one.trending(3) == [("elsewhere", 5.0)] and one.trending(3, segment=0) == []
    # the first centers: everyone gets a segment at once, not at their next event
    learner = PopulationLearner(CFG)
    learner.learn(batch, source=0)
    assert sorted(one.load_population(learner.model(), {}, at=evs[-1]["ts"])) == sorted(users)
    assert all(one.segment(u) is not None for u in users)
    assert one.load_population(learner.model(), {}, at=evs[-1]["ts"]) == []


@pytest.mark.parametrize("batch, reason", [
    ([1, 2], "must be an object"),
    ({"seg": {}}, "must be lists"),
])
def test_a_batch_that_is_no_object_of_lists_is_refused_whole(batch, reason):
    learner = PopulationLearner(CFG)
    with pytest.raises(ValueError, match=reason):
        learner.learn(batch, source=0)
    assert learner.applied == 0 and learner.hwm == {} and learner.trending(3) == []


@pytest.mark.parametrize("batch, applied, reason", [
    ({"seg": [[0, {"Tea": "lots"}, 1.0, 0.0, None]]}, 0, "segment sample 0"),
    ({"trend": [[0, "tea", 0, 1.0, 5.0], [1, 7, 0, 1.0, 5.0]]}, 1, "trend entry 1"),
    ({"trend": [[0, "tea", 0, float("nan"), 5.0]]}, 0, "trend entry 0"),
])
def test_a_bad_entry_is_dropped_and_counted_and_the_others_learned(batch, applied, reason):
    learner = PopulationLearner(CFG)
    assert check_batch(batch)[3]["reason"].startswith(reason)
    assert learner.learn(batch, source=0) == applied and learner.applied == applied and learner.refused == 1
    assert learner.hwm == ({0: 0} if applied else {})
