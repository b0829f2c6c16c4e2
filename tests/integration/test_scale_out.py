"""Scale-out: two workers in one group split the partitions and give what one worker gives; a worker
leaving hands its partitions over without losing an event; segment ids outlive a restart."""
from __future__ import annotations

import orjson
import pytest
from aiokafka import TopicPartition

from infogap.models import Engine
from infogap.models.population import PopulationLearner
from infogap.stream import connections
from infogap.stream.tools.bench import WorkerProcess
from infogap.stream.store.keys import RedisKeys
from infogap.stream.tools.synthetic import SyntheticStream
from tests.conftest import wait_for
from tests.integration.kafka_helpers import model_from_snapshots, produce

pytestmark = pytest.mark.slow
NOON = 1_732_449_600.0
ENV = {"INFOGAP_SNAPSHOT_INTERVAL_S": "0.5", "INFOGAP_BATCH_MAX_RECORDS": "300", "INFOGAP_SIMILAR_N": "500",
       "INFOGAP_PUBLISH_INTERVAL_S": "0.2"}
SYNTH = SyntheticStream(n_users=300, n_items=200, groups=6, seed=5)
ITEMS = [it["item_id"] for it in SYNTH.items()]
EVENTS = SYNTH.events(4_000, start_ts=NOON, per_second=5.0)


async def committed_to_end(s, group: str, topic: str) -> bool:
    consumer = connections.consumer(s, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(6)]
        ends = await consumer.end_offsets(tps)
        return all([(await consumer.committed(tp) or 0) >= ends[tp] for tp in tps])
    finally:
        await consumer.stop()


async def caught_up(s) -> bool:
    """Both stages committed everything: users' events, then the co-occurrence updates they produced."""
    return (await committed_to_end(s, s.consumer_group, s.topics.events)
            and await committed_to_end(s, f"{s.consumer_group}.items", s.topics.cooc))


async def similar_lists(s) -> dict[str, dict[str, tuple]]:
    r = connections.redis_async(s)
    try:
        raws = await r.mget([f"{s.redis_prefix}similar:{i}" for i in ITEMS])
    finally:
        await r.aclose()
    return {i: {n["item_id"]: (round(n["support"], 6), round(n["lift"], 6)) for n in orjson.loads(raw)}
            for i, raw in zip(ITEMS, raws) if raw is not None}


