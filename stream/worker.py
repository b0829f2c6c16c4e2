"""The stream worker: ``events`` in micro-batches, recommendations to Redis and pushes out.

One asyncio process. The high-volume ``events`` topic is read with an aiokafka consumer
group in batches (``getmany``), offsets committed by hand only after the batch's Redis
writes, dead letters and pushes are acknowledged (at-least-once; duplicates are counted
once by ``event_id``). The compacted ``items`` and ``users`` topics are read whole by every
worker (a global table) and caught up to their end before each batch, so a catalog or
consent change produced before an event is applied before that event.

This is the **user stage** (state partitioned by ``user_id``, as ``events`` is). Per batch and
events partition: ingest (validate, dedupe, DLQ) → ``Engine.learn_many`` (an engine with
``cooc="remote"``: it learns profiles, segments and trending, and emits its co-occurrence updates)
→ the updates go to the ``cooc`` topic, split by the partition owning each item's row. Then the
neighbour rows of the touched users' recent items are made current from Redis
(:class:`~stream.neighbour_cache.NeighbourCache`), each touched user is ranked, the push policy
runs, and one Redis pipeline plus the ``push``/``cooc``/DLQ produces complete the batch.

The **item stage** (:class:`~stream.item_stage.ItemStage`) runs in the same process as a second
consumer group on ``cooc``; more processes split both stages' partitions.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError, KafkaTimeoutError

from models import Engine
from models.cooc_shard import owner
from models.dedupe import Deduplicator
from models.events import Event, Limits
from models.experiments import FEEDBACK_TYPES
from models.push_policy import PushConfig, UserPrefs
from models.user_state import export_users, import_users
from models import warm_up
from stream import connections
from stream.experiments_store import ExperimentStore, experiment_from_settings
from stream.ingest import DeadLetter, Ingest
from stream.item_stage import POPULATION_KIND, POPULATION_PARTITION, ItemStage
from stream.neighbour_cache import NeighbourCache
from stream.observability import WorkerStats, build_app, serve
from stream.pseudonym import Pseudonymizer
from stream.redis_keys import RedisKeys
from stream.redis_store import RedisStore
from stream.settings import Settings
from stream.snapshots import Snapshot, SnapshotStore, SnapshotTurns, snapshot_bytes
from stream.user_partition import UserPartition

log = logging.getLogger("infogap.worker")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        await self.worker.on_assigned(assigned)


#: Slot updates per ``cooc`` record (about 56 bytes each): records stay well under Kafka's 1 MiB default.
_COOC_RECORD_UPDATES = 8_000
#: A population record larger than this is cut in two (by event), and so on.
POPULATION_RECORD_BYTES = 512 * 1024


def population_records(batch: dict, limit: int = POPULATION_RECORD_BYTES) -> list[bytes]:
    """A batch of :meth:`models.engine.Engine.drain_population` entries (in ``seq`` order) as JSON records of
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
    seqs = sorted(e[0] for part in (batch["seg"], batch["trend"]) for e in part)
    if seqs[0] == seqs[-1]:
        return [raw]
    middle = seqs[len(seqs) // 2]
    cut = middle if middle > seqs[0] else middle + 1  # both halves hold entries
    halves = ({k: [e for e in batch[k] if e[0] < cut] for k in ("seg", "trend")},
              {k: [e for e in batch[k] if e[0] >= cut] for k in ("seg", "trend")})
    return [r for half in halves for r in population_records(half, limit)]


def _retriable(exc: BaseException) -> bool:
    """Whether a Kafka error can go away by waiting (a broker outage), rather than being a bug or a limit."""
    if isinstance(exc, (KafkaConnectionError, KafkaTimeoutError, CommitFailedError, OSError)):
        return True
    return isinstance(exc, KafkaError) and getattr(exc, "retriable", True)


class Worker:
    """Consumes ``events`` (plus ``items`` and ``users``) and serves the results.

    ``clock`` gives wall-clock epoch seconds: used to reject events from the future and to
    stamp ``generated_at``. Model time always comes from the events.
    """

    def __init__(self, settings: Settings, *, engine: Engine | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.topics = settings.topics
        self.engine = engine or Engine(settings.engine_config(), cooc="remote", population="remote")
        if self.engine.cooc_mode != "remote":
            raise ValueError("the worker's engine must be built with cooc='remote' (the item stage learns the rows)")
        self.pseudonymize = Pseudonymizer.from_settings(settings)
        self.catalog_ids: set[str] = set()  # items published on the items topic
        self.unavailable: set[str] = set()  # catalog items marked unavailable (never published as neighbours)
        self.ingest = Ingest(Limits(settings.max_event_bytes, settings.min_event_ts, settings.max_future_s,
                                    settings.allow_unknown_types),
                             Deduplicator(settings.dedupe_window_s, settings.dedupe_max_ids), self.pseudonymize,
                             max_lateness_s=settings.max_lateness_s,
                             known_item=self.catalog_ids.__contains__ if settings.unknown_items == "dlq" else None)
        self.push_config = PushConfig(min_new_items=settings.push_min_new_items,
                                      daily_cap=dict(settings.push_daily_cap),
                                      repeat_window_s=settings.push_repeat_window_s,
                                      ttl_s=settings.push_ttl_s, items_per_push=settings.push_items)
        self.parts: dict[int, UserPartition] = {}  # per assigned events partition
        self.prefs: dict[str, UserPrefs] = {}
        self.experiment = experiment_from_settings(settings)
        self.exp_name = self.experiment.name if self.experiment else self.push_config.campaign
        self.clock = clock
        self.stats = WorkerStats()
        self._population_loaded_at = float("-inf")
        self.ready = asyncio.Event()
        stages = {x.strip() for x in settings.stages.split(",") if x.strip()}
        if not stages or stages - {"users", "items"}:
            raise ValueError(f"stages must name users, items or both, got {settings.stages!r}")
        #: this process consumes events (the user stage) / cooc (the item stage); one deployment needs both
        self.run_users, self.run_items = "users" in stages, "items" in stages
        self._consumer: AIOKafkaConsumer | None = None
        self._side: AIOKafkaConsumer | None = None
        self._side_ends: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: aioredis.Redis | None = None
        self._store: RedisStore | None = None
        self._side_parts: list[TopicPartition] = []
        self.items: ItemStage | None = None
        #: held by a batch from ingest to its last produce, and by checkpoints: a rebalance waits for the
        #: batch in flight, so a partition's co-occurrence updates are all sent before its new owner sends any
        self._batch_lock = asyncio.Lock()
        #: held while snapshots are written and their offsets committed (after the batch lock is let go):
        #: keeps those writes in order, so a rebalance's last snapshot lands after the one in flight
        self._snapshot_lock = asyncio.Lock()
        self._writing: asyncio.Task | None = None  # a checkpoint's write in the background
        #: next offset to process per events partition: what a snapshot covers, and where a batch must start
        self._done: dict[int, int] = {}
        self._turns = SnapshotTurns(settings.snapshot_interval_s)
        #: events partitions this worker owns: from their assignment until their revocation (in between
        #: two rebalance callbacks it owns none, whatever the consumer still reports)
        self._owned: set[int] = set()
        self._cache: NeighbourCache | None = None

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever); always closes its connections."""
        stop = stop or asyncio.Event()
        s = self.settings
        warm_up()  # the compiled kernels, before the first batch waits for them
        await self._check_credentials()
        self._redis = connections.redis_async(s, socket_timeout=5, socket_connect_timeout=2)
        self._store = RedisStore(self._redis, RedisKeys(s.redis_prefix), s.recs_ttl_s)
        self._exp_store = ExperimentStore(self._redis, RedisKeys(s.redis_prefix))
        # batches of up to produce_batch_bytes, not aiokafka's 16 KiB: the client has one produce request in
        # flight per broker, holding one batch per partition, and a send to a partition whose batch is full
        # waits until that batch is sent; a 20,000-event batch's ~17 MB of cooc records (~450 kB each) took
        # ~15 round trips, ~110 ms of the batch (README "Architecture")
        self._producer = connections.producer(s, linger_ms=5, acks="all", max_batch_size=s.produce_batch_bytes)
        if self.run_users:
            self._consumer = connections.consumer(
                s, group_id=s.consumer_group,
                enable_auto_commit=False, auto_offset_reset="earliest",
                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
        # items and users, read whole; _side_ends only asks their end offsets before each batch, on a
        # connection of its own: the broker answers a connection's requests in order, and on the fetching
        # one each answer waited behind a long poll (20 ms a batch with fetch_max_wait_ms=20, 0.2-0.5 s
        # with the default), the largest fixed cost of a small batch
        self._side = connections.consumer(s, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest", fetch_max_wait_ms=20)
        self._side_ends = connections.consumer(s, group_id=None, enable_auto_commit=False)
        self._snapshots = (SnapshotStore(s, self.topics.state_users)
                           if s.snapshot_interval_s > 0 and self.run_users else None)
        self._cache = NeighbourCache(self._redis, RedisKeys(s.redis_prefix), s.neighbour_cache_items,
                                     s.neighbour_max_age_s, read_max_share=s.neighbour_read_max_share)
        if self.run_users:  # the rows' arrays sized now, not doubled in the middle of batches: the cache's
            # bound, and half again for the rows a batch reads before the cache evicts the oldest
            self.engine.reserve_rows(s.neighbour_cache_items * 3 // 2)
        if self.run_items:
            self.items = ItemStage(s, self.engine.config, self._store,
                                   eligible=lambda i: i not in self.unavailable, retrying=self._kafka_retrying,
                                   redis_retrying=self._redis_retrying, send_dead=self._send_counted_dead,
                                   stats=self.stats)
        item_stop = asyncio.Event()
        item_task = None
        http = None
        try:
            if s.http_port is not None:
                http = await serve(build_app(self.stats, {"kafka": self._kafka_ok, "redis": self._redis_ok}),
                                   s.http_host, s.http_port)
            if self.run_users:
                self._consumer.subscribe([self.topics.events], listener=_Rebalance(self))
            await self._kafka_retrying("start the Kafka clients", self._start_kafka)
            await self._kafka_retrying("read items and users", self._sync_side)
            if self.items is not None:
                item_task = asyncio.create_task(self.items.run(item_stop), name="item-stage")
            # what is alive now (modules, numba's compiled kernels, the catalog) lives as long as the process:
            # out of the collector's full passes, which walked it all (~0.1 s) every few seconds
            gc.freeze()
            self.ready.set()
            log.info("worker ready: stages=%s group=%s topic=%s", s.stages, s.consumer_group, self.topics.events)
            while not stop.is_set():
                if item_task is not None and item_task.done():
                    item_task.result()  # the item stage failed: raise its error here
                if not self.run_users:  # an item stage alone: keep the catalog current for its lists
                    await self._kafka_retrying("read items and users", self._sync_side)
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=s.batch_timeout_ms / 1000)
                    except asyncio.TimeoutError:
                        pass
                    continue
                batch = await self._consumer.getmany(timeout_ms=s.batch_timeout_ms,
                                                     max_records=s.batch_max_records)
                records = [r for recs in batch.values() for r in recs]
                await self._kafka_retrying("read items and users", self._sync_side)
                async with self._batch_lock:  # also when idle: the first centers give waiting users a segment
                    await self._load_population()
                if records:
                    async with self._batch_lock:
                        await self.process(records)
                    self.stats.lag = await self._lag()
                    if self._snapshots is None:
                        await self._kafka_retrying("commit offsets", self._consumer.commit)
                if self._writing is not None and self._writing.done():
                    self._writing, done = None, self._writing
                    done.result()  # a failed snapshot write: raise its error here
                if self._snapshots is not None and self._writing is None:
                    due = self._turns.due(time.monotonic())
                    if due is not None:
                        await self.checkpoint([due], wait=False)
            if self.run_users and self._snapshots is not None and self._consumer.assignment():
                await self.checkpoint()
            if self._writing is not None:
                await self._writing
            item_stop.set()
            if item_task is not None:
                await item_task
        finally:
            if item_task is not None and not item_task.done():
                item_task.cancel()
            closers = [self._side.stop, self._side_ends.stop, self._producer.stop, self._redis.aclose]
            if self._consumer is not None:
                closers.append(self._consumer.stop)
            if self.items is not None:
                closers.append(self.items.stop)
            if self._snapshots is not None:
                closers.append(self._snapshots.stop)
            if http is not None:
                closers.append(http.cleanup)
            for closer in closers:
                try:
                    await closer()
                except Exception:  # closing is best effort: the process is ending anyway
                    log.exception("error while closing")

    async def _start_kafka(self) -> None:
        await self._producer.start()
        if self._snapshots is not None:
            await self._snapshots.start()
        await self._side.start()
        await self._side_ends.start()
        await self._assign_side()
        self._cooc_partitions = len(await self._producer.partitions_for(self.topics.cooc))
        self._cache.partitions = self._cooc_partitions
        if self.run_users:
            await self._consumer.start()
        if self.items is not None:
            await self.items.start()

    # ------------------------------------------------------------------ checkpoints
    def _part(self, partition: int) -> UserPartition:
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = UserPartition.new(partition, self.settings, self.push_config)
        return part

    def partition_state(self, partition: int) -> dict:
        """Everything about one events partition's users (items and users topics are re-read from Kafka)."""
        part = self._part(partition)
        part.watermark = self.ingest.watermarks.get((self.topics.events, partition), float("-inf"))
        return {"part": part, "users": export_users(self.engine, part.users)}

    def restore_partition(self, partition: int, state: dict) -> None:
        part: UserPartition = state["part"]
        import_users(self.engine, state["users"])
        self.parts[partition] = part
        if part.watermark > float("-inf"):
            self.ingest.watermarks[(self.topics.events, partition)] = part.watermark

    async def checkpoint(self, partitions: list[int] | None = None, *, wait: bool = True) -> None:
        """Snapshot each partition's state with the offset it covers, then commit exactly those offsets.

        Only taking the state (pickling it) holds the batch lock; compressing, writing to Kafka and
        committing follow after it is let go, in the background when ``wait`` is False, so batches go on
        meanwhile.
        """
        async with self._batch_lock:
            taken = self._take_snapshots(partitions)
            if taken is None:
                return
            await self._snapshot_lock.acquire()  # after the write in flight, if any
        write = self._write_snapshots(*taken)
        if wait:
            await write
        else:
            self._writing = asyncio.create_task(write, name="checkpoint")

    def _take_snapshots(self, partitions: list[int] | None) -> tuple | None:
        """(offsets, pickled snapshots, start time) of the assigned ``partitions`` (all when None)."""
        assigned = {tp.partition: tp for tp in self._consumer.assignment()}
        wanted = sorted(assigned if partitions is None else set(partitions) & set(assigned))
        offsets = {assigned[p]: self._done[p] for p in wanted if p in self._done}
        if not offsets:
            return None
        t0 = time.perf_counter()
        raws = [(tp.partition, snapshot_bytes(Snapshot(tp.partition, off, self.partition_state(tp.partition))))
                for tp, off in offsets.items()]
        self.stats.checkpoint_locked_seconds = time.perf_counter() - t0
        return offsets, raws, t0

    async def _write_snapshots(self, offsets: dict, raws: list[tuple[int, bytes]], t0: float) -> None:
        """Write taken snapshots, then commit their offsets; releases ``_snapshot_lock`` (held by the taker).

        A failed commit is only logged: a restore seeks to its snapshot's offset, not the committed one,
        and the next checkpoint commits again (retrying a commit that a rebalance refused would wait on
        the rebalance, which waits on this lock).
        """
        try:
            size = await self._kafka_retrying("write state snapshots", self._snapshots.save_many, raws)
            try:
                await self._consumer.commit(offsets)
            except (KafkaError, OSError) as exc:
                log.warning("could not commit offsets after a checkpoint (%s); the snapshots hold them",
                            type(exc).__name__)
            self.stats.checkpoint_seconds = time.perf_counter() - t0
            log.info("checkpoint: %d bytes, offsets %s (%.2f s, %.3f s of it holding batches)", size,
                     {tp.partition: o for tp, o in offsets.items()}, self.stats.checkpoint_seconds,
                     self.stats.checkpoint_locked_seconds)
        finally:
            self._snapshot_lock.release()

    async def on_revoked(self, revoked) -> None:
        """Partitions leaving: a last snapshot of each (if running), then their users leave this engine."""
        gone = [tp.partition for tp in revoked if tp.topic == self.topics.events]
        async with self._batch_lock:
            taken = self._take_snapshots(gone) if self._snapshots is not None and self.ready.is_set() else None
            if taken is not None:
                await self._snapshot_lock.acquire()
                await self._write_snapshots(*taken)
            self._drop(gone)
            self._turns.revoke(gone)
            self._owned.difference_update(gone)
            self.stats.partitions = len(self._owned)

    def _drop(self, gone: list[int]) -> None:
        for p in gone:
            part = self.parts.pop(p, None)
            if part is not None:
                for user_id in part.users:
                    self.engine.forget_user(user_id)
            self.ingest.watermarks.pop((self.topics.events, p), None)
            self._done.pop(p, None)

    async def on_assigned(self, assigned) -> None:
        """Restore the snapshots of newly assigned partitions and resume each from its offset.

        Under the batch lock: a batch fetched meanwhile (from the committed offset) must wait until the
        partition's state and offset are restored, or its new users' events would be learned before the
        restore and again when the partition resumes from the snapshot's offset.
        """
        async with self._batch_lock:
            new = [tp for tp in assigned if tp.partition not in self.parts]
            self._owned.update(tp.partition for tp in assigned)
            self._turns.assign([tp.partition for tp in assigned], time.monotonic())
            self.stats.partitions = len(self._owned)
            if self._snapshots is None or not new:
                return
            found = await self._snapshots.load([tp.partition for tp in new])
            for tp in new:
                snap = found.get(tp.partition)
                if snap is None:
                    continue
                self.restore_partition(tp.partition, snap.state)
                self._consumer.seek(tp, snap.offset)
                self._done[tp.partition] = snap.offset
            if found:
                self._cache.stale()
            log.info("took events partitions %s (%d from snapshots)", sorted(tp.partition for tp in new),
                     len(found))

    async def _kafka_retrying(self, what: str, fn, *args):
        """Retry a Kafka operation through a broker outage: the worker waits, it does not die."""
        delay = 0.2
        while True:
            try:
                return await fn(*args)
            except (KafkaError, OSError) as exc:
                if not _retriable(exc):
                    raise
                self.stats.kafka_retries += 1
                log.warning("Kafka unavailable while trying to %s (%s); retrying in %.1f s", what,
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _check_credentials(self) -> None:
        """Fail fast, with the server's reason, on refused credentials; an unreachable server is only logged
        (the worker then waits for it like for any outage)."""
        for name, check in (("Kafka", connections.check_kafka), ("Redis", connections.check_redis)):
            try:
                await check(self.settings)
            except connections.CredentialsRefused:
                raise
            except ConnectionError as exc:
                log.warning("%s is not reachable yet (%s); waiting for it", name, exc)

    async def _kafka_ok(self) -> bool:
        return bool(await self._producer.client.force_metadata_update())

    async def _redis_ok(self) -> bool:
        return bool(await self._redis.ping())

    async def _lag(self) -> int:
        lag = 0
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                lag += max(0, hw - await self._consumer.position(tp))
        return lag

    # ------------------------------------------------------------------ side topics
    async def _assign_side(self) -> None:
        parts = []
        for topic in (self.topics.items, self.topics.users):
            partitions = await connections.wait_partitions(self._side, topic)
            parts += [TopicPartition(topic, p) for p in sorted(partitions)]
        self._side.assign(parts)
        await self._side.seek_to_beginning(*parts)
        self._side_parts = parts

    async def _sync_side(self) -> None:
        """Apply ``items`` and ``users`` records up to their current end offsets."""
        side = self._side
        ends = await self._side_ends.end_offsets(self._side_parts)
        while True:
            behind = [tp for tp in self._side_parts if await side.position(tp) < ends[tp]]
            if not behind:
                return
            batch = await side.getmany(*behind, timeout_ms=200, max_records=10_000)
            for tp, recs in batch.items():
                for rec in recs:
                    await self._apply_side(rec)

    async def _apply_side(self, rec) -> None:
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
        try:
            if rec.topic == self.topics.items:
                if rec.value is None:
                    if key:
                        self.engine.remove_item(key)
                        self.catalog_ids.discard(key)
                        self.unavailable.add(key)
                    return
                doc = orjson.loads(rec.value)
                if not isinstance(doc, dict) or not doc.get("item_id"):
                    raise ValueError("items record must be a JSON object with 'item_id'")
                self.engine.upsert_item(doc)
                self.catalog_ids.add(str(doc["item_id"]))
                if doc.get("available", True) is False:
                    self.unavailable.add(str(doc["item_id"]))
                else:
                    self.unavailable.discard(str(doc["item_id"]))
            else:
                if rec.value is None:
                    if key:
                        await self.erase_user(self.pseudonymize(key))
                    return
                prefs = UserPrefs.from_record(orjson.loads(rec.value))
                prefs = replace(prefs, user_id=self.pseudonymize(prefs.user_id))
                self.prefs[prefs.user_id] = prefs
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            reason = f"bad {rec.topic} record: {exc}"
            await self._send_counted_dead([DeadLetter(rec.value, rec.key, reason, rec.topic, rec.partition,
                                                      rec.offset)])

    # ------------------------------------------------------------------ the batch
    async def process(self, records) -> None:
        """Process one micro-batch of ``events`` records end to end (all but the commit)."""
        t0 = time.perf_counter()
        now = self.clock()
        st = self.stats
        by_partition = self._in_sequence(records)
        records = [r for recs in by_partition.values() for r in recs]
        if not records:
            return
        touched: dict[str, tuple[float, int]] = {}  # user -> (newest event time in this batch, partition)
        erased: list[str] = []
        dead: list[DeadLetter] = []
        cooc_messages: list[tuple] = []
        n_ok = 0
        for partition, recs in by_partition.items():
            part = self._part(partition)
            self.ingest.dedupe = part.dedupe  # event ids are deduplicated per partition (a user's events share one)
            result = self.ingest.accept(recs, now)
            self._done[partition] = max(self._done.get(partition, 0), recs[-1].offset + 1)
            st.duplicates += result.duplicates
            for d in result.dead:
                st.count_dead(d.reason)
            dead += result.dead
            learned: list[int] = []  # offsets of the events learned, in order
            base = self.engine.n_learned
            chunk: list[Event] = []
            for e, offset in zip(result.events, result.offsets):
                if e.type == "forget":
                    self._learn(chunk)
                    chunk = []
                    self._forget_in_memory(e.user_id)
                    touched.pop(e.user_id, None)
                    erased.append(e.user_id)
                    continue
                chunk.append(e)
                learned.append(offset)
                part.touch(e.user_id)
                if e.type in FEEDBACK_TYPES:
                    part.experiments.observe(e)
                if e.ts > touched.get(e.user_id, (float("-inf"),))[0]:
                    touched[e.user_id] = (e.ts, partition)
            self._learn(chunk)
            n_ok += len(result.events)
            cooc_messages += self._cooc_messages(partition, base, learned)
        # acked while the batch is ranked; awaited before it is done (its offsets are committed after)
        cooc_sent = await self._enqueue(cooc_messages)
        await self._redis_retrying(self._cache.ensure, self.engine,
                                   (i for u in touched for i in self.engine.query_items(u)), time.monotonic())
        st.neighbour_max_age_s = self._cache.age_s

        docs, segments, pushes = [], {}, []
        top_n, version = self.settings.top_n, self.settings.model_version
        for user_id, (user_ts, partition) in touched.items():
            variant = self.experiment.assign(user_id) if self.experiment else None
            recs = self.engine.recommend(user_id, n=top_n,
                                         overrides=self.settings.experiment_overrides.get(variant) if variant else None)
            seg = self.engine.segment(user_id)
            segments[user_id] = seg
            docs.append({"user_id": user_id,
                         "items": [{"item_id": item, "score": round(score, 6), "reason": reason}
                                   for item, score, reason in recs],
                         "segment": seg, "generated_at": now, "model_version": version})
            if self.settings.push_enabled:
                prefs = self.prefs.get(user_id)
                if prefs is not None:
                    sent = self.parts[partition].push.decide(prefs, recs, now=user_ts, variant=variant,
                                                             title=self.engine.title)
                    self.parts[partition].experiments.record_sends(sent)
                    pushes += sent

        await self._redis_retrying(self._store.write, recs=docs, segments=segments)
        done = self.clock()  # the recommendations are readable in Redis
        await self._confirm(cooc_messages, cooc_sent)
        changed = {seg: c for part in self.parts.values() for seg, c in part.experiments.drain_changed().items()}
        if changed:
            await self._redis_retrying(self._exp_store.write, self.exp_name, changed)
        for user_id in erased:
            await self._redis_retrying(self._store.erase_user, user_id)
        await self._send_all([(self.topics.push, orjson.dumps(m.to_dict()), m.user_id.encode(), None)
                              for m in pushes] + self._dead_messages(dead))
        created = np.fromiter((r.timestamp for r in records if r.timestamp is not None), float)
        st.freshness_seconds.add_many(done - created / 1000.0)
        for m in pushes:
            st.pushes_by_channel[m.channel] = st.pushes_by_channel.get(m.channel, 0) + 1
        st.pushes += len(pushes)
        st.erased_users += len(erased)
        st.events_ok += n_ok
        st.events_in += len(records)  # counted with the batch's other counters, once it is done
        st.recs_written += len(docs)
        st.batches += 1
        st.last_batch_s = time.perf_counter() - t0
        st.batch_seconds.add(st.last_batch_s)

    def _in_sequence(self, records) -> dict[int, list]:
        """The records by partition, keeping only those that continue what this worker holds.

        A batch fetched around a rebalance can hold records of a partition that was revoked since
        (its new owner reads them; during the rebalance this worker owns nothing), or that was
        restored from a snapshot at another offset: those are left out, and the partition is sought
        back to the offset its state covers.
        """
        out: dict[int, list] = {}
        for rec in records:
            out.setdefault(rec.partition, []).append(rec)
        for partition in list(out):
            expected = self._done.get(partition)
            if partition not in self._owned:
                del out[partition]
            elif expected is not None and out[partition][0].offset != expected:
                del out[partition]
                self._consumer.seek(TopicPartition(self.topics.events, partition), expected)
        return out

    def _cooc_messages(self, partition: int, base: int, offsets: list[int]) -> list[tuple]:
        """The engine's co-occurrence updates of one events partition, one ``cooc`` record per owner,
        and its population entries in one record for the learner."""
        headers = [("source", str(partition).encode())]
        out = []
        seq_of = np.asarray(offsets, np.int64)
        deltas = self.engine.drain_pair_deltas()
        if deltas is not None:
            n = self._cooc_partitions
            deltas = deltas.with_seq(seq_of, base)
            # every owner gets a record: the item occurrences in it are everyone's (popularity, lift)
            out += [(self.topics.cooc, piece.to_bytes(), None, headers, p)
                    for p, part in enumerate(deltas.split(lambda i: owner(i, n), n))
                    for piece in part.pieces(_COOC_RECORD_UPDATES)]
        population = self.engine.drain_population()
        if population is not None:  # segment samples and trend entries: to the learner, on partition 0
            for entry in population["seg"] + population["trend"]:
                entry[0] = int(seq_of[entry[0] - base])
            out += [(self.topics.cooc, raw, None, headers + [("kind", POPULATION_KIND)], POPULATION_PARTITION)
                    for raw in population_records(population)]
        return out

    async def _load_population(self) -> None:
        """Segment centers and trending from the population learner (via Redis), at most every
        ``publish_interval_s``: the engine assigns segments and ranks with them."""
        now = time.monotonic()
        if now - self._population_loaded_at < self.settings.publish_interval_s:
            return
        self._population_loaded_at = now
        try:
            got = await self._store.read_population(self.engine.config.n_segments, self.settings.trending_n)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # the last ones serve until the next try
            self.stats.redis_retries += 1
            log.warning("could not read the population model (%s); keeping the last one", type(exc).__name__)
            return
        if got["at"] is None:
            return
        assigned = self.engine.load_population(got["model"], got["trending"], got["at"], got["momentum"])
        if assigned:  # users seen before the first centers: their segment now, without waiting for an event
            for user_id in assigned:
                for part in self.parts.values():
                    if user_id in part.users:
                        part.touch(user_id)
            await self._redis_retrying(self._store.write,
                                       segments={u: self.engine.segment(u) for u in assigned})

    async def _redis_retrying(self, fn, *args, **kwargs):
        """Retry a Redis write until it succeeds: offsets are not committed meanwhile, so nothing is lost."""
        delay = 0.1
        while True:
            try:
                return await fn(*args, **kwargs)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self.stats.redis_retries += 1
                log.warning("Redis unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _learn(self, events: list[Event]) -> None:
        if events:
            self.engine.learn_many(events)

    # ------------------------------------------------------------------ erasure and DLQ
    def _forget_in_memory(self, user_id: str) -> None:
        self.engine.forget_user(user_id)
        for part in self.parts.values():
            part.forget_user(user_id)
        self.prefs.pop(user_id, None)

    async def erase_user(self, user_id: str) -> None:
        """Remove every trace of a user: model state, push state, preferences and Redis keys."""
        self._forget_in_memory(user_id)
        await self._redis_retrying(self._store.erase_user, user_id)
        self.stats.erased_users += 1

    def _dead_messages(self, dead: list[DeadLetter]) -> list[tuple]:
        return [(self.topics.dlq, d.raw, d.key, d.headers()) for d in dead]

    async def _send_counted_dead(self, dead: list[DeadLetter]) -> None:
        for d in dead:
            self.stats.count_dead(d.reason)
        await self._send_dead(dead)

    async def _send_dead(self, dead: list[DeadLetter]) -> None:
        await self._send_all(self._dead_messages(dead))

    async def _send_all(self, messages: list[tuple]) -> None:
        """Produce ``(topic, value, key, headers[, partition])`` messages; resend those that failed until all are acked."""
        await self._confirm(messages, await self._enqueue(messages))

    async def _enqueue(self, messages: list[tuple]) -> list:
        """Hand messages to the producer: per message its delivery future, or the error that refused it."""
        futures = []
        for topic, value, key, headers, *partition in messages:
            try:
                futures.append(await self._producer.send(topic, value, key=key, headers=headers,
                                                         partition=partition[0] if partition else None))
            except (KafkaError, OSError) as exc:
                futures.append(exc)
        return futures

    async def _confirm(self, messages: list[tuple], futures: list) -> None:
        """Wait until the broker acked ``messages`` (enqueued as ``futures``), resending those that failed."""
        delay = 0.2
        while messages:
            results = [f if isinstance(f, BaseException) else None for f in futures]
            pending = [(k, f) for k, f in enumerate(futures) if not isinstance(f, BaseException)]
            done = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
            for (k, _), r in zip(pending, done):
                results[k] = r if isinstance(r, BaseException) else None
            failed = [m for m, r in zip(messages, results) if r is not None]
            fatal = next((r for r in results if r is not None and not _retriable(r)), None)
            if fatal is not None:  # e.g. a record over the broker's size limit: resending cannot help
                raise fatal
            if failed:
                self.stats.kafka_retries += 1
                log.warning("%d of %d messages not acknowledged (%s); resending in %.1f s", len(failed),
                            len(messages), type(next(r for r in results if r is not None)).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                futures = await self._enqueue(failed)
            messages = failed
