"""Sharded co-occurrence: a remote engine plus item shards give the local engine's results."""
from __future__ import annotations

import dataclasses
import pickle
import zlib

import numpy as np
import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.cooc_shard import CoOccurrenceShard, PairDeltas

from .test_models_support import group_stream

CFG = EngineConfig(n_neighbours=16, door_bits=0, min_support=1)
#: without the privacy floor (min_users 1): for streams of groups of fewer than 5 users
NO_FLOOR = EngineConfig(n_neighbours=16, door_bits=0, min_support=1, min_users=1)
#: with the privacy floor at 5 (docs/privacy.md): only the pairs at it are exported and vote
FLOOR = EngineConfig(n_neighbours=16, door_bits=0, min_support=1, min_users=5)


def _owner(n_parts: int):
    return lambda item_id: zlib.crc32(item_id.encode()) % n_parts


def _sharded(evs, items, n_parts: int, batch: int = 37, cfg: EngineConfig = CFG):
    """A remote engine learning in batches, its deltas split over shards, and all rows loaded back."""
    eng = Engine(cfg, cooc="remote")
    shards = [CoOccurrenceShard.for_engine(cfg) for _ in range(n_parts)]
    for it in items:
        eng.upsert_item(it)
    owner = _owner(n_parts)
    for k in range(0, len(evs), batch):
        eng.learn_many(evs[k: k + batch])
        deltas = eng.drain_pair_deltas()
        for p, part in enumerate(deltas.split(owner, n_parts)):
            shards[p].apply(PairDeltas.from_bytes(part.to_bytes()), source=0)
    rows = [s.export_row(i) for s in shards for i in s.owned()]
    eng.load_rows(rows)
    return eng, shards


@pytest.fixture(scope="module")
def stream():
    evs, items, _ = group_stream(n_groups=3, users_per_group=10, items_per_group=15, events_per_user=20, seed=3)
    return evs, items


@pytest.mark.parametrize("cfg", [NO_FLOOR, FLOOR], ids=["no-floor", "floor-5"])
@pytest.mark.parametrize("n_parts", [1, 3])
def test_sharded_rows_give_the_local_engines_recommendations(stream, n_parts, cfg):
    evs, items = stream
    local = Engine(cfg)
    for it in items:
        local.upsert_item(it)
    local.learn_many(evs)
    remote, shards = _sharded(evs, items, n_parts, cfg=cfg)
    users = sorted({e["user_id"] for e in evs})
    for u in users:
        a, b = local.recommend(u), remote.recommend(u)
        assert [r.item_id for r in a] == [r.item_id for r in b], u
        assert [r.reason for r in a] == [r.reason for r in b], u
        assert np.allclose([r.score for r in a], [r.score for r in b])
    for it in items[:10]:
        owner = shards[_owner(n_parts)(it["item_id"])]
        want = {n.item_id: n for n in local.similar(it["item_id"], n=100)}
        got = {n.item_id: n for n in owner.similar(it["item_id"], n=100, min_support=cfg.min_support)}
        assert want.keys() == got.keys() and want  # equal scores may come in another order (ties by row)
        for k, n in want.items():
            assert np.allclose(n[1:], got[k][1:])


def test_a_replayed_source_is_applied_once(stream):
    evs, items = stream
    eng = Engine(CFG, cooc="remote")
    eng.learn_many(evs[:200])
    deltas = eng.drain_pair_deltas()
    once, twice = CoOccurrenceShard.for_engine(CFG), CoOccurrenceShard.for_engine(CFG)
    once.apply(deltas, source=4)
    twice.apply(deltas, source=4)
    twice.apply(deltas, source=4)
    assert pickle.dumps(once.co) == pickle.dumps(twice.co)
    assert twice.sources == {4: 199}


