"""The item stage: co-occurrence rows partitioned by item, fed by the ``cooc`` topic.

User stages emit their pair updates (:class:`models.cooc_shard.PairDeltas`) to ``cooc``, one
record per (batch, events partition, cooc partition), sent to the partition that owns the rows
(:func:`owner`); the record's ``source`` header names the events partition it came from. Each
``cooc`` partition is one :class:`~models.cooc_shard.CoOccurrenceShard`, so a rebalance moves
whole shards: the state of partition ``p`` is snapshotted to partition ``p`` of ``state.items``
with the offset it covers, and the offsets are committed only after that.

Changed rows are published at most every ``publish_interval_s``: the contract's
``ig:similar:{item}`` and the internal ``ig:nbrow:{item}`` that user stages rank with
(:mod:`stream.neighbour_cache`). Under a backlog nearly every row changes between two publishes, and
encoding and writing a row takes 70-140 µs of CPU: the next publish then waits at least the CPU time
the last one took divided by ``publish_max_share``, so that publishing takes at most about that
share of the stage's time (the rows' changes coalesce into fewer publishes).

**The population learner** lives with ``cooc`` partition 0 (:data:`POPULATION_PARTITION`): user
stages send it their segment samples and trend entries (records with the header ``kind:
population``; :mod:`models.population`), so segment ids mean the same on every worker and trending
counts every user. Its owner publishes the contract's ``ig:trending`` sets and the internal
``ig:segments:model`` that the user stages assign segments with, and snapshots the learner with
partition 0's shard.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import numpy as np
import orjson
from aiokafka import ConsumerRebalanceListener, TopicPartition

from models import EngineConfig
from models.cooc_shard import CoOccurrenceShard, PairDeltas
from models.population import PopulationLearner, check_batch
from models.state_fields import StateError
from stream import connections
from stream.ingest import DeadLetter
from stream.neighbour_cache import encode_row
from stream.observability import WorkerStats
from stream.store import Store
from stream.settings import Settings
from stream.snapshots import Snapshot, SnapshotError, SnapshotStore, SnapshotTurns, snapshot_bytes

log = logging.getLogger("infogap.items")

#: The ``cooc`` partition whose owner runs the population learner, and the header value that marks
#: its records.
POPULATION_PARTITION = 0
POPULATION_KIND = b"population"
#: rows encoded between two yields to the event loop when publishing (~40 µs a row): thousands of rows
#: a second in one go held up a user stage in the same process for ~0.15 s
_PUBLISH_CHUNK = 250
#: after Redis lost its data (:meth:`ItemStage.rematerialise`): owned rows written again per publish, and the
#: share of the stage's time those publishes may take (the next one waits the CPU time the last took / this)
_REFILL_ROWS = 2_000
_REFILL_SHARE = 0.5


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, stage: ItemStage):
        self.stage = stage

    async def on_partitions_revoked(self, revoked) -> None:
        await self.stage.release([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned) -> None:
        await self.stage.take([tp.partition for tp in assigned])


class ItemStage:
    """Consumes ``cooc`` in a consumer group of its own; one shard per assigned partition."""

    def __init__(self, settings: Settings, config: EngineConfig, store: Store,
                 eligible: Callable[[str], bool] | None = None, retrying=None, redis_retrying=None,
                 send_dead: Callable[[list[DeadLetter]], Awaitable[None]] | None = None,
                 stats: WorkerStats | None = None):
        self.settings = settings
        self.topic = settings.topics.cooc
        self.config = config
        self.store = store
        self.eligible = eligible
        self.shards: dict[int, CoOccurrenceShard] = {}
        #: per partition, a random number naming its shard object's numbering of items (rows published
        #: with it are translated by readers, :meth:`models.catalog.Catalog.translated`); new per object
        self._numbering: dict[int, int] = {}
        #: the population learner, while this stage owns POPULATION_PARTITION
        self.population: PopulationLearner | None = None
        self._population_published = -1
        #: held while applying, publishing or checkpointing, and by a rebalance: a partition's new owner
        #: starts only after the old one's last Redis write, so an older row never overwrites a newer one
        self._lock = asyncio.Lock()
        self._dirty: dict[int, set[str]] = {}
        #: after a Redis data loss, per partition the owned items still to publish again (rematerialise)
        self._refill: dict[int, list[str]] = {}
        self._refill_n = 0  # rows in _refill (counted in stats.redis_rematerialise_pending)
        self._population_lost = False  # the population's keys are to be counted as written again
        self._next_publish = float("-inf")  # monotonic time
        #: seconds from the last publish's start to the next one's (publish_interval_s, more under a backlog)
        self.publish_every = settings.publish_interval_s
        self._retrying = retrying
        self._redis_retrying = redis_retrying
        self.applied = 0
        self.dead: list[DeadLetter] = []
        self._send_dead = send_dead
        self._stats = stats
        self.consumer = connections.consumer(
            settings, group_id=f"{settings.consumer_group}.items", enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024)
        self.snapshots = (SnapshotStore(settings, settings.topics.state_items, "items")
                          if settings.snapshot_interval_s > 0 else None)
        self._turns = SnapshotTurns(settings.snapshot_interval_s)
        #: partitions whose snapshot could not be read: paused, never snapshotted
        self._stopped: set[int] = set()
        #: set by the worker when Redis was found empty at start: the first partitions taken are written again
        self.refill_on_take = False
        #: end offset of each events partition as last read (a bound on cooc records' sequence numbers); None
        #: until :meth:`run` starts
        self._events_ends: dict[int, int] | None = None

    async def _kafka(self, what, fn, *args):
        return await (self._retrying(what, fn, *args) if self._retrying else fn(*args))

    async def _redis(self, fn, **kwargs):  # through a Redis outage: wait, do not die
        return await (self._redis_retrying(fn, **kwargs) if self._redis_retrying else fn(**kwargs))

    async def start(self) -> None:
        if self.snapshots is not None:
            await self.snapshots.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        if self.snapshots is not None:
            await self.snapshots.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Apply, publish and checkpoint until ``stop`` is set (then a last publish and checkpoint)."""
        s = self.settings
        self._events_ends = {}
        while not stop.is_set():
            batch = await self.consumer.getmany(timeout_ms=s.batch_timeout_ms, max_records=500)
            async with self._lock:
                for tp, records in batch.items():
                    rest = self.apply(tp.partition, records, final=False)
                    if rest:  # sequence numbers past the ends of events known: ask them, then decide
                        await self._kafka("read the end offsets of events", self._refresh_events_ends)
                        self.apply(tp.partition, rest)
                if self.dead:
                    dead, self.dead = self.dead, []
                    log.warning("%d bad cooc records, first: %s", len(dead), dead[0].reason)
                    if self._send_dead is not None:
                        await self._send_dead(dead)
                await self.publish()
                if self.snapshots is None and batch:
                    await self._kafka("commit cooc offsets", self.consumer.commit)
                elif self.snapshots is not None and (due := self._turns.due(time.monotonic())) is not None:
                    await self.checkpoint([due])
        async with self._lock:
            await self.publish(force=True)
            if self.snapshots is not None:
                await self.checkpoint(list(self.shards))

    async def _refresh_events_ends(self) -> None:
        topic = self.settings.topics.events
        await self.consumer._client.add_topic(topic)  # metadata of a topic this consumer does not subscribe
        tps = [TopicPartition(topic, p) for p in sorted(await connections.wait_partitions(self.consumer, topic))]
        self._events_ends = {tp.partition: off for tp, off in (await self.consumer.end_offsets(tps)).items()}

    def _past_events(self, source: int, top: int) -> bool:
        """Whether sequence number ``top`` from ``source`` is past the end of that ``events`` partition as last
        read (not checked before :meth:`run` reads them: tests that apply records by hand)."""
        ends = self._events_ends
        if ends is None:
            return False
        if ends and not 0 <= source < len(ends):
            raise ValueError(f"source {source} is not a partition of events")
        return top >= ends.get(source, 0)

    def apply(self, partition: int, records, final: bool = True) -> list:
        """Apply ``cooc`` records of ``partition`` in order; a record that cannot be applied goes to the DLQ.

        A record's sequence numbers are its events' offsets in the ``events`` partition it names: one past
        the end of that partition is not a user stage's (applied, it would make the shard skip that source's
        real updates for good). Not ``final``: such a record and those after it are returned, to be applied
        once the end offsets are read again; ``final``: it goes to the DLQ."""
        shard = self.shards.get(partition)
        if shard is None:  # records fetched before a revoke reached us; the new owner applies them
            return []
        dirty = self._dirty.setdefault(partition, set())
        for k, rec in enumerate(records):
            try:
                headers = dict(rec.headers or ())
                source = int(headers["source"])
                if headers.get("kind") == POPULATION_KIND:
                    if partition != POPULATION_PARTITION or self.population is None:
                        raise ValueError(f"population entries on cooc partition {partition}, "
                                         f"not {POPULATION_PARTITION}")
                    batch = orjson.loads(rec.value)
                    samples, trends = check_batch(batch)
                    top = max((e[0] for e in samples + trends), default=-1)
                    if self._past_events(source, top):
                        if not final:
                            return records[k:]
                        raise ValueError(f"sequence number {top} is past the end of events partition {source}")
                    self.population.learn_checked(samples, trends, source)
                    continue
                deltas = PairDeltas.from_bytes(rec.value)
                top = max(int(deltas.seq.max(initial=-1)), int(deltas.occ_seq.max(initial=-1)))
                if self._past_events(source, top):
                    if not final:
                        return records[k:]
                    raise ValueError(f"sequence number {top} is past the end of events partition {source}")
                shard.apply(deltas, source)
            except Exception as exc:  # not written by a user stage: kept in the DLQ, never fatal
                self.dead.append(DeadLetter(rec.value, rec.key, f"bad cooc record: {type(exc).__name__}: {exc}"[:300],
                                            rec.topic, rec.partition, rec.offset))
                continue
            items = deltas.items
            dirty.update(map(items.__getitem__, np.unique(deltas.row).tolist()))
            self.applied += len(deltas)
        return []

    async def publish(self, force: bool = False) -> None:
        """Write the changed rows: ``ig:similar`` (contract) and ``ig:nbrow`` (for the user stages)."""
        now = time.monotonic()
        if not force and now < self._next_publish:
            return
        if self._refill:
            self._take_refill()
        similar, rows, tokens = {}, {}, {}
        n, min_support = self.settings.similar_n, self.config.min_support
        spent, t = 0.0, time.thread_time()  # this thread's CPU time encoding, without the yields
        for p, items in self._dirty.items():
            shard = self.shards.get(p)
            if shard is None:
                continue
            if items:  # user stages re-read this shard's rows (see stream.neighbour_cache)
                tokens[p] = secrets.token_hex(8)
            for item in items:
                similar[item] = [nb._asdict() for nb in shard.similar(item, n, min_support, self.eligible)]
                rows[item] = encode_row(shard.export_row(item), self._numbering[p])
                if len(rows) % _PUBLISH_CHUNK == 0:
                    spent += time.thread_time() - t
                    await asyncio.sleep(0)  # a user stage in this process ranks meanwhile
                    t = time.thread_time()
        spent += time.thread_time() - t
        self._dirty = {}
        pop = self.population
        fresh = pop is not None and pop.applied > 0 and pop.applied != self._population_published
        if fresh:
            k = self.settings.trending_n
            trending = {seg: pop.trending(k, seg, self.eligible) for seg in (None, *range(self.config.n_segments))}
            model = {**pop.model(), "at": pop.now}
            self._population_published = pop.applied
            if self._population_lost and self._stats is not None:  # trending sets, model and momentum
                self._stats.redis_keys_rematerialised += len(trending) + 2
        if pop is None or fresh:
            self._population_lost = False
        if rows or fresh:
            extra = {"trending": trending, "population": model, "momentum": pop.momentum()} if fresh else {}
            t = time.thread_time()
            await self._redis(self.store.write, similar=similar, rows=rows, rows_published=tokens, **extra)
            spent += time.thread_time() - t  # packing and sending ~20 kB a row (waits on Redis are not CPU)
        # paced by the CPU time publishing took: not by the yields to a user stage in this process, nor by
        # a Redis outage the write waited through
        s = self.settings
        self.publish_every = max(s.publish_interval_s, spent / s.publish_max_share)
        # rows still to write again after a data loss: as soon as their share of the stage's time allows
        self._next_publish = now + (spent / _REFILL_SHARE if self._refill else self.publish_every)
        if self._stats is not None:
            self._stats.publish_interval_s = self.publish_every

    def rematerialise(self) -> int:
        """Redis lost its data (the worker found its generation marker gone): every owned row's ``similar``
        and ``nbrow`` and the population's keys (trending, segment model, momentum) are written again from
        the shards, at most ``_REFILL_ROWS`` rows a publish and the first at once, so that the stage goes
        on applying ``cooc`` meanwhile. Only rows changed since are written otherwise. Returns how many
        rows are to be written again."""
        self._refill = {p: shard.owned() for p, shard in self.shards.items() if p not in self._stopped}
        self._population_published = -1  # the next publish writes the population's keys, changed or not
        self._population_lost = True
        self._next_publish = float("-inf")
        return self._count_refill()

    def _count_refill(self) -> int:
        """Rows still to write again, also kept in ``stats.redis_rematerialise_pending`` (with a user stage's users)."""
        n = sum(map(len, self._refill.values()))
        if self._stats is not None:
            self._stats.redis_rematerialise_pending += n - self._refill_n
        self._refill_n = n
        return n

    def _take_refill(self) -> None:
        """Move up to ``_REFILL_ROWS`` rows still to write again into this publish's changed rows."""
        budget, taken = _REFILL_ROWS, 0
        for p in list(self._refill):
            items = self._refill.pop(p)
            if p not in self.shards:  # revoked meanwhile: its new owner holds the rows
                continue
            take, rest = items[:budget], items[budget:]
            self._dirty.setdefault(p, set()).update(take)
            budget -= len(take)
            taken += len(take)
            if rest:
                self._refill[p] = rest
            if budget <= 0:
                break
        self._count_refill()
        if self._stats is not None:
            self._stats.redis_keys_rematerialised += 2 * taken  # similar and nbrow

    async def checkpoint(self, partitions: list[int]) -> None:
        """Snapshot the shards of ``partitions`` with their offsets, then commit those offsets."""
        mine = [p for p in partitions if p in self.shards]
        if not mine or self.snapshots is None:
            return
        offsets = {TopicPartition(self.topic, p): await self.consumer.position(TopicPartition(self.topic, p))
                   for p in mine}
        snaps = [(tp.partition, snapshot_bytes("items", tp.partition, off, self._state(tp.partition)))
                 for tp, off in offsets.items()]
        await self._kafka("write item snapshots", self.snapshots.save_many, snaps)
        await self._kafka("commit cooc offsets", self.consumer.commit, offsets)

    def _state(self, p: int) -> dict:
        """What partition ``p``'s snapshot holds, as a plain tree: its shard, and the learner for partition 0."""
        pop = self.population if p == POPULATION_PARTITION else None
        return {"shard": self.shards[p].to_state(), "population": None if pop is None else pop.to_state()}

    def _restore(self, p: int, snap: Snapshot) -> tuple[CoOccurrenceShard, PopulationLearner | None]:
        """Partition ``p``'s shard (and learner) from its snapshot, checked against their schemas."""
        tree = snap.state if isinstance(snap.state, dict) else {}
        shard = CoOccurrenceShard.from_state(tree.get("shard"), snap.arrays, f"{snap.where}: shard")
        pop = tree.get("population")
        if p == POPULATION_PARTITION:
            pop = (PopulationLearner(self.config) if pop is None else
                   PopulationLearner.from_state(self.config, pop, snap.arrays, f"{snap.where}: population"))
        elif pop is not None:
            raise StateError(f"{snap.where}: a population learner on partition {p}, not {POPULATION_PARTITION}")
        return shard, pop

    def _stop_partition(self, p: int, why: str) -> None:
        """A partition whose snapshot cannot be read is paused: its shard is never rebuilt from part of
        the stream, nor its snapshot overwritten; ``/health`` fails until a rebalance reads a good one."""
        self._stopped.add(p)
        self.consumer.pause(TopicPartition(self.topic, p))
        if self._stats is not None:
            self._stats.unreadable_state[f"{self.settings.topics.state_items}[{p}]"] = why[:500]
        log.error("cooc partition %d is NOT consumed: its state cannot be restored: %s. Fix or migrate the "
                  "snapshot (docs/operations.md, 'Unreadable state'), then restart the worker", p, why)

    async def release(self, partitions: list[int]) -> None:
        """Partitions revoked: publish and checkpoint their shards, then let them go."""
        async with self._lock:
            for p in set(partitions) & self._stopped:
                self._stopped.discard(p)
                if self._stats is not None:
                    self._stats.unreadable_state.pop(f"{self.settings.topics.state_items}[{p}]", None)
            await self.publish(force=True)
            await self.checkpoint(partitions)
            self._turns.revoke(partitions)
            for p in partitions:
                self.shards.pop(p, None)
                self._numbering.pop(p, None)
                self._dirty.pop(p, None)
                if self._refill.pop(p, None) is not None:
                    self._count_refill()
                if p == POPULATION_PARTITION:
                    self.population = None

    async def take(self, partitions: list[int]) -> None:
        """Partitions assigned: restore their snapshots and resume from the offsets they cover (under the
        lock, so that records fetched meanwhile are applied to the restored shards, not dropped)."""
        async with self._lock:
            found = await self.snapshots.load(partitions) if self.snapshots is not None else {}
            for p in partitions:
                snap = found.get(p)
                if snap is not None:
                    try:
                        if isinstance(snap, SnapshotError):
                            raise snap
                        self.shards[p], population = self._restore(p, snap)
                    except StateError as exc:
                        self._stop_partition(p, str(exc))
                        continue
                    self.consumer.seek(TopicPartition(self.topic, p), snap.offset)
                else:
                    self.shards[p] = CoOccurrenceShard.for_engine(self.config)
                    population = PopulationLearner(self.config)
                self._numbering[p] = secrets.randbits(63)
                if p == POPULATION_PARTITION:
                    self.population = population
                    self._population_published = -1
            self._turns.assign(self.shards, time.monotonic())
            if self.refill_on_take:  # Redis was found empty at start: the restored shards' rows go to it again
                self.refill_on_take = False
                self.rematerialise()
            log.info("item stage took cooc partitions %s (%d from snapshots)", sorted(partitions), len(found))
