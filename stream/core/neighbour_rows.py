"""Neighbour rows as the item stage publishes them and the user stages read them: a JSON head, the values
as float64s, the neighbours' numbers as int64s, and their ids as JSON (:func:`encode_row`, :func:`decode_row`)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson
from numba import njit

from infogap.models.catalog import MAX_ID_CHARS
from infogap.models.model_state import MAX_STORED_TS, MAX_STORED_VALUE


def encode_row(row: dict, numbering: int | None = None) -> bytes:
    """A row of :meth:`infogap.models.cooc_shard.CoOccurrenceShard.export_row` as bytes: a JSON head, the
    values as float64s, the neighbours' ``numbers`` in the shard as int64s, and their ids as JSON.

    ``numbering`` names the shard's numbering (see :meth:`infogap.models.catalog.Catalog.translated`): a
    reader that knows it translates the numbers, and reads the ids only of numbers new to it.

    >>> raw = encode_row({"item_id": "a", "t": 5.0, "pop": 2.0, "total": 9.0, "pair_total": 4.0,
    ...                   "neighbours": ["b"], "numbers": np.array([3]), "values": np.ones((4, 1)),
    ...                   "neighbour_pop": np.array([3.0])}, numbering=12)
    >>> row = decode_row(raw); list(row["neighbours"]), row["values"].shape, row["neighbour_pop"].tolist()
    (['b'], (4, 1), [3.0])
    >>> row["numbering"], row["numbers"].tolist()
    (12, [3])

    A row with raw counts (for lift) carries them in the head and a sixth row of values:

    >>> row = decode_row(encode_row({"item_id": "a", "t": 5.0, "pop": 2.0, "total": 9.0, "pair_total": 4.0,
    ...                              "neighbours": ["b"], "numbers": np.array([3]), "values": np.ones((4, 1)),
    ...                              "neighbour_pop": np.array([3.0]), "raw_pop": 7.0, "raw_total": 20.0,
    ...                              "raw_pair_total": 8.0, "neighbour_raw_pop": np.array([5.0])}, numbering=12))
    >>> row["raw_pop"], row["raw_total"], row["neighbour_raw_pop"].tolist(), row["numbers"].tolist()
    (7.0, 20.0, [5.0], [3])

    The positions of neighbours below the privacy floor go in the head as ``private`` (none: every one is public):

    >>> decode_row(encode_row({"item_id": "a", "t": 5.0, "pop": 2.0, "total": 9.0, "pair_total": 4.0,
    ...                        "neighbours": ["b", "c"], "numbers": np.array([3, 4]), "values": np.ones((4, 2)),
    ...                        "neighbour_pop": np.ones(2), "private": np.array([1])}))["private"].tolist()
    [1]
    """
    k = len(row["neighbours"])
    head = {"item_id": row["item_id"], "t": row["t"], "pop": row["pop"], "total": row["total"],
            "pair_total": row["pair_total"], "k": k, "numbering": numbering}
    private = row.get("private")
    if private is not None and len(private):
        head["private"] = np.asarray(private, np.int64).tolist()
    body = [np.asarray(row["values"], np.float64), np.asarray(row["neighbour_pop"], np.float64)[None]]
    if "raw_pop" in row:
        head.update(raw_pop=row["raw_pop"], raw_total=row["raw_total"], raw_pair_total=row["raw_pair_total"])
        body.append(np.asarray(row["neighbour_raw_pop"], np.float64)[None])
    head = orjson.dumps(head)
    return b"".join((len(head).to_bytes(4, "big"), head, np.vstack(body).tobytes(),
                     np.asarray(row["numbers"], np.int64).tobytes(), orjson.dumps(row["neighbours"])))


def _ids(ids: object, k: int) -> list[str]:
    """``ids`` if they are ``k`` item ids (strings of at most :data:`MAX_ID_CHARS`), else a ValueError."""
    if not (type(ids) is list and len(ids) == k
            and (not k or set(map(type, ids)) == {str} and max(map(len, ids)) <= MAX_ID_CHARS)):  # (C loops)
        raise ValueError(f"the row's neighbours are not {k} item ids")
    return ids


class _Ids(Sequence):
    """A row's neighbour ids, parsed (and checked) on first use (a reader that knows their numbers never needs them)."""

    __slots__ = ("_raw", "_at", "_k", "_ids")

    def __init__(self, raw: bytes, at: int, k: int):
        self._raw, self._at, self._k, self._ids = raw, at, k, None

    def __len__(self) -> int:
        return self._k

    def __getitem__(self, i):
        if self._ids is None:
            self._ids = _ids(orjson.loads(memoryview(self._raw)[self._at:]), self._k)
        return self._ids[i]


_COUNTS = ("pop", "total", "pair_total")
_NO_NUMBERS = np.zeros(0, np.int64)
_NO_NUMBERS.flags.writeable = False
_COUNTS_RAW = _COUNTS + ("raw_pop", "raw_total", "raw_pair_total")