def test_a_replay_that_overlaps_what_was_applied_adds_only_the_new_part(stream):
    evs, _ = stream
    first, replay = Engine(CFG, cooc="remote"), Engine(CFG, cooc="remote")
    first.learn_many(evs[:300])
    replay.learn_many(evs[:300])
    whole = first.drain_pair_deltas()
    all_once = CoOccurrenceShard.for_engine(CFG)
    all_once.apply(whole, source=0)
    partial = CoOccurrenceShard.for_engine(CFG)
    cut = 150
    early = Engine(CFG, cooc="remote")
    early.learn_many(evs[:cut])
    partial.apply(early.drain_pair_deltas(), source=0)  # applied up to event 149, then the stage crashed
    partial.apply(replay.drain_pair_deltas(), source=0)  # the replay covers 0..299 again
    assert np.allclose(partial.co.vals, all_once.co.vals)
    assert partial.co.pop.tolist() == pytest.approx(all_once.co.pop.tolist())


@pytest.mark.parametrize("floor_votes", [False, True], ids=["votes-unfloored", "floor-votes"])
def test_a_read_side_copy_keeps_no_slot_index_yet_answers_pairs_and_counts_like_the_local_engine(stream, floor_votes):
    evs, items = stream
    cfg = dataclasses.replace(FLOOR, floor_votes=floor_votes)
    local = Engine(cfg)
    for it in items:
        local.upsert_item(it)
    local.learn_many(evs)
    remote, _ = _sharded(evs, items, 3, cfg=cfg)
    assert remote.state.cooc._index is None
    # the rows exported to a read-side copy hold every slot that votes: with the pairs below the privacy floor
    # marked private, or (floor_votes) without them
    lc, n_items = local.state.cooc, len(local.state.catalog)
    at_floor = sum(lc.slots(r, public=True).size for r in range(n_items))
    assert 0 < at_floor < local.stats()["cooc_slots"]
    assert remote.stats()["cooc_slots"] == (at_floor if floor_votes else local.stats()["cooc_slots"])
    rc = remote.state.cooc
    assert sum(rc.slots(r, public=True).size for r in range(len(remote.state.catalog))) == at_floor
    held = remote.stats()["cooc_slots"]
    a = remote.state.catalog.row(items[0]["item_id"])
    for n in local.similar(items[0]["item_id"], n=5):
        la, lb = local.state.catalog.row(items[0]["item_id"]), local.state.catalog.row(n.item_id)
        want, got = lc.pair(la, lb), rc.pair(a, remote.state.catalog.row(n.item_id))
        assert got is not None and got["count"] == want["count"] and np.isclose(got["lift"], want["lift"])
    assert rc.pair(a, a) is None
    remote.drop_rows([items[0]["item_id"]])
    assert remote.stats()["cooc_slots"] < held
    with pytest.raises(RuntimeError, match="read-side copy"):
        rc.update(np.array([(a << 32) | 1], np.int64), np.ones((1, 4)))


def test_rows_within_the_reservation_load_without_growing_the_arrays_and_rank_the_same():
    # more rows than an engine's arrays start with (256), as a user stage's cache holds
    evs, items, _ = group_stream(n_groups=20, users_per_group=4, items_per_group=16, events_per_user=40, seed=5)
    grown, shards = _sharded(evs, items, 3, cfg=NO_FLOOR)  # (groups of 4 users: no pair at a floor of 5)
    rows = [s.export_row(i) for s in shards for i in s.owned()]
    assert len(rows) > 300
    reserved = Engine(NO_FLOOR, cooc="remote")
    for it in items:
        reserved.upsert_item(it)
    reserved.learn_many(evs)
    reserved.reserve_rows(len(rows))
    co = reserved.state.cooc
    arrays = [co.nb, co.vals, co.sq, co.fill]
    reserved.load_rows(rows)
    assert all(a is b for a, b in zip(arrays, [co.nb, co.vals, co.sq, co.fill]))
    for u in sorted({e["user_id"] for e in evs})[::7]:
        assert reserved.recommend(u) == grown.recommend(u), u
    small = Engine(NO_FLOOR, cooc="remote")  # past a reservation, the arrays grow as they did
    small.reserve_rows(2)
    small.load_rows(rows)
    assert small.state.cooc.nb.shape[0] > len(rows) and small.stats()["cooc_slots"] == reserved.stats()["cooc_slots"]


