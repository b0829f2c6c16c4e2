"""The hybrid ranker: candidates, a scored blend, filters, diversity and a reason per item.

**Candidates.** The user's last ``query_len`` items vote for their stored neighbours into one dense
float array over the catalog (one float per item, cheap for catalogs up to a few hundred thousand
items). The k-th most recent item h (k = 0 newest) votes for neighbour j with::

    q_dir(k) * sqrt(w_dir[h, j]) + sym_weight * q_sym(k) * sqrt(w_sym[h, j])

scaled by ``pop(h) ** -e * pop(j) ** -e`` and by how close in time h is to the user's newest item.
``q_dir`` decays fast and covers only the last ``query_dir_len`` items (the sequential "A then B"
signal), ``q_sym`` decays slowly (the current taste); the square root damps very frequent pairs;
``e`` (``pop_exponent``) trades popularity for novelty; a ``momentum`` factor favours items whose
recent popularity exceeds their long-run one (read at the hour: :data:`infogap.models.votes.MOMENTUM_RESOLUTION_S`).
The best ``3n + 10`` voted items are the candidates; when there are too few (new users, or too few
categories for the diversity rule), the user's segment trending and the global trending add theirs.

**Blend.** ``w_cooc * votes / max(votes) + w_segment * seg / max(seg) + w_global * glob / max(glob)
+ w_content * share(user, category)`` (content only for users with few items).

**Filters and diversity.** Items the user has (purchased/rated/dismissed), items in ``exclude`` and
unavailable items never appear; at most ``ceil(max_category_share * n)`` items per category (relaxed
only when nothing else is left); up to ``new_item_slots`` positions go to items recently added to the
catalog with few interactions, for users whose category mix covers them (cold items).

**Reasons.** Every item names the component that contributed most: the recent item that voted most
for it with the pair's support and lift ("bought together with X 42 times (lift 3.1)", or "you liked X
(review): chosen together with it 42 times ..." when X's event was a liked review), "trending in your segment", "trending now", "new in Comedy, which you like", "popular in Comedy, which you like".
"42 times" is the pair's observations (a person who comes back to the pair counts again), not a number of
people: the privacy floor (``min_users`` distinct people, :mod:`infogap.models.privacy`) is what a cited pair
always has. A pair is cited only when its lift shows above 1 (:data:`REASON_MIN_LIFT`), it was observed at
least ``reason_min_support`` times and it is at the floor; otherwise the reason is the next true one: a liked
category of the item, then its segment or global trend. Reads never change the engine.

**Where it runs.** All of the above up to the picks and their reasons' data is one compiled call
(:mod:`infogap.models.rank_core`); this module turns its picks into :class:`Recommendation` objects, adds the
new-item slots and, when the picks run short, popular items, and writes the reasons.

**Per-request settings.** :func:`settings_for` gives the query-time settings with an experiment
variant's overrides applied (:data:`infogap.models.experiments.RANKER_OVERRIDES`), cached per engine and
overrides outside the engine's state, so ``rank(..., settings=...)`` costs the same as the default.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import replace
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from infogap.models.candidate_sources import FIRST_SOURCE, SOURCES, active_sources
from infogap.models.events import EVENT_TYPES
from infogap.models.experiments import validate_overrides
from infogap.models.rank_core import ANCHOR_TYPE, DOMINANT, LIFT, SCORE, rank_core
from infogap.models.selection import PARTS


class Recommendation(NamedTuple):
    """One recommended item: id, blended score, and a reason a person can read.

    Examples
    --------
    >>> Recommendation("sku-7", 0.9, "trending now").item_id
    'sku-7'
    """

    item_id: str
    score: float
    reason: str


class Neighbour(NamedTuple):
    """An item similar to another, with association-rule figures.

    ``score`` is the cosine of the decayed co-occurrence counts (0..1), ``support`` the decayed
    number of co-occurrences, ``confidence`` P(neighbour | item) and ``lift`` confidence over the
    neighbour's base rate (> 1: more often together than by chance).

    Examples
    --------
    >>> Neighbour("b", 0.5, 12.0, 0.4, 3.1).lift
    3.1
    """

    item_id: str
    score: float
    support: float
    confidence: float
    lift: float


#: Builds a Recommendation without its Python-level __new__ (half the cost; ten per request).
_new = tuple.__new__
_VERBS = {"purchase": ("bought", "bought"), "add_to_cart": ("bought", "put in your cart"),
          "rate": ("rated", "rated"), "view": ("viewed", "viewed"), "click": ("viewed", "clicked"),
          "push_click": ("viewed", "opened"), "push_open": ("viewed", "opened")}


#: By event type code: the verb of "<verb> together with X".
_TOGETHER = tuple(_VERBS.get(t, ("chosen", "chose"))[0] for t in EVENT_TYPES)
#: The type code of a review: a liked item's reason says so.
_REVIEW = EVENT_TYPES.index("review")
#: The dominant part's codes (:data:`infogap.models.selection.PARTS`).
_COOC, _SEGMENT, _GLOBAL = (PARTS.index(p) for p in ("cooc", "segment", "global"))


class RankerSettings(NamedTuple):
    """What the ranker reads besides the learned state: a config, its query weight tables and its
    candidate sources.

    ``qd_tab[k]`` / ``qs_tab[k]``: weight of the k-th most recent item's directional / symmetric votes;
    ``sources``: :func:`infogap.models.candidate_sources.active_sources` of the config.
    """

    config: Any
    qd_tab: np.ndarray
    qs_tab: np.ndarray
    sources: tuple


def query_tables(cfg) -> tuple[np.ndarray, np.ndarray]:
    """``(qd_tab, qs_tab)`` of a config (those of :attr:`infogap.models.engine.Engine.ranker_settings`).

    >>> from types import SimpleNamespace
    >>> qd, qs = query_tables(SimpleNamespace(query_len=3, query_dir_len=2, query_dir_decay=0.5,
    ...                                       query_sym_decay=0.9, sym_weight=0.5))
    >>> qd.tolist(), [round(x, 3) for x in qs.tolist()]
    ([1.0, 0.5, 0.0], [0.5, 0.45, 0.405])
    """
    kq = np.arange(cfg.query_len)
    return np.where(kq < cfg.query_dir_len, cfg.query_dir_decay ** kq, 0.0), cfg.sym_weight * cfg.query_sym_decay ** kq


#: engine -> (the config the entries derive from, {overrides items: RankerSettings}). Weak keys: an
#: entry goes with its engine; it is not in the engine's ``__dict__``, so it is neither pickled nor
#: snapshotted, and a read leaves the engine's state as it was.
_SETTINGS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Distinct overrides remembered per engine (a few variants in practice; cleared when exceeded).
_SETTINGS_CACHE_MAX = 64


def settings_for(engine, overrides: Mapping[str, float] | None) -> RankerSettings:
    """The engine's ranker settings with ``overrides`` applied (validated; ``ValueError`` when not allowed).

    Derived once per engine, config and distinct overrides, then served from a cache; the engine is
    never modified. The new config is built with :func:`dataclasses.replace`, so the config's own
    checks run too (e.g. ``query_len`` must not exceed ``history_len``).
    """
    base = engine.config
    ov = validate_overrides(overrides)
    if not ov:
        return engine.ranker_settings
    key = tuple(ov.items())
    entry = _SETTINGS_CACHE.get(engine)
    if entry is None or entry[0] is not base:  # first use, or engine.config was replaced
        entry = (base, {})
        _SETTINGS_CACHE[engine] = entry
    cached = entry[1].get(key)
    if cached is None:
        cfg = replace(base, **ov)
        # shared between calls, yet writeable: a read-only array is another numba type, for which the
        # compiled ranker would be compiled again (seconds, in the middle of a stream batch)
        qd, qs = query_tables(cfg)
        cached = RankerSettings(cfg, qd, qs, active_sources(cfg))
        if len(entry[1]) >= _SETTINGS_CACHE_MAX:
            entry[1].clear()
        entry[1][key] = cached
    return cached


def _as_container(exclude):
    if not exclude:
        return None
    if isinstance(exclude, (set, frozenset)):
        return exclude
    if isinstance(exclude, dict):
        return exclude.keys()
    if isinstance(exclude, str):
        return {exclude}
    return set(exclude)


def rank(state, settings: RankerSettings, u: int | None, n: int, exclude, explain: bool = True,
         ids: bool = False) -> list[Recommendation] | list[str]:
    """Top-``n`` recommendations for user row ``u`` (None: unknown user) of a
    :class:`~infogap.models.model_state.ModelState`, ranked with ``settings`` (an engine's
    :attr:`~infogap.models.engine.Engine.ranker_settings`, or :func:`settings_for`); never mutates ``state``.
    With ``ids``, only the item ids (those ``explain=False`` would return): a list of ten
    Recommendations cost ~2 us, a tenth of a ranking.
    """
    cat = state.catalog
    if n <= 0 or not len(cat):
        return []
    excl = exclude if exclude.__class__ is set else _as_container(exclude)
    if u is None:
        cold = _cold(state, n, excl)
        return [r.item_id for r in cold] if ids else cold
    cfg, qd_tab, qs_tab, sources = settings
    share = cfg.max_category_share
    cap = n if share >= 1.0 else max(1, math.ceil(share * n))
    packed, picks, mix = rank_core(state, u, cfg, qd_tab, qs_tab, sources, n, cap, excl, explain)
    picked = picks
    if cfg.new_item_slots > 0 and cat.recent:
        picked = _new_item_slots(state, cfg, u, mix, picked, excl, n)
    if len(picked) < n:
        picked = _fill_popular(state, list(picked), excl, n, u)  # (it appends: ``picks`` stays the core's)
    if ids:
        return list(map(cat.ids.__getitem__, picked))
    if explain:
        return _explain(state, cfg, u, picked, picks, packed)
    scores = packed[SCORE].tolist()
    if picked is picks:  # the core's picks as they are
        return list(map(_new, repeat(Recommendation), zip(map(cat.ids.__getitem__, picks), scores, repeat(""))))
    ids, get = cat.ids, dict(zip(picks, scores)).get
    return [_new(Recommendation, (ids[r], get(r, 0.0), "")) for r in picked]


def _blocked(state, u: int | None, r: int, excl) -> bool:
    cat = state.catalog
    if not cat.available[r]:
        return True
    if excl and cat.ids[r] in excl:
        return True
    return u is not None and state.profiles.has(u, r)


def _new_item_slots(state, cfg, u: int, mix: dict[int, float] | None, picked: list[int], excl,
                    n: int) -> list[int]:
    """``picked`` with its last places given to new items in the user's categories (``mix``: the user's
    category mix, computed here when None and needed)."""
    cat = state.catalog
    recent = cat.recent_dated()
    if not recent.size:
        return picked
    now = state.now
    horizon = cfg.new_item_days * 86400.0
    best: list[tuple[float, int]] = []
    fresh = recent[(state.item_events[recent] < cfg.new_item_max_events) & (now - cat.added_ts[recent] <= horizon)]
    if not fresh.size:
        return picked
    if mix is None:
        mix = state.profiles.mix(u)
    if not mix:
        return picked
    for r in fresh.tolist():
        if r in picked:
            continue
        s = max((mix.get(f, 0.0) for f in cat.features(r)), default=0.0)
        if s >= cfg.new_item_min_share and not _blocked(state, u, r, excl):
            best.append((-s, r))
    if not best:
        return picked
    best.sort()
    new = [r for _, r in best[: cfg.new_item_slots]]
    return picked[: max(n - len(new), 0)] + new


def _fill_popular(state, picked: list[int], excl, n: int, u: int | None) -> list[int]:
    taken = set(picked)
    want = n + len(taken) + 16
    tr = state.trending
    while True:
        top = tr.top(want)
        for r in top.tolist():
            if len(picked) >= n:
                return picked
            if r not in taken and not _blocked(state, u, r, excl):
                picked.append(r)
                taken.add(r)
        if top.size < want:
            return picked
        want *= 4


def _cold(state, n: int, excl) -> list[Recommendation]:
    """Unknown user: what is trending, then the newest catalog items."""
    tr = state.trending
    mx = tr.global_max
    cat = state.catalog
    out = [Recommendation(cat.item_id(r), float(tr.global_[r] / mx) if mx > 0 else 0.0, "trending now")
           for r in _fill_popular(state, [], excl, n, None) if tr.global_[r] > 0]
    if len(out) < n:
        taken = {x.item_id for x in out}
        for r in reversed(cat.recent):
            if len(out) >= n:
                break
            iid = cat.item_id(r)
            if iid in taken or _blocked(state, None, r, excl):
                continue
            c = cat.category_name(r)
            out.append(Recommendation(iid, 0.0, f"new in {c}" if c else "new arrival"))
    return out


def _explain(state, cfg, u: int, picked: list[int], picks: list[int], packed: np.ndarray) -> list[Recommendation]:
    """The recommendations ``picked``, with their reasons: from the reasons' data that
    :func:`infogap.models.rank_core.rank_core` packed for its ``picks`` (the component that contributed most,
    the history item behind the votes), or for items added after it (new items, popular fill, score
    0) from their catalog data."""
    cat = state.catalog
    if not picked:
        return []
    scores = packed[SCORE].tolist()
    dom, anchor, count, atype = packed[DOMINANT:ANCHOR_TYPE + 1].astype(np.int64).tolist()
    lifts = packed[LIFT].tolist()
    if picked is picks:  # (read by position: a dict of the picks' data cost as much as the reasons)
        at = range(len(picks))
    else:
        where = dict(zip(picks, range(len(picks))))
        at = [where.get(r, -1) for r in picked]
    weights = None  # the user's category weights, read once a request needs them
    liked: dict = {}  # feature ids of an item -> the liked category's name (or None), once per request
    out = []
    ids, titles = cat.ids, cat.titles
    min_support = max(cfg.min_support, cfg.reason_min_support)
    for i, r in zip(at, picked):
        d = dom[i] if i >= 0 else -1
        if d == _COOC:
            a = anchor[i]
            if a >= 0 and count[i] >= min_support and lifts[i] >= REASON_MIN_LIFT:
                if atype[i] == _REVIEW:
                    reason = (f"you liked {titles[a] or ids[a]} (review): chosen together with it "
                              f"{_times(count[i])} (lift {lifts[i]:.1f})")
                else:
                    reason = (f"{_TOGETHER[atype[i]]} together with {titles[a] or ids[a]} {_times(count[i])} "
                              f"(lift {lifts[i]:.1f})")
            else:  # the pair would argue against the item (lift <= 1) or rest on a few users: the next true reason
                feats = cat.features(r)
                if feats and weights is None:
                    weights = state.profiles.feats[u]
                reason = (feats and _liked(state, cfg, r, feats, weights, liked)) or _trend_reason(state, u, r) \
                    or "picked for you"
        elif d in (_SEGMENT, _GLOBAL) and (trend := _trend_reason(state, u, r, d == _SEGMENT)):
            reason = trend
        elif d >= FIRST_SOURCE:
            reason = SOURCES[d - FIRST_SOURCE].reason(state, u, r)
        else:
            if weights is None:
                weights = state.profiles.feats[u]
            reason = _liked(state, cfg, r, cat.features(r), weights, liked) or "popular right now"
        out.append(_new(Recommendation, (ids[r], scores[i] if i >= 0 else 0.0, reason)))
    return out


#: A reason cites a pair's lift only when it shows above 1 with one decimal: a lift <= 1 means the two
#: items go together no more often than by chance, an argument against the item.
REASON_MIN_LIFT = 1.05


def _times(n: int) -> str:
    """How often a pair was observed, as a reason says it.

    >>> _times(1), _times(2), _times(1204)
    ('once', 'twice', '1,204 times')
    """
    return "once" if n == 1 else "twice" if n == 2 else f"{n:,} times"


def _liked(state, cfg, r: int, feats, weights: dict[int, float], memo: dict) -> str | None:
    """"new/popular in <category>, which you like" when one of item ``r``'s categories ``feats`` has a
    positive weight in the user's decayed vector ``weights`` (the heaviest of them); ``memo`` keeps the
    answer per ``feats`` for the rest of the request (a top-N shares a few categories)."""
    fav = memo.get(feats, 0)
    if fav == 0:
        best = max(feats, key=lambda x: weights.get(x, 0.0)) if feats else None
        fav = memo[feats] = (state.catalog.feature_name(best) or None
                             if best is not None and weights.get(best, 0.0) > 0 else None)
    if fav is None:
        return None
    return f"new in {fav}, which you like" if state.item_events[r] < cfg.new_item_max_events else \
        f"popular in {fav}, which you like"


def _trend_reason(state, u: int, r: int, segment: bool = True) -> str | None:
    """"trending in your segment" (unless not ``segment``) / "trending now" when item ``r`` has a trending score
    there that ``min_users`` users stand behind (the privacy floor, :meth:`infogap.models.trending.Trending.shows`)."""
    tr = state.trending
    seg = int(state.profiles.segment[u])
    if segment and 0 <= seg < tr.n_segments and tr.segment_.item(seg, r) > 0 and tr.shows(r, seg):
        return "trending in your segment"
    return "trending now" if tr.global_.item(r) > 0 and tr.shows(r) else None
