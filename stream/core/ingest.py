"""Ingest: raw Kafka records in, valid unique events or dead letters out.

The worker never dies on a bad record: every rejection becomes a :class:`DeadLetter`
that goes to ``events.dlq`` with the raw bytes as the message value and the reason in the
headers (``reason``, ``reason_code``, ``source_topic``, ``source_partition``, ``source_offset``).
A value over :data:`MAX_DLQ_VALUE_BYTES` (a key over :data:`MAX_DLQ_KEY_BYTES`) is cut to it and
marked with a ``truncated`` (``key_truncated``) header giving its original length in bytes, so that
no dead letter is ever too large to produce; header values are bounded too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from infogap.models.dedupe import Deduplicator
from infogap.models.events import (NOT_LEARNED_TYPES, REASON_CODES, UNCHECKED, Event, InvalidEvent, Limits, ReasonCode,
                                   parse_event)

#: Bounds of a dead letter as produced: its value, its key and the text of its ``reason`` header. Their sum
#: with the other headers stays far below the producer's max_request_size and the brokers' default
#: message.max.bytes (1 MiB).
MAX_DLQ_VALUE_BYTES = 512 * 1024
MAX_DLQ_KEY_BYTES = 1024
MAX_REASON_CHARS = 500
#: The code of a dead letter built without one, by the contract name its source topic ends with.
_CODE_OF_TOPIC = (("items", ReasonCode.BAD_ITEMS_RECORD), ("users", ReasonCode.BAD_USERS_RECORD),
                  ("cooc", ReasonCode.BAD_COOC_RECORD))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record, as it will be written to the dead-letter topic.

    ``code`` is one of :data:`infogap.models.events.REASON_CODES` (the metric label); left out or unknown, it is
    derived from the source topic (``bad_items_record``, ...) or is ``other``: never free text.
    """

    raw: bytes | None
    key: bytes | None
    reason: str
    topic: str
    partition: int
    offset: int
    code: str = ""

    def __post_init__(self) -> None:
        if self.code not in REASON_CODES:
            code = next((c for name, c in _CODE_OF_TOPIC if self.topic.endswith(name)), ReasonCode.OTHER)
            object.__setattr__(self, "code", code)

    def headers(self) -> list[tuple[str, bytes]]:
        """The headers of the DLQ record: reason (cut to :data:`MAX_REASON_CHARS`), its code, the source, and
        the original lengths of a cut value or key."""
        out = [("reason", self.reason[:MAX_REASON_CHARS].encode("utf-8", "replace")),
               ("reason_code", self.code.encode()), ("source_topic", self.topic[:MAX_REASON_CHARS].encode()),
               ("source_partition", str(self.partition).encode()), ("source_offset", str(self.offset).encode())]
        if self.raw is not None and len(self.raw) > MAX_DLQ_VALUE_BYTES:
            out.append(("truncated", str(len(self.raw)).encode()))
        if self.key is not None and len(self.key) > MAX_DLQ_KEY_BYTES:
            out.append(("key_truncated", str(len(self.key)).encode()))
        return out

    def message(self, topic: str) -> tuple:
        """``(topic, value, key, headers)`` for the producer: value and key cut to their bounds."""
        raw, key = self.raw, self.key
        if raw is not None and len(raw) > MAX_DLQ_VALUE_BYTES:
            raw = bytes(raw[:MAX_DLQ_VALUE_BYTES])
        if key is not None and len(key) > MAX_DLQ_KEY_BYTES:
            key = bytes(key[:MAX_DLQ_KEY_BYTES])
        return topic, raw, key, self.headers()


@dataclass
class IngestResult:
    events: list[Event] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each event's offset in its partition
    dead: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0


