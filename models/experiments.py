"""Experiments and their return: variant assignment, attribution of feedback, metrics with intervals.

Pure business rules (standard library only, no I/O, no clock reads: time is ``event.ts`` and a
message's ``created_at``). Three pieces:

* :class:`Experiment` assigns a user to a variant by hashing ``(experiment, user)`` into weighted
  buckets (blake2b, so the same in every process and on every machine), and carries each variant's
  ranker overrides (checked by :func:`validate_overrides`; the worker passes them to the engine).
* :class:`ExperimentMetrics` counts the pushes sent (:meth:`~ExperimentMetrics.record_send`) and
  attributes feedback events (:meth:`~ExperimentMetrics.observe`) to a :class:`Segment` =
  ``(shard, campaign, channel, variant)``; it keeps no user id in its aggregates.
* :class:`Figures` turns a segment's :class:`Counts` into rates, revenue and ROI with 95 % intervals.

Definitions (per segment; ``sent`` is the denominator of every rate, because every message sent has a
cost, whatever the channel reports back):

* ``ctr = clicks / sent``, ``open_rate = opens / sent``, ``conversion_rate = conversions / sent``,
  each with a Wilson score interval.
* ``revenue_per_message = revenue / sent`` with a normal-approximation interval: the sample is the
  revenue of each message (0 for most), its variance from ``revenue_sq`` (sum of squared per-message
  revenue).
* ``roi = (revenue - cost) / cost``. The cost is known exactly once the sends are known, so the
  interval of ROI is the interval of revenue (``sent`` times that of revenue per message) shifted and
  scaled: ``(revenue_bound - cost) / cost``. ``None`` when the cost is 0.

Attribution of a feedback event (types impression, push_open, push_click, click, purchase):

1. ``context.message_id`` of a message recorded by :meth:`~ExperimentMetrics.record_send`: that
   message's campaign, channel and variant;
2. else ``context.campaign`` (with ``context.channel`` and ``context.variant``, "unknown"/"none" when
   missing): the segment named by the context, if ``MetricsConfig.campaigns``/``variants`` know it
   (else the event is ``unattributed``; past ``max_segments`` it is counted in ``overflow``), and
   with no such lists the message id, if any, is remembered for dedupe;
3. else, for a click or purchase only, last touch: the message of the user's latest attributed
   push_open or push_click, if the event is at most ``attribution_window_s`` after it.

Each message counts at most one impression, one open, one click and one conversion; revenue sums
every attributed purchase's ``value``. Opens count push_open events only (a click does not imply an
open). Events attributed by context alone with no message id cannot be deduplicated and each counts.

>>> exp = Experiment("ranker-v2", {"A": 0.5, "B": 0.5}, overrides={"B": {"max_category_share": 0.3}})
>>> exp.assign("u42"), exp.assign("u7")
('B', 'A')
>>> exp.overrides_for("B")
{'max_category_share': 0.3}
>>> m = ExperimentMetrics(MetricsConfig(cost_per_message={"email": 0.5}))
>>> m.record_send({"message_id": "m1", "user_id": "u42", "channel": "email", "campaign": "recs",
...                "variant": "B", "items": [], "created_at": 1000.0})
True
>>> m.observe({"event_id": "e1", "user_id": "u42", "type": "push_click", "ts": 1100.0,
...            "context": {"message_id": "m1"}})
True
>>> m.observe({"event_id": "e2", "user_id": "u42", "type": "purchase", "item_id": "sku-1", "ts": 1200.0,
...            "value": 20.0})  # no context: last touch, within the window after the push_click
True
>>> f = Figures.from_counts(m.counts()[Segment(0, "recs", "email", "B")])
>>> f.sent, f.clicks, f.conversions, f.revenue, f.cost, f.roi
(1, 1, 1, 20.0, 0.5, 39.0)
"""
from __future__ import annotations

import difflib
import hashlib
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, astuple, dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np

from infogap.models.events import Event, as_event
from infogap.models.privacy import bit_count, user_mask
from infogap.models.state_fields import StateError, check, decode_float, encode_float

#: z of a two-sided 95 % interval.
Z95 = 1.959963984540054
#: Variant label of messages sent outside any experiment (``variant`` null).
NO_VARIANT = "none"
#: Channel or campaign label when a context names none.
UNKNOWN = "unknown"
#: Feedback types that :meth:`ExperimentMetrics.observe` looks at; others are ignored cheaply.
FEEDBACK_TYPES = frozenset({"impression", "push_open", "push_click", "click", "purchase"})
_LAST_TOUCH_TYPES = frozenset({"click", "purchase"})
_TOUCH_TYPES = frozenset({"push_open", "push_click"})
_SENT, _IMPRESSED, _OPENED, _CLICKED, _CONVERTED = 1, 2, 4, 8, 16
_OVERFLOW = object()  # a context's new segment past ``max_segments``


# ---------------------------------------------------------------------------------------- hashing
def unit_hash(*parts: object) -> float:
    """A number in [0, 1) from the parts, the same in every process (blake2b, not ``hash()``).

    >>> unit_hash("ranker-v2", "u42") == unit_hash("ranker-v2", "u42"), 0 <= unit_hash("x") < 1
    (True, True)
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def kafka_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2 of its UTF-8 bytes).

    Used to shard metrics like the ``events`` topic (key = user_id), so that each shard has one
    writer: the worker that owns that partition.

    >>> kafka_partition("u42", 6), kafka_partition("u42", 1)
    (5, 0)
    """
    if partitions <= 1:
        return 0
    return (_murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions


def _murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), unsigned 32-bit."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    n4 = length // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i: 4 * i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    rest = length % 4
    tail = 4 * n4
    if rest >= 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


