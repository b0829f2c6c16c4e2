"""When a user's fresh recommendations may be pushed, and on which channel: pure business rules.

A push goes out on a channel only if all hold: the top-N changed materially since the last
decision, the channel is consented in the user's ``users`` record, the user's local time is
outside their quiet hours, the channel's daily cap (a day in the user's time zone) has room,
and at least one item was not pushed to the user within the repeat window. Pushes that fall
in quiet hours are dropped, not held: the recommendations stay fresh in Redis, and the next
material change outside quiet hours pushes again. Time is the caller's ``now`` (event time).

>>> policy = PushPolicy(PushConfig(min_new_items=1))
>>> prefs = UserPrefs.from_record({"user_id": "u1", "consent": {"email": True}, "timezone": "Europe/Paris",
...                                "quiet_hours": [22, 8]})
>>> noon_paris = 1732446000.0  # 2024-11-24 11:00 UTC = 12:00 in Paris
>>> [m.channel for m in policy.decide(prefs, [("sku-1", 0.9, "popular")], now=noon_paris)]
['email']
>>> policy.decide(prefs, [("sku-2", 0.9, "popular")], now=noon_paris + 60)  # email cap: 1 a day
[]
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CHANNELS = ("email", "app", "ads")


@dataclass(frozen=True, slots=True)
class UserPrefs:
    """A user's marketing preferences as on the ``users`` topic (no PII)."""

    user_id: str
    consent: Mapping[str, bool]
    timezone: str = "UTC"
    quiet_hours: tuple[int, int] | None = (22, 8)

    @classmethod
    def from_record(cls, doc: Mapping) -> UserPrefs:
        """Validate a ``users`` record; raise ValueError with a reason a person can act on."""
        user_id = doc.get("user_id")
        if not isinstance(user_id, (str, int)) or isinstance(user_id, bool) or not str(user_id).strip():
            raise ValueError("users record needs a non-empty 'user_id'")
        consent = doc.get("consent") or {}
        if not isinstance(consent, Mapping):
            raise ValueError("'consent' must be an object such as {\"email\": true, \"app\": false}")
        tz = doc.get("timezone") or "UTC"
        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {str(tz)[:60]!r}; use an IANA name such as 'Europe/Paris'") from None
        quiet = doc.get("quiet_hours", (22, 8))
        if quiet is not None:
            if (not isinstance(quiet, (list, tuple)) or len(quiet) != 2
                    or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 23 for h in quiet)):
                raise ValueError("'quiet_hours' must be [start_hour, end_hour] with hours 0..23, or null")
            quiet = (quiet[0], quiet[1])
        return cls(str(user_id).strip(), {str(k): v is True for k, v in consent.items()}, str(tz), quiet)


