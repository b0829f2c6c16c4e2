"""models/fairness.py: exposure Gini, long tail, novelty, intra-list diversity and HR per group, by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infogap.models.fairness import (AGE_BANDS, age_band, exposure, feature_masks, gini, group_hit_rates,
                                     head_thresholds, intra_list_diversity, long_tail_share, novelty,
                                     popularity_before, user_groups, wilson)


def test_gini_of_equal_exposure_is_zero_and_of_one_item_is_n_minus_1_over_n():
    assert gini([5] * 7) == 0.0
    for n in (2, 3, 10, 1682):
        x = np.zeros(n)
        x[n // 2] = 42
        assert gini(x) == pytest.approx((n - 1) / n)
    assert gini([0, 1, 1, 2]) == pytest.approx(6 / 16)  # sum (2i - n - 1) x_(i) / (n sum x)
    assert gini([]) == 0.0 and gini([0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        gini([-1, 2])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=40))
def test_gini_matches_the_mean_absolute_difference(x):
    a = np.asarray(x, dtype=float)
    if a.sum() == 0:
        return
    mad = np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size * a.size * a.mean())
    assert gini(a) == pytest.approx(mad)


def test_exposure_counts_catalogue_items_and_zero_for_the_never_seen():
    rows = np.array([[0, 1, 3], [1, -1, -1], [3, 4, 1]])  # item 4 is outside the catalogue
    assert exposure(rows, np.array([0, 1, 2, 3, -1])).tolist() == [1, 3, 0, 2, 0]


def _brute_pop(pair_items, pair_pos, item, pos):
    return sum(1 for i, p in zip(pair_items, pair_pos) if i == item and p < pos)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30)), max_size=40),
       st.lists(st.tuples(st.integers(0, 6), st.integers(0, 35)), min_size=1, max_size=10))
def test_popularity_before_counts_strictly_earlier_interactions(pairs, queries):
    pairs.sort(key=lambda p: p[1])
    items = np.array([p[0] for p in pairs], dtype=np.int64)
    pos = np.array([p[1] for p in pairs], dtype=np.int64)
    q_items, q_pos = np.array([q[0] for q in queries]), np.array([q[1] for q in queries])
    got = popularity_before(items, pos, q_items, q_pos)
    assert got.tolist() == [_brute_pop(items, pos, i, p) for i, p in queries]


def _brute_threshold(seq, share):
    out, counts = [1], {}
    for item in seq:
        counts[item] = counts.get(item, 0) + 1
        n = sum(counts.values())
        # the largest c such that the items with count >= c take at least `share` of the interactions
        out.append(max([c for c in range(1, max(counts.values()) + 1)
                        if sum(v for v in counts.values() if v >= c) >= share * n], default=1))
    return out


def test_head_thresholds_by_hand():
    # after 10 interactions, counts 4, 3, 2, 1: 20 % is 2 -> the head is the first item (4 >= 2)
    seq = [0, 1, 0, 2, 1, 0, 3, 1, 2, 0]
    t = head_thresholds(seq, share=0.2)
    assert t[-1] == 4 and t[0] == 1 and len(t) == len(seq) + 1
    # at 50 %, 5 of 10 are needed: items at >= 3 take 7, items at >= 4 only 4 -> threshold 3
    assert head_thresholds(seq, share=0.5)[-1] == 3
    assert head_thresholds([], share=0.2).tolist() == [1]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=60), st.sampled_from([0.05, 0.2, 0.5, 0.9, 1.0]))
def test_head_thresholds_match_a_brute_force_recount(seq, share):
    assert head_thresholds(seq, share=share).tolist() == _brute_threshold(seq, share)


def test_long_tail_share_counts_filled_slots_only():
    rows = np.array([[0, 1, 2], [3, -1, -1]])
    pop = np.array([[10, 4, 0], [7, 0, 0]])
    # thresholds 5 then 8: list 1 has one head item of 3, list 2 has its one item in the tail
    assert long_tail_share(rows, pop, np.array([5, 8])) == pytest.approx(3 / 4)
    assert long_tail_share(np.full((2, 3), -1), pop, np.array([5, 8])) == 0.0


def test_novelty_is_mean_self_information_with_unseen_items_as_one_user():
    rows = np.array([[0, 1], [2, -1]])
    pop = np.array([[4, 1], [0, 99]])
    # -log2(4/8) = 1, -log2(1/8) = 3, an item nobody had: -log2(1/16) = 4; the empty slot is ignored
    assert novelty(rows, pop, np.array([8, 16])) == pytest.approx((1 + 3 + 4) / 3)


def test_intra_list_diversity_is_one_minus_jaccard_of_genres():
    masks = feature_masks([["Drama"], ["Drama", "War"], ["Comedy"], [], ["Drama", "War"]])
    rows = np.array([[0, 1, 2],     # (1 - 1/2) + 1 + 1 over 3 pairs
                     [1, 4, -1],    # identical genre sets: 0
                     [0, 3, -1]])   # item 3 has no genre: no pair, the list is left out
    assert intra_list_diversity(rows, masks) == pytest.approx(((0.5 + 1 + 1) / 3 + 0.0) / 2)
    assert intra_list_diversity(np.array([[3, -1]]), masks) is None


def test_feature_masks_past_64_features():
    features = [[f"g{i}" for i in range(70)], ["g0", "g69"], ["g69"]]
    masks = feature_masks(features)
    assert masks.shape == (3, 2)
    # 2/70 shared between item 0 and 1; 1/2 between 1 and 2; 1/70 between 0 and 2
    want = ((1 - 2 / 70) + (1 - 1 / 2) + (1 - 1 / 70)) / 3
    assert intra_list_diversity(np.array([[0, 1, 2]]), masks) == pytest.approx(want)


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_group_hit_rates_gap_minimum_and_intervals():
    hits = np.array([1] * 30 + [0] * 70 + [1] * 10 + [0] * 30 + [1] * 3 + [0] * 2 + [1, 0])
    labels = ["a"] * 100 + ["b"] * 40 + ["c"] * 5 + [None] * 2
    r = group_hit_rates(hits, labels, min_n=10)
    g = r["groups"]
    assert {k: (v["n"], v["hits"]) for k, v in g.items()} == {"a": (100, 30), "b": (40, 10), "c": (5, 3)}
    assert g["a"]["ci95"] == pytest.approx(list(wilson(30, 100)))
    # c (HR 0.6) has too few events: the gap is a (0.30) against b (0.25)
    assert r["skipped"] == ["c"] and r["gap"]["best"] == "a" and r["gap"]["worst"] == "b"
    assert r["gap"]["abs"] == pytest.approx(0.05) and r["gap"]["ratio"] == pytest.approx(1.2)
    assert r["gap"]["groups_compared"] == 2
    assert group_hit_rates(hits, labels, min_n=1)["gap"]["best"] == "c"
    assert group_hit_rates(hits, labels, min_n=50)["gap"] is None  # one group left: no gap
    zero = group_hit_rates(np.array([1, 0, 0, 0]), ["x", "x", "y", "y"], min_n=1)["gap"]
    assert zero["abs"] == 0.5 and zero["ratio"] is None


def test_age_bands_and_user_groups():
    assert [age_band(a) for a in (17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56)] == [
        "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49", "50-55", "50-55", "56+"]
    assert len(AGE_BANDS) == 7 and age_band(None) is None
    g = user_groups([{"user_id": "u1", "age": 33, "gender": "F", "occupation": ""},
                     {"user_id": "u2", "gender": "M"}])
    assert g == {"u1": {"gender": "F", "age": "25-34"}, "u2": {"gender": "M"}}
    # age bands are listed youngest first
    r = group_hit_rates(np.array([1, 0, 1]), ["56+", "<18", "25-34"], min_n=1)
    assert list(r["groups"]) == ["<18", "25-34", "56+"]
    assert math.isclose(r["gap"]["abs"], 1.0)
