"""The prequential protocol and its metrics, counted by hand, and the pure baselines."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infogap.models.evaluation import (DecayedPopularity, Popularity, PrequentialResult, hit_rate, hr_curve, ndcg,
                               prequential)
from infogap.models.events import Event


def ev(user, item, ts, type_="rate"):
    e = {"event_id": f"{user}-{item}-{ts}", "user_id": user, "type": type_, "ts": float(ts)}
    if item is not None:
        e["item_id"] = item
    return e


class Scripted:
    """Returns preset lists in call order and logs every call with a copy of ``exclude``."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.log = []

    def learn_one(self, event):
        self.log.append(("learn", event["event_id"]))

    def recommend(self, user_id, n=10, *, exclude=None):
        self.log.append(("recommend", user_id, frozenset(exclude or ())))
        return self.answers.pop(0)


STREAM = [
    ev("u1", "a", 1),                  # 0 u1 unknown: learned only
    ev("u1", "b", 2),                  # 1 tested, exclude {a}: [b, c] -> hit at rank 0, gain 1
    ev("u2", "a", 3),                  # 2 u2 unknown
    ev("u2", "c", 4, "impression"),    # 3 not an interaction: learned only, c not u2's
    ev("u1", "c", 5),                  # 4 tested, exclude {a, b}: [x, y, c] -> rank 2, gain 1/log2(4) = 0.5
    ev("u2", "d", 6),                  # 5 tested, exclude {a}: [a, e] -> miss; 'a' breaks the exclusion
    ev("u1", "a", 7),                  # 6 repeat: learned, not tested
    ev("u2", None, 8, "push_open"),    # 7 no item: learned only
]


def test_hand_counted_stream():
    model = Scripted([["b", "c"], ["x", "y", "c"], ["a", "e"]])
    r = prequential(model, STREAM, k=10)
    assert (r.n_events, r.n_evaluated, r.hits) == (8, 3, 2)
    assert r.hr == pytest.approx(2 / 3)
    assert r.ndcg == pytest.approx((1 + 0.5 + 0) / 3)
    assert r.ranks.tolist() == [0, 2, -1] and r.positions.tolist() == [1, 4, 5]
    assert r.n_skipped_repeats == 1 and r.n_excluded_returned == 1
    # catalogue = interacted items {a, b, c, d}; x, y, e are outside it; recommended inside: a, b, c
    assert r.catalog_size == 4 and r.coverage == pytest.approx(3 / 4) and r.n_recommended_items == 6
    assert r.seconds is None and r.events_per_s is None


def test_test_then_learn_order_and_exclusions():
    model = Scripted([["b"], ["c"], ["d"]])
    prequential(model, STREAM)
    recs = [(i, c) for i, c in enumerate(model.log) if c[0] == "recommend"]
    assert [c[1:] for _, c in recs] == [("u1", {"a"}), ("u1", {"a", "b"}), ("u2", {"a"})]
    for i, _ in recs:  # each test comes right before the learning of the same event
        assert model.log[i + 1][0] == "learn"
    assert [c[1] for c in model.log if c[0] == "learn"] == [e["event_id"] for e in STREAM]


def test_list_is_cut_at_k_and_objects_with_item_id_are_accepted():
    from collections import namedtuple

    Rec = namedtuple("Rec", "item_id score reason")
    model = Scripted([[Rec("z", 1, ""), Rec("b", 1, "")], [Rec("c", 1, "")], []])
    r = prequential(model, STREAM, k=1)
    assert r.ranks.tolist() == [-1, 0, -1]  # b was at rank 1, outside the top-1


def test_catalogue_coverage_and_clock():
    ticks = iter(range(1000))
    r = prequential(Scripted([["b", "q"], ["c"], ["d"]]), STREAM, catalog=["a", "b", "c", "d", "q", "r"],
                    clock=lambda: float(next(ticks)))
    assert r.coverage == pytest.approx(4 / 6)  # b, q, c, d
    assert r.seconds > 0 and r.events_per_s == pytest.approx(8 / r.seconds)
    assert 0 < r.model_seconds <= r.seconds


def test_event_records_are_accepted_and_progress_is_reported():
    done = []
    records = [Event(**{k: v for k, v in e.items()}) for e in STREAM]
    r = prequential(Popularity(), records, progress=done.append, progress_every=3)
    assert done == [3, 6, 8] and r.n_evaluated == 3


def test_out_of_order_events_are_refused():
    with pytest.raises(ValueError, match="sorted by timestamp"):
        prequential(Popularity(), [ev("u", "a", 2), ev("u", "b", 1)])


