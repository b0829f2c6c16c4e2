"""Per-request ranker overrides (A/B variants): ``Engine.recommend(..., overrides=...)``, their
validation (``infogap.models.experiments.validate_overrides``) and ``INFOGAP_EXPERIMENT_OVERRIDES``."""
from __future__ import annotations

import dataclasses
import gc
import pickle
import re
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

import infogap.models.rank_core as rank_core
import infogap.models.ranker as ranker
from infogap.models import Engine, EngineConfig
from infogap.models.candidate_sources import SOURCES
from infogap.models.experiments import RANKER_OVERRIDES, validate_overrides
from infogap.stream.settings import Settings

from .test_models_support import T0, event, random_stream, snapshot

#: Trending items, one per category, with their planted number of viewers (the global order).
TRENDING = {"b0": 60, "c0": 50, "d0": 40, "e0": 30, "f0": 25, "g0": 20}
#: The anchor's co-occurrence neighbours, all in category A.
PAIRED = [f"a{j}" for j in range(6)]
#: Every user of the planted stream only views: nothing is "had" (purchased/rated/dismissed).
ONLY_TRENDING = {"w_cooc": 0.0, "w_global": 1.0, "w_segment": 0.0, "w_content": 0.0,
                 "max_category_share": 1.0, "new_item_slots": 0}


def _planted() -> Engine:
    e = Engine(EngineConfig(n_segments=2))
    e.upsert_item({"item_id": "h", "title": "Anchor", "category": "H"})
    for i in PAIRED:
        e.upsert_item({"item_id": i, "title": i.upper(), "category": "A"})
    for i in TRENDING:
        e.upsert_item({"item_id": i, "title": i.upper(), "category": i[0].upper()})
    evs, k, t = [], 0, T0
    for u in range(8):  # 8 sessions: the anchor, then the paired items in order
        for i in ["h", *PAIRED]:
            evs.append(event(k, f"pair{u}", i, t))
            k, t = k + 1, t + 5.0
    for i, viewers in TRENDING.items():  # many one-view users: popularity, no pairs
        for v in range(viewers):
            evs.append(event(k, f"bg-{i}-{v}", i, t))
            k, t = k + 1, t + 1.0
    evs.append(event(k, "u", "h", t))  # the user under test has just viewed the anchor
    e.learn_many(evs)
    return e


@pytest.fixture(scope="module")
def planted() -> Engine:
    return _planted()


def _ids(recs) -> list[str]:
    return [r.item_id for r in recs]


def test_default_ranking_follows_the_cooccurrence(planted):
    recs = planted.recommend("u", 5)
    assert recs[0].item_id in PAIRED and "together with Anchor" in recs[0].reason
    cats = Counter(i[0] for i in _ids(recs))
    assert cats["a"] == 4  # ceil(0.7 * 5): the default diversity cap


def test_without_cooccurrence_the_global_trending_order(planted):
    recs = planted.recommend("u", 5, overrides=ONLY_TRENDING)
    assert _ids(recs) == ["b0", "c0", "d0", "e0", "f0"]
    assert _ids(recs) == [i for i, _ in planted.trending(5)]
    assert all(r.reason == "trending now" for r in recs)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True) and recs[0].score == 1.0


def test_max_category_share_limits_categories(planted):
    default = planted.recommend("u", 5)
    capped = planted.recommend("u", 5, overrides={"max_category_share": 0.2})  # ceil(0.2 * 5) = 1 per category
    cats = Counter(i[0] for i in _ids(capped))
    assert len(capped) == 5 and max(cats.values()) == 1
    assert capped[0].item_id == default[0].item_id  # the best co-occurrence item is still first
    assert Counter(i[0] for i in _ids(planted.recommend("u", 5, overrides={"max_category_share": 0.4})))["a"] == 2


def test_weights_move_the_blend_in_their_direction(planted):
    base = planted.recommend("u", 8, overrides={"max_category_share": 1.0})
    assert all(i in PAIRED for i in _ids(base)[:6])
    tilted = planted.recommend("u", 8, overrides={"max_category_share": 1.0, "w_global": 5.0})
    assert _ids(tilted)[:5] == ["b0", "c0", "d0", "e0", "f0"]  # popularity now outweighs the co-occurrence
    paired = [i for i in _ids(tilted) if i in PAIRED]
    assert paired and paired == _ids(base)[: len(paired)]  # the paired items keep their order