def test_a_remote_engine_does_not_learn_rows_itself_and_drains_once(stream):
    evs, _ = stream
    eng = Engine(CFG, cooc="remote")
    eng.learn_many(evs[:100])
    assert eng.stats()["cooc_slots"] == 0
    d = eng.drain_pair_deltas()
    assert len(d) > 0 and 0 < d.occ.size <= 100  # an item repeated by a user right away is not a new occurrence
    assert eng.drain_pair_deltas() is None
    assert set(eng.query_items(evs[0]["user_id"])) <= set(d.items)
    with pytest.raises(ValueError, match="cooc must be"):
        Engine(CFG, cooc="elsewhere")


def test_a_batch_cut_into_pieces_is_applied_as_the_whole(stream):
    evs, _ = stream
    eng = Engine(CFG, cooc="remote")
    eng.learn_many(evs[:300])
    whole = eng.drain_pair_deltas()
    pieces = whole.pieces(max_updates=200)
    assert len(pieces) > 3 and sum(len(p) for p in pieces) == len(whole)
    assert sum(p.occ.size for p in pieces) == whole.occ.size
    assert all(len(p) <= 200 + 2 * CFG.window for p in pieces)
    one, cut = CoOccurrenceShard.for_engine(CFG), CoOccurrenceShard.for_engine(CFG)
    one.apply(whole, source=0)
    for p in pieces:
        cut.apply(PairDeltas.from_bytes(p.to_bytes()), source=0)
    assert np.array_equal(one.co.vals, cut.co.vals) and np.array_equal(one.co.pop, cut.co.pop)
    assert one.sources == cut.sources


def _state_by_id(eng: Engine) -> tuple[dict, dict]:
    """Each loaded row as {item: (neighbour ids, values)}, and each item's popularity, by id."""
    co, cat = eng.state.cooc, eng.state.catalog
    rows = {}
    for r in range(len(cat)):
        if co.block[r]:
            nb, *vals = co.neighbours(r)
            rows[cat.item_id(r)] = ([cat.item_id(b) for b in nb.tolist()], np.array(vals).tolist())
    return rows, {cat.item_id(r): (co.pop[r], co.pop_at[r]) for r in range(len(cat))}


def test_rows_read_by_their_shards_numbers_give_the_same_state_as_rows_read_by_ids(stream):
    """The wire form carries the shard's numbers: a reader translates them (ids read only for new
    numbers) and holds exactly what reading every id gives, over refreshes and a restored shard."""
    from infogap.stream.core.neighbour_rows import decode_row, encode_row

    evs, items = stream
    learner = Engine(CFG, cooc="remote")
    shard = CoOccurrenceShard.for_engine(CFG)
    by_ids, by_numbers = Engine(CFG, cooc="remote"), Engine(CFG, cooc="remote")
    numbering = 11
    for k, cut in enumerate((150, 400, len(evs))):
        learner.learn_many(evs[{0: 0, 1: 150, 2: 400}[k]:cut])
        shard.apply(learner.drain_pair_deltas(), source=0)
        if k == 2:  # restored from a snapshot in another process: a new numbering
            shard, numbering = pickle.loads(pickle.dumps(shard)), 12
        rows = [shard.export_row(i) for i in shard.owned()]
        by_ids.load_rows(rows)
        by_numbers.load_rows(decode_row(encode_row(r, numbering)) for r in rows)
        assert _state_by_id(by_numbers) == _state_by_id(by_ids)
        assert by_numbers.state.cooc.total == by_ids.state.cooc.total and by_numbers.state.cooc.pair_total == by_ids.state.cooc.pair_total
    assert set(by_numbers.state.catalog._foreign) == {11, 12}
    for u in sorted({e["user_id"] for e in evs})[:10]:
        learner_recs = by_ids.recommend(u)
        assert by_numbers.recommend(u) == learner_recs