def test_popularity_hand_counted():
    stream = [ev("u1", "a", 1), ev("u2", "a", 2), ev("u2", "b", 3), ev("u3", "b", 4), ev("u1", "b", 5),
              ev("u3", "c", 6)]
    # u2@3: exclude {a}, pop {a:2} -> [] miss;  u1@5: exclude {a}, pop {a:2,b:2} -> [b] hit rank 0
    # u3@6: exclude {b}, pop {a:2,b:3} -> [a] miss (c never seen)
    r = prequential(Popularity(), stream)
    assert r.ranks.tolist() == [-1, 0, -1] and r.hr == pytest.approx(1 / 3) and r.ndcg == pytest.approx(1 / 3)


def test_popularity_ranking_ties_and_exclusion():
    p = Popularity()
    for i, item in enumerate("cabbaa"):
        p.learn_one(ev("u", item, i))
    assert p.recommend("x", 10) == ["a", "b", "c"]
    assert p.recommend("x", 2, exclude={"a", "zz"}) == ["b", "c"]
    assert p.recommend("x", 5, exclude={"a", "b", "c"}) == []
    p.learn_one(ev("u", "d", 9, "impression"))
    assert "d" not in p.recommend("x", 10)


def test_popularity_grows_past_its_first_array():
    p = Popularity()
    for i in range(300):
        p.learn_one(ev("u", f"i{i}", i))
    p.learn_one(ev("u", "i299", 400))
    assert p.recommend("x", 1) == ["i299"] and len(p.recommend("x", 1000)) == 300


def test_decayed_popularity_follows_recent_taste_and_survives_long_streams():
    d = DecayedPopularity(half_life_days=1.0)
    for t in range(3):
        d.learn_one(ev("u", "old", t))
    d.learn_one(ev("u", "new", 2 * 86400.0))  # 3 * 2**-2 = 0.75 < 1
    assert d.recommend("u", 2) == ["new", "old"]
    assert d.score("old", at=2 * 86400.0) == pytest.approx(0.75, rel=1e-4)  # events at 0, 1, 2 s
    far = 10 * 365 * 86400.0  # 3650 half-lives: the forward-decay reference must move, not overflow
    d.learn_one(ev("u", "late", far))
    assert d.recommend("u", 1) == ["late"] and np.isfinite(d._scores).all()
    assert d.score("late", at=far) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        DecayedPopularity(half_life_days=0)


def test_metric_functions():
    assert hit_rate(np.array([], dtype=np.int16)) == 0.0 and ndcg(np.array([])) == 0.0
    assert ndcg(np.array([0, 1, 9, -1])) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)


def test_hr_curve_window_and_cumulative():
    ranks = np.array([-1, -1, 0, 0, 0, -1, 0, 0], dtype=np.int16)
    r = PrequentialResult("m", 10, 16, 8, 5, 5 / 8, 0.0, 0.0, 0, 0, 0, 0, None, None,
                          ranks=ranks, positions=np.arange(1, 17, 2))
    c = hr_curve(r, window=4, points=4)
    assert c["x"] == [4, 8, 12, 16]
    assert c["hr_cumulative"] == pytest.approx([0 / 2, 2 / 4, 3 / 6, 5 / 8])
    assert c["hr_window"] == pytest.approx([0 / 2, 2 / 4, 3 / 4, 3 / 4])  # last 4 tested: 0,0,0,-1 / 0,-1,0,0
    empty = PrequentialResult("m", 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None, None,
                              ranks=np.array([], dtype=np.int16), positions=np.array([], dtype=np.int64))
    assert hr_curve(empty) == {"x": [], "hr_window": [], "hr_cumulative": []}


def test_the_engine_fits_the_protocol():
    from infogap.models import Engine

    rng = np.random.default_rng(0)
    stream, t = [], 0.0
    for _ in range(600):  # two groups of users, each with its own pool of items
        g = int(rng.integers(2))
        t += 1.0
        stream.append(ev(f"u{g}-{rng.integers(20)}", f"g{g}-i{rng.integers(15)}", t))
    engine = Engine()
    before = [dict(e) for e in stream]
    r = prequential(engine, stream, k=10)
    assert stream == before  # the harness never changes the events
    assert r.n_evaluated > 100 and r.n_excluded_returned == 0
    assert r.hr > prequential(Popularity(), stream).hr * 0.5  # sane, not a tuning target

_streams = st.lists(st.tuples(st.sampled_from(["u1", "u2", "u3", "u4"]), st.sampled_from(list("abcdefg")),
                              st.sampled_from(["view", "rate", "impression"])), max_size=60)


