"""Sharded co-occurrence: the deltas a user stage emits, and the item-side shard that learns from them.

In the partitioned stream, a user's history lives with the user (partitioned by ``user_id``), but
item-item rows live with the item (partitioned by ``item_id``). An :class:`~infogap.models.engine.Engine`
built with ``cooc="remote"`` does not update co-occurrence itself: it records every slot update
it would have made, unscaled and with its event's time, as :class:`PairDeltas`. The stream splits
them by the owner of each row (:meth:`PairDeltas.split`), and each owner applies its part to a
:class:`CoOccurrenceShard`. Slot updates keep their order, and scaling by event time happens on
the shard, so one shard fed everything holds the same rows as a local engine.

Item occurrences (popularity, and the pair total that lift needs) go to *every* shard: each one
then knows the popularity of every item, which cosine and lift need for neighbours it does not own.

Every update carries ``seq``, its event's position in its source (the stream sets it to the Kafka
offset of the event in its ``events`` partition): a shard skips what it already applied, so a
user stage replaying after a crash does not count pairs twice. It also carries its user's bit
(:func:`infogap.models.privacy.user_bit`, one byte on the wire), which the shard ORs into the slot's user
bitmap: a slot is published only once ``min_users`` distinct users made it (the privacy floor); it is exported
to the user stages marked private until then, to vote but never be cited (or not at all, under ``floor_votes``,
until it votes). A record written before the bits (format 1) reads with no user bit on any update: it
adds no user, so it never brings a pair over the floor (conservative).

>>> import numpy as np
>>> d = PairDeltas(items=["tea", "cup"], row=np.array([0, 1]), nb=np.array([1, 0]),
...                d=np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]), ts=np.array([10.0, 10.0]),
...                seq=np.array([7, 7]), occ=np.array([0, 1]), occ_ts=np.array([9.0, 10.0]),
...                occ_pairs=np.array([0.0, 1.0]), occ_seq=np.array([6, 7]))
>>> shard = CoOccurrenceShard(n_neighbours=8, half_life_days=None, door_bits=0)
>>> shard.apply(d, source=0); shard.apply(d, source=0)  # the replay is skipped
>>> [(n.item_id, n.support) for n in shard.similar("tea", min_support=1)]
[('cup', 1.0)]
>>> PairDeltas.from_bytes(d.to_bytes()).items
['tea', 'cup']
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson

from infogap.models.catalog import MAX_ID_CHARS
from infogap.models.cooccurrence import _SHIFT, DOOR_PERIOD, CoOccurrence
from infogap.models.model_state import RENORM_EXPONENT
from infogap.models.privacy import BITS, NO_USER
from infogap.models.ranker import Neighbour
from infogap.models.state_fields import StateError, check, encode_float

_new = tuple.__new__  # a NamedTuple without its keyword-handling constructor

_ARRAYS = (("row", np.int32), ("nb", np.int32), ("ts", np.float64), ("seq", np.int64), ("occ", np.int32),
           ("occ_ts", np.float64), ("occ_pairs", np.float64), ("occ_seq", np.int64))


def _example() -> PairDeltas:
    """Two items seen together once (the doctests' deltas)."""
    return PairDeltas(items=["tea", "cup"], row=np.array([0, 1]), nb=np.array([1, 0]),
                      d=np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]), ts=np.array([10.0, 10.0]),
                      seq=np.array([7, 7]), occ=np.array([0, 1]), occ_ts=np.array([9.0, 10.0]),
                      occ_pairs=np.array([0.0, 1.0]), occ_seq=np.array([6, 7]))


#: Event times a ``cooc`` record may carry: epoch seconds from 0 to before year 5138 (a caller that knows the clock
#: passes a tighter end: ``latest_ts``). A later time would move a shard's clock past every real event for good.
MIN_TS, MAX_TS = 0.0, 1e11
#: The largest weight, pair count or occurrence's pair count a record may carry: event weights are single digits
#: (:data:`~infogap.models.event_weights.DEFAULT_EVENT_WEIGHTS`, at most 8; a rating or a feature boost multiplies
#: them by a few) and an event makes at most ``window`` pairs; this leaves configured weights in the thousands room,
#: while sums of billions of updates stay far from overflow.
MAX_WEIGHT = 1e6
#: Sequence numbers are Kafka offsets of ``events``: below 2**53 (a million records a second for 285 years).
MAX_SEQ = 2 ** 53
#: A rescale by ``exp(-x)`` takes at most this ``x``: what is older is negligible (e**-100) either way, and the
#: factor stays above zero (a rescale divides by a power of it).
_MAX_RESCALE_EXPONENT = 100.0

