"""A compiled hash map from non-negative ``int64`` keys to ``int64`` values: the co-occurrence slot index.

Open addressing with linear probing in a power-of-two table kept at most half full, Fibonacci
hashing of the key, and deletion by shifting the following entries back (no tombstones, so probe
chains stay short however many slots come and go). The arrays live in the :class:`SlotTable`; the
``njit`` functions here operate on them, so compiled kernels (``infogap.models.cooccurrence``) look up,
insert and delete without calling back into Python. One entry costs 16 bytes at 50-100 % headroom,
against ~100 for a Python ``dict`` of ints.

An entry's key and value sit side by side (``table[i] = (key, value)``): the index is far larger
than the caches and its lookups land anywhere, so a found key's value is then in the same cache line
(with separate key and value arrays a lookup missed the cache twice).
"""
from __future__ import annotations

import numpy as np
from numba import njit

EMPTY = -1
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: ``meta`` fields: live entries, and 64 - log2(table size) (the hash's shift)
COUNT, SHIFT = 0, 1


@njit(cache=True, nogil=True)
def home_slot(key, shift):  # pragma: no cover - compiled
    """Fibonacci hash: the top ``64 - shift`` bits of ``key * GOLDEN`` (also the co-occurrence door's hash)."""
    return np.int64((np.uint64(key) * GOLDEN) >> np.uint64(shift))


@njit(cache=True, nogil=True)
def find(table, meta, key):  # pragma: no cover - compiled; tested through SlotTable
    """The value of ``key``, or -1."""
    mask = table.shape[0] - 1
    i = home_slot(key, meta[SHIFT])
    while True:
        k = table[i, 0]
        if k == key:
            return table[i, 1]
        if k == EMPTY:
            return -1
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def insert(table, meta, key, val):  # pragma: no cover - compiled
    """Set ``key`` to ``val`` (the caller keeps the table at most half full: :meth:`SlotTable.reserve`)."""
    mask = table.shape[0] - 1
    i = home_slot(key, meta[SHIFT])
    while True:
        k = table[i, 0]
        if k == EMPTY:
            table[i, 0] = key
            table[i, 1] = val
            meta[COUNT] += 1
            return
        if k == key:
            table[i, 1] = val
            return
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def delete(table, meta, key):  # pragma: no cover - compiled
    """Remove ``key`` if present; entries after it in its probe run move back into the gap."""
    mask = table.shape[0] - 1
    shift = meta[SHIFT]
    i = home_slot(key, shift)
    while table[i, 0] != key:
        if table[i, 0] == EMPTY:
            return
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        k = table[j, 0]
        if k == EMPTY:
            break
        h = home_slot(k, shift)
        # the entry at j may fill the gap at i unless its home lies cyclically in (i, j]
        if (i <= j and (h <= i or h > j)) or (i > j and h <= i and h > j):
            table[i, 0] = k
            table[i, 1] = table[j, 1]
            i = j
    table[i, 0] = EMPTY
    meta[COUNT] -= 1


@njit(cache=True, nogil=True)
def _rehash(table, new_table, meta):  # pragma: no cover - compiled
    meta[COUNT] = 0
    for i in range(table.shape[0]):
        if table[i, 0] != EMPTY:
            insert(new_table, meta, table[i, 0], table[i, 1])


@njit(cache=True, nogil=True)
def _insert_many(table, meta, ks, vs):  # pragma: no cover - compiled
    for j in range(ks.size):
        insert(table, meta, ks[j], vs[j])


@njit(cache=True, nogil=True)
def _delete_many(table, meta, ks):  # pragma: no cover - compiled
    for j in range(ks.size):
        delete(table, meta, ks[j])


class SlotTable:
    """``int64 -> int64`` map in numpy arrays for compiled code (keys must be >= 0).

    Examples
    --------
    >>> t = SlotTable()
    >>> t.insert_many(np.array([5, 1 << 40]), np.array([0, 7]))
    >>> t.get(1 << 40), t.get(6), len(t)
    (7, -1, 2)
    >>> t.delete_many(np.array([5])); t.get(5), sorted(t.live_keys().tolist())
    (-1, [1099511627776])
    """

    def __init__(self, capacity: int = 512):
        size = 16
        while size < 2 * capacity:
            size *= 2
        #: ``table[i] = (key, value)``, key EMPTY when the entry is free
        self.table = np.full((size, 2), EMPTY, np.int64)
        self.meta = np.array([0, 64 - size.bit_length() + 1], np.int64)

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a table pickled as separate ``keys`` and ``vals`` arrays (older snapshots)."""
        if "table" not in state:
            state["table"] = np.ascontiguousarray(np.stack([state.pop("keys"), state.pop("vals")], axis=1))
        self.__dict__.update(state)

    @classmethod
    def from_arrays(cls, table: np.ndarray, meta: np.ndarray, where: str = "slot table") -> SlotTable:
        """A table from its two arrays as a snapshot holds them, checked so that the compiled probes
        stay inside it: a power-of-two size at most half full, the shift that size gives, and the count
        of the keys held.

        >>> t = SlotTable(); t.insert_many(np.array([3]), np.array([9]))
        >>> SlotTable.from_arrays(t.table, t.meta).get(3)
        9
        """
        from infogap.models.state_fields import StateError  # a leaf module: imported where snapshots are read

        ok = (isinstance(table, np.ndarray) and isinstance(meta, np.ndarray) and table.dtype == np.int64
              and meta.dtype == np.int64 and table.ndim == 2 and table.shape[1] == 2 and meta.shape == (2,))
        size = table.shape[0] if ok else 0
        ok = ok and size >= 16 and size & (size - 1) == 0 and int(meta[SHIFT]) == 64 - size.bit_length() + 1
        if ok:
            live = table[:, 0] != EMPTY
            ok = int(meta[COUNT]) == int(live.sum()) and 2 * int(meta[COUNT]) <= size and bool(
                (table[live, 0] >= 0).all())
        if not ok:
            raise StateError(f"{where}: not a slot table (size, shift or count do not fit)")
        t = cls.__new__(cls)
        t.table, t.meta = np.ascontiguousarray(table), np.ascontiguousarray(meta)
        return t

    def __len__(self) -> int:
        return int(self.meta[COUNT])

    def reserve(self, n_new: int) -> None:
        """Grow (doubling) so that ``n_new`` more keys keep the table at most half full."""
        size = self.table.shape[0]
        need = int(self.meta[COUNT]) + n_new
        if 2 * need <= size:
            return
        while 2 * need > size:
            size *= 2
        table = np.full((size, 2), EMPTY, np.int64)
        self.meta[SHIFT] = 64 - size.bit_length() + 1
        _rehash(self.table, table, self.meta)
        self.table = table

    def get(self, key: int) -> int:
        """The value of ``key``, or -1."""
        return int(find(self.table, self.meta, key))

    def insert_many(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.reserve(len(keys))
        _insert_many(self.table, self.meta, np.asarray(keys, np.int64), np.asarray(vals, np.int64))

    def delete_many(self, keys: np.ndarray) -> None:
        _delete_many(self.table, self.meta, np.asarray(keys, np.int64))

    def live_keys(self) -> np.ndarray:
        """Every key held (in table order)."""
        keys = self.table[:, 0]
        return keys[keys != EMPTY]
