"""The item catalog: ids to dense rows, category and tags as feature ids, availability.

Every other model keys its numpy arrays by the row this catalog hands out, so an item seen
only in events and an item announced on the ``items`` topic live in the same row space.
Rows are never reused: a removed item keeps its row (and its aggregate statistics) but is
marked unavailable, so it is never recommended until it is upserted again.

>>> c = Catalog()
>>> r = c.upsert({"item_id": "sku-1", "title": "Mug", "category": "Kitchen", "tags": ["gift"]}, now=10.0)
>>> c.find("sku-1") == r, c.category_name(r), c.feature_names(r)
(True, 'Kitchen', ['Kitchen', 'gift'])
>>> c.remove("sku-1"); bool(c.available[r])
False
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np

from models.scratch import memo_of

#: At most this many features (category first, then tags) are kept per item.
MAX_ITEM_FEATURES = 8
#: At most this many foreign numberings are remembered (:meth:`Catalog.translated`), the least recent dropped.
MAX_NUMBERINGS = 64


class Catalog:
    """Item ids, titles, category/tag feature ids and availability, in growable numpy arrays.

    Parameters
    ----------
    capacity
        Initial number of rows; arrays double when full.
    recent_len
        How many recently upserted items are remembered as candidates for "new in ..." slots.

    Examples
    --------
    >>> c = Catalog()
    >>> c.row("a"), c.row("b"), c.row("a")
    (0, 1, 0)
    >>> c.find("zzz") is None, len(c)
    (True, 2)
    """

    _recent_version = 0  # bumped when the recent items change (see recent_dated); class default for old pickles

    def __init__(self, capacity: int = 1024, recent_len: int = 256):
        self.capacity = capacity
        self.recent_len = recent_len
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._titles: list[str | None] = []
        self._feat_lists: list[tuple[int, ...]] = []
        self._feat_index: dict[str, int] = {}
        self._feat_names: list[str] = []
        self._recent: deque[int] = deque(maxlen=recent_len)
        self.n_unavailable = 0
        cap = max(int(capacity), 1)
        self.category = np.full(cap, -1, np.int32)
        self.available = np.ones(cap, bool)
        self.in_catalog = np.zeros(cap, bool)
        self.added_ts = np.full(cap, np.nan)
        self.price = np.full(cap, np.nan)
        #: per row, the item's categories/tags as bits ``1 << (feature id % 64)`` (exact up to 64 features)
        self.feat_mask = np.zeros(cap, np.uint64)
        #: per foreign numbering (:meth:`translated`): its number -> this catalog's row, -1 not yet known
        self._foreign: dict[int, np.ndarray] = {}

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a snapshot from before ``feat_mask`` or ``_foreign``."""
        self.__dict__.update(state)
        self.__dict__.setdefault("_foreign", {})
        if "feat_mask" not in state:
            self.feat_mask = np.zeros(self.category.shape[0], np.uint64)
            for r, feats in enumerate(self._feat_lists):
                self.feat_mask[r] = _mask(feats)

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        return len(self._ids)

    def find(self, item_id: str) -> int | None:
        """The row of ``item_id`` or None (read only)."""
        return self._index.get(item_id)

    def row(self, item_id: str) -> int:
        """The row of ``item_id``, created (available, no metadata) when unknown."""
        r = self._index.get(item_id)
        if r is None:
            r = len(self._ids)
            if r >= self.category.shape[0]:
                self._grow(2 * self.category.shape[0])
            self._index[item_id] = r
            self._ids.append(item_id)
            self._titles.append(None)
            self._feat_lists.append(())
        return r

    def rows(self, item_ids: list[str]) -> np.ndarray:
        """The rows of ``item_ids`` (``int64``), unknown ones created as by :meth:`row`.

        >>> c = Catalog()
        >>> c.rows(["a", "b", "a"]).tolist(), c.rows(["b", "c"]).tolist()
        ([0, 1, 0], [1, 2])
        """
        try:  # a neighbour row has hundreds: one C-level pass
            return np.fromiter(map(self._index.__getitem__, item_ids), np.int64, len(item_ids))
        except KeyError:
            return np.array([self.row(i) for i in item_ids], np.int64)

    def translated(self, numbering: int, numbers: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """The rows of ``item_ids``, which another process numbers ``numbers`` in its numbering ``numbering``.

        That numbering must be append-only (a number always means the same item), like the rows of a
        :class:`~models.cooc_shard.CoOccurrenceShard` object; a new object gets a new ``numbering``.
        Numbers seen before map in one numpy take, the ids of only the others are looked up. That
        makes re-reading a row of hundreds of neighbours cheap.

        >>> c = Catalog()
        >>> c.translated(7, np.array([0, 5]), ["x", "y"]).tolist()
        [0, 1]
        >>> c.translated(7, np.array([5, 2]), ["never read", "z"]).tolist()  # 5 is known: its id is not read
        [1, 2]
        """
        table = self._foreign.pop(numbering, None)  # re-inserted last: the dict keeps recency order
        if table is None:
            table = np.full(64, -1, np.int64)
            while len(self._foreign) >= MAX_NUMBERINGS:
                del self._foreign[next(iter(self._foreign))]
        try:
            rows = table[numbers]
        except IndexError:  # numbers beyond the table: grown
            table = np.concatenate([table, np.full(max(int(numbers.max()) + 1, 2 * table.size) - table.size, -1)])
            rows = table[numbers]
        self._foreign[numbering] = table
        if rows.min(initial=0) < 0:
            miss = np.flatnonzero(rows < 0)
            rows[miss] = self.rows([item_ids[k] for k in miss.tolist()])
            table[numbers[miss]] = rows[miss]
        return rows

    def item_id(self, row: int) -> str:
        """The id of a row."""
        return self._ids[row]

    def _grow(self, cap: int) -> None:
        def grow(a: np.ndarray, fill) -> np.ndarray:
            out = np.full(cap, fill, a.dtype)
            out[: a.shape[0]] = a
            return out

        self.category = grow(self.category, -1)
        self.available = grow(self.available, True)
        self.in_catalog = grow(self.in_catalog, False)
        self.added_ts = grow(self.added_ts, np.nan)
        self.price = grow(self.price, np.nan)
        self.feat_mask = grow(self.feat_mask, 0)

    # ------------------------------------------------------------------ metadata
    def feature(self, name: str) -> int:
        """The id of a category/tag name, created when new."""
        f = self._feat_index.get(name)
        if f is None:
            f = len(self._feat_names)
            self._feat_index[name] = f
            self._feat_names.append(name)
        return f

    def feature_name(self, f: int) -> str:
        """The category/tag name of a feature id."""
        return self._feat_names[f]

    @property
    def n_features(self) -> int:
        """Number of distinct categories and tags seen."""
        return len(self._feat_names)

    def upsert(self, item: Mapping, now: float | None = None) -> int:
        """Insert or replace an item's metadata (``items`` topic record); returns its row.

        ``now`` is the engine's event-time clock, remembered as the time the item was added
        (None before any event: such items are never "new").
        """
        item_id = item.get("item_id")
        if item_id is None or str(item_id) == "":
            raise ValueError("an item needs a non-empty 'item_id'")
        r = self.row(str(item_id))
        title = item.get("title")
        self._titles[r] = None if title is None else str(title)
        names: list[str] = []
        cat = item.get("category")
        if cat is not None and str(cat) != "":
            names.append(str(cat))
        tags = item.get("tags") or ()
        if isinstance(tags, str):
            tags = (tags,)
        for t in tags:
            if t is not None and str(t) != "" and str(t) not in names:
                names.append(str(t))
        feats = tuple(self.feature(x) for x in names[:MAX_ITEM_FEATURES])
        self._feat_lists[r] = feats
        self.feat_mask[r] = _mask(feats)
        self.category[r] = feats[0] if cat is not None and str(cat) != "" and feats else -1
        price = item.get("price")
        self.price[r] = float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else np.nan
        avail = bool(item.get("available", True))
        if avail != bool(self.available[r]):
            self.n_unavailable += -1 if avail else 1
        self.available[r] = avail
        if not self.in_catalog[r]:
            self.in_catalog[r] = True
            self.added_ts[r] = np.nan if now is None or not math.isfinite(now) else float(now)
            self._recent.append(r)
            self._recent_version += 1
        return r

    def remove(self, item_id: str) -> None:
        """Delete an item from the catalog: it is never recommended again until re-upserted."""
        r = self._index.get(item_id)
        if r is not None:
            if self.available[r]:
                self.n_unavailable += 1
            self.available[r] = False
            self.in_catalog[r] = False
            if r in self._recent:
                self._recent.remove(r)
                self._recent_version += 1

    def features(self, row: int) -> tuple[int, ...]:
        """Feature ids (category first, then tags) of a row."""
        return self._feat_lists[row]

    def feature_names(self, row: int) -> list[str]:
        """Category and tag names of a row."""
        return [self._feat_names[f] for f in self._feat_lists[row]]

    def category_name(self, row: int) -> str | None:
        """The category of a row, or None."""
        c = int(self.category[row])
        return None if c < 0 else self._feat_names[c]

    def title(self, row: int) -> str:
        """Display name: the title when known, else the id."""
        return self._titles[row] or self._ids[row]

    def recent_rows(self) -> list[int]:
        """Rows of the most recently upserted items, newest last."""
        return list(self._recent)

    def recent_dated(self) -> np.ndarray:
        """Rows of the most recently upserted items that have an added time (those upserted before any
        event have none), newest last; remembered until the recent items change (outside the state,
        so reading changes nothing)."""
        version = self._recent_version
        memo = memo_of(self)
        held = memo.get("recent_dated")
        if held is None or held[0] != version:
            recent = np.fromiter(self._recent, np.int64, len(self._recent))
            held = memo["recent_dated"] = (version, recent[np.isfinite(self.added_ts[recent])])
        return held[1]


def _mask(feats: tuple[int, ...]) -> int:
    """Feature ids as bits (``1 << (f % 64)``)."""
    m = 0
    for f in feats:
        m |= 1 << (f % 64)
    return m
