"""State snapshots run no code when read, are checked before they are trusted, and restore every model
object exactly: stream/snapshots.py and the ``to_state``/``from_state`` of models/."""
from __future__ import annotations

import os
import copy
import pickle
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from infogap.models import Engine, EngineConfig
from infogap.models.cooc_shard import CoOccurrenceShard
from infogap.models.events import Event
from infogap.models.experiments import ExperimentMetrics
from infogap.models.population import PopulationLearner
from infogap.models.push_policy import PushConfig, UserPrefs
from infogap.models.state_fields import StateError
from infogap.models.user_state import export_users, import_users, users_from_state
from infogap.stream.settings import load
from infogap.stream.snapshots import SnapshotError, decode, encode
from infogap.stream.core.user_partition import UserPartition

from .test_models_support import group_stream

CFG = EngineConfig(n_segments=3)
KEY = b"k" * 32


class _RunsAShellCommand:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def learned(n_events: int = 600):
    """A user stage, its shard and its population learner after a planted stream, and the rest of it."""
    evs, items, _ = group_stream(n_groups=3, users_per_group=10, events_per_user=20)
    users = Engine(CFG, cooc="remote", population="remote")
    for it in items:
        users.upsert_item(it)
    users.learn_many(evs[:n_events])
    shard, learner = CoOccurrenceShard.for_engine(CFG), PopulationLearner(CFG)
    shard.apply(users.drain_pair_deltas().with_seq(np.arange(n_events, dtype=np.int64)), source=0)
    learner.learn(users.drain_population(), source=0)
    return users, shard, learner, evs, items


def round_trip(kind: str, partition: int, tree, key: bytes | None = None):
    snap = decode(encode(kind, partition, 17, tree, key), kind, partition, key)
    assert snap.offset == 17
    return snap


def test_a_pickle_on_the_state_topic_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for blob in (zstandard.ZstdCompressor().compress(pickle.dumps((0, 1, _RunsAShellCommand(str(marker))))),
                 zlib.compress(pickle.dumps((0, 1, _RunsAShellCommand(str(marker)))))):
        with pytest.raises(SnapshotError, match="a pickle written by infogap before snapshot format 3.*"
                                                 "infogap state migrate"):
            decode(blob, "users", 0)
    assert not marker.exists()


def test_a_shard_and_the_learner_restored_learn_on_exactly_as_the_originals():
    users, shard, learner, evs, items = learned()
    snap = round_trip("items", 0, {"shard": shard.to_state(), "population": learner.to_state()})
    shard2 = CoOccurrenceShard.from_state(snap.state["shard"], snap.arrays)
    learner2 = PopulationLearner.from_state(CFG, snap.state["population"], snap.arrays)
    more = Engine(CFG, cooc="remote", population="remote")
    for it in items:
        more.upsert_item(it)
    more.learn_many(evs)
    deltas = more.drain_pair_deltas().with_seq(np.arange(len(evs), dtype=np.int64))
    pop = more.drain_population()
    for s in (shard, shard2):
        s.apply(deltas, source=0)
    for p in (learner, learner2):
        p.learn(pop, source=0)
    for item in {e["item_id"] for e in evs}:
        assert shard2.similar(item, 20, min_support=1) == shard.similar(item, 20, min_support=1)
        assert shard2.export_row(item)["values"].tolist() == shard.export_row(item)["values"].tolist()
    assert learner2.model() == learner.model()
    for seg in (None, 0, 1, 2):
        assert learner2.trending(20, seg) == learner.trending(20, seg)
    assert learner2.momentum() == learner.momentum()


def test_a_user_partition_restored_keeps_dedupe_push_caps_and_experiment_attribution():
    users, _, _, evs, _ = learned()
    s = load()
    part = UserPartition.new(2, s, PushConfig(daily_cap={"email": 1}))
    for e in evs[:200]:
        part.dedupe.seen(e["event_id"], e["ts"])
        part.touch(e["user_id"])
    uid, ts = evs[0]["user_id"], evs[199]["ts"]
    prefs = UserPrefs.from_record({"user_id": uid, "consent": {"email": True}, "timezone": "UTC"})
    sent = part.push.decide(prefs, users.recommend(uid, n=5), now=ts, variant="B", title=users.title)
    assert sent
    part.experiments.record_sends(sent)
    part.experiments.observe(Event("f1", uid, "push_open", ts + 1, context={"message_id": sent[0].message_id}))
    part.watermark = ts
    tree = {"part": part.to_state(), "users": export_users(users, part.users)}
    snap = round_trip("users", 2, tree, KEY)

    back = UserPartition.new(2, s, PushConfig(daily_cap={"email": 1}))
    back.restore_state(snap.state["part"], snap.arrays)
    engine = Engine(CFG, cooc="remote", population="remote")
    import_users(engine, users_from_state(snap.state["users"], snap.arrays))
    assert back.users == part.users and back.watermark == ts
    assert all(back.dedupe.seen(e["event_id"], e["ts"]) for e in evs[:200])  # every id remembered
    assert back.push.decide(prefs, users.recommend(uid, n=5), now=ts + 60, variant="B", title=users.title) == []
    assert back.experiments.counts() == part.experiments.counts()
    click = Event("f2", uid, "push_click", ts + 2, context={"message_id": sent[0].message_id})
    for m in (part.experiments, back.experiments):
        m.observe(click)
    assert back.experiments.counts() == part.experiments.counts()
    direct = Engine(CFG, cooc="remote", population="remote")
    import_users(direct, export_users(users, part.users))  # the same users, not through the record
    assert all(engine.profile(u) == direct.profile(u) is not None for u in part.users)


