"""The event record of the ``events`` topic, and its validation as pure functions.

Every record a producer sends is parsed by :func:`parse_event`: it either becomes a
normalised :class:`Event` or raises :class:`InvalidEvent` whose ``reason`` tells a
person what to fix. PII fields are dropped here and never reach any state.

>>> e = parse_event(b'{"event_id": "e1", "user_id": 42, "type": "Click", "item_id": "sku-7",'
...                 b' "ts": "2024-11-24T12:00:00Z", "email": "a@b.c"}', now=1.8e9)
>>> e.user_id, e.type, e.ts
('42', 'click', 1732449600.0)
>>> try:
...     parse_event(b'{"event_id": "e2", "user_id": "u1", "type": "view", "ts": 1.7e9}', now=1.8e9)
... except InvalidEvent as exc:
...     print(exc.reason)
field 'item_id' is required for 'view' events
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import orjson

#: Event types of the contract. ``forget`` is the in-stream erasure request; ``unsubscribe`` (a person
#: followed a message's unsubscribe link) and ``push_bounce`` (a delivery service reported a permanent
#: failure, a hard bounce) turn off the consent of their ``context.channel`` in the user's ``users`` record.
#: Those three are not behaviour: the engine never learns them. New types go at the end: a type's position
#: is its code in the learned history (:data:`infogap.models.event_weights.TYPE_CODE`).
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rate", "impression", "dismiss",
               "push_open", "push_click", "forget", "unsubscribe", "push_bounce", "review")
#: Types that concern one item and so must carry ``item_id``.
ITEM_EVENT_TYPES = frozenset({"view", "click", "add_to_cart", "purchase", "rate", "impression", "dismiss", "review"})
#: The channels a push goes out on (:mod:`infogap.models.push_policy`), and that consent is given for.
CHANNELS = ("email", "app", "ads")
#: Types that turn off the consent of one channel, named by ``context.channel`` (one of :data:`CHANNELS`).
CONSENT_OFF_TYPES = frozenset({"unsubscribe", "push_bounce"})
#: Types the engine does not learn: they are no behaviour (the stream acts on them instead).
NOT_LEARNED_TYPES = frozenset({"forget"}) | CONSENT_OFF_TYPES
#: Fields that would identify a person; dropped at ingest wherever they appear.
PII_FIELDS = frozenset({"email", "phone", "ip", "name", "first_name", "last_name", "full_name",
                        "phone_number", "ip_address", "address", "email_address"})
_MAX_ID_LEN = 256
_MAX_CONTEXT_KEYS = 32
_MAX_CONTEXT_KEY_LEN = 64
_MAX_TYPE_LEN = 64
_MAX_TS_TEXT_LEN = 64
#: What looks like contact details in a review's text (an e-mail address, a web address, a phone number or any
#: run of 7 or more digits), masked as ``[contact]``: no PII is kept, and text feeds the learned models. Each
#: pattern runs only on a text that holds its marker character (an e-mail pattern on a text without "@"
#: took 10 ms per 2,000 CJK characters, all of them "word" characters), and repeats are bounded.
_EMAIL = re.compile(r"[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})+")
_URL = re.compile(r"(?:https?://|www\.)\S{1,500}", re.IGNORECASE)
_PHONE = re.compile(r"\+?\d[\d\s().-]{5,40}\d")
#: Control characters (other than tab and newline) in a review's text become spaces.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ReasonCode:
    """The fixed set of rejection codes: a dead letter's ``reason_code`` header and metric label.

    The human ``reason`` may quote the input; a code never does, so labels stay few and free of input.
    """

    EMPTY = "empty"  # null message value
    TOO_LARGE = "too_large"  # payload over INFOGAP_MAX_EVENT_BYTES
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"  # valid JSON, but not an object
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"  # a field of the wrong JSON type
    BAD_VALUE = "bad_value"  # a field of the right type with a value that is not accepted
    TOO_LONG = "too_long"  # a text field (or the context) over its length limit
    UNKNOWN_TYPE = "unknown_type"
    TS_OUT_OF_RANGE = "ts_out_of_range"  # before INFOGAP_MIN_EVENT_TS or past INFOGAP_MAX_FUTURE_S
    LATE = "late"  # older than its partition's newest event by more than INFOGAP_MAX_LATENESS_S
    UNKNOWN_ITEM = "unknown_item"
    KEY_MISMATCH = "key_mismatch"  # record key is not the event's user_id
    BAD_ITEMS_RECORD = "bad_items_record"
    BAD_USERS_RECORD = "bad_users_record"
    BAD_COOC_RECORD = "bad_cooc_record"
    BAD_ERASURES_RECORD = "bad_erasures_record"  # a key on the erasures topic that is not a digest
    INTERNAL_ERROR = "internal_error"  # a bug in validation; the record is kept in the DLQ
    OTHER = "other"  # the catch-all: any code not in this set is counted as this


#: Every :class:`ReasonCode` value.
REASON_CODES = frozenset(v for k, v in vars(ReasonCode).items() if k.isupper())


class InvalidEvent(ValueError):
    """A record that is not a valid event; ``reason`` says what is wrong and how to fix it, ``code`` its kind
    (one of :data:`REASON_CODES`)."""

    def __init__(self, reason: str, code: str = ReasonCode.OTHER):
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class Limits:
    """What :func:`parse_event` accepts beyond the schema."""

    max_bytes: int = 16_384
    min_ts: float = 631_152_000.0  # 1990-01-01T00:00:00Z
    max_future_s: float = 300.0  # minutes, not a day: a skewed clock must not pass (see infogap.stream.core.ingest)
    allow_unknown_types: bool = False
    max_text_chars: int = 2_000  # a review's text


@dataclass(frozen=True, slots=True)
class Event:
    """One normalised behaviour event; time is ``ts``, epoch seconds (UTC)."""

    event_id: str
    user_id: str
    type: str
    ts: float
    item_id: str | None = None
    value: float | None = None
    rating: float | None = None
    session_id: str | None = None
    context: Mapping[str, str] | None = None
    text: str | None = None  # a review's words (contact details masked); None on other types

    def to_dict(self) -> dict:
        """The event as on the topic (None fields left out)."""
        d = {"event_id": self.event_id, "user_id": self.user_id, "type": self.type, "ts": self.ts}
        for k in ("item_id", "value", "rating", "session_id", "text"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.context:
            d["context"] = dict(self.context)
        return d


def as_event(obj: Event | Mapping) -> Event:
    """Trusting conversion of an already valid event dict (the model entry point); no validation."""
    if isinstance(obj, Event):
        return obj
    get = obj.get  # positional: a third cheaper than keywords, and learn_many converts every event
    return Event(obj["event_id"], obj["user_id"], obj["type"], obj["ts"], get("item_id"), get("value"), get("rating"),
                 get("session_id"), get("context"), get("text"))


#: ``key`` of :func:`parse_event` when the record key is not checked (e.g. events not read from Kafka).
UNCHECKED = object()


def parse_event(raw: bytes | bytearray | memoryview | None, *, now: float, limits: Limits = Limits(),
                user_id_of: Callable[[str], str] | None = None, key: object = UNCHECKED) -> Event:
    """Decode, validate and normalise one raw record; raise :class:`InvalidEvent` with a reason.

    ``now`` is the caller's clock (epoch seconds), used only to reject events from the future.
    ``user_id_of`` maps the valid user id to the one the event keeps (e.g. a pseudonym).
    ``key`` is the record's Kafka key (bytes or None): unless left :data:`UNCHECKED`, it must name the
    event's user (the same id, or the same after ``user_id_of``), else the event is refused
    (``key_mismatch``): one user's events must share one partition.

    >>> e = parse_event(b'{"event_id": "e1", "user_id": "alice", "type": "VIEW", "ts": 1.7e9, "item_id": "i1"}',
    ...                 now=1.7e9, user_id_of=str.upper)
    >>> e.user_id, e.type, e.ts
    ('ALICE', 'view', 1700000000.0)
    """
    if raw is None:
        raise InvalidEvent("empty record: the message value is null; send one JSON object per message",
                           ReasonCode.EMPTY)
    if len(raw) > limits.max_bytes:
        raise InvalidEvent(f"payload is {len(raw)} bytes, over the limit of {limits.max_bytes} bytes",
                           ReasonCode.TOO_LARGE)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}", ReasonCode.NOT_JSON) from None
    return validate_event(doc, now=now, limits=limits, user_id_of=user_id_of, key=key)


def validate_event(doc: object, *, now: float, limits: Limits = Limits(),
                   user_id_of: Callable[[str], str] | None = None, key: object = UNCHECKED) -> Event:
    """Validate and normalise a decoded JSON document (see :func:`parse_event`)."""
    if not isinstance(doc, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {json_type(doc)}", ReasonCode.NOT_OBJECT)
    event_id = _required_id(doc, "event_id")
    user_id = _required_id(doc, "user_id")
    etype = doc.get("type")
    if etype is None:
        raise InvalidEvent("missing required field 'type'", ReasonCode.MISSING_FIELD)
    if not isinstance(etype, str):
        raise InvalidEvent(f"field 'type' must be a string, got {json_type(etype)}", ReasonCode.BAD_TYPE)
    if len(etype) > _MAX_TYPE_LEN:
        raise InvalidEvent(f"field 'type' is {len(etype)} characters long, over the limit of {_MAX_TYPE_LEN}",
                           ReasonCode.TOO_LONG)
    etype = etype.strip().lower()
    if etype not in EVENT_TYPES:
        if not limits.allow_unknown_types:
            raise InvalidEvent(f"unknown event type {etype[:40]!r}; expected one of {', '.join(EVENT_TYPES)}",
                               ReasonCode.UNKNOWN_TYPE)
        if not etype or not etype.isprintable():
            raise InvalidEvent("field 'type' is empty or contains control characters", ReasonCode.BAD_VALUE)
    ts = _timestamp(doc, now, limits)
    item_id = _optional_id(doc, "item_id")
    if item_id is None and etype in ITEM_EVENT_TYPES:
        raise InvalidEvent(f"field 'item_id' is required for {etype!r} events", ReasonCode.MISSING_FIELD)
    value = _optional_number(doc, "value", -1e9, 1e9)
    rating = _optional_number(doc, "rating", 0.0, 10.0)
    session_id = _optional_id(doc, "session_id")
    context = _context(doc.get("context"))
    text = _review_text(doc, limits) if etype == "review" else None
    if etype in CONSENT_OFF_TYPES:
        _check_channel(etype, context)
    if key is not UNCHECKED and key != user_id.encode():  # the fast path: one compare of the raw ids
        _check_key(key, user_id, user_id_of)
    if user_id_of is not None:
        user_id = user_id_of(user_id)
    return Event(event_id, user_id, etype, ts, item_id, value, rating, session_id, context, text)


def _review_text(doc: dict, limits: Limits) -> str:
    """A review's ``text``: required, a string of at most ``limits.max_text_chars`` characters; contact details
    in it are masked and control characters become spaces (only what is said about the item is kept). The masked
    text is cut to the limit again: a mask is longer than a short address, and what is sent on must hold to it.

    >>> _review_text({"text": "Great kettle! mail me: ann@example.com or +33 6 12 34 56 78"}, Limits())
    'Great kettle! mail me: [contact] or [contact]'
    >>> len("a@b.cc " * 285), len(_review_text({"text": "a@b.cc " * 285}, Limits())) <= 2000
    (1995, True)
    """
    v = doc.get("text")
    if v is None:
        raise InvalidEvent("field 'text' is required for 'review' events: what the customer wrote",
                           ReasonCode.MISSING_FIELD)
    if not isinstance(v, str):
        raise InvalidEvent(f"field 'text' must be a string, got {json_type(v)}", ReasonCode.BAD_TYPE)
    if len(v) > limits.max_text_chars:
        raise InvalidEvent(f"field 'text' is {len(v)} characters long, over the limit of {limits.max_text_chars}",
                           ReasonCode.TOO_LONG)
    text = _CONTROL.sub(" ", v)
    if "@" in text:
        text = _EMAIL.sub("[contact]", text)
    if "://" in text or "www." in text.lower():
        text = _URL.sub("[contact]", text)
    text = _PHONE.sub("[contact]", text)[:limits.max_text_chars].strip()
    if not text:
        raise InvalidEvent("field 'text' is empty", ReasonCode.BAD_VALUE)
    return text


def _check_channel(etype: str, context: dict[str, str] | None) -> None:
    """An ``unsubscribe`` or ``push_bounce`` event must name the channel whose consent it turns off.

    >>> try:
    ...     _check_channel("unsubscribe", {"channel": "sms"})
    ... except InvalidEvent as exc:
    ...     print(exc.code, "|", exc.reason)  # doctest: +ELLIPSIS
    bad_value | field 'context.channel' is 'sms'; 'unsubscribe' events need one of email, app, ads (the channel...)
    """
    channel = (context or {}).get("channel")
    if channel is None:
        raise InvalidEvent(f"field 'context.channel' is required for {etype!r} events: the channel whose consent "
                           f"it turns off, one of {', '.join(CHANNELS)} (copy it from the push message)",
                           ReasonCode.MISSING_FIELD)
    if channel not in CHANNELS:
        raise InvalidEvent(f"field 'context.channel' is {channel[:40]!r}; {etype!r} events need one of "
                           f"{', '.join(CHANNELS)} (the channel of the message, as on the push topic)",
                           ReasonCode.BAD_VALUE)


def _check_key(key: object, user_id: str, user_id_of: Callable[[str], str] | None) -> None:
    """Raise ``key_mismatch`` unless ``key`` names ``user_id`` (after the contract's normalisation, or both
    mapped by ``user_id_of``). Never quotes either id: the reason goes to headers and logs."""
    fix = "; one user's events must share a partition (caps, dedupe): produce with key=user_id"
    if key is None:
        raise InvalidEvent("the record key is null, not the event's user_id" + fix, ReasonCode.KEY_MISMATCH)
    try:
        k = bytes(key).decode().strip() if isinstance(key, (bytes, bytearray, memoryview)) else None
    except ValueError:  # not UTF-8
        k = None
    if k == user_id:
        return
    if k and len(k) <= _MAX_ID_LEN and user_id_of is not None:
        try:
            if user_id_of(k) == user_id_of(user_id):
                return
        except (TypeError, ValueError):
            pass
    raise InvalidEvent("the record key is not the event's user_id" + fix, ReasonCode.KEY_MISMATCH)


def json_type(v: object) -> str:
    """How a decoded JSON value is named in a reason."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _id(name: str, v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise InvalidEvent(f"field {name!r} must be a string (or an integer), got {json_type(v)}",
                           ReasonCode.BAD_TYPE)
    s = str(v).strip()
    if not s:
        raise InvalidEvent(f"field {name!r} is empty", ReasonCode.BAD_VALUE)
    if len(s) > _MAX_ID_LEN:
        raise InvalidEvent(f"field {name!r} is {len(s)} characters long, over the limit of {_MAX_ID_LEN}",
                           ReasonCode.TOO_LONG)
    if not s.isprintable():
        raise InvalidEvent(f"field {name!r} contains control characters", ReasonCode.BAD_VALUE)
    return s


