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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import orjson

from infogap.models.catalog import check_id, decode_key, json_type, load_record
from infogap.models.events import CHANNELS  # the push channels (unsubscribe/push_bounce events name one)
from infogap.models.retention import ControlGroup, in_control_group
from infogap.models.state_fields import StateError, check

#: A raw ``users`` record larger than this is refused before it is decoded.
MAX_USERS_RECORD_BYTES = 16 * 1024
#: Limits of ``consent``: keys, and the length of each.
MAX_CONSENT_KEYS = 16
MAX_CONSENT_KEY_CHARS = 32
#: A time zone is an IANA name (at most 4 parts of letters, digits, ``_+-``), checked before zoneinfo reads it.
MAX_TIMEZONE_CHARS = 64
_TIMEZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+){0,3}")


@dataclass(frozen=True, slots=True)
class UserPrefs:
    """A user's marketing preferences as on the ``users`` topic (no PII)."""

    user_id: str
    consent: Mapping[str, bool]
    timezone: str = "UTC"
    quiet_hours: tuple[int, int] | None = (22, 8)

    @classmethod
    def from_record(cls, doc: Mapping) -> UserPrefs:
        """Validate a ``users`` record; raise ValueError with a reason a person can act on.

        ``user_id`` follows the event contract's id rules; ``consent`` is an object of at most
        :data:`MAX_CONSENT_KEYS` channels, each true, false or null; ``timezone`` an IANA name (length and
        characters checked before zoneinfo reads it); ``quiet_hours`` two hours or null.
        """
        if not isinstance(doc, Mapping):
            raise ValueError(f"a users record must be a JSON object, got {json_type(doc)}")
        user_id = doc.get("user_id")
        if not isinstance(user_id, (str, int)) or isinstance(user_id, bool) or not str(user_id).strip():
            raise ValueError("users record needs a non-empty 'user_id'")
        user_id = check_id("user_id", user_id)
        consent = doc.get("consent") or {}
        if not isinstance(consent, Mapping):
            raise ValueError("'consent' must be an object such as {\"email\": true, \"app\": false}")
        if len(consent) > MAX_CONSENT_KEYS:
            raise ValueError(f"field 'consent' has {len(consent)} keys, over the limit of {MAX_CONSENT_KEYS}")
        for k, v in consent.items():
            if not isinstance(k, str) or len(k) > MAX_CONSENT_KEY_CHARS or not k.isprintable():
                raise ValueError("field 'consent' has a key that is not a channel name such as 'email' (at most "
                                 f"{MAX_CONSENT_KEY_CHARS} printable characters)")
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"field 'consent.{k}' must be true, false or null, got {json_type(v)}")
        tz = doc.get("timezone") or "UTC"
        if not isinstance(tz, str):
            raise ValueError(f"field 'timezone' must be a string such as 'Europe/Paris', got {json_type(tz)}")
        if len(tz) > MAX_TIMEZONE_CHARS:
            raise ValueError(f"field 'timezone' is {len(tz)} characters long, over the limit of "
                             f"{MAX_TIMEZONE_CHARS}; use an IANA name such as 'Europe/Paris'")
        if not _TIMEZONE.fullmatch(tz):
            raise ValueError(f"field 'timezone' {tz!r} is not an IANA time zone name such as 'Europe/Paris'")
        try:
            ZoneInfo(tz)
        except Exception:  # not found, a directory, not a TZif file...: never more than a bad record
            raise ValueError(f"unknown time zone {tz!r}; use an IANA name such as 'Europe/Paris'") from None
        quiet = doc.get("quiet_hours", (22, 8))
        if quiet is not None:
            if (not isinstance(quiet, (list, tuple)) or len(quiet) != 2
                    or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 23 for h in quiet)):
                raise ValueError("'quiet_hours' must be [start_hour, end_hour] with hours 0..23, or null")
            quiet = (quiet[0], quiet[1])
        return cls(user_id, {k: v is True for k, v in consent.items()}, tz, quiet)

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview, key: bytes | None) -> UserPrefs:
        """Decode and check a raw ``users`` record whose Kafka key is ``key`` (see :meth:`from_record`).

        The key must be the record's ``user_id`` (compared raw, as produced, before any pseudonym): a
        compacted topic keeps one record per key, and a tombstone erases by key.

        >>> UserPrefs.parse(b'{"user_id": 42, "consent": {"app": true}}', b"42").user_id
        '42'
        >>> UserPrefs.parse(b'{"user_id": "victim"}', b"mallory")
        Traceback (most recent call last):
        ...
        ValueError: the record key is not the user's 'user_id'; produce users records with key=user_id
        """
        prefs = cls.from_record(load_record(raw, MAX_USERS_RECORD_BYTES))
        if key is None:
            raise ValueError("the record key is null; produce users records with key=user_id")
        if decode_key(key) != prefs.user_id:
            raise ValueError("the record key is not the user's 'user_id'; produce users records with key=user_id")
        return prefs

    def without_consent(self, channel: str) -> UserPrefs:
        """These preferences with ``channel``'s consent off (an ``unsubscribe`` or ``push_bounce`` event); the other
        channels and settings kept. The consent stays within :data:`MAX_CONSENT_KEYS`: past it, the other refusals
        (false) are left out, and then ``channel`` itself (absent or false, only true consents).

        >>> p = UserPrefs("u1", {"email": True, "app": True}, "Europe/Paris", None).without_consent("email")
        >>> p.consent, p.timezone, p.quiet_hours
        ({'email': False, 'app': True}, 'Europe/Paris', None)
        >>> many = UserPrefs("u1", {f"c{i}": i < 8 for i in range(16)}).without_consent("email").consent
        >>> len(many), many["email"], any(v is False for k, v in many.items() if k != "email")
        (9, False, False)
        """
        consent = {**self.consent, channel: False}
        if len(consent) > MAX_CONSENT_KEYS:
            consent = {k: v for k, v in consent.items() if v or k == channel}
            if len(consent) > MAX_CONSENT_KEYS:
                del consent[channel]
        return replace(self, consent=consent)

    def to_record(self, user_id: str | None = None) -> dict:
        """The ``users`` record of these preferences (:meth:`from_record` reads it back equal), naming the user
        ``user_id`` (the record's key as produced, raw) instead of :attr:`user_id` when given.

        >>> doc = UserPrefs("u1", {"email": False, "app": True}).to_record()
        >>> doc
        {'user_id': 'u1', 'consent': {'email': False, 'app': True}, 'timezone': 'UTC', 'quiet_hours': [22, 8]}
        >>> UserPrefs.from_record(doc) == UserPrefs("u1", {"email": False, "app": True})
        True
        """
        return {"user_id": self.user_id if user_id is None else user_id, "consent": dict(self.consent),
                "timezone": self.timezone, "quiet_hours": None if self.quiet_hours is None else list(self.quiet_hours)}


