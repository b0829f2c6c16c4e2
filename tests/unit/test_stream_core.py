"""The whole stream without a broker or Redis: both stages' batches, end to end, on the in-memory store.

The user stage's batch is the worker's own (:meth:`infogap.stream.worker.Worker.process`), with its producer a list
and its store a :class:`~infogap.stream.store.MemoryStore`; the ``cooc`` records it produces are applied by the item
stage (:class:`~infogap.stream.item_stage.ItemStage`, publishing to the same store), whose rows the user stage then
ranks with. What a person would check is asserted: the recommendations in the store, the push message, the
dead letter, the experiment counts, the erasure. No server runs (``pytest -m "not integration"``).
"""
from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest

from infogap.models import EngineConfig
from infogap.models.experiments import kafka_partition
from infogap.stream.core.user_stage import Record
from infogap.stream.item_stage import ItemStage
from infogap.stream.neighbour_cache import NeighbourCache
from infogap.stream.settings import Settings
from infogap.stream.store import MemoryStore, keys_for
from infogap.stream.worker import Worker

T0 = 1_732_460_000.0  # 2024-11-24 14:53 UTC: outside quiet hours
N_EVENTS, N_COOC = 6, 4
CATALOG = [{"item_id": f"sku-{i}", "title": f"Product {i}", "category": "shoes" if i < 6 else "hats",
            "tags": [], "price": 10.0 + i, "available": True} for i in range(12)]


class _Producer:
    """What the worker produced, in order: (topic, value, key, headers, partition)."""

    def __init__(self):
        self.sent: list[tuple] = []

    async def send(self, topic, value, key=None, headers=None, partition=None):
        self.sent.append((topic, value, key, headers, partition))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def take(self, topic: str) -> list[tuple]:
        out = [m for m in self.sent if m[0] == topic]
        self.sent = [m for m in self.sent if m[0] != topic]
        return out