def test_no_overrides_is_unchanged(planted):
    plain = planted.recommend("u", 5)
    assert planted.recommend("u", 5, overrides=None) == plain
    assert planted.recommend("u", 5, overrides={}) == plain
    cfg = planted.config
    same = {k: getattr(cfg, k) for k in RANKER_OVERRIDES}  # every key, at the engine's own values
    assert planted.recommend("u", 5, overrides=same) == plain
    assert planted.recommend("nobody", 3, overrides=ONLY_TRENDING) == planted.recommend("nobody", 3)


def test_an_overrides_call_leaves_the_engine_as_it_was():
    e = _planted()
    before, snap, keys = pickle.dumps(e), snapshot(e), set(vars(e))
    for ov in (ONLY_TRENDING, {"max_category_share": 0.2}, {"query_len": 3, "sym_weight": 0.0}):
        e.recommend("u", 5, overrides=ov)
        e.recommend("nobody", 5, overrides=ov)
        e.recommend("u", 5, overrides=ov, explain=False, exclude={"a0"})
    assert pickle.dumps(e) == before
    assert snapshot(e) == snap and set(vars(e)) == keys
    # the state round trips as before, and the copy ranks the same with the same overrides
    f = Engine.from_state(pickle.loads(pickle.dumps(e.to_state())))
    assert f.recommend("u", 5, overrides=ONLY_TRENDING) == e.recommend("u", 5, overrides=ONLY_TRENDING)
    assert f.recommend("u", 5) == e.recommend("u", 5)


def test_overrides_on_a_random_stream_never_mutate_and_are_deterministic():
    cfg = EngineConfig(history_len=8, query_len=6, window=4, n_neighbours=6, max_category_share=0.4)
    a, b = Engine(cfg), Engine(cfg)
    evs = random_stream(400, n_users=20, n_items=30, seed=3)
    a.learn_many(evs)
    b.learn_many(evs)
    snap = snapshot(a)
    variants = [{"w_segment": 0.5}, {"query_dir_len": 0, "query_sym_decay": 0.5}, {"momentum": 0.0},
                {"query_gap_tau_s": 1.0, "query_gap_floor": 0.0, "w_content": 1.0, "content_history": 50}]
    plain = [a.recommend(f"u{k}", 5) for k in range(20)]
    for ov in variants:
        got = [a.recommend(f"u{k}", 5, overrides=ov) for k in range(20)]
        assert got != plain
        assert got == [b.recommend(f"u{k}", 5, overrides=dict(reversed(list(ov.items())))) for k in range(20)]
    assert snapshot(a) == snap
    # every request above (variants, trending joined or not, reasons or not) ran one compiled ranker:
    # a second compilation would stall a stream batch for seconds the first time a variant shows up
    assert len(rank_core._core.signatures) == 1


def test_derived_settings_are_cached_outside_the_state(planted):
    s1 = ranker.settings_for(planted, {"w_segment": 0.5, "query_len": 4})
    s2 = ranker.settings_for(planted, {"query_len": 4.0, "w_segment": 0.5})  # same, other order and spelling
    assert s1 is s2 and s1.config.query_len == 4 and s1.config.w_segment == 0.5
    assert planted.config.query_len == 20 and planted.config.w_segment == 0.02
    assert len(s1.qd_tab) == len(s1.qs_tab) == 4
    assert ranker.settings_for(planted, {"sym_weight": 0.0}).qs_tab.tolist() == [0.0] * 20
    plain = ranker.settings_for(planted, None)
    assert plain.config is planted.config and plain.qd_tab is planted.ranker_settings.qd_tab
    # an entry goes with its engine
    e = _planted()
    ranker.settings_for(e, {"w_global": 1.0})
    assert e in ranker._SETTINGS_CACHE
    n = len(ranker._SETTINGS_CACHE)
    del e
    gc.collect()
    assert len(ranker._SETTINGS_CACHE) == n - 1
    # bounded per engine
    for k in range(ranker._SETTINGS_CACHE_MAX + 5):
        ranker.settings_for(planted, {"w_global": float(k)})
    assert len(ranker._SETTINGS_CACHE[planted][1]) <= ranker._SETTINGS_CACHE_MAX
    # a replaced config is not served stale
    f = _planted()
    ranker.settings_for(f, {"w_global": 1.0})
    f.config = dataclasses.replace(f.config, w_segment=0.3)
    assert ranker.settings_for(f, {"w_global": 1.0}).config.w_segment == 0.3


