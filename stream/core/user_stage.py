"""The user stage's logic, without Kafka or Redis: records, state and event time in; recommendations,
pushes, co-occurrence updates, dead letters and counters out.

The worker (:mod:`infogap.stream.worker`) is the I/O shell around it: it fetches records, calls the steps of a
batch in order, and between them produces what they return and reads and writes the store.

A batch, per ``events`` partition and in order: :meth:`UserStage.learn` (ingest: validate, dedupe, DLQ;
``forget`` erases at once; ``unsubscribe`` and ``push_bounce`` turn a channel's consent off at once, the ``users``
records saying so to produce; the engine learns; the ``cooc`` records of the updates), then the shell makes the
neighbour rows of :meth:`UserStage.wanted_items` current (the store), then :meth:`UserStage.rank` (each
touched user ranked, the push policy, experiment counts, the control group's cohorts, eviction). Side records
(``erasures``, ``items``, ``users``) are applied by :meth:`UserStage.apply_side`.

>>> from infogap.stream.settings import Settings
>>> stage = UserStage(Settings(), clock=lambda: 1.7e9)
>>> learned = stage.learn({0: [Record.event(0, 0, {"event_id": "e1", "user_id": "u1", "item_id": "a",
...                                                 "type": "view", "ts": 1.7e9 - 60})]}, now=1.7e9, cooc_partitions=12)
>>> list(learned.touched), learned.n_ok, learned.dead
(['u1'], 1, [])
>>> ranked = stage.rank(learned, now=1.7e9)
>>> [doc["user_id"] for doc in ranked.docs]
['u1']
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import orjson

from infogap.models import Engine
from infogap.models.catalog import MAX_ID_CHARS, decode_key, parse_item
from infogap.models.cooc_shard import POPULATION_KIND, POPULATION_PARTITION, owner
from infogap.models.dedupe import Deduplicator
from infogap.models.events import CONSENT_OFF_TYPES, Event, Limits
from infogap.models.experiments import FEEDBACK_TYPES, Counts, Segment, kafka_partition
from infogap.models.push_policy import PushConfig, PushMessage, UserPrefs
from infogap.models.retention import Cohort, CohortCounts
from infogap.models.state_fields import StateError
from infogap.models.user_state import export_users, import_users, users_from_state
from infogap.stream.core.erasures import ErasureLedger
from infogap.stream.core.ingest import DeadLetter, Ingest
from infogap.stream.core.user_partition import UserPartition
from infogap.stream.experiments_store import experiment_from_settings
from infogap.stream.pseudonym import Pseudonymizer
from infogap.stream.settings import Settings
from infogap.stream.store.base import decision_entry
from infogap.stream.text import sentiment_model

log = logging.getLogger("infogap.worker")

#: Slot updates per ``cooc`` record (about 56 bytes each): records stay well under Kafka's 1 MiB default.
COOC_RECORD_UPDATES = 8_000
#: A population record larger than this is cut in two (by event), and so on.
POPULATION_RECORD_BYTES = 512 * 1024
#: A review model read from the store larger than this is not read (the largest a model's bounded settings allow
#: is about 20 MB as JSON; the defaults' about 3 MB).
MAX_REVIEW_MODEL_BYTES = 64 * 1024 * 1024

#: A message to produce: (topic, value, key, headers[, partition]).
Message = tuple


@dataclass(frozen=True, slots=True)
class Record:
    """What the stage reads of a Kafka record (aiokafka's ``ConsumerRecord`` has these fields too)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None  # ms, the record's create time
    headers: tuple = ()

    @classmethod
    def event(cls, partition: int, offset: int, event: dict, topic: str = "events", timestamp: int | None = None):
        """An ``events`` record of ``event`` (a dict), keyed by its user (tests, replays)."""
        return cls(topic, partition, offset, str(event.get("user_id", "")).encode(), orjson.dumps(event), timestamp)


@dataclass
class Learned:
    """What :meth:`UserStage.learn` did with a batch."""

    #: user -> (newest event time in this batch, events partition)
    touched: dict[str, tuple[float, int]] = field(default_factory=dict)
    #: users erased by ``forget`` events in this batch, new to the ledger: (user, partition, the record's key)
    erased: list[tuple[str, int, bytes | None]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    #: the ``users`` records of the consents turned off by ``unsubscribe`` / ``push_bounce`` events in this batch
    #: (one per user and record key, with the user's preferences at the end of the batch), to produce
    users: list[Message] = field(default_factory=list)
    #: the ``cooc`` records of the updates learned, and the population learner's
    cooc: list[Message] = field(default_factory=list)
    #: per events partition, the records read (every one, learned or not)
    records: dict[int, int] = field(default_factory=dict)
    n_ok: int = 0  # valid events (learned, or of an erased user)
    duplicates: int = 0
    erased_events: int = 0  # events of users erased for good, never learned


@dataclass
class Ranked:
    """What :meth:`UserStage.rank` produced: the ``recs`` documents and segments to write, the pushes to send,
    and the experiment counts changed."""

    docs: list[dict] = field(default_factory=list)
    segments: dict[str, int | None] = field(default_factory=dict)
    pushes: list[PushMessage] = field(default_factory=list)
    #: user -> the push decisions of this batch (:func:`~infogap.stream.store.base.decision_entry`), for the log
    decisions: dict[str, list[dict]] = field(default_factory=dict)
    #: rule -> pushes held back by it in this batch (a decision for every channel counts once)
    held: dict[str, int] = field(default_factory=dict)
    experiments: dict[Segment, Counts] = field(default_factory=dict)
    #: the control group's cohorts changed (:mod:`infogap.models.retention`), absolute counts to write
    retention: dict[Cohort, CohortCounts] = field(default_factory=dict)


@dataclass
class SideOutcome:
    """What applying one side record asks of the shell: a user to erase (and the partition owning them),
    or a dead letter."""

    erase: str | None = None
    partition: int | None = None
    dead: DeadLetter | None = None


def population_records(batch: dict, limit: int = POPULATION_RECORD_BYTES) -> list[bytes]:
    """A batch of :meth:`infogap.models.engine.Engine.drain_population` entries (in ``seq`` order) as JSON records of
    at most ``limit`` bytes, in ``seq`` order. The learner skips entries at or below the last ``seq`` it
    applied from a source, so the entries of one event are never cut apart (a single event's entries
    over the limit stay one record).

    >>> batch = {"seg": [[1, {"a": 1.0}, 1.0, 0.0, None]], "trend": [[1, "i1", 0, 1.0, 5.0], [2, "i2", 0, 1.0, 6.0]]}
    >>> [orjson.loads(r) for r in population_records(batch, limit=80)]  # doctest: +NORMALIZE_WHITESPACE
    [{'seg': [[1, {'a': 1.0}, 1.0, 0.0, None]], 'trend': [[1, 'i1', 0, 1.0, 5.0]]},
     {'seg': [], 'trend': [[2, 'i2', 0, 1.0, 6.0]]}]
    """
    raw = orjson.dumps(batch)
    if len(raw) <= limit:  # every batch: nothing more to do
        return [raw]
    kinds = [k for k in ("seg", "trend", "review") if k in batch]
    seqs = sorted(e[0] for k in kinds for e in batch[k])
    if seqs[0] == seqs[-1]:
        return [raw]
    middle = seqs[len(seqs) // 2]
    cut = middle if middle > seqs[0] else middle + 1  # both halves hold entries
    halves = ({k: [e for e in batch[k] if e[0] < cut] for k in kinds},
              {k: [e for e in batch[k] if e[0] >= cut] for k in kinds})
    return [r for half in halves for r in population_records(half, limit)]


def tombstone_key(key: bytes | None, name: str) -> str:
    """The id a tombstone (null value) of ``items``/``users`` deletes: its key, under the id rules."""
    k = None if key is None else decode_key(key)
    if not k or len(k) > MAX_ID_CHARS or not k.isprintable():
        raise ValueError(f"a tombstone (null value) needs the {name} as its key (UTF-8, at most {MAX_ID_CHARS} "
                         "printable characters)")
    return k


class UserStage:
    """Everything a user stage knows (the engine, its partitions' users, preferences, the catalog, the
    erasure ledger) and the steps of a batch. ``clock`` gives wall-clock epoch seconds: only to reject
    events from the future and to bound a restored watermark; model time comes from the events."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.topics = settings.topics
        self.engine = engine or Engine(settings.engine_config(), cooc="remote", population="remote",
                                       sentiment=sentiment_model())
        self._model_digests: dict[str, bytes] = {}  # of the review models loaded last, by name
        if self.engine.cooc_mode != "remote":
            raise ValueError("the user stage's engine must be built with cooc='remote' (the item stage learns the rows)")
        self.clock = clock
        self.pseudonymize = Pseudonymizer.from_settings(settings)
        ledger_key = settings.state_key or settings.pseudonym_key
        self.erasures = ErasureLedger(ledger_key.get_secret_value().encode() if ledger_key is not None else None)
        self.catalog_ids: set[str] = set()  # items published on the items topic
        self.unavailable: set[str] = set()  # catalog items marked unavailable (never published as neighbours)
        self.ingest = Ingest(Limits(settings.max_event_bytes, settings.min_event_ts, settings.max_future_s,
                                    settings.allow_unknown_types),
                             Deduplicator(settings.dedupe_window_s, settings.dedupe_max_ids), self.pseudonymize,
                             max_lateness_s=settings.max_lateness_s, max_skew_s=settings.max_clock_skew_s,
                             known_item=self.catalog_ids.__contains__ if settings.unknown_items == "dlq" else None)
        self.push_config = PushConfig(min_new_items=settings.push_min_new_items,
                                      daily_cap=dict(settings.push_daily_cap),
                                      repeat_window_s=settings.push_repeat_window_s,
                                      ttl_s=settings.push_ttl_s, items_per_push=settings.push_items,
                                      control_share=settings.control_share)
        #: cohorts are kept while there is a control group to compare with (docs/experiments.md)
        self.track_cohorts = settings.control_share > 0
        #: a window of the cohorts closes once the partition's newest event is this far past its end (no event
        #: older can still arrive: INFOGAP_MAX_LATENESS_S; without a bound, at once)
        self.cohort_lateness_s = settings.max_lateness_s if math.isfinite(settings.max_lateness_s) else 0.0
        self.parts: dict[int, UserPartition] = {}  # per assigned events partition
        self.prefs: dict[str, UserPrefs] = {}
        self.experiment = experiment_from_settings(settings)
        self.exp_name = self.experiment.name if self.experiment else self.push_config.campaign
        #: the partition count of ``events`` (where an erased user's state lives), once known
        self.events_partitions = 0

    # ------------------------------------------------------------------ partitions
    def part(self, partition: int) -> UserPartition:
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = UserPartition.new(partition, self.settings, self.push_config)
        return part

    def partition_state(self, partition: int) -> dict:
        """Everything about one events partition's users, as a plain tree for its snapshot (items and users
        topics are re-read from Kafka)."""
        part = self.part(partition)
        part.watermark = self.ingest.watermarks.get((self.topics.events, partition), float("-inf"))
        return {"part": part.to_state(), "users": export_users(self.engine, part.users)}

    def restore_partition(self, partition: int, state, arrays=(), where: str | None = None) -> None:
        """Take a partition's state from its snapshot (``state``, ``arrays``), checked against the schema first
        (:class:`~infogap.models.state_fields.StateError` when it does not fit; the stage is then unchanged)."""
        where = where or f"partition {partition}"
        tree = state if isinstance(state, dict) else {}
        part = UserPartition.new(partition, self.settings, self.push_config)
        part.restore_state(tree.get("part"), arrays, f"{where}: part")
        users = users_from_state(tree.get("users"), arrays, f"{where}: users")
        try:
            import_users(self.engine, users)
        except Exception as exc:  # checked above; whatever still fails leaves none of these users behind
            for user_id in users["users"]:
                self.engine.forget_user(user_id)
            raise StateError(f"{where}: users: {type(exc).__name__}: {exc}") from None
        for user_id in [u for u in set(users["users"]) | part.users | part.retention.user_ids()
                        if self.erasures.erased(u)]:
            self.engine.forget_user(user_id)  # a snapshot from before the erasure: erasure wins
            part.forget_user(user_id)
        self.parts[partition] = part
        if part.watermark > float("-inf"):  # never ahead of the clock (a snapshot of before the skew bound)
            part.watermark = min(part.watermark, self.clock() + self.settings.max_clock_skew_s)
            self.ingest.watermarks[(self.topics.events, partition)] = part.watermark

    def drop(self, partitions: list[int]) -> None:
        """Partitions leaving this stage: their users leave the engine."""
        for p in partitions:
            part = self.parts.pop(p, None)
            if part is not None:
                for user_id in part.users:
                    self.engine.forget_user(user_id)
            self.ingest.watermarks.pop((self.topics.events, p), None)

    # ------------------------------------------------------------------ erasure
    def forget(self, user_id: str) -> None:
        """Remove the user from memory: model state, push state, preferences."""
        self.engine.forget_user(user_id)
        for part in self.parts.values():
            part.forget_user(user_id)
        self.prefs.pop(user_id, None)

    def erase(self, user_id: str) -> bool:
        """Erase for good: into the ledger, out of memory. Returns whether the user is new to the ledger (then
        the shell deletes their keys and publishes :meth:`erasure_messages`)."""
        new = self.erasures.add(user_id)
        self.forget(user_id)
        return new

    def erasure_messages(self, user_id: str, raw_key: bytes | None) -> list[Message]:
        """The ledger's record of an erasure, and the ``users`` tombstones of a ``forget`` event's key and, with
        pseudonyms, of the pseudonym (the key of the records an ``unsubscribe`` or ``push_bounce`` wrote)."""
        out = [(self.topics.erasures, b"{}", self.erasures.digest(user_id).encode(), None)]
        if raw_key is not None:
            out.append((self.topics.users, None, raw_key, None))
        if self.pseudonymize.enabled and user_id.encode() != raw_key:
            out.append((self.topics.users, None, user_id.encode(), None))
        return out

    # ------------------------------------------------------------------ consent
    def consent_off(self, user_id: str, channel: str) -> bool:
        """Turn ``channel``'s consent off in the user's preferences (an ``unsubscribe`` or ``push_bounce`` event):
        no push decided after this uses it. A user without preferences gets the defaults with that channel
        off. Returns whether anything changed (False if the consent was off already)."""
        prefs = self.prefs.get(user_id)
        if prefs is None:
            prefs = UserPrefs(user_id, {})
        elif prefs.consent.get(channel) is False:
            return False
        self.prefs[user_id] = prefs.without_consent(channel)
        return True

    def users_message(self, user_id: str, raw_key: bytes) -> Message | None:
        """The ``users`` record of the user's preferences as this stage holds them, under ``raw_key`` (the key of
        the event that changed them: the id as produced, before any pseudonym), read back by every worker as
        the same preferences. None if the user has none (erased since: no record after the erasure's tombstone), or if
        the key cannot name a user (the change then stays in memory only)."""
        prefs = self.prefs.get(user_id)
        name = decode_key(raw_key)
        if prefs is None or not name or len(name) > MAX_ID_CHARS or not name.isprintable():
            return None
        return self.topics.users, orjson.dumps(prefs.to_record(name)), raw_key, None

    # ------------------------------------------------------------------ side topics
    def apply_side(self, rec) -> SideOutcome:
        """Apply one ``erasures``, ``items`` or ``users`` record. One that cannot be applied is a dead letter with
        the reason, whatever the error: these topics are re-read whole at every start, so a record that raised
        would stop every worker at every restart."""
        if rec.topic == self.topics.erasures:
            if self.erasures.apply_record(rec.key):
                return SideOutcome()
            return SideOutcome(dead=DeadLetter(rec.value, rec.key, "bad erasures record: the key is not an "
                                               "erasure digest", rec.topic, rec.partition, rec.offset,
                                               code="bad_erasures_record"))
        items = rec.topic == self.topics.items
        try:
            erase = self._apply_item(rec) if items else self._apply_user(rec)
        except Exception as exc:  # a ValueError says what is wrong; any other type is a bug, never fatal here
            if isinstance(exc, ValueError):
                reason = str(exc)
            else:
                reason = f"cannot be applied ({type(exc).__name__})"
                log.error("%s record at partition %d offset %d cannot be applied", rec.topic, rec.partition,
                          rec.offset, exc_info=not isinstance(exc, RecursionError))
            kind = "items" if items else "users"
            return SideOutcome(dead=DeadLetter(rec.value, rec.key, f"bad {kind} record: {reason}", rec.topic,
                                               rec.partition, rec.offset, code=f"bad_{kind}_record"))
        if erase is None:
            return SideOutcome()
        partition = (kafka_partition(rec.key.decode("utf-8", "replace"), self.events_partitions)
                     if self.events_partitions else None)
        return SideOutcome(erase=erase, partition=partition)

    def _apply_item(self, rec) -> None:
        """An ``items`` record checked (:func:`infogap.models.catalog.parse_item`) and applied; a tombstone deletes."""
        if rec.value is None:
            item_id = tombstone_key(rec.key, "item_id")
            self.engine.remove_item(item_id)
            self.catalog_ids.discard(item_id)
            self.unavailable.add(item_id)
            return None
        item = parse_item(rec.value, rec.key)
        self.engine.upsert_item(item)
        item_id = item["item_id"]
        self.catalog_ids.add(item_id)
        if item["available"]:
            self.unavailable.discard(item_id)
        else:
            self.unavailable.add(item_id)
        return None

    def _apply_user(self, rec) -> str | None:
        """A ``users`` record checked (key = user_id, compared raw) and applied; for a tombstone, the
        (pseudonymous) id to erase."""
        if rec.value is None:
            return self.pseudonymize(tombstone_key(rec.key, "user_id"))
        prefs = UserPrefs.parse(rec.value, rec.key)
        prefs = replace(prefs, user_id=self.pseudonymize(prefs.user_id))
        if not self.erasures.erased(prefs.user_id):  # an erased id stays erased: a person who returns gets a new one
            self.prefs[prefs.user_id] = prefs
        return None

    # ------------------------------------------------------------------ the batch
    def learn(self, by_partition: Mapping[int, list], now: float, cooc_partitions: int) -> Learned:
        """Ingest and learn the records of each events partition (in offset order); ``now``: wall-clock
        seconds (for events from the future). ``forget`` events erase at once: a later event of the batch is
        not learned. ``unsubscribe`` and ``push_bounce`` events are not learned either: they turn their channel's
        consent off at once (:meth:`consent_off`; :meth:`rank` then sends nothing on it), and
        :attr:`Learned.users` holds the ``users`` records saying so."""
        out = Learned()
        consent_keys: dict[bytes, str] = {}  # record key -> user, of the consents turned off
        for partition, recs in by_partition.items():
            part = self.part(partition)
            cohorts = part.retention if self.track_cohorts else None
            self.ingest.dedupe = part.dedupe  # event ids are deduplicated per partition (a user's events share one)
            result = self.ingest.accept(recs, now)
            out.records[partition] = len(recs)
            out.duplicates += result.duplicates
            out.dead += result.dead
            learned: list[int] = []  # offsets of the events learned, in order
            base = self.engine.n_learned
            chunk: list[Event] = []
            for e, offset in zip(result.events, result.offsets):
                if e.type == "forget":
                    self._learn(chunk)
                    chunk = []
                    if self.erase(e.user_id):
                        out.erased.append((e.user_id, partition, next(r.key for r in recs if r.offset == offset)))
                    out.touched.pop(e.user_id, None)
                    continue
                if e.type in CONSENT_OFF_TYPES:  # no behaviour: never learned, ranked or counted
                    if self.erasures and self.erasures.erased(e.user_id):
                        out.erased_events += 1
                    elif self.consent_off(e.user_id, e.context["channel"]):
                        key = next(r.key for r in recs if r.offset == offset)
                        if key is not None:
                            consent_keys[key] = e.user_id
                    continue
                if self.erasures and not self.engine.known_user(e.user_id) and self.erasures.erased(e.user_id):
                    out.erased_events += 1  # erased for good: never learned again
                    continue
                chunk.append(e)
                learned.append(offset)
                part.touch(e.user_id)
                if e.type in FEEDBACK_TYPES:
                    part.experiments.observe(e)
                if cohorts is not None:
                    cohorts.observe(e)
                if e.ts > out.touched.get(e.user_id, (float("-inf"),))[0]:
                    out.touched[e.user_id] = (e.ts, partition)
            self._learn(chunk)
            out.n_ok += len(result.events)
            out.cooc += self.cooc_messages(partition, base, learned, cooc_partitions)
        out.users = [m for key, user_id in consent_keys.items() if (m := self.users_message(user_id, key)) is not None]
        return out

    def _learn(self, events: list[Event]) -> None:
        if events:
            self.engine.learn_many(events)

    def cooc_messages(self, partition: int, base: int, offsets: list[int], cooc_partitions: int) -> list[Message]:
        """The engine's co-occurrence updates of one events partition, one ``cooc`` record per owner, and its
        population entries in one record for the learner; sequence numbers are the events' offsets."""
        headers = [("source", str(partition).encode())]
        out = []
        seq_of = np.asarray(offsets, np.int64)
        deltas = self.engine.drain_pair_deltas()
        if deltas is not None:
            n = cooc_partitions
            deltas = deltas.with_seq(seq_of, base)
            # every owner gets a record: the item occurrences in it are everyone's (popularity, lift)
            out += [(self.topics.cooc, piece.to_bytes(), None, headers, p)
                    for p, part in enumerate(deltas.split(lambda i: owner(i, n), n))
                    for piece in part.pieces(COOC_RECORD_UPDATES)]
        population = self.engine.drain_population()
        if population is not None:  # segment samples, trend entries, reviews: to the learner, on partition 0
            for entries in population.values():  # (segment samples, trend entries, reviews)
                for entry in entries:
                    entry[0] = int(seq_of[entry[0] - base])
            out += [(self.topics.cooc, raw, None, headers + [("kind", POPULATION_KIND)], POPULATION_PARTITION)
                    for raw in population_records(population)]
        return out

    def wanted_items(self, users) -> Iterator[str]:
        """The items whose neighbour rows ranking ``users`` reads (to make current before :meth:`rank`)."""
        return (i for u in users for i in self.engine.query_items(u))

    def rank(self, learned: Learned, now: float) -> Ranked:
        """Rank every user the batch touched, decide their pushes (at the user's event time), count the sends,
        drain the experiment counts changed, and evict idle users (memory, not the store)."""
        out = Ranked()
        push, log = self.settings.push_enabled, self.settings.decision_log_max > 0
        track = self.track_cohorts
        for user_id, (user_ts, partition) in learned.touched.items():
            variant, recs, doc = self.ranked(user_id, now)
            out.segments[user_id] = doc["segment"]
            out.docs.append(doc)
            if push:
                prefs = self.prefs.get(user_id)
                if prefs is not None:
                    part = self.parts[partition]
                    decided = part.push.decisions(prefs, recs, now=user_ts, variant=variant, title=self.engine.title)
                    sent = [d.message for d in decided if d.message is not None]
                    part.experiments.record_sends(sent)
                    if track:  # the first push (treated) or ghost push (control) enters the user's cohort
                        for d in decided:
                            if d.message is not None:
                                part.retention.record_push(d.message, control=False)
                            elif d.ghost is not None:
                                part.retention.record_push(d.ghost, control=True)
                    out.pushes += sent
                    for d in decided:
                        if d.rule is not None:
                            out.held[d.rule] = out.held.get(d.rule, 0) + 1
                    new = [d for d in decided if not d.repeat] if log else ()  # a rule holding again: logged once
                    if new:
                        out.decisions[user_id] = [
                            decision_entry(d.channel, d.rule, d.at, *((d.message.message_id,
                                           [x["item_id"] for x in d.message.items]) if d.message else ()))
                            for d in new]
        for p, n in learned.records.items():  # idle users and the least recent past the cap leave memory
            if p in self.parts:
                self.parts[p].evict(self.engine, self.ingest.watermarks.get((self.topics.events, p)), n, self.settings)
        out.experiments = {seg: c for part in self.parts.values() for seg, c in part.experiments.drain_changed().items()}
        if track:
            for p in learned.records:
                part = self.parts.get(p)
                newest = self.ingest.watermarks.get((self.topics.events, p))
                if part is not None and newest is not None:
                    part.retention.advance(newest - self.cohort_lateness_s)
        out.retention = self.drain_retention()
        return out

    def drain_retention(self) -> dict[Cohort, CohortCounts]:
        """The cohorts changed since the last drain, in every partition (what to write: after a batch, and after
        an erasure outside one)."""
        return {k: c for part in self.parts.values() for k, c in part.retention.drain_changed().items()}

    def retention_counts(self, partitions) -> dict[Cohort, CohortCounts]:
        """Every cohort's counts of ``partitions`` (to write again whole)."""
        return {k: c for p in partitions if p in self.parts for k, c in self.parts[p].retention.counts().items()}

    def ranked(self, user_id: str, now: float) -> tuple[str | None, list, dict]:
        """A user's experiment variant, recommendations (with its variant's ranker settings) and the
        ``recs`` document written for them (``generated_at``: ``now``)."""
        variant = self.experiment.assign(user_id) if self.experiment else None
        recs = self.engine.recommend(user_id, n=self.settings.top_n,
                                     overrides=self.experiment.overrides.get(variant) if variant else None)
        doc = {"user_id": user_id,
               "items": [{"item_id": item, "score": round(score, 6), "reason": reason} for item, score, reason in recs],
               "segment": self.engine.segment(user_id), "generated_at": now,
               "model_version": self.settings.model_version}
        return variant, recs, doc

    def push_messages(self, pushes: list[PushMessage]) -> list[Message]:
        return [(self.topics.push, orjson.dumps(m.to_dict()), m.user_id.encode(), None) for m in pushes]

    # ------------------------------------------------------------------ the population and the store's loss
    def load_population(self, got: dict) -> dict[str, int | None]:
        """Take the population model read from the store (:meth:`~infogap.stream.store.Store.read_population`); returns
        the segments of the users it assigned one for the first time (to write)."""
        assigned = self.engine.load_population(got["model"], got["trending"], got["at"], got["momentum"])
        for user_id in assigned:
            for part in self.parts.values():
                if user_id in part.users:
                    part.touch(user_id)
        return {u: self.engine.segment(u) for u in assigned}

    def load_review_model(self, name: str, raw: bytes) -> bool:
        """Read reviews with the population learner's ``sentiment`` or ``topics`` model as read from the store (JSON
        bytes; the same bytes as last time change nothing). False when they are not such a model (the one in use
        stays)."""
        if len(raw) > MAX_REVIEW_MODEL_BYTES:
            return False
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest == self._model_digests.get(name):
            return True
        load = {"sentiment": self.engine.load_sentiment, "topics": self.engine.load_topics}[name]
        try:
            load(orjson.loads(raw))
        except ValueError:  # (orjson's errors too): the models check every field and setting they read
            return False
        except Exception:  # a check that missed something: the bytes came from outside, the worker goes on
            log.exception("the %s model in the store could not be loaded", name)
            return False
        self._model_digests[name] = digest
        return True

    def users_to_rematerialise(self, partitions) -> list[tuple[int, str]]:
        """The users of ``partitions`` whose keys are to be written again after the store lost its data: all but
        those whose keys had expired anyway (no event for ``recs_ttl_s`` before their partition's newest event)."""
        out = []
        for p in partitions:
            part = self.parts.get(p)
            if part is None:
                continue
            users = list(part.users)
            newest = self.ingest.watermarks.get((self.topics.events, p))
            expired = (set(self.engine.stale_users(users, newest, self.settings.recs_ttl_s))
                       if newest is not None and users else ())
            out += [(p, u) for u in users if u not in expired]
        return out

    def still_held(self, partition: int, user_id: str) -> bool:
        """Whether a user is still this stage's to write (not erased, evicted or moved since)."""
        part = self.parts.get(partition)
        return (part is not None and user_id in part.users and self.engine.known_user(user_id)
                and not (self.erasures and self.erasures.erased(user_id)))

    def experiment_counts(self, partitions) -> dict[Segment, Counts]:
        """Every experiment segment's counts of ``partitions`` (to write again whole)."""
        return {seg: c for p in partitions if p in self.parts for seg, c in self.parts[p].experiments.counts().items()}
