"""Neighbour rows as the item stage publishes them and the user stages read them: a JSON head, the values
as float64s, the neighbours' numbers as int64s, and their ids as JSON (:func:`encode_row`, :func:`decode_row`)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson


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


class _Ids(Sequence):
    """A row's neighbour ids, parsed on first use (a reader that knows their numbers never needs them)."""

    __slots__ = ("_raw", "_at", "_k", "_ids")

    def __init__(self, raw: bytes, at: int, k: int):
        self._raw, self._at, self._k, self._ids = raw, at, k, None

    def __len__(self) -> int:
        return self._k

    def __getitem__(self, i):
        if self._ids is None:
            self._ids = orjson.loads(memoryview(self._raw)[self._at:])
        return self._ids[i]


def decode_row(raw: bytes) -> dict:
    n = int.from_bytes(raw[:4], "big")
    row = orjson.loads(raw[4: 4 + n])
    at = 4 + n
    if "k" not in row:  # written before numbers (ids in the head): read as it was written
        body = np.frombuffer(raw, np.float64, offset=at).reshape(5, -1)
        row["values"], row["neighbour_pop"] = body[:4], body[4]
        return row
    k = row.pop("k")
    private = np.asarray(row.get("private", ()), np.int64).ravel()  # (a row not an item stage's: a ValueError)
    if private.size and not (private.min() >= 0 and private.max() < k):
        raise ValueError("private positions outside the row")
    row["private"] = private
    n_rows = 6 if "raw_pop" in row else 5  # (raw counts: written since lift is computed on them)
    body = np.frombuffer(raw, np.float64, count=n_rows * k, offset=at).reshape(n_rows, k)
    row["values"], row["neighbour_pop"] = body[:4], body[4]
    if n_rows == 6:
        row["neighbour_raw_pop"] = body[5]
    row["numbers"] = np.frombuffer(raw, np.int64, count=k, offset=at + 8 * n_rows * k)
    at += 8 * (n_rows + 1) * k
    row["neighbours"] = _Ids(raw, at, k) if row["numbering"] is not None else orjson.loads(memoryview(raw)[at:])
    return row