@njit(cache=True, nogil=True)
def _sound(values, numbers, private, k, limit):  # pragma: no cover - compiled; tested through decode_row
    """Whether every value is a number from 0 to ``limit`` (NaN is not), no number is negative and every private
    position is one of the ``k``: one pass."""
    for x in values:
        if not (0.0 <= x <= limit):
            return False
    for j in numbers:
        if j < 0:
            return False
    for j in private:
        if not 0 <= j < k:
            return False
    return True


def _positions(private: object) -> np.ndarray:
    """The ``private`` list as int64s (empty when absent); a ValueError for what is not a list of integers."""
    if type(private) is not list:
        raise ValueError("the row's 'private' is not a list of positions in the row")
    if not private:
        return _NO_NUMBERS
    try:
        out = np.array(private)
    except (ValueError, TypeError, OverflowError):
        out = None
    if out is None or out.dtype != np.int64 or out.ndim != 1:  # (floats, strings, lists, ints past int64)
        raise ValueError("the row's 'private' is not a list of positions in the row")
    return out


def _check_head(head: object) -> None:
    """A ValueError unless ``head`` is a row's head as :func:`encode_row` writes it: ``item_id`` an item id,
    ``t`` a time within :data:`MAX_STORED_TS`, the counts numbers from 0 to :data:`MAX_STORED_VALUE`,
    ``numbering`` null or a non-negative int64."""
    if type(head) is not dict:
        raise ValueError("the row's head is not a JSON object")
    item_id = head.get("item_id")
    if not (type(item_id) is str and 0 < len(item_id) <= MAX_ID_CHARS):
        raise ValueError("the row's 'item_id' is not an item id")
    t = head.get("t")
    if type(t) not in (int, float) or not abs(t) <= MAX_STORED_TS:  # (not <=: NaN too)
        raise ValueError(f"the row's 't' is not a finite number within {MAX_STORED_TS:g}")
    counts = [head.get(c) for c in (_COUNTS_RAW if "raw_pop" in head else _COUNTS)]
    if not (all(type(v) in (int, float) for v in counts) and min(counts) >= 0 and max(counts) <= MAX_STORED_VALUE
            and sum(counts) == sum(counts)):  # (min and max can step over a NaN; their sum cannot)
        raise ValueError(f"the row's counts ({', '.join(_COUNTS)}) are not numbers from 0 to {MAX_STORED_VALUE:g}")
    numbering = head.get("numbering")
    if numbering is not None and not (type(numbering) is int and 0 <= numbering < 1 << 63):
        raise ValueError("the row's 'numbering' is not a non-negative int64")


def decode_row(raw: bytes) -> dict:
    """The row of :func:`encode_row`'s bytes; a ValueError for bytes that are not such a row (another writer's
    value at the key): every head field, value and number is checked, so a row decoded here loads
    (:meth:`infogap.models.engine.Engine.load_rows`) without an error, and ranks with finite scores."""
    n = int.from_bytes(raw[:4], "big")
    row = orjson.loads(raw[4: 4 + n])
    _check_head(row)
    at = 4 + n
    if "k" not in row:  # written before numbers (ids in the head): read as it was written
        if (len(raw) - at) % 40:
            raise ValueError("the row's values are not 5 rows of float64s")
        body = np.frombuffer(raw, np.float64, offset=at).reshape(5, -1)
        k = body.shape[1]
        row["neighbours"] = _ids(row.get("neighbours"), k)
    else:
        k = row.pop("k")
        n_rows = 6 if "raw_pop" in row else 5  # (raw counts: written since lift is computed on them)
        if not (type(k) is int and 0 <= k and 8 * (n_rows + 1) * k <= len(raw) - at):
            raise ValueError("the row's 'k' is not its number of neighbours")
        body = np.frombuffer(raw, np.float64, count=n_rows * k, offset=at).reshape(n_rows, k)
        if n_rows == 6:
            row["neighbour_raw_pop"] = body[5]
        row["numbers"] = np.frombuffer(raw, np.int64, count=k, offset=at + 8 * n_rows * k)
        at += 8 * (n_rows + 1) * k
        row["numbering"] = row.get("numbering")
        row["neighbours"] = (_Ids(raw, at, k) if row["numbering"] is not None
                             else _ids(orjson.loads(memoryview(raw)[at:]), k))
    private = _positions(row.get("private", []))
    if not _sound(body.ravel(), row.get("numbers", _NO_NUMBERS), private, k, MAX_STORED_VALUE):
        raise ValueError(f"the row has values that are not numbers from 0 to {MAX_STORED_VALUE:g} (sums of positive "
                         f"weights), negative neighbour numbers or private positions outside it")
    row["private"] = private
    row["values"], row["neighbour_pop"] = body[:4], body[4]
    return row
