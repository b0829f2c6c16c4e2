"""Hostile values at the user stages' store keys (``nbrow``, the segment model, momentum, trending): each is refused
where it is decoded, counted or logged, and the last good rows and population still rank, with finite scores; an
error nobody foresaw is logged, never fatal (the in-memory store and the decoders; no servers)."""
from __future__ import annotations

import asyncio
import json
import logging
import math

import numpy as np
import orjson
import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.catalog import Catalog
from infogap.stream.core.neighbour_rows import decode_row, encode_row
from infogap.stream.neighbour_cache import NeighbourCache
from infogap.stream.store import MemoryStore, RedisKeys
from infogap.stream.store.base import encode_momentum, population_reply
from tests.unit.test_stream_core import N_COOC, T0, _crowd, ev, pipeline  # noqa: F401  (pipeline: the fixture)

KEYS = RedisKeys("t:")


def row(**kw) -> dict:
    out = {"item_id": "a", "t": 1.7e9 + 10, "pop": 2.0, "total": 9.0, "pair_total": 4.0, "neighbours": ["b", "c"],
           "numbers": np.array([3, 4]), "values": np.ones((4, 2)), "neighbour_pop": np.array([3.0, 2.0]),
           "private": np.array([1])}
    out.update(kw)
    return out


def rehead(raw: bytes, **fields) -> bytes:
    """``raw`` with its JSON head's ``fields`` replaced (None: removed)."""
    n = int.from_bytes(raw[:4], "big")
    head = orjson.loads(raw[4: 4 + n])
    head.update(fields)
    head = json.dumps(head).encode()  # (json: integers beyond 64 bits too)
    return len(head).to_bytes(4, "big") + head + raw[4 + n:]


GOOD = encode_row(row(), numbering=12)
#: each value at an nbrow key that used to escape the cache (crashing the worker at every restart), or to load
#: NaN/inf into scores, or to grow memory without bound, or to map a number to the wrong item
HOSTILE_ROWS = {
    "private [2**70]": rehead(GOOD, private=[2 ** 70]),
    "private 1e300": rehead(GOOD, private=1e300),
    "private true": rehead(GOOD, private=True),
    "t 'x'": rehead(GOOD, t="x"),
    "t [1]": rehead(GOOD, t=[1]),
    "t 1e300": rehead(GOOD, t=1e300),
    "pop '1'": rehead(GOOD, pop="1"),
    "total null": rehead(GOOD, total=None),
    "numbering [1]": rehead(GOOD, numbering=[1]),
    "item_id 5": rehead(GOOD, item_id=5),
    "k 2**40": rehead(GOOD, k=2 ** 40),
    "numbers [-1]": encode_row(row(numbers=np.array([-1, 4])), numbering=12),
    "values inf": encode_row(row(values=np.full((4, 2), np.inf)), numbering=12),
    "values NaN": encode_row(row(values=np.full((4, 2), np.nan)), numbering=12),
    "values -1": encode_row(row(values=-np.ones((4, 2))), numbering=12),
    "neighbour_pop inf": encode_row(row(neighbour_pop=np.array([np.inf, 1.0])), numbering=12),
    "neighbours not ids": encode_row(row(neighbours=[{"x": 1}, 2]), numbering=None),
    "not a row": b"\x00\x00\x00\x02[]",
}


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_decode_row_refuses_a_hostile_row_with_a_value_error(name):
    with pytest.raises(ValueError):
        decode_row(HOSTILE_ROWS[name])


def test_decode_row_still_reads_what_the_item_stage_writes():
    got = decode_row(GOOD)
    assert got["t"] == 1.7e9 + 10 and got["numbers"].tolist() == [3, 4] and got["private"].tolist() == [1]
    assert list(got["neighbours"]) == ["b", "c"]


def test_a_large_number_is_looked_up_by_id_and_a_negative_one_refused_so_no_table_grows_or_goes_wrong():
    cat = Catalog()
    assert cat.translated(7, np.array([2 ** 40, 3]), ["x", "y"]).tolist() == [0, 1]  # no 8 TiB table
    assert sum(t.nbytes for t in cat._foreign.values()) <= 32 << 20
    with pytest.raises(ValueError):
        cat.translated(7, np.array([-1]), ["z"])  # (it wrote table[63] and mapped a genuine 63 to "z")
    assert cat.translated(7, np.array([63]), ["w"]).tolist() == [cat.find("w")]


def user_engine(**config) -> Engine:
    e = Engine(EngineConfig(**config), cooc="remote")
    e.learn_many([{"user_id": "u", "item_id": i, "type": "view", "ts": 1.7e9 + t} for t, i in enumerate("ab")])
    return e