# ---------------------------------------------------------------------------------------- assignment
@dataclass(frozen=True)
class Experiment:
    """A randomised experiment: users hashed into weighted variant buckets.

    Parameters
    ----------
    name
        Also the salt of the hash: a new name reshuffles every user.
    variants
        Variant name -> weight (any positive numbers, normalised). The order given is the order of the
        buckets on [0, 1): keep it when editing weights, so only the users near a moved boundary switch.
    overrides
        Variant name -> ranker settings (blend weights, diversity share, ...: keys of
        :data:`RANKER_OVERRIDES`), checked and normalised here with :func:`validate_overrides`; the
        worker passes a user's variant's to ``Engine.recommend(..., overrides=...)`` (``INFOGAP_EXPERIMENT``'s
        ``"overrides"``). Variants without an entry use the defaults.

    Examples
    --------
    >>> exp = Experiment("winter", {"control": 9, "new": 1})
    >>> exp.assign("u1"), exp.assign("u1") == Experiment("winter", {"control": 9, "new": 1}).assign("u1")
    ('control', True)
    >>> Experiment.from_spec({"name": "winter", "variants": {"A": 1, "B": 1}}).variants
    {'A': 1.0, 'B': 1.0}
    """

    name: str
    variants: Mapping[str, float]
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("an experiment needs a non-empty 'name'")
        if not self.variants:
            raise ValueError(f"experiment {self.name!r} needs at least one variant, e.g. {{'A': 0.5, 'B': 0.5}}")
        weights = {}
        for v, w in self.variants.items():
            if not isinstance(v, str) or not v or ":" in v or "|" in v:
                raise ValueError(f"variant name {v!r} of experiment {self.name!r} must be a non-empty string "
                                 "without ':' or '|'")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"variant {v!r} of experiment {self.name!r} has weight {w!r}; use a positive number")
            weights[v] = float(w)
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides of experiment {self.name!r} must map variant -> ranker settings")
        unknown = set(self.overrides) - set(weights)
        if unknown:
            raise ValueError(f"overrides name variants {sorted(unknown)} that experiment {self.name!r} does not have")
        checked = {}
        for v, ov in self.overrides.items():
            try:
                checked[v] = validate_overrides(ov)
            except ValueError as e:
                raise ValueError(f"experiment {self.name!r}, variant {v!r}: {e}") from None
        total = sum(weights.values())
        bounds, acc = [], 0.0
        for w in weights.values():
            acc += w / total
            bounds.append(acc)
        bounds[-1] = 1.0
        object.__setattr__(self, "variants", weights)
        object.__setattr__(self, "overrides", {k: v for k, v in checked.items() if v})
        object.__setattr__(self, "_names", tuple(weights))
        object.__setattr__(self, "_bounds", tuple(bounds))

    @classmethod
    def from_spec(cls, spec: Mapping) -> Experiment:
        """From a settings document ``{"name": ..., "variants": {...}, "overrides": {...}}``."""
        if not isinstance(spec, Mapping):
            raise ValueError("an experiment spec must be an object with 'name' and 'variants'")
        return cls(spec.get("name"), spec.get("variants") or {}, spec.get("overrides") or {})

    def bucket(self, user_id: str) -> float:
        """The user's point on [0, 1) in this experiment."""
        return unit_hash(self.name, user_id)

    def assign(self, user_id: str) -> str:
        """The user's variant: always the same for the same experiment name, variants and weights."""
        u = self.bucket(user_id)
        for name, bound in zip(self._names, self._bounds):
            if u < bound:
                return name
        return self._names[-1]

    def overrides_for(self, variant: str) -> dict:
        """Ranker settings of ``variant`` (a copy; empty for a variant with the defaults)."""
        return dict(self.overrides.get(variant, {}))


#: The ranker settings a variant may change per request (``Engine.recommend(..., overrides=...)``):
#: the fields of ``EngineConfig`` that :mod:`infogap.models.ranker` reads at query time -> (type, low, high,
#: low excluded). Everything else is fixed per engine because it is learned into the state: windows,
#: decays and half-lives of the learning, ``pop_exponent`` (folded into the stored popularity
#: normaliser ``ipop``), ``min_support`` (a privacy threshold, not a ranking knob).
RANKER_OVERRIDES: dict[str, tuple[type, float, float, bool]] = {
    "query_len": (int, 1, math.inf, False),  # also <= history_len, checked by the engine's config
    "query_dir_len": (int, 0, math.inf, False),
    "query_dir_decay": (float, 0.0, 1.0, False),
    "query_sym_decay": (float, 0.0, 1.0, False),
    "query_gap_tau_s": (float, 0.0, math.inf, True),
    "query_gap_floor": (float, 0.0, 1.0, False),
    "sym_weight": (float, 0.0, math.inf, False),
    "momentum": (float, 0.0, math.inf, False),
    "w_cooc": (float, 0.0, math.inf, False),
    "w_segment": (float, 0.0, math.inf, False),
    "w_global": (float, 0.0, math.inf, False),
    "w_content": (float, 0.0, math.inf, False),
    "content_history": (int, 0, math.inf, False),
    "w_cart": (float, 0.0, math.inf, False),
    "max_category_share": (float, 0.0, 1.0, True),
    "new_item_slots": (int, 0, math.inf, False),
    "new_item_days": (float, 0.0, math.inf, False),
    "new_item_max_events": (int, 0, math.inf, False),
    "new_item_min_share": (float, 0.0, 1.0, False),
    "reason_min_support": (int, 1, math.inf, False),  # never below min_support: the ranker takes the larger
    "review_dislike": (float, 0.0, math.inf, False),
}