#: The ``cooc`` partition whose owner runs the population learner, and the header value that marks its records.
POPULATION_PARTITION = 0
POPULATION_KIND = b"population"


def plausible_clock(t0: float | None, now: float) -> bool:
    """Whether a snapshot's ``t0`` (None: no event yet) and ``now`` (-inf: none yet) are times records could set.

    >>> plausible_clock(None, -math.inf), plausible_clock(1.7e9, 1.7e9 + 5), plausible_clock(math.nan, 1.7e9)
    (True, True, False)
    """
    return ((t0 is None or MIN_TS <= t0 <= MAX_TS) and (now == -math.inf or MIN_TS <= now <= MAX_TS))


def plausible_seqs(pairs: list) -> bool:
    """Whether a snapshot's ``[source, highest sequence number applied]`` pairs are ones records could set."""
    return all(type(p) is list and len(p) == 2 and type(p[0]) is int and type(p[1]) is int
               and 0 <= p[0] < 2 ** 31 and -1 <= p[1] < MAX_SEQ for p in pairs)


def owner(item_id: str, n_partitions: int) -> int:
    """The shard (``cooc`` partition) that owns an item's row: stable across processes and restarts.

    >>> owner("sku-7", 6) == owner("sku-7", 6), 0 <= owner("sku-7", 6) < 6
    (True, True)
    """
    return zlib.crc32(item_id.encode()) % n_partitions