def finite_recs(engine: Engine) -> list[tuple[str, float]]:
    recs = [(r.item_id, r.score) for r in engine.recommend("u", n=5)]
    assert all(math.isfinite(s) for _, s in recs), recs
    return recs


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_a_hostile_row_in_the_store_is_counted_and_taken_as_absent_and_the_last_good_row_still_ranks(name, caplog):
    store, engine = MemoryStore(KEYS), user_engine()
    cache = NeighbourCache(store, capacity=10, max_age_s=0.0)
    store._set(KEYS.neighbour_row("a"), GOOD)
    asyncio.run(cache.ensure(engine, ["a"], 1.0))
    good = finite_recs(engine)
    assert {i for i, _ in good} >= {"c"} and cache.bad_rows == 0
    store._set(KEYS.neighbour_row("a"), HOSTILE_ROWS[name])
    store._set(KEYS.neighbour_row("b"), HOSTILE_ROWS[name])
    with caplog.at_level(logging.WARNING, "infogap.neighbours"):
        for now in (2.0, 3.0):  # read again and again (a bad row is asked again soon): never fatal
            asyncio.run(cache.ensure(engine, ["a", "b"], now))
    assert cache.bad_rows == 4
    assert len([r for r in caplog.records if "does not hold a neighbour row" in r.message]) == 2  # once per key
    assert finite_recs(engine) == good  # the last good row of "a" ranks as before


def test_a_row_the_engine_cannot_load_is_counted_and_the_other_rows_of_its_read_still_load():
    """A row that decodes but that the engine cannot take (here: a time so far ahead that its growth overflows,
    with a day's half-life) is taken as absent like a row that does not decode; the rows read with it load."""
    store, engine = MemoryStore(KEYS), user_engine(cooc_half_life_days=1.0)
    cache = NeighbourCache(store, capacity=10, max_age_s=0.0)
    store._set(KEYS.neighbour_row("a"), GOOD)
    store._set(KEYS.neighbour_row("b"), encode_row(row(item_id="b", t=4e9, neighbours=["d", "e"]), numbering=13))
    asyncio.run(cache.ensure(engine, ["b", "a"], 1.0))
    assert cache.bad_rows == 1
    assert {i for i, _ in finite_recs(engine)} >= {"c"}  # a's row loaded
    assert engine.state.catalog.find("d") is None  # nothing of b's row was taken


def test_an_unforeseen_error_loading_a_row_is_counted_never_fatal(monkeypatch):
    store, engine = MemoryStore(KEYS), user_engine()
    cache = NeighbourCache(store, capacity=10, max_age_s=0.0)
    store._set(KEYS.neighbour_row("a"), GOOD)
    store._set(KEYS.neighbour_row("b"), encode_row(row(item_id="b"), numbering=12))
    load = engine.load_rows

    def load_rows(rows):
        rows = list(rows)
        if any(r["item_id"] == "b" for r in rows):
            raise RuntimeError("nobody foresaw this")
        load(rows)

    monkeypatch.setattr(engine, "load_rows", load_rows)
    asyncio.run(cache.ensure(engine, ["a", "b"], 1.0))
    assert cache.bad_rows == 1 and {i for i, _ in finite_recs(engine)} >= {"c"}


# ---------------------------------------------------------------------------------------------- the population
MODEL = {"n_seeded": 1, "slots": {"shoes": "c0"}, "centers": [[1.0] + [0.0] * 11], "applied": 3, "at": 1.7e9}
HOSTILE_POPULATIONS = {
    "model a list": (b"[1, 2]", None, {}),
    "model a number": (b"5", None, {}),
    "model a string": (b'"x"', None, {}),
    "at 'x'": (orjson.dumps({**MODEL, "at": "x"}), None, {}),
    "at 1e300": (orjson.dumps({**MODEL, "at": 1e300}), None, {}),
    "centers strings": (orjson.dumps({**MODEL, "centers": [["x"] * 12]}), None, {}),
    "n_seeded 50": (orjson.dumps({**MODEL, "n_seeded": 50}), None, {}),
    "slots a list": (orjson.dumps({**MODEL, "slots": [1]}), None, {}),
    "momentum 3 ids, 2 values": (orjson.dumps(MODEL), encode_momentum(["a", "b", "c"], [1.0, 2.0]), {}),
    "momentum inf": (orjson.dumps(MODEL), encode_momentum(["a"], [math.inf]), {}),
    "momentum ids not strings": (orjson.dumps(MODEL), encode_momentum([1], [1.0]), {}),
    "trending +inf": (orjson.dumps(MODEL), None, {None: [("a", math.inf)]}),
    "trending NaN": (orjson.dumps(MODEL), None, {None: [("a", math.nan)]}),
}


