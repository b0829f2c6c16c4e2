"""The ranker's one compiled call gives exactly what the step-by-step ranker it replaced gave.

The reference below is that ranker, kept verbatim: numpy between one kernel call per step
(``vote``, ``Votes.top``, ``choose``, ``Votes.anchors``, ``why``), with the trending lists joining
when the votes give too few candidates or the category cap had to be relaxed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import infogap.models.rank_core as rank_core
import infogap.models.ranker as ranker
from infogap.models import Engine, EngineConfig
from infogap.models.candidate_sources import SOURCES, active_sources, proposals
from infogap.models.rank_core import ANCHOR_ROW, ANCHOR_TYPE, COUNT, DOMINANT, LIFT, PICK, SCORE
from infogap.models.ranker import PARTS, Recommendation, settings_for
from infogap.models.selection import choose, why
from infogap.models.votes import MOMENTUM_RESOLUTION_S, vote

from .test_models_support import group_stream


#: the parts a score is made of, then the candidate sources (by their settings)
_PART_NAMES = PARTS + tuple(s.setting for s in SOURCES)


def _step_by_step(engine, cfg, qd_tab, qs_tab, u: int, k: int, n: int, cap: int, excl, explain: bool):
    """The ranker as it was before infogap.models.rank_core: numpy between one kernel call per step. Returns
    ``(picked, score_of, dominant, anchors, mix)``."""
    cat = engine.state.catalog
    co = engine.state.cooc
    prof = engine.state.profiles
    tr = engine.state.trending
    kk = min(len(cat), 3 * n + 10)
    idx = items = np.zeros(0, np.int64)
    anchors: dict = {}
    cand = np.zeros(0, np.int64)
    votes = None
    if k and cfg.w_cooc > 0:
        # neighbours of the recent items vote (infogap.models.votes: only voted items are touched)
        idx = prof.ring_order[prof.n_push[u] % prof.history_len, :k]
        items = prof.hist_item[u, idx]
        ts = prof.hist_ts[u, idx]
        g = cfg.query_gap_floor
        ip = co.ipop[items] * (g + (1.0 - g) / (1.0 + np.maximum(ts[0] - ts, 0.0) * (1.0 / cfg.query_gap_tau_s)))
        kd = min(k, cfg.query_dir_len)
        votes = vote(co.nb, co.sq[0], co.sq[1], co.block[items], qs_tab[:k] * ip, qd_tab[:kd] * ip[:kd],
                     ipop=co.ipop, available=cat.available, consumed=prof.consumed(u),
                     mom_count=tr.momentum_, mom_decay=engine.state.decay(tr.lam_m, MOMENTUM_RESOLUTION_S),
                     pop=co.pop, pop_decay=engine.state.decay(co.lam, MOMENTUM_RESOLUTION_S), momentum=cfg.momentum)
        top = votes.top(kk)
        cand = voted = votes.rows[top]
    mix = None
    picked: list[int] = []
    dominant: dict[int, str] = {}
    score_of: dict[int, float] = {}
    widened = False
    src_rows, src_score, src_part = proposals(engine.state, active_sources(cfg), u, kk)  # (the candidate sources)
    while True:
        if cand.size < n or widened:
            # few co-occurrence candidates (or too few categories): add what is trending
            seg = prof.segment[u]
            extra = [cand, tr.top(kk, seg if seg >= 0 else None)]
            if seg >= 0:
                extra.append(tr.top(kk))
            cand = np.unique(np.concatenate(extra))
        if src_rows.size:
            cand = np.unique(np.concatenate([cand, src_rows]))
        if not cand.size:
            break
        # the blend's components, each already scaled as the score adds them (for the reasons, too)
        v = np.zeros(0)
        w_c = w_s = w_g = 0.0
        seg_row = glob = content = np.zeros(0)
        if votes is not None:
            v = votes.votes[top] if cand is voted else votes.of(cand)  # trending may have added items
            w_c = cfg.w_cooc
        seg = prof.segment[u]
        if cfg.w_segment > 0 and seg >= 0 and tr.segment_max[seg] > 0:
            seg_row, w_s = tr.segment_[seg], cfg.w_segment / tr.segment_max[seg]
        if cfg.w_global > 0 and tr.global_max > 0:
            glob, w_g = tr.global_, cfg.w_global / tr.global_max
        if cfg.w_content > 0 and k < cfg.content_history:
            mix = prof.mix(u)
            if mix:
                share = np.zeros(cat.n_features + 1)
                share[list(mix)] = list(mix.values())
                content = share[cat.category[cand]] * cfg.w_content  # category -1 reads the trailing 0
        part = None
        if src_rows.size:  # the sources' scores join the category share; the larger names the part
            content = content if content.size else np.zeros(cand.size)
            added = np.zeros((len(SOURCES), cand.size))
            np.add.at(added, (src_part - len(PARTS), np.searchsorted(cand, src_rows)), src_score)
            part = np.where(added.max(axis=0) > content, len(PARTS) + added.argmax(axis=0), PARTS.index("content"))
            content = content + added.sum(axis=0)
        order, score, keep, relaxed = choose(cand, v, w_c, seg_row, w_s, glob, w_g, content, category=cat.category,
                                             available=cat.available, consumed=prof.consumed(u), n=n, cap=cap,
                                             exclude=excl, item_ids=cat._ids)
        if relaxed and not widened:
            widened = True
            continue
        sel = order[keep]
        picked = cand[sel].tolist()
        score_of = dict(zip(picked, score[sel].tolist()))
        if explain and picked:  # which component made each pick, and the history item behind its votes
            anchor = (np.full(sel.size, -1, np.int64) if votes is None
                      else votes.anchors(cand[sel], rank_core._ANCHOR_ROWS, co.users, co.min_users))
            dom, anchors = why(sel, cand, v, w_c, seg_row, w_s, glob, w_g, content, anchor=anchor,
                               items=items, types=prof.hist_type[u, idx], cooc=co, extra_part=part)
            dominant = {r: _PART_NAMES[d] for r, d in zip(picked, dom) if d >= 0}
        break
    return picked, score_of, dominant, anchors, mix


def _reference(engine: Engine, user: str, n: int = 10, exclude=None, explain: bool = True, overrides=None):
    """``Engine.recommend`` with the step-by-step ranker in place of the compiled one."""
    u = engine.state.profiles.find(user)
    cat = engine.state.catalog
    excl = ranker._as_container(exclude)
    cfg, qd_tab, qs_tab, _ = settings_for(engine, overrides)
    prof = engine.state.profiles
    k = min(cfg.query_len, prof.n_push[u], prof.history_len)
    cap = n if cfg.max_category_share >= 1.0 else max(1, math.ceil(cfg.max_category_share * n))
    picked, score_of, dominant, anchors, mix = _step_by_step(engine, cfg, qd_tab, qs_tab, u, k, n, cap, excl, explain)
    if cfg.new_item_slots > 0 and cat._recent:
        picked = ranker._new_item_slots(engine.state, cfg, u, mix, picked, excl, n)
    if len(picked) < n:
        picked = ranker._fill_popular(engine.state, picked, excl, n, u)
    if not explain:
        return [Recommendation(cat._ids[r], score_of.get(r, 0.0), "") for r in picked]
    rows = list(dominant)  # the reasons' data of the picks, packed as rank_core packs it
    packed = np.zeros((7, len(rows)))
    for i, r in enumerate(rows):
        packed[PICK, i], packed[SCORE, i], packed[DOMINANT, i] = r, score_of[r], _PART_NAMES.index(dominant[r])
        packed[ANCHOR_ROW, i] = -1
        if r in anchors:
            a, cnt, lf, t = anchors[r]
            packed[ANCHOR_ROW, i], packed[COUNT, i], packed[LIFT, i], packed[ANCHOR_TYPE, i] = a, cnt, lf, t
    return ranker._explain(engine.state, cfg, u, picked, rows, packed)


@pytest.fixture(scope="module")
def learned():
    evs, items, _ = group_stream(n_groups=4, users_per_group=12, items_per_group=20, events_per_user=30, seed=11)
    out = {}
    for name, cfg in {"default": EngineConfig(door_bits=0),
                      "tight cap": EngineConfig(door_bits=0, max_category_share=0.2, n_neighbours=8),
                      "small": EngineConfig(door_bits=0, n_neighbours=4, query_len=3, momentum=0.0),
                      "no votes": EngineConfig(door_bits=0, w_cooc=0.0),
                      "cart": EngineConfig(door_bits=0, w_cart=0.5),
                      "cart, no votes": EngineConfig(door_bits=0, w_cart=0.5, w_cooc=0.0)}.items():
        eng = Engine(cfg)
        for it in items:
            eng.upsert_item(it)
        eng.learn_many(evs)
        out[name] = eng
    users = sorted({e["user_id"] for e in evs})
    young = Engine(EngineConfig(door_bits=0))  # users with one to four items: the content component
    for it in items:
        young.upsert_item(it)
    young.learn_many([e for e in evs if int(e["event_id"][1:]) % 9 == 0])
    out["young"] = young
    return out, users, [it["item_id"] for it in items]


@pytest.fixture(params=["asked for", "up front"])
def trending(request, monkeypatch):
    """Whether the compiled ranker is given the trending lists when it asks for them (a second call),
    or with the first call (as it is while most requests need them)."""
    monkeypatch.setattr(rank_core, "_UPFRONT_RATE", 2.0 if request.param == "asked for" else -1.0)
    return request.param


@pytest.mark.parametrize("name", ["default", "tight cap", "small", "no votes", "young", "cart", "cart, no votes"])
@pytest.mark.parametrize("explain", [False, True])
def test_the_compiled_ranker_gives_the_step_by_step_rankers_items_scores_and_reasons(learned, name, explain,
                                                                                   trending):
    engines, users, _ = learned
    eng = engines[name]
    for u in users:
        if not eng.known_user(u):
            continue
        for n in (1, 5, 10):
            assert eng.recommend(u, n=n, explain=explain) == _reference(eng, u, n=n, explain=explain), (name, u, n)


def test_excluded_ids_are_blocked_and_the_rest_picked_as_the_step_by_step_ranker_did(learned, trending):
    engines, users, items = learned
    for name in ("default", "tight cap", "young"):
        eng = engines[name]
        for u in users[:12]:
            if not eng.known_user(u):
                continue
            first = [r.item_id for r in eng.recommend(u, n=5)]
            for excl in (set(first[:2]), set(first) | set(items[::3]), {first[0]: 1}):
                got = eng.recommend(u, n=5, exclude=excl)
                assert got == _reference(eng, u, n=5, exclude=excl)
                assert not {r.item_id for r in got} & set(excl)


def test_variant_overrides_rank_with_their_own_settings(learned):
    engines, users, _ = learned
    ov = {"w_segment": 0.5, "query_len": 5, "max_category_share": 0.5, "w_content": 0.3, "w_cart": 0.4}
    for u in users[:10]:
        assert engines["default"].recommend(u, n=8, overrides=ov) == _reference(engines["default"], u, n=8,
                                                                                overrides=ov)


@pytest.mark.parametrize("late_by", [60.0, 61.0, 3600.0])
def test_an_older_event_that_arrives_last_does_not_break_ranking(late_by):
    """A user's latest-arriving event older than an earlier one by the gap time constant (60 s) divided by
    zero in the compiled ranker (ZeroDivisionError, on every restart); a larger gap made the weight negative."""
    from infogap.models import Engine

    e = Engine()
    t = 1_700_000_000.0
    for k in range(5):
        e.learn_one({"event_id": f"o{k}", "user_id": f"o{k}", "type": "view", "ts": t + k, "item_id": "i0"})
        e.learn_one({"event_id": f"p{k}", "user_id": f"o{k}", "type": "view", "ts": t + k + 1, "item_id": "i2"})
    e.learn_one({"event_id": "u1", "user_id": "u", "type": "view", "ts": t + 100, "item_id": "i0"})
    e.learn_one({"event_id": "u2", "user_id": "u", "type": "view", "ts": t + 100 - late_by, "item_id": "i1"})
    recs = e.recommend("u", n=3)
    assert recs and recs[0][0] == "i2" and all(score >= 0 for _, score, _ in recs)