def test_records_that_were_altered_copied_or_signed_otherwise_are_refused():
    rec = encode("users", 1, 5, {"a": np.arange(4)}, KEY)
    flipped = bytearray(rec)
    flipped[-5] ^= 1
    with pytest.raises(SnapshotError, match="HMAC does not match"):
        decode(bytes(flipped), "users", 1, KEY)
    with pytest.raises(SnapshotError, match="HMAC does not match"):
        decode(rec, "users", 2, KEY)  # a good record copied to another partition
    with pytest.raises(SnapshotError, match="HMAC does not match"):
        decode(rec, "users", 1, b"another key of 32 bytes........")
    with pytest.raises(SnapshotError, match="no INFOGAP_STATE_KEY"):
        decode(rec, "users", 1)
    unsigned = encode("users", 1, 5, {"a": 1})
    with pytest.raises(SnapshotError, match="not signed and INFOGAP_STATE_KEY is set"):
        decode(unsigned, "users", 1, KEY)
    damaged = bytearray(unsigned)
    damaged[-3] ^= 0x40
    with pytest.raises(SnapshotError, match="checksum does not match"):
        decode(bytes(damaged), "users", 1)
    from infogap.stream.snapshots import _parse, snapshot_bytes
    with pytest.raises(SnapshotError, match="'items' snapshot of partition 1, found where 'users'"):
        _parse(snapshot_bytes("items", 1, 5, {}), "users", 1)


def test_arrays_of_objects_never_enter_or_leave_a_snapshot():
    with pytest.raises(TypeError, match="cannot go in a snapshot"):
        encode("users", 0, 1, {"a": np.array([object()])})
    with pytest.raises(TypeError, match="cannot go in a snapshot"):
        encode("users", 0, 1, {"a": _RunsAShellCommand("/nonexistent")})
    from infogap.stream.snapshots import _parse, snapshot_bytes
    body = snapshot_bytes("users", 0, 1, {"a": np.arange(2)}).replace(b'"<i8"', b'"|O8"')
    with pytest.raises(SnapshotError, match="not allowed in a snapshot"):
        _parse(body, "users", 0)


def test_a_state_that_does_not_fit_its_schema_names_the_field():
    _, shard, _, _, _ = learned(200)
    tree = shard.to_state()
    tree["co"]["nb"] = np.zeros((2, 3), np.int64)
    with pytest.raises(StateError, match="field 'nb' must be an array of int32, not an array of int64"):
        CoOccurrenceShard.from_state(tree)
    tree = shard.to_state()
    tree["co"]["block"] = tree["co"]["block"] + 10_000  # blocks that do not exist: out of bounds in compiled code
    with pytest.raises(StateError, match="do not fit together"):
        CoOccurrenceShard.from_state(tree)
    m = ExperimentMetrics()
    with pytest.raises(StateError, match="fields .* missing"):
        m.restore_state({"segments": []})


def test_a_record_claiming_a_huge_body_is_refused_before_decompressing(monkeypatch):
    from infogap.stream import snapshots

    def record(payload: bytes) -> bytes:
        return snapshots.MAGIC + bytes([snapshots.FORMAT, 0]) + snapshots._digest(None, "users", 0, payload) + payload

    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 10)
    with pytest.raises(SnapshotError, match="the body would be -1 bytes"):
        decode(record(unsized), "users", 0)
    monkeypatch.setattr(snapshots, "MAX_STATE_BYTES", 999)
    with pytest.raises(SnapshotError, match="the body would be 1000 bytes; at most 999"):
        decode(record(zstandard.ZstdCompressor().compress(b"\0" * 1000)), "users", 0)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_damage_to_a_record_is_a_snapshot_error_never_a_crash(data):
    _, shard, learner, _, _ = _LEARNED
    rec = _RECORD
    n = data.draw(st.integers(1, 8))
    blob = bytearray(rec)
    for _ in range(n):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    try:
        snap = decode(bytes(blob[:cut]), "items", 0)
    except SnapshotError:
        return
    try:  # undamaged where it matters, or damage the checksum missed: the schema still holds it
        CoOccurrenceShard.from_state(snap.state["shard"], snap.arrays)
        PopulationLearner.from_state(CFG, snap.state["population"], snap.arrays)
    except StateError:
        pass