def test_popularity_of_several_rows_at_once_is_as_row_by_row():
    """Rows published at different times carry their neighbours' counts of then: set together, each
    item ends with its newest count (the later one on a tie), as when set row by row."""
    from infogap.models.cooccurrence import CoOccurrence

    rows = [np.array([0, 1, 2]), np.array([1, 3]), np.array([2, 1])]
    pops = [np.array([5.0, 4.0, 3.0]), np.array([7.0, 1.0]), np.array([9.0, 8.0])]
    ats = [20.0, 10.0, 20.0]
    one, many = CoOccurrence(capacity=4), CoOccurrence(capacity=4)
    one.ensure(4), many.ensure(4)
    for r, p, t in zip(rows, pops, ats):
        one.set_popularity(r, p, total=t, pair_total=t / 2, at=t)
    many.set_popularity(np.concatenate(rows), np.concatenate(pops), total=20.0, pair_total=10.0,
                        at=np.repeat(ats, [3, 2, 2]))
    assert many.pop.tolist() == one.pop.tolist() == [5.0, 8.0, 9.0, 1.0]
    assert many.ipop.tolist() == one.ipop.tolist()
    assert (many.total, many.pair_total) == (one.total, one.pair_total) == (20.0, 10.0)


def _deltas(d4: np.ndarray, ts: np.ndarray, seq: np.ndarray) -> PairDeltas:
    return PairDeltas(items=["a", "b", "c"], row=np.array([0, 1, 2]), nb=np.array([1, 0, 0]), d=d4, ts=ts, seq=seq,
                      occ=np.array([0, 1]), occ_ts=np.array([5.0, 6.0]), occ_pairs=np.array([0.0, 2.0]),
                      occ_seq=np.array([40, 41]))


@pytest.mark.parametrize("d4", [np.array([[1.0, 2.0, 1.0, 1.0]] * 3),  # as learning gives: n_pair, count 1
                                np.array([[1.0, 2.0, 1.0, 1.0], [0.5, 2.0, 3.0, 1.0], [0.0, 1.0, 1.0, 2.0]])])
@pytest.mark.parametrize("when", [(np.array([6.0, 6.0, 5.0]), np.array([41, 41, 40])),  # its event's
                                  (np.array([6.0, 6.0, 7.0]), np.array([41, 41, 42]))])  # not an occurrence's
def test_deltas_read_back_from_bytes_as_they_were_written(d4, when):
    d = _deltas(d4, *when)
    raw = d.to_bytes()
    back = PairDeltas.from_bytes(raw)
    assert back.items == d.items
    for name in ("row", "nb", "d", "ts", "seq", "occ", "occ_ts", "occ_pairs", "occ_seq"):
        assert np.array_equal(getattr(back, name), getattr(d, name)), name
    with pytest.raises(ValueError, match="header says"):
        PairDeltas.from_bytes(raw + bytes(8))
    with pytest.raises(ValueError, match="smaller than requested"):
        PairDeltas.from_bytes(raw[:-8])


def test_the_compact_layout_takes_half_the_bytes_and_the_full_one_still_reads():
    import orjson

    d = _deltas(np.array([[1.0, 2.0, 1.0, 1.0]] * 3), np.array([6.0, 6.0, 5.0]), np.array([41, 41, 40]))
    arrays = [d.row.astype(np.int32), d.nb.astype(np.int32), d.ts, d.seq, d.occ.astype(np.int32), d.occ_ts,
              d.occ_pairs, d.occ_seq, d.d]
    head = orjson.dumps({"items": d.items, "sizes": [a.size for a in arrays]})
    full = len(head).to_bytes(4, "big") + head + b"".join(a.tobytes() for a in arrays)  # as written before
    back = PairDeltas.from_bytes(full)
    assert np.array_equal(back.d, d.d) and np.array_equal(back.seq, d.seq) and np.array_equal(back.ts, d.ts)
    compact = len(d.to_bytes()) - len(orjson.dumps({"v": 2, "items": d.items, "n": 3, "n_occ": 2, "by_event": True,
                                                    "ones": True}))
    assert compact - 4 == 3 * (4 + 4 + 4 + 16 + 1) + 2 * (4 + 8 + 8 + 8)  # (+ 1: the update's user bit)