def _required_id(doc: dict, name: str) -> str:
    if doc.get(name) is None:
        raise InvalidEvent(f"missing required field {name!r}", ReasonCode.MISSING_FIELD)
    return _id(name, doc[name])


def _optional_id(doc: dict, name: str) -> str | None:
    v = doc.get(name)
    return None if v is None else _id(name, v)


def _optional_number(doc: dict, name: str, lo: float, hi: float) -> float | None:
    v = doc.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidEvent(f"field {name!r} must be a number, got {json_type(v)}", ReasonCode.BAD_TYPE)
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise InvalidEvent(f"field {name!r} is {v!r}, outside the accepted range [{lo:g}, {hi:g}]",
                           ReasonCode.BAD_VALUE)
    return f


def _timestamp(doc: dict, now: float, limits: Limits) -> float:
    v = doc.get("ts")
    if v is None:
        raise InvalidEvent("missing required field 'ts'", ReasonCode.MISSING_FIELD)
    if isinstance(v, bool):
        raise InvalidEvent("field 'ts' must be epoch seconds or an ISO-8601 string with a zone, got a boolean",
                           ReasonCode.BAD_TYPE)
    if isinstance(v, (int, float)):
        ts = float(v)
        if not math.isfinite(ts):
            raise InvalidEvent(f"field 'ts' is {v!r}; expected finite epoch seconds", ReasonCode.BAD_VALUE)
        if 1e11 < ts < 1e14:  # epoch milliseconds, as many producers send: normalise to seconds
            ts /= 1000.0
    elif isinstance(v, str):
        if len(v) > _MAX_TS_TEXT_LEN:
            raise InvalidEvent(f"field 'ts' is {len(v)} characters long, over the limit of {_MAX_TS_TEXT_LEN}",
                               ReasonCode.TOO_LONG)
        try:
            dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00") if v.strip().endswith("Z") else v.strip())
        except ValueError:
            raise InvalidEvent(f"field 'ts' {v[:40]!r} is not ISO-8601; send epoch seconds or e.g. "
                               "'2024-11-24T12:00:00+01:00'", ReasonCode.BAD_VALUE) from None
        if dt.tzinfo is None:
            raise InvalidEvent(f"field 'ts' {v[:40]!r} has no time zone; add 'Z' or an offset such as '+01:00'",
                               ReasonCode.BAD_VALUE)
        ts = dt.timestamp()
    else:
        raise InvalidEvent(f"field 'ts' must be epoch seconds or an ISO-8601 string with a zone, got {json_type(v)}",
                           ReasonCode.BAD_TYPE)
    if ts < limits.min_ts:
        raise InvalidEvent(f"field 'ts' is {ts:.0f}, before the earliest accepted time {limits.min_ts:.0f} "
                           "(epoch seconds); check the unit and the clock of the producer", ReasonCode.TS_OUT_OF_RANGE)
    if ts > now + limits.max_future_s:
        raise InvalidEvent(f"field 'ts' is {ts - now:.0f} s in the future of the worker's clock "
                           f"(at most {limits.max_future_s:.0f} s accepted); check the producer's clock",
                           ReasonCode.TS_OUT_OF_RANGE)
    return ts