@pytest.mark.parametrize("name", HOSTILE_POPULATIONS)
def test_population_reply_refuses_a_hostile_population_with_a_value_error(name):
    with pytest.raises(ValueError):
        population_reply(*HOSTILE_POPULATIONS[name])


def test_a_model_that_does_not_fit_changes_nothing_in_the_engine():
    e = user_engine()
    e.load_population(MODEL, {None: [("a", 3.0)]}, 1.7e9, (["a"], [2.0]))
    before = e.state.trending.global_.copy(), e.state.segmenter.centers()
    for bad in ({**MODEL, "centers": [[1.0]]}, {**MODEL, "slots": {"x": "nowhere"}}):
        with pytest.raises(ValueError):
            e.load_population(bad, {None: [("b", 9.0)]}, 1.7e9, (["b"], [5.0]))
    with pytest.raises(ValueError):  # scores that would overflow once scaled
        e.load_population(MODEL, {None: [("b", 1e308)]}, 1.7e9 + 1e6, None)
    assert np.array_equal(e.state.trending.global_[: before[0].size], before[0])
    assert e.state.segmenter.centers() == before[1]


def plant(p, name: str) -> None:
    model, momentum, trending = HOSTILE_POPULATIONS[name]
    k = p.store.keys
    p.store._set(k.segment_model(), model)
    if momentum is not None:
        p.store._set(k.momentum(), momentum)
    for seg, entries in trending.items():
        p.store._set(k.trending(seg), [(s, i) for i, s in entries])


def recs(doc: bytes) -> list[tuple[str, float]]:
    items = [(i["item_id"], i["score"]) for i in orjson.loads(doc)["items"]]
    assert items and all(math.isfinite(s) for _, s in items), items
    return items


async def test_the_worker_keeps_its_last_rows_and_population_through_hostile_values_in_the_store(pipeline, caplog):
    """The worker's own batch on the in-memory store: hostile rows at the keys of the items its user touches, and
    each hostile population in turn, refused; the batch goes on, the user's recommendations keep finite scores."""
    p = pipeline
    await _crowd(p)  # sku-1 goes with sku-2 and sku-3; rows and the population published
    w = p.worker
    w._population_loaded_at = -math.inf
    await w._load_population()
    assert w.engine.state.segmenter.n_seeded > 0
    await p.batch([p.record(ev(1, "alice", "sku-1", T0 + 100), "alice")])
    assert {i for i, _ in recs(await p.store.recs("alice"))[:2]} == {"sku-2", "sku-3"}
    for n, name in enumerate(HOSTILE_ROWS):  # the rows of sku-1 (known) and sku-9 (new): each hostile value
        p.store._set(p.store.keys.neighbour_row("sku-1"), HOSTILE_ROWS[name])
        p.store._set(p.store.keys.neighbour_row("sku-9"), HOSTILE_ROWS[name])
        for q in range(N_COOC):  # as an item stage's publish: the rows are read again
            p.store._set(p.store.keys.rows_published(q), f"hostile-{n}".encode())
        await w.process([p.record(ev(10 + n, "alice", "sku-9", T0 + 200 + n), "alice")])
        assert w._cache.bad_rows == 2 * (n + 1), name
        assert {i for i, _ in recs(await p.store.recs("alice"))[:3]} >= {"sku-2", "sku-3"}, name
    centers, trend = w.engine.state.segmenter.centers(), w.engine.state.trending.global_.copy()
    with caplog.at_level(logging.ERROR, "infogap.worker"):
        for name in HOSTILE_POPULATIONS:
            plant(p, name)
            w._population_loaded_at = -math.inf
            await w._load_population()  # (was: an AttributeError, TypeError, KeyError... out of run())
            assert w.engine.state.segmenter.centers() == centers, name
            assert np.array_equal(w.engine.state.trending.global_[: trend.size], trend), name
    assert len([r for r in caplog.records if "population model" in r.message]) == len(HOSTILE_POPULATIONS)
    ok = w.stats.events_ok
    await w.process([p.record(ev(99, "alice", "sku-1", T0 + 400), "alice")])
    assert w.stats.events_ok == ok + 1 and {i for i, _ in recs(await p.store.recs("alice"))[:3]} >= {"sku-2", "sku-3"}


async def test_an_unforeseen_error_loading_the_population_keeps_the_last_one(pipeline, monkeypatch, caplog):
    p = pipeline
    await _crowd(p)
    w = p.worker

    def fail(*args, **kwargs):
        raise RuntimeError("nobody foresaw this")

    monkeypatch.setattr(w.engine, "load_population", fail)
    w._population_loaded_at = -math.inf
    with caplog.at_level(logging.ERROR, "infogap.worker"):
        await w._load_population()
    assert any("could not load the population model (RuntimeError" in r.message for r in caplog.records)