@dataclass(frozen=True, slots=True)
class PushConfig:
    """Rules of the push channel; caps are per channel and per local day."""

    min_new_items: int = 3
    daily_cap: Mapping[str, int] = field(default_factory=lambda: {"email": 1, "app": 3, "ads": 5})
    repeat_window_s: float = 7 * 86_400.0
    ttl_s: float = 86_400.0
    items_per_push: int = 5
    campaign: str = "recs"


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One message for the ``push`` topic (see DESIGN.md)."""

    message_id: str
    user_id: str
    channel: str
    items: tuple[dict, ...]
    reason: str
    campaign: str
    variant: str | None
    created_at: float
    expires_at: float

    def to_dict(self) -> dict:
        return {"message_id": self.message_id, "user_id": self.user_id, "channel": self.channel,
                "items": list(self.items), "reason": self.reason, "campaign": self.campaign,
                "variant": self.variant, "created_at": self.created_at, "expires_at": self.expires_at}


def in_quiet_hours(local_hour: int, quiet: tuple[int, int] | None) -> bool:
    """True if ``local_hour`` falls in ``[start, end)``, wrapping past midnight when start > end.

    >>> in_quiet_hours(23, (22, 8)), in_quiet_hours(7, (22, 8)), in_quiet_hours(8, (22, 8))
    (True, True, False)
    """
    if quiet is None or quiet[0] == quiet[1]:
        return False
    start, end = quiet
    return start <= local_hour < end if start < end else (local_hour >= start or local_hour < end)


@dataclass(slots=True)
class _UserPushState:
    last_top: frozenset = frozenset()
    pushed_at: dict = field(default_factory=dict)  # item_id -> last push time
    sent_today: dict = field(default_factory=dict)  # channel -> (local date iso, count)


class PushPolicy:
    """Decides pushes per user and remembers what it pushed (for caps and repeats).

    ``recs`` are ``Recommendation``-likes: objects with ``item_id``, ``score`` and ``reason``, or
    ``(item_id, score, reason)`` tuples, best first.
    """

    def __init__(self, config: PushConfig | None = None):
        self.config = config or PushConfig()
        self._users: dict[str, _UserPushState] = {}

    def __len__(self) -> int:
        return len(self._users)

    def forget_user(self, user_id: str) -> None:
        self._users.pop(user_id, None)

    def knows(self, user_id: str) -> bool:
        return user_id in self._users

    def decide(self, prefs: UserPrefs | None, recs: Sequence, now: float,
               variant: str | None = None, title: Callable[[str], str] | None = None) -> list[PushMessage]:
        """Messages to send now for ``prefs.user_id`` given their fresh top-N (may be empty).

        ``title`` names an item for the person who reads the message (e.g.
        :meth:`models.engine.Engine.title`): each item then carries its ``title``, and the message's
        reason names the first item by it instead of by its id.
        """
        if prefs is None or not recs:
            return []
        cfg = self.config
        recs = [r if isinstance(r, tuple) else (r.item_id, r.score, r.reason) for r in recs]
        state = self._users.get(prefs.user_id)
        if state is None:
            state = self._users[prefs.user_id] = _UserPushState()
        top = frozenset(r[0] for r in recs)
        changed = len(top - state.last_top) >= min(cfg.min_new_items, len(top))
        state.last_top = top
        if not changed:
            return []
        channels = [c for c in CHANNELS if prefs.consent.get(c) is True and cfg.daily_cap.get(c, 0) > 0]
        if not channels:
            return []
        local = datetime.fromtimestamp(now, tz=timezone.utc).astimezone(ZoneInfo(prefs.timezone))
        if in_quiet_hours(local.hour, prefs.quiet_hours):
            return []
        horizon = now - cfg.repeat_window_s
        state.pushed_at = {i: t for i, t in state.pushed_at.items() if t >= horizon}
        fresh = [r for r in recs if r[0] not in state.pushed_at][: cfg.items_per_push]
        if not fresh:
            return []
        day = local.date().isoformat()
        out = []
        for channel in channels:
            sent_day, count = state.sent_today.get(channel, (day, 0))
            if sent_day != day:
                count = 0
            if count >= cfg.daily_cap[channel]:
                continue
            state.sent_today[channel] = (day, count + 1)
            out.append(self._message(prefs.user_id, channel, fresh, now, variant, title))
        if out:
            for item_id, _, _ in fresh:
                state.pushed_at[item_id] = now
        return out

    def _message(self, user_id: str, channel: str, fresh: list, now: float, variant: str | None,
                 title: Callable[[str], str] | None) -> PushMessage:
        cfg = self.config
        items = tuple({"item_id": i, **({"title": title(i)} if title else {}), "score": round(float(s), 6),
                       "reason": r} for i, s, r in fresh)
        digest = hashlib.blake2b(f"{user_id}|{channel}|{now!r}|{','.join(x['item_id'] for x in items)}".encode(),
                                 digest_size=8).hexdigest()
        more = f" and {len(items) - 1} more" if len(items) > 1 else ""
        first = items[0].get("title") or items[0]["item_id"]
        reason = f"new picks for you: {first}{more} ({items[0]['reason']})"
        return PushMessage(f"m-{digest}", user_id, channel, items, reason, cfg.campaign, variant, now, now + cfg.ttl_s)