def test_a_row_written_before_numbers_still_reads():
    import orjson

    from infogap.stream.core.neighbour_rows import decode_row

    head = orjson.dumps({"item_id": "a", "t": 5.0, "pop": 2.0, "total": 9.0, "pair_total": 4.0, "neighbours": ["b"]})
    raw = len(head).to_bytes(4, "big") + head + np.arange(5.0).tobytes()
    row = decode_row(raw)
    assert row["neighbours"] == ["b"] and row["values"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert row["neighbour_pop"].tolist() == [4.0] and "numbering" not in row


def _published_reference(co, r, min_support, eligible=None):
    """What ``published`` is defined as, step by step in numpy (the slots at the privacy floor)."""
    nb, _, _, n_pair, count = co.neighbours(r, public=True)
    ok = count >= min_support
    if eligible is not None:
        ok &= eligible[nb]
    nb, n_pair, count = nb[ok], n_pair[ok], count[ok]
    pa, pb = float(co.pop[r]), co.pop[nb]
    cos = np.minimum(n_pair / np.sqrt(np.maximum(pa * pb, 1e-300)), 1.0)
    order = np.lexsort((nb, -cos))  # best first, ties by row
    nb, cos, n_pair, count = nb[order], cos[order], n_pair[order], count[order]
    return nb, cos, n_pair, n_pair / pa, co.lift(np.full(nb.size, r), nb, n_pair, count)


@pytest.mark.parametrize("cfg", [NO_FLOOR, FLOOR], ids=["no-floor", "floor-5"])
def test_published_neighbours_are_the_reference_computation_exactly(stream, cfg):
    evs, _ = stream
    learner, shard = Engine(cfg, cooc="remote"), CoOccurrenceShard.for_engine(cfg)
    learner.learn_many(evs)
    shard.apply(learner.drain_pair_deltas(), source=0)
    co = shard.co
    eligible = np.random.default_rng(1).random(co.pop.size) < 0.7
    checked = 0
    for item in shard.owned():
        r = shard._rows[item]
        for min_support, mask in ((1, None), (2, None), (1, eligible)):
            got, want = co.published(r, min_support, mask), _published_reference(co, r, min_support, mask)
            assert all(np.array_equal(g, w) for g, w in zip(got, want)), (item, min_support)
            checked += got[0].size
    assert checked > 500
    ties = [(nb, cos) for nb, cos, *_ in (co.published(shard._rows[i], 1) for i in shard.owned())
            if np.any(np.diff(cos) == 0)]
    assert ties  # equal cosines occur in this stream: their order (by row) is covered above


def test_state_from_before_raw_counts_keeps_its_decayed_lifts_and_publishes_rows_without_them(stream):
    evs, items = stream
    learner, shard = Engine(CFG, cooc="remote"), CoOccurrenceShard.for_engine(CFG)
    learner.learn_many(evs)
    shard.apply(learner.drain_pair_deltas(), source=0)
    state = pickle.loads(pickle.dumps(shard))
    for name in ("raw_pop", "raw_total", "raw_pair_total"):  # as pickled before lift took raw counts
        del state.co.__dict__[name]
    old = pickle.loads(pickle.dumps(state))
    item = max(old.owned(), key=lambda i: len(old.similar(i, 50)))
    r, co = old._rows[item], old.co
    nb, _, _, n_pair, _ = co.neighbours(r, public=True)
    decayed = n_pair * co.total ** 2 / (2 * co.pair_total) / np.maximum(co.pop[r] * co.pop[nb], 1e-300)
    assert np.allclose(sorted(n.lift for n in old.similar(item, 500, min_support=1)), sorted(decayed))
    assert "raw_pop" not in old.export_row(item) and "raw_pop" in shard.export_row(item)
    reader = Engine(CFG, cooc="remote")
    reader.load_rows([old.export_row(item)])  # a reader given such rows falls back to the decayed lift too
    assert np.isclose(reader.state.cooc.pair(reader.state.catalog.row(item), reader.state.catalog.row(old.similar(item, 1)[0].item_id))["lift"],
                      old.similar(item, 1)[0].lift)
