"""Per-user state that moves between engines: when a partition of users moves to another worker
(a Kafka rebalance), the old worker exports them and the new one imports them.

Engines number items, features and users differently, so the record holds ids and names only: item
ids, category/tag names, event type names. Decayed figures (frequency, monetary, the category/tag
vector) are stored by an engine relative to its reference time ``t0``; the record carries the
exporter's ``t0`` and decay rate and the importer converts them to its own ``t0``.

Kept out on purpose: what many users feed (item co-occurrence, popularity/trending, segment centers).
In the stream those are learned once for every partition (the item stage's shards and
:mod:`models.population`), and a user's share of them holds no user id (see :mod:`models.engine`,
"What forget_user keeps"). The segment id moves as it is: with one population learner it names the
same center in the exporter and the importer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from models.events import EVENT_TYPES

STATE_VERSION = 1


def export_users(engine, user_ids: Iterable[str]) -> dict:
    """A picklable, self-contained record of everything ``engine`` keeps for ``user_ids`` (unknown ids
    are skipped): ``{"version", "t0", "lam", "users": {user_id: {...}}}``. Each user's entry is
    :meth:`models.profile.Profiles.get_row` with item rows replaced by item ids (None for none),
    feature ids by category/tag names and type codes by event type names.

    >>> from models import Engine
    >>> a, b = Engine(), Engine()
    >>> a.upsert_item({"item_id": "tea", "category": "Drinks"})
    >>> a.learn_one({"event_id": "e1", "user_id": "ann", "type": "purchase", "ts": 1000.0, "item_id": "tea"})
    >>> state = export_users(a, ["ann", "nobody"])
    >>> list(state["users"]), state["users"]["ann"]["consumed"], state["users"]["ann"]["feats"]
    (['ann'], ['tea'], {'Drinks': 8.0})
    >>> import_users(b, state); b.profile("ann") == a.profile("ann")
    True
    """
    prof, cat = engine._profiles, engine._catalog

    def item(i: int) -> str | None:
        return cat.item_id(i) if i >= 0 else None

    users = {}
    for uid in user_ids:
        r = prof.find(uid)
        if r is None or uid in users:
            continue
        rec = prof.get_row(r)
        rec["last_item"] = item(rec["last_item"])
        rec["hist_item"] = [item(i) for i in rec["hist_item"]]
        rec["hist_type"] = [EVENT_TYPES[t] for t in rec["hist_type"]]
        rec["consumed"] = [cat.item_id(i) for i in rec["consumed"]]
        rec["feats"] = {cat.feature_name(f): w for f, w in rec["feats"].items()}
        users[uid] = rec
    return {"version": STATE_VERSION, "t0": engine._t0, "lam": prof.lam, "users": users}


def import_users(engine, state: Mapping) -> None:
    """Insert the users of an :func:`export_users` record into ``engine``, replacing any state it has
    for the same ids. Unknown items get catalog rows as learning gives them; an engine that has
    learned nothing yet adopts the record's ``t0``; the engine's clock moves to the users' newest
    event if that is later."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported user state version {state.get('version')!r}; expected {STATE_VERSION}")
    users = state["users"]
    seg = engine._segmenter
    bad = sorted(u for u, rec in users.items() if rec["segment"] >= seg.n_segments)
    if bad:
        raise ValueError(f"users {bad[:5]} are in segments beyond this engine's {seg.n_segments}")
    prof, cat = engine._profiles, engine._catalog
    if engine._t0 is None:
        engine._t0 = state["t0"]
    t0 = state["t0"]
    if t0 is not None and t0 > engine._t0:
        engine._renormalise(t0)  # values newer than this engine's reference time: move it, no overflow
    scale = 1.0 if t0 is None or engine._t0 is None else math.exp(state["lam"] * (t0 - engine._t0))

    def row(i: str | None) -> int:
        return cat.row(i) if i is not None else -1

    for uid, rec in users.items():
        engine.forget_user(uid)
        r = prof.row(uid)
        prof.set_row(r, {**rec, "freq": rec["freq"] * scale, "money": rec["money"] * scale,
                         "feats": {cat.feature(f): w * scale for f, w in rec["feats"].items()},
                         "last_item": row(rec["last_item"]), "hist_item": [row(i) for i in rec["hist_item"]],
                         "hist_type": [EVENT_TYPES.index(t) for t in rec["hist_type"]],
                         "consumed": [cat.row(i) for i in rec["consumed"]]})
        seg.set_member(r, -1, rec["segment"])
        if rec["last_ts"] > engine._now:
            engine._now = rec["last_ts"]
    engine._ensure_items(len(cat))


class ExportCache:
    """:func:`export_users` for a set of users that changes little between calls (the stream's
    checkpoints): only users marked with :meth:`touch` since the last call, or new to the set, are
    exported again; users no longer in the set are dropped. Everything is exported again when the
    engine's reference time has moved (its records are relative to it).

    >>> from models import Engine
    >>> e, cache = Engine(), ExportCache()
    >>> e.learn_one({"event_id": "e1", "user_id": "ann", "type": "view", "ts": 10.0, "item_id": "tea"})
    >>> e.learn_one({"event_id": "e2", "user_id": "bob", "type": "view", "ts": 11.0, "item_id": "tea"})
    >>> first = cache.export(e, {"ann", "bob"})
    >>> e.learn_one({"event_id": "e3", "user_id": "bob", "type": "view", "ts": 12.0, "item_id": "cup"})
    >>> cache.touch("bob")
    >>> cache.export(e, {"ann", "bob"}) == export_users(e, ["ann", "bob"]), cache.exported
    (True, 1)
    >>> sorted(cache.export(e, {"bob"})["users"])  # ann left the set (erased, or moved away)
    ['bob']
    """

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.touched: set[str] = set()
        self._t0: float | None = None
        #: users exported by the last call (the rest came from the cache)
        self.exported = 0

    def touch(self, user_id: str) -> None:
        self.touched.add(user_id)

    def export(self, engine, user_ids: set[str]) -> dict:
        """What ``export_users(engine, user_ids)`` gives, exporting only what changed."""
        if engine._t0 != self._t0:
            self.records = {}
        stale = (self.touched & user_ids) | (user_ids - self.records.keys())
        fresh = export_users(engine, stale)
        self.records = {u: rec for u, rec in self.records.items() if u in user_ids and u not in stale}
        self.records.update(fresh["users"])
        self.touched = set()
        self._t0 = engine._t0
        self.exported = len(stale)
        return {**fresh, "users": dict(self.records)}