@dataclass
class PairDeltas:
    """Slot updates and item occurrences, unscaled, with ids (index into ``items``), in event order.

    Slot update j: row item ``items[row[j]]``, neighbour ``items[nb[j]]`` gains ``d[j]``
    (w_dir, w_sym, n_pair, count) at time ``ts[j]``, made by the user of bit ``ubit[j]`` (0..63;
    :data:`~infogap.models.privacy.NO_USER` when unknown: a record from before the bits). Occurrence k: item
    ``items[occ[k]]`` was seen at ``occ_ts[k]`` and its event made ``occ_pairs[k]`` pairs.
    """

    items: list[str]
    row: np.ndarray
    nb: np.ndarray
    d: np.ndarray
    ts: np.ndarray
    seq: np.ndarray
    occ: np.ndarray
    occ_ts: np.ndarray
    occ_pairs: np.ndarray
    occ_seq: np.ndarray
    ubit: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.ubit is None:
            self.ubit = np.full(self.row.size, NO_USER, np.uint8)

    def __len__(self) -> int:
        return int(self.row.size)

    def split(self, owner: Callable[[str], int], n_parts: int) -> list[PairDeltas]:
        """One part per owner: its rows' slot updates (in order) and every occurrence."""
        own = np.fromiter(map(owner, self.items), np.int64, len(self.items))
        dest = own[self.row] if self.row.size else np.zeros(0, np.int64)
        out = []
        for p in range(n_parts):
            k = np.flatnonzero(dest == p)
            out.append(PairDeltas(self.items, self.row[k], self.nb[k], self.d[k], self.ts[k], self.seq[k],
                                  self.occ, self.occ_ts, self.occ_pairs, self.occ_seq, self.ubit[k]))
        return out

    def pieces(self, max_updates: int) -> list[PairDeltas]:
        """Consecutive pieces of at most about ``max_updates`` slot updates, cut between events.

        Each piece holds the updates and occurrences of a range of ``seq`` numbers, so a shard that
        applied a piece has applied everything up to its highest ``seq``, and skipping by ``seq``
        stays exact (an event's updates, at most ``2 * window``, are never cut apart).
        """
        if len(self) <= max_updates:
            return [self]
        cuts = np.unique(self.seq[max_updates::max_updates])
        lo, hi = np.r_[np.iinfo(np.int64).min, cuts], np.r_[cuts, np.iinfo(np.int64).max]
        out = []
        for a, b in zip(lo.tolist(), hi.tolist()):
            k = np.flatnonzero((self.seq >= a) & (self.seq < b))
            o = np.flatnonzero((self.occ_seq >= a) & (self.occ_seq < b))
            out.append(PairDeltas(self.items, self.row[k], self.nb[k], self.d[k], self.ts[k], self.seq[k],
                                  self.occ[o], self.occ_ts[o], self.occ_pairs[o], self.occ_seq[o], self.ubit[k]))
        return out

    def with_seq(self, seq_of: np.ndarray, base: int = 0) -> PairDeltas:
        """A copy whose ``seq`` numbers are mapped through ``seq_of[seq - base]`` (e.g. to Kafka offsets)."""
        return PairDeltas(self.items, self.row, self.nb, self.d, self.ts, seq_of[self.seq - base], self.occ,
                          self.occ_ts, self.occ_pairs, seq_of[self.occ_seq - base], self.ubit)

    def to_bytes(self) -> bytes:
        """A compact binary form: a JSON header (ids, sizes, layout), then the arrays' raw bytes.

        An update's time and sequence number are its event's, which the occurrences hold: each update
        carries the index of its event's occurrence instead (4 bytes, not 16). ``n_pair`` and
        ``count`` are left out when every update has 1 for both (as learning from events gives).
        About 29 bytes an update instead of 56: the last is the update's user bit (format 2, ``"v": 2``).
        """
        at = self._event_index()
        by_event = at is not None
        ones = bool(np.all(self.d[:, 2:] == 1.0))
        arrays = [np.ascontiguousarray(self.row, np.int32), np.ascontiguousarray(self.nb, np.int32)]
        arrays += [at] if by_event else [np.ascontiguousarray(self.ts, np.float64),
                                         np.ascontiguousarray(self.seq, np.int64)]
        arrays += [np.ascontiguousarray(self.occ, np.int32), np.ascontiguousarray(self.occ_ts, np.float64),
                   np.ascontiguousarray(self.occ_pairs, np.float64), np.ascontiguousarray(self.occ_seq, np.int64),
                   np.ascontiguousarray(self.d[:, :2] if ones else self.d, np.float64),
                   np.ascontiguousarray(self.ubit, np.uint8)]
        head = orjson.dumps({"v": 2, "items": self.items, "n": int(self.row.size), "n_occ": int(self.occ.size),
                             "by_event": by_event, "ones": ones})
        return len(head).to_bytes(4, "big") + head + b"".join(a.tobytes() for a in arrays)

    def _event_index(self) -> np.ndarray | None:
        """Each update's index among the occurrences (its event's), or None if an update has none."""
        if not self.row.size:
            return np.zeros(0, np.int32)
        if not self.occ.size:
            return None
        at = np.searchsorted(self.occ_seq, self.seq).clip(max=self.occ.size - 1)
        same = np.array_equal(self.occ_seq[at], self.seq) and np.array_equal(self.occ_ts[at], self.ts)
        return at.astype(np.int32) if same else None

    @classmethod
    def from_bytes(cls, raw: bytes, latest_ts: float = MAX_TS) -> PairDeltas:
        """Read :meth:`to_bytes`'s form back, checked (:meth:`_checked`; ``latest_ts``: the latest event time
        accepted). The forms written before the user bits (the full layout, and the compact one without
        ``"v": 2``) read with no user bit on any update.

        >>> d = _example(); d.row = np.array([7, 1])  # row 7 of two items
        >>> try:
        ...     PairDeltas.from_bytes(d.to_bytes())
        ... except ValueError as exc:
        ...     print(exc)
        cooc record: an index out of range (0..1 items)
        """
        n = int.from_bytes(raw[:4], "big")
        head = orjson.loads(raw[4: 4 + n])
        pos = 4 + n
        if not (isinstance(head, dict) and isinstance(head.get("items"), list)
                and all(type(i) is str for i in head["items"])):
            raise ValueError("cooc record: its header has no list of item ids")
        if "sizes" in head:  # written before the compact layout: every array in full
            arrays = {}
            for (name, dt), size in zip(_ARRAYS + (("d", np.float64),), head["sizes"]):
                arrays[name] = np.frombuffer(raw, dt, size, pos)
                pos += size * np.dtype(dt).itemsize
            arrays["d"] = arrays["d"].reshape(-1, 4)
            return cls(items=head["items"], **arrays)._checked(latest_ts)
        k, m, version = head["n"], head["n_occ"], head.get("v", 1)
        if not (type(k) is int and type(m) is int and 0 <= k and 0 <= m and isinstance(head.get("by_event"), bool)
                and isinstance(head.get("ones"), bool) and version in (1, 2)):
            raise ValueError("cooc record: bad sizes in its header")
        layout = [("row", np.int32, k), ("nb", np.int32, k)]
        layout += [("at", np.int32, k)] if head["by_event"] else [("ts", np.float64, k), ("seq", np.int64, k)]
        layout += [("occ", np.int32, m), ("occ_ts", np.float64, m), ("occ_pairs", np.float64, m),
                   ("occ_seq", np.int64, m), ("d", np.float64, k * (2 if head["ones"] else 4))]
        if version >= 2:
            layout.append(("ubit", np.uint8, k))
        a = {}
        for name, dt, size in layout:
            a[name] = np.frombuffer(raw, dt, size, pos)
            pos += size * np.dtype(dt).itemsize
        if pos != len(raw):
            raise ValueError(f"cooc record of {len(raw)} bytes, its header says {pos}")
        if head["by_event"]:
            if k and (not m or a["at"].min() < 0 or a["at"].max() >= m):
                raise ValueError("cooc record: an index out of range (an update's event)")
            a["ts"], a["seq"] = a["occ_ts"][a["at"]], a["occ_seq"][a["at"]]
            del a["at"]
        d = a["d"].reshape(k, 2 if head["ones"] else 4)
        if head["ones"]:
            d = np.hstack([d, np.ones((k, 2))])
        a["d"] = d
        return cls(items=head["items"], **a)._checked(latest_ts)

    def _checked(self, latest_ts: float = MAX_TS) -> PairDeltas:
        """``ValueError`` unless every index points inside its table (a shard indexes its arrays with them), every
        id is at most :data:`~infogap.models.catalog.MAX_ID_CHARS` characters, every time is in
        [:data:`MIN_TS`, ``latest_ts``] and every weight and count in [0, :data:`MAX_WEIGHT`] (NaN is neither)."""
        n = len(self.items)
        for idx in (self.row, self.nb, self.occ):
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"cooc record: an index out of range (0..{n - 1} items)")
        if n and not 0 < min(map(len, self.items)) <= max(map(len, self.items)) <= MAX_ID_CHARS:
            raise ValueError(f"cooc record: an item id empty or over {MAX_ID_CHARS} characters")
        latest_ts = min(latest_ts, MAX_TS)
        for x in (self.ts, self.occ_ts):
            if x.size and not (MIN_TS <= x.min() and x.max() <= latest_ts):  # (NaN fails both)
                raise ValueError(f"cooc record: an event time outside [{MIN_TS:.0f}, {latest_ts:.0f}] "
                                 f"(epoch seconds; check the user stage's clock)")
        for x in (self.d, self.occ_pairs):
            if x.size and not (0.0 <= x.min() and x.max() <= MAX_WEIGHT):
                raise ValueError(f"cooc record: a weight or pair count outside [0, {MAX_WEIGHT:g}]")
        if self.ubit.size != self.row.size or (self.ubit.size and np.any((self.ubit >= BITS) & (self.ubit != NO_USER))):
            raise ValueError("cooc record: a user bit out of range")
        if (self.seq.size and self.seq.min() < 0) or (self.occ_seq.size and self.occ_seq.min() < 0):
            raise ValueError("cooc record: a negative sequence number")
        if (self.seq.size and self.seq.max() >= MAX_SEQ) or (self.occ_seq.size and self.occ_seq.max() >= MAX_SEQ):
            raise ValueError("cooc record: a sequence number of 2**53 or more (not a Kafka offset)")
        return self


