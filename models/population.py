"""What many users feed and no user owns: segment centers, trending and item event counts.

:mod:`models.user_state` moves users between engines and leaves these out. A restarted worker that
rebuilt them from scratch would renumber every segment (its KMeans seeds its centers from whatever
users come first) and start with no trending at all. So the stream stores this record with its
snapshots, and an engine that has learned nothing yet adopts it.

Item rows and feature ids are engine-local, so the record holds item ids and category/tag names.
Trending scores are stored relative to the exporter's ``t0`` and converted to the importer's.

Users that arrive in an engine with centers of its own (a partition moved to a running worker)
carry segment ids that name the exporter's centers: :func:`reassign_segments` maps them to this
engine's nearest center, keeping the carried id when its center here is about as near (the usual
hysteresis), without moving any center.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

POPULATION_VERSION = 1


def export_population(engine) -> dict:
    """A picklable record of the engine's segment centers, trending and item event counts.

    >>> from models import Engine
    >>> a = Engine()
    >>> a.upsert_item({"item_id": "tea", "category": "Drinks"})
    >>> a.learn_one({"event_id": "e1", "user_id": "ann", "type": "purchase", "ts": 1000.0, "item_id": "tea"})
    >>> b = Engine()
    >>> import_population(b, export_population(a))
    True
    >>> b.trending(1) == a.trending(1), b._segmenter.centers() == a._segmenter.centers()
    (True, True)
    """
    seg, tr, cat = engine._segmenter, engine._trending, engine._catalog
    n = len(cat)
    live = np.flatnonzero((tr.global_[:n] != 0) | (tr.momentum_[:n] != 0) | (engine._item_events[:n] != 0)
                          | (tr.segment_[:, :n] != 0).any(axis=0))
    return {"version": POPULATION_VERSION, "t0": engine._t0, "now": engine._now,
            "lam": tr.lam, "lam_m": tr.lam_m,
            "segments": {"n_seeded": seg._n_seeded, "centers": seg.centers(),
                         "slots": {cat.feature_name(f): k for f, k in seg._slot_of.items()}},
            "items": [cat.item_id(r) for r in live.tolist()],
            "global": tr.global_[live].copy(), "segment": tr.segment_[:, live].copy(),
            "momentum": tr.momentum_[live].copy(), "events": engine._item_events[live].copy()}


def import_population(engine, state: Mapping) -> bool:
    """Adopt ``state`` if ``engine`` has learned nothing and has no segment centers; returns whether
    it did. A record from an engine with another segment count is refused (``ValueError``)."""
    if state.get("version") != POPULATION_VERSION:
        raise ValueError(f"unsupported population version {state.get('version')!r}; expected {POPULATION_VERSION}")
    seg = engine._segmenter
    segs = state["segments"]
    if len(segs["centers"]) > seg.n_segments:
        raise ValueError(f"the record has {len(segs['centers'])} segment centers; this engine has {seg.n_segments}")
    if engine.n_learned or seg._n_seeded or engine._t0 is not None:
        return False
    cat, tr = engine._catalog, engine._trending
    engine._t0 = state["t0"]
    if state["now"] > engine._now:
        engine._now = state["now"]
    seg._slot_of = {cat.feature(name): k for name, k in segs["slots"].items()}
    for c, center in enumerate(segs["centers"]):
        seg._km.centers[c].update(center)
    seg._n_seeded = segs["n_seeded"]
    rows = np.fromiter((cat.row(i) for i in state["items"]), np.int64, len(state["items"]))
    engine._ensure_items(len(cat))
    tr.global_[rows] = state["global"]
    tr.segment_[:, rows] = state["segment"]
    tr.momentum_[rows] = state["momentum"]
    engine._item_events[rows] = state["events"]
    n = len(cat)
    tr.global_max = float(tr.global_[:n].max(initial=0.0))
    tr.segment_max[:] = tr.segment_[:, :n].max(axis=1, initial=0.0)
    tr.ensure(n)  # forgets any remembered top lists
    return True


def reassign_segments(engine, user_ids: Iterable[str]) -> None:
    """Put the users into this engine's nearest segment (keeping their segment when its center here
    is within the hysteresis margin), without moving any center; a no-op before centers exist."""
    seg, prof = engine._segmenter, engine._profiles
    if not seg._n_seeded:
        return
    decay = math.exp(-prof.lam * (engine._now - engine._t0))
    for uid in user_ids:
        u = prof.find(uid)
        if u is None:
            continue
        last = prof.last_ts[u]
        gap_days = (engine._now - last) / 86400.0 if math.isfinite(last) else math.inf
        x = seg.features(prof.mix(u), prof.freq[u] * decay, prof.money[u] * decay, gap_days)
        old = int(prof.segment[u])
        new = seg.nearest(x, old)
        if new != old:
            seg.set_member(u, old, new)
            prof.segment[u] = new
