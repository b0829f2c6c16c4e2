"""The generic check suite, run over every model class (River's ``checks`` spirit, plus our own).

For each model: input not mutated, seeded determinism, pickling round trip (and learning on
afterwards), learn_many == learn_one loop, batch boundaries irrelevant, reads never mutate,
feature order irrelevant. Each model is driven through a small adapter; the Engine is checked
under several configurations, one of which forces evictions, renormalisations and door resets.
"""
from __future__ import annotations

import ast
import copy
import pathlib
import pickle
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infogap.models.engine as engine_mod
import infogap.models.learn_core as learn_core
from infogap.models import Engine, EngineConfig
from infogap.models.catalog import Catalog
from infogap.models.cooccurrence import CoOccurrence, PairWeights, code
from infogap.models.profile import Profiles
from infogap.models.segments import Segmenter
from infogap.models.trending import Trending

from .test_models_support import DAY, T0, first_difference, group_stream, random_stream, snapshot


@dataclass
class Case:
    name: str
    make: Callable[[], Any]
    learn_one: Callable[[Any, Any], None]
    stream: Callable[[int], list]
    reads: Callable[[Any], Any]
    learn_many: Callable[[Any, list], None] | None = None


# ---------------------------------------------------------------------------- engine cases
def _engine_reads(e: Engine):
    users = ["u0", "u1", "u7", "nobody", "g0-u1", "g1-u2"]
    items = ["i0", "i1", "i3", "g0-i0", "missing"]
    return ([e.recommend(u, 5) for u in users], [e.recommend(u, 3, exclude={"i0", "i1"}) for u in users],
            [e.similar(i, 5) for i in items], [e.segment(u) for u in users], [e.known_user(u) for u in users],
            [e.profile(u) for u in users], e.trending(5), e.trending(3, segment=0), e.stats())