def test_any_damage_to_a_body_with_a_good_digest_is_refused_or_fits_the_schema():
    """Bodies forged with a valid checksum (a writer without a key): parsing and the schemas refuse them."""
    from infogap.stream.snapshots import _parse, snapshot_bytes

    _, shard, learner, _, _ = _LEARNED
    body = snapshot_bytes("items", 0, 3, {"shard": shard.to_state(), "population": learner.to_state()})
    rng = np.random.default_rng(5)
    refused = 0
    for _ in range(300):
        b = bytearray(body)
        for at in rng.integers(0, min(len(b), 4000), size=3):  # the header, where the structure is
            b[at] = int(rng.integers(0, 256))
        try:
            snap = _parse(bytes(b), "items", 0)
            CoOccurrenceShard.from_state(snap.state["shard"], snap.arrays)
            PopulationLearner.from_state(CFG, snap.state["population"], snap.arrays)
        except (SnapshotError, StateError):
            refused += 1
    assert refused > 0


_LEARNED = learned(200)
_RECORD = encode("items", 0, 3, {"shard": _LEARNED[1].to_state(), "population": _LEARNED[2].to_state()})


def test_pickled_snapshots_of_before_format_3_migrate_through_the_allow_list():
    from infogap.stream.tools.state_migration import load_legacy, tree_of

    users, shard, learner, evs, _ = _LEARNED
    part = UserPartition.new(1, load(), PushConfig())
    for e in evs[:50]:
        part.dedupe.seen(e["event_id"], e["ts"])
        part.touch(e["user_id"])
    old_learner = copy.copy(learner)  # pickled before reviews: no review models (their classes are not allowed)
    del old_learner.sentiment, old_learner.topics
    legacy = {"users": (1, 9, {"part": part, "users": export_users(users, part.users)}),
              "items": (0, 7, {"shard": shard, "population": old_learner})}
    for kind, (p, off, state) in legacy.items():
        blob = zstandard.ZstdCompressor(level=1).compress(pickle.dumps((p, off, state), protocol=5))
        with pytest.raises(SnapshotError, match="pickle"):
            decode(blob, kind, p)
        got_p, got_off, got_state = load_legacy(blob)
        snap = decode(encode(kind, p, got_off, tree_of(kind, got_state)), kind, p)
        if kind == "users":
            back = UserPartition.new(1, load(), PushConfig())
            back.restore_state(snap.state["part"], snap.arrays)
            assert back.users == part.users and all(back.dedupe.seen(e["event_id"], e["ts"]) for e in evs[:50])
            engine = Engine(CFG, cooc="remote", population="remote")
            import_users(engine, users_from_state(snap.state["users"], snap.arrays))
            assert all(engine.known_user(u) for u in part.users)
        else:
            assert CoOccurrenceShard.from_state(snap.state["shard"], snap.arrays).similar("i1", 5) == shard.similar("i1", 5)
            assert PopulationLearner.from_state(CFG, snap.state["population"], snap.arrays).model() == learner.model()


def test_a_pickle_naming_the_modules_of_before_the_infogap_package_migrates():
    """Snapshots pickled before the packages were installed as ``infogap.*`` name ``models.dedupe`` and
    ``stream.user_partition``: the migration finds those classes where they live now."""
    from infogap.stream.tools.state_migration import load_legacy

    part = UserPartition.new(2, load(), PushConfig())
    part.touch("u1")
    raw = pickle.dumps((2, 5, {"part": part}), protocol=3)  # module names as text lines (GLOBAL): renamed below
    raw = raw.replace(b"cinfogap.stream.core.user_partition\n", b"cstream.user_partition\n")
    raw = raw.replace(b"cinfogap.models.", b"cmodels.")
    assert b"infogap" not in raw
    p, off, state = load_legacy(zlib.compress(raw))
    assert (p, off, state["part"].users) == (2, 5, {"u1"})


def test_the_migration_refuses_what_a_snapshot_never_held(tmp_path):
    from infogap.stream.tools.state_migration import load_legacy

    marker = tmp_path / "pwned"
    blob = zlib.compress(pickle.dumps((0, 1, {"part": _RunsAShellCommand(str(marker))})))
    with pytest.raises(pickle.UnpicklingError, match="is not something an infogap snapshot holds"):
        load_legacy(blob)
    assert not marker.exists()