def assert_same_rows(got: dict, want: dict) -> None:
    """Equal neighbour lists, up to the admission door: a pair's first sighting only opens a door bit,
    and a bit shared with another pair (a hash collision, which depends on how a process numbers items)
    admits it one sighting earlier. So a few pairs differ by one co-occurrence; none by more."""
    same = total = 0
    for item in ITEMS:
        g, w = got.get(item, {}), want.get(item, {})
        assert len(set(g) ^ set(w)) <= max(2, len(w) // 20), item
        for nb in set(g) & set(w):
            assert abs(g[nb][0] - w[nb][0]) <= 1.001, (item, nb)
            same += abs(g[nb][0] - w[nb][0]) < 0.01
            total += 1
    assert total and same / total >= 0.9, f"{same} of {total} pairs identical"


def pure_engine(s) -> Engine:
    engine = Engine(s.engine_config())
    engine.learn_many(EVENTS)
    return engine


def pure_stream_engine(s, chunk: int = 300) -> Engine:
    """The pure models arranged as the stream arranges them: co-occurrence learned in the engine (as
    the shards learn it), segment centers, trending and momentum by one PopulationLearner, loaded back
    every ``chunk`` events with the top ``trending_n`` lists that Redis holds."""
    cfg = s.engine_config()
    engine, learner = Engine(cfg, population="remote"), PopulationLearner(cfg)
    for start in range(0, len(EVENTS), chunk):
        engine.learn_many(EVENTS[start:start + chunk])
        learner.learn(engine.drain_population(), source=0)
        trending = {seg: learner.trending(s.trending_n, seg) for seg in (None, *range(cfg.n_segments))}
        engine.load_population(learner.model(), trending, learner.now, learner.momentum())
    return engine


def jaccard(a: Engine, b: Engine, users) -> float:
    total = 0.0
    for u in users:
        x, y = {r.item_id for r in a.recommend(u, n=10)}, {r.item_id for r in b.recommend(u, n=10)}
        total += len(x & y) / max(1, len(x | y))
    return total / len(users)


async def run(s, tmp_path, name: str, workers: int) -> None:
    procs = [WorkerProcess(s, tmp_path / f"{name}-{k}.log", ENV) for k in range(workers)]
    try:
        await produce(s, s.topics.events, [(e["user_id"], e) for e in EVENTS])
        await wait_for(lambda: caught_up(s), deadline_s=180, interval_s=0.5, what=f"{name} caught up")
    finally:
        for p in procs:
            p.stop()


async def test_two_workers_give_what_one_worker_and_the_pure_engine_give(scoped_settings, tmp_path):
    one, two = scoped_settings(), scoped_settings()
    await run(one, tmp_path, "one", 1)
    await run(two, tmp_path, "two", 2)
    users = sorted({e["user_id"] for e in EVENTS})
    pure = pure_engine(one)

    # item stage: co-occurrence is sharded by item, and each row is what the pure engine learns
    sim_one, sim_two = await similar_lists(one), await similar_lists(two)
    want = {i: {n.item_id: (round(n.support, 6), round(n.lift, 6)) for n in pure.similar(i, n=500)} for i in ITEMS}
    assert len(sim_one) >= 0.95 * len(ITEMS)
    assert_same_rows(sim_one, want)
    assert_same_rows(sim_two, want)

    # user stage: every user once, in the snapshot of their partition; the same recommendations
    (e1, snaps1), (e2, snaps2) = [await model_from_snapshots(s, ITEMS) for s in (one, two)]
    assert {p: sn.offset for p, sn in snaps1.items()} == {p: sn.offset for p, sn in snaps2.items()}
    held = [u for sn in snaps2.values() for u in sn.state["users"]["users"]]
    assert sorted(held) == users
    for u in users:
        assert e2.profile(u)["events"] == e1.profile(u)["events"] == pure.profile(u)["events"]
    # Recommendations: the engines rebuilt from snapshots hold users and rows, and rank with the one
    # population learner's segment centers and trending lists from Redis, as the workers did. What still
    # differs: segments were assigned with the centers of the moment, which batch timing decides, and
    # ties break by row numbers. The pure reference is the same arrangement in one process. Measured:
    # 0.83-0.93 one vs two workers, 0.78-0.80 one worker vs that reference (0.69-0.70 vs a local engine).
    ref = pure_stream_engine(one)
    j12, j1p, j1l = jaccard(e1, e2, users), jaccard(e1, ref, users), jaccard(e1, pure, users)
    print(f"top-10 Jaccard: one vs two workers {j12:.3f}, one worker vs the pure stream arrangement "
          f"{j1p:.3f} (vs a local engine, own segments and full trending: {j1l:.3f})")
    assert j12 >= 0.75 and j1p >= 0.7


async def test_a_worker_leaving_hands_over_its_partitions_and_loses_nothing(scoped_settings, tmp_path):
    s = scoped_settings()
    half = len(EVENTS) // 2
    a = WorkerProcess(s, tmp_path / "a.log", ENV)
    b = WorkerProcess(s, tmp_path / "b.log", ENV)
    try:
        await b.wait_until(lambda st: st["partitions"] > 0, 60, "worker b to own partitions")
        await a.wait_until(lambda st: st["partitions"] > 0, 60, "worker a to own partitions")
        await produce(s, s.topics.events, [(e["user_id"], e) for e in EVENTS[:half]])
        await wait_for(lambda: caught_up(s), deadline_s=120, interval_s=0.5, what="first half done")
        st_b = await b.stats()
        assert st_b["events_in"] > 0  # b did take part before it left
        b.stop()  # leaves the group: its partitions' snapshots are written, then a takes them over
        await produce(s, s.topics.events, [(e["user_id"], e) for e in EVENTS[half:]])
        await wait_for(lambda: caught_up(s), deadline_s=120, interval_s=0.5, what="second half done by a alone")
    finally:
        a.stop()
        b.stop()
    engine, snaps = await model_from_snapshots(s, ITEMS)
    pure = pure_engine(s)
    users = sorted({e["user_id"] for e in EVENTS})
    for u in users:  # every event of every user applied exactly once, across the hand-over
        assert engine.profile(u)["events"] == pure.profile(u)["events"], u
    assert_same_rows(await similar_lists(s), {i: {n.item_id: (round(n.support, 6), round(n.lift, 6))
                                                  for n in pure.similar(i, n=500)} for i in ITEMS})
    j = jaccard(engine, pure_stream_engine(s), users)
    print(f"top-10 Jaccard after the hand-over vs the pure stream arrangement {j:.3f}")
    assert j >= 0.75  # measured 0.86-0.89



async def segments_after_each_half(s, tmp_path, restart: bool) -> tuple[dict, dict, dict]:
    """ig:segment of the first half's users after each half of the events, with one worker throughout
    or a worker stopped after the first half and a new one started; and the model after the first."""
    keys = RedisKeys(s.redis_prefix)
    await produce(s, s.topics.items, [(it["item_id"], it) for it in SYNTH.items()])
    half = len(EVENTS) // 2
    users = sorted({e["user_id"] for e in EVENTS[:half]})
    r = connections.redis_async(s)
    worker = None
    try:
        segments = []
        for name, part in (("first", EVENTS[:half]), ("second", EVENTS[half:])):
            if worker is None:
                worker = WorkerProcess(s, tmp_path / f"{name}-{restart}.log", ENV)
            await produce(s, s.topics.events, [(e["user_id"], e) for e in part])
            await wait_for(lambda: caught_up(s), deadline_s=120, interval_s=0.5, what=f"{name} half done")
            if restart:
                worker.stop()
                worker = None
            segments.append(dict(zip(users, await r.mget([keys.segment(u) for u in users]))))
            if name == "first":
                model = orjson.loads(await r.get(keys.segment_model()))
    finally:
        if worker is not None:
            worker.stop()
        await r.aclose()
    return segments[0], segments[1], model


def kept_share(before: dict, after: dict) -> float:
    both = [u for u in before if before[u] is not None and after[u] is not None]
    assert len(both) >= 0.75 * len(before)  # users whose every event came before the first model have none
    return sum(before[u] == after[u] for u in both) / len(both)


async def test_segment_ids_keep_their_meaning_across_a_restart(scoped_settings, tmp_path):
    """The population learner is snapshotted with cooc partition 0 and its model stays in Redis, so a
    restart moves no more users between segments than going on without one does."""
    b1, a1, model = await segments_after_each_half(scoped_settings(), tmp_path, restart=True)
    b2, a2, _ = await segments_after_each_half(scoped_settings(), tmp_path, restart=False)
    assert model["n_seeded"] >= 3 and len(set(b1.values()) - {None}) >= 3
    restarted, continuous = kept_share(b1, a1), kept_share(b2, a2)
    print(f"users keeping their segment over the second half: {restarted:.1%} with a restart, "
          f"{continuous:.1%} without")
    # each run's learner sees its own interleaving of the partitions, so the two shares differ by chance
    # (measured 82-91% with a restart, 85-88% without); a renumbering would keep about one in n_segments
    assert restarted >= continuous - 0.15 and restarted >= 0.7


async def test_the_stages_in_separate_processes_give_what_one_process_gives(scoped_settings, tmp_path):
    """INFOGAP_STAGES=users and =items in two processes (a core each) make one deployment."""
    s = scoped_settings()
    users_proc = WorkerProcess(s, tmp_path / "users.log", {**ENV, "INFOGAP_STAGES": "users"})
    items_proc = WorkerProcess(s, tmp_path / "items.log", {**ENV, "INFOGAP_STAGES": "items"})
    try:
        await produce(s, s.topics.events, [(e["user_id"], e) for e in EVENTS])
        await wait_for(lambda: caught_up(s), deadline_s=180, interval_s=0.5, what="split stages caught up")
        assert (await items_proc.stats())["events_in"] == 0  # the item stage process reads no events
    finally:
        users_proc.stop()
        items_proc.stop()
    pure = pure_engine(s)
    assert_same_rows(await similar_lists(s), {i: {n.item_id: (round(n.support, 6), round(n.lift, 6))
                                                  for n in pure.similar(i, n=500)} for i in ITEMS})
    engine, _ = await model_from_snapshots(s, ITEMS)
    users = sorted({e["user_id"] for e in EVENTS})
    j = jaccard(engine, pure_stream_engine(s), users)
    print(f"top-10 Jaccard, stages in two processes vs the pure stream arrangement {j:.3f}")
    assert j >= 0.7