class CoOccurrenceShard:
    """The co-occurrence rows of the items one stream partition owns, learned from :class:`PairDeltas`.

    Parameters are those of :class:`~infogap.models.cooccurrence.CoOccurrence` (``min_users``: the privacy
    floor of what :meth:`similar` publishes and :meth:`export_row` marks public; ``floor_votes``: whether the slots
    below it are left out of the rows exported to vote). ``sources`` holds, per source, the
    highest ``seq`` applied (updates at or below it are skipped).
    """

    def __init__(self, n_neighbours: int = 400, half_life_days: float | None = 200.0, evict_fraction: float = 0.5,
                 pop_exponent: float = 0.2, door_bits: int = 22, evict_sym_weight: float = 0.5, min_users: int = 1,
                 floor_votes: bool = False):
        self.co = CoOccurrence(n_neighbours=n_neighbours, half_life_days=half_life_days,
                               evict_fraction=evict_fraction, pop_exponent=pop_exponent, door_bits=door_bits,
                               evict_sym_weight=evict_sym_weight, min_users=min_users, floor_votes=floor_votes)
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []
        self.sources: dict[int, int] = {}
        self.t0: float | None = None
        self.now = -math.inf
        self.n_occurrences = 0

    @classmethod
    def for_engine(cls, config) -> CoOccurrenceShard:
        """A shard with an :class:`~infogap.models.engine.EngineConfig`'s co-occurrence settings."""
        return cls(n_neighbours=config.n_neighbours, half_life_days=config.cooc_half_life_days,
                   evict_fraction=config.evict_fraction, pop_exponent=config.pop_exponent,
                   door_bits=config.door_bits, evict_sym_weight=config.sym_weight, min_users=config.min_users,
                   floor_votes=config.floor_votes)

    def to_state(self) -> dict:
        """The shard as a plain tree for a snapshot (:mod:`infogap.models.state_fields`)."""
        return {"co": self.co.to_state(), "ids": self._ids, "sources": [[s, n] for s, n in self.sources.items()],
                "t0": None if self.t0 is None else encode_float(self.t0), "now": encode_float(self.now),
                "n_occurrences": self.n_occurrences}

    @classmethod
    def from_state(cls, state, arrays=(), where: str = "cooc shard") -> CoOccurrenceShard:
        """Rebuild from :meth:`to_state`; :class:`~infogap.models.state_fields.StateError` if it does not fit.

        >>> s = CoOccurrenceShard(n_neighbours=8, door_bits=0)
        >>> s.apply(PairDeltas.from_bytes(_example().to_bytes()), source=0)
        >>> back = CoOccurrenceShard.from_state(s.to_state())
        >>> back.similar("tea", min_support=1) == s.similar("tea", min_support=1), back.sources
        (True, {0: 7})
        """
        f = check(state, {"co": dict, "ids": list, "sources": list, "t0": (float, type(None)), "now": float,
                          "n_occurrences": int}, where, arrays)
        shard = cls.__new__(cls)
        shard.co = CoOccurrence.from_state(f["co"], arrays, f"{where}: co")
        ids = f["ids"]
        if not all(type(i) is str for i in ids) or len(set(ids)) != len(ids) or len(ids) > shard.co.block.shape[0]:
            raise StateError(f"{where}: 'ids' must be distinct strings, at most one per row")
        if not plausible_seqs(f["sources"]):
            raise StateError(f"{where}: 'sources' must be [source, sequence number below 2**53] pairs")
        if not plausible_clock(f["t0"], f["now"]):
            raise StateError(f"{where}: 't0' and 'now' must be event times (epoch seconds up to {MAX_TS:g})")
        shard._ids, shard._rows = ids, {i: r for r, i in enumerate(ids)}
        shard.sources = {s: n for s, n in f["sources"]}
        shard.t0, shard.now, shard.n_occurrences = f["t0"], f["now"], f["n_occurrences"]
        return shard

    def _row(self, item_id: str) -> int:
        r = self._rows.get(item_id)
        if r is None:
            r = self._rows[item_id] = len(self._ids)
            self._ids.append(item_id)
        return r

    def apply(self, deltas: PairDeltas, source: int) -> None:
        """Apply the updates of ``source`` newer than what was applied from it, in order (``deltas`` checked, as
        :meth:`PairDeltas.from_bytes` gives them: nothing here raises once the shard starts changing)."""
        done = self.sources.get(source, -1)
        occ_new = deltas.occ_seq > done
        new = deltas.seq > done
        if not occ_new.any() and not new.any():
            return
        co = self.co
        times = np.concatenate([deltas.occ_ts[occ_new], deltas.ts[new]])
        t0 = float(times.min()) if self.t0 is None else self.t0
        newest = float(times.max())
        if not (math.isfinite(t0) and math.isfinite(newest)):
            raise ValueError("cooc record: an event time that is not a finite number")
        rows = np.fromiter(map(self._row, deltas.items), np.int64, len(deltas.items))
        co.ensure(len(self._ids))
        self.t0 = t0
        if co.lam * (newest - t0) > RENORM_EXPONENT:
            co.rescale(math.exp(-min(co.lam * (newest - t0), _MAX_RESCALE_EXPONENT)))
            self.t0 = newest
        self.now = max(self.now, newest)
        if occ_new.any():
            occ_scale = np.exp(co.lam * (deltas.occ_ts[occ_new] - self.t0))
            co.add_occurrences(rows[deltas.occ[occ_new]].tolist(), occ_scale.tolist())
            co.pair_total += float(np.dot(deltas.occ_pairs[occ_new], occ_scale))
            co.raw_pair_total += float(deltas.occ_pairs[occ_new].sum())
            before = self.n_occurrences
            self.n_occurrences += int(occ_new.sum())
            if self.n_occurrences // DOOR_PERIOD != before // DOOR_PERIOD:
                co.reset_door()
        if new.any():
            d = deltas.d[new].copy()
            d[:, :3] *= np.exp(co.lam * (deltas.ts[new] - self.t0))[:, None]
            codes = (rows[deltas.row[new]] << _SHIFT) | rows[deltas.nb[new]]
            pair_total = co.pair_total
            co.update(codes, d, deltas.ubit[new])
            co.pair_total = pair_total  # counted once per pair from the occurrences, not per owned slot
        self.sources[source] = max(done, int(deltas.seq.max(initial=-1)), int(deltas.occ_seq.max(initial=-1)))

    def _decay(self) -> float:
        return 1.0 if self.t0 is None else math.exp(-self.co.lam * (self.now - self.t0))

    def set_floor(self, min_users: int, floor_votes: bool = False) -> None:
        """Publish from now on only what ``min_users`` distinct users made, and under ``floor_votes`` export only
        that to vote (a configuration read after a restore: :meth:`infogap.models.cooccurrence.CoOccurrence.set_floor`)."""
        self.co.set_floor(min_users, floor_votes)

    def owned(self) -> list[str]:
        """Ids of the items that have a non-empty row here."""
        fill, block = self.co.fill, self.co.block
        return [i for r, i in enumerate(self._ids) if fill[block[r]]]

    def similar(self, item_id: str, n: int = 10, min_support: int = 2,
                eligible: Callable[[str], bool] | None = None) -> list[Neighbour]:
        """Published neighbours of an owned item, as :meth:`infogap.models.engine.Engine.similar` gives them."""
        r = self._rows.get(item_id)
        if r is None or n <= 0:
            return []
        nb, cos, support, conf, lift = self.co.published(r, min_support)
        support = support * self._decay()
        ids, out = self._ids, []
        step = 2 * n  # rows hold hundreds of neighbours, nearly all eligible: converted a few more than n at a time
        for lo in range(0, nb.size, step):
            part = slice(lo, lo + step)
            for b, c, s, cf, lf in zip(nb[part].tolist(), cos[part].tolist(), support[part].tolist(),
                                       conf[part].tolist(), lift[part].tolist()):
                b_id = ids[b]
                if eligible is None or eligible(b_id):
                    out.append(_new(Neighbour, (b_id, c, s, cf, lf)))
                    if len(out) == n:
                        return out
        return out

    def export_row(self, item_id: str) -> dict | None:
        """Row of an owned item for a read-side copy (:meth:`infogap.models.engine.Engine.load_rows`).

        Decayed values are as of ``t`` (the newest event time applied), not of a reference time.
        ``numbers`` are the neighbours' rows in this shard: they only grow, so a reader can translate
        them once (:meth:`infogap.models.catalog.Catalog.translated`) instead of looking every id up again.
        The neighbours that vote are exported; ``private`` lists the positions of those below the privacy floor
        (the reader's ranking may use them, its reasons and :meth:`similar` never do). Under ``floor_votes`` those
        do not vote and are not exported: a pair fewer than ``min_users`` users made then never leaves the item
        stage (``ig:nbrow`` is in Redis).
        """
        r = self._rows.get(item_id)
        if r is None:
            return None
        co = self.co
        slots = co.slots(r, voting=True)
        nb, w_dir, w_sym, n_pair, count = co.neighbours(r, slots=slots)
        decay = self._decay()
        values = np.vstack([w_dir * decay, w_sym * decay, n_pair * decay, count])
        row = {"item_id": item_id, "t": self.now, "pop": float(co.pop[r]) * decay,
               "total": co.total * decay, "pair_total": co.pair_total * decay,
               "neighbours": [self._ids[b] for b in nb.tolist()], "numbers": nb.astype(np.int64), "values": values,
               "neighbour_pop": co.pop[nb] * decay}
        if co.min_users > co.vote_min_users:  # (under floor_votes every exported slot is at the floor)
            row["private"] = np.flatnonzero(~co.is_public(slots))
        if not math.isnan(co.raw_pair_total):  # raw counts, for lift (a shard from before them has none)
            row.update(raw_pop=float(co.raw_pop[r]), raw_total=co.raw_total, raw_pair_total=co.raw_pair_total,
                       neighbour_raw_pop=co.raw_pop[nb])
        return row