def test_unknown_and_learning_time_keys_are_refused(planted):
    allowed = ", ".join(sorted(RANKER_OVERRIDES))
    for key in ("bogus", "window", "pop_exponent", "half_life_days", "min_support", "top_n"):
        with pytest.raises(ValueError, match=re.escape(f"{key!r} is not a ranker setting")) as err:
            planted.recommend("u", 5, overrides={key: 1.0})
        assert allowed in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'w_segment'"):
        planted.recommend("nobody", 5, overrides={"w_segmnt": 0.5})  # checked for unknown users too
    bad = [({"w_cooc": -1}, "w_cooc=-1 must be >= 0"), ({"max_category_share": 1.5}, r"in \(0, 1\]"),
           ({"query_len": 2.5}, "whole number"), ({"w_global": True}, "finite number"),
           ({"w_global": "1"}, "finite number"), ({"w_global": float("nan")}, "finite number"),
           ({"query_gap_tau_s": 0}, "> 0"), ({"query_len": 0}, ">= 1"),
           ({"query_len": 60}, r"query_len \(60\) must not exceed history_len \(50\)")]
    for ov, msg in bad:
        with pytest.raises(ValueError, match=msg):
            planted.recommend("u", 5, overrides=ov)
    with pytest.raises(ValueError, match="mapping"):
        validate_overrides([("w_cooc", 1.0)])


def test_allowed_keys_are_exactly_the_query_time_fields():
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    cfg = EngineConfig()
    for key, (kind, *_rest) in RANKER_OVERRIDES.items():
        assert key in fields and type(getattr(cfg, key)) is kind, key
    assert validate_overrides({k: getattr(cfg, k) for k in RANKER_OVERRIDES}) == {
        k: getattr(cfg, k) for k in sorted(RANKER_OVERRIDES)}  # every default is in range
    # what the ranker reads from its config: the overridable fields, plus the privacy threshold
    read = {name for module in (ranker, rank_core)
            for name in re.findall(r"\bcfg\.(\w+)", Path(module.__file__).read_text())}
    tables = {"query_dir_len", "query_dir_decay", "query_sym_decay", "sym_weight", "query_len"}
    sources = {s.setting for s in SOURCES}  # (read by name: getattr(cfg, source.setting))
    assert read - {"min_support"} | tables | sources == set(RANKER_OVERRIDES)


def test_settings_parse_the_env_json(monkeypatch):
    monkeypatch.setenv("INFOGAP_EXPERIMENT_OVERRIDES",
                       '{"B": {"w_segment": 0.5, "max_category_share": 0.3, "new_item_slots": 2}}')
    s = Settings()
    assert s.experiment_overrides == {"B": {"max_category_share": 0.3, "new_item_slots": 2, "w_segment": 0.5}}
    assert type(s.experiment_overrides["B"]["new_item_slots"]) is int
    assert Settings(experiment_overrides={}).experiment_overrides == s.experiment_overrides  # env merged
    monkeypatch.delenv("INFOGAP_EXPERIMENT_OVERRIDES")
    assert Settings().experiment_overrides == {}
    e = _planted()
    assert e.recommend("u", 5, overrides=s.experiment_overrides["B"]) != e.recommend("u", 5)


@pytest.mark.parametrize("raw, msg", [
    ('{"B": {"w_segmnt": 0.5}}', "variant 'B': 'w_segmnt' is not a ranker setting"),
    ('{"B": {"window": 3}}', "variant 'B': 'window' is not a ranker setting"),
    ('{"B": {"w_cooc": true}}', "variant 'B': ranker override w_cooc=True must be a finite number"),
    ('{"B": {"max_category_share": 0}}', r"variant 'B': ranker override max_category_share=0 must be in \(0, 1\]"),
    ('{"B": {"query_len": 80}}', r"variant 'B': query_len \(80\) must not exceed history_len"),
])
def test_settings_reject_a_bad_override(monkeypatch, raw, msg):
    monkeypatch.setenv("INFOGAP_EXPERIMENT_OVERRIDES", raw)
    with pytest.raises(ValidationError, match=msg) as err:
        Settings()
    assert "INFOGAP_EXPERIMENT_OVERRIDES" in str(err.value)


def test_settings_overrides_must_name_the_experiment_variants(monkeypatch):
    monkeypatch.setenv("INFOGAP_EXPERIMENT", '{"name": "recs-v2", "variants": {"A": 0.5, "B": 0.5}}')
    monkeypatch.setenv("INFOGAP_EXPERIMENT_OVERRIDES", '{"B": {"w_segment": 0.5}}')
    assert Settings().experiment_overrides == {"B": {"w_segment": 0.5}}
    monkeypatch.setenv("INFOGAP_EXPERIMENT_OVERRIDES", '{"b": {"w_segment": 0.5}}')
    with pytest.raises(ValidationError, match=r"names variants \['b'\] that INFOGAP_EXPERIMENT does not have"):
        Settings()