def _engine_stream(seed: int) -> list:
    evs = random_stream(400, n_users=25, n_items=40, seed=seed)
    g, items, _ = group_stream(n_groups=2, users_per_group=4, events_per_user=10, seed=seed)
    out = sorted(evs + g, key=lambda e: e["ts"])
    out.insert(len(out) // 2, {"event_id": "f1", "user_id": "u3", "type": "forget", "ts": out[len(out) // 2]["ts"]})
    return out


def _engine_case(name: str, cfg: EngineConfig, upsert: bool = True) -> Case:
    def make():
        e = Engine(cfg)
        if upsert:
            e.upsert_item({"item_id": "i0", "title": "Zero", "category": "A", "tags": ["x"]})
            e.upsert_item({"item_id": "i1", "category": "B"})
        return e
    return Case(name, make, lambda m, x: m.learn_one(x), _engine_stream, _engine_reads,
                lambda m, xs: m.learn_many(xs))


TINY = EngineConfig(n_neighbours=4, evict_fraction=0.5, window=3, dir_window=2, history_len=5, query_len=4,
                    max_consumed=3, door_bits=6, half_life_days=0.02, cooc_half_life_days=0.03,
                    trending_half_life_days=0.01, momentum_half_life_days=0.05, momentum=0.2, n_segments=3,
                    segment_every=3, new_item_slots=2, max_category_share=0.4)

ENGINE_CASES = [
    _engine_case("engine-default", EngineConfig()),
    _engine_case("engine-tiny", TINY),
    _engine_case("engine-no-decay-no-door", EngineConfig(half_life_days=None, cooc_half_life_days=None,
                                                         trending_half_life_days=None, door_bits=0,
                                                         momentum_half_life_days=None), upsert=False),
]


# ---------------------------------------------------------------------------- component cases
def _pair_stream(seed: int) -> list:
    rng = random.Random(seed)
    pw = PairWeights(window=3, dir_window=2, dir_decay=0.7, sym_decay=0.9, gap_tau_s=60.0, gap_floor=0.3)
    out = []
    for k in range(300):
        cur = rng.randrange(12)
        prev = [rng.randrange(12) for _ in range(3)]
        codes, deltas = pw.one(cur, float(k), 1.0, 1.0 + k / 100, prev, [k - 1.0, k - 5.0, k - 50.0], [1.0, 2.0, 0.5])
        if len(codes):
            out.append((codes.tolist(), deltas))
    return out


def _cooc_make():
    co = CoOccurrence(n_neighbours=3, evict_fraction=0.34, door_bits=5, capacity=4)
    co.ensure(12)
    return co


def _cooc_many(co, xs):
    codes = [c for cs, _ in xs for c in cs]
    co.update(codes, np.concatenate([d for _, d in xs]) if xs else np.zeros((0, 4)))


def _cooc_reads(co):
    return [co.neighbours(r) for r in range(12)], [co.pair(a, b, 0.5) for a in range(4) for b in range(4)], co.n_slots


def _trend_stream(seed: int) -> list:
    rng = random.Random(seed)
    return [(rng.randrange(9), rng.randrange(-1, 3), rng.uniform(0, 2), rng.uniform(0, 1)) for _ in range(200)]


def _trend_make():
    t = Trending(n_segments=3, capacity=2)
    t.ensure(9)
    return t


def _trend_many(t, xs):
    t.add([x[0] for x in xs], [x[1] for x in xs], [x[2] for x in xs], [x[3] for x in xs])


def _profile_stream(seed: int) -> list:
    rng = random.Random(seed)
    return [(f"u{rng.randrange(6)}", rng.randrange(20), T0 + k * 60.0, rng.uniform(-1, 3),
             tuple(rng.sample(range(40), rng.randint(0, 3))), rng.random() < 0.3, rng.random() < 0.05)
            for k in range(300)]


def _profile_one(p: Profiles, x):
    user, item, ts, w, feats, consumed, forget = x
    if forget:
        p.forget(user)
        return
    r = p.row(user)
    p.add_features(r, feats, w)
    if consumed:
        p.consume(r, item)
    if w > 0:
        p.push(r, item, ts, w)


def _profile_reads(p: Profiles):
    rows = [p.find(f"u{k}") for k in range(7)]
    return [(p.history(r, 4), p.mix(r), p.rfm(r, T0 + 1e5, 0.5), p.consumed(r), p.item_vector(r, T0 + 1e5))
            for r in rows if r is not None], len(p)


def _segment_stream(seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(120):
        g = rng.randrange(3)
        mix = {g: 0.7 + rng.uniform(0, 0.3), (g + 1) % 3: rng.uniform(0, 0.3)}
        tot = sum(mix.values())
        out.append(({k: v / tot for k, v in mix.items()}, rng.uniform(0, 30), rng.uniform(0, 100), rng.uniform(0, 9),
                    rng.randrange(-1, 3)))
    return out


def _segment_one(s: Segmenter, x):
    mix, f, m, gap, cur = x
    s.assign(s.features(mix, f, m, gap), cur)


def _catalog_stream(seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for k in range(80):
        if rng.random() < 0.15:
            out.append(("remove", f"i{rng.randrange(30)}"))
        else:
            out.append(("upsert", {"item_id": f"i{rng.randrange(30)}", "title": f"T{k}",
                                   "category": rng.choice(["A", "B", None]), "tags": rng.sample(["x", "y", "z"], 2),
                                   "price": rng.choice([1.5, None]), "available": rng.random() < 0.9}))
    return out


def _catalog_one(c: Catalog, x):
    op, arg = x
    if op == "remove":
        c.remove(arg)
    else:
        c.upsert(arg, now=T0)


def _catalog_reads(c: Catalog):
    rows = [c.find(f"i{k}") for k in range(31)]
    return [(c.features(r), c.category_name(r), c.title(r), bool(c.available[r])) for r in rows if r is not None], \
        c.recent_rows(), c.n_unavailable


COMPONENT_CASES = [
    Case("cooccurrence", _cooc_make, lambda co, x: co.update(*x), _pair_stream, _cooc_reads, _cooc_many),
    Case("trending", _trend_make, lambda t, x: _trend_many(t, [x]), _trend_stream,
         lambda t: (t.top(4), t.top(4, 1), t.top(20, 2), t.global_max), _trend_many),
    Case("profiles", lambda: Profiles(history_len=4, max_features=3, max_consumed=5, capacity=2), _profile_one,
         _profile_stream, _profile_reads),
    Case("segmenter", lambda: Segmenter(n_segments=3, n_category_slots=2, seed=3), _segment_one, _segment_stream,
         lambda s: (s.sizes(), s.centers())),
    Case("catalog", lambda: Catalog(capacity=2, recent_len=5), _catalog_one, _catalog_stream, _catalog_reads),
]

CASES = ENGINE_CASES + COMPONENT_CASES
IDS = [c.name for c in CASES]


def _many(case: Case, m, xs):
    if case.learn_many is not None:
        case.learn_many(m, xs)
    else:
        for x in xs:
            case.learn_one(m, x)


def _same(a, b):
    sa, sb = snapshot(a), snapshot(b)
    assert sa == sb, first_difference(sa, sb)


# ---------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_input_not_mutated(case: Case):
    xs = case.stream(1)
    before = copy.deepcopy(xs)
    m = case.make()
    for x in xs[: len(xs) // 2]:
        case.learn_one(m, x)
    _many(case, m, xs[len(xs) // 2:])
    case.reads(m)
    assert snapshot(xs) == snapshot(before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_seeded_determinism(case: Case):
    a, b = case.make(), case.make()
    _many(case, a, case.stream(2))
    _many(case, b, case.stream(2))
    _same(a, b)
    assert snapshot(case.reads(a)) == snapshot(case.reads(b))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pickle_round_trip_then_learn_on(case: Case):
    xs = case.stream(3)
    a = case.make()
    _many(case, a, xs[: len(xs) // 2])
    b = pickle.loads(pickle.dumps(a))
    _same(a, b)
    assert snapshot(case.reads(a)) == snapshot(case.reads(b))
    _many(case, a, xs[len(xs) // 2:])
    _many(case, b, xs[len(xs) // 2:])
    _same(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_learn_many_equals_learn_one_loop(case: Case):
    xs = case.stream(4)
    a, b = case.make(), case.make()
    _many(case, a, xs)
    for x in xs:
        case.learn_one(b, x)
    _same(a, b)
    assert snapshot(case.reads(a)) == snapshot(case.reads(b))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_boundaries_irrelevant(case: Case):
    xs = case.stream(5)
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(xs)), 7))
    a, b = case.make(), case.make()
    _many(case, a, xs)
    for lo, hi in zip([0] + cuts, cuts + [len(xs)]):
        _many(case, b, xs[lo:hi])
    _same(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reads_never_mutate(case: Case):
    m = case.make()
    _many(case, m, case.stream(6))
    before = snapshot(m)
    first = snapshot(case.reads(m))
    assert snapshot(m) == before
    assert snapshot(case.reads(m)) == first


def test_feature_order_irrelevant_for_segments():
    xs = _segment_stream(7)
    a, b = Segmenter(n_segments=3, seed=1), Segmenter(n_segments=3, seed=1)
    for mix, f, m, gap, cur in xs:
        x = a.features(mix, f, m, gap)
        ra = a.assign(x, cur)
        y = b.features(dict(reversed(list(mix.items()))), f, m, gap)
        rb = b.assign(dict(reversed(list(y.items()))), cur)
        assert ra == rb
    _same(a, b)


def test_event_field_order_and_event_objects_irrelevant():
    xs = _engine_stream(8)
    a, b, c = Engine(TINY), Engine(TINY), Engine(TINY)
    a.learn_many(xs)
    b.learn_many([dict(reversed(list(e.items()))) for e in xs])
    from infogap.models.events import as_event
    c.learn_many([as_event(e) for e in xs])
    _same(a, b)
    _same(a, c)


def test_to_state_from_state_round_trip():
    e = Engine(TINY)
    xs = _engine_stream(9)
    e.learn_many(xs[:300])
    state = e.to_state()
    f = Engine.from_state(pickle.loads(pickle.dumps(state)))
    _same(e, f)
    e.learn_many(xs[300:])
    f.learn_many(xs[300:])
    _same(e, f)
    assert snapshot(_engine_reads(e)) == snapshot(_engine_reads(f))
    with pytest.raises(ValueError, match="version"):
        Engine.from_state({"version": 99})


def test_renormalisation_keeps_values_and_equivalence():
    """Years of event time with short half-lives: the reference time moves, nothing overflows."""
    cfg = EngineConfig(half_life_days=0.5, cooc_half_life_days=1.0, trending_half_life_days=0.25)
    xs = random_stream(600, n_users=10, n_items=15, seed=10, span=3 * 365 * DAY)
    a, b = Engine(cfg), Engine(cfg)
    a.learn_many(xs)
    for x in xs:
        b.learn_one(x)
    _same(a, b)
    assert a.state.t0 > T0 + 365 * DAY
    assert np.isfinite(a.state.cooc.vals).all() and np.isfinite(a.state.trending.global_).all()
    assert all(np.isfinite(r.score) for r in a.recommend("u1", 5))


def test_chunked_learn_many_crosses_door_resets(monkeypatch):
    """Blocks end at fixed multiples of the learned-event count whatever the call boundaries."""
    monkeypatch.setattr(engine_mod, "_CHUNK", 16)
    monkeypatch.setattr(engine_mod, "DOOR_PERIOD", 64)
    xs = random_stream(500, n_users=12, n_items=20, seed=11)
    a, b, c = Engine(TINY), Engine(TINY), Engine(TINY)
    a.learn_many(xs)
    for x in xs:
        b.learn_one(x)
    for lo in range(0, len(xs), 37):
        c.learn_many(xs[lo:lo + 37])
    _same(a, b)
    _same(a, c)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.sampled_from(
    ["view", "click", "add_to_cart", "purchase", "rate", "dismiss", "impression", "push_open", "forget"]),
    st.floats(0, 5e5), st.integers(1, 5)), min_size=1, max_size=80))
def test_learn_many_equals_learn_one_on_arbitrary_streams(rows):
    cfg = EngineConfig(n_neighbours=3, evict_fraction=0.34, window=2, history_len=3, query_len=3, door_bits=4,
                       max_consumed=2, n_segments=2, segment_every=2, cooc_half_life_days=0.5)
    evs = []
    t = T0
    for k, (u, i, typ, dt, rating) in enumerate(rows):
        t += dt
        e = {"event_id": f"h{k}", "user_id": f"u{u}", "type": typ, "ts": t}
        if typ not in ("push_open", "forget"):
            e["item_id"] = f"i{i}"
        if typ == "rate":
            e["rating"] = float(rating)
        evs.append(e)
    a, b = Engine(cfg), Engine(cfg)
    a.learn_many(evs)
    for e in evs:
        b.learn_one(e)
    _same(a, b)
    assert snapshot(_engine_reads(a)) == snapshot(_engine_reads(b))


def test_learn_one_compiles_once_whatever_the_number_types():
    """Integer timestamps and ratings, every event type, with and without a segment: one compiled
    signature for the one-event kernel (another would stall a stream batch for seconds)."""
    e = Engine(EngineConfig(n_segments=2, segment_every=2, door_bits=0))
    for k, typ in enumerate(["view", "click", "add_to_cart", "purchase", "rate", "push_click"] * 4):
        ev = {"event_id": f"c{k}", "user_id": f"u{k % 3}", "item_id": f"i{k % 5}", "type": typ,
              "ts": int(T0) + k if k % 2 else T0 + k + 0.5}
        if typ == "rate":
            ev["rating"] = 4 if k % 2 else 3.5
        e.learn_one(ev)
    assert len(learn_core._learn_event.signatures) == 1


def test_pair_weights_follow_the_documented_formula_one_at_a_time_and_in_batches():
    """k-th predecessor p of cur: w_dir = gap * min(w_p, w) * scale * dir_decay ** k (k < dir_window),
    w_sym = the same with sym_decay ** k; gap = floor + (1 - floor) / (1 + max(dt, 0) / tau)."""
    pw = PairWeights(window=4, dir_window=2, dir_decay=0.6, sym_decay=0.9, gap_tau_s=30.0, gap_floor=0.25)
    rng = np.random.default_rng(0)
    e, w = 50, 4
    prev = rng.integers(-1, 10, (e, w))
    prev_ts = rng.uniform(0, 100, (e, w))
    prev_w = rng.uniform(0.1, 3, (e, w))
    cur, ts, cw, sc = rng.integers(0, 10, e), rng.uniform(100, 200, e), rng.uniform(0.1, 3, e), rng.uniform(1, 2, e)
    codes, deltas, ev = pw.many(cur, ts, cw, sc, prev, prev_ts, prev_w)
    want_codes, want_deltas, want_ev = [], [], []
    for j in range(e):
        c, d = pw.one(int(cur[j]), float(ts[j]), float(cw[j]), float(sc[j]), prev[j].tolist(), prev_ts[j].tolist(),
                      prev_w[j].tolist())
        assert np.array_equal(c, codes[ev.repeat(2) == j]) and np.array_equal(d, deltas[ev.repeat(2) == j])
        for k in range(w):
            p, now = int(prev[j, k]), int(cur[j])
            if p < 0 or p == now:
                continue
            gap = 0.25 + 0.75 / (1.0 + max(float(ts[j] - prev_ts[j, k]), 0.0) / 30.0)
            base = gap * min(float(prev_w[j, k]), float(cw[j])) * float(sc[j])
            ws = base * 0.9 ** k
            want_codes += [code(p, now), code(now, p)]
            want_deltas += [[base * 0.6 ** k if k < 2 else 0.0, ws, sc[j], 1.0], [0.0, ws, sc[j], 1.0]]
            want_ev.append(j)
    assert codes.tolist() == want_codes and ev.tolist() == want_ev
    np.testing.assert_allclose(deltas, np.array(want_deltas), rtol=1e-15)
    assert code(3, 4) >> 32 == 3


def test_pair_weights_rating_agreement_and_shared_features_follow_the_formula():
    """On top of the above: both weights times exp(-agreement * |r_p - r|) when both events have a rating
    (0: none), and w_sym times 1 + feature_boost * |F_p & F| / |F_p | F| (categories/tags as bits)."""
    pw = PairWeights(window=3, dir_window=2, dir_decay=0.6, sym_decay=0.9, gap_tau_s=30.0, gap_floor=0.25,
                     agreement=0.4, feature_boost=1.5)
    plain = PairWeights(window=3, dir_window=2, dir_decay=0.6, sym_decay=0.9, gap_tau_s=30.0, gap_floor=0.25)
    rng = np.random.default_rng(1)
    e, w = 40, 3
    prev = rng.integers(-1, 8, (e, w))
    prev_ts, prev_w = rng.uniform(0, 100, (e, w)), rng.uniform(0.1, 3, (e, w))
    cur, ts, cw, sc = rng.integers(0, 8, e), rng.uniform(100, 200, e), rng.uniform(0.1, 3, e), np.ones(e)
    rating, prev_rating = rng.integers(0, 6, e).astype(float), rng.integers(0, 6, (e, w)).astype(float)
    mask, prev_mask = rng.integers(0, 16, e).astype(np.uint64), rng.integers(0, 16, (e, w)).astype(np.uint64)
    codes, deltas, ev = pw.many(cur, ts, cw, sc, prev, prev_ts, prev_w, rating, prev_rating, mask, prev_mask)
    codes0, base, ev0 = plain.many(cur, ts, cw, sc, prev, prev_ts, prev_w)
    assert codes.tolist() == codes0.tolist() and ev.tolist() == ev0.tolist()
    want = base.copy()
    pairs = [(j, k) for j in range(e) for k in range(w) if prev[j, k] >= 0 and prev[j, k] != cur[j]]  # pair order
    for t, (j, k) in enumerate(pairs):
        r, rp = rating[j], prev_rating[j, k]
        agree = np.exp(-0.4 * abs(r - rp)) if r > 0 and rp > 0 else 1.0
        a, b = int(mask[j]), int(prev_mask[j, k])
        share = bin(a & b).count("1") / bin(a | b).count("1") if a | b else 0.0
        for row in (2 * t, 2 * t + 1):
            want[row, 0] *= agree
            want[row, 1] *= agree * (1.0 + 1.5 * share)
    np.testing.assert_allclose(deltas, want, rtol=1e-12)
    assert not np.allclose(deltas, base)  # the draw exercises both factors


def test_a_snapshot_from_before_ratings_and_feature_masks_loads_and_learns_on():
    """Pickles written before the history kept ratings and the catalog feature bits: those are rebuilt
    (masks) or empty (ratings), and the pickled pair weights keep both new factors off."""
    e = Engine(EngineConfig(min_users=1))  # (10 users: at a privacy floor of 5, too few items for 5 recommendations)
    e.upsert_item({"item_id": "i0", "category": "A", "tags": ["x"]})
    e.upsert_item({"item_id": "i1", "category": "A"})
    xs = random_stream(300, n_users=10, n_items=12, seed=5)
    e.learn_many(xs[:200])
    masks = e.state.catalog.feat_mask.copy()
    for obj, name in ((e.state.profiles, "hist_rating"), (e.state.catalog, "feat_mask"), (e._pairs, "agreement"),
                      (e._pairs, "feature_boost")):
        delattr(obj, name)
    old = pickle.loads(pickle.dumps(e))
    assert not old.state.profiles.hist_rating.any() and old.state.profiles.hist_rating.shape == old.state.profiles.hist_type.shape
    assert np.array_equal(old.state.catalog.feat_mask, masks) and masks[old.state.catalog.find("i0")] != 0
    assert old._pairs.agreement == 0.0 and old._pairs.feature_boost == 0.0
    old.learn_many(xs[200:])
    assert len(old.recommend("u1", 5)) == 5


def test_segmenter_nearest_center_is_rivers():
    """The segmenter's KMeans finds the nearest center over its fixed keys: River's answer, faster."""
    from river import cluster

    from infogap.models.segments import Segmenter

    s = Segmenter(n_segments=6, seed=1)
    rng = random.Random(3)
    for _ in range(60):  # learn some centers
        s.assign(s.features({rng.randrange(12): 1.0, rng.randrange(12): 0.5}, rng.uniform(0, 30), 0.0, 1.0), -1)
    for _ in range(300):
        x = s.features({rng.randrange(12): rng.random(), rng.randrange(12): rng.random()}, rng.uniform(0, 50),
                       rng.uniform(0, 200), rng.uniform(0, 30))
        assert s._km.predict_one(x) == cluster.KMeans.predict_one(s._km, x)


def test_segmenter_nearest_follows_its_centers_and_keeps_a_user_within_the_margin():
    """``nearest`` (which keeps the centers' values between changes) answers River's nearest center, or
    the user's current segment when that center is within the hysteresis margin, after every change of
    the centers: learned, seeded or loaded."""
    from river import cluster

    from infogap.models.segments import Segmenter

    rng = random.Random(5)

    def point():
        return {rng.randrange(12): rng.random(), rng.randrange(12): rng.random()}, rng.uniform(0, 50), \
            rng.uniform(0, 200), rng.uniform(0, 30)

    def reference(s, x, current):
        c = cluster.KMeans.predict_one(s._km, x)
        if 0 <= current < s._n_seeded and current != c and s._dist(current, x) <= (1 + s.margin) * s._dist(c, x):
            return current
        return c

    s = Segmenter(n_segments=6, seed=1, margin=0.3)
    kept = 0
    for step in range(400):
        x = s.features(*point())
        current = rng.randrange(-1, 6)
        got = s.nearest(x, current)
        if s._n_seeded:
            assert got == reference(s, x, current), step
            kept += got == current != cluster.KMeans.predict_one(s._km, x)
        else:
            assert got == -1
        if step % 3 == 0:
            s.assign(s.features(*point()), -1)  # seeds a center or moves one
    assert s._n_seeded == 6 and kept > 0
    t = Segmenter(n_segments=6, margin=0.3)
    for source in (s, Segmenter(n_segments=6, seed=2)):
        for _ in range(20):
            source.assign(source.features(*point()), -1)
        t.load_model(source.export_model(str), int)
        for _ in range(100):
            x, current = t.features(*point()), rng.randrange(-1, 6)
            assert t.nearest(x, current) == reference(t, x, current)


# ---------------------------------------------------------------------------- docstrings and imports
MODELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "models"
MODEL_FILES = sorted(p.name for p in MODELS_DIR.glob("*.py"))


@pytest.mark.parametrize("name", MODEL_FILES)
def test_models_import_only_compute_libraries(name):
    """Pure models: no Kafka, Redis or other I/O libraries (numba compiles the hot loops, orjson
    encodes pair deltas to bytes)."""
    import sys
    tree = ast.parse((MODELS_DIR / name).read_text())
    allowed = {"numpy", "numba", "orjson", "river", "infogap.models"} | set(sys.stdlib_module_names)

    def root(module: str) -> str:  # infogap.models.x -> infogap.models; numpy.linalg -> numpy
        return "infogap.models" if module.startswith("infogap.models") else module.split(".")[0]

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [root(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [root(node.module or "")] if node.level == 0 else []
        else:
            continue
        for r in roots:
            assert r in allowed, f"models/{name} imports {r!r}: models/ may import only numpy, numba, orjson, river and the stdlib"


@pytest.mark.parametrize("cls", [Engine, EngineConfig, Catalog, Profiles, CoOccurrence, PairWeights, Segmenter,
                                 Trending])
def test_public_classes_have_numpydoc_examples(cls):
    doc = cls.__doc__ or ""
    assert "Examples" in doc and ">>>" in doc, f"{cls.__name__} needs a numpydoc Examples section with a doctest"


def test_models_read_no_clock_and_no_randomness():
    for name in MODEL_FILES:
        src = (MODELS_DIR / name).read_text()
        for banned in ("time.time", "datetime.now", "perf_counter", "import random", "np.random", "open("):
            assert banned not in src, f"models/{name} uses {banned!r}"


def test_trending_top_lists_are_remembered_until_the_scores_change_and_go_with_their_object():
    import gc

    from infogap.models.scratch import _MEMOS

    t = Trending(n_segments=2)
    t.ensure(4)
    t.add([1, 2, 2], [0, 0, 1], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    first = t.top(2)
    assert first.tolist() == [2, 1] and t.top(2) is first  # remembered
    t.add([1, 1], [-1, -1], [1.0, 1.0], [1.0, 1.0])
    assert t.top(2).tolist() == [1, 2]  # a change is seen at once
    key = id(t)
    assert key in _MEMOS
    del t, first
    gc.collect()
    assert key not in _MEMOS