def _context(v: object) -> dict[str, str] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidEvent(f"field 'context' must be an object, got {json_type(v)}", ReasonCode.BAD_TYPE)
    if len(v) > _MAX_CONTEXT_KEYS:
        raise InvalidEvent(f"field 'context' has {len(v)} keys, over the limit of {_MAX_CONTEXT_KEYS}",
                           ReasonCode.TOO_LONG)
    out: dict[str, str] = {}
    for k, x in v.items():
        if not isinstance(k, str) or len(k) > _MAX_CONTEXT_KEY_LEN or not k.isprintable():
            raise InvalidEvent(f"field 'context' has a key that is not a printable string of at most "
                               f"{_MAX_CONTEXT_KEY_LEN} characters", ReasonCode.BAD_VALUE)
        if k in PII_FIELDS or x is None:
            continue
        if isinstance(x, bool) or not isinstance(x, (str, int, float)):
            raise InvalidEvent(f"field 'context.{k[:40]}' must be a string, got {json_type(x)}", ReasonCode.BAD_TYPE)
        if isinstance(x, float) and not math.isfinite(x):
            raise InvalidEvent(f"field 'context.{k[:40]}' is {x!r}; expected a string", ReasonCode.BAD_VALUE)
        s = str(x)
        if len(s) > _MAX_ID_LEN:
            raise InvalidEvent(f"field 'context.{k[:40]}' is {len(s)} characters long, over the limit of {_MAX_ID_LEN}",
                               ReasonCode.TOO_LONG)
        if not s.isprintable():
            raise InvalidEvent(f"field 'context.{k[:40]}' contains control characters", ReasonCode.BAD_VALUE)
        out[k] = s
    return out or None
