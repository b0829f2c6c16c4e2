"""Incremental, decayed item-item co-occurrence with bounded memory and association rules.

Each item owns one row of ``n_neighbours`` (M) slots in preallocated numpy arrays: ``nb[n_items, M]``
(neighbour row, -1 when free) and ``vals[4, n_items * M]`` holding per slot the directional weight,
the symmetric weight, the decayed pair count and the raw number of observations. An event of a
user pairs the new item with the user's last ``window`` items; every pair updates two slots:

- row ``prev``, neighbour ``cur``: the *directional* weight ("prev then cur") and the symmetric one;
- row ``cur``, neighbour ``prev``: the symmetric weight only.

The k-th previous item (k = 1 is the newest) weighs ``dir_decay ** (k - 1)`` (only within
``dir_window``) and ``sym_decay ** (k - 1)``; pairs far apart in time weigh less, by
``gap_floor + (1 - gap_floor) / (1 + gap / gap_tau_s)``; the weaker event type of the two caps
the weight. Besides these scoring weights each slot keeps the association-rule figures: the
unweighted decayed pair count (support) and the raw number of observations (how many users,
as a user's window holds an item once per visit). With the admission door on, a pair's first
sighting only opens the door, so both count from the second sighting (a conservative figure).

**Lift** is computed on raw counts, as the "N times" of a reason is: ``C_ab N² / (2 P c_a c_b)``
with ``C_ab`` the pair's observations, ``c`` the items' occurrences, ``N`` all occurrences and ``P``
all pair observations (:func:`pair_lift`). On decayed counts it drifted up for pairs whose items had
both gone quiet (the pair and item counts decay, the totals follow recent activity: lifts of 10^7
under a 7-day half-life). State from before the raw counts (``raw_pair_total`` NaN) keeps the
decayed figure.

**Decay** is exponential with ``half_life_days`` in event time, applied lazily: values are stored
relative to a reference time ``t0`` (``w * exp(lambda * (t - t0))``) so that an update is one
addition and values of different ages compare directly; reading multiplies by
``exp(-lambda * (now - t0))``, which is ``w * exp(-lambda * (now - t))``. The owner renormalises
(:meth:`CoOccurrence.rescale`) long before the exponent can overflow.

**Bounded memory.** A full row that must take a new neighbour first evicts its weakest
``evict_fraction`` of slots (by their damped scoring weights, as the ranker sees them), so memory
is ``O(n_items * M)`` plus a compiled hash index of the live slots (:mod:`infogap.models.slot_table`),
whatever the number of distinct pairs. A pair's first sighting only opens an admission "door" (a
fixed-size bit array), so one-off pairs do not push real neighbours out. A compiled kernel applies
the updates one by one in event order, so a batch gives exactly the state of the same events one at
a time.

**Privacy floor.** Each slot also keeps a 64-bit user bitmap (``users``): every update ORs in its user's bit
(:mod:`infogap.models.privacy`). A slot whose bitmap shows fewer than ``min_users`` users is not published
(:meth:`CoOccurrence.published` leaves it out, a read-side copy gets it marked private, and a reason never cites
it). Whether it *votes* is a second setting, ``vote_min_users``: 1 (the engine's default: every pair ranks, as
ranking publishes no pair) or ``min_users`` (strict: a slot's ``sq``, what the ranker sums, stays 0 until its
``min_users``-th user). Eviction ranks a slot by its weights either way, so the floor changes what is
published and voted, never what is learned.

>>> co = CoOccurrence(n_neighbours=4, door_bits=0, capacity=4)
>>> co.ensure(3)
>>> co.update([code(0, 1), code(1, 0)], np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]))  # 0 then 1
>>> co.neighbours(0)[0].tolist(), co.neighbours(1)[0].tolist(), co.neighbours(1)[1].tolist()
([1], [0], [0.0])
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from infogap.models.slot_table import COUNT as LIVE_KEYS
from infogap.models.privacy import ALL_USERS, NO_USER, at_floor, floor_mask, mask
from infogap.models.slot_table import GOLDEN, SlotTable, delete, find, home_slot, insert
from infogap.models.state_fields import Array, StateError, array, put, take

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
_new = tuple.__new__  # a NamedTuple without its keyword-handling constructor (once per learned event)
#: Rows of ``vals`` (one contiguous array per quantity, so the ranker gathers only what it needs).
W_DIR, W_SYM, N_PAIR, COUNT = 0, 1, 2, 3
#: The admission door forgets its sightings each time a count passes a multiple of this: the learned
#: events of an engine that learns its pairs, the occurrences of a co-occurrence shard.
DOOR_PERIOD = 128 * 1024
#: What the update kernel stops for: a block for a row's first neighbour, room in the slot index.
_NEED_BLOCK, _NEED_ROOM = 1, 2


class SlotArrays(NamedTuple):
    """What the compiled slot update (``_update``) takes of a :class:`CoOccurrence`, in its order: the rows
    (``block`` per item, ``nb``/``vals``/``sq``/``users`` per slot, ``fill``/``free_pos``/``n_free`` per block), the
    slot index (``table``, ``meta``), the admission door, the eviction settings and the privacy floor."""

    block: np.ndarray
    nb: np.ndarray
    vals: np.ndarray
    sq: np.ndarray
    users: np.ndarray
    fill: np.ndarray
    free_pos: np.ndarray
    n_free: np.ndarray
    table: np.ndarray
    meta: np.ndarray
    door: np.ndarray
    door_bits: int
    n_evict: int
    evict_sym_weight: float
    vote_min_users: int


def code(row: int, col: int) -> int:
    """The dict key of slot (row, neighbour col)."""
    return (row << _SHIFT) | col


class CoOccurrence:
    """Top-M decayed neighbours per item with directional and symmetric weights.

    Parameters
    ----------
    n_neighbours
        M, slots per item row (the memory bound).
    half_life_days
        Half-life of the pair weights and item occurrence counts, in days of event time.
    evict_fraction
        Share of a full row's slots freed at once when a new neighbour arrives.
    pop_exponent
        ``e`` of the popularity normaliser ``ipop = pop ** -e`` kept per item for the ranker.
    evict_sym_weight
        Eviction ranks slots by ``sqrt(w_dir) + evict_sym_weight * sqrt(w_sym)``, the way the
        ranker weighs them.
    door_bits
        Size (2 ** door_bits bits) of the admission "doorkeeper": a pair gets a slot only when it
        is seen again after a first sighting (0 admits every pair at once). Most pairs are seen
        once; keeping them out of the rows avoids evicting real neighbours for noise.
    capacity
        Initial number of item rows (grown with :meth:`ensure`).
    min_users
        The privacy floor: a slot is published only once this many distinct users (by their bits,
        :mod:`infogap.models.privacy`) made it; 1 is no floor.
    floor_votes
        Whether a slot also votes only from then (strict); by default every slot votes.

    Examples
    --------
    >>> co = CoOccurrence(n_neighbours=8, door_bits=0)
    >>> co.ensure(3)
    >>> co.update([code(0, 1), code(1, 0), code(0, 2), code(2, 0)], np.ones((4, 4)))
    >>> co.add_occurrences([0, 1, 2], [1.0, 1.0, 1.0])
    >>> nb = co.pair(0, 1)
    >>> nb["count"], round(nb["support"], 3), round(nb["confidence"], 3), round(nb["lift"], 3)
    (1, 1.0, 1.0, 2.25)
    """

    def __init__(self, n_neighbours: int = 100, half_life_days: float | None = 60.0,
                 evict_fraction: float = 0.25, pop_exponent: float = 0.2, door_bits: int = 22,
                 evict_sym_weight: float = 0.5, capacity: int = 1024, indexed: bool = True, min_users: int = 1,
                 floor_votes: bool = False):
        if n_neighbours < 2:
            raise ValueError(f"n_neighbours must be >= 2, got {n_neighbours}")
        if not 0.0 < evict_fraction < 1.0:
            raise ValueError(f"evict_fraction must be in (0, 1), got {evict_fraction}")
        self.n_neighbours = n_neighbours
        self.half_life_days = half_life_days
        self.evict_fraction = evict_fraction
        self.pop_exponent = pop_exponent
        self.door_bits = door_bits
        self.evict_sym_weight = evict_sym_weight
        self.capacity = capacity
        self.min_users = max(int(min_users), 1)
        #: the floor on votes: 1 (every slot votes) or ``min_users`` (``floor_votes``)
        self.vote_min_users = self.min_users if floor_votes else 1
        self._door = np.zeros(1 << door_bits if door_bits else 0, bool)
        self.lam = 0.0 if not half_life_days else math.log(2.0) / (half_life_days * 86400.0)
        m = n_neighbours
        cap = max(int(capacity), 1)
        #: item row -> its block of M slots in nb/vals/sq; 0 = none yet (block 0 is always empty)
        self.block = np.zeros(cap, np.int32)
        blocks = 1 + min(cap, 256)
        self.nb = np.full((blocks, m), -1, np.int32)
        self.vals = np.zeros((4, blocks * m))
        self.sq = np.zeros((2, blocks * m))  # sqrt of the two scoring weights, for the ranker (0 below the vote floor)
        self.users = np.zeros(blocks * m, np.uint64)  # per slot: the bits of the users who made it
        self.fill = np.zeros(blocks, np.int64)  # high-water mark of each block
        self._n_evict = min(m - 1, max(1, int(round(m * evict_fraction))))
        #: per block: the positions its last eviction freed, taken from the end (lowest first)
        self.free_pos = np.zeros((blocks, self._n_evict), np.int32)
        self.n_free = np.zeros(blocks, np.int64)
        self._n_blocks = 1
        self._spare: list[int] = []  # blocks of cleared rows, reused first
        self.pop = np.zeros(cap)
        self.ipop = np.ones(cap)
        self.total = 0.0
        self.pair_total = 0.0
        #: raw (undecayed) occurrences per item, all occurrences, and all pair observations, for lift; the
        #: pair observations are counted by whoever accounts for pairs (the engine, or a shard from the
        #: occurrences), not by :meth:`update`, which a shard calls with the slots it owns only
        self.raw_pop = np.zeros(cap)
        self.raw_total = 0.0
        self.raw_pair_total = 0.0
        #: read-side copies: the event time each item's popularity (and the totals) is as of
        self.pop_at = np.full(cap, -np.inf)
        self.totals_at = -math.inf
        self.n_items = 0
        #: (row << 32 | neighbour) -> slot of every live pair; what learning needs to find a pair's slot.
        #: None in a read-side copy (``indexed=False``), whose rows are only ever replaced whole
        #: (:meth:`set_row`): keeping an index of them was a quarter of a stream worker's row loading.
        self._index = SlotTable() if indexed else None

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a snapshot from before the compiled index (a ``_slot`` dict, ``_free`` lists)."""
        slot = state.pop("_slot", None)
        if slot is not None:
            free = state.pop("_free")
            state.pop("_col_off", None)
            blocks, n_evict = len(state["fill"]), state["_n_evict"]
            state["fill"] = np.asarray(state["fill"], np.int64)
            state["free_pos"] = np.zeros((blocks, n_evict), np.int32)
            state["n_free"] = np.zeros(blocks, np.int64)
            for b, positions in free.items():  # descending: the lowest is taken first, from the end
                state["free_pos"][b, :len(positions)] = positions
                state["n_free"][b] = len(positions)
            state["_index"] = SlotTable(len(slot))
            state["_index"].insert_many(np.fromiter(slot.keys(), np.int64, len(slot)),
                                        np.fromiter(slot.values(), np.int64, len(slot)))
        if "raw_pop" not in state:  # from before raw counts: its slots' counts have no raw totals to go with
            state["raw_pop"] = np.zeros(len(state["pop"]))
            state["raw_total"], state["raw_pair_total"] = 0.0, math.nan
        if "users" not in state:  # from before the privacy floor: no user known (its weights kept, no floor yet)
            state["users"] = np.zeros(state["sq"].shape[1], np.uint64)
            state["min_users"] = 1
        state.setdefault("vote_min_users", 1)  # (from before the floor: no floor)
        self.__dict__.update(state)

    #: what a snapshot holds (:mod:`infogap.models.state_fields`); the slot index goes apart, as its two arrays
    STATE = {"n_neighbours": int, "half_life_days": (float, type(None)), "evict_fraction": float,
             "pop_exponent": float, "door_bits": int, "evict_sym_weight": float, "capacity": int,
             "_door": Array(np.dtype(bool), 1), "lam": float, "block": Array(np.dtype(np.int32), 1),
             "nb": Array(np.dtype(np.int32), 2), "vals": Array(np.dtype(np.float64), 2),
             "sq": Array(np.dtype(np.float64), 2), "users": Array(np.dtype(np.uint64), 1), "min_users": int,
             "vote_min_users": int, "fill": Array(np.dtype(np.int64), 1), "_n_evict": int,
             "free_pos": Array(np.dtype(np.int32), 2), "n_free": Array(np.dtype(np.int64), 1), "_n_blocks": int,
             "_spare": list, "pop": Array(np.dtype(np.float64), 1), "ipop": Array(np.dtype(np.float64), 1),
             "total": float, "pair_total": float, "raw_pop": Array(np.dtype(np.float64), 1), "raw_total": float,
             "raw_pair_total": float, "pop_at": Array(np.dtype(np.float64), 1), "totals_at": float,
             "n_items": int}

    def to_state(self) -> dict:
        """The rows, popularity and slot index as a plain tree (see :meth:`from_state`)."""
        out = take(self, self.STATE)
        out["index"] = None if self._index is None else [self._index.table, self._index.meta]
        return out

    @classmethod
    def from_state(cls, state, arrays=(), where: str = "co-occurrence") -> CoOccurrence:
        """Rebuild from :meth:`to_state`, refusing a state whose arrays do not fit together (the compiled
        loops index them unchecked).

        >>> co = CoOccurrence(n_neighbours=4, door_bits=0)
        >>> co.ensure(2); co.update(np.array([code(0, 1)]), np.array([[1.0, 1.0, 1.0, 1.0]]))
        >>> back = CoOccurrence.from_state(co.to_state())
        >>> back.neighbours(0)[0].tolist() == co.neighbours(0)[0].tolist(), len(back._index)
        (True, 1)

        A state from before the privacy floor (no ``users``) is read with empty bitmaps and no floor: the
        owner then sets its floor (:meth:`set_floor`), and its slots are published (and, under ``floor_votes``,
        vote) again only once they have that many users seen since (conservative).
        """
        old = isinstance(state, dict) and "users" not in state and "min_users" not in state
        drop = ("users", "min_users", "vote_min_users") if old else ()
        co = put(cls.__new__(cls), state, {k: v for k, v in cls.STATE.items() if k not in drop}, where, arrays)
        if old:
            co.users = np.zeros(co.sq.shape[1] if co.sq.ndim == 2 else 0, np.uint64)
            co.min_users = co.vote_min_users = 1
        index = state.get("index")
        if index is None:
            co._index = None
        else:
            if not isinstance(index, list) or len(index) != 2:
                raise StateError(f"{where}: field 'index' must be [table, meta]")
            co._index = SlotTable.from_arrays(array(index[0], arrays), array(index[1], arrays), where)
        m, blocks, cap = co.n_neighbours, co.nb.shape[0], co.block.shape[0]
        shapes_ok = (co.nb.shape[1] == m and co.vals.shape == (4, blocks * m) and co.sq.shape == (2, blocks * m)
                     and co.users.shape == (blocks * m,) and co.min_users >= 1
                     and co.vote_min_users in (1, co.min_users)
                     and co.fill.shape == co.n_free.shape == (blocks,) and co.free_pos.shape == (blocks, co._n_evict)
                     and all(a.shape == (cap,) for a in (co.pop, co.ipop, co.raw_pop, co.pop_at))
                     and 0 <= co.door_bits <= 30 and co._door.shape == ((1 << co.door_bits if co.door_bits else 0),)
                     and 0 < co._n_evict < m and 0 < co._n_blocks <= blocks and 0 <= co.n_items <= cap)
        values_ok = shapes_ok and bool(
            (co.block.size == 0 or (co.block.min() >= 0 and co.block.max() < blocks))
            and (co.nb.size == 0 or (co.nb.min() >= -1 and co.nb.max() < cap))
            and (co.fill.size == 0 or (co.fill.min() >= 0 and co.fill.max() <= m))
            and (co.n_free.size == 0 or (co.n_free.min() >= 0 and co.n_free.max() <= co._n_evict))
            and (co.free_pos.size == 0 or (co.free_pos.min() >= 0 and co.free_pos.max() < m))
            and all(type(b) is int and 0 < b < blocks for b in co._spare))
        if not values_ok:
            raise StateError(f"{where}: the arrays' shapes or values do not fit together")
        return co

    # ------------------------------------------------------------------ storage
    def ensure(self, n_items: int) -> None:
        """Make room for ``n_items`` items (their slot blocks are taken when a row gets its first neighbour)."""
        self.n_items = max(self.n_items, n_items)
        cap = self.block.shape[0]
        if n_items <= cap:
            return
        new = max(n_items, 2 * cap)
        self.block = np.r_[self.block, np.zeros(new - cap, np.int32)]
        self.pop = np.r_[self.pop, np.zeros(new - cap)]
        self.ipop = np.r_[self.ipop, np.ones(new - cap)]
        self.pop_at = np.r_[self.pop_at, np.full(new - cap, -np.inf)]
        self.raw_pop = np.r_[self.raw_pop, np.zeros(new - cap)]

    def _block_for(self, r: int) -> int:
        """Row ``r``'s block, taken now if it has none (blocks are numbered in order of first need)."""
        b = int(self.block[r])
        if b:
            return b
        if self._spare:
            b = self._spare.pop()
        else:
            b = self._n_blocks
            if b >= self.nb.shape[0]:
                self.reserve_blocks(2 * self.nb.shape[0])
            self._n_blocks = b + 1
        self.block[r] = b
        return b

    def reserve_blocks(self, n_rows: int) -> None:
        """Room for ``n_rows`` rows with neighbours, allocated now in one step.

        Rows take their slot blocks as they get their first neighbour, and the block arrays double
        when full: each doubling copies every row held (~85 MB at 4,000 rows of 400 neighbours), in
        one step of whoever is adding a row. A read-side copy bounded by a cache reserves its bound
        once instead. New slots are allocated zeroed, so memory is only touched as rows are written.

        >>> co = CoOccurrence(n_neighbours=4, capacity=2)
        >>> co.reserve_blocks(1000); co.nb.shape
        (1001, 4)
        """
        cap, new, m = self.nb.shape[0], n_rows + 1, self.n_neighbours  # (block 0 stays empty)
        if new <= cap:
            return
        nb = np.full((new, m), -1, np.int32)
        nb[:cap] = self.nb
        vals = np.zeros((4, new * m))
        vals[:, :cap * m] = self.vals
        sq = np.zeros((2, new * m))
        sq[:, :cap * m] = self.sq
        users = np.zeros(new * m, np.uint64)
        users[:cap * m] = self.users
        free_pos = np.zeros((new, self._n_evict), np.int32)
        free_pos[:cap] = self.free_pos
        self.nb, self.vals, self.sq, self.users, self.free_pos = nb, vals, sq, users, free_pos
        self.fill = np.r_[self.fill, np.zeros(new - cap, np.int64)]
        self.n_free = np.r_[self.n_free, np.zeros(new - cap, np.int64)]

    def rescale(self, factor: float) -> None:
        """Multiply every decayed quantity by ``factor`` (moving the reference time)."""
        self.vals[:N_PAIR + 1] *= factor
        self.sq *= math.sqrt(factor)
        self.pop *= factor
        self.ipop *= factor ** -self.pop_exponent
        self.total *= factor
        self.pair_total *= factor

    def set_floor(self, min_users: int, floor_votes: bool = False) -> None:
        """Take the privacy floor ``min_users`` (1: none) on what is published, and on the votes (``sq``) too
        when ``floor_votes``; every slot follows it from now on.

        >>> co = CoOccurrence(n_neighbours=4, door_bits=0); co.ensure(2)
        >>> co.update([code(0, 1)], np.ones((1, 4)), np.array([0], np.uint8))  # one pair, by the user of bit 0
        >>> co.sq[:, co.block[0] * 4].tolist(), co.published(0, 1)[0].tolist()
        ([1.0, 1.0], [1])
        >>> co.set_floor(2); co.sq[:, co.block[0] * 4].tolist(), co.published(0, 1)[0].tolist()  # votes, unpublished
        ([1.0, 1.0], [])
        >>> co.set_floor(2, floor_votes=True); co.sq[:, co.block[0] * 4].tolist()
        [0.0, 0.0]
        """
        min_users = max(int(min_users), 1)
        vote_min_users = min_users if floor_votes else 1
        self.min_users = min_users
        if vote_min_users == self.vote_min_users:
            return
        self.vote_min_users = vote_min_users
        mature = (self.nb.ravel() >= 0) & floor_mask(self.users, vote_min_users)
        self.sq[0] = np.where(mature, np.sqrt(self.vals[W_DIR]), 0.0)
        self.sq[1] = np.where(mature, np.sqrt(self.vals[W_SYM]), 0.0)

    @property
    def n_slots(self) -> int:
        """Number of live (item, neighbour) slots."""
        return len(self._index) if self._index is not None else int(np.count_nonzero(self.nb >= 0))

    # ------------------------------------------------------------------ learning
    def add_occurrences(self, rows: list[int], scaled: list[float]) -> None:
        """Count item occurrences (``scaled`` = exp(lambda (t - t0)) per event), in order (:func:`count_occurrence`)."""
        self.total = _count_occurrences(np.asarray(rows, np.int64), np.asarray(scaled, np.float64), self.pop, self.ipop,
                                        self.raw_pop, float(self.total), -float(self.pop_exponent))
        self.raw_total += len(rows)

    def update(self, codes, deltas: np.ndarray, bits: np.ndarray | None = None) -> None:
        """Apply slot updates in order: slot ``codes[j]`` gains ``deltas[j]`` (w_dir, w_sym, n_pair, count) and
        its bitmap the bit ``bits[j]`` of the user who made it (uint8, 0..63, :func:`infogap.models.privacy.user_bit`;
        :data:`~infogap.models.privacy.NO_USER` or None: no user known).

        New neighbours take a free slot (after the admission door, when on); a row that is full when
        a new neighbour arrives first evicts its weakest slots. One compiled pass applies the updates
        one by one, so a batch gives exactly the state of the same updates one at a time.
        """
        u = len(codes)
        if u == 0:
            return
        self.slot_arrays()  # (refuses a read-side copy)
        codes = np.asarray(codes, np.int64)
        deltas = np.ascontiguousarray(deltas, np.float64)
        bits = np.full(u, NO_USER, np.uint8) if bits is None else np.ascontiguousarray(bits, np.uint8)
        self.finish_update(codes, deltas, bits, 0, self.pair_total, 0)

    def slot_arrays(self) -> SlotArrays:
        """The rows and their index as the compiled slot update takes them (``RuntimeError`` for a read-side
        copy, which has no index and does not learn pairs).

        >>> co = CoOccurrence(n_neighbours=4, door_bits=3)
        >>> s = co.slot_arrays(); s.nb is co.nb, s.door.size, s.n_evict
        (True, 8, 1)
        """
        index = self._index
        if index is None:
            raise RuntimeError("a read-side copy (indexed=False) takes rows with set_row; it does not learn pairs")
        return _new(SlotArrays, (self.block, self.nb, self.vals, self.sq, self.users, self.fill, self.free_pos,
                                 self.n_free, index.table, index.meta, self._door, self.door_bits, self._n_evict,
                                 self.evict_sym_weight, self.vote_min_users))

    def finish_update(self, codes: np.ndarray, deltas: np.ndarray, bits: np.ndarray, k: int, pt: float,
                      need: int) -> None:
        """Go on with slot updates from ``k`` (``pt``: the pair total so far; ``bits``: each update's user bit)
        after what stopped the compiled update (``need``: a block for a row, room in the index; 0 when
        nothing did), to the end."""
        index = self._index
        while k < codes.size:
            if need == _NEED_BLOCK:  # the row's first neighbour: take its block, go on
                self._block_for(int(codes[k] >> _SHIFT))
            elif need == _NEED_ROOM:  # the index is half full: double it (at the same points whatever the batching)
                index.reserve(1)
            k, pt, need = _update(codes, deltas, bits, k, pt, *self.slot_arrays())
        self.pair_total = pt

    def reset_door(self) -> None:
        """Forget which pairs were sighted once (called at fixed points of the event count).

        Pairs that hold a slot stay marked, so a pair evicted later is re-admitted at once, as
        it would have been without the reset.
        """
        if self.door_bits and self._index is not None:
            self._door[:] = False
            live = self._index.live_keys()
            self._door[((live.astype(np.uint64) * GOLDEN) >> np.uint64(64 - self.door_bits)).astype(np.int64)] = True

    def set_row(self, r: int, neighbours: np.ndarray, values: np.ndarray, factor: float = 1.0,
                private: np.ndarray | None = None) -> None:
        """Replace row ``r`` with given neighbours and their ``[4, K]`` values, the first three (the
        decaying ones) times ``factor`` into reference-time units.

        For a read-side copy of rows learned elsewhere (a sharded item stage): the row's slots are
        exactly these, in this order, and they all vote (a shard exports the slots that vote:
        :meth:`infogap.models.cooc_shard.CoOccurrenceShard.export_row`). Those at ``private`` positions are below
        the privacy floor where they were learned (no user bit here: never published nor cited); the others
        are taken as at it (every user bit set).
        """
        k = min(int(neighbours.size), self.n_neighbours)
        if not k or self._index is not None:  # slots are indexed by position: emptied first
            self.clear_row(r)
        if not k:
            return
        b = self._block_for(r)
        _write_row(self.nb, self.vals, self.sq, self.users, self.fill, self.n_free, b, neighbours, values, factor, k)
        if private is not None and private.size:
            self.users[b * self.n_neighbours + private[private < k]] = 0
        if self._index is not None:
            lo = b * self.n_neighbours
            self._index.insert_many((r << _SHIFT) | neighbours[:k].astype(np.int64), np.arange(lo, lo + k))

    def clear_row(self, r: int) -> None:
        """Empty row ``r`` and give its block back (its item's popularity stays)."""
        b = int(self.block[r])
        if not b:
            return
        f = self.fill[b]
        nb = self.nb[b, :f]
        if self._index is not None:
            self._index.delete_many((r << _SHIFT) | nb[nb >= 0].astype(np.int64))
        lo = b * self.n_neighbours
        self.nb[b, :f] = -1
        self.vals[:, lo: lo + f] = 0.0
        self.sq[:, lo: lo + f] = 0.0
        self.users[lo: lo + f] = 0
        self.fill[b] = 0
        self.n_free[b] = 0
        self.block[r] = 0
        self._spare.append(b)

    def set_popularity(self, rows: np.ndarray, pop: np.ndarray, total: float, pair_total: float,
                       at: float | np.ndarray = math.inf, raw: tuple[np.ndarray, float, float] | None = None) -> None:
        """Set items' decayed occurrence counts and the totals (reference-time units) as of event time
        ``at``, for a read-side copy: a value older than the one held is ignored (rows published at
        different times carry their neighbours' counts of that time).

        ``at`` may give each entry its own time, as when several rows' counts are set at once: the
        entries are then taken in turn, each if it is not older than what is held; the totals are as
        of the newest entry. ``raw``: the entries' raw occurrences, all occurrences and all pair
        observations (for lift), taken with them (None: a writer without raw counts; lifts of
        those items fall back to the decayed figures).

        >>> co = CoOccurrence(capacity=2)
        >>> co.ensure(2)
        >>> co.set_popularity(np.array([0, 1]), np.array([5.0, 3.0]), 8.0, 2.0, at=20.0)
        >>> co.set_popularity(np.array([1]), np.array([1.0]), 6.0, 1.0, at=10.0)  # older: ignored
        >>> co.pop.tolist(), co.total
        ([5.0, 3.0], 8.0)
        >>> co.set_popularity(np.array([1, 0, 1]), np.array([4.0, 6.0, 7.0]), 9.0, 3.0, at=np.array([30.0, 25.0, 21.0]))
        >>> co.pop.tolist(), co.total
        ([6.0, 4.0], 9.0)
        """
        at_entries = np.broadcast_to(np.asarray(at, np.float64), rows.shape)
        rows = np.asarray(rows, np.int64)
        raw_values = np.zeros(rows.shape) if raw is None else np.asarray(raw[0], np.float64)
        _set_popularity(self.pop, self.ipop, self.pop_at, self.raw_pop, rows, np.asarray(pop, np.float64),
                        raw_values, np.ascontiguousarray(at_entries), self.pop_exponent)
        at_totals = float(np.max(at, initial=-math.inf))
        if at_totals >= self.totals_at:
            self.total = total
            self.pair_total = pair_total
            self.raw_total, self.raw_pair_total = (0.0, 0.0) if raw is None else (float(raw[1]), float(raw[2]))
            self.totals_at = at_totals

    # ------------------------------------------------------------------ reading
    def published(self, r: int, min_support: int, eligible: np.ndarray | None = None):
        """Row ``r``'s neighbours backed by ``min_support`` observations and made by at least ``min_users`` users
        (the privacy floor), by cosine (best first, ties by row).

        Returns (neighbour rows, cosine, support, confidence, lift), support in reference-time units.
        """
        b = int(self.block[r])
        return _published(self.nb, self.vals, self.users, self.min_users, self.pop, self.raw_pop, b,
                          int(self.fill[b]), r, float(min_support), _ALL if eligible is None else eligible,
                          eligible is not None, *self.lift_scales())

    def slots(self, r: int, *, voting: bool = False, public: bool = False) -> np.ndarray:
        """Row ``r``'s live slots, in position order: all, or those that vote (``voting``: at ``vote_min_users``),
        or those at the privacy floor (``public``: at ``min_users``)."""
        b = int(self.block[r])
        lo = b * self.n_neighbours
        s = lo + np.flatnonzero(self.nb[b, :self.fill[b]] >= 0)
        k = self.min_users if public else self.vote_min_users if voting else 1
        return s[floor_mask(self.users[s], k)] if k > 1 else s

    def is_public(self, slots: np.ndarray) -> np.ndarray:
        """Per slot, whether it is at the privacy floor (may be published and cited)."""
        return floor_mask(self.users[slots], self.min_users)

    def neighbours(self, r: int, *, voting: bool = False, public: bool = False,
                   slots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row ``r``'s live slots (or ``slots`` of it; ``voting``, ``public``: as :meth:`slots`): (neighbour rows,
        w_dir, w_sym, n_pair, count), reference-time units."""
        s = self.slots(r, voting=voting, public=public) if slots is None else slots
        v = self.vals[:, s]
        return self.nb.ravel()[s], v[W_DIR], v[W_SYM], v[N_PAIR], v[COUNT]

    def pair(self, a: int, b: int, decay: float = 1.0) -> dict | None:
        """Association figures of "a with b" (``decay`` = exp(-lambda (now - t0))), or None."""
        if self._index is not None:
            s = self._index.get((a << _SHIFT) | b)
        else:  # a read-side copy: look along the row
            blk = int(self.block[a])
            at = np.flatnonzero(self.nb[blk, : self.fill[blk]] == b) if blk else ()
            s = blk * self.n_neighbours + int(at[0]) if len(at) else -1
        if s < 0:
            return None
        return self.figures(a, b, s, decay)

    def lift_scales(self) -> tuple[float, float]:
        """``N² / 2P`` on decayed counts and on raw counts, what :func:`pair_lift` takes: 0 when there are no
        pairs, and the raw one also for state without raw counts (``raw_pair_total`` NaN)."""
        dec, pt = self.total * self.total, self.pair_total
        raw, rpt = self.raw_total * self.raw_total, self.raw_pair_total
        return float(dec / (2.0 * pt) if pt > 0 else 0.0), float(raw / (2.0 * rpt) if rpt > 0 else 0.0)

    def lift(self, a, b, n_ab, count) -> np.ndarray:
        """Lift of pairs "a with b" (row arrays) with decayed and raw pair counts ``n_ab``, ``count``:
        :func:`pair_lift` of each (for the step-by-step references; the kernels call it themselves)."""
        pop, raw_pop, scales = self.pop, self.raw_pop, self.lift_scales()
        return np.array([pair_lift(c, n, pop[x], pop[y], raw_pop[x], raw_pop[y], *scales)
                         for x, y, n, c in zip(np.asarray(a).tolist(), np.asarray(b).tolist(),
                                               np.asarray(n_ab, np.float64).tolist(),
                                               np.asarray(count, np.float64).tolist())], np.float64)

    def figures(self, a: int, b: int, s: int, decay: float = 1.0) -> dict:
        """Support, confidence and lift of slot ``s`` (row ``a``, neighbour ``b``)."""
        v = self.vals[:, s]
        n_ab = float(v[N_PAIR])
        n_a = float(self.pop[a])
        conf = n_ab / n_a if n_a > 0 else 0.0
        lift = float(pair_lift(float(v[COUNT]), n_ab, n_a, float(self.pop[b]), float(self.raw_pop[a]),
                               float(self.raw_pop[b]), *self.lift_scales()))
        return {"count": int(v[COUNT]), "support": n_ab * decay, "confidence": conf, "lift": lift,
                "w_dir": float(v[W_DIR]) * decay, "w_sym": float(v[W_SYM]) * decay,
                "at_floor": bool(at_floor(self.users[s], self.min_users))}


_ALL = np.ones(1, bool)  # (no eligibility array: every row eligible)


@njit(cache=True, nogil=True)
def pair_lift(count, n_pair, pop_a, pop_b, raw_a, raw_b, dec_scale, raw_scale):
    """Lift of a pair: observed over expected if the two items were independent.

    With N item occurrences and P pair observations, an independent pair {a, b} would be observed
    ``2 P (c_a / N) (c_b / N)`` times. On raw counts (``count`` observations, ``raw_*`` occurrences,
    ``raw_scale`` = N² / 2P) when the state has them, else on decayed ones (``n_pair``, ``pop_*``,
    ``dec_scale``).

    >>> pair_lift(2.0, 0.5, 0.1, 0.1, 4.0, 5.0, 9.0, 10.0)  # 2 * 10 / (4 * 5)
    1.0
    >>> round(pair_lift(2.0, 0.5, 0.1, 0.1, 4.0, 5.0, 9.0, float("nan")), 3)  # no raw counts: 0.5 * 9 / 0.01
    450.0
    """
    if raw_scale > 0.0 and raw_a > 0.0 and raw_b > 0.0:
        return count * raw_scale / (raw_a * raw_b)
    return n_pair * dec_scale / max(pop_a * pop_b, 1e-300)


@njit(cache=True, nogil=True)
def _published(nb, vals, users, min_users, pop, raw_pop, b, f, r, min_support, eligible, use_eligible, dec_scale,
               raw_scale):
    """:meth:`CoOccurrence.published` of row ``r`` (block ``b``, ``f`` slots used), in one pass and one sort."""
    lo = b * nb.shape[1]
    keep = np.empty(f, np.int64)
    cnt = 0
    for j in range(f):
        x = nb[b, j]
        if (x >= 0 and vals[COUNT, lo + j] >= min_support and (not use_eligible or eligible[x])
                and at_floor(users[lo + j], min_users)):
            keep[cnt] = j
            cnt += 1
    rows = np.empty(cnt, np.int64)
    cos = np.empty(cnt)
    n_pair = np.empty(cnt)
    pa = pop[r]
    for i in range(cnt):
        j = keep[i]
        x = nb[b, j]
        rows[i] = x
        n_pair[i] = vals[N_PAIR, lo + j]
        cos[i] = min(n_pair[i] / math.sqrt(max(pa * pop[x], 1e-300)), 1.0)
    by_row = np.argsort(rows)  # then stably by cosine: best first, ties by row
    order = by_row[np.argsort(-cos[by_row], kind="mergesort")]
    rows, cos, n_pair = rows[order], cos[order], n_pair[order]
    conf = np.empty(cnt)
    lift = np.empty(cnt)
    for i in range(cnt):
        conf[i] = n_pair[i] / pa if pa > 0 else 0.0 * n_pair[i]
        x = rows[i]
        lift[i] = pair_lift(vals[COUNT, lo + keep[order[i]]], n_pair[i], pa, pop[x], raw_pop[r], raw_pop[x],
                            dec_scale, raw_scale)
    return rows, cos, n_pair, conf, lift


@njit(cache=True, nogil=True)
def _write_row(nb, vals, sq, users, fill, n_free, b, neighbours, values, factor, k):
    """Block ``b`` holds ``neighbours[:k]`` with ``values`` (the first three rows times ``factor``), taken as
    at the privacy floor (the caller clears the bitmaps of those that are not), and nothing after them."""
    m = nb.shape[1]
    lo = b * m
    for j in range(k):
        nb[b, j] = neighbours[j]
        users[lo + j] = ALL_USERS
        for i in range(4):
            v = values[i, j] * factor if i < 3 else values[i, j]
            vals[i, lo + j] = v
            if i < 2:
                sq[i, lo + j] = math.sqrt(v)
    for j in range(k, fill[b]):
        nb[b, j] = -1
        users[lo + j] = 0
        for i in range(4):
            vals[i, lo + j] = 0.0
        sq[0, lo + j] = 0.0
        sq[1, lo + j] = 0.0
    fill[b] = k
    n_free[b] = 0


@njit(cache=True, nogil=True)
def count_occurrence(i, scale, pop, ipop, raw_pop, total, neg_exponent):  # pragma: no cover - compiled
    """The occurrence step of one event of item ``i`` entering a history (``scale`` = exp(lambda (t - t0))):
    its decayed and raw counts, its popularity normaliser ``ipop`` and the decayed total (returned). The one
    definition: :meth:`CoOccurrence.add_occurrences` (``learn_many``, the shards) runs it for a batch, the
    one-event kernel (:mod:`infogap.models.learn_core`) for one event. (The raw total is the caller's.)"""
    pop[i] += scale
    total += scale
    ipop[i] = pop[i] ** neg_exponent
    raw_pop[i] += 1.0
    return total


@njit(cache=True, nogil=True)
def _count_occurrences(rows, scaled, pop, ipop, raw_pop, total, neg_exponent):  # pragma: no cover - compiled
    """:func:`count_occurrence` of each entry in turn."""
    for j in range(rows.size):
        total = count_occurrence(rows[j], scaled[j], pop, ipop, raw_pop, total, neg_exponent)
    return total


@njit(cache=True, nogil=True)
def _set_popularity(pop, ipop, pop_at, raw_pop, rows, values, raw_values, at, exponent):
    """Entries in turn: row ``rows[j]`` takes ``values[j]`` (and ``raw_values[j]``) unless it holds a value
    newer than ``at[j]``."""
    for j in range(rows.size):
        r = rows[j]
        if at[j] >= pop_at[r]:
            pop[r] = values[j]
            ipop[r] = max(values[j], 1e-300) ** -exponent
            raw_pop[r] = raw_values[j]
            pop_at[r] = at[j]


@njit(cache=True, nogil=True)
def _update(codes, deltas, bits, k, pair_total, block, nb, vals, sq, users, fill, free_pos, n_free, table, meta,
            door, door_bits, n_evict, evict_sym_weight, vote_min_users):  # pragma: no cover - compiled; tested through update()
    """Apply ``codes[k:]`` one by one (update j also ORs its user's bit ``bits[j]`` into the slot's bitmap; the
    slot's votes ``sq`` are set only once the bitmap shows ``vote_min_users`` users); returns (where it stopped,
    pair_total, what is needed): ``codes.size`` when done, else the index of an update whose row has no block
    yet (``_NEED_BLOCK``) or that would fill the index over half (``_NEED_ROOM``); the caller provides it and
    resumes there."""
    m = nb.shape[1]
    u = codes.size
    warmed = k
    while k < u:
        if k == warmed:  # the memory of the next updates, read at once
            warmed = min(k + _WARM, u)
            pair_total += _warm(codes[k:warmed], table, meta, vals, sq, users, door, door_bits)  # (+ 0.0)
        c = codes[k]
        # updates come in pairs (prev, cur), (cur, prev): one pair observation each
        pair = deltas[k, N_PAIR] if k % 2 == 0 else 0.0
        s = find(table, meta, c)
        if s < 0:
            if door_bits:
                h = home_slot(c, 64 - door_bits)  # the door hashes like the index
                if not door[h]:  # a pair's first sighting only opens the door
                    door[h] = True
                    pair_total += pair
                    k += 1
                    continue
            r = c >> _SHIFT
            b = block[r]
            if b == 0:
                return k, pair_total, _NEED_BLOCK
            if 2 * (meta[LIVE_KEYS] + 1) > table.shape[0]:
                return k, pair_total, _NEED_ROOM
            nf = n_free[b]
            if nf == 0:
                p = fill[b]
                if p < m:
                    fill[b] = p + 1
                else:  # full: free the weakest slots
                    _evict(r, b, nb, vals, sq, users, free_pos, n_free, table, meta, n_evict, evict_sym_weight,
                           vote_min_users)
                    nf = n_free[b]
            if nf:
                p = free_pos[b, nf - 1]
                n_free[b] = nf - 1
            s = b * m + p
            nb[b, p] = c & _MASK
            insert(table, meta, c, s)
        for q in range(4):
            vals[q, s] += deltas[k, q]
        um = users[s] | mask(bits[k])
        users[s] = um
        # below the vote floor the slot keeps no votes (sq stays 0) until its vote_min_users-th user (a live
        # slot's symmetric weight is positive: sq[1] > 0 is "votes already")
        if vote_min_users <= 1 or sq[1, s] > 0.0 or at_floor(um, vote_min_users):
            sq[0, s] = math.sqrt(vals[0, s])
            sq[1, s] = math.sqrt(vals[1, s])
        pair_total += pair
        k += 1
    return k, pair_total, 0


@njit(cache=True, nogil=True)
def _evict(r, b, nb, vals, sq, users, free_pos, n_free, table, meta, n_evict, evict_sym_weight,
           vote_min_users):  # pragma: no cover - compiled
    """Free the weakest ``n_evict`` slots of full row ``r`` (block ``b``), by the ranker's view of a slot:
    its damped weights (ties: lowest position first); the freed positions are taken lowest first. A slot below
    the vote floor (no votes yet) is ranked by the votes it will have, from its weights."""
    m = nb.shape[1]
    lo = b * m
    key = sq[0, lo: lo + m] + evict_sym_weight * sq[1, lo: lo + m]
    if vote_min_users > 1:
        for p in range(m):
            if not at_floor(users[lo + p], vote_min_users):
                key[p] = math.sqrt(vals[0, lo + p]) + evict_sym_weight * math.sqrt(vals[1, lo + p])
    # the n_evict smallest keys, ties to the lowest positions, in position order: those under the
    # n_evict-th smallest key, then the first positions that equal it (a selection, not a sort)
    kth = np.partition(key, n_evict - 1)[n_evict - 1]
    ties = n_evict
    for p in range(m):
        if key[p] < kth:
            ties -= 1
    drop = np.empty(n_evict, np.int64)
    j = 0
    for p in range(m):
        x = key[p]
        if x < kth or (x == kth and ties > 0):
            if x == kth:
                ties -= 1
            drop[j] = p
            j += 1
    base = r << _SHIFT
    for j in range(n_evict):
        p = drop[j]
        delete(table, meta, base | nb[b, p])
        nb[b, p] = -1
        for q in range(4):
            vals[q, lo + p] = 0.0
        sq[0, lo + p] = 0.0
        sq[1, lo + p] = 0.0
        users[lo + p] = 0
        free_pos[b, n_evict - 1 - j] = p
    n_free[b] = n_evict


class PairWeights:
    """Turns events and their predecessors into slot updates, identically one at a time or in batches.

    One compiled loop serves a single event and a batch alike, so both produce bit-identical weights.

    Besides position, time gap and event weights, a pair's scoring weights depend on what the two
    events say about each other:

    - ``agreement``: when both events carry a rating, both weights are multiplied by
      ``exp(-agreement * |rating_a - rating_b|)`` (items one user rated alike are more alike);
    - ``feature_boost``: the symmetric weight is multiplied by ``1 + feature_boost * J``, with ``J``
      the Jaccard overlap of the two items' categories/tags (bit masks, see ``Catalog.feat_mask``).

    Examples
    --------
    >>> pw = PairWeights(window=2, dir_window=1, dir_decay=0.5, sym_decay=0.5, gap_tau_s=0.0, gap_floor=1.0)
    >>> codes, deltas = pw.one(5, 10.0, 1.0, 1.0, [3, 4], [9.0, 8.0], [1.0, 1.0])
    >>> [(c >> 32, c & 0xFFFFFFFF) for c in codes.tolist()], deltas.tolist()[0], deltas.tolist()[2]
    ([(3, 5), (5, 3), (4, 5), (5, 4)], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0])
    >>> pw = PairWeights(window=1, dir_window=1, dir_decay=1.0, sym_decay=1.0, gap_tau_s=0.0, gap_floor=1.0,
    ...                  agreement=0.5, feature_boost=1.0)
    >>> _, d = pw.one(5, 10.0, 1.0, 1.0, [3], [9.0], [1.0], rating=4.0, prev_rating=[2.0],
    ...               mask=0b011, prev_mask=[0b110])
    >>> [round(x, 4) for x in d[0, :2].tolist()]  # exp(-0.5 * 2) and that times 1 + 1/3
    [0.3679, 0.4905]
    """

    def __init__(self, window: int, dir_window: int, dir_decay: float, sym_decay: float, gap_tau_s: float,
                 gap_floor: float, agreement: float = 0.0, feature_boost: float = 0.0):
        self.window = window
        self.dir_window = dir_window
        self.dir_decay = dir_decay
        self.sym_decay = sym_decay
        self.gap_tau_s = gap_tau_s
        self.gap_floor = gap_floor
        self.agreement = agreement
        self.feature_boost = feature_boost
        self.dtab = np.array([dir_decay ** k if k < dir_window else 0.0 for k in range(window)])
        self.stab = np.array([sym_decay ** k for k in range(window)])

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a snapshot from before ``agreement`` and ``feature_boost`` (both off then)."""
        self.__dict__.update({"agreement": 0.0, "feature_boost": 0.0, **state})

    def one(self, cur: int, ts: float, w: float, scale: float, prev, prev_ts, prev_w, rating: float = 0.0,
            prev_rating=None, mask: int = 0, prev_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """Slot updates of one event against its predecessors (newest first); a rating of 0 is none."""
        agree = float(self.agreement) if prev_rating is not None else 0.0
        boost = float(self.feature_boost) if prev_mask is not None else 0.0
        flat = np.ascontiguousarray
        return _pair_updates_one(int(cur), float(ts), float(w), float(scale), flat(prev, np.int64),
                                 flat(prev_ts, np.float64), flat(prev_w, np.float64), float(rating),
                                 flat(prev_rating, np.float64) if agree else _NO_RATING, np.uint64(mask),
                                 flat(prev_mask, np.uint64) if boost else _NO_MASK, self.dtab, self.stab,
                                 float(self.gap_tau_s), float(self.gap_floor), agree, boost)

    def many(self, cur: np.ndarray, ts: np.ndarray, w: np.ndarray, scale: np.ndarray, prev: np.ndarray,
             prev_ts: np.ndarray, prev_w: np.ndarray, rating: np.ndarray | None = None,
             prev_rating: np.ndarray | None = None, mask: np.ndarray | None = None,
             prev_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slot updates of a batch, in (event, distance) order; ``prev*`` are ``[E, W]`` (-1: none).
        ``rating``/``prev_rating`` (0: none) and the feature masks are only read when their option is on.

        Also returns, per pair (two slot updates each), the index of its event in the batch.
        """
        agree = float(self.agreement) if rating is not None and prev_rating is not None else 0.0
        boost = float(self.feature_boost) if mask is not None and prev_mask is not None else 0.0
        if not agree:
            rating, prev_rating = _NO_RATING, _NO_RATING2
        if not boost:
            mask, prev_mask = _NO_MASK, _NO_MASK2
        return _pair_updates(cur, ts, w, scale, prev, prev_ts, prev_w, self.dtab, self.stab, float(self.gap_tau_s),
                             float(self.gap_floor), rating, prev_rating, agree, mask, prev_mask, boost)


_NO_RATING, _NO_RATING2 = np.zeros(1), np.zeros((1, 1))
_NO_MASK, _NO_MASK2 = np.zeros(1, np.uint64), np.zeros((1, 1), np.uint64)


@njit(cache=True, nogil=True)
def _bits(x):  # pragma: no cover - compiled
    n = 0
    while x:
        x &= x - np.uint64(1)
        n += 1
    return n


@njit(cache=True, nogil=True)
def _pair_updates(cur, ts, w, scale, prev, prev_ts, prev_w, dtab, stab, gap_tau_s, gap_floor, rating, prev_rating,
                  agree, mask, prev_mask, boost):  # pragma: no cover - compiled; tested through PairWeights
    e, width = prev.shape
    n = 0
    for j in range(e):
        if w[j] <= 0.0:  # (a disliked item makes no pairs, as cur or as prev)
            continue
        for k in range(width):
            if prev[j, k] >= 0 and prev[j, k] != cur[j] and prev_w[j, k] > 0.0:
                n += 1
    codes = np.empty(2 * n, np.int64)
    deltas = np.empty((2 * n, 4))
    ev = np.empty(n, np.int64)
    t = 0
    for j in range(e):
        c = np.int64(cur[j])
        if w[j] <= 0.0:
            continue
        for k in range(width):
            p = np.int64(prev[j, k])
            if p < 0 or p == c or prev_w[j, k] <= 0.0:
                continue
            gapf = 1.0
            if gap_tau_s > 0:
                gap = ts[j] - prev_ts[j, k]
                gapf = gap_floor + (1.0 - gap_floor) / (1.0 + (gap if gap > 0.0 else 0.0) / gap_tau_s)
            pw = prev_w[j, k]
            base = gapf * (pw if pw < w[j] else w[j]) * scale[j]
            if agree > 0.0 and rating[j] > 0.0 and prev_rating[j, k] > 0.0:
                base *= math.exp(-agree * abs(rating[j] - prev_rating[j, k]))
            ws = base * stab[k]
            if boost > 0.0:
                union = _bits(mask[j] | prev_mask[j, k])
                if union:
                    ws *= 1.0 + boost * _bits(mask[j] & prev_mask[j, k]) / union
            codes[2 * t] = (p << _SHIFT) | c
            codes[2 * t + 1] = (c << _SHIFT) | p
            deltas[2 * t, 0] = base * dtab[k]
            deltas[2 * t + 1, 0] = 0.0
            deltas[2 * t, 1] = ws
            deltas[2 * t + 1, 1] = ws
            deltas[2 * t, 2] = scale[j]
            deltas[2 * t + 1, 2] = scale[j]
            deltas[2 * t, 3] = 1.0
            deltas[2 * t + 1, 3] = 1.0
            ev[t] = j
            t += 1
    return codes, deltas, ev


@njit(cache=True, nogil=True)
def _pair_updates_one(cur, ts, w, scale, prev, prev_ts, prev_w, rating, prev_rating, mask, prev_mask, dtab, stab,
                      gap_tau_s, gap_floor, agree, boost):  # pragma: no cover - compiled; tested through PairWeights
    """:func:`_pair_updates` of one event (scalars; its predecessors as 1-d arrays): the batch kernel on a
    batch of one, called from compiled code, so the same numbers without a Python call per array."""
    codes, deltas, _ = _pair_updates(np.full(1, cur, np.int64), np.full(1, ts), np.full(1, w), np.full(1, scale),
                                     prev.reshape(1, -1), prev_ts.reshape(1, -1), prev_w.reshape(1, -1),
                                     dtab, stab, gap_tau_s, gap_floor, np.full(1, rating),
                                     prev_rating.reshape(1, -1), agree, np.full(1, mask, np.uint64),
                                     prev_mask.reshape(1, -1), boost)
    return codes, deltas


@njit(cache=True, nogil=True)
def _learn_one(cur, ts, w, scale, rating, mask, ring, hist_item, hist_ts, hist_w, hist_rating, feat_mask, dtab, stab,
               gap_tau_s, gap_floor, agree, boost, bit, pair_total, block, nb, vals, sq, users, fill, free_pos, n_free,
               table, meta, door, door_bits, n_evict, evict_sym_weight, vote_min_users,
               bits):  # pragma: no cover - compiled; tested through learn_one
    """One event's slot updates, applied as far as :func:`_update` gets (see :func:`infogap.models.learn_core.learn_event`);
    ``bit``: the user's bit, which every update of the event carries (written into ``bits``, room for
    ``2 * window`` of them)."""
    k = ring.size
    prev = np.empty(k, np.int64)
    prev_ts = np.empty(k)
    prev_w = np.empty(k)
    prev_rating = np.empty(k)
    prev_mask = np.empty(k, np.uint64)
    for j in range(k):
        at = ring[j]
        prev[j] = hist_item[at]
        prev_ts[j] = hist_ts[at]
        prev_w[j] = hist_w[at]
        prev_rating[j] = hist_rating[at]
        prev_mask[j] = feat_mask[prev[j]] if prev[j] >= 0 else np.uint64(0)
    codes, deltas = _pair_updates_one(cur, ts, w, scale, prev, prev_ts, prev_w, rating, prev_rating, mask, prev_mask,
                                      dtab, stab, gap_tau_s, gap_floor, agree, boost)
    bits[:codes.size] = bit
    k, pt, need = _update(codes, deltas, bits, 0, pair_total, block, nb, vals, sq, users, fill, free_pos, n_free, table,
                          meta, door, door_bits, n_evict, evict_sym_weight, vote_min_users)
    return codes, deltas, k, pt, need


#: Updates whose memory :func:`_warm` reads at once: an event's pairs with a full window (2 x 16).
_WARM = 32


@njit(cache=True, nogil=True)
def _warm(codes, table, meta, vals, sq, users, door, door_bits):  # pragma: no cover - compiled
    """Read, all at once, what :func:`_update` will read for ``codes``: their index entries, then their
    slots' weights and user bitmaps (or, for pairs not held, their door bits). The index, weights and door are far larger
    than the caches, and :func:`_update`'s lookups, one after another, each waited for memory in turn;
    these reads do not depend on each other, so their misses overlap (``learn_one`` ~12 % faster on
    MovieLens).

    Returns 0.0, computed from every value read: a load whose value is unused is dropped by the
    compiler, and ``x * 0.0`` cannot be folded to 0 without fast-math (it is 0.0 for the finite,
    non-negative weights a slot holds, so adding it changes nothing)."""
    slots = np.empty(codes.size, np.int64)
    for k in range(codes.size):
        slots[k] = find(table, meta, codes[k])
    x = 0.0
    opened = 0
    for k in range(codes.size):
        s = slots[k]
        if s >= 0:
            x += vals[0, s] + vals[1, s] + vals[2, s] + vals[3, s] + sq[0, s] + sq[1, s]
            opened += np.int64(users[s] & np.uint64(1))  # (its bitmap, which every update ORs into)
        elif door_bits:
            opened += door[home_slot(codes[k], 64 - door_bits)]
    return x * 0.0 + opened * 0.0