class Ingest:
    """Validate, normalise and deduplicate records (see :mod:`infogap.models.events`).

    ``max_skew_s`` bounds how far one event can move time forward: the partition's lateness watermark and
    the dedupe horizon advance with the event time cut to the record's timestamp (the broker's or the
    producer client's; the worker's clock ``now`` when absent, later, or before ``min_ts``) plus
    ``max_skew_s``, so a single event stamped a day ahead cannot make the next good events late. The
    event keeps its own ``ts``.
    ``check_keys``: a record whose key is not its event's user_id goes to the DLQ (``key_mismatch``).
    """

    def __init__(self, limits: Limits, dedupe: Deduplicator, pseudonymize: Callable[[str], str] | None = None,
                 *, max_lateness_s: float = float("inf"), known_item: Callable[[str], bool] | None = None,
                 max_skew_s: float = 300.0, check_keys: bool = True):
        self.limits = limits
        self.dedupe = dedupe
        self.pseudonymize = pseudonymize
        self.max_lateness_s = max_lateness_s
        self.known_item = known_item
        self.max_skew_s = max_skew_s
        self.check_keys = check_keys
        #: newest accepted event time per (topic, partition), bounded as above: events older than it by more
        #: than the allowed lateness are rejected; those within it are applied (the models decay by event time).
        self.watermarks: dict[tuple[str, int], float] = {}

    def accept(self, records, now: float) -> IngestResult:
        """Split aiokafka ``ConsumerRecord``-likes (``value``, ``key``, ``topic``, ``partition``, ``offset``,
        ``timestamp`` in ms)."""
        out = IngestResult()
        limits, user_id_of, check_keys = self.limits, self.pseudonymize, self.check_keys
        skew, lateness = self.max_skew_s, self.max_lateness_s
        min_ms, now_ms = limits.min_ts * 1000.0, now * 1000.0  # a record timestamp outside: taken as absent
        for rec in records:
            try:
                event = parse_event(rec.value, now=now, limits=limits, user_id_of=user_id_of,
                                    key=rec.key if check_keys else UNCHECKED)
            except InvalidEvent as exc:
                out.dead.append(DeadLetter(rec.value, rec.key, exc.reason, rec.topic, rec.partition, rec.offset,
                                           exc.code))
                continue
            except Exception as exc:  # a bug in validation must not stop the stream: the record is kept in the DLQ
                out.dead.append(DeadLetter(rec.value, rec.key, f"internal validation error: {type(exc).__name__}",
                                           rec.topic, rec.partition, rec.offset, ReasonCode.INTERNAL_ERROR))
                continue
            if self.known_item is not None and event.item_id is not None and not self.known_item(event.item_id):
                out.dead.append(DeadLetter(rec.value, rec.key,
                                           f"item {event.item_id[:60]!r} is not in the catalog; publish it to the "
                                           "items topic first, or set INFOGAP_UNKNOWN_ITEMS=accept",
                                           rec.topic, rec.partition, rec.offset, ReasonCode.UNKNOWN_ITEM))
                continue
            where = (rec.topic, rec.partition)
            newest = self.watermarks.get(where, float("-inf"))
            ts = event.ts
            # an erasure or a consent withdrawn holds however late: it changes no model, and a person's request
            # must never be dropped
            if ts < newest - lateness and event.type not in NOT_LEARNED_TYPES:
                out.dead.append(DeadLetter(rec.value, rec.key,
                                           f"late event: {newest - ts:.0f} s older than the newest event of its "
                                           f"partition, more than the {lateness:.0f} s of lateness accepted "
                                           "(INFOGAP_MAX_LATENESS_S)", rec.topic, rec.partition, rec.offset,
                                           ReasonCode.LATE))
                continue
            stamp = getattr(rec, "timestamp", None)  # ms; what the record says of when it was produced
            bound = (stamp / 1000.0 if stamp is not None and min_ms < stamp < now_ms else now) + skew
            if ts > bound:  # ahead of its own record: time moves by the bound, not by the event's claim
                ts = bound
            if ts > newest:
                self.watermarks[where] = ts
            if self.dedupe.seen(event.event_id, ts):
                out.duplicates += 1
                continue
            out.events.append(event)
            out.offsets.append(rec.offset)
        return out
