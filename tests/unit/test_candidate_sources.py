"""The candidate-source seam: a source proposes items, the ranker blends, filters and explains them.

The equivalence of the compiled ranker with a step-by-step one, sources on, is in test_rank_core.py;
here is what a shopper and a marketer would check of the one source shipped, "still in your cart".
"""
from __future__ import annotations

import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.candidate_sources import SOURCES, StillInCart, active_sources, proposals

from .test_models_support import DAY, T0, group_stream

CART = "still in your cart"


def _engine(**cfg) -> Engine:
    """Shoppers who buy kettles with tea, and one, "ann", who put a kettle in her cart and bought tea."""
    e = Engine(EngineConfig(door_bits=0, **cfg))
    for item, cat in (("kettle", "Kitchen"), ("tea", "Food"), ("mug", "Kitchen"), ("jam", "Food")):
        e.upsert_item({"item_id": item, "title": item.title(), "category": cat})
    evs, k = [], 0
    for u in range(20):
        for item in ("tea", "mug", "jam"):
            evs.append({"event_id": f"e{k}", "user_id": f"s{u}", "type": "purchase", "ts": T0 + k, "item_id": item})
            k += 1
    evs += [{"event_id": "a1", "user_id": "ann", "type": "add_to_cart", "ts": T0 + k, "item_id": "kettle"},
            {"event_id": "a2", "user_id": "ann", "type": "purchase", "ts": T0 + k + 1, "item_id": "tea"}]
    e.learn_many(evs)
    return e


def test_an_item_left_in_the_cart_is_recommended_with_that_reason_when_the_source_is_on():
    off = _engine()
    assert "kettle" not in [r.item_id for r in off.recommend("ann", n=2)]  # no one bought it: nothing votes for it
    recs = _engine(w_cart=0.5).recommend("ann", n=3)  # (half the weight of the best pair's votes)
    assert [(r.item_id, r.reason) for r in recs][2] == ("kettle", CART), recs
    on = _engine(w_cart=2.0)
    recs = on.recommend("ann", n=2)
    assert recs[0].item_id == "kettle" and recs[0].reason == CART, recs
    assert on.recommend("ann", n=2, explain=False)[0].item_id == "kettle"


def test_a_bought_item_leaves_the_cart_and_the_recommendations():
    e = _engine(w_cart=2.0)
    e.learn_one({"event_id": "a3", "user_id": "ann", "type": "purchase", "ts": T0 + 99, "item_id": "kettle"})
    assert "kettle" not in [r.item_id for r in e.recommend("ann", n=3)]


def test_an_excluded_or_unavailable_cart_item_is_not_recommended():
    e = _engine(w_cart=2.0)
    assert "kettle" not in [r.item_id for r in e.recommend("ann", n=3, exclude={"kettle"})]
    e.upsert_item({"item_id": "kettle", "title": "Kettle", "category": "Kitchen", "available": False})
    assert "kettle" not in [r.item_id for r in e.recommend("ann", n=3)]


def test_a_variant_turns_the_source_on_for_its_requests_only():
    e = _engine()
    assert e.recommend("ann", n=1, overrides={"w_cart": 2.0})[0].reason == CART
    assert e.recommend("ann", n=1)[0].reason != CART


def test_the_cart_score_halves_every_half_life_of_event_time():
    e = _engine(w_cart=1.0)
    u = e.state.profiles.find("ann")
    (rows, scores, _) = proposals(e.state, active_sources(e.config), u, 10)
    assert e.state.catalog.ids[int(rows[0])] == "kettle"
    assert scores[0] == pytest.approx(0.5 ** (1 / 86400 / 3.0))  # (put in the cart a second ago)
    e.learn_one({"event_id": "x", "user_id": "s0", "type": "view", "ts": T0 + 3 * DAY + 60, "item_id": "jam"})
    rows, scores, codes = proposals(e.state, active_sources(e.config), u, 10)
    assert scores.tolist() == pytest.approx([0.5], rel=1e-3) and codes.tolist() == [4]


def test_no_source_is_asked_when_every_weight_is_zero():
    e = _engine()
    rows, scores, codes = proposals(e.state, active_sources(e.config), e.state.profiles.find("ann"), 10)
    assert rows.size == scores.size == codes.size == 0


def test_every_source_names_a_ranker_setting_that_variants_may_change():
    from infogap.models.experiments import RANKER_OVERRIDES

    for source in SOURCES:
        assert hasattr(EngineConfig(), source.setting) and source.setting in RANKER_OVERRIDES


def test_at_most_k_cart_items_the_most_recent_first():
    evs, items, _ = group_stream(n_groups=1, users_per_group=3, items_per_group=15, events_per_user=60, seed=3)
    e = Engine(EngineConfig(w_cart=1.0))
    for it in items:
        e.upsert_item(it)
    e.learn_many(evs)
    for user in {ev["user_id"] for ev in evs}:
        u = e.state.profiles.find(user)
        rows, scores = StillInCart().propose(e.state, u, 2)
        everything, all_scores = StillInCart().propose(e.state, u, 100)
        assert rows.size == min(2, everything.size) and len(set(rows.tolist())) == rows.size
        assert sorted(scores.tolist(), reverse=True) == sorted(all_scores.tolist(), reverse=True)[:rows.size]
