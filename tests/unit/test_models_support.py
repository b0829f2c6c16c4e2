"""Generated event streams with planted structure and a deep state fingerprint (used by the other
test_models_* files), with tests of these helpers."""
from __future__ import annotations

import math
import random
from collections.abc import Mapping

import numpy as np

DAY = 86400.0
T0 = 1_700_000_000.0


def snapshot(obj, _seen=None):
    """A comparable, fully materialised copy of an object's state (numpy arrays as dtype/shape/bytes)."""
    if _seen is None:
        _seen = set()
    if isinstance(obj, np.ndarray):
        return ("nd", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, float):
        return "nan" if math.isnan(obj) else obj
    if obj is None or isinstance(obj, (bool, int, str, bytes, np.generic)):
        return obj.item() if isinstance(obj, np.generic) else obj
    if isinstance(obj, Mapping):
        return ("map", type(obj).__name__, sorted(((repr(k), snapshot(v, _seen)) for k, v in obj.items()),
                                                  key=lambda kv: kv[0]))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [snapshot(v, _seen) for v in obj])
    if isinstance(obj, (set, frozenset)):
        return ("set", sorted(repr(v) for v in obj))
    if hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        if id(obj) in _seen:
            return ("cycle", type(obj).__name__)
        _seen = _seen | {id(obj)}
        d = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        for s in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, s):
                d[s] = getattr(obj, s)
        d.pop("_rng", None)  # River's random.Random: compared through its draws below
        out = ("obj", type(obj).__name__, snapshot(d, _seen))
        if hasattr(obj, "_rng"):
            out += (obj._rng.getstate(),)
        return out
    if callable(obj):
        return ("callable", getattr(obj, "__qualname__", repr(type(obj))))
    return ("repr", repr(obj))


def event(k: int, user: str, item: str | None, ts: float, typ: str = "view", **kw) -> dict:
    e = {"event_id": f"e{k}", "user_id": user, "type": typ, "ts": ts}
    if item is not None:
        e["item_id"] = item
    e.update(kw)
    return e


def trained(config, items: list[dict], events: list[dict]):
    """An ``Engine(config)`` told ``items``, then taught ``events``."""
    from infogap.models import Engine

    engine = Engine(config)
    for item in items:
        engine.upsert_item(item)
    engine.learn_many(events)
    return engine


def group_stream(n_groups: int = 3, users_per_group: int = 12, items_per_group: int = 15, events_per_user: int = 25,
                 seed: int = 0, mixed_types: bool = True) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Users in groups, each group with its own item pool (two categories, one tag); interleaved sessions.

    Returns (events in ts order, catalog items, user -> group).
    """
    rng = random.Random(seed)
    items = []
    for g in range(n_groups):
        for j in range(items_per_group):
            items.append({"item_id": f"g{g}-i{j}", "title": f"Item {g}/{j}", "category": f"Cat{g}{'ab'[j % 2]}",
                          "tags": [f"Cat{g}", "all"], "price": 10.0 + j, "available": True})
    users = {f"g{g}-u{k}": g for g in range(n_groups) for k in range(users_per_group)}
    types = ["view", "view", "view", "click", "add_to_cart", "purchase"] if mixed_types else ["view"]
    raw = []
    for u, g in users.items():
        t = T0 + rng.uniform(0, 2 * DAY)
        for _ in range(events_per_user):
            t += rng.expovariate(1 / 600.0)
            it = f"g{g}-i{min(int(rng.expovariate(1 / 4.0)), items_per_group - 1)}"
            typ = rng.choice(types)
            raw.append((t, u, it, typ))
    raw.sort()
    evs = []
    for k, (t, u, it, typ) in enumerate(raw):
        kw = {"value": 12.5} if typ == "purchase" else {}
        evs.append(event(k, u, it, t, typ, **kw))
    return evs, items, users


def random_stream(n: int, n_users: int, n_items: int, seed: int = 0, t0: float = T0, span: float = 30 * DAY,
                  types=("view", "click", "add_to_cart", "purchase", "rate", "impression", "dismiss"),
                  with_extras: bool = True) -> list[dict]:
    """A structureless stream of mixed event types (for the generic checks)."""
    rng = random.Random(seed)
    ts = sorted(t0 + rng.uniform(0, span) for _ in range(n))
    out = []
    for k, t in enumerate(ts):
        typ = rng.choice(types)
        e = event(k, f"u{rng.randrange(n_users)}", f"i{int(rng.paretovariate(1.2)) % n_items}", t, typ)
        if typ == "rate":
            e["rating"] = float(rng.randint(1, 5))
        if typ == "purchase" and with_extras:
            e["value"] = round(rng.uniform(1, 50), 2)
        if with_extras and rng.random() < 0.05:
            e = event(k, e["user_id"], None, t, rng.choice(["push_open", "push_click"]))
        out.append(e)
    return out


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions, ~0 = chance)."""
    from collections import Counter

    def c2(x):
        return x * (x - 1) / 2

    n = len(a)
    pairs = Counter(zip(a, b))
    sa, sb = Counter(a), Counter(b)
    index = sum(c2(v) for v in pairs.values())
    ea = sum(c2(v) for v in sa.values())
    eb = sum(c2(v) for v in sb.values())
    expected = ea * eb / c2(n)
    top = (ea + eb) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