def validate_overrides(overrides: Mapping[str, Any] | None) -> dict[str, float]:
    """Check a variant's ranker overrides; returns them normalised (sorted keys, int or float values).

    Keys must be in :data:`RANKER_OVERRIDES`; values finite numbers in range (booleans are refused;
    integer settings take whole numbers, ``5.0`` included). Raises ``ValueError`` naming the key.

    >>> validate_overrides({"w_segment": 0.5, "new_item_slots": 2.0, "max_category_share": 1})
    {'max_category_share': 1.0, 'new_item_slots': 2, 'w_segment': 0.5}
    >>> validate_overrides({"w_segmnt": 0.5})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: 'w_segmnt' is not a ranker setting ... (did you mean 'w_segment'?); allowed: content_history, ...
    >>> validate_overrides({"max_category_share": 0})
    Traceback (most recent call last):
    ...
    ValueError: ranker override max_category_share=0 must be in (0, 1]
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"ranker overrides must be a mapping of setting -> number, got {type(overrides).__name__}")
    out: dict[str, float] = {}
    for key, value in overrides.items():
        spec = RANKER_OVERRIDES.get(key) if isinstance(key, str) else None
        if spec is None:
            close = difflib.get_close_matches(str(key), RANKER_OVERRIDES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key!r} is not a ranker setting that can change per request{hint}; "
                             f"allowed: {', '.join(sorted(RANKER_OVERRIDES))}")
        kind, lo, hi, lo_open = spec
        raw = value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"ranker override {key}={value!r} must be a finite number")
        if kind is int:
            if value != int(value):
                raise ValueError(f"ranker override {key}={value!r} must be a whole number")
            value = int(value)
        else:
            value = float(value)
        if value < lo or (lo_open and value == lo) or value > hi:
            low = f"{'(' if lo_open else '['}{lo:g}"
            what = f"> {lo:g}" if lo_open else f">= {lo:g}"
            raise ValueError(f"ranker override {key}={raw!r} must be "
                             f"{what if hi == math.inf else f'in {low}, {hi:g}]'}")
        out[key] = value
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------- statistics
def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``k / n`` (``k`` capped at ``n``); None when ``n == 0``.

    >>> tuple(round(x, 4) for x in wilson(10, 100))
    (0.0552, 0.1744)
    """
    if n <= 0:
        return None
    p = min(k, n) / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(total: float, total_sq: float, n: float, z: float = Z95) -> tuple[float, float] | None:
    """Normal-approximation interval of a mean from the sum and the sum of squares of ``n`` values.

    Uses the sample variance (``n - 1``); None for fewer than two values.

    >>> [round(x, 3) for x in mean_interval(10.0, 50.0, 4)]  # values 0, 5, 5, 0: mean 2.5, s = 2.887, se = 1.443
    [-0.329, 5.329]
    """
    if n < 2:
        return None
    mean = total / n
    var = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    half = z * math.sqrt(var / n)
    return mean - half, mean + half


# ---------------------------------------------------------------------------------------- counts
class Segment(NamedTuple):
    """What metrics are kept per: the shard (a partition of ``events``), campaign, channel and variant."""

    shard: int
    campaign: str
    channel: str
    variant: str


@dataclass(slots=True)
class Counts:
    """Additive sums of one segment (what the store persists)."""

    sent: int = 0
    impressions: int = 0
    opens: int = 0
    clicks: int = 0
    conversions: int = 0
    revenue: float = 0.0
    revenue_sq: float = 0.0  # sum over messages of (revenue of the message) ** 2
    cost: float = 0.0
    #: the users behind these counts, as a 64-bit bitmap (one bit per user, :mod:`infogap.models.privacy`): a cell
    #: is shown only once it shows ``min_users`` users; summed over shards and segments with OR, not +
    users: int = 0

    def add(self, other: Counts) -> Counts:
        """Add ``other`` into this one (in place; the user bitmaps ORed) and return self."""
        for f in fields(Counts):
            if f.name == "users":
                self.users |= other.users
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def copy(self) -> Counts:
        return Counts(**asdict(self))

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Counts:
        """From stored values (strings accepted); unknown fields ignored, missing ones 0 (the user bitmap too: counts
        stored before it show no user, so they are shown only once new users fill it).

        >>> Counts.from_dict({"sent": "3", "users": str(2 ** 63 + 1)}).users == 2 ** 63 + 1
        True
        """
        out = cls()
        for f in fields(cls):
            if f.name in d:
                # (the bitmap exactly: as a float it would lose its low bits)
                setattr(out, f.name, stored_value(d[f.name], "bitmap" if f.name == "users" else f.type, f.name))
        return out


COUNT_FIELDS = tuple(f.name for f in fields(Counts))
#: the largest count a store value may hold (exact as a float) and the largest amount of money, in absolute value
MAX_STORED_COUNT, MAX_STORED_MONEY = 2 ** 53, 1e15


