"""Per-user state that moves between engines: when a partition of users moves to another worker
(a Kafka rebalance), the old worker exports them and the new one imports them.

Engines number items, features and users differently, so the record holds ids and names only: item
ids, category/tag names, event type names. Decayed figures (frequency, monetary, the category/tag
vector) are stored by an engine relative to its reference time ``t0``; the record carries the
exporter's ``t0`` and decay rate and the importer converts them to its own ``t0``.

Kept out on purpose: what many users feed (item co-occurrence, popularity/trending, segment centers).
In the stream those are learned once for every partition (the item stage's shards and
:mod:`infogap.models.population`), and a user's share of them holds no user id (see :mod:`infogap.models.engine`,
"What forget_user keeps"). The segment id moves as it is: with one population learner it names the
same center in the exporter and the importer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from infogap.models.events import EVENT_TYPES
from infogap.models.profile import _HIST_FIELDS as HIST_FIELDS, ROW_SCALARS, records
from infogap.models.state_fields import StateError, array, check

#: 2: columns (numpy arrays) for all the users; 1: a dict of records per user (still imported)
STATE_VERSION = 2
_READABLE = (1, STATE_VERSION)


def export_users(engine, user_ids: Iterable[str]) -> dict:
    """A picklable, self-contained record of everything ``engine`` keeps for ``user_ids`` (unknown ids
    are skipped): ``{"version", "t0", "lam", "users": [user ids], "items": [...], "features": [...],
    "types": [...]}`` and the columns of :meth:`infogap.models.profile.Profiles.get_rows`, in which item rows
    are indexes into ``items`` (-1 for none), feature ids indexes into ``features`` and type codes
    indexes into ``types``. Columns of numpy arrays: a checkpoint of 20,000 users exports and pickles
    in milliseconds, where a dict per user took 17 us a user, and as long again to pickle.
    :func:`user_records` reads it a user at a time.

    >>> from infogap.models import Engine
    >>> a, b = Engine(), Engine()
    >>> a.upsert_item({"item_id": "tea", "category": "Drinks"})
    >>> a.learn_one({"event_id": "e1", "user_id": "ann", "type": "purchase", "ts": 1000.0, "item_id": "tea"})
    >>> state = export_users(a, ["ann", "nobody"])
    >>> state["users"], user_records(state)["ann"]["consumed"], user_records(state)["ann"]["feats"]
    (['ann'], ['tea'], {'Drinks': 8.0})
    >>> import_users(b, state); b.profile("ann") == a.profile("ann")
    True
    """
    prof, cat = engine.state.profiles, engine.state.catalog
    ids, rows = [], []
    for uid in dict.fromkeys(user_ids):
        r = prof.find(uid)
        if r is not None:
            ids.append(uid)
            rows.append(r)
    cols = prof.get_rows(rows)
    hist, last, cons = cols["hist_item"], cols["last_item"], cols["consumed"]
    used = np.unique(np.concatenate([hist, last[last >= 0], cons]))
    for name, a in (("hist_item", hist), ("last_item", last), ("consumed", cons)):
        cols[name] = np.where(a >= 0, np.searchsorted(used, a), -1)
    feats, cols["feat_key"] = np.unique(cols["feat_key"], return_inverse=True)
    return {"version": STATE_VERSION, "t0": engine.state.t0, "lam": prof.lam, "users": ids,
            "items": [cat.item_id(i) for i in used.tolist()], "features": [cat.feature_name(f) for f in feats.tolist()],
            "types": list(EVENT_TYPES), **cols}


def users_from_state(state, arrays=(), where: str = "users") -> dict:
    """An :func:`export_users` record read from a snapshot's tree (its arrays in ``arrays``), checked so
    that every index points inside its table and every column has the length its users need;
    :class:`~infogap.models.state_fields.StateError` otherwise.

    >>> from infogap.models import Engine
    >>> a = Engine(); a.learn_one({"event_id": "e1", "user_id": "ann", "type": "view", "ts": 1000.0, "item_id": "tea"})
    >>> state = export_users(a, ["ann"]); b = Engine(); import_users(b, users_from_state(state))
    >>> b.profile("ann") == a.profile("ann")
    True
    """
    cols = [name for name, _ in ROW_SCALARS] + [name for name, _ in HIST_FIELDS] + [
        "hist_len", "consumed", "consumed_len", "feat_key", "feat_val", "feat_len"]
    f = check(state, {"version": int, "t0": (float, type(None)), "lam": float, "users": list, "items": list,
                      "features": list, "types": list}, where, arrays)
    if f["version"] != STATE_VERSION:
        raise StateError(f"{where}: user state version {f['version']}; this infogap reads {STATE_VERSION}")
    for name in ("users", "items", "features", "types"):
        if not all(type(x) is str for x in f[name]):
            raise StateError(f"{where}: {name!r} must be a list of strings")
    if set(f["types"]) - set(EVENT_TYPES) or len(set(f["users"])) != len(f["users"]):
        raise StateError(f"{where}: unknown event types, or a user twice")
    if not isinstance(state, Mapping) or any(name not in state for name in cols):
        raise StateError(f"{where}: columns missing")
    c = {name: array(state[name], arrays) for name in cols}
    if not all(isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in "iuf" for a in c.values()):
        raise StateError(f"{where}: every column must be a one-dimensional array of numbers")
    n, n_items = len(f["users"]), len(f["items"])

    def within(a, lo, hi) -> bool:
        return a.size == 0 or (a.dtype.kind in "iu" and a.min() >= lo and a.max() < hi)

    lens = [c[k] for k in ("hist_len", "consumed_len", "feat_len")]
    ok = (all(c[name].size == n for name, _ in ROW_SCALARS) and all(a.size == n and within(a, 0, 2 ** 31)
                                                                   for a in lens)
          and all(c[name].size == int(c["hist_len"].sum()) for name, _ in HIST_FIELDS)
          and c["consumed"].size == int(c["consumed_len"].sum())
          and c["feat_key"].size == c["feat_val"].size == int(c["feat_len"].sum())
          and within(c["hist_item"], -1, n_items) and within(c["last_item"], -1, n_items)
          and within(c["consumed"], 0, n_items) and within(c["feat_key"], 0, len(f["features"]))
          and within(c["hist_type"], 0, len(f["types"])) and within(c["segment"], -1, 2 ** 31)
          and within(c["n_push"], 0, 2 ** 62))
    if not ok:
        raise StateError(f"{where}: the columns do not fit {n} users, {n_items} items and "
                         f"{len(f['features'])} categories")
    return {**f, **c}


def user_records(state: Mapping) -> dict[str, dict]:
    """The users of an :func:`export_users` record one by one: ``{user_id: record}``, each record as
    :meth:`infogap.models.profile.Profiles.set_row` takes it but with item ids (None for none), category/tag
    names and event type names. Version 1 records are such a dict already."""
    if state.get("version") not in _READABLE:
        raise ValueError(f"unsupported user state version {state.get('version')!r}; expected one of {_READABLE}")
    if state["version"] == 1:
        return state["users"]
    items, features, types = state["items"], state["features"], state["types"]
    out = {}
    for uid, rec in zip(state["users"], records(state)):
        rec["last_item"] = items[rec["last_item"]] if rec["last_item"] >= 0 else None
        rec["hist_item"] = [items[i] if i >= 0 else None for i in rec["hist_item"]]
        rec["hist_type"] = [types[t] for t in rec["hist_type"]]
        rec["consumed"] = [items[i] for i in rec["consumed"]]
        rec["feats"] = {features[f]: w for f, w in rec["feats"].items()}
        out[uid] = rec
    return out


def import_users(engine, state: Mapping) -> None:
    """Insert the users of an :func:`export_users` record into ``engine``, replacing any state it has
    for the same ids. Unknown items get catalog rows as learning gives them; an engine that has
    learned nothing yet adopts the record's ``t0``; the engine's clock moves to the users' newest
    event if that is later."""
    users = user_records(state)
    learned = engine.state
    seg = learned.segmenter
    bad = sorted(u for u, rec in users.items() if rec["segment"] >= seg.n_segments)
    if bad:
        raise ValueError(f"users {bad[:5]} are in segments beyond this engine's {seg.n_segments}")
    prof, cat = learned.profiles, learned.catalog
    if learned.t0 is None:
        learned.t0 = state["t0"]
    t0 = state["t0"]
    if t0 is not None and t0 > learned.t0:
        learned.renormalise(t0)  # values newer than this engine's reference time: move it, no overflow
    scale = 1.0 if t0 is None or learned.t0 is None else math.exp(state["lam"] * (t0 - learned.t0))

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
        if rec["last_ts"] > learned.now:
            learned.now = rec["last_ts"]
    learned.ensure_items(len(cat))
