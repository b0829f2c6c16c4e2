"""A synthetic clickstream with planted structure, for the benchmark and for tests.

Users belong to ``groups``; each group has its own pool of items. A user's event picks an item
from their group's pool with probability ``in_group``, else from the whole catalog by
popularity. Activity and popularity are Zipf-like, as in real clickstreams. Deterministic
for a seed.

>>> s = SyntheticStream(n_users=50, n_items=40, groups=4, seed=1)
>>> events = s.events(200, start_ts=1.7e9)
>>> len(events), events[0]["type"] in ("view", "click", "add_to_cart", "purchase")
(200, True)
>>> s.group_of_user("u7") == s.group_of_item(events[0]["item_id"]) or True
True
"""
from __future__ import annotations

import numpy as np

TYPES = np.array(["view", "click", "add_to_cart", "purchase"])
TYPE_P = np.array([0.70, 0.20, 0.07, 0.03])


class SyntheticStream:
    def __init__(self, n_users: int = 10_000, n_items: int = 2_000, groups: int = 8, in_group: float = 0.8,
                 seed: int = 0):
        self.n_users, self.n_items, self.groups, self.in_group = n_users, n_items, groups, in_group
        self._rng = np.random.default_rng(seed)
        ranks = np.arange(1, n_users + 1)
        self._user_p = (1 / ranks ** 0.8) / (1 / ranks ** 0.8).sum()
        iranks = np.arange(1, n_items + 1)
        self._item_p = (1 / iranks ** 0.9) / (1 / iranks ** 0.9).sum()
        self._user_group = np.arange(n_users) % groups
        self._item_group = np.arange(n_items) % groups

    def group_of_user(self, user_id: str) -> int:
        return int(self._user_group[int(user_id[1:])])

    def group_of_item(self, item_id: str) -> int:
        return int(self._item_group[int(item_id[1:])])

    def items(self) -> list[dict]:
        """Catalog records for the ``items`` topic."""
        return [{"item_id": f"i{i}", "title": f"Item {i}", "category": f"cat{self._item_group[i]}",
                 "tags": [f"group{self._item_group[i]}"], "price": float(5 + i % 50), "available": True}
                for i in range(self.n_items)]

    def events(self, n: int, start_ts: float, per_second: float = 1000.0, prefix: str = "e") -> list[dict]:
        """``n`` events in time order, ``per_second`` apart in event time."""
        rng = self._rng
        users = rng.choice(self.n_users, size=n, p=self._user_p)
        global_items = rng.choice(self.n_items, size=n, p=self._item_p)
        per_group = self.n_items // self.groups
        in_group = rng.random(n) < self.in_group
        local = rng.integers(0, per_group, size=n) * self.groups + self._user_group[users]
        items = np.where(in_group, np.minimum(local, self.n_items - 1), global_items)
        types = TYPES[np.searchsorted(np.cumsum(TYPE_P), rng.random(n), side="right").clip(0, 3)]
        ts = start_ts + np.arange(n) / per_second
        return [{"event_id": f"{prefix}{k}", "user_id": f"u{u}", "item_id": f"i{i}", "type": str(t), "ts": float(s),
                 **({"value": float(5 + i % 50)} if t == "purchase" else {})}
                for k, (u, i, t, s) in enumerate(zip(users.tolist(), items.tolist(), types.tolist(), ts.tolist()))]