def stored_value(raw, kind: str, name: str = "value") -> int | float:
    """One stored count as the store returns it (bytes or str) as a number of ``kind`` (``"int"``: a count,
    ``"float"``: money, ``"bitmap"``: 64 user bits); ``ValueError`` for what no worker writes: not UTF-8, not a
    number, not finite, a negative count or bitmap, beyond :data:`MAX_STORED_COUNT` or :data:`MAX_STORED_MONEY`,
    a squared or cost field below 0. The readers leave out the cell that holds one (the console, the report).

    >>> stored_value(b"3", "int"), stored_value("2.5", "float"), stored_value(b"18446744073709551615", "bitmap")
    (3, 2.5, 18446744073709551615)
    >>> stored_value(b"-1", "bitmap", "users")
    Traceback (most recent call last):
    ValueError: stored users is '-1', not a 64-bit bitmap
    """
    text = raw.decode() if isinstance(raw, bytes) else str(raw)  # (UnicodeDecodeError is a ValueError)
    if kind == "bitmap":
        if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < 1 << 64):
            raise ValueError(f"stored {name} is {text[:40]!r}, not a 64-bit bitmap")
        return int(text)
    if len(text) > 40:
        raise ValueError(f"stored {name} is {len(text)} characters long, not a number")
    value = float(text)
    low = 0.0 if kind == "int" or name.endswith("_sq") or name == "cost" else -MAX_STORED_MONEY
    high = MAX_STORED_COUNT if kind == "int" else MAX_STORED_MONEY ** (2 if name.endswith("_sq") else 1)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"stored {name} is {text!r}, outside [{low:g}, {high:g}]")
    return int(value) if kind == "int" else value


@dataclass(frozen=True, slots=True)
class Figures:
    """Rates, revenue and ROI of some counts, with 95 % intervals (None where undefined)."""

    sent: int
    impressions: int
    opens: int
    clicks: int
    conversions: int
    revenue: float
    cost: float
    open_rate: float | None
    open_rate_ci: tuple[float, float] | None
    ctr: float | None
    ctr_ci: tuple[float, float] | None
    conversion_rate: float | None
    conversion_rate_ci: tuple[float, float] | None
    revenue_per_message: float | None
    revenue_per_message_ci: tuple[float, float] | None
    roi: float | None
    roi_ci: tuple[float, float] | None
    #: distinct users behind the figures, at least (the bits set in the counts' user bitmap)
    users: int = 0

    def shown(self, min_users: int) -> bool:
        """Whether the figures may be shown: at least ``min_users`` users behind them (the privacy floor; 1: always),
        or nothing at all (no person stands behind zeros).

        >>> Figures.from_counts(Counts(sent=40, users=0b111)).shown(5), Figures.from_counts(Counts(sent=1)).shown(1)
        (False, True)
        >>> Figures.from_counts(Counts()).shown(5)
        True
        """
        return (min_users <= 1 or self.users >= min_users
                or not (self.sent or self.impressions or self.opens or self.clicks or self.conversions or self.revenue))

    @classmethod
    def from_counts(cls, c: Counts, z: float = Z95) -> Figures:
        n = c.sent
        rate = (lambda k: k / n) if n else (lambda k: None)
        rpm_ci = mean_interval(c.revenue, c.revenue_sq, n, z)
        roi = (c.revenue - c.cost) / c.cost if c.cost > 0 else None
        roi_ci = None
        if roi is not None and rpm_ci is not None:
            roi_ci = ((rpm_ci[0] * n - c.cost) / c.cost, (rpm_ci[1] * n - c.cost) / c.cost)
        return cls(sent=n, impressions=c.impressions, opens=c.opens, clicks=c.clicks, conversions=c.conversions,
                   revenue=c.revenue, cost=c.cost,
                   open_rate=rate(c.opens), open_rate_ci=wilson(c.opens, n, z),
                   ctr=rate(c.clicks), ctr_ci=wilson(c.clicks, n, z),
                   conversion_rate=rate(c.conversions), conversion_rate_ci=wilson(c.conversions, n, z),
                   revenue_per_message=rate(c.revenue), revenue_per_message_ci=rpm_ci, roi=roi, roi_ci=roi_ci,
                   users=bit_count(c.users))


def summarize(counts: Mapping[Segment, Counts], by: Iterable[str] = ("campaign", "channel", "variant"),
              z: float = Z95) -> dict[tuple, Figures]:
    """Figures grouped by some of ``Segment``'s fields, summing the others (shards always summed).

    >>> c = {Segment(0, "recs", "email", "A"): Counts(sent=2, clicks=1), Segment(1, "recs", "email", "A"): Counts(sent=2)}
    >>> summarize(c, by=("variant",))[("A",)].ctr
    0.25
    """
    by = tuple(by)
    bad = set(by) - set(Segment._fields)
    if bad:
        raise ValueError(f"cannot group by {sorted(bad)}; use some of {Segment._fields}")
    sums: dict[tuple, Counts] = {}
    for seg, c in counts.items():
        key = tuple(getattr(seg, f) for f in by)
        sums.setdefault(key, Counts()).add(c)
    return {k: Figures.from_counts(v, z) for k, v in sorted(sums.items())}