# ---------------------------------------------------------------------------- the helpers themselves
def test_adjusted_rand_index_counts_agreement():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0.0


def test_snapshot_sees_array_contents_and_nan():
    a, b = np.zeros(3), np.zeros(3)
    assert snapshot({"x": a, "y": [math.nan]}) == snapshot({"x": b, "y": [math.nan]})
    b[1] = 1.0
    assert snapshot({"x": a}) != snapshot({"x": b})


def test_group_stream_is_sorted_and_grouped():
    evs, items, users = group_stream(n_groups=2, users_per_group=3, events_per_user=5)
    assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
    assert all(e["item_id"].split("-")[0] == e["user_id"].split("-")[0] for e in evs)
    assert len(items) == 30 and len(users) == 6


def first_difference(x, y, path: str = "") -> str | None:
    """Where two :func:`snapshot` values first differ (for assertion messages)."""
    if x == y:
        return None
    if isinstance(x, tuple) and isinstance(y, tuple) and x and y and x[0] == y[0]:
        if x[0] == "map":
            dx, dy = dict(x[2]), dict(y[2])
            for k in sorted(set(dx) | set(dy)):
                if dx.get(k) != dy.get(k):
                    return first_difference(dx.get(k), dy.get(k), f"{path}.{k.strip(chr(39))}")
        if x[0] == "obj":
            return first_difference(x[2], y[2], f"{path}:{x[1]}") or first_difference(x[3:], y[3:], f"{path}:rng")
        if x[0] == "nd" and x[1:3] == y[1:3]:
            ax = np.frombuffer(x[3], dtype=x[1]).reshape(x[2])
            ay = np.frombuffer(y[3], dtype=y[1]).reshape(y[2])
            where = np.argwhere(ax != ay)
            return f"{path} differs at {where[:3].tolist()}: {ax[tuple(where[0])]!r} vs {ay[tuple(where[0])]!r}"
        if len(x) == 2 and isinstance(x[1], list) and isinstance(y[1], list) and len(x[1]) == len(y[1]):
            for i, (p, q) in enumerate(zip(x[1], y[1])):
                if p != q:
                    return first_difference(p, q, f"{path}[{i}]")
        if len(x) == len(y):
            for i, (p, q) in enumerate(zip(x, y)):
                if p != q:
                    return first_difference(p, q, f"{path}<{i}>")
    return f"{path}: {repr(x)[:200]} vs {repr(y)[:200]}"
