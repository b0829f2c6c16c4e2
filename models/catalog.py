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

**Limits.** An item is checked as strictly as an event (:func:`validate_item`, at every upsert; the worker
checks the raw ``items`` record first with :func:`parse_item`): ``item_id`` a string (or integer) of at most
:data:`MAX_ID_CHARS` printable characters; ``category`` and each tag a string of at most
:data:`MAX_TEXT_CHARS` characters without control characters; at most :data:`MAX_TAGS` tags; ``price``
a finite number >= 0 or null; ``available`` a JSON boolean. A record that breaks one is refused with the
reason (to ``events.dlq``). A title is display text: one longer than :data:`MAX_TITLE_CHARS` is cut to that
length (ending in "…") and its control characters become spaces, so a title cannot make a
recommendation or a push message large. The work per record is linear in its size.
"""
from __future__ import annotations

import math
import numbers
import re
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
import orjson

from infogap.models.events import json_type
from infogap.models.scratch import memo_of

#: At most this many features (category first, then tags) are kept per item.
MAX_ITEM_FEATURES = 8
#: At most this many foreign numberings are remembered (:meth:`Catalog.translated`), the least recent dropped.
MAX_NUMBERINGS = 64
#: A foreign numbering's table (:meth:`Catalog.translated`) holds the numbers below this (32 MB of int64s at most);
#: a row with larger numbers is looked up by its ids, so a number read from outside cannot grow it without bound.
MAX_TRANSLATED = 1 << 22
#: Longest ``item_id`` (as the event contract's ids).
MAX_ID_CHARS = 256
#: Longest category and tag.
MAX_TEXT_CHARS = 256
#: Longer titles are cut to this many characters (the last one "…").
MAX_TITLE_CHARS = 500
#: A record with more tags is refused.
MAX_TAGS = 256
#: A raw ``items`` record larger than this is refused before it is decoded.
MAX_ITEM_RECORD_BYTES = 256 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class InvalidItem(ValueError):
    """An ``items`` record that cannot be applied; ``reason`` says what to fix."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_record(raw: bytes, limit: int, error: type[ValueError] = ValueError):
    """The JSON value of a side-topic record of at most ``limit`` bytes, or ``error`` saying why not
    (a larger one is refused unread)."""
    if len(raw) > limit:
        raise error(f"payload is {len(raw)} bytes, over the limit of {limit} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(f"not valid JSON: {exc}") from None


def parse_item(raw: bytes | bytearray | memoryview, key: bytes | None) -> dict:
    """Decode and check a raw ``items`` record whose Kafka key is ``key``: the item of :func:`validate_item`.

    The key must be the item's ``item_id`` (a compacted topic keeps one record per key, and a tombstone
    deletes by key).

    >>> parse_item(b'{"item_id": 7, "available": false}', b"7")["available"]
    False
    >>> parse_item(b'{"item_id": "a"}', b"b")
    Traceback (most recent call last):
    ...
    infogap.models.catalog.InvalidItem: the record key is not the item's 'item_id'; produce items with key=item_id
    """
    item = validate_item(load_record(raw, MAX_ITEM_RECORD_BYTES, InvalidItem))
    if key is None:
        raise InvalidItem("the record key is null; produce items with key=item_id")
    if decode_key(key) != item["item_id"]:
        raise InvalidItem("the record key is not the item's 'item_id'; produce items with key=item_id")
    return item


def decode_key(key: bytes | bytearray | memoryview) -> str | None:
    """A record key as the contract's ids are normalised (UTF-8, stripped), or None if it is not UTF-8."""
    try:
        return bytes(key).decode().strip()
    except UnicodeDecodeError:
        return None


def check_id(name: str, v: object, error: type[ValueError] = ValueError) -> str:
    """An id field as the event contract wants it: a string (or integer), stripped, non-empty, at most
    :data:`MAX_ID_CHARS` printable characters; else ``error`` with the reason.

    >>> check_id("item_id", 42), check_id("item_id", " a ")
    ('42', 'a')
    """
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise error(f"field {name!r} must be a string (or an integer), got {json_type(v)}")
    s = str(v).strip()
    if not s:
        raise error(f"field {name!r} is empty")
    if len(s) > MAX_ID_CHARS:
        raise error(f"field {name!r} is {len(s)} characters long, over the limit of {MAX_ID_CHARS}")
    if not s.isprintable():
        raise error(f"field {name!r} contains control characters")
    return s


def check_text(name: str, v: object, limit: int = MAX_TEXT_CHARS, error: type[ValueError] = ValueError) -> str:
    """A text field: a string of at most ``limit`` characters without control characters."""
    if not isinstance(v, str):
        raise error(f"field {name!r} must be a string, got {json_type(v)}")
    if len(v) > limit:
        raise error(f"field {name!r} is {len(v)} characters long, over the limit of {limit}")
    if _CONTROL.search(v):
        raise error(f"field {name!r} contains control characters")
    return v


def cut_title(title: str) -> str:
    """A title cut to :data:`MAX_TITLE_CHARS` (ending in "…") with control characters as spaces.

    >>> len(cut_title("x" * 10_000)), cut_title("a\\nb")
    (500, 'a b')
    """
    if len(title) > MAX_TITLE_CHARS:
        title = title[:MAX_TITLE_CHARS - 1] + "\u2026"
    return _CONTROL.sub(" ", title)


def validate_item(doc: object) -> dict:
    """Check an item (a decoded ``items`` record) and normalise it; raise :class:`InvalidItem` with a reason.

    Returns ``{"item_id", "title", "category", "tags", "price", "available"}``: ids stripped, an empty
    category None, tags without empty strings or repeats, a long title cut (see the module docstring);
    other fields are dropped. Linear in the record's size; a list of more than :data:`MAX_TAGS` tags is
    refused before it is read.

    >>> validate_item({"item_id": "a", "tags": ["x", "", "x", "y"], "price": 2})["tags"]
    ['x', 'y']
    >>> validate_item({"item_id": "a", "available": "false"})
    Traceback (most recent call last):
    ...
    infogap.models.catalog.InvalidItem: field 'available' must be true or false, got a string
    """
    if not isinstance(doc, Mapping):
        raise InvalidItem(f"an items record must be a JSON object, got {json_type(doc)}")
    if doc.get("item_id") is None:
        raise InvalidItem("missing required field 'item_id'")
    item_id = check_id("item_id", doc["item_id"], InvalidItem)
    title = doc.get("title")
    if title is not None:
        if not isinstance(title, str):
            raise InvalidItem(f"field 'title' must be a string, got {json_type(title)}")
        title = cut_title(title) or None
    category = doc.get("category")
    if category is not None:
        category = check_text("category", category, error=InvalidItem) or None
    tags = doc.get("tags")
    if tags is None:
        tags = []
    else:
        if not isinstance(tags, (list, tuple)):
            raise InvalidItem(f"field 'tags' must be an array of strings, got {json_type(tags)}")
        if len(tags) > MAX_TAGS:
            raise InvalidItem(f"field 'tags' has {len(tags)} tags, over the limit of {MAX_TAGS}")
        for t in tags:
            if not isinstance(t, str):
                raise InvalidItem(f"field 'tags' must be an array of strings, got {json_type(t)} in it")
            if len(t) > MAX_TEXT_CHARS:
                raise InvalidItem(f"field 'tags' has a tag of {len(t)} characters, over the limit of "
                                  f"{MAX_TEXT_CHARS}")
            if _CONTROL.search(t):
                raise InvalidItem("field 'tags' has a tag with control characters")
        tags = [t for t in dict.fromkeys(tags) if t]  # linear: a dict, not a list, remembers the seen tags
    price = doc.get("price")
    if price is not None:
        if isinstance(price, (bool, np.bool_)) or not isinstance(price, numbers.Real):
            raise InvalidItem(f"field 'price' must be a number, got {json_type(price)}")
        price = float(price)
        if not math.isfinite(price) or price < 0:
            raise InvalidItem(f"field 'price' is {price!r}; expected a finite number >= 0, or null")
    available = doc.get("available", True)
    if not isinstance(available, (bool, np.bool_)):
        raise InvalidItem(f"field 'available' must be true or false, got {json_type(available)}")
    return {"item_id": item_id, "title": title, "category": category, "tags": tags, "price": price,
            "available": bool(available)}


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
        :class:`~infogap.models.cooc_shard.CoOccurrenceShard` object; a new object gets a new ``numbering``.
        Numbers seen before map in one numpy take, the ids of only the others are looked up. That
        makes re-reading a row of hundreds of neighbours cheap.

        >>> c = Catalog()
        >>> c.translated(7, np.array([0, 5]), ["x", "y"]).tolist()
        [0, 1]
        >>> c.translated(7, np.array([5, 2]), ["never read", "z"]).tolist()  # 5 is known: its id is not read
        [1, 2]

        A negative number is a ValueError; numbers of :data:`MAX_TRANSLATED` or more are looked up by id:

        >>> c.translated(7, np.array([2, MAX_TRANSLATED]), ["z", "w"]).tolist()
        [2, 3]
        """
        if numbers.size and numbers.min() < 0:
            raise ValueError("a foreign numbering's numbers are never negative")
        if numbers.size and numbers.max() >= MAX_TRANSLATED:
            return self.rows(list(item_ids))
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

    @property
    def ids(self) -> list[str]:
        """Every item id, by row (the catalog's own list: read it, never change it)."""
        return self._ids

    @property
    def titles(self) -> list[str | None]:
        """Every item title by row, None where none was given (the catalog's own list: read only)."""
        return self._titles

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
        (None before any event: such items are never "new"). The item is checked first
        (:func:`validate_item`: :class:`InvalidItem`, a ValueError, with the reason).
        """
        item = validate_item(item)
        r = self.row(item["item_id"])
        self._titles[r] = item["title"]
        cat = item["category"]
        names = dict.fromkeys([cat] if cat is not None else [])
        for t in item["tags"]:  # at most MAX_TAGS, without repeats: stop at the features kept
            if len(names) >= MAX_ITEM_FEATURES:
                break
            names[t] = None
        feats = tuple(self.feature(x) for x in list(names)[:MAX_ITEM_FEATURES])
        self._feat_lists[r] = feats
        self.feat_mask[r] = _mask(feats)
        self.category[r] = feats[0] if cat is not None else -1
        price = item["price"]
        self.price[r] = np.nan if price is None else price
        avail = item["available"]
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

    @property
    def recent(self) -> deque[int]:
        """:meth:`recent_rows` without the copy (the catalog's own deque: read it, never change it)."""
        return self._recent

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