def hidden_cells(counts: Mapping[Segment, Counts], min_users: int,
                 by: Iterable[str] = ("variant", "campaign", "channel"), total_by: Iterable[str] = ("variant",)) -> set:
    """The cells of :func:`summarize` (``by``) and their totals (``total_by``, a prefix of ``by``) that must not be
    shown under the privacy floor: a cell with fewer than ``min_users`` distinct users behind it, and a total whose
    hidden cells together stand on fewer than ``min_users`` users (its figures minus the shown cells' would give
    theirs away). Keys as :func:`summarize` gives them; empty when ``min_users <= 1``.

    >>> c = {Segment(0, "recs", "email", "A"): Counts(sent=9, users=0b111111), Segment(0, "recs", "app", "A"): Counts(sent=1, users=0b1)}
    >>> sorted(hidden_cells(c, 5))
    [('A',), ('A', 'recs', 'app')]
    """
    if min_users <= 1:
        return set()
    by, total_by = tuple(by), tuple(total_by)
    cells: dict[tuple, Counts] = {}
    totals: dict[tuple, Counts] = {}
    for seg, c in counts.items():
        cells.setdefault(tuple(getattr(seg, f) for f in by), Counts()).add(c)
        totals.setdefault(tuple(getattr(seg, f) for f in total_by), Counts()).add(c)
    out = {k for k, c in cells.items() if not Figures.from_counts(c).shown(min_users)}
    for key, total in totals.items():
        hid = [cells[k] for k in out if k[:len(key)] == key]
        union = 0
        for c in hid:
            union |= c.users
        if not Figures.from_counts(total).shown(min_users) or (hid and bit_count(union) < min_users):
            out.add(key)
    return out


def difference_interval(k1: float, n1: float, k2: float, n2: float, z: float = Z95) -> tuple[float, tuple[float, float]] | None:
    """The difference of two proportions ``k2/n2 - k1/n1`` and its interval by Newcombe's hybrid score method
    (from the two Wilson intervals: good with small counts and rates near 0); None when either ``n`` is 0.

    >>> d, (lo, hi) = difference_interval(50, 1000, 80, 1000); round(d, 3), round(lo, 4), round(hi, 4)
    (0.03, 0.0084, 0.052)
    """
    a, b = wilson(k1, n1, z), wilson(k2, n2, z)
    if a is None or b is None:
        return None
    p1, p2 = min(k1, n1) / n1, min(k2, n2) / n2
    d = p2 - p1
    return d, (d - math.sqrt((p2 - b[0]) ** 2 + (a[1] - p1) ** 2), d + math.sqrt((b[1] - p2) ** 2 + (p1 - a[0]) ** 2))


#: a variant is compared only once each side has sent this many messages
MIN_SENT_TO_COMPARE = 30


def verdict(control: str, a: Figures, variant: str, b: Figures, metric: str = "ctr") -> str:
    """A plain-language verdict on ``variant`` against ``control`` for one rate (``ctr``, ``conversion_rate`` or
    ``open_rate``): ahead or behind by how many points when the 95 % interval of the difference excludes 0.

    >>> A = Figures.from_counts(Counts(sent=1000, clicks=50)); B = Figures.from_counts(Counts(sent=1000, clicks=80))
    >>> verdict("A", A, "B", B)
    'B ahead of A on CTR: +3.0 points, 95 % interval [+0.8, +5.2] excludes 0'
    >>> verdict("A", A, "B", Figures.from_counts(Counts(sent=1000, clicks=55)))
    'no clear difference on CTR yet: B vs A +0.5 points, 95 % interval [-1.5, +2.5] includes 0'
    >>> verdict("A", A, "B", Figures.from_counts(Counts(sent=10, clicks=5)))
    'not enough data yet: B has sent 10 messages, A 1,000 (at least 30 each)'
    """
    name = {"ctr": "CTR", "conversion_rate": "conversion", "open_rate": "open rate"}[metric]
    numerator = {"ctr": "clicks", "conversion_rate": "conversions", "open_rate": "opens"}[metric]
    if min(a.sent, b.sent) < MIN_SENT_TO_COMPARE:
        return (f"not enough data yet: {variant} has sent {b.sent:,} messages, {control} {a.sent:,} "
                f"(at least {MIN_SENT_TO_COMPARE} each)")
    d, (lo, hi) = difference_interval(getattr(a, numerator), a.sent, getattr(b, numerator), b.sent)
    span = f"95 % interval [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    if lo > 0 or hi < 0:
        return f"{variant} {'ahead of' if d > 0 else 'behind'} {control} on {name}: {100 * d:+.1f} points, {span} excludes 0"
    return f"no clear difference on {name} yet: {variant} vs {control} {100 * d:+.1f} points, {span} includes 0"