@settings(max_examples=60, deadline=None)
@given(_streams, st.integers(1, 5))
def test_accounting_invariants_on_any_stream(rows, k):
    stream = [ev(u, i, t, typ) for t, (u, i, typ) in enumerate(rows)]
    inter = [(e["user_id"], e["item_id"]) for e in stream if e["type"] != "impression"]
    first_of_user = len({u for u, _ in inter})
    for model in (Popularity(), DecayedPopularity(1.0)):
        r = prequential(model, stream, k=k)
        assert r.n_evaluated + r.n_skipped_repeats + first_of_user == len(inter)
        assert r.n_skipped_repeats == len(inter) - len(set(inter))
        assert 0.0 <= r.ndcg <= r.hr <= 1.0 and 0.0 <= r.coverage <= 1.0
        assert r.n_excluded_returned == 0 and r.ranks.max(initial=-1) < k


def test_prequential_reports_exposure_long_tail_novelty_diversity_and_groups():
    # u1, u2, u3 arrive; then three tests with scripted lists (k = 2) over the catalogue a, b, c, d
    stream = [ev("u1", "a", 0), ev("u2", "a", 1), ev("u3", "b", 2),
              ev("u1", "b", 3),   # [c, b]: hit. Before it: a 2, b 1 of 3 -> head {a} (threshold 2)
              ev("u2", "c", 4),   # [b, d]: miss. Before: a 2, b 2 -> head {a, b}
              ev("u3", "a", 5)]   # [a, c]: hit. Before: a 2, b 2, c 1 -> head {a, b}
    model = Scripted([["c", "b"], ["b", "d"], ["a", "c"]])
    genres = {"a": ["Drama"], "b": ["Drama", "War"], "c": ["Drama", "Comedy"], "d": []}
    groups = {"u1": {"gender": "F"}, "u2": {"gender": "M"}, "u3": {"gender": "F"}}
    r = prequential(model, stream, k=2, catalog="abcd", item_features=genres, user_groups=groups,
                    min_group_events=1)
    assert r.ranks.tolist() == [1, -1, 0]
    # exposure a 1, b 2, c 2, d 1: sorted 1, 1, 2, 2 -> (-3 - 1 + 2 + 6) / (4 * 6)
    assert r.exposure_gini == pytest.approx(4 / 24)
    # tail slots: c (0), b (1 < 2) | d | c: 4 of 6
    assert r.long_tail_share == pytest.approx(4 / 6)
    # 3 users before each test; pops c 0 (as 1), b 1 | b 2, d 0 | a 2, c 1
    assert r.novelty == pytest.approx((4 * math.log2(3) + 2 * math.log2(3 / 2)) / 6)
    # [c, b]: 1 - 1/3; [b, d]: d has no genre, left out; [a, c]: 1 - 1/2
    assert r.ild == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r.head_items == 1  # at the end a 3, b 2, c 1: a alone takes >= 20 %
    g = r.group_hr["gender"]
    assert {k: (v["n"], v["hits"]) for k, v in g["groups"].items()} == {"F": (2, 2), "M": (1, 0)}
    assert g["gap"]["best"] == "F" and g["gap"]["abs"] == 1.0 and g["gap"]["ratio"] is None
    s = r.summary()
    assert s["exposure_gini"] == r.exposure_gini and s["group_hr"]["gender"]["groups"]["M"]["hr"] == 0.0


def test_fairness_figures_without_features_groups_or_lists():
    r = prequential(Popularity(), STREAM, k=3)
    assert r.ild is None and r.group_hr == {} and r.exposure_gini is not None
    empty = prequential(Scripted([[], [], []]), STREAM)
    assert (empty.exposure_gini, empty.long_tail_share, empty.novelty, empty.ild) == (None, None, None, None)
    # a catalogue given as a one-pass iterator is read once, for coverage and exposure alike
    r = prequential(Scripted([["b", "c"], ["x", "y", "c"], ["a", "e"]]), STREAM, catalog=iter("abcd"))
    assert r.catalog_size == 4 and r.coverage == pytest.approx(3 / 4)
    assert r.exposure_gini == pytest.approx(gini_of([1, 1, 2, 0]))


def gini_of(x):
    from infogap.models.fairness import gini

    return gini(x)


def test_lists_are_the_same_across_flushes(monkeypatch):
    from infogap.models import evaluation

    rng = np.random.default_rng(3)
    stream = [ev(f"u{rng.integers(8)}", f"i{rng.integers(14)}", t) for t in range(200)]
    answers = [[f"i{j}" for j in rng.choice(14, size=int(rng.integers(0, 4)), replace=False)] for _ in range(200)]
    genres = {f"i{j}": [f"g{j % 3}", f"g{j % 5}"] for j in range(14)}
    whole = prequential(Scripted(answers), stream, k=3, item_features=genres)
    monkeypatch.setattr(evaluation, "_FLUSH", 2)  # flush every two lists, short lists included
    split = prequential(Scripted(answers), stream, k=3, item_features=genres)
    assert whole.n_evaluated > 50
    for f in ("exposure_gini", "long_tail_share", "novelty", "ild", "head_items"):
        assert getattr(split, f) == pytest.approx(getattr(whole, f)), f
