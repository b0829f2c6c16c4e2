"""Hostile ``cooc`` records and item-stage snapshots: refused where decoded, before any state changes.

Pair records and population records come through a topic other clients may write: a far-future time, a huge
weight or id must not wipe, freeze or overflow a shard or the population learner; one bad population entry
costs only itself, not the other users' entries of its record.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import orjson
import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.cooc_shard import POPULATION_KIND, PairDeltas
from infogap.models.events import Limits, parse_event
from infogap.models.population import check_batch
from infogap.models.state_fields import StateError
from infogap.stream.core.item_shards import ItemShards
from infogap.stream.core.user_stage import Record
from infogap.stream.settings import Settings

T = 1.7e9
POPULATION = (("source", b"0"), ("kind", POPULATION_KIND))


def _deltas(items: str = "ab", shift: int = 0) -> PairDeltas:
    """Three users who each bought ``items`` together, as a user stage sends them (sequence numbers + ``shift``)."""
    users = Engine(EngineConfig(), cooc="remote")
    users.learn_many([{"user_id": f"u{k}", "item_id": i, "type": "purchase", "ts": T + t + 10 * k}
                      for k in range(3) for t, i in enumerate(items)])
    d = users.drain_pair_deltas()
    d.seq, d.occ_seq = d.seq + shift, d.occ_seq + shift
    return d


def _shards() -> ItemShards:
    s = ItemShards(Settings(), EngineConfig(min_users=1))
    s.take(0)
    s.take(1)
    s.clock = lambda: T + 1000.0
    return s


def _apply(s: ItemShards, d: PairDeltas, offset: int = 0) -> None:
    s.apply(1, [Record("cooc", 1, offset, None, d.to_bytes(), headers=(("source", b"0"),))])


def _same(a, b) -> bool:
    """Whether two state trees (dicts, lists, numpy arrays, numbers) are equal."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    return a == b or (a != a and b != b)


# ------------------------------------------------------------------------------------------ pair records


def test_a_far_future_pair_record_is_refused_and_changes_nothing_on_a_shard_with_history():
    s = _shards()
    _apply(s, _deltas())
    before, similar = copy.deepcopy(s.state(1)), s.shards[1].similar("a", min_support=0)
    assert similar
    hostile = _deltas(shift=10)
    hostile.ts, hostile.occ_ts = np.full_like(hostile.ts, 1e300), np.full_like(hostile.occ_ts, 1e300)
    _apply(s, hostile, 1)
    assert len(s.dead) == 1 and "event time" in s.dead[0].reason
    assert _same(s.state(1), before) and s.shards[1].similar("a", min_support=0) == similar
    _apply(s, _deltas("cd", shift=100), 2)  # the shard still learns
    assert [n.item_id for n in s.shards[1].similar("c", min_support=0)] == ["d"]


@pytest.mark.parametrize("ahead_s", [1e300, 700 * 365 * 86_400.0, 2 * 86_400.0], ids=["1e300", "700y", "2d"])
def test_a_pair_record_ahead_of_the_clock_is_refused_on_a_new_shard(ahead_s):
    s = _shards()
    d = _deltas()
    d.ts, d.occ_ts = d.ts + ahead_s, d.occ_ts + ahead_s
    _apply(s, d)
    assert len(s.dead) == 1 and s.shards[1].t0 is None and s.shards[1].now == -np.inf
    _apply(s, _deltas(shift=100), 1)
    assert s.shards[1].t0 == T and [n.item_id for n in s.shards[1].similar("a", min_support=0)] == ["b"]


def _occ_pairs(d, v):
    d.occ_pairs = np.full_like(d.occ_pairs, v)


def _weights(d, v):
    d.d = np.full_like(d.d, v)


@pytest.mark.parametrize("mutate", [_occ_pairs, _weights], ids=["occ_pairs", "deltas"])
@pytest.mark.parametrize("value", [1e308, -1e308, 1e7, -1.0])
def test_a_pair_record_with_weights_no_event_can_make_is_refused(mutate, value):
    s = _shards()
    _apply(s, _deltas())
    before = copy.deepcopy(s.state(1))
    d = _deltas(shift=10)
    mutate(d, value)
    _apply(s, d, 1)
    assert len(s.dead) == 1 and "weight" in s.dead[0].reason
    assert _same(s.state(1), before) and np.isfinite(s.shards[1].co.pair_total)


def test_a_pair_record_with_an_id_of_a_mebibyte_is_refused():
    s = _shards()
    d = _deltas()
    d.items = ["A" * (1 << 20), d.items[1]]
    _apply(s, d)
    assert len(s.dead) == 1 and s.shards[1].owned() == [] and s.shards[1]._ids == []


# ------------------------------------------------------------------------------------------ population records


def _population(s: ItemShards, batch: dict, offset: int = 0) -> None:
    s.apply(0, [Record("cooc", 0, offset, None, json.dumps(batch).encode(), headers=POPULATION)])


