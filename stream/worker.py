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
(:class:`~infogap.stream.neighbour_cache.NeighbourCache`), each touched user is ranked, the push policy
runs, and one Redis pipeline plus the ``push``/``cooc``/DLQ produces complete the batch.

The **item stage** (:class:`~infogap.stream.item_stage.ItemStage`) runs in the same process as a second
consumer group on ``cooc``; more processes split both stages' partitions.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError, KafkaTimeoutError

from infogap.models import Engine, warm_up
from infogap.models.state_fields import StateError
from infogap.stream import connections, inspection, web_access
from infogap.stream.core.ingest import DeadLetter
from infogap.stream.core.user_stage import UserStage
from infogap.stream.item_stage import ItemStage
from infogap.stream.neighbour_cache import NeighbourCache
from infogap.stream.observability import WorkerStats, build_app, serve
from infogap.stream.settings import Settings
from infogap.stream.side_topics import SideTopics
from infogap.stream.snapshots import SnapshotError, SnapshotStore, SnapshotTurns, snapshot_bytes
from infogap.stream.store import Store, StoreUnavailable, WrongTypeError, open_store

log = logging.getLogger("infogap.worker")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        await self.worker.on_assigned(assigned)


#: Users whose recommendations are written again per step after Redis lost its data (one step between two
#: batches, ~0.1 s of ranking): live events go on being served meanwhile.
REMATERIALISE_USERS = 1_000


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

    def __init__(self, settings: Settings, *, engine: Engine | None = None, store: Store | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.topics = settings.topics
        #: the stage's logic and state (the engine, partitions, preferences, catalog, erasure ledger)
        self.core = UserStage(settings, engine=engine, clock=clock)
        self.engine = self.core.engine
        self.clock = clock
        self.stats = WorkerStats()
        #: what blocks the worker now, for /health: per Redis write being retried, why Redis refuses it;
        #: per Kafka send or operation being retried, what waits on what
        self._redis_refused: dict[object, str] = {}
        self._kafka_waiting: dict[object, str] = {}
        #: for the stall check: records of the batch in progress, and when a batch last completed (or the
        #: worker last found no input waiting), monotonic
        self._in_flight = 0
        self._progress_at = time.monotonic()
        self._population_loaded_at = float("-inf")
        self._review_models_loaded_at = float("-inf")
        self.ready = asyncio.Event()
        stages = {x.strip() for x in settings.stages.split(",") if x.strip()}
        if not stages or stages - {"users", "items"}:
            raise ValueError(f"stages must name users, items or both, got {settings.stages!r}")
        #: this process consumes events (the user stage) / cooc (the item stage); one deployment needs both
        self.run_users, self.run_items = "users" in stages, "items" in stages
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        #: the read model (Redis, Redis Cluster; from the settings unless given)
        self.store: Store | None = store
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
        #: owned events partitions whose snapshot could not be read: paused, never snapshotted
        self._stopped: set[int] = set()
        self._cache: NeighbourCache | None = None
        self._bad_rows_counted = 0  # the cache's bad_rows already in stats.redis_unreadable
        #: the Redis generation marker's token as last read, and when to read it next (monotonic)
        self._generation: bytes | None = None
        #: the first generation check found no marker: the first partitions restored are written to Redis again
        self._refill_on_restore = False
        self._generation_at = float("-inf")
        #: after a Redis data loss, the (events partition, user) whose keys are still to write again
        self._refill: list[tuple[int, str]] = []
        self._refill_n = 0  # counted in stats.redis_rematerialise_pending (with an item stage's rows)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever); always closes its connections."""
        stop = stop or asyncio.Event()
        s = self.settings
        warm_up()  # the compiled kernels, before the first batch waits for them
        await self._check_credentials()
        if self.store is None:
            self.store = open_store(s, socket_timeout=5, socket_connect_timeout=2)
        # batches of up to produce_batch_bytes, not aiokafka's 16 KiB: the client has one produce request in
        # flight per broker, holding one batch per partition, and a send to a partition whose batch is full
        # waits until that batch is sent; a 20,000-event batch's ~17 MB of cooc records (~450 kB each) took
        # ~15 round trips, ~110 ms of the batch (docs/architecture.md)
        self._producer = connections.producer(s, linger_ms=5, acks="all", max_batch_size=s.produce_batch_bytes)
        if self.run_users:
            self._consumer = connections.consumer(
                s, group_id=s.consumer_group,
                enable_auto_commit=False, auto_offset_reset="earliest",
                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
        self._side = SideTopics(s, (self.topics.erasures, self.topics.items, self.topics.users))
        self._snapshots = (SnapshotStore(s, self.topics.state_users, "users")
                           if s.snapshot_interval_s > 0 and self.run_users else None)
        self._cache = NeighbourCache(self.store, s.neighbour_cache_items,
                                     s.neighbour_max_age_s, read_max_share=s.neighbour_read_max_share)
        if self.run_users:  # the rows' arrays sized now, not doubled in the middle of batches: the cache's
            # bound, and half again for the rows a batch reads before the cache evicts the oldest
            self.engine.reserve_rows(s.neighbour_cache_items * 3 // 2)
        if self.run_items:
            self.items = ItemStage(s, self.engine.config, self.store,
                                   eligible=lambda i: i not in self.core.unavailable, retrying=self._kafka_retrying,
                                   redis_retrying=self._store_retrying, send_dead=self._send_counted_dead,
                                   stats=self.stats)
        item_stop = asyncio.Event()
        item_task = None
        http = None
        try:
            if s.http_port is not None:
                app = build_app(self.stats, {"kafka": self._kafka_ok, "redis": self._redis_ok, "state": self._state_ok},
                                faults=self._faults)
                if self.run_users:  # what it holds about a user, an item, the segments: for the console
                    inspection.add_routes(app, self)
                    app.middlewares.append(web_access.guard(s.http_host, s.console_token, prefix="/inspect/"))
                http = await serve(app, s.http_host, s.http_port)
            if self.run_users:
                self._consumer.subscribe([self.topics.events], listener=_Rebalance(self))
            # before any partition is restored: a Redis found empty gets the restored partitions' keys again
            await self._check_generation()
            await self._kafka_retrying("start the Kafka clients", self._start_kafka)
            # the ledger first: the users topic's tombstones re-read now were recorded in it already
            await self._kafka_retrying("read the erasure ledger", self._sync_side, self.topics.erasures)
            await self._kafka_retrying("read items and users", self._sync_side)
            if self.items is not None:
                item_task = asyncio.create_task(self.items.run(item_stop), name="item-stage")
            # what is alive now (modules, numba's compiled kernels, the catalog) lives as long as the process:
            # out of the collector's full passes, which walked it all (~0.1 s) every few seconds
            gc.freeze()
            self._progress_at = time.monotonic()  # stalls are counted from here
            self.ready.set()
            log.info("worker ready: stages=%s group=%s topic=%s", s.stages, s.consumer_group, self.topics.events)
            while not stop.is_set():
                await self._check_generation()  # one GET every redis_check_interval_s
                if item_task is not None and item_task.done():
                    item_task.result()  # the item stage failed: raise its error here
                if not self.run_users:  # an item stage alone: keep the catalog current for its lists
                    await self._kafka_retrying("read items and users", self._sync_side)
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=s.batch_timeout_ms / 1000)
                    except asyncio.TimeoutError:
                        pass
                    continue
                batch = await self._consumer.getmany(timeout_ms=0 if self._refill else s.batch_timeout_ms,
                                                     max_records=s.batch_max_records)
                records = [r for recs in batch.values() for r in recs]
                self._in_flight = len(records)  # the stall check of /health
                if not records:  # nothing to take: waiting for input is not a stall
                    self._progress_at = time.monotonic()
                await self._kafka_retrying("read items and users", self._sync_side)
                async with self._batch_lock:  # also when idle: the first centers give waiting users a segment
                    await self._load_population()
                    await self._load_review_models()
                if records:
                    async with self._batch_lock:
                        await self.process(records)
                    self.stats.lag = await self._lag()
                    if self._snapshots is None:
                        await self._kafka_retrying("commit offsets", self._consumer.commit)
                    self._in_flight, self._progress_at = 0, time.monotonic()
                if self._refill:  # after a Redis data loss: a step of users between two batches
                    async with self._batch_lock:
                        await self._rematerialise_users()
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
            closers = [self._side.stop, self._producer.stop, self.store.close]
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
        await connections.check_topics(self._producer, self._output_topics() + self._input_topics())
        if self._snapshots is not None:
            await self._snapshots.start()
        await self._side.start()
        self._cooc_partitions = len(await self._producer.partitions_for(self.topics.cooc))
        self.core.events_partitions = len(await self._producer.partitions_for(self.topics.events))
        self._cache.partitions = self._cooc_partitions
        if self.run_users:
            await self._consumer.start()
        if self.items is not None:
            await self.items.start()

    # ------------------------------------------------------------------ checkpoints
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
        raws = [(tp.partition, snapshot_bytes("users", tp.partition, off, self.core.partition_state(tp.partition)))
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
            self.stats.checkpoints += 1
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

    def _stop_partition(self, tp: TopicPartition, why: str) -> None:
        """A partition whose state cannot be read is not consumed: no event of it is applied to empty
        state, and its snapshot is never overwritten. ``/health`` fails, ``infogap_unreadable_state`` is
        1 for it, and the log names the record, until a rebalance reads a good snapshot again."""
        self._stopped.add(tp.partition)
        self._consumer.pause(tp)
        self.stats.unreadable_state[f"{self.topics.state_users}[{tp.partition}]"] = why[:500]
        log.error("events partition %d is NOT consumed: its state cannot be restored: %s. Fix or migrate the "
                  "snapshot (docs/operations.md, 'Unreadable state'), then restart the worker", tp.partition, why)

    def _drop(self, gone: list[int]) -> None:
        for p in gone:
            if p in self._stopped:
                self._stopped.discard(p)
                self.stats.unreadable_state.pop(f"{self.topics.state_users}[{p}]", None)
            self._done.pop(p, None)
        self.core.drop(gone)

    async def on_assigned(self, assigned) -> None:
        """Restore the snapshots of newly assigned partitions and resume each from its offset.

        Under the batch lock: a batch fetched meanwhile (from the committed offset) must wait until the
        partition's state and offset are restored, or its new users' events would be learned before the
        restore and again when the partition resumes from the snapshot's offset.
        """
        async with self._batch_lock:
            new = [tp for tp in assigned if tp.partition not in self.core.parts]
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
                try:
                    if isinstance(snap, SnapshotError):
                        raise snap
                    self.core.restore_partition(tp.partition, snap.state, snap.arrays, snap.where)
                except StateError as exc:
                    self._stop_partition(tp, str(exc))
                    continue
                self._consumer.seek(tp, snap.offset)
                self._done[tp.partition] = snap.offset
            if found:
                self._cache.stale()
            if self._refill_on_restore:
                self._refill_on_restore = False
                self._refill += self.core.users_to_rematerialise([tp.partition for tp in new])
                self._count_refill()
            log.info("took events partitions %s (%d from snapshots)", sorted(tp.partition for tp in new),
                     len(found))

    async def _kafka_retrying(self, what: str, fn, *args):
        """Retry a Kafka operation through a broker outage: the worker waits, it does not die (what it waits
        on is named by ``/health`` if batches stall meanwhile)."""
        delay, token = 0.2, object()
        try:
            while True:
                try:
                    return await fn(*args)
                except (KafkaError, OSError) as exc:
                    if not _retriable(exc):
                        raise
                    self._kafka_waiting[token] = f"Kafka: could not {what} ({type(exc).__name__}), retrying"
                    self.stats.kafka_retries += 1
                    log.warning("Kafka unavailable while trying to %s (%s); retrying in %.1f s", what,
                                type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self._kafka_waiting.pop(token, None)

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

    async def _state_ok(self) -> bool | str:
        """True, or while a partition is stopped because its state snapshot cannot be read, which and why."""
        stopped = self.stats.unreadable_state
        return not stopped or "; ".join(f"{where}: {why}" for where, why in stopped.items())[:1000]

    async def _redis_ok(self) -> bool | str:
        if self._redis_refused:  # PING answers while writes are refused (OOM, READONLY): down, and why
            return next(iter(self._redis_refused.values()))
        return await self.store.ping()

    def _output_topics(self) -> list[str]:
        """The topics this worker writes: dead letters and erasures; push, cooc, snapshots and the ``users``
        tombstones of ``forget`` events and records of consents turned off (``unsubscribe``, ``push_bounce``) for a
        user stage; snapshots for an item stage."""
        t, snapshots = self.topics, self.settings.snapshot_interval_s > 0
        out = [t.dlq, t.erasures]
        if self.run_users:
            out += [t.push, t.cooc, t.users] + ([t.state_users] if snapshots else [])
        if self.run_items:
            out += [t.state_items] if snapshots else []
        return out

    def _input_topics(self) -> list[str]:
        t = self.topics
        return [t.erasures, t.items, t.users] + ([t.events] if self.run_users else []) + (
            [t.cooc] if self.run_items else [])

    def _faults(self) -> dict[str, str]:
        """The worker's own findings for ``/health``: batches stalled while input waits."""
        stalled = self._stalled()
        return {"progress": stalled} if stalled else {}

    def _stalled(self) -> str | None:
        """Why batches are stalled: none completed for ``stall_s`` while records wait (the batch in progress, or
        lag behind what this worker took), with what it waits on where known; None when not stalled."""
        if self._consumer is None or not self.ready.is_set():
            return None
        idle = time.monotonic() - self._progress_at
        if idle < self.settings.stall_s:
            return None
        lag = 0
        for tp in self._consumer.assignment():
            hw, done = self._consumer.highwater(tp), self._done.get(tp.partition)
            if hw is not None and done is not None:
                lag += max(0, hw - done)
        waiting = self._in_flight + lag
        if not waiting:
            return None
        why = [f"stalled: no batch completed for {idle:.0f} s while {waiting} records wait "
               f"(INFOGAP_STALL_S={self.settings.stall_s:g})"]
        cluster = self._producer.client.cluster  # current: the kafka check refreshed it just before
        missing = [t for t in self._output_topics() if cluster.partitions_for_topic(t) is None]
        if missing:
            why.append(f"output topic {', '.join(missing)} does not exist")
        why += list(dict.fromkeys(self._kafka_waiting.values()))[:3]
        return "; ".join(why)

    async def _lag(self) -> int:
        lag = 0
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                lag += max(0, hw - await self._consumer.position(tp))
        return lag

    # ------------------------------------------------------------------ side topics
    async def _sync_side(self, only: str | None = None) -> None:
        """Apply ``erasures``, ``items`` and ``users`` records (or those of topic ``only``) up to their current
        end offsets."""
        await self._side.sync(self._apply_side, only)

    async def _apply_side(self, rec) -> None:
        """Apply one ``erasures``, ``items`` or ``users`` record (:meth:`UserStage.apply_side`): a bad one goes to
        the DLQ, a tombstone of ``users`` erases (its store writes retried)."""
        outcome = self.core.apply_side(rec)
        if outcome.dead is not None:
            await self._send_counted_dead([outcome.dead])
        elif outcome.erase is not None:
            await self.erase_user(outcome.erase, partition=outcome.partition)

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
        core = self.core
        for partition, recs in by_partition.items():
            self._done[partition] = max(self._done.get(partition, 0), recs[-1].offset + 1)
        learned = core.learn(by_partition, now, self._cooc_partitions)
        # acked while the batch is ranked; awaited before it is done (its offsets are committed after)
        cooc_sent = await self._enqueue(learned.cooc)
        await self._store_retrying(self._cache.ensure, self.engine, core.wanted_items(learned.touched),
                                   time.monotonic())
        self._cache_to_stats()
        ranked = core.rank(learned, now)
        await self._store_retrying(self.store.write, recs=ranked.docs, segments=ranked.segments,
                                   decisions=ranked.decisions)
        done = self.clock()  # the recommendations are readable in Redis
        await self._confirm(learned.cooc, cooc_sent)
        if ranked.experiments:
            await self._store_retrying(self.store.write_experiment, core.exp_name, ranked.experiments)
        if ranked.retention:  # the cohorts changed (an erasure of this batch included)
            await self._store_retrying(self.store.write_retention, core.exp_name, ranked.retention)
        for user_id, partition, raw_key in learned.erased:
            await self._publish_erasure(user_id, partition, raw_key)
        # the users records of consents turned off (unsubscribe, push_bounce) go with the pushes, acked before
        # the commit: a restart reads them back with the users topic
        await self._send_all(learned.users + core.push_messages(ranked.pushes) + self._dead_messages(learned.dead))
        created = np.fromiter((r.timestamp for r in records if r.timestamp is not None), float)
        st.freshness_seconds.add_many(done - created / 1000.0)
        for d in learned.dead:
            st.count_dead(d.code)
        for m in ranked.pushes:
            st.pushes_by_channel[m.channel] = st.pushes_by_channel.get(m.channel, 0) + 1
        for rule, n in ranked.held.items():
            st.pushes_held[rule] = st.pushes_held.get(rule, 0) + n
        st.duplicates += learned.duplicates
        st.erased_events += learned.erased_events
        st.consent_withdrawn += len(learned.users)
        st.pushes += len(ranked.pushes)
        st.events_ok += learned.n_ok
        st.events_in += len(records)  # counted with the batch's other counters, once it is done
        st.recs_written += len(ranked.docs)
        st.batches += 1
        st.experiment_unattributed = sum(p.experiments.unattributed for p in core.parts.values())
        st.experiment_overflow = sum(p.experiments.overflow for p in core.parts.values())
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
            if partition not in self._owned or partition in self._stopped:
                del out[partition]
            elif expected is not None and out[partition][0].offset != expected:
                del out[partition]
                self._consumer.seek(TopicPartition(self.topics.events, partition), expected)
        return out

    def _cache_to_stats(self) -> None:
        """The neighbour cache's figures on /stats: its max age, and the rows it found unreadable since the last
        look (counted in ``redis_unreadable``)."""
        self.stats.neighbour_max_age_s = self._cache.age_s
        self.stats.redis_unreadable += self._cache.bad_rows - self._bad_rows_counted
        self._bad_rows_counted = self._cache.bad_rows

    async def _load_population(self) -> None:
        """Segment centers and trending from the population learner (via Redis), at most every
        ``publish_interval_s``: the engine assigns segments and ranks with them."""
        now = time.monotonic()
        if now - self._population_loaded_at < self.settings.publish_interval_s:
            return
        self._population_loaded_at = now
        try:
            got = await self.store.read_population(self.engine.config.n_segments, self.settings.trending_n)
        except StoreUnavailable as exc:  # the last ones serve until the next try
            self.stats.redis_retries += 1
            log.warning("could not read the population model (%s); keeping the last one", exc.reason)
            return
        except (WrongTypeError, ValueError) as exc:  # another type or value at its keys: reported, never fatal
            if isinstance(exc, WrongTypeError):
                self.stats.redis_wrong_type += len(exc.keys)
            else:
                self.stats.redis_unreadable += 1
            log.error("could not read the population model (%s); keeping the last one until the item stage "
                      "rewrites it", exc if isinstance(exc, WrongTypeError) else type(exc).__name__)
            return
        if got["at"] is None:
            return
        try:
            segments = self.core.load_population(got)
        except Exception as exc:  # values the engine cannot take (checked as read: unforeseen), never fatal
            self.stats.redis_unreadable += 1
            log.error("could not load the population model (%s: %s); keeping the last one until the item stage "
                      "rewrites it", type(exc).__name__, str(exc)[:200])
            return
        if segments:  # users seen before the first centers: their segment now, without waiting for an event
            await self._store_retrying(self.store.write, segments=segments)

    async def _load_review_models(self) -> None:
        """The population learner's sentiment and topic models (via Redis), looked for every
        ``review_models_publish_s``: the engine reads reviews with them. A store that refuses, or a model that cannot
        be read, keeps the last."""
        now = time.monotonic()
        if now - self._review_models_loaded_at < self.settings.review_models_publish_s:
            return
        self._review_models_loaded_at = now
        for name in ("sentiment", "topics"):
            try:
                raw = await self.store.read_model(name)
            except StoreUnavailable as exc:
                self.stats.redis_retries += 1
                log.warning("could not read the %s model (%s); keeping the last one", name, exc.reason)
                return
            except WrongTypeError as exc:
                self.stats.redis_wrong_type += len(exc.keys)
                log.error("could not read the %s model (%s); keeping the last one", name, exc)
                continue
            if raw is not None and not self.core.load_review_model(name, raw):
                self.stats.redis_unreadable += 1
                log.error("the %s model in the store cannot be read; keeping the last one until the item stage "
                          "rewrites it", name)

    # ------------------------------------------------------------------ Redis data loss
    async def _check_generation(self) -> None:
        """Every ``redis_check_interval_s``, read the generation marker (``{prefix}generation``, a random token
        set once per life of Redis's data). Gone or another token: Redis lost its data (restarted without
        persistence, flushed, or another worker found that first), and since only what changes is written,
        the keys of everything else would never come back: the marker is set again (by whichever worker
        finds it gone first; the others read that token) and every key this worker holds state for is
        written again (:meth:`_rematerialise`). At start the token is only taken note of."""
        now = time.monotonic()
        if now < self._generation_at:
            return
        self._generation_at = now + self.settings.redis_check_interval_s
        key = self.store.keys.generation()
        try:
            try:
                seen, missing = await self.store.generation()
            except WrongTypeError:
                # infogap's key holding another type: named, counted, replaced; what it guarded is unknown, so
                # Redis is taken as having lost its data
                log.error("Redis key %s holds another type than the generation marker's string; replacing it and "
                          "writing every key again", key)
                self.stats.redis_wrong_type += 1
                await self.store.delete_own([key])
                seen, missing = await self.store.generation()
        except (StoreUnavailable, WrongTypeError) as exc:
            # read again at the next check; the writes wait through an outage themselves
            log.debug("could not read the Redis generation marker (%s)", exc)
            return
        if seen is None or seen == self._generation:
            return
        first, self._generation = self._generation is None, seen
        if not first:
            await self._rematerialise()
        elif missing:
            # Redis lost its data while no worker ran (or this is the first start): what this worker restores
            # from snapshots at its first assignment is written again too
            self._refill_on_restore = True
            if self.items is not None:
                self.items.refill_on_take = True

    async def _rematerialise(self) -> None:
        """Redis lost its data: write again, from this worker's state, every key it owns. The item stage's
        rows (``similar``, ``nbrow``) and population keys (:meth:`ItemStage.rematerialise`), then the user
        stage's experiment hashes at once, and every user's recommendations and segment a step between
        two batches (:meth:`_rematerialise_users`). Erased users are in no partition, hence never written."""
        self.stats.redis_rematerialisations += 1
        rows = self.items.rematerialise() if self.items is not None else 0
        segments = 0
        if self.run_users:
            async with self._batch_lock:  # no partition moves meanwhile, so its counts are still this worker's
                live = [p for p in self.core.parts if p in self._owned and p not in self._stopped]
                self._refill = self.core.users_to_rematerialise(live)
                self._count_refill()
                counts = self.core.experiment_counts(live)
                if counts:
                    await self._store_retrying(self.store.write_experiment, self.core.exp_name, counts)
                    self.stats.redis_keys_rematerialised += len({seg.variant for seg in counts})
                segments = len(counts)
                cohorts = self.core.retention_counts(live)
                if cohorts:
                    await self._store_retrying(self.store.write_retention, self.core.exp_name, cohorts)
                    self.stats.redis_keys_rematerialised += 1
        log.warning("Redis lost its data (%s was gone or changed): writing every key again from state: "
                    "recommendations of %d users, %d neighbour rows, %d experiment segments",
                    self.store.keys.generation(), len(self._refill), rows, segments)

    def _count_refill(self) -> None:
        self.stats.redis_rematerialise_pending += len(self._refill) - self._refill_n
        self._refill_n = len(self._refill)

    async def _rematerialise_users(self) -> None:
        """Write the recommendations and segment of the next ``REMATERIALISE_USERS`` users still to write
        again, ranked as a batch ranks them (held under the batch lock: no erasure or rebalance between the
        checks here and the write). Users gone since (erased, evicted, their partition revoked) are skipped."""
        pending, chunk = self._refill, []
        while pending and len(chunk) < REMATERIALISE_USERS:
            p, user_id = pending.pop()
            if p in self._owned and self.core.still_held(p, user_id):
                chunk.append(user_id)
        if chunk:
            await self._store_retrying(self._cache.ensure, self.engine, self.core.wanted_items(chunk),
                                       time.monotonic())
            self._cache_to_stats()
            now = self.clock()
            docs = [self.core.ranked(user_id, now)[2] for user_id in chunk]
            segments = {doc["user_id"]: doc["segment"] for doc in docs}
            await self._store_retrying(self.store.write, recs=docs, segments=segments)
            self.stats.redis_keys_rematerialised += len(docs) + sum(s is not None for s in segments.values())
        self._count_refill()
        if not pending:
            log.info("Redis data loss repaired: every user's recommendations written again")

    async def _store_retrying(self, fn, *args, **kwargs):
        """Retry a store call until it succeeds: offsets are not committed meanwhile, so nothing is lost.

        ``fn`` is one whole write of absolute values: a retry rewrites whole what a failed try half wrote.
        The store unreachable, or refusing the write (OOM, READONLY, a cluster failover, ...:
        :class:`~infogap.stream.store.StoreUnavailable`): an outage, waited through with ``/health`` 503 and the
        reason. Keys of another type (:class:`~infogap.stream.store.WrongTypeError`, infogap's keys): logged by name,
        counted, deleted, written.
        """
        delay, token, repair, repaired = 0.1, object(), [], False
        try:
            while True:
                try:
                    if repair:
                        foreign = await self.store.delete_own(repair)
                        repair = []
                        if foreign:  # (every key written has the prefix: never expected)
                            log.error("WRONGTYPE at keys outside %r, left alone; write dropped: %s",
                                      self.settings.redis_prefix, ", ".join(foreign)[:1000])
                            return None
                    return await fn(*args, **kwargs)
                except WrongTypeError as exc:
                    self.stats.redis_wrong_type += len(exc.keys)
                    log.error("WRONGTYPE: %s held another Redis type than infogap writes there; deleting and "
                              "writing again", ", ".join(exc.keys)[:1000])
                    repair = exc.keys
                    if not repaired:  # at once the first time; back off if something keeps putting them back
                        repaired = True
                        continue
                except StoreUnavailable as exc:
                    if exc.refused:  # PING still answers: /health says why
                        self._redis_refused[token] = exc.reason
                    log.warning("Redis unavailable or refusing (%s); retrying the whole write in %.1f s",
                                exc.reason, delay)
                self.stats.redis_retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._redis_refused.pop(token, None)

    # ------------------------------------------------------------------ erasure and DLQ
    async def erase_user(self, user_id: str, *, partition: int | None = None, raw_key: bytes | None = None) -> None:
        """Remove every trace of a user for good: model state, push state, preferences, Redis keys; record it
        in the ``erasures`` ledger (:mod:`infogap.stream.core.erasures`), and snapshot the user's events ``partition``
        (if this worker owns it) at the next turn, so that no snapshot read after it holds the user.
        ``raw_key``: the user's ``users`` key (a ``forget`` event's), whose record is then deleted too."""
        if not self.core.erase(user_id):  # erased before (a tombstone re-read at start, a forget replayed): its keys went then
            return
        await self._publish_erasure(user_id, partition, raw_key)

    async def _publish_erasure(self, user_id: str, partition: int | None, raw_key: bytes | None) -> None:
        await self._store_retrying(self.store.erase_user, user_id)
        cohorts = self.core.drain_retention()  # the user's contribution out of the cohort figures
        if cohorts:
            await self._store_retrying(self.store.write_retention, self.core.exp_name, cohorts)
        await self._send_all(self.core.erasure_messages(user_id, raw_key))
        if partition is not None and partition in self.core.parts:
            self._turns.hurry(partition)
        self.stats.erased_users += 1

    def _dead_messages(self, dead: list[DeadLetter]) -> list[tuple]:
        return [d.message(self.topics.dlq) for d in dead]  # value and key cut to their bounds

    async def _send_counted_dead(self, dead: list[DeadLetter]) -> None:
        for d in dead:
            self.stats.count_dead(d.code)
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
        """Wait until the broker acked ``messages`` (enqueued as ``futures``), resending those that failed
        (what waits, on which topics, is named by ``/health`` if batches stall meanwhile)."""
        delay, token = 0.2, object()
        try:
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
                    error = type(next(r for r in results if r is not None)).__name__
                    self._kafka_waiting[token] = (f"Kafka: {len(failed)} messages to "
                                                  f"{', '.join(sorted({m[0] for m in failed}))} not acknowledged "
                                                  f"({error}), resending")
                    self.stats.kafka_retries += 1
                    log.warning("%d of %d messages not acknowledged (%s); resending in %.1f s", len(failed),
                                len(messages), error, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    futures = await self._enqueue(failed)
                messages = failed
        finally:
            self._kafka_waiting.pop(token, None)
