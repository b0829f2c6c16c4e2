"""The causal return of pushing at all: a global control group, cohorts, retention and ROI on the increment.

Pure business rules (numpy and the standard library; no I/O, no clock: time is the event's ``ts`` and the
caller's watermark). Three pieces:

* :class:`ControlGroup` puts a fixed share of users in the **control group**, by the same blake2b hashing as
  :class:`~infogap.models.experiments.Experiment` (of a fixed name and the user id: the same in every process
  and after every restart, independent of any experiment's variants). The push policy never sends them
  anything (rule ``control_group``) but records what it *would* have sent: a **ghost push**.
* :class:`Cohorts` keeps one record per user and :class:`Cohort` = ``(shard, campaign, channel, variant,
  arm)``: the user **enters** at their first push (arm ``treated``) or first ghost push (arm ``control``),
  and the record notes, from the user's later events, whether they came back on day 1 and on day 7, whether
  they bought within 7 days and for how much, and how many messages they were sent in those 7 days.
* :func:`summarize` turns the summed :class:`CohortCounts` into per-arm :class:`ArmFigures` and a
  per-segment :class:`Increment`: retention, conversion and revenue per user with 95 % intervals, and the
  incremental conversions, revenue and ROI of the treated arm over the control arm.

Why ghost pushes (intent to treat): control users enter a cohort exactly where a treated user with the same
history would have been pushed, under every rule of the policy (consent, quiet hours, caps, repeats: the
ghost counts towards the caps as a send would), with the campaign, channel and variant the message would have
had. Both arms are then the same population, chosen by the same rules at the same moments, and differ only in
the message: comparing them measures the message. Comparing pushed users with users never pushed instead would
compare people who were active and consented with people who were not.

Definitions, per record (``entry`` the event time of the user's first push or ghost push in the cohort, ``d``
= 86,400 s; an event counts when it is a *return*: any type but push feedback the control group cannot
produce, :data:`NOT_RETURNS`):

* **day-1 return**: a return in ``[entry + 1 d, entry + 2 d)``; **day-7 return**: in ``[entry + 7 d,
  entry + 8 d)``;
* **conversion**: a ``purchase`` in ``(entry, entry + 7 d)``; **revenue**: the sum of their ``value``;
* **messages**: the pushes (treated) or ghost pushes (control) of the cohort in ``[entry, entry + 7 d)``; their
  cost (treated only) is ``messages`` times the channel's cost per message.

A record counts in a figure only once its window has **closed**: when the caller's watermark (the partition's
newest event time minus the lateness it accepts: no event older can still arrive) has passed the window's
end. Day-1 retention is then over the users whose day-1 window closed, day-7 over those whose day-7 window
closed, conversions, revenue and cost over those whose 7-day window closed.

Erasure and the **horizon**: the aggregates are always the sum over the records present, never kept apart, so
:meth:`Cohorts.forget_user` takes a user's contribution out of every figure. A record is kept
``RetentionConfig.horizon_s`` of event time after its entry (30 days by default; at least the 8 days its
windows need), then dropped, and its contribution with it: the published figures are those of the cohorts
that entered within the horizon, a rolling window. At most ``max_records`` are kept; past it the first added go
first (counted in :attr:`Cohorts.dropped`).

>>> group = ControlGroup(0.5)
>>> [group.is_control(u) for u in ("u1", "u2", "u3", "u4")], ControlGroup(0.5).is_control("u3")  # stable
([False, False, True, True], True)
>>> c = Cohorts(RetentionConfig(cost_per_message={"email": 0.5}))
>>> T = 1_700_000_000.0
>>> [c.enter(u, "recs", "email", "A", T, control=group.is_control(u)) for u in ("u1", "u2", "u3", "u4")]
[True, True, True, True]
>>> c.observe_many([{"event_id": "e1", "user_id": "u1", "type": "view", "item_id": "a", "ts": T + DAY + 60},
...                 {"event_id": "e2", "user_id": "u1", "type": "purchase", "item_id": "a", "ts": T + 2 * DAY,
...                  "value": 30.0}])
2
>>> c.advance(T + 9 * DAY)  # every window closed
>>> inc = summarize(c.counts())[("recs", "email", "A")]
>>> inc.treated.d1_rate, inc.control.d1_rate, inc.treated.revenue_per_user, inc.conversions, inc.revenue, inc.cost
(0.5, 0.0, 15.0, 1.0, 30.0, 1.0)
>>> inc.roi  # (30 - 1) / 1
29.0
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np

from infogap.models.events import Event, as_event
from infogap.models.experiments import (NO_VARIANT, UNKNOWN, Z95, difference_interval, mean_interval, stored_value,
                                        unit_hash, wilson)
from infogap.models.state_fields import StateError, check, encode_float

#: One day of event time, in seconds.
DAY = 86_400.0
#: Salt of the control group's hash: a new name would reshuffle who is in it (never change it in production).
CONTROL_NAME = "infogap-control"
TREATED, CONTROL = "treated", "control"
ARMS = (TREATED, CONTROL)
#: Event types that are not a return of the user: a channel's report of a delivery (``impression``) and the
#: push feedback only a pushed user can produce (``push_open``, ``push_click``: counting them would credit the
#: message with its own delivery), erasure and consent changes.
NOT_RETURNS = frozenset({"impression", "push_open", "push_click", "forget", "unsubscribe", "push_bounce"})
#: The windows, in days after entry: day-1 return [1, 2), day-7 return [7, 8), value (conversion, revenue,
#: messages) [0, 7).
D1_WINDOW, D7_WINDOW, VALUE_DAYS = (1, 2), (7, 8), 7
#: A record's stages: open; day-1 window closed; value window closed; day-7 window closed (then final)
_STAGE_DUE = (D1_WINDOW[1] * DAY, VALUE_DAYS * DAY, D7_WINDOW[1] * DAY)
_D1, _D7, _CONV = 1, 2, 4


# ---------------------------------------------------------------------------------------- the control group
@dataclass(frozen=True, slots=True)
class ControlGroup:
    """A share of users who are never pushed: ``unit_hash(name, user_id) < share``.

    Parameters
    ----------
    share
        In [0, 1): 0 puts nobody in the control group. Raising it moves users from treated to control
        (the users below the old share stay in it); lowering it moves them back.
    name
        The hash's salt; independent of every experiment's name, so the control group is independent of the
        variants (each variant has its own share of control users).

    Examples
    --------
    >>> g = ControlGroup(0.05)
    >>> sum(g.is_control(f"u{k}") for k in range(10_000))  # about 5 %
    497
    >>> ControlGroup(0.0).is_control("u1"), "u1" in ControlGroup(0.999)
    (False, True)
    """

    share: float = 0.0
    name: str = CONTROL_NAME

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0.0 <= self.share < 1.0:
            raise ValueError(f"the control group's share must be a number in [0, 1), got {self.share!r} "
                             "(0.05 keeps 5 % of users from every push)")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("the control group needs a non-empty name (the salt of its hash)")

    def is_control(self, user_id: str) -> bool:
        return in_control_group(user_id, self.share, self.name)

    __contains__ = is_control


def in_control_group(user_id: str, share: float, name: str = CONTROL_NAME) -> bool:
    """Whether ``user_id`` is in the control group of ``share`` (:class:`ControlGroup` without the object).

    >>> in_control_group("u3", 0.5), in_control_group("u3", 0.0)
    (True, False)
    """
    return share > 0.0 and unit_hash(name, user_id) < share


# ---------------------------------------------------------------------------------------- counts
class Cohort(NamedTuple):
    """What cohort figures are kept per: the shard (a partition of ``events``), the push's campaign, channel and
    experiment variant (``"none"`` outside any experiment), and the arm (``treated`` or ``control``)."""

    shard: int
    campaign: str
    channel: str
    variant: str
    arm: str


@dataclass(slots=True)
class CohortCounts:
    """Additive sums of one cohort (what the store persists), each over the records present (see the module
    docstring for the windows)."""

    entered: int = 0
    d1_users: int = 0  # users whose day-1 window closed
    d1_returned: int = 0  # of them, users with a return in it
    d7_users: int = 0
    d7_returned: int = 0
    users_7d: int = 0  # users whose 7-day value window closed
    conversions: int = 0  # of them, users with a purchase in it
    revenue: float = 0.0
    revenue_sq: float = 0.0  # sum over users of (their revenue) ** 2
    messages: int = 0  # pushes (treated) or ghost pushes (control) in the value window
    cost: float = 0.0  # of the treated messages

    def add(self, other: CohortCounts) -> CohortCounts:
        """Add ``other`` into this one (in place) and return self."""
        for f in _FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self

    def copy(self) -> CohortCounts:
        return CohortCounts(*[getattr(self, f) for f in _FIELDS])  # (asdict deep-copies: 20x slower)

    def to_dict(self) -> dict[str, int | float]:
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CohortCounts:
        """From stored values (strings accepted); unknown fields ignored, missing ones 0.

        >>> CohortCounts.from_dict({"entered": "3", "revenue": b"1.5", "junk": 1}).entered
        3
        """
        out = cls()
        for f in fields(cls):
            if f.name in d:
                setattr(out, f.name, stored_value(d[f.name], f.type, f.name))
        for part, whole in (("d1_returned", "d1_users"), ("d7_returned", "d7_users"), ("conversions", "users_7d")):
            if getattr(out, part) > getattr(out, whole):  # (a worker adds both in one write)
                raise ValueError(f"stored {part} ({getattr(out, part)}) is more than {whole} ({getattr(out, whole)})")
        return out

    def is_empty(self) -> bool:
        return self.entered == 0


_FIELDS = tuple(f.name for f in fields(CohortCounts))
RETENTION_FIELDS = _FIELDS


# ---------------------------------------------------------------------------------------- figures
@dataclass(frozen=True, slots=True)
class ArmFigures:
    """One arm's figures, with 95 % intervals (None where undefined): retention rates and conversion rate with
    Wilson intervals, revenue per user with a normal-approximation one."""

    entered: int
    d1_users: int
    d1_rate: float | None
    d1_ci: tuple[float, float] | None
    d7_users: int
    d7_rate: float | None
    d7_ci: tuple[float, float] | None
    users_7d: int
    conversions: int
    conversion_rate: float | None
    conversion_ci: tuple[float, float] | None
    revenue: float
    revenue_per_user: float | None
    revenue_per_user_ci: tuple[float, float] | None
    messages: int
    cost: float

    @classmethod
    def from_counts(cls, c: CohortCounts, z: float = Z95) -> ArmFigures:
        """
        >>> f = ArmFigures.from_counts(CohortCounts(entered=4, d1_users=4, d1_returned=1, users_7d=4,
        ...                                         conversions=2, revenue=10.0, revenue_sq=50.0))
        >>> f.d1_rate, [round(x, 4) for x in f.d1_ci], f.revenue_per_user, [round(x, 3) for x in f.revenue_per_user_ci]
        (0.25, [0.0456, 0.6994], 2.5, [-0.329, 5.329])
        """
        mean, ci = _mean(c.revenue, c.revenue_sq, c.users_7d, z)
        return cls(c.entered, c.d1_users, _rate(c.d1_returned, c.d1_users), wilson(c.d1_returned, c.d1_users, z),
                   c.d7_users, _rate(c.d7_returned, c.d7_users), wilson(c.d7_returned, c.d7_users, z),
                   c.users_7d, c.conversions, _rate(c.conversions, c.users_7d), wilson(c.conversions, c.users_7d, z),
                   c.revenue, mean, ci, c.messages, c.cost)

    def below_floor(self, min_users: int) -> bool:
        """Whether the arm has users but fewer than ``min_users`` (the privacy floor: its figures, and the
        differences with it, are not shown; a cohort counts each user once).

        >>> ArmFigures.from_counts(CohortCounts(entered=3)).below_floor(5), ArmFigures.from_counts(CohortCounts()).below_floor(5)
        (True, False)
        """
        return 0 < self.entered < min_users


@dataclass(frozen=True, slots=True)
class Increment:
    """A segment's treated and control arms, and what pushing added (None where an arm lacks the users):

    * ``d1_lift``, ``d7_lift``: treated minus control retention, in points of share, with Newcombe's interval;
    * ``conversions`` = (treated rate - control rate) x treated users (of the value window), with Newcombe's
      interval of the difference scaled the same way;
    * ``revenue`` = (treated - control revenue per user) x treated users, with the normal-approximation
      interval of a difference of means (unequal variances) scaled the same way;
    * ``cost`` of the treated messages, and ``roi`` = (incremental revenue - cost) / cost, whose interval is
      the revenue's shifted and scaled (the cost is known).

    The intervals are of the effect on users like these (the arms are samples); the treated users are those
    whose 7-day window closed.
    """

    treated: ArmFigures
    control: ArmFigures
    d1_lift: float | None
    d1_lift_ci: tuple[float, float] | None
    d7_lift: float | None
    d7_lift_ci: tuple[float, float] | None
    conversions: float | None
    conversions_ci: tuple[float, float] | None
    revenue: float | None
    revenue_ci: tuple[float, float] | None
    cost: float
    roi: float | None
    roi_ci: tuple[float, float] | None

    @classmethod
    def from_counts(cls, treated: CohortCounts, control: CohortCounts, z: float = Z95) -> Increment:
        """
        >>> t = CohortCounts(entered=100, users_7d=100, conversions=30, revenue=600.0, revenue_sq=12000.0, cost=10.0)
        >>> c = CohortCounts(entered=100, users_7d=100, conversions=10, revenue=200.0, revenue_sq=4000.0)
        >>> inc = Increment.from_counts(t, c)
        >>> round(inc.conversions, 6), [round(x, 2) for x in inc.conversions_ci], inc.revenue, inc.roi
        (20.0, [9.0, 30.58], 400.0, 39.0)
        """
        n = treated.users_7d
        d1, d1_ci = _lift(control.d1_returned, control.d1_users, treated.d1_returned, treated.d1_users, z)
        d7, d7_ci = _lift(control.d7_returned, control.d7_users, treated.d7_returned, treated.d7_users, z)
        conv, conv_ci = _lift(control.conversions, control.users_7d, treated.conversions, n, z)
        conversions = None if conv is None else conv * n
        conversions_ci = None if conv_ci is None else (conv_ci[0] * n, conv_ci[1] * n)
        revenue = revenue_ci = None
        diff = mean_difference_interval(control.revenue, control.revenue_sq, control.users_7d,
                                        treated.revenue, treated.revenue_sq, n, z)
        if diff is not None:
            d, (lo, hi) = diff
            revenue, revenue_ci = d * n, (lo * n, hi * n)
        cost = treated.cost
        roi = roi_ci = None
        if revenue is not None and cost > 0:
            roi = (revenue - cost) / cost
            roi_ci = ((revenue_ci[0] - cost) / cost, (revenue_ci[1] - cost) / cost)
        return cls(ArmFigures.from_counts(treated, z), ArmFigures.from_counts(control, z), d1, d1_ci, d7, d7_ci,
                   conversions, conversions_ci, revenue, revenue_ci, cost, roi, roi_ci)


def mean_difference_interval(total1: float, total_sq1: float, n1: float, total2: float, total_sq2: float,
                             n2: float, z: float = Z95) -> tuple[float, tuple[float, float]] | None:
    """The difference of two means ``mean2 - mean1`` (each from its sum and sum of squares) and its
    normal-approximation interval with unequal variances (Welch's standard error); None with fewer than two
    values on a side.

    >>> d, (lo, hi) = mean_difference_interval(10.0, 50.0, 4, 30.0, 250.0, 4)  # 0,5,5,0 vs 5,10,10,5
    >>> d, round(lo, 3), round(hi, 3)  # se = sqrt(25/3 / 4 + 25/3 / 4) = 2.041
    (5.0, 0.999, 9.001)
    """
    if n1 < 2 or n2 < 2:
        return None
    m1, m2 = total1 / n1, total2 / n2
    v1 = max(0.0, (total_sq1 - n1 * m1 * m1) / (n1 - 1))
    v2 = max(0.0, (total_sq2 - n2 * m2 * m2) / (n2 - 1))
    half = z * math.sqrt(v1 / n1 + v2 / n2)
    d = m2 - m1
    return d, (d - half, d + half)


def summarize(counts: Mapping[Cohort, CohortCounts], by: Iterable[str] = ("campaign", "channel", "variant"),
              z: float = Z95) -> dict[tuple, Increment]:
    """Per group of ``by`` (some of campaign, channel, variant; shards always summed), the treated and control
    arms and the increment.

    >>> c = {Cohort(0, "recs", "email", "A", "treated"): CohortCounts(entered=2, d1_users=2, d1_returned=1),
    ...      Cohort(1, "recs", "email", "A", "treated"): CohortCounts(entered=2, d1_users=2, d1_returned=2),
    ...      Cohort(0, "recs", "email", "A", "control"): CohortCounts(entered=1, d1_users=1)}
    >>> inc = summarize(c)[("recs", "email", "A")]
    >>> inc.treated.entered, inc.treated.d1_rate, inc.control.d1_rate, inc.d1_lift
    (4, 0.75, 0.0, 0.75)
    """
    by = tuple(by)
    bad = set(by) - {"campaign", "channel", "variant"}
    if bad:
        raise ValueError(f"cannot group by {sorted(bad)}; use some of campaign, channel, variant")
    sums: dict[tuple, tuple[CohortCounts, CohortCounts]] = {}
    for cohort, c in counts.items():
        key = tuple(getattr(cohort, f) for f in by)
        pair = sums.get(key)
        if pair is None:
            pair = sums[key] = (CohortCounts(), CohortCounts())
        pair[cohort.arm != TREATED].add(c)
    return {k: Increment.from_counts(t, c, z) for k, (t, c) in sorted(sums.items())
            if t.entered or c.entered}


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def _mean(total: float, total_sq: float, n: int, z: float) -> tuple[float | None, tuple[float, float] | None]:
    return (total / n if n else None), mean_interval(total, total_sq, n, z)


def _lift(k1: int, n1: int, k2: int, n2: int, z: float) -> tuple[float | None, tuple[float, float] | None]:
    got = difference_interval(k1, n1, k2, n2, z)
    return (None, None) if got is None else got


# ---------------------------------------------------------------------------------------- the cohorts
@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long cohort records are kept, and what a message costs.

    Parameters
    ----------
    horizon_s
        A record is kept this long after its entry, in event time (then it and its contribution leave the
        figures); at least the 8 days its windows need.
    max_records
        Memory bound: past it the oldest records are dropped first.
    cost_per_message
        Channel -> cost of one message (the currency of purchase ``value``), as for
        :class:`~infogap.models.experiments.MetricsConfig`.
    shard
        The shard of every cohort: the ``events`` partition whose records these are.
    """

    horizon_s: float = 30 * DAY
    max_records: int = 500_000
    cost_per_message: Mapping[str, float] = field(default_factory=lambda: {"email": 0.001, "app": 0.0005,
                                                                             "ads": 0.01})
    shard: int = 0

    def __post_init__(self) -> None:
        if not self.horizon_s >= D7_WINDOW[1] * DAY:
            raise ValueError(f"the cohorts' horizon must be at least {D7_WINDOW[1]} days ({D7_WINDOW[1] * DAY:.0f} s): "
                             f"the day-7 window ends then; got {self.horizon_s!r}")
        if self.max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {self.max_records!r}")


class _Rec:
    """One user's record in one cohort; ``stage`` -1 once removed; ``due`` when its next stage begins (it orders
    the records in the heap of :class:`Cohorts`: no tuple per entry, about 280 bytes a record in all)."""

    __slots__ = ("cohort", "user_id", "entry", "flags", "revenue", "messages", "stage", "due")

    def __init__(self, cohort: Cohort, user_id: str, entry: float):
        self.cohort = cohort
        self.user_id = user_id
        self.entry = entry
        self.flags = 0
        self.revenue = 0.0
        self.messages = 1
        self.stage = 0
        self.due = entry

    def __lt__(self, other: _Rec) -> bool:
        return self.due < other.due


class Cohorts:
    """Cohort records of one shard and their aggregates (see the module docstring).

    Writes: :meth:`enter` (a push or ghost push), :meth:`observe` (a user's event), :meth:`advance` (the
    watermark), :meth:`forget_user` (erasure). Reads (:meth:`counts`, :meth:`drain_changed`) never change the
    records.

    Examples
    --------
    >>> c = Cohorts(RetentionConfig(cost_per_message={"app": 1.0}, shard=3))
    >>> T = 1_700_000_000.0
    >>> c.enter("u1", "recs", "app", None, T, control=False), c.enter("u1", "recs", "app", None, T + 60, control=False)
    (True, False)
    >>> c.observe({"event_id": "e1", "user_id": "u1", "type": "view", "item_id": "a", "ts": T + 7.5 * DAY})
    True
    >>> c.advance(T + 7 * DAY)  # the 7-day window closed, the day-7 window not yet
    >>> got = c.counts()[Cohort(3, "recs", "app", "none", "treated")]
    >>> got.entered, got.d1_users, got.users_7d, got.messages, got.cost, got.d7_users
    (1, 1, 1, 2, 2.0, 0)
    >>> c.advance(T + 8 * DAY); c.counts()[Cohort(3, "recs", "app", "none", "treated")].d7_returned
    1
    >>> c.forget_user("u1"); c.counts(), c.drain_changed()[Cohort(3, "recs", "app", "none", "treated")].entered
    ({}, 0)
    """

    def __init__(self, config: RetentionConfig | None = None):
        self.config = config or RetentionConfig()
        self._users: dict[str, _Rec | list[_Rec]] = {}  # a user's record, or their records (several cohorts)
        self._counts: dict[Cohort, CohortCounts] = {}
        self._dirty: set[Cohort] = set()
        self._due: list[_Rec] = []  # a heap, by when the record's next stage begins
        self._order: deque[_Rec] = deque()  # records in the order they entered (for max_records)
        self._n = 0
        self.watermark = float("-inf")
        self.dropped = 0  # records dropped past max_records before their horizon

    def __len__(self) -> int:
        """Records kept."""
        return self._n

    def knows_user(self, user_id: str) -> bool:
        return user_id in self._users

    def user_ids(self) -> set[str]:
        return set(self._users)

    # ------------------------------------------------------------------ writes
    def enter(self, user_id: str, campaign: str, channel: str, variant: str | None, ts: float,
              control: bool) -> bool:
        """A push (``control`` False) or ghost push (True) of ``user_id`` at event time ``ts``: the user enters
        the cohort if new to it, else the message counts in their value window. Returns whether they entered."""
        cohort = Cohort(self.config.shard, campaign or UNKNOWN, channel or UNKNOWN, variant or NO_VARIANT,
                        CONTROL if control else TREATED)
        held = self._users.get(user_id)
        if held is not None:
            for rec in (held,) if type(held) is _Rec else held:
                if rec.cohort == cohort:
                    if rec.entry <= ts < rec.entry + VALUE_DAYS * DAY:
                        self._change(rec, _more_messages)
                    return False
        if ts + self.config.horizon_s <= self.watermark:  # a push decided past its own horizon: never counted
            return False
        rec = _Rec(cohort, user_id, ts)
        if held is None:
            self._users[user_id] = rec
        elif type(held) is _Rec:
            self._users[user_id] = [held, rec]
        else:
            held.append(rec)
        self._n += 1
        self._order.append(rec)
        self._schedule(rec)
        self._apply(rec, 1)
        while self._n > self.config.max_records:
            old = self._order.popleft()
            if old.stage >= 0:
                self._remove(old)
                self.dropped += 1
        return True

    def record_push(self, message: Mapping | Any, control: bool = False) -> bool:
        """:meth:`enter` for a ``push`` message (a dict, or an object with its fields, such as
        :class:`~infogap.models.push_policy.PushMessage`)."""
        if isinstance(message, Mapping):
            return self.enter(str(message["user_id"]), str(message.get("campaign") or UNKNOWN),
                              str(message.get("channel") or UNKNOWN), message.get("variant"),
                              float(message["created_at"]), control)
        return self.enter(message.user_id, message.campaign, message.channel, message.variant, message.created_at,
                          control)

    def observe(self, event: Event | Mapping) -> bool:
        """A user's event: a return or a purchase in the windows of their records. Returns whether the user has
        records (cheap otherwise: one dict lookup)."""
        e = event if isinstance(event, Event) else as_event(event)
        held = self._users.get(e.user_id)
        if held is None:
            return False
        typ = e.type
        if typ in NOT_RETURNS:
            return True
        ts = e.ts
        for rec in (held,) if type(held) is _Rec else held:
            dt = ts - rec.entry
            if dt <= 0.0:
                continue
            days = dt / DAY
            flags = rec.flags
            if D1_WINDOW[0] <= days < D1_WINDOW[1]:
                flags |= _D1
            elif D7_WINDOW[0] <= days < D7_WINDOW[1]:
                flags |= _D7
            value = 0.0
            if typ == "purchase" and days < VALUE_DAYS:
                flags |= _CONV
                value = float(e.value or 0.0)
                if not math.isfinite(value):
                    value = 0.0
            if flags != rec.flags or value:
                self._change(rec, _Update(flags, value))
        return True

    def observe_many(self, events: Iterable[Event | Mapping]) -> int:
        """:meth:`observe` for each, in order; returns how many were of users with records."""
        return sum(self.observe(e) for e in events)

    def advance(self, watermark: float) -> None:
        """The event time before which no event can still arrive (the caller's watermark): windows that end
        by it close, records past their horizon leave."""
        if not watermark > self.watermark:
            return
        self.watermark = watermark
        due, horizon = self._due, self.config.horizon_s
        while due and due[0].due <= watermark:
            rec = heapq.heappop(due)
            if rec.stage < 0:
                continue
            if rec.stage < len(_STAGE_DUE):
                self._apply(rec, -1)
                rec.stage += 1
                self._apply(rec, 1)
                self._schedule(rec)
            else:  # past the horizon
                self._remove(rec)
        order = self._order
        while order and (order[0].stage < 0 or order[0].entry + horizon <= watermark):
            rec = order.popleft()
            if rec.stage >= 0:
                self._remove(rec)

    def forget_user(self, user_id: str) -> None:
        """Erasure: the user's records leave, and their contribution leaves every figure."""
        held = self._users.get(user_id)
        for rec in () if held is None else (held,) if type(held) is _Rec else list(held):
            self._remove(rec)

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[Cohort, CohortCounts]:
        """A copy of the counts of every cohort with someone in it."""
        return {k: c.copy() for k, c in self._counts.items() if c.entered}

    def drain_changed(self) -> dict[Cohort, CohortCounts]:
        """Copies of the cohorts changed since the last drain (what to write to the store, zeros included:
        a cohort whose records all left), and reset."""
        out = {}
        for k in self._dirty:
            c = self._counts.get(k)
            if c is None:
                continue
            out[k] = c.copy()
            if c.is_empty():
                del self._counts[k]
        self._dirty.clear()
        return out

    def figures(self, by: Iterable[str] = ("campaign", "channel", "variant")) -> dict[tuple, Increment]:
        return summarize(self._counts, by)

    # ------------------------------------------------------------------ snapshots
    def to_state(self) -> dict:
        """The records as columns for a snapshot (:mod:`infogap.models.state_fields`): every cohort once, then
        per record its user, cohort, entry, flags, revenue, messages and stage. The aggregates are not saved:
        they are the records' sums, recomputed on restore."""
        numbers: dict[Cohort, int] = {}
        recs = [r for r in self._order if r.stage >= 0]
        for r in recs:
            numbers.setdefault(r.cohort, len(numbers))
        return {"cohorts": [list(k) for k in numbers], "users": [r.user_id for r in recs],
                "cohort": np.array([numbers[r.cohort] for r in recs], np.int64),
                "entry": np.array([r.entry for r in recs], np.float64),
                "flags": np.array([r.flags for r in recs], np.int64),
                "revenue": np.array([r.revenue for r in recs], np.float64),
                "messages": np.array([r.messages for r in recs], np.int64),
                "stage": np.array([r.stage for r in recs], np.int64),
                "watermark": encode_float(self.watermark), "dropped": self.dropped}

    def restore_state(self, state, arrays=(), where: str = "cohorts") -> None:
        """Take the state of :meth:`to_state` (this object's config applies from now on, its shard included);
        every cohort is then changed (to write again whole).

        >>> c = Cohorts(); _ = c.enter("u", "recs", "email", "B", 10.0, control=True)
        >>> d = Cohorts(); d.restore_state(c.to_state()); d.counts() == c.counts(), len(d), sorted(d.drain_changed())
        (True, 1, [Cohort(shard=0, campaign='recs', channel='email', variant='B', arm='control')])
        """
        f = check(state, {"cohorts": list, "users": list, "cohort": np.int64, "entry": np.float64,
                          "flags": np.int64, "revenue": np.float64, "messages": np.int64, "stage": np.int64,
                          "watermark": float, "dropped": int}, where, arrays)
        bad = StateError(f"{where}: the cohorts and records do not fit together")
        cohorts = f["cohorts"]
        if not all(isinstance(k, list) and len(k) == 5 and type(k[0]) is int and all(type(x) is str for x in k[1:])
                   and k[4] in ARMS for k in cohorts):
            raise bad
        shard = self.config.shard
        cohorts = [Cohort(shard, *k[1:]) for k in cohorts]
        n = len(f["users"])
        cols = [f[c] for c in ("cohort", "entry", "flags", "revenue", "messages", "stage")]
        if not (all(a.ndim == 1 and a.size == n for a in cols) and all(type(u) is str for u in f["users"])
                and (n == 0 or (0 <= f["cohort"].min() and f["cohort"].max() < len(cohorts)
                                and 0 <= f["stage"].min() and f["stage"].max() <= len(_STAGE_DUE)
                                and 0 <= f["flags"].min() and f["flags"].max() < 8 and f["messages"].min() >= 0
                                and np.isfinite(f["entry"]).all() and np.isfinite(f["revenue"]).all()))):
            raise bad
        self._users, self._counts, self._dirty, self._due, self._order = {}, {}, set(), [], deque()
        self._n = 0
        for user, k, entry, flags, revenue, messages, stage in zip(f["users"], *(a.tolist() for a in cols)):
            rec = _Rec(cohorts[k], user, entry)
            rec.flags, rec.revenue, rec.messages, rec.stage = flags, revenue, messages, stage
            held = self._users.get(user)
            self._users[user] = rec if held is None else [held, rec] if type(held) is _Rec else [*held, rec]
            self._order.append(rec)
            self._n += 1
            self._schedule(rec)
            self._apply(rec, 1)
        self.watermark, self.dropped = f["watermark"], f["dropped"]
        self._dirty = set(self._counts)

    # ------------------------------------------------------------------ internals
    def _schedule(self, rec: _Rec) -> None:
        rec.due = rec.entry + (_STAGE_DUE[rec.stage] if rec.stage < len(_STAGE_DUE) else self.config.horizon_s)
        heapq.heappush(self._due, rec)

    def _apply(self, rec: _Rec, sign: int) -> None:
        """Add (``sign`` 1) or take out (-1) the record's contribution at its stage."""
        c = self._counts.get(rec.cohort)
        if c is None:
            c = self._counts[rec.cohort] = CohortCounts()
        self._dirty.add(rec.cohort)
        c.entered += sign
        stage = rec.stage
        if stage >= 1:
            c.d1_users += sign
            if rec.flags & _D1:
                c.d1_returned += sign
        if stage >= 2:
            c.users_7d += sign
            if rec.flags & _CONV:
                c.conversions += sign
            if rec.revenue:
                c.revenue += sign * rec.revenue
                c.revenue_sq += sign * rec.revenue * rec.revenue
            c.messages += sign * rec.messages
            if rec.cohort.arm == TREATED:
                c.cost += sign * rec.messages * float(self.config.cost_per_message.get(rec.cohort.channel, 0.0))
        if stage >= 3:
            c.d7_users += sign
            if rec.flags & _D7:
                c.d7_returned += sign
        if c.entered == 0:  # no record left: exact zeros, whatever the rounding of the sums taken out
            c.revenue = c.revenue_sq = c.cost = 0.0

    def _change(self, rec: _Rec, update) -> None:
        if rec.stage:  # counted in closed windows: out with the old contribution, in with the new
            self._apply(rec, -1)
            update(rec)
            self._apply(rec, 1)
        else:
            update(rec)  # an open record counts only as entered

    def _remove(self, rec: _Rec) -> None:
        self._apply(rec, -1)
        rec.stage = -1
        self._n -= 1
        held = self._users.get(rec.user_id)
        if held is rec:
            del self._users[rec.user_id]
        elif held is not None and type(held) is not _Rec:
            rest = [r for r in held if r is not rec]
            self._users[rec.user_id] = rest[0] if len(rest) == 1 else rest


def _more_messages(rec: _Rec) -> None:
    rec.messages += 1


class _Update:
    __slots__ = ("flags", "value")

    def __init__(self, flags: int, value: float):
        self.flags, self.value = flags, value

    def __call__(self, rec: _Rec) -> None:
        rec.flags = self.flags
        rec.revenue += self.value
