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

**Decay** is exponential with ``half_life_days`` in event time, applied lazily: values are stored
relative to a reference time ``t0`` (``w * exp(lambda * (t - t0))``) so that an update is one
addition and values of different ages compare directly; reading multiplies by
``exp(-lambda * (now - t0))``, which is ``w * exp(-lambda * (now - t))``. The owner renormalises
(:meth:`CoOccurrence.rescale`) long before the exponent can overflow.

**Bounded memory.** A full row that must take a new neighbour first evicts its weakest
``evict_fraction`` of slots (by their damped scoring weights, as the ranker sees them), so memory
is ``O(n_items * M)`` plus a ``dict`` index of the live slots, whatever the number of distinct
pairs. A pair's first sighting only opens an admission "door" (a fixed-size bit array), so
one-off pairs do not push real neighbours out. Updates are applied in event order, so a batch
gives exactly the state of the same events one at a time.

>>> co = CoOccurrence(n_neighbours=4, door_bits=0, capacity=4)
>>> co.ensure(3)
>>> co.update([code(0, 1), code(1, 0)], np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]))  # 0 then 1
>>> co.neighbours(0)[0].tolist(), co.neighbours(1)[0].tolist(), co.neighbours(1)[1].tolist()
([1], [0], [0.0])
"""
from __future__ import annotations

import math
from itertools import repeat

import numpy as np

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
#: Rows of ``vals`` (one contiguous array per quantity, so the ranker gathers only what it needs).
W_DIR, W_SYM, N_PAIR, COUNT = 0, 1, 2, 3
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GOLDEN_INT = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
#: Batches of at most this many slot updates take the plain sequential path.
_SMALL = 64


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
                 evict_sym_weight: float = 0.5, capacity: int = 1024):
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
        self._door = np.zeros(1 << door_bits if door_bits else 0, bool)
        self.lam = 0.0 if not half_life_days else math.log(2.0) / (half_life_days * 86400.0)
        m = n_neighbours
        cap = max(int(capacity), 1)
        #: item row -> its block of M slots in nb/vals/sq; 0 = none yet (block 0 is always empty)
        self.block = np.zeros(cap, np.int32)
        blocks = 1 + min(cap, 256)
        self.nb = np.full((blocks, m), -1, np.int32)
        self.vals = np.zeros((4, blocks * m))
        self.sq = np.zeros((2, blocks * m))  # sqrt of the two scoring weights, kept for the ranker
        self._col_off = np.arange(4)[None, :] * (blocks * m)
        self.fill: list[int] = [0] * blocks  # high-water mark of each block
        self._free: dict[int, list[int]] = {}  # per block: freed positions below the mark, descending
        self._n_blocks = 1
        self._spare: list[int] = []  # blocks of cleared rows, reused first
        self.pop = np.zeros(cap)
        self.ipop = np.ones(cap)
        self.total = 0.0
        self.pair_total = 0.0
        #: read-side copies: the event time each item's popularity (and the totals) is as of
        self.pop_at = np.full(cap, -np.inf)
        self.totals_at = -math.inf
        self.n_items = 0
        self._slot: dict[int, int] = {}
        self._n_evict = min(m - 1, max(1, int(round(m * evict_fraction))))

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

    def _block_for(self, r: int) -> int:
        """Row ``r``'s block, taken now if it has none (blocks are numbered in order of first need)."""
        b = int(self.block[r])
        if b:
            return b
        if self._spare:
            b = self._spare.pop()
        else:
            b = self._n_blocks
            cap = self.nb.shape[0]
            if b >= cap:
                new, m = 2 * cap, self.n_neighbours
                self.nb = np.r_[self.nb, np.full((new - cap, m), -1, np.int32)]
                self.vals = np.hstack([self.vals, np.zeros((4, (new - cap) * m))])
                self.sq = np.hstack([self.sq, np.zeros((2, (new - cap) * m))])
                self._col_off = np.arange(4)[None, :] * (new * m)
                self.fill.extend([0] * (new - cap))
            self._n_blocks = b + 1
        self.block[r] = b
        return b

    def rescale(self, factor: float) -> None:
        """Multiply every decayed quantity by ``factor`` (moving the reference time)."""
        self.vals[:N_PAIR + 1] *= factor
        self.sq *= math.sqrt(factor)
        self.pop *= factor
        self.ipop *= factor ** -self.pop_exponent
        self.total *= factor
        self.pair_total *= factor

    @property
    def n_slots(self) -> int:
        """Number of live (item, neighbour) slots."""
        return len(self._slot)

    # ------------------------------------------------------------------ learning
    def add_occurrences(self, rows: list[int], scaled: list[float]) -> None:
        """Count item occurrences (``scaled`` = exp(lambda (t - t0)) per event), in order."""
        pop, ipop = self.pop, self.ipop
        e = -self.pop_exponent
        total = self.total
        if len(rows) == 1:
            r = rows[0]
            pop[r] += scaled[0]
            total += scaled[0]
            ipop[r] = float(pop[r]) ** e
        else:
            np.add.at(pop, rows, scaled)
            for x in scaled:
                total += x
            for r in set(rows):
                ipop[r] = float(pop[r]) ** e
        self.total = total

    def update(self, codes: list[int], deltas: np.ndarray) -> None:
        """Apply slot updates in order: slot ``codes[j]`` gains ``deltas[j]`` (w_dir, w_sym, n_pair, count).

        New neighbours take a free slot; a row that is full when a new neighbour arrives first
        evicts its weakest slots. The result equals applying the updates one by one: the batch is
        processed in rounds, each applying (vectorised) every update that precedes its row's next
        eviction, then performing those evictions.
        """
        u = len(codes)
        if u == 0:
            return
        pt = self.pair_total
        for x in deltas[0::2, N_PAIR].tolist():  # rows come in pairs: (prev, cur) then (cur, prev)
            pt += x
        self.pair_total = pt
        if u <= _SMALL:
            self._update_small(codes, deltas)
            return
        get = self._slot.get
        slots = np.fromiter(map(get, codes, repeat(-1)), np.int64, u)
        if slots.min() >= 0:
            self._apply(slots, deltas)
            return
        codes_np = np.asarray(codes, np.int64)
        if self.door_bits:
            # admission: a pair's first sighting (since the last door reset) only marks the door
            mi = np.flatnonzero(slots < 0)
            h = self._hash(codes_np[mi])
            _, first = np.unique(h, return_index=True)
            first = first[~self._door[h[first]]]
            self._door[h] = True
            if first.size:
                keep = np.ones(u, bool)
                keep[mi[first]] = False
                codes_np, deltas, slots = codes_np[keep], deltas[keep], slots[keep]
                if slots.size == 0 or slots.min() >= 0:
                    self._apply(slots, deltas)
                    return
        while True:
            later, cut_rows = self._round(codes_np, slots)
            if later is None:
                self._apply(slots, deltas)
                return
            done = np.ones(slots.size, bool)
            done[later] = False
            self._apply(slots[done], deltas[done])
            for r in cut_rows:
                self._evict(r)
            codes_np, deltas = codes_np[later], deltas[later]
            slots = np.fromiter(map(get, codes_np.tolist(), repeat(-1)), np.int64, later.size)
            if slots.min() >= 0:
                self._apply(slots, deltas)
                return

    def _take(self, r: int, cnt: int) -> list[int]:
        """The next ``cnt`` free slots of row ``r`` (freed positions first, lowest first)."""
        out: list[int] = []
        b = self._block_for(r)
        fl = self._free.get(b)
        if fl:
            k = min(cnt, len(fl))
            out = fl[len(fl) - k:][::-1]
            del fl[len(fl) - k:]
            if not fl:
                del self._free[b]
        rest = cnt - len(out)
        if rest:
            f = self.fill[b]
            out.extend(range(f, f + rest))
            self.fill[b] = f + rest
        base = b * self.n_neighbours
        return [base + p for p in out]

    def _available(self, r: int) -> int:
        b = int(self.block[r])
        return self.n_neighbours - self.fill[b] + len(self._free.get(b, ()))

    def _update_small(self, codes: list[int], deltas: np.ndarray) -> None:
        """The same as :meth:`update`, one update at a time (faster for a few updates)."""
        m = self.n_neighbours
        fill, free = self.fill, self._free
        slot_of = self._slot
        get = slot_of.get
        slots = list(map(get, codes, repeat(-1)))
        if min(slots) >= 0:
            self._apply(np.asarray(slots, np.int64), deltas)
            return
        nb_flat = self.nb.reshape(-1)
        door, bits = self._door, self.door_bits
        skip = False
        new_s: list[int] = []
        new_c: list[int] = []
        done = 0
        for k, c in enumerate(codes):
            if slots[k] >= 0:
                continue
            s = get(c, -1)  # a repeat of a code allocated a moment ago
            if s < 0:
                if bits:
                    h = ((c * _GOLDEN_INT) & _M64) >> (64 - bits)
                    if not door[h]:
                        door[h] = True
                        skip = True
                        continue
                r = c >> _SHIFT
                b = self.block[r]
                if not b:  # the row's first neighbour: taking its block may grow nb
                    if new_s:
                        nb_flat[new_s] = new_c
                        new_s, new_c = [], []
                    b = self._block_for(r)
                    nb_flat = self.nb.reshape(-1)
                fl = free.get(b)
                if fl:
                    p = fl.pop()
                    if not fl:
                        del free[b]
                else:
                    p = fill[b]
                    if p < m:
                        fill[b] = p + 1
                    else:  # full: apply what precedes, then evict
                        if new_s:
                            nb_flat[new_s] = new_c
                            new_s, new_c = [], []
                        self._apply_some(slots, deltas, done, k)
                        done = k
                        self._evict(r)
                        for q in range(k + 1, len(codes)):  # later slots of this row may be gone
                            if codes[q] >> _SHIFT == r:
                                slots[q] = get(codes[q], -1)
                        fl = free[b]
                        p = fl.pop()
                        if not fl:
                            del free[b]
                s = b * m + p
                new_s.append(s)
                new_c.append(c & _MASK)
                slot_of[c] = s
            slots[k] = s
        if new_s:
            nb_flat[new_s] = new_c
        if skip:
            self._apply_some(slots, deltas, done, len(codes))
        else:
            self._apply(np.asarray(slots[done:], np.int64), deltas[done:])

    def _apply_some(self, slots: list[int], deltas: np.ndarray, a: int, b: int) -> None:
        s = np.asarray(slots[a:b], np.int64)
        ok = s >= 0
        self._apply(s[ok], deltas[a:b][ok])

    def reset_door(self) -> None:
        """Forget which pairs were sighted once (called at fixed points of the event count).

        Pairs that hold a slot stay marked, so a pair evicted later is re-admitted at once, as
        it would have been without the reset.
        """
        if self.door_bits:
            self._door[:] = False
            live = np.fromiter(self._slot, np.int64, len(self._slot))
            self._door[self._hash(live)] = True

    def _hash(self, codes: np.ndarray) -> np.ndarray:
        return ((codes.astype(np.uint64) * _GOLDEN) >> np.uint64(64 - self.door_bits)).astype(np.int64)

    def _round(self, codes_np: np.ndarray, slots: np.ndarray):
        """Allocate the new neighbours that fit; fill ``slots`` for every update before its row's
        next eviction; return (indices of the later updates, rows to evict) or (None, None)."""
        mi = np.flatnonzero(slots < 0)
        mc = codes_np[mi]
        uniq, first = np.unique(mc, return_index=True)
        fo = np.argsort(first, kind="stable")
        new_codes, new_first = uniq[fo], mi[first[fo]]  # distinct new codes in arrival order
        new_rows = new_codes >> _SHIFT
        block = self.block
        for r in dict.fromkeys(new_rows[block[new_rows] == 0].tolist()):  # rows' first neighbours, in order
            self._block_for(r)
        o = np.argsort(new_rows, kind="stable")
        rs, rc, rf = new_rows[o], new_codes[o], new_first[o]
        starts = np.flatnonzero(np.r_[True, rs[1:] != rs[:-1]])
        sizes = np.diff(np.r_[starts, rs.size])
        rank = np.arange(rs.size) - np.repeat(starts, sizes)
        rows_u = rs[starts].tolist()
        avail = np.fromiter(map(self._available, rows_u), np.int64, len(rows_u))
        free_each = np.repeat(avail, sizes)
        alloc = rank < free_each
        a_codes = rc[alloc]
        a_slots: list[int] = []
        for r, k in zip(rows_u, np.minimum(avail, sizes).tolist()):
            a_slots += self._take(r, k)
        self.nb.reshape(-1)[a_slots] = (a_codes & _MASK).astype(np.int32)
        slot_of = self._slot
        slot_of.update(zip(a_codes.tolist(), a_slots))
        over = rank == free_each
        if not over.any():
            slots[mi] = np.fromiter(map(slot_of.get, mc.tolist()), np.int64, mc.size)
            return None, None
        # rows that overflow stop at the first arrival of the first code that did not fit
        cut_rows, cut_at = rs[over], rf[over]
        row_of = codes_np >> _SHIFT
        j = np.minimum(np.searchsorted(cut_rows, row_of), cut_rows.size - 1)
        later = np.flatnonzero((cut_rows[j] == row_of) & (np.arange(slots.size) >= cut_at[j]))
        early = np.ones(slots.size, bool)
        early[later] = False
        dm = np.flatnonzero((slots < 0) & early)
        slots[dm] = np.fromiter(map(slot_of.get, codes_np[dm].tolist()), np.int64, dm.size)
        return later, cut_rows.tolist()

    def _apply(self, slots: np.ndarray, deltas: np.ndarray) -> None:
        if slots.size:
            vals = self.vals
            np.add.at(vals.reshape(-1), (slots[:, None] + self._col_off).ravel(), deltas.ravel())
            self.sq[:, slots] = np.sqrt(vals[:2, slots])

    def _evict(self, r: int) -> None:
        """Free the weakest ``evict_fraction`` of full row ``r``'s slots (ties: lowest position first)."""
        m = self.n_neighbours
        b = int(self.block[r])
        lo = b * m
        block = self.vals[:, lo: lo + m]
        # weakest by the ranker's view of a slot: its damped weights (state of this row only, so the
        # choice is the same whether the events come one at a time or in a batch)
        key = self.sq[W_DIR, lo: lo + m] + self.evict_sym_weight * self.sq[W_SYM, lo: lo + m]
        drop = np.sort(np.argsort(key, kind="stable")[: self._n_evict])
        base = r << _SHIFT
        slot_of = self._slot
        for c in self.nb[b, drop].tolist():
            del slot_of[base | c]
        self.nb[b, drop] = -1
        block[:, drop] = 0.0
        self.sq[:, lo + drop] = 0.0
        self._free[b] = drop[::-1].tolist()

    def set_row(self, r: int, neighbours: np.ndarray, values: np.ndarray) -> None:
        """Replace row ``r`` with given neighbours and their ``[4, K]`` values (reference-time units).

        For a read-side copy of rows learned elsewhere (a sharded item stage): the row's slots are
        exactly these, in this order.
        """
        m = self.n_neighbours
        k = min(int(neighbours.size), m)
        self.clear_row(r)
        if not k:
            return
        b = self._block_for(r)
        lo = b * m
        self.nb[b, :k] = neighbours[:k]
        self.vals[:, lo: lo + k] = values[:, :k]
        self.sq[:, lo: lo + k] = np.sqrt(values[:2, :k])
        self.fill[b] = k
        base = r << _SHIFT
        self._slot.update(zip((base | c for c in neighbours[:k].tolist()), range(lo, lo + k)))

    def clear_row(self, r: int) -> None:
        """Empty row ``r`` and give its block back (its item's popularity stays)."""
        b = int(self.block[r])
        if not b:
            return
        f = self.fill[b]
        base, slot_of = r << _SHIFT, self._slot
        for c in self.nb[b, :f].tolist():
            if c >= 0:
                del slot_of[base | c]
        lo = b * self.n_neighbours
        self.nb[b, :f] = -1
        self.vals[:, lo: lo + f] = 0.0
        self.sq[:, lo: lo + f] = 0.0
        self.fill[b] = 0
        self._free.pop(b, None)
        self.block[r] = 0
        self._spare.append(b)

    def set_popularity(self, rows: np.ndarray, pop: np.ndarray, total: float, pair_total: float,
                       at: float = math.inf) -> None:
        """Set items' decayed occurrence counts and the totals (reference-time units) as of event time
        ``at``, for a read-side copy: a value older than the one held is ignored (rows published at
        different times carry their neighbours' counts of that time).

        >>> co = CoOccurrence(capacity=2)
        >>> co.ensure(2)
        >>> co.set_popularity(np.array([0, 1]), np.array([5.0, 3.0]), 8.0, 2.0, at=20.0)
        >>> co.set_popularity(np.array([1]), np.array([1.0]), 6.0, 1.0, at=10.0)  # older: ignored
        >>> co.pop.tolist(), co.total
        ([5.0, 3.0], 8.0)
        """
        newer = at >= self.pop_at[rows]
        rows, pop = rows[newer], pop[newer]
        self.pop[rows] = pop
        self.ipop[rows] = np.maximum(pop, 1e-300) ** -self.pop_exponent
        self.pop_at[rows] = at
        if at >= self.totals_at:
            self.total = total
            self.pair_total = pair_total
            self.totals_at = at

    # ------------------------------------------------------------------ reading
    def published(self, r: int, min_support: int, eligible: np.ndarray | None = None):
        """Row ``r``'s neighbours backed by ``min_support`` observations, by cosine (best first, ties by row).

        Returns (neighbour rows, cosine, support, confidence, lift), support in reference-time units.
        """
        nb, _, _, n_pair, count = self.neighbours(r)
        ok = count >= min_support
        if eligible is not None:
            ok &= eligible[nb]
        nb, n_pair = nb[ok], n_pair[ok]
        pa = float(self.pop[r])
        pb = self.pop[nb]
        cos = np.minimum(n_pair / np.sqrt(np.maximum(pa * pb, 1e-300)), 1.0)
        order = np.lexsort((nb, -cos))
        nb, cos, n_pair, pb = nb[order], cos[order], n_pair[order], pb[order]
        conf = n_pair / pa if pa > 0 else 0.0 * n_pair
        return nb, cos, n_pair, conf, self.lift(n_pair, pa, pb)

    def neighbours(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row ``r``'s live slots: (neighbour rows, w_dir, w_sym, n_pair, count), reference-time units."""
        b = int(self.block[r])
        f = self.fill[b]
        nb = self.nb[b, :f]
        live = np.flatnonzero(nb >= 0)
        v = self.vals[:, b * self.n_neighbours + live]
        return nb[live], v[W_DIR], v[W_SYM], v[N_PAIR], v[COUNT]

    def pair(self, a: int, b: int, decay: float = 1.0) -> dict | None:
        """Association figures of "a with b" (``decay`` = exp(-lambda (now - t0))), or None."""
        s = self._slot.get((a << _SHIFT) | b)
        if s is None:
            return None
        return self.figures(a, b, s, decay)

    def lift(self, n_ab, n_a, n_b):
        """Observed co-occurrences over those expected if items were independent (array-friendly).

        With N item occurrences and T pair observations, an independent pair {a, b} would be
        observed ``2 T (n_a / N) (n_b / N)`` times.
        """
        if self.pair_total <= 0:
            return 0.0 * n_ab
        return n_ab * (self.total * self.total / (2.0 * self.pair_total)) / np.maximum(n_a * n_b, 1e-300)

    def figures(self, a: int, b: int, s: int, decay: float = 1.0) -> dict:
        """Support, confidence and lift of slot ``s`` (row ``a``, neighbour ``b``)."""
        v = self.vals[:, s]
        n_ab = float(v[N_PAIR])
        n_a, n_b = float(self.pop[a]), float(self.pop[b])
        conf = n_ab / n_a if n_a > 0 else 0.0
        lift = float(self.lift(n_ab, n_a, n_b))
        return {"count": int(v[COUNT]), "support": n_ab * decay, "confidence": conf, "lift": lift,
                "w_dir": float(v[W_DIR]) * decay, "w_sym": float(v[W_SYM]) * decay}


class PairWeights:
    """Turns events and their predecessors into slot updates, identically one at a time or in batches.

    Only additions, multiplications and divisions are used (no ``exp``), so the scalar path of a
    single event and the numpy path of a batch produce bit-identical weights.

    Examples
    --------
    >>> pw = PairWeights(window=2, dir_window=1, dir_decay=0.5, sym_decay=0.5, gap_tau_s=0.0, gap_floor=1.0)
    >>> codes, deltas = pw.one(5, 10.0, 1.0, 1.0, [3, 4], [9.0, 8.0], [1.0, 1.0])
    >>> [(c >> 32, c & 0xFFFFFFFF) for c in codes], deltas.tolist()[0], deltas.tolist()[2]
    ([(3, 5), (5, 3), (4, 5), (5, 4)], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0])
    """

    def __init__(self, window: int, dir_window: int, dir_decay: float, sym_decay: float, gap_tau_s: float,
                 gap_floor: float):
        self.window = window
        self.dir_window = dir_window
        self.dir_decay = dir_decay
        self.sym_decay = sym_decay
        self.gap_tau_s = gap_tau_s
        self.gap_floor = gap_floor
        self.dtab = [dir_decay ** k if k < dir_window else 0.0 for k in range(window)]
        self.stab = [sym_decay ** k for k in range(window)]

    def _gap(self, gap: float) -> float:
        if self.gap_tau_s <= 0:
            return 1.0
        g = self.gap_floor
        return g + (1.0 - g) / (1.0 + (gap if gap > 0.0 else 0.0) / self.gap_tau_s)

    def one(self, cur: int, ts: float, w: float, scale: float, prev: list[int], prev_ts: list[float],
            prev_w: list[float]) -> tuple[list[int], np.ndarray]:
        """Slot updates of one event against its predecessors (newest first)."""
        codes: list[int] = []
        flat: list[float] = []
        dtab, stab = self.dtab, self.stab
        for k, p in enumerate(prev):
            if p < 0 or p == cur:
                continue
            pw = prev_w[k]
            base = self._gap(ts - prev_ts[k]) * (pw if pw < w else w) * scale
            ws = base * stab[k]
            codes.append((p << _SHIFT) | cur)
            codes.append((cur << _SHIFT) | p)
            flat += (base * dtab[k], ws, scale, 1.0, 0.0, ws, scale, 1.0)
        return codes, np.array(flat).reshape(-1, 4)

    def many(self, cur: np.ndarray, ts: np.ndarray, w: np.ndarray, scale: np.ndarray, prev: np.ndarray,
             prev_ts: np.ndarray, prev_w: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Slot updates of a batch, in (event, distance) order; ``prev*`` are ``[E, W]`` (-1: none).

        Also returns, per pair (two slot updates each), the index of its event in the batch.
        """
        valid = (prev >= 0) & (prev != cur[:, None])
        ev, kk = np.nonzero(valid)
        if ev.size == 0:
            return [], np.zeros((0, 4)), ev
        p = prev[ev, kk].astype(np.int64)
        c = cur[ev].astype(np.int64)
        gap = ts[ev] - prev_ts[ev, kk]
        if self.gap_tau_s > 0:
            g = self.gap_floor
            gapf = g + (1.0 - g) / (1.0 + np.maximum(gap, 0.0) / self.gap_tau_s)
        else:
            gapf = np.ones(gap.shape[0])
        sc = scale[ev]
        base = gapf * np.minimum(prev_w[ev, kk], w[ev]) * sc
        ws = base * np.asarray(self.stab)[kk]
        n = p.shape[0]
        codes = np.empty(2 * n, np.int64)
        codes[0::2] = (p << _SHIFT) | c
        codes[1::2] = (c << _SHIFT) | p
        deltas = np.empty((2 * n, 4))
        deltas[0::2, 0] = base * np.asarray(self.dtab)[kk]
        deltas[1::2, 0] = 0.0
        deltas[0::2, 1] = ws
        deltas[1::2, 1] = ws
        deltas[0::2, 2] = sc
        deltas[1::2, 2] = sc
        deltas[:, 3] = 1.0
        return codes.tolist(), deltas, ev