def test_settings_engine_sets_the_workers_engine_config(monkeypatch):
    monkeypatch.setenv("INFOGAP_ENGINE", '{"door_bits": 22, "n_neighbours": 200}')
    monkeypatch.setenv("INFOGAP_TOP_N", "7")
    cfg = Settings().engine_config()
    assert (cfg.door_bits, cfg.n_neighbours, cfg.top_n) == (22, 200, 7)
    monkeypatch.setenv("INFOGAP_ENGINE", '{"door_bitz": 22}')
    with pytest.raises(ValidationError, match=r"INFOGAP_ENGINE: .*unexpected keyword argument 'door_bitz'"):
        Settings()
    monkeypatch.setenv("INFOGAP_ENGINE", '{"window": 0}')
    with pytest.raises(ValidationError, match=r"INFOGAP_ENGINE: window must be >= 1, got 0"):
        Settings()


# ------------------------------------------------------------------------------ one way: INFOGAP_EXPERIMENT
def test_the_experiment_carries_its_variants_ranker_settings(monkeypatch):
    from infogap.stream.experiments_store import experiment_from_settings

    monkeypatch.setenv("INFOGAP_EXPERIMENT", '{"name": "recs-v2", "variants": {"A": 0.5, "B": 0.5}, '
                                             '"overrides": {"B": {"w_segment": 1, "new_item_slots": 2.0}}}')
    exp = experiment_from_settings(Settings())
    assert exp.overrides == {"B": {"new_item_slots": 2, "w_segment": 1.0}}
    assert type(exp.overrides["B"]["new_item_slots"]) is int
    assert exp.overrides.get("A") is None  # A ranks with the defaults
    e = _planted()
    assert e.recommend("u", 5, overrides=exp.overrides["B"]) != e.recommend("u", 5)


@pytest.mark.parametrize("overrides, msg", [
    ('{"B": {"diversity": 0.3}}', r"INFOGAP_EXPERIMENT: experiment 'x', variant 'B': 'diversity' is not a ranker"),
    ('{"B": {"query_len": 80}}', r"INFOGAP_EXPERIMENT: variant 'B': query_len \(80\) must not exceed history_len"),
    ('{"C": {"w_cooc": 1}}', r"INFOGAP_EXPERIMENT: overrides name variants \['C'\]"),
])
def test_a_bad_experiment_override_stops_the_process_at_start(monkeypatch, overrides, msg):
    monkeypatch.setenv("INFOGAP_EXPERIMENT", '{"name": "x", "variants": {"A": 1, "B": 1}, "overrides": %s}' % overrides)
    with pytest.raises(ValidationError, match=msg):
        Settings()


def test_the_old_overrides_setting_is_a_deprecated_alias(monkeypatch):
    from infogap.stream.experiments_store import experiment_from_settings

    monkeypatch.setenv("INFOGAP_EXPERIMENT", '{"name": "x", "variants": {"A": 1, "B": 1}}')
    monkeypatch.setenv("INFOGAP_EXPERIMENT_OVERRIDES", '{"B": {"w_segment": 0.5}}')
    with pytest.warns(FutureWarning, match="INFOGAP_EXPERIMENT_OVERRIDES is deprecated"):
        s = Settings()
    assert experiment_from_settings(s).overrides == {"B": {"w_segment": 0.5}}
    monkeypatch.setenv("INFOGAP_EXPERIMENT", '{"name": "x", "variants": {"A": 1, "B": 1}, '
                                             '"overrides": {"B": {"w_segment": 0.7}}}')
    with pytest.warns(FutureWarning), pytest.raises(ValidationError, match="both INFOGAP_EXPERIMENT"):
        Settings()
    monkeypatch.delenv("INFOGAP_EXPERIMENT")
    with pytest.warns(FutureWarning, match="without INFOGAP_EXPERIMENT they have no effect"):
        assert experiment_from_settings(Settings()) is None


def test_feedback_campaigns_and_segment_cap_come_from_the_settings(monkeypatch):
    from infogap.stream.experiments_store import metrics_config

    monkeypatch.setenv("INFOGAP_EXPERIMENT", '{"name": "x", "variants": {"A": 1, "B": 1}}')
    monkeypatch.setenv("INFOGAP_EXPERIMENT_CAMPAIGNS", '["winter"]')
    monkeypatch.setenv("INFOGAP_EXPERIMENT_MAX_SEGMENTS", "50")
    cfg = metrics_config(Settings(), shard=1)
    assert (cfg.campaigns, cfg.variants, cfg.max_segments) == ({"recs", "winter"}, {"A", "B", "none"}, 50)
    monkeypatch.setenv("INFOGAP_EXPERIMENT_MAX_SEGMENTS", "0")
    with pytest.raises(ValidationError):
        Settings()