@dataclass(frozen=True, slots=True)
class PushConfig:
    """Rules of the push channel; caps are per channel and per local day."""

    min_new_items: int = 3
    daily_cap: Mapping[str, int] = field(default_factory=lambda: {"email": 1, "app": 3, "ads": 5})
    repeat_window_s: float = 7 * 86_400.0
    ttl_s: float = 86_400.0
    items_per_push: int = 5
    campaign: str = "recs"
    #: A message is at most this many bytes as JSON: longer titles and reasons are cut, then items dropped.
    max_message_bytes: int = 64 * 1024
    #: The global control group's share of users (:class:`~infogap.models.retention.ControlGroup`): they are
    #: never sent anything (rule ``control_group``); 0 keeps nobody out.
    control_share: float = 0.0


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One message for the ``push`` topic (see docs/contracts.md)."""

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


#: Why a push was held back: no material change of the top-N; no consent (the channel's, or a user without
#: preferences); the user's quiet hours; the channel's daily cap; every item pushed within the repeat window;
#: a message over ``max_message_bytes`` even with one item; nothing ranked; the user is in the global control group
#: (the message that would have been sent is the decision's ``ghost``, see :mod:`infogap.models.retention`).
RULES = ("no_change", "no_consent", "quiet_hours", "daily_cap", "repeat", "too_large", "no_recommendations",
         "control_group")


@dataclass(frozen=True, slots=True)
class PushDecision:
    """One push decision: ``message`` sent on ``channel``, or held back by ``rule`` (one of :data:`RULES`);
    ``channel`` is None when the rule held for every channel. ``at`` is the event time it was decided at;
    ``repeat`` that the same rule held the push back on the same channel (or on every channel) at its previous
    decision too (since this policy was created or restored: it is not part of the snapshot). ``ghost``: under
    rule ``control_group``, the message that every other rule let through, never sent (a ghost push)."""

    channel: str | None
    rule: str | None
    at: float
    message: PushMessage | None = None
    #: the same rule held the push back on this channel (or on every channel) at the last decision about it too (a
    #: log may skip it; "no_change" decides nothing about a channel)
    repeat: bool = False
    #: rule "control_group": what would have been sent (its campaign, channel, variant and time), not sent
    ghost: PushMessage | None = None

    @property
    def sent(self) -> bool:
        return self.message is not None


#: every combination of last rules met, each kept once: a user's state points to a shared tuple
_RULES_SEEN: dict[tuple, tuple] = {}
#: where a channel's last rule is in ``_UserPushState.last_rules`` (None: a rule for every channel)
_RULE_SLOT = {None: 0, **{c: k + 1 for k, c in enumerate(CHANNELS)}}
_NO_RULES = (None,) * (len(CHANNELS) + 1)


def _rules_seen(rules: tuple) -> tuple:
    """The shared copy of ``rules`` (a rule or None per slot of :data:`_RULE_SLOT`: a few hundred combinations)."""
    return _RULES_SEEN.setdefault(rules, rules)


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
    #: the last rule of every channel at once, then of each of CHANNELS ("sent", or None before any): not saved
    last_rules: tuple | None = None


class PushPolicy:
    """Decides pushes per user and remembers what it pushed (for caps and repeats).

    ``recs`` are ``Recommendation``-likes: objects with ``item_id``, ``score`` and ``reason``, or
    ``(item_id, score, reason)`` tuples, best first.
    """

    def __init__(self, config: PushConfig | None = None):
        self.config = config or PushConfig()
        self._users: dict[str, _UserPushState] = {}
        ControlGroup(self.config.control_share)  # checked

    def __len__(self) -> int:
        return len(self._users)

    def forget_user(self, user_id: str) -> None:
        self._users.pop(user_id, None)

    def evict_user(self, user_id: str, now: float) -> bool:
        """Drop the user's state to free memory (not an erasure) if nothing in it still counts at event time
        ``now``: no item pushed within the repeat window and no send on a day that may still be today in
        any time zone (daily caps). Returns whether it was dropped.

        >>> policy = PushPolicy(PushConfig(min_new_items=1))
        >>> prefs = UserPrefs("u1", {"app": True}, quiet_hours=None)
        >>> _ = policy.decide(prefs, [("sku-1", 0.9, "popular")], now=1732446000.0)
        >>> policy.evict_user("u1", now=1732446000.0 + 86_400), policy.evict_user("u1", now=1732446000.0 + 8 * 86_400)
        (False, True)
        """
        state = self._users.get(user_id)
        if state is None:
            return False
        if state.pushed_at or state.sent_today:  # something was sent: it counts until its windows pass
            if not abs(now) < float("inf"):  # no event time to tell (nor NaN)
                return False
            if any(t >= now - self.config.repeat_window_s for t in state.pushed_at.values()):
                return False
            last_day = datetime.fromtimestamp(now - 2 * 86_400.0, tz=timezone.utc).date().isoformat()
            if any(day >= last_day for day, _ in state.sent_today.values()):
                return False
        del self._users[user_id]
        return True

    def to_state(self) -> dict:
        """What each user was pushed (caps, repeats), as a plain tree for a snapshot:
        ``{user: [last top items, {item: pushed at}, {channel: [local date, count]}]}``."""
        return {"users": {u: [sorted(st.last_top), st.pushed_at, st.sent_today] for u, st in self._users.items()}}

    def restore_state(self, state, where: str = "push policy") -> None:
        """Take the users of :meth:`to_state`, each checked (this object's config applies).

        >>> p = PushPolicy(); p._users["u"] = _UserPushState(frozenset({"a"}), {"a": 5.0}, {"email": ("2024-01-01", 1)})
        >>> q = PushPolicy(); q.restore_state(p.to_state()); q._users == p._users
        True
        """
        users = check(state, {"users": dict}, where)["users"]
        out = {}
        for u, entry in users.items():
            ok = isinstance(entry, list) and len(entry) == 3
            top, pushed, sent = entry if ok else ([], {}, {})
            ok = (ok and isinstance(top, list) and all(type(i) is str for i in top) and isinstance(pushed, dict)
                  and all(type(t) in (int, float) for t in pushed.values()) and isinstance(sent, dict)
                  and all(isinstance(v, (list, tuple)) and len(v) == 2 and type(v[0]) is str and type(v[1]) is int
                          for v in sent.values()))
            if not ok:
                raise StateError(f"{where}: the push state of a user is not [items, {{item: time}}, "
                                 "{channel: [date, count]}]")
            out[u] = _UserPushState(frozenset(top), {i: float(t) for i, t in pushed.items()},
                                    {c: (d, n) for c, (d, n) in sent.items()})
        self._users = out

    def knows(self, user_id: str) -> bool:
        return user_id in self._users

    def decide(self, prefs: UserPrefs | None, recs: Sequence, now: float,
               variant: str | None = None, title: Callable[[str], str] | None = None) -> list[PushMessage]:
        """Messages to send now for ``prefs.user_id`` given their fresh top-N (may be empty): the messages of
        :meth:`decisions`."""
        if prefs is None or not recs:  # most users ranked have no preferences: no decision to build
            return []
        return [d.message for d in self.decisions(prefs, recs, now, variant, title) if d.message is not None]

    def decisions(self, prefs: UserPrefs | None, recs: Sequence, now: float, variant: str | None = None,
                  title: Callable[[str], str] | None = None) -> list[PushDecision]:
        """What was decided for ``prefs.user_id`` given their fresh top-N, and why: a message per channel sent,
        or the rule that held it back (:data:`RULES`). One decision without a channel when the rule holds for
        all (``no_change``, ``quiet_hours``, ``no_consent`` for every channel, nothing to rank).

        ``title`` names an item for the person who reads the message (e.g.
        :meth:`infogap.models.engine.Engine.title`): each item then carries its ``title``, and the message's
        reason names the first item by it instead of by its id.

        >>> policy = PushPolicy(PushConfig(min_new_items=1, daily_cap={"email": 1, "app": 0}))
        >>> prefs = UserPrefs("u1", {"email": True, "app": True}, quiet_hours=None)
        >>> [(d.channel, d.rule) for d in policy.decisions(prefs, [("sku-1", 0.9, "popular")], now=1732446000.0)]
        [('email', None), ('app', 'daily_cap'), ('ads', 'no_consent')]
        >>> [(d.channel, d.rule) for d in policy.decisions(prefs, [("sku-1", 0.9, "popular")], now=1732446060.0)]
        [(None, 'no_change')]
        >>> [(d.rule, d.repeat) for d in policy.decisions(prefs, [("sku-1", 0.9, "popular")], now=1732446120.0)]
        [('no_change', True)]

        A user of the control group is sent nothing; every other rule applies as to anyone (the ghost counts
        towards the caps), and the decision carries the message that would have gone out:

        >>> control = PushPolicy(PushConfig(min_new_items=1, control_share=0.5))
        >>> [(d.channel, d.rule, d.ghost.channel if d.ghost else None)
        ...  for d in control.decisions(replace(prefs, user_id="u3"), [("sku-1", 0.9, "popular")], now=1732446000.0)]
        [('email', 'control_group', 'email'), ('app', 'control_group', 'app'), ('ads', 'no_consent', None)]
        """
        if prefs is None:
            return [PushDecision(None, "no_consent", now)]
        if not recs:
            state = self._users.get(prefs.user_id)
            repeat = state is not None and state.last_rules is not None and state.last_rules[0] == "no_recommendations"
            if state is not None and not repeat:
                state.last_rules = _rules_seen(("no_recommendations", *_NO_RULES[1:]))
            return [PushDecision(None, "no_recommendations", now, None, repeat)]
        state = self._users.get(prefs.user_id)
        if state is None:
            state = self._users[prefs.user_id] = _UserPushState()
        out = self._decide(state, prefs, recs, now, variant, title)
        share = self.config.control_share
        if share and any(d.message is not None for d in out) and in_control_group(prefs.user_id, share):
            # a ghost push: decided by every rule, counted by the caps and repeats as sent (so that the control
            # group enters its cohorts exactly where it would have been pushed), never sent
            out = [PushDecision(d.channel, "control_group", now, None, False, d.message) if d.message is not None
                   else d for d in out]
        last = state.last_rules or _NO_RULES
        if len(out) == 1 and out[0].channel is None:  # most decisions: one rule for every channel
            rule = out[0].rule
            if last[0] == rule:
                return [PushDecision(None, rule, now, None, True)]
            # no material change decides nothing about a channel: their last rules stay; any other rule held
            # each channel back, and is each channel's last decision
            state.last_rules = _rules_seen((rule, *(last[1:] if rule == "no_change" else _NO_RULES[1:])))
            return out
        rules = list(last)
        rules[0] = None  # a decision per channel ends any run of a rule for every channel
        for k, d in enumerate(out):
            at = _RULE_SLOT[d.channel]
            if d.rule is not None and last[at] == d.rule:
                out[k] = PushDecision(d.channel, d.rule, now, None, True)
            rules[at] = d.rule or "sent"
        state.last_rules = _rules_seen(tuple(rules))
        return out

    def _decide(self, state: _UserPushState, prefs: UserPrefs, recs: Sequence, now: float, variant: str | None,
                title: Callable[[str], str] | None) -> list[PushDecision]:
        cfg = self.config
        recs = [r if isinstance(r, tuple) else (r.item_id, r.score, r.reason) for r in recs]
        top = frozenset(r[0] for r in recs)
        changed = len(top - state.last_top) >= min(cfg.min_new_items, len(top))
        state.last_top = top
        if not changed:
            return [PushDecision(None, "no_change", now)]
        consented = [c for c in CHANNELS if prefs.consent.get(c) is True]
        if not consented:
            return [PushDecision(None, "no_consent", now)]
        local = datetime.fromtimestamp(now, tz=timezone.utc).astimezone(ZoneInfo(prefs.timezone))
        if in_quiet_hours(local.hour, prefs.quiet_hours):
            return [PushDecision(None, "quiet_hours", now)]
        horizon = now - cfg.repeat_window_s
        state.pushed_at = {i: t for i, t in state.pushed_at.items() if t >= horizon}
        fresh = [r for r in recs if r[0] not in state.pushed_at][: cfg.items_per_push]
        if not fresh:
            return [PushDecision(None, "repeat", now)]
        day = local.date().isoformat()
        out = []
        for channel in CHANNELS:
            if channel not in consented:
                out.append(PushDecision(channel, "no_consent", now))
                continue
            sent_day, count = state.sent_today.get(channel, (day, 0))
            if sent_day != day:
                count = 0
            if count >= cfg.daily_cap.get(channel, 0):
                out.append(PushDecision(channel, "daily_cap", now))
                continue
            message = self._message(prefs.user_id, channel, fresh, now, variant, title)
            if message is None:  # cannot fit max_message_bytes even with one item: not sent, not counted
                out.append(PushDecision(channel, "too_large", now))
                continue
            state.sent_today[channel] = (day, count + 1)
            out.append(PushDecision(channel, None, now, message))
        for d in out:  # the items sent (a message cut to its size limit holds fewer)
            if d.message is not None:
                for it in d.message.items:
                    state.pushed_at[it["item_id"]] = now
        return out

    def _message(self, user_id: str, channel: str, fresh: list, now: float, variant: str | None,
                 title: Callable[[str], str] | None) -> PushMessage | None:
        """The message of ``fresh``, at most ``max_message_bytes`` as JSON: if larger, titles and reasons are
        cut to :data:`SHORT_TEXT_CHARS`, then the last items dropped; None if even one item is too large."""
        cfg = self.config
        items = [{"item_id": i, **({"title": title(i)} if title else {}), "score": round(float(s), 6),
                  "reason": r} for i, s, r in fresh]
        message = self._build(user_id, channel, items, now, variant)
        if len(orjson.dumps(message.to_dict())) <= cfg.max_message_bytes:  # every message of real titles
            return message
        items = [{**x, **({"title": _short(x["title"])} if "title" in x else {}), "reason": _short(x["reason"])}
                 for x in items]
        while items:
            message = self._build(user_id, channel, items, now, variant)
            if len(orjson.dumps(message.to_dict())) <= cfg.max_message_bytes:
                return message
            items.pop()
        return None

    def _build(self, user_id: str, channel: str, items: list[dict], now: float, variant: str | None) -> PushMessage:
        cfg = self.config
        items = tuple(items)
        digest = hashlib.blake2b(f"{user_id}|{channel}|{now!r}|{','.join(x['item_id'] for x in items)}".encode(),
                                 digest_size=8).hexdigest()
        more = f" and {len(items) - 1} more" if len(items) > 1 else ""
        first = items[0].get("title") or items[0]["item_id"]
        reason = f"new picks for you: {first}{more} ({items[0]['reason']})"
        return PushMessage(f"m-{digest}", user_id, channel, items, reason, cfg.campaign, variant, now, now + cfg.ttl_s)


#: Titles and reasons of a message over ``PushConfig.max_message_bytes`` are cut to this many characters.
SHORT_TEXT_CHARS = 80


def _short(text: str) -> str:
    """``text`` cut to :data:`SHORT_TEXT_CHARS` (ending in "…")."""
    text = str(text)
    return text if len(text) <= SHORT_TEXT_CHARS else text[:SHORT_TEXT_CHARS - 1] + "\u2026"