class Pipeline:
    """A user stage and an item stage wired to one in-memory store and a list for a producer: the I/O that
    ``Worker.run`` sets up, without Kafka or Redis."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.store = MemoryStore(keys_for(settings), settings.recs_ttl_s)
        self.worker = w = Worker(settings, store=self.store, clock=lambda: T0 + 3600)
        w._producer = self.producer = _Producer()
        w._cache = NeighbourCache(self.store, capacity=1000, max_age_s=0.0, partitions=N_COOC)
        w._cooc_partitions, w.core.events_partitions = N_COOC, N_EVENTS
        w._owned = set(range(N_EVENTS))
        self.items = ItemStage(settings, w.engine.config, self.store, eligible=lambda i: i not in w.core.unavailable)
        for p in range(N_COOC):
            self.items.core.take(p)
        self.offsets: dict[int, int] = {}

    def side(self, topic: str, key: str, value: dict | None) -> None:
        rec = Record(topic, 0, 0, key.encode(), None if value is None else orjson.dumps(value))
        assert self.worker.core.apply_side(rec).dead is None

    def record(self, event: dict | bytes, user: str) -> Record:
        p = kafka_partition(user, N_EVENTS)
        offset = self.offsets.get(p, 0)
        self.offsets[p] = offset + 1
        value = event if isinstance(event, bytes) else orjson.dumps(event)
        return Record(self.s.topics.events, p, offset, user.encode(), value, timestamp=int(T0 * 1000))

    async def batch(self, records: list[Record]) -> None:
        """One user-stage batch, then the item stage applies its ``cooc`` records and publishes."""
        await self.worker.process(records)
        for topic, value, key, headers, partition in self.producer.take(self.s.topics.cooc):
            assert self.items.core.apply(partition, [Record(topic, partition, 0, key, value, headers=tuple(headers))]) == []
        await self.items.publish(force=True)

    async def close(self) -> None:
        await self.items.consumer.stop()


def ev(n: int, user: str, item: str | None, t: float, typ: str = "click", **extra) -> dict:
    return {"event_id": f"e-{user}-{n}", "user_id": user, "item_id": item, "type": typ, "ts": t, **extra}


@pytest.fixture
async def pipeline():
    s = Settings(http_port=None, experiment={"name": "exp1", "variants": {"A": 1, "B": 1}}, review_models_publish_s=0.0)
    p = Pipeline(s)
    for item in CATALOG:
        p.side(s.topics.items, item["item_id"], item)
    for user in ("alice", "bob"):
        p.side(s.topics.users, user, {"user_id": user, "consent": {"email": True}, "timezone": "UTC",
                                      "quiet_hours": None})
    yield p
    await p.close()


async def _crowd(p: Pipeline) -> None:
    """Other users build co-occurrence: sku-1 goes with sku-2 and sku-3."""
    await p.batch([p.record(ev(k, f"crowd{i}", item, T0 + i), f"crowd{i}")
                   for i in range(8) for k, item in enumerate(("sku-1", "sku-2", "sku-3"))])


async def test_an_event_becomes_recommendations_a_push_and_trending_in_the_store(pipeline):
    p = pipeline
    await _crowd(p)
    assert [n["item_id"] for n in await p.store.similar("sku-1")][:2] in (["sku-2", "sku-3"], ["sku-3", "sku-2"])
    assert await p.store.trending() != []  # the population learner (cooc partition 0) published
    await p.batch([p.record(ev(1, "alice", "sku-1", T0 + 100), "alice")])
    doc = orjson.loads(await p.store.recs("alice"))
    assert {i["item_id"] for i in doc["items"][:2]} == {"sku-2", "sku-3"}, doc
    assert all(i["reason"] for i in doc["items"])
    (push,) = [orjson.loads(m[1]) for m in p.producer.take(p.s.topics.push)]
    assert push["user_id"] == "alice" and push["channel"] == "email" and push["variant"] in ("A", "B")
    assert push["items"][0]["item_id"] in ("sku-2", "sku-3")
    assert p.worker.stats.events_ok == 25 and p.worker.stats.pushes == 1


async def test_each_push_decision_is_logged_for_the_user_sent_or_held_back_with_its_rule(pipeline):
    p = pipeline
    await _crowd(p)
    await p.batch([p.record(ev(1, "alice", "sku-1", T0 + 100), "alice")])
    (push,) = [orjson.loads(m[1]) for m in p.producer.take(p.s.topics.push)]
    await p.batch([p.record(ev(2, "alice", "sku-1", T0 + 200), "alice")])  # the same top-N: nothing new
    await p.batch([p.record(ev(3, "alice", "sku-1", T0 + 300), "alice")])
    log = await p.store.decisions("alice")
    assert log[0] == {"rule": "no_change", "channel": None, "at": T0 + 200}  # logged once, when the run began
    assert log[-1] == {"rule": "sent", "channel": "email", "at": T0 + 100, "message_id": push["message_id"],
                       "items": [x["item_id"] for x in push["items"]]}
    assert {(e["channel"], e["rule"]) for e in log[1:-1]} == {("app", "no_consent"), ("ads", "no_consent")}
    await p.batch([p.record(ev(4, "crowd1", "sku-1", T0 + 300), "crowd1")])  # no users record: no decision
    assert await p.store.decisions("crowd1") == []
    await p.batch([p.record(ev(5, "alice", None, T0 + 400, "forget"), "alice")])
    assert await p.store.decisions("alice") == []


async def test_feedback_on_a_push_counts_for_its_variant(pipeline):
    p = pipeline
    await _crowd(p)
    await p.batch([p.record(ev(1, "alice", "sku-1", T0 + 100), "alice")])
    (push,) = [orjson.loads(m[1]) for m in p.producer.take(p.s.topics.push)]
    context = {k: push[k] for k in ("message_id", "campaign", "channel", "variant")}
    await p.batch([p.record(ev(2, "alice", push["items"][0]["item_id"], T0 + 200, "push_click", context=context),
                            "alice")])
    counts = await p.store.read_experiment("exp1")
    assert sum(c.sent for c in counts.values()) == 1 and sum(c.clicks for c in counts.values()) == 1
    assert {s.variant for s, c in counts.items() if c.clicks} == {push["variant"]}


async def test_a_bad_record_goes_to_the_dead_letter_topic_and_the_batch_goes_on(pipeline):
    p = pipeline
    await p.batch([p.record(b"{not json", "bob"), p.record(ev(1, "bob", "sku-4", T0 + 10), "bob")])
    (dead,) = p.producer.take(p.s.topics.dlq)
    assert dead[1] == b"{not json" and dict(dead[3])["reason_code"] == b"not_json"
    assert await p.store.recs("bob") is not None


async def test_a_forget_event_erases_the_user_for_good(pipeline):
    p = pipeline
    await _crowd(p)
    await p.batch([p.record(ev(1, "alice", "sku-1", T0 + 100), "alice")])
    assert await p.store.recs("alice") is not None
    await p.batch([p.record(ev(2, "alice", None, T0 + 110, "forget"), "alice")])
    assert await p.store.recs("alice") is None and await p.store.segment("alice") is None
    ledger = p.producer.take(p.s.topics.erasures)
    assert len(ledger) == 1 and ledger[0][2] == p.worker.core.erasures.digest("alice").encode()
    assert [(m[1], m[2]) for m in p.producer.take(p.s.topics.users)] == [(None, b"alice")]  # the users tombstone
    await p.batch([p.record(ev(3, "alice", "sku-2", T0 + 120), "alice")])  # a late event: never learned
    assert await p.store.recs("alice") is None and not p.worker.engine.known_user("alice")
    assert p.worker.stats.erased_events == 1 and p.worker.stats.erased_users == 1
    assert "alice" not in p.worker.core.prefs


# --- unsubscribe and push_bounce: a channel's consent off in the users record, no later push on it

BOTH = {"consent": {"email": True, "app": True}, "timezone": "UTC", "quiet_hours": None}


def consent_event(n: int, user: str, typ: str, channel: str, t: float) -> dict:
    return {"event_id": f"{typ}-{user}-{n}", "user_id": user, "type": typ, "ts": t,
            "context": {"channel": channel, "campaign": "recs", "variant": "B", "message_id": f"m-{n}"}}


def read_back(p: Pipeline, message: tuple) -> None:
    """The worker reads its own users record back (it reads the topic whole), as it would from Kafka."""
    topic, value, key, _, _ = message
    assert p.worker.core.apply_side(Record(topic, 0, 99, key, value)).dead is None


async def test_an_unsubscribe_turns_the_channel_off_in_the_users_record_and_no_later_push_uses_it(pipeline):
    p = pipeline
    p.side(p.s.topics.users, "carol", {"user_id": "carol", **BOTH})
    await _crowd(p)
    n_learned, experiments = p.worker.engine.n_learned, await p.store.read_experiment("exp1")
    await p.batch([p.record(consent_event(1, "carol", "unsubscribe", "email", T0 + 50), "carol")])
    (record,) = p.producer.take(p.s.topics.users)
    assert record[2] == b"carol" and record[1] == (b'{"user_id":"carol","consent":{"email":false,"app":true},'
                                                   b'"timezone":"UTC","quiet_hours":null}')
    # no behaviour: not learned, not ranked, not pushed, not counted by the experiment
    assert p.worker.engine.n_learned == n_learned and not p.worker.engine.known_user("carol")
    assert await p.store.recs("carol") is None and p.producer.take(p.s.topics.push) == []
    assert await p.store.read_experiment("exp1") == experiments
    assert p.worker.stats.events_ok == 25 and p.worker.stats.consent_withdrawn == 1
    held = p.worker.core.prefs["carol"]
    read_back(p, record)
    assert p.worker.core.prefs["carol"] == held and held.consent == {"email": False, "app": True}
    # later behaviour: pushed on app, never on email
    await p.batch([p.record(ev(1, "carol", "sku-1", T0 + 100), "carol")])
    pushes = [orjson.loads(m[1]) for m in p.producer.take(p.s.topics.push)]
    assert [(m["user_id"], m["channel"]) for m in pushes] == [("carol", "app")]
    # a second unsubscribe of the same channel writes no second record
    await p.batch([p.record(consent_event(2, "carol", "unsubscribe", "email", T0 + 150), "carol")])
    assert p.producer.take(p.s.topics.users) == [] and p.worker.stats.consent_withdrawn == 1
    await p.batch([p.record(ev(2, "carol", "sku-7", T0 + 200), "carol"),
                   p.record(ev(3, "carol", "sku-8", T0 + 201), "carol"),
                   p.record(ev(4, "carol", "sku-9", T0 + 202), "carol")])
    assert all(orjson.loads(m[1])["channel"] != "email" for m in p.producer.take(p.s.topics.push))


async def test_a_hard_bounce_turns_the_channel_off_before_the_pushes_of_its_own_batch(pipeline):
    p = pipeline
    p.side(p.s.topics.users, "dave", {"user_id": "dave", **BOTH})
    await _crowd(p)
    n_learned = p.worker.engine.n_learned
    # the bounce comes after dave's click in the batch: ranking (after learning) already has email off
    await p.batch([p.record(ev(1, "dave", "sku-1", T0 + 100), "dave"),
                   p.record(consent_event(1, "dave", "push_bounce", "email", T0 + 101), "dave")])
    assert [orjson.loads(m[1])["channel"] for m in p.producer.take(p.s.topics.push)] == ["app"]
    (record,) = p.producer.take(p.s.topics.users)
    assert record[2] == b"dave" and orjson.loads(record[1]) == {
        "user_id": "dave", "consent": {"email": False, "app": True}, "timezone": "UTC", "quiet_hours": None}
    read_back(p, record)
    assert p.worker.core.prefs["dave"].consent == {"email": False, "app": True}
    # a second bounce writes nothing; a bounce on app turns that off too, keeping email off
    await p.batch([p.record(consent_event(2, "dave", "push_bounce", "email", T0 + 110), "dave")])
    assert p.producer.take(p.s.topics.users) == []
    await p.batch([p.record(consent_event(3, "dave", "push_bounce", "app", T0 + 120), "dave"),
                   p.record(consent_event(4, "dave", "unsubscribe", "app", T0 + 121), "dave")])
    (record,) = p.producer.take(p.s.topics.users)
    assert orjson.loads(record[1])["consent"] == {"email": False, "app": False}
    await p.batch([p.record(ev(k, "dave", f"sku-{k}", T0 + 130 + k), "dave") for k in range(6, 12)])
    assert p.producer.take(p.s.topics.push) == []
    assert p.worker.engine.n_learned == n_learned + 7  # the seven clicks, none of the four consent events


async def test_an_erased_users_unsubscribe_writes_no_users_record(pipeline):
    p = pipeline
    await p.batch([p.record(ev(1, "alice", "sku-1", T0 + 100), "alice")])
    # an unsubscribe followed by a forget in one batch: only the forget's tombstone
    await p.batch([p.record(consent_event(1, "alice", "unsubscribe", "email", T0 + 110), "alice"),
                   p.record(ev(2, "alice", None, T0 + 111, "forget"), "alice")])
    assert [(m[1], m[2]) for m in p.producer.take(p.s.topics.users)] == [(None, b"alice")]
    # after the erasure: nothing, and the preferences stay gone
    await p.batch([p.record(consent_event(2, "alice", "push_bounce", "email", T0 + 120), "alice")])
    assert p.producer.take(p.s.topics.users) == [] and "alice" not in p.worker.core.prefs
    assert p.worker.stats.erased_events == 1 and p.worker.stats.consent_withdrawn == 0


async def test_an_unsubscribe_of_a_user_without_a_users_record_writes_one_with_the_defaults(pipeline):
    p = pipeline
    await p.batch([p.record(consent_event(1, "erin", "unsubscribe", "ads", T0 + 10), "erin")])
    (record,) = p.producer.take(p.s.topics.users)
    assert record[2] == b"erin" and orjson.loads(record[1]) == {"user_id": "erin", "consent": {"ads": False},
                                                                "timezone": "UTC", "quiet_hours": [22, 8]}
    held = p.worker.core.prefs["erin"]
    read_back(p, record)
    assert p.worker.core.prefs["erin"] == held


async def test_with_pseudonyms_the_record_is_keyed_by_the_events_key_and_reads_back_as_the_same_user():
    """Channel workers send feedback with the pseudonym as user_id and key (from the push message): the record
    is written under the pseudonym (the preference source's record stays under the raw id)."""
    from infogap.stream.pseudonym import Pseudonymizer

    s = Settings(http_port=None, pseudonym_key="a test pseudonym key of 32 bytes.")
    p = Pipeline(s)
    try:
        p.side(s.topics.users, "carol", {"user_id": "carol", **BOTH})
        pseudonym = Pseudonymizer(s.pseudonym_key)("carol")
        assert p.worker.core.prefs[pseudonym].consent == {"email": True, "app": True}
        await p.batch([p.record(consent_event(1, pseudonym, "unsubscribe", "email", T0 + 10), pseudonym)])
        (record,) = p.producer.take(s.topics.users)
        assert record[2] == pseudonym.encode() and orjson.loads(record[1])["user_id"] == pseudonym
        held = p.worker.core.prefs[pseudonym]
        assert held.consent == {"email": False, "app": True}
        read_back(p, record)
        assert p.worker.core.prefs[pseudonym] == held
        # erasure: the raw id's record and the pseudonym's (written above) are both tombstoned
        await p.batch([p.record({"event_id": "f1", "user_id": "carol", "type": "forget", "ts": T0 + 20}, "carol")])
        assert {(k, v) for _, v, k, *_ in p.producer.take(s.topics.users)} == {(b"carol", None),
                                                                               (pseudonym.encode(), None)}
    finally:
        await p.close()


def test_the_stream_core_and_the_store_interface_import_no_kafka_or_redis():
    """The pure core (``stream/core``), the store interface and the in-memory store run without a broker
    library: importing them loads neither aiokafka nor redis."""
    code = ("import sys, importlib, pkgutil, infogap.stream.core\n"
            "for m in pkgutil.iter_modules(infogap.stream.core.__path__): importlib.import_module('infogap.stream.core.' + m.name)\n"
            "import infogap.stream.store, infogap.stream.store.memory, infogap.stream.neighbour_cache\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiokafka', 'kafka', 'redis', 'faust', 'aiohttp'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_item_snapshot_without_a_state_is_refused_not_taken_as_a_new_shard():
    """A snapshot record whose state is missing or null cannot stand for the updates before its offset:
    restoring it raises (the shell then stops the partition) instead of starting an empty shard there."""
    from infogap.models.state_fields import StateError
    from infogap.stream.core.item_shards import ItemShards

    shards = ItemShards(Settings(), EngineConfig())
    for state in (None, {}, "not a tree"):
        with pytest.raises(StateError, match="shard"):
            shards.restore(1, state, (), "state.items partition 1")
    assert 1 not in shards.shards
    shards.take(1)
    assert 1 in shards.shards


async def test_a_disliked_item_in_a_review_takes_its_neighbours_down_in_the_stored_recommendations(pipeline):
    p = pipeline
    await _crowd(p)  # sku-1 goes with sku-2 and sku-3
    await p.batch([p.record(ev(k, f"hat{i}", item, T0 + 50 + i), f"hat{i}")  # and sku-7 with sku-8
                   for i in range(8) for k, item in enumerate(("sku-7", "sku-8"))])
    await p.batch([p.record(ev(1, "alice", "sku-1", T0 + 100), "alice"),
                   p.record(ev(2, "alice", "sku-7", T0 + 101), "alice")])
    top = [i["item_id"] for i in orjson.loads(await p.store.recs("alice"))["items"]]
    assert top[0] == "sku-8" and "sku-2" in top[:3]
    support = {n["item_id"]: n["support"] for n in await p.store.similar("sku-7")}
    await p.batch([p.record(ev(3, "alice", "sku-7", T0 + 102, "review", text="质量很差，戴了一天就坏了，很失望",
                                rating=1), "alice")])
    top = [i["item_id"] for i in orjson.loads(await p.store.recs("alice"))["items"]]
    assert top[:2] in (["sku-2", "sku-3"], ["sku-3", "sku-2"]) and "sku-7" not in top
    assert "sku-8" not in top[:2]
    assert {n["item_id"]: n["support"] for n in await p.store.similar("sku-7")} == pytest.approx(support, rel=1e-3)
    profile = p.worker.engine.profile("alice")["categories"]
    assert profile.get("hats", 0.0) < profile["shoes"]
    # the rated review taught the population learner, whose model the user stage then reads reviews with
    assert p.items.core.population.sentiment.n_learned == 1
    assert await p.store.read_model("sentiment") is not None
    await p.worker._load_review_models()
    assert p.worker.engine.sentiment.n_learned == 1
