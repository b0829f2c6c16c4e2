"""One suite for every store (Gorse's habit: one test file, every backend): what a worker writes, a reader
reads back, the same way in memory, on one Redis and on Redis Cluster.

The memory store runs with no server (``pytest -m "not integration"``); Redis and Redis Cluster are the real
servers ``infogap up`` and ``infogap up --redis-cluster 3`` start.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from infogap.models.experiments import Counts, Segment
from infogap.stream.store import MemoryStore, RedisKeys, Store, StoreUnavailable, WrongTypeError, open_store
from infogap.stream.store.redis_node import SET_WITH_TTL_KEYS

BACKENDS = [pytest.param("memory"), pytest.param("redis", marks=pytest.mark.integration),
            pytest.param("cluster", marks=pytest.mark.integration)]
#: ids that a hash tag or a key pattern could misread
AWKWARD_IDS = ["}x", "a{b}c", "{", "with space", "ünï", "*?[", "a:b|c"]


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=BACKENDS)
async def make_store(request):
    """A factory of stores of one backend, each with its own key prefix; ``ttl`` the recommendations' TTL.
    Memory stores share a clock that ``advance`` moves; for the servers it waits."""
    from infogap.stream.settings import load

    backend = request.param
    base = (request.getfixturevalue("local_stack") if backend == "redis" else
            load(redis_url=request.getfixturevalue("redis_cluster")) if backend == "cluster" else None)
    made: list[Store] = []
    clock = _Clock()

    def make(ttl: int = 600, prefix: str | None = None) -> Store:
        prefix = prefix or f"test:{uuid.uuid4().hex[:10]}:"
        if backend == "memory":
            store = MemoryStore(RedisKeys(prefix), recs_ttl_s=ttl, clock=clock)
        else:
            store = open_store(base.model_copy(update={"redis_prefix": prefix, "recs_ttl_s": ttl}))
        made.append(store)
        return store

    async def advance(seconds: float, until) -> None:
        """Let ``seconds`` pass (memory: at once), then wait until ``until()`` holds (deadline 5 s)."""
        if backend == "memory":
            clock.now += seconds
        deadline = time.monotonic() + seconds + 5
        while not await until():
            assert time.monotonic() < deadline, "condition not met by the deadline"
            await asyncio.sleep(0.05)

    make.backend, make.advance = backend, advance
    yield make
    for store in made:
        await store.clear()
        await store.close()


def _doc(user: str, k: int = 0) -> dict:
    return {"user_id": user, "items": [{"item_id": f"i{k}", "score": 0.5, "reason": "trending now"}],
            "segment": k % 3, "generated_at": 1.0, "model_version": "t"}


async def test_recommendations_and_segments_of_a_batch_read_back(make_store):
    store = make_store()
    users = [f"u{k}" for k in range(SET_WITH_TTL_KEYS + 7)] + AWKWARD_IDS  # more than one script call
    docs = [_doc(u, k) for k, u in enumerate(users)]
    await store.write(recs=docs, segments={u: k % 3 for k, u in enumerate(users)})
    for k in (0, SET_WITH_TTL_KEYS + 3, *range(len(users) - len(AWKWARD_IDS), len(users))):
        assert orjson.loads(await store.recs(users[k])) == docs[k], users[k]
        assert await store.segment(users[k]) == k % 3, users[k]
    await store.write(segments={"u1": None})  # a user without a segment now has none
    assert await store.segment("u1") is None
    assert await store.recs("nobody") is None and await store.segment("nobody") is None


async def test_recommendations_expire_after_their_ttl(make_store):
    store = make_store(ttl=1)
    await store.write(recs=[_doc("u1")], segments={"u1": 2})
    assert await store.recs("u1") is not None

    async def gone() -> bool:
        return await store.recs("u1") is None and await store.segment("u1") is None

    await make_store.advance(1.0, gone)


async def test_erasure_deletes_every_key_of_the_user_and_only_theirs(make_store):
    store = make_store()
    users = ["zoe", "ann", *AWKWARD_IDS]
    await store.write(recs=[_doc(u) for u in users], segments={u: 1 for u in users})
    for user in ["zoe", *AWKWARD_IDS]:
        assert await store.erase_user(user) == 2, user
        assert await store.recs(user) is None and await store.segment(user) is None
    assert await store.erase_user("zoe") == 0
    assert await store.recs("ann") is not None and await store.segment("ann") == 1


async def test_similar_rows_and_their_tokens_read_back(make_store):
    store = make_store()
    neighbours = [{"item_id": "b", "score": 0.9, "support": 3.0, "confidence": 0.5, "lift": 2.0}]
    items = ["a", "}x", "a{b}c"] + [f"i{k}" for k in range(300)]
    await store.write(similar={i: neighbours for i in items}, rows={i: f"row-{i}".encode() for i in items},
                      rows_published={0: "t0", 2: "t2"})
    assert await store.similar("a") == neighbours and await store.similar("}x") == neighbours
    assert await store.similar("unknown") == []
    assert await store.read_rows(["a", "missing", *items[1:]]) == [b"row-a", None, *(f"row-{i}".encode()
                                                                                      for i in items[1:])]
    assert await store.read_tokens(3) == [b"t0", None, b"t2"]
    assert await store.read_rows([]) == []


async def test_a_trending_set_is_replaced_whole(make_store):
    store = make_store()
    await store.write(trending={None: [("a", 3.0), ("b", 2.0), ("c", 1.0)], 1: [("x", 1.5)]})
    assert await store.trending(None, n=2) == [("a", 3.0), ("b", 2.0)]
    await store.write(trending={None: [("d", 5.0), ("a", 0.5)], 1: []})
    assert await store.trending(None, n=10) == [("d", 5.0), ("a", 0.5)]  # b and c are gone
    assert await store.trending(1) == []


async def test_the_population_reads_back_in_one_call(make_store):
    store = make_store()
    empty = await store.read_population(n_segments=2, n=5)
    assert empty == {"model": None, "trending": {None: [], 0: [], 1: []}, "at": None, "momentum": None}
    model = {"centers": [[0.5, 0.5]], "at": 1234.5}
    await store.write(population=model, momentum=(["a", "b"], [1.5, 0.25]),
                      trending={None: [("a", 2.0)], 1: [("b", 1.0)]})
    got = await store.read_population(n_segments=2, n=5)
    assert got == {"model": model, "at": 1234.5, "momentum": (["a", "b"], [1.5, 0.25]),
                   "trending": {None: [("a", 2.0)], 0: [], 1: [("b", 1.0)]}}


async def test_a_learned_model_is_replaced_whole_and_read_back_by_name(make_store):
    store = make_store()
    assert await store.read_model("sentiment") is None
    await store.write(models={"sentiment": b'{"n_learned": 1}'})
    await store.write(models={"sentiment": b'{"n_learned": 2, "vocab": ["\xe5\xa5\xbd"]}', "topics": b"{}"})
    assert await store.read_model("sentiment") == b'{"n_learned": 2, "vocab": ["\xe5\xa5\xbd"]}'
    assert await store.read_model("topics") == b"{}" and await store.read_model("other") is None


async def test_experiment_counts_are_absolute_and_names_read_back_exactly(make_store):
    store = make_store()
    counts = {Segment(0, "c|1:2", "e:m|x", "v:1|%3A"): Counts(sent=2, clicks=1, revenue=12.5, users=(1 << 63) | 5),
              Segment(1, "recs", "email", "B"): Counts(sent=1)}  # (users: a 64-bit bitmap, read back exactly)
    assert await store.write_experiment("exp:one", counts) == 2
    assert await store.write_experiment("exp:one", counts) == 2  # replayed: nothing doubles
    await store.write_experiment("other", {Segment(0, "recs", "app", "A"): Counts(opens=3)})
    assert await store.experiments() == {"exp:one": ["B", "v:1|%3A"], "other": ["A"]}
    assert await store.read_experiment("exp:one") == counts
    assert await store.read_experiment("exp:one", ["B"]) == {Segment(1, "recs", "email", "B"): Counts(sent=1)}
    assert await store.read_experiment("none") == {}


async def test_retention_counts_are_absolute_per_cohort_and_read_back_exactly(make_store):
    """The control group's cohort figures: absolute values (a replay doubles nothing), awkward names read back,
    a cohort written as zeros (its records erased or past the horizon) is no longer read."""
    from infogap.models.retention import Cohort, CohortCounts

    store = make_store()
    counts = {Cohort(0, "c|1:2", "e:m|x", "v:1|%3A", "treated"): CohortCounts(entered=3, d1_users=2, d1_returned=1,
                                                                               revenue=12.5, revenue_sq=156.25,
                                                                               cost=0.75, messages=3),
              Cohort(1, "recs", "email", "B", "control"): CohortCounts(entered=1, users_7d=1, conversions=1)}
    assert await store.write_retention("exp:one", counts) == 2
    assert await store.write_retention("exp:one", counts) == 2  # replayed: nothing doubles
    await store.write_retention("other", {Cohort(2, "recs", "app", "none", "treated"): CohortCounts(entered=1)})
    assert await store.retention_names() == ["exp:one", "other"]
    assert await store.read_retention("exp:one") == counts
    assert await store.read_retention("none") == {}
    await store.write_retention("exp:one", {Cohort(1, "recs", "email", "B", "control"): CohortCounts()})
    assert await store.read_retention("exp:one") == {k: c for k, c in counts.items() if k.arm == "treated"}
    assert await store.experiments() == {}  # experiment counts are other keys


async def test_the_generation_marker_says_when_the_data_was_lost(make_store):
    store = make_store()
    token, missing = await store.generation()
    assert missing
    assert await store.generation() == (token, False)
    await store.clear()  # the data lost
    again, missing = await store.generation()
    assert missing and again != token


async def test_clear_and_delete_own_touch_only_the_stores_prefix(make_store):
    store, other = make_store(), make_store()
    await store.write(recs=[_doc("u1")], similar={"a": []}, trending={None: [("a", 1.0)]})
    await other.write(recs=[_doc("u1")])
    left = await store.delete_own([store.keys.recs("u1"), other.keys.recs("u1")])
    assert left == [other.keys.recs("u1")]
    assert await store.recs("u1") is None and await other.recs("u1") is not None
    assert await store.clear() >= 2
    assert await store.trending() == [] and await store.similar("a") == []
    assert await other.recs("u1") is not None
    assert await store.ping()


# ---------------------------------------------------------------------------- the servers' failures
SERVERS = [pytest.param("redis", marks=pytest.mark.integration),
           pytest.param("cluster", marks=pytest.mark.integration)]


@pytest.fixture(params=SERVERS)
async def server_store(request):
    """A store on one Redis or on Redis Cluster, and a plain client of the same server."""
    from infogap.stream import connections
    from infogap.stream.settings import load

    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    if request.param == "redis":
        s = request.getfixturevalue("local_stack").model_copy(update={"redis_prefix": prefix})
    else:
        s = load(redis_url=request.getfixturevalue("redis_cluster"), redis_prefix=prefix)
    store, raw = open_store(s), connections.redis_async(s)
    yield store, raw
    await store.clear()
    await store.close()
    await raw.aclose()


async def test_keys_of_another_type_are_overwritten_or_named(server_store):
    """Keys set whole (recommendations, trending) replace whatever was there; a hash of experiment counts
    cannot, and the error names the key, which ``delete_own`` then clears."""
    store, raw = server_store
    await raw.hset(store.keys.recs("u2"), mapping={"x": "1"})
    await raw.sadd(store.keys.trending(), "x")
    await store.write(recs=[_doc("u1"), _doc("u2")], trending={None: [("a", 1.0)]})
    assert orjson.loads(await store.recs("u2")) == _doc("u2") and await store.trending() == [("a", 1.0)]
    await raw.sadd(store.keys.experiment("e", "A"), "x")
    counts = {Segment(0, "recs", "email", "A"): Counts(sent=1), Segment(0, "recs", "email", "B"): Counts(sent=2)}
    with pytest.raises(WrongTypeError) as got:
        await store.write_experiment("e", counts)
    assert got.value.keys == [store.keys.experiment("e", "A")]
    assert await store.read_experiment("e", ["B"]) == {Segment(0, "recs", "email", "B"): Counts(sent=2)}
    assert await store.delete_own(got.value.keys) == []
    await store.write_experiment("e", counts)
    assert await store.read_experiment("e") == counts


async def test_a_decision_log_of_another_type_is_named_and_nothing_else_is_touched(server_store):
    """One log key holding another type fails the batch's decisions naming that key only (the worker deletes
    it and writes again): a good log is neither emptied nor, after the retry, written twice (on a cluster a log on
    another node may have been written by the first try)."""
    from infogap.stream.store.base import decision_entry as d

    store, raw = server_store
    await store.write(decisions={"good": [d("email", None, 1.0, "m-0", ["i"])]})
    await raw.set(store.keys.decisions("bad"), "x")
    batch = {"good": [d("email", None, 2.0, "m-1", ["i"])], "bad": [d(None, "no_change", 2.0)]}
    with pytest.raises(WrongTypeError) as got:
        await store.write(decisions=batch)
    assert got.value.keys == [store.keys.decisions("bad")]
    assert [e["message_id"] for e in await store.decisions("good")][-1] == "m-0"
    await store.delete_own(got.value.keys)
    await store.write(decisions=batch)
    assert [e["message_id"] for e in await store.decisions("good")] == ["m-1", "m-0"]
    assert [e["rule"] for e in await store.decisions("bad")] == ["no_change"]


async def test_a_server_that_does_not_answer_is_unavailable_with_the_reason(request):
    from tests.integration.kafka_helpers import free_port
    from infogap.stream.settings import load

    for url in (f"redis://127.0.0.1:{free_port()}/0", f"redis+cluster://127.0.0.1:{free_port()}"):
        store = open_store(load(redis_url=url), socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await store.write(recs=[_doc("u1")])
            with pytest.raises(StoreUnavailable):
                await store.ping()
        finally:
            await store.close()


async def test_on_a_cluster_a_users_keys_share_a_slot(request):
    from redis.crc import key_slot

    from infogap.stream.settings import load

    store = open_store(load(redis_url=request.getfixturevalue("redis_cluster"), redis_prefix="t:"))
    assert store.keys.cluster
    for user in ["u42", *AWKWARD_IDS[1:]]:  # ("}x" has no tag: its keys hash whole, and are written apart)
        assert key_slot(store.keys.recs(user).encode()) == key_slot(store.keys.segment(user).encode()), user
    await store.close()


test_a_server_that_does_not_answer_is_unavailable_with_the_reason = pytest.mark.integration(
    test_a_server_that_does_not_answer_is_unavailable_with_the_reason)
test_on_a_cluster_a_users_keys_share_a_slot = pytest.mark.integration(test_on_a_cluster_a_users_keys_share_a_slot)


@pytest.mark.integration
async def test_on_a_cluster_a_master_that_lost_its_data_alone_is_noticed(request):
    """A master restarted empty before its replica took over loses only its own keys: the generation markers it
    held are gone, and the token changes (the workers then write every key again)."""
    from infogap.stream import connections
    from infogap.stream.settings import load

    s = load(redis_url=request.getfixturevalue("redis_cluster"), redis_prefix=f"test:{uuid.uuid4().hex[:10]}:")
    store, raw = open_store(s), connections.redis_async(s)
    try:
        token, missing = await store.generation()
        assert missing and await store.generation() == (token, False)
        await raw.initialize()
        node = raw.get_primaries()[0]
        lost = [m for m in store.generation_markers() if raw.nodes_manager.get_node_from_slot(
            raw.keyslot(m)).name == node.name]
        assert 0 < len(lost) < len(store.generation_markers())
        for marker in lost:  # that master's data gone: its markers with it
            await raw.delete(marker)
        again, missing = await store.generation()
        assert missing and again != token
        assert await store.generation() == (again, False)
    finally:
        await store.clear()
        await store.close()
        await raw.aclose()


async def test_push_decisions_read_back_newest_first_with_repeats_merged_and_replays_not_added(make_store):
    from infogap.stream.store.base import decision_entry as d

    store = make_store()
    users = ["ann", *AWKWARD_IDS]
    batch1 = [d("email", None, 100.0, "m-1", ["i1", "i2"]), d("app", "daily_cap", 100.0), d("ads", "no_consent", 100.0)]
    await store.write(decisions={u: batch1 for u in users})
    for t in (160.0, 220.0, 280.0):  # nothing new: one entry, not three
        await store.write(decisions={"ann": [d(None, "no_change", t)]})
    await store.write(decisions={"ann": batch1 + [d(None, "no_change", 220.0)]})  # a batch replayed: nothing added
    log = await store.decisions("ann")
    assert log == [{"rule": "no_change", "channel": None, "at": 280.0, "since": 160.0, "n": 3},
                   {"rule": "no_consent", "channel": "ads", "at": 100.0},
                   {"rule": "daily_cap", "channel": "app", "at": 100.0},
                   {"rule": "sent", "channel": "email", "at": 100.0, "message_id": "m-1", "items": ["i1", "i2"]}]
    for user in AWKWARD_IDS:
        assert [e["rule"] for e in await store.decisions(user)] == ["no_consent", "daily_cap", "sent"], user
    # a late event's push (older than the newest entry) and a second send in the same second are real decisions
    await store.write(decisions={"ann": [d("email", None, 90.0, "m-late", ["i3"])]})
    await store.write(decisions={"ann": [d("email", None, 90.0, "m-same-second", ["i4"])]})
    assert [e.get("message_id") for e in (await store.decisions("ann"))[:2]] == ["m-same-second", "m-late"]
    await store.write(decisions={"ann": [d(None, "quiet_hours", 300.0)]})
    assert [e["rule"] for e in await store.decisions("ann", n=2)] == ["quiet_hours", "sent"]
    assert await store.decisions("nobody") == []


async def test_a_decision_log_keeps_the_newest_and_goes_with_the_user(make_store):
    from infogap.stream.store.base import decision_entry as d

    store = make_store()
    cap = store.decisions_max
    await store.write(decisions={"zoe": [d("email", None, float(t), f"m-{t}", ["i"]) for t in range(cap + 5)],
                                 "ann": [d(None, "repeat", 1.0)]})
    log = await store.decisions("zoe", n=cap + 10)
    assert len(log) == cap and log[0]["message_id"] == f"m-{cap + 4}" and log[-1]["message_id"] == "m-5"
    store.decisions_max = 2  # the cap lowered: the next write, even one that adds nothing, cuts the log to it
    await store.write(decisions={"zoe": [d("email", None, float(cap + 4), f"m-{cap + 4}", ["i"])]})
    assert [e["message_id"] for e in await store.decisions("zoe", n=cap)] == [f"m-{cap + 4}", f"m-{cap + 3}"]
    await store.write(recs=[_doc("zoe")], segments={"zoe": 1})
    assert await store.erase_user("zoe") == 3
    assert await store.decisions("zoe") == [] and await store.decisions("ann") != []


@pytest.mark.integration
async def test_on_a_cluster_a_log_on_another_node_is_a_stale_layout_not_a_wrong_type(redis_cluster):
    """A script sent to a node that does not serve one of its logs (a slot moved since the layout was read) must
    fail as a refusal, so that the store reads the layout again and retries: never as WRONGTYPE, which would make
    the worker delete a good log."""
    import redis as sync_redis
    from redis.crc import key_slot

    from infogap.stream.settings import load
    from infogap.stream.store.base import decision_entry as d
    from infogap.stream.store.redis_node import DECISIONS_LOOKBACK, PUSH_DECISIONS, is_wrong_type

    s = load(redis_url=redis_cluster, redis_prefix=f"test:{uuid.uuid4().hex[:10]}:")
    store = open_store(s)
    try:
        await store.write(decisions={"warm": [d(None, "no_change", 1.0)]})  # reads the layout
        nodes = store.client.nodes_manager
        users = [f"u{k}" for k in range(64)]
        node_of = {u: nodes.get_node_from_slot(key_slot(store.keys.decisions(u).encode())) for u in users}
        a = users[0]
        b = next(u for u in users if node_of[u].name != node_of[a].name)
        await store.write(decisions={b: [d("email", None, 1.0, "m-0", ["i"])]})
        node = sync_redis.Redis(host=node_of[a].host, port=node_of[a].port)
        entry = b"p" + orjson.dumps(d("email", "daily_cap", 2.0))
        with pytest.raises(sync_redis.ResponseError) as got:
            node.eval(PUSH_DECISIONS, 1, store.keys.decisions(a), 60, 50, DECISIONS_LOOKBACK, 2,
                      store.keys.decisions(a), store.keys.decisions(b), 1, entry, 1, entry)
        assert not is_wrong_type(got.value), str(got.value)
        assert [e["message_id"] for e in await store.decisions(b)] == ["m-0"]
        node.close()
    finally:
        await store.clear()
        await store.close()