def test_one_bad_trend_entry_is_refused_and_counted_and_the_others_are_learned():
    s = _shards()
    batch = {"seg": [[1, {"Tea": 1.0}, 1.0, 0.0, None]],
             "trend": [[2, "tea", 0, 2.0, T, 3], [3, "cup", 0, 1e308, T, 4], [4, "pot", 0, 1.0, 1e300, 5],
                       [5, "mug", 0, 1.0, T + 1, 6]],
             "review": [[6, "great tea", True]]}
    _population(s, batch)
    pop = s.population
    assert sorted(i for i, _ in pop.trending(10)) == ["mug", "tea"] and pop.now == T + 1
    assert pop.hwm == {0: 6} and pop.model()["n_seeded"] == 1 and pop.sentiment.n_learned == 1
    assert len(s.dead) == 1 and "trend entry 1" in s.dead[0].reason
    assert orjson.loads(s.dead[0].raw) == {"trend": [[3, "cup", 0, 1e308, T, 4], [4, "pot", 0, 1.0, 1e300, 5]]}
    assert np.isfinite(pop.momentum()[1]).all()
    _population(s, {"trend": [[10, "kettle", 0, 5.0, T + 100, 7]]}, 1)  # trending is not frozen
    assert pop.trending(1)[0][0] == "kettle" and pop.now == T + 100


def test_a_learner_fed_directly_counts_the_bad_entries_it_drops():
    s = _shards()
    assert s.population.learn({"trend": [[1, "tea", 0, 2.0, T, 3], [2, "cup", 0, 2.0, 1e300, 3]]}, source=0) == 1
    assert s.population.refused == 1 and s.population.now == T


def test_a_segment_sample_of_200k_categories_is_refused():
    s = _shards()
    many = {f"c{k}": 1.0 / 200_000 for k in range(200_000)}
    _population(s, {"seg": [[1, many, 1.0, 0.0, None], [2, {"Tea": 1.0}, 1.0, 0.0, None]]})
    assert s.population._names.n_features == 1 and s.population.model()["slots"] == {"Tea": "c0"}
    assert len(s.dead) == 1 and "200000 categories" in s.dead[0].reason


@pytest.mark.parametrize("sample", [[1, {"Tea": 1e308}, 1.0, 0.0, None], [1, {"Tea": 1.0}, 1e308, 0.0, None],
                                    [1, {"C" * (1 << 20): 1.0}, 1.0, 0.0, None]], ids=["share", "frequency", "name"])
def test_a_segment_sample_with_figures_no_user_has_is_refused(sample):
    samples, _, _, bad = check_batch({"seg": [sample]})
    assert samples == [] and bad["seg"] == [sample]


def test_a_trend_entry_with_an_id_of_a_mebibyte_is_refused():
    s = _shards()
    _population(s, {"trend": [[1, "I" * (1 << 20), 0, 1.0, T, 3], [2, "tea", 0, 1.0, T, 3]]})
    assert s.population.trending(5) == [("tea", 1.0)] and len(s.population._names) == 1
    assert len(s.dead) == 1


# ------------------------------------------------------------------------------------------ review text


def test_a_review_text_longer_once_masked_is_cut_to_the_limit():
    text = "a@b.cc " * 285  # 1,995 characters; each address becomes the longer "[contact]"
    e = parse_event(orjson.dumps({"event_id": "e1", "user_id": "u1", "type": "review", "ts": T, "item_id": "a",
                                  "text": text, "rating": 4}), now=T + 1000)
    assert 0 < len(e.text) <= Limits().max_text_chars and "@" not in e.text
    _, _, reviews, bad = check_batch({"review": [[1, e.text, True]]})
    assert reviews and not bad


# ------------------------------------------------------------------------------------------ snapshots


def _restore(p: int, mutate) -> None:
    s = _shards()
    _apply(s, _deltas())
    _population(s, {"trend": [[1, "tea", 0, 2.0, T, 3]]})
    state = copy.deepcopy(s.state(p))
    mutate(state)
    _shards().restore(p, state, (), f"partition {p}")


@pytest.mark.parametrize("p, mutate", [
    (1, lambda st: st["shard"].__setitem__("t0", "nan")),
    (1, lambda st: st["shard"].__setitem__("now", "inf")),
    (1, lambda st: st["shard"].__setitem__("sources", [[0, 2 ** 62]])),
    (0, lambda st: st["population"].__setitem__("now", 1e300)),
    (0, lambda st: st["population"].__setitem__("hwm", [[0, 2 ** 62]])),
    (0, lambda st: st["population"]["trend"].__setitem__("global_", np.full_like(st["population"]["trend"]["global_"],
                                                                                  np.nan))),
], ids=["shard-t0-nan", "shard-now-inf", "shard-seq-2**62", "learner-now-1e300", "learner-hwm-2**62",
        "learner-scores-nan"])
def test_a_snapshot_with_a_clock_or_number_no_record_could_set_is_refused(p, mutate):
    _restore(p, lambda st: None)
    with pytest.raises(StateError):
        _restore(p, mutate)


def test_a_snapshot_of_a_shard_before_any_event_still_reads():
    s = ItemShards(Settings(), EngineConfig())
    s.take(0)
    state = s.state(0)
    assert state["shard"]["now"] == "-inf" and state["population"]["now"] == "-inf"
    ItemShards(Settings(), EngineConfig()).restore(0, state, (), "partition 0")