# ---------------------------------------------------------------------------------------- attribution
@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """How sends cost and how long feedback is attributed.

    Parameters
    ----------
    cost_per_message
        Channel -> cost of one message sent (any currency, the one of purchase ``value``).
    attribution_window_s
        Last touch: a click or purchase without context is attributed to the user's latest push_open or
        push_click at most this long before it (event time).
    message_ttl_s
        Sent messages are remembered (for lookup by ``message_id`` and dedupe) this long after the newest
        event seen, in event time.
    max_messages
        Memory bound of the message map: past it the oldest are forgotten first.
    shards
        Shard segments like the ``events`` topic's partitions (Kafka's default partitioner on
        ``user_id``), so that with several workers each shard has a single writer. 1: no sharding.
    shard
        A fixed shard for every segment, for a caller that keeps one ``ExperimentMetrics`` per input
        partition (e.g. in that partition's snapshot): then ``shards`` is not used.
    campaigns, variants
        What feedback attributed by its context alone (no message of :meth:`~ExperimentMetrics.record_send`)
        may name: such an event counts only if its campaign is in ``campaigns`` and its variant in
        ``variants`` (``NO_VARIANT`` always allowed); others are ``unattributed``, and their message ids
        are not remembered. A context channel that has no ``cost_per_message`` is counted as
        ``UNKNOWN``. None: any campaign / variant (trusted data, offline). Sends always count.
    max_segments
        At most this many segments are made from feedback contexts; past it such events are counted
        in ``overflow``, not attributed.
    """

    cost_per_message: Mapping[str, float] = field(default_factory=lambda: {"email": 0.001, "app": 0.0005,
                                                                             "ads": 0.01})
    attribution_window_s: float = 86_400.0
    message_ttl_s: float = 3 * 86_400.0
    max_messages: int = 500_000
    shards: int = 1
    shard: int | None = None
    campaigns: frozenset[str] | None = None
    variants: frozenset[str] | None = None
    max_segments: int = 1_000


class _Msg:
    """Attribution state of one message; ``user_id`` is cleared by ``forget_user``."""

    __slots__ = ("segment", "user_id", "ts", "flags", "revenue")

    def __init__(self, segment: Segment, user_id: str | None, ts: float):
        self.segment = segment
        self.user_id = user_id
        self.ts = ts
        self.flags = 0
        self.revenue = 0.0

    def __getstate__(self):
        return (self.segment, self.user_id, self.ts, self.flags, self.revenue)

    def __setstate__(self, state):
        self.segment, self.user_id, self.ts, self.flags, self.revenue = state


