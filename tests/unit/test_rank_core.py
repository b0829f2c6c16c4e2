"""The compiled common path of a request gives exactly what the step-by-step general path gives."""
from __future__ import annotations

import pytest

import models.ranker as ranker
from models import Engine, EngineConfig

from .test_models_support import group_stream


def _both(monkeypatch, engine: Engine, user: str, **kw):
    fused = engine.recommend(user, **kw)
    with monkeypatch.context() as m:
        m.setattr(ranker, "rank_core", lambda *a, **k: None)
        general = engine.recommend(user, **kw)
    return fused, general


@pytest.fixture(scope="module")
def learned():
    evs, items, _ = group_stream(n_groups=4, users_per_group=12, items_per_group=20, events_per_user=30, seed=11)
    out = {}
    for name, cfg in {"default": EngineConfig(door_bits=0),
                      "tight cap": EngineConfig(door_bits=0, max_category_share=0.2, n_neighbours=8),
                      "small": EngineConfig(door_bits=0, n_neighbours=4, query_len=3, content_history=2,
                                           momentum=0.0)}.items():
        eng = Engine(cfg)
        for it in items:
            eng.upsert_item(it)
        eng.learn_many(evs)
        out[name] = eng
    return out, sorted({e["user_id"] for e in evs}), [it["item_id"] for it in items]


@pytest.mark.parametrize("name", ["default", "tight cap", "small"])
@pytest.mark.parametrize("explain", [False, True])
def test_the_compiled_path_gives_the_general_paths_items_scores_and_reasons(monkeypatch, learned, name, explain):
    engines, users, _ = learned
    used = []
    real = ranker.rank_core
    monkeypatch.setattr(ranker, "rank_core", lambda *a, **k: used.append(r := real(*a, **k)) or r)
    for u in users:
        for n in (1, 5, 10):
            fused, general = _both(monkeypatch, engines[name], u, n=n, explain=explain)
            assert fused == general, (name, u, n)
    taken = sum(r is not None for r in used)
    assert taken > 0  # the compiled path did answer some requests, and handed back others
    if name == "tight cap":
        assert taken < len(used)


def test_excluded_ids_among_the_picks_go_to_the_general_path_and_stay_out(monkeypatch, learned):
    engines, users, _ = learned
    eng = engines["default"]
    for u in users[:10]:
        first = [r.item_id for r in eng.recommend(u, n=5)]
        fused, general = _both(monkeypatch, eng, u, n=5, exclude=set(first[:2]))
        assert fused == general
        assert not {r.item_id for r in fused} & set(first[:2])


def test_variant_overrides_take_the_compiled_path_with_their_own_settings(monkeypatch, learned):
    engines, users, _ = learned
    for u in users[:10]:
        fused, general = _both(monkeypatch, engines["default"], u, n=8,
                               overrides={"w_segment": 0.5, "query_len": 5, "max_category_share": 0.5})
        assert fused == general
