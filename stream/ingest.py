"""Ingest: raw Kafka records in, valid unique events or dead letters out.

The worker never dies on a bad record: every rejection becomes a :class:`DeadLetter`
that goes to ``events.dlq`` with the raw bytes untouched as the message value and the
reason in the headers (``reason``, ``source_topic``, ``source_partition``, ``source_offset``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from models.dedupe import Deduplicator
from models.events import Event, InvalidEvent, Limits, parse_event


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record, as it will be written to the dead-letter topic."""

    raw: bytes | None
    key: bytes | None
    reason: str
    topic: str
    partition: int
    offset: int

    def headers(self) -> list[tuple[str, bytes]]:
        return [("reason", self.reason.encode()), ("source_topic", self.topic.encode()),
                ("source_partition", str(self.partition).encode()), ("source_offset", str(self.offset).encode())]


@dataclass
class IngestResult:
    events: list[Event] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each event's offset in its partition
    dead: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0


class Ingest:
    """Validate, normalise and deduplicate records (see :mod:`models.events`)."""

    def __init__(self, limits: Limits, dedupe: Deduplicator, pseudonymize: Callable[[str], str] | None = None,
                 *, max_lateness_s: float = float("inf"), known_item: Callable[[str], bool] | None = None):
        self.limits = limits
        self.dedupe = dedupe
        self.pseudonymize = pseudonymize
        self.max_lateness_s = max_lateness_s
        self.known_item = known_item
        #: newest accepted event time per (topic, partition): events older than it by more than the
        #: allowed lateness are rejected; those within it are applied (the models decay by event time).
        self.watermarks: dict[tuple[str, int], float] = {}

    def accept(self, records, now: float) -> IngestResult:
        """Split aiokafka ``ConsumerRecord``-likes (``value``, ``key``, ``topic``, ``partition``, ``offset``)."""
        out = IngestResult()
        for rec in records:
            try:
                event = parse_event(rec.value, now=now, limits=self.limits, user_id_of=self.pseudonymize)
            except InvalidEvent as exc:
                out.dead.append(DeadLetter(rec.value, rec.key, exc.reason, rec.topic, rec.partition, rec.offset))
                continue
            except Exception as exc:  # a bug in validation must not stop the stream: the record is kept in the DLQ
                out.dead.append(DeadLetter(rec.value, rec.key, f"internal validation error: {type(exc).__name__}",
                                           rec.topic, rec.partition, rec.offset))
                continue
            if self.known_item is not None and event.item_id is not None and not self.known_item(event.item_id):
                out.dead.append(DeadLetter(rec.value, rec.key,
                                           f"item {event.item_id[:60]!r} is not in the catalog; publish it to the "
                                           "items topic first, or set INFOGAP_UNKNOWN_ITEMS=accept",
                                           rec.topic, rec.partition, rec.offset))
                continue
            where = (rec.topic, rec.partition)
            newest = self.watermarks.get(where, float("-inf"))
            if event.ts < newest - self.max_lateness_s:
                out.dead.append(DeadLetter(rec.value, rec.key,
                                           f"late event: {newest - event.ts:.0f} s older than the newest event of its "
                                           f"partition, more than the {self.max_lateness_s:.0f} s of lateness accepted "
                                           "(INFOGAP_MAX_LATENESS_S)", rec.topic, rec.partition, rec.offset))
                continue
            if event.ts > newest:
                self.watermarks[where] = event.ts
            if self.dedupe.seen(event.event_id, event.ts):
                out.duplicates += 1
                continue
            out.events.append(event)
            out.offsets.append(rec.offset)
        return out