class ExperimentMetrics:
    """Counts sends and attributed feedback per :class:`Segment` (see the module docstring).

    State is event-time driven and picklable; reads (:meth:`counts`, :meth:`figures`) never mutate.
    """

    #: feedback events whose context named a segment past ``max_segments`` (class default: older pickles)
    overflow = 0

    def __init__(self, config: MetricsConfig | None = None):
        self.config = config or MetricsConfig()
        self._counts: dict[Segment, Counts] = {}
        self._dirty: set[Segment] = set()
        self._messages: dict[str, _Msg] = {}
        self._order: deque[tuple[float, str, _Msg]] = deque()
        self._by_user: dict[str, list[str]] = {}
        self._touch: dict[str, tuple[float, _Msg]] = {}  # user -> (ts of the push_open/click, message)
        self._touch_order: deque[tuple[float, str]] = deque()
        self._newest = float("-inf")
        self.unattributed = 0  # feedback events with a context that named nothing attributable
        self.overflow = 0

    # ------------------------------------------------------------------ writes
    def record_send(self, message: Mapping | Any) -> bool:
        """Count one message sent (a ``push`` message dict, or an object with ``to_dict()``).

        Returns False for a message id already counted.
        """
        m = message.to_dict() if hasattr(message, "to_dict") else message
        mid = str(m["message_id"])
        ts = float(m["created_at"])
        channel = str(m.get("channel") or UNKNOWN)
        msg = self._messages.get(mid)
        if msg is None:
            user_id = str(m["user_id"])
            seg = Segment(self._shard(user_id), str(m.get("campaign") or UNKNOWN), channel,
                          str(m.get("variant") or NO_VARIANT))
            msg = self._remember(mid, seg, user_id, ts)
        elif msg.flags & _SENT:
            return False
        msg.flags |= _SENT
        c = self._counts_for(msg.segment)
        c.sent += 1
        c.users |= user_mask(str(m["user_id"]))
        c.cost += float(self.config.cost_per_message.get(channel, 0.0))
        self._advance(ts)
        return True

    def record_sends(self, messages: Iterable) -> int:
        """:meth:`record_send` for each; returns how many were new."""
        return sum(self.record_send(m) for m in messages)

    def observe(self, event: Event | Mapping) -> bool:
        """Attribute one feedback event; True if it was attributed (even if deduplicated)."""
        e = as_event(event)
        if e.type not in FEEDBACK_TYPES:
            return False
        ctx = e.context or {}
        msg = None
        mid = ctx.get("message_id")
        if mid is not None:
            msg = self._messages.get(mid)
        if msg is None and ctx.get("campaign") is not None:
            seg = self._context_segment(e.user_id, ctx)
            if seg is _OVERFLOW:
                self.overflow += 1
                self._advance(e.ts)
                return False
            if seg is not None:
                remember = mid is not None and self.config.campaigns is None  # known ids only when checked
                msg = self._remember(mid, seg, e.user_id, e.ts) if remember else _Msg(seg, None, e.ts)
        if msg is None and e.type in _LAST_TOUCH_TYPES and (mid is None and "campaign" not in ctx):
            touch = self._touch.get(e.user_id)
            if touch is not None and 0.0 <= e.ts - touch[0] <= self.config.attribution_window_s:
                msg = touch[1]
        if msg is None:
            if ctx:
                self.unattributed += 1
            self._advance(e.ts)
            return False
        self._apply(msg, e)
        if e.type in _TOUCH_TYPES:
            prev = self._touch.get(e.user_id)
            if prev is None or e.ts >= prev[0]:
                self._touch[e.user_id] = (e.ts, msg)
                self._touch_order.append((e.ts, e.user_id))
        self._advance(e.ts)
        return True

    def observe_many(self, events: Iterable[Event | Mapping]) -> int:
        """:meth:`observe` for each, in order; returns how many were attributed."""
        return sum(self.observe(e) for e in events if (e.type if isinstance(e, Event) else e.get("type"))
                   in FEEDBACK_TYPES)

    def forget_user(self, user_id: str) -> None:
        """Drop the user's attribution state (messages by id, last touch); aggregates keep no user ids."""
        if self._touch.pop(user_id, None) is not None:
            self._touch_order = deque(x for x in self._touch_order if x[1] != user_id)
        for mid in self._by_user.pop(user_id, ()):
            msg = self._messages.pop(mid, None)
            if msg is not None:
                msg.user_id = None

    def restore(self, counts: Mapping[Segment, Counts]) -> None:
        """Set the aggregates of some segments, e.g. read back from the store when taking over a shard."""
        for seg, c in counts.items():
            self._counts[Segment(*seg)] = c.copy()

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[Segment, Counts]:
        """A copy of every segment's counts."""
        return {s: c.copy() for s, c in self._counts.items()}

    def drain_changed(self) -> dict[Segment, Counts]:
        """Copies of the segments changed since the last drain (what to write to the store), and reset."""
        out = {s: self._counts[s].copy() for s in self._dirty}
        self._dirty.clear()
        return out

    def figures(self, by: Iterable[str] = ("campaign", "channel", "variant")) -> dict[tuple, Figures]:
        return summarize(self._counts, by)

    def __len__(self) -> int:
        """Messages remembered (the bounded part of the state)."""
        return len(self._messages)

    def knows_user(self, user_id: str) -> bool:
        return user_id in self._touch or user_id in self._by_user

    def to_state(self) -> dict:
        """The metrics as a plain tree for a snapshot (:mod:`infogap.models.state_fields`), messages as columns:
        every segment once, then per message its id, segment, user, time, flags and revenue."""
        seg_no: dict[Segment, int] = {}

        def number(seg: Segment) -> int:
            k = seg_no.get(seg)
            if k is None:
                k = seg_no[seg] = len(seg_no)
            return k

        counts = [[number(s), *astuple(c)] for s, c in self._counts.items()]
        msgs: list[_Msg] = []
        msg_no: dict[int, int] = {}
        mids: list[str | None] = []
        for _, mid, msg in self._order:  # live messages, oldest first (as they are evicted)
            if self._messages.get(mid) is msg and id(msg) not in msg_no:
                msg_no[id(msg)] = len(msgs)
                msgs.append(msg)
                mids.append(mid)
        live = len(msgs)
        touches = []
        for ts, user in self._touch_order:
            cur = self._touch.get(user)
            if cur is not None and cur[0] == ts:
                msg = cur[1]
                if id(msg) not in msg_no:  # a touch by context alone, or a message evicted since
                    msg_no[id(msg)] = len(msgs)
                    msgs.append(msg)
                    mids.append(None)
                touches.append([user, encode_float(ts), msg_no[id(msg)]])
        return {"segments": [list(s) for s in seg_no] + [list(m.segment) for m in msgs if m.segment not in seg_no],
                "counts": counts, "dirty": [number(s) for s in self._dirty], "live": live, "mids": mids,
                "seg": np.array([number(m.segment) for m in msgs], np.int64),
                "users": [m.user_id for m in msgs], "ts": np.array([m.ts for m in msgs], np.float64),
                "flags": np.array([m.flags for m in msgs], np.int64),
                "revenue": np.array([m.revenue for m in msgs], np.float64), "touches": touches,
                "newest": encode_float(self._newest), "unattributed": self.unattributed, "overflow": self.overflow}

    def restore_state(self, state, arrays=(), where: str = "experiment metrics") -> None:
        """Take the state of :meth:`to_state` (this object's config applies from now on).

        >>> m = ExperimentMetrics(); _ = m.record_send({"message_id": "m1", "user_id": "u", "channel": "email",
        ...     "campaign": "recs", "variant": "B", "items": [], "created_at": 10.0})
        >>> n = ExperimentMetrics(); n.restore_state(m.to_state()); n.counts() == m.counts(), n.knows_user("u")
        (True, True)
        """
        f = check(state, {"segments": list, "counts": list, "dirty": list, "live": int, "mids": list,
                          "seg": np.int64, "users": list, "ts": np.float64, "flags": np.int64,
                          "revenue": np.float64, "touches": list, "newest": float, "unattributed": int,
                          "overflow": int}, where, arrays)
        bad = StateError(f"{where}: the segments, counts, messages or touches do not fit together")
        segs = f["segments"]
        if not all(isinstance(s, list) and len(s) == 4 and type(s[0]) is int and all(type(x) is str for x in s[1:])
                   for s in segs):
            raise bad
        segs = [Segment(*s) for s in segs]
        n = len(f["mids"])
        if not (len(f["users"]) == n == f["seg"].size == f["ts"].size == f["flags"].size == f["revenue"].size
                and 0 <= f["live"] <= n and (n == 0 or 0 <= f["seg"].min() <= f["seg"].max() < len(segs))
                and all(type(x) is str for x in f["mids"][:f["live"]])
                and all(x is None or type(x) is str for x in f["users"])):
            raise bad
        width = len(fields(Counts))  # (rows from before the user bitmap are one shorter: no user known)
        counts = {}
        for row in f["counts"]:
            if not (isinstance(row, list) and len(row) in (width, width + 1) and type(row[0]) is int
                    and 0 <= row[0] < len(segs) and all(type(x) in (int, float) for x in row[1:])
                    and (len(row) == width or (type(row[-1]) is int and 0 <= row[-1] < 2 ** 64))):
                raise bad
            counts[segs[row[0]]] = Counts(*(int(x) if k < 5 or k == 8 else float(x) for k, x in enumerate(row[1:])))
        if not all(type(k) is int and 0 <= k < len(segs) for k in f["dirty"]):
            raise bad
        msgs = []
        for seg, user, ts, flags, revenue in zip(f["seg"].tolist(), f["users"], f["ts"].tolist(),
                                                 f["flags"].tolist(), f["revenue"].tolist()):
            msg = _Msg(segs[seg], user, ts)
            msg.flags, msg.revenue = flags, revenue
            msgs.append(msg)
        self._counts, self._dirty = counts, {segs[k] for k in f["dirty"]}
        self._messages, self._order, self._by_user = {}, deque(), {}
        for mid, msg in zip(f["mids"][:f["live"]], msgs):
            self._messages[mid] = msg
            self._order.append((msg.ts, mid, msg))
            if msg.user_id is not None:
                self._by_user.setdefault(msg.user_id, []).append(mid)
        self._touch, self._touch_order = {}, deque()
        for t in f["touches"]:
            if not (isinstance(t, list) and len(t) == 3 and type(t[0]) is str and type(t[2]) is int
                    and 0 <= t[2] < n):
                raise bad
            ts = decode_float(t[1], f"{where}: a touch's time")
            self._touch[t[0]] = (ts, msgs[t[2]])
            self._touch_order.append((ts, t[0]))
        self._newest, self.unattributed, self.overflow = f["newest"], f["unattributed"], f["overflow"]

    def reconfigure(self, config: MetricsConfig) -> None:
        """Use ``config`` from now on (e.g. the current settings' after a restore); the state is kept."""
        self.config = config

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        cfg = self.config  # a config pickled before some fields existed: those take their defaults
        if any(not hasattr(cfg, f.name) for f in fields(MetricsConfig)):
            self.config = MetricsConfig(**{f.name: getattr(cfg, f.name) for f in fields(MetricsConfig)
                                           if hasattr(cfg, f.name)})

    # ------------------------------------------------------------------ internals
    def _context_segment(self, user_id: str, ctx: Mapping) -> Segment | None | object:
        """The segment a feedback context names: None when it names no known campaign and variant,
        ``_OVERFLOW`` when it is new and ``max_segments`` are made."""
        cfg = self.config
        campaign, variant = ctx["campaign"], ctx.get("variant") or NO_VARIANT
        if cfg.campaigns is not None and campaign not in cfg.campaigns:
            return None
        if cfg.variants is not None and variant != NO_VARIANT and variant not in cfg.variants:
            return None
        channel = ctx.get("channel") or UNKNOWN
        seg = Segment(self._shard(user_id), str(campaign),
                      str(channel) if channel in cfg.cost_per_message else UNKNOWN, str(variant))
        if seg not in self._counts and len(self._counts) >= cfg.max_segments:
            return _OVERFLOW
        return seg

    def _shard(self, user_id: str) -> int:
        fixed = self.config.shard
        return fixed if fixed is not None else kafka_partition(user_id, self.config.shards)

    def _counts_for(self, seg: Segment) -> Counts:
        c = self._counts.get(seg)
        if c is None:
            c = self._counts[seg] = Counts()
        self._dirty.add(seg)
        return c

    def _remember(self, mid: str, seg: Segment, user_id: str, ts: float) -> _Msg:
        msg = _Msg(seg, user_id, ts)
        self._messages[mid] = msg
        self._order.append((ts, mid, msg))
        self._by_user.setdefault(user_id, []).append(mid)
        return msg

    def _apply(self, msg: _Msg, e: Event) -> None:
        t = e.type
        if t == "impression":
            flag, name = _IMPRESSED, "impressions"
        elif t == "push_open":
            flag, name = _OPENED, "opens"
        elif t in ("push_click", "click"):
            flag, name = _CLICKED, "clicks"
        else:  # purchase
            flag, name = _CONVERTED, "conversions"
        c = self._counts_for(msg.segment)
        c.users |= user_mask(e.user_id)
        if not msg.flags & flag:
            msg.flags |= flag
            setattr(c, name, getattr(c, name) + 1)
        if t == "purchase" and e.value:
            v = float(e.value)
            c.revenue += v
            c.revenue_sq += (msg.revenue + v) ** 2 - msg.revenue ** 2
            msg.revenue += v

    def _advance(self, ts: float) -> None:
        if ts > self._newest:
            self._newest = ts
        cfg = self.config
        horizon = self._newest - cfg.message_ttl_s
        order, messages = self._order, self._messages
        while order and (order[0][0] < horizon or len(messages) > cfg.max_messages):
            _, mid, msg = order.popleft()
            if messages.get(mid) is msg:
                del messages[mid]
                if msg.user_id is not None:
                    mids = self._by_user.get(msg.user_id)
                    if mids is not None:
                        try:
                            mids.remove(mid)
                        except ValueError:
                            pass
                        if not mids:
                            del self._by_user[msg.user_id]
        horizon = self._newest - cfg.attribution_window_s
        torder, touch = self._touch_order, self._touch
        while torder and torder[0][0] < horizon:
            ts0, user = torder.popleft()
            cur = touch.get(user)
            if cur is not None and cur[0] == ts0:
                del touch[user]
