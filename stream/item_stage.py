"""The item stage: co-occurrence rows partitioned by item, fed by the ``cooc`` topic.

User stages emit their pair updates (:class:`infogap.models.cooc_shard.PairDeltas`) to ``cooc``, one
record per (batch, events partition, cooc partition), sent to the partition that owns the rows
(:func:`owner`); the record's ``source`` header names the events partition it came from. Each
``cooc`` partition is one :class:`~infogap.models.cooc_shard.CoOccurrenceShard`, so a rebalance moves
whole shards: the state of partition ``p`` is snapshotted to partition ``p`` of ``state.items``
with the offset it covers, and the offsets are committed only after that.

Changed rows are published at most every ``publish_interval_s``: the contract's
``ig:similar:{item}`` and the internal ``ig:nbrow:{item}`` that user stages rank with
(:mod:`infogap.stream.neighbour_cache`). Under a backlog nearly every row changes between two publishes, and
encoding and writing a row takes 70-140 µs of CPU: the next publish then waits at least the CPU time
the last one took divided by ``publish_max_share``, so that publishing takes at most about that
share of the stage's time (the rows' changes coalesce into fewer publishes).

**The population learner** lives with ``cooc`` partition 0 (:data:`~infogap.models.cooc_shard.POPULATION_PARTITION`): user
stages send it their segment samples and trend entries (records with the header ``kind:
population``; :mod:`infogap.models.population`), so segment ids mean the same on every worker and trending
counts every user. Its owner publishes the contract's ``ig:trending`` sets and the internal
``ig:segments:model`` that the user stages assign segments with, and snapshots the learner with
partition 0's shard.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition

from infogap.models import EngineConfig
from infogap.models.state_fields import StateError
from infogap.stream import connections
from infogap.stream.core.ingest import DeadLetter
from infogap.stream.core.item_shards import ItemShards
from infogap.stream.observability import WorkerStats
from infogap.stream.settings import Settings
from infogap.stream.snapshots import SnapshotError, SnapshotStore, SnapshotTurns, snapshot_bytes
from infogap.stream.store import Store

log = logging.getLogger("infogap.items")

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
        self.store = store
        #: the shards, the population learner and what changed (the stage's logic and state)
        self.core = ItemShards(settings, config, eligible)
        #: held while applying, publishing or checkpointing, and by a rebalance: a partition's new owner
        #: starts only after the old one's last Redis write, so an older row never overwrites a newer one
        self._lock = asyncio.Lock()
        self._refill_n = 0  # rows still to write again (counted in stats.redis_rematerialise_pending)
        self._next_publish = float("-inf")  # monotonic time
        #: seconds from the last publish's start to the next one's (publish_interval_s, more under a backlog)
        self.publish_every = settings.publish_interval_s
        self._retrying = retrying
        self._redis_retrying = redis_retrying
        self._send_dead = send_dead
        self._stats = stats
        self.consumer = connections.consumer(
            settings, group_id=f"{settings.consumer_group}.items", enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024)
        self.snapshots = (SnapshotStore(settings, settings.topics.state_items, "items")
                          if settings.snapshot_interval_s > 0 else None)
        self._turns = SnapshotTurns(settings.snapshot_interval_s)
        #: set by the worker when Redis was found empty at start: the first partitions taken are written again
        self.refill_on_take = False

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
        s, core = self.settings, self.core
        core.events_ends = {}
        while not stop.is_set():
            batch = await self.consumer.getmany(timeout_ms=s.batch_timeout_ms, max_records=500)
            async with self._lock:
                for tp, records in batch.items():
                    rest = core.apply(tp.partition, records, final=False)
                    if rest:  # sequence numbers past the ends of events known: ask them, then decide
                        await self._kafka("read the end offsets of events", self._refresh_events_ends)
                        core.apply(tp.partition, rest)
                if core.dead:
                    dead, core.dead = core.dead, []
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
                await self.checkpoint(list(self.core.shards))

    async def _refresh_events_ends(self) -> None:
        topic = self.settings.topics.events
        await self.consumer._client.add_topic(topic)  # metadata of a topic this consumer does not subscribe
        tps = [TopicPartition(topic, p) for p in sorted(await connections.wait_partitions(self.consumer, topic))]
        self.core.events_ends = {tp.partition: off for tp, off in (await self.consumer.end_offsets(tps)).items()}

    async def publish(self, force: bool = False) -> None:
        """Write the changed rows (``similar``, ``nbrow``) and the population's news to the store."""
        now = time.monotonic()
        if not force and now < self._next_publish:
            return
        core, st = self.core, self._stats
        if core.refill:  # after a data loss: up to _REFILL_ROWS rows written again in this publish
            taken = core.take_refill(_REFILL_ROWS)
            self._count_refill()
            if st is not None:
                st.redis_keys_rematerialised += 2 * taken  # similar and nbrow
        spent, t = 0.0, time.thread_time()  # this thread's CPU time encoding, without the yields
        pub = core.publication(now)
        while pub.encode(_PUBLISH_CHUNK):
            spent += time.thread_time() - t
            await asyncio.sleep(0)  # a user stage in this process ranks meanwhile
            t = time.thread_time()
        spent += time.thread_time() - t
        if pub.population is not None and core.population_lost and st is not None:  # trending sets, model, momentum
            st.redis_keys_rematerialised += len(pub.population["trending"]) + 2
        if core.population is None or pub.population is not None:
            core.population_lost = False
        if pub:
            t = time.thread_time()
            await self._redis(self.store.write, **pub.write())
            spent += time.thread_time() - t  # packing and sending ~20 kB a row (waits on Redis are not CPU)
            if core.noise is not None and st is not None:  # the noise's epsilon (docs/privacy.md)
                st.privacy_epsilon_spent = dict(core.noise.spent)
                st.privacy_epsilon_today = core.noise.today(core.ledgers.values())
        # paced by the CPU time publishing took: not by the yields to a user stage in this process, nor by
        # a Redis outage the write waited through
        s = self.settings
        self.publish_every = max(s.publish_interval_s, spent / s.publish_max_share)
        # rows still to write again after a data loss: as soon as their share of the stage's time allows
        self._next_publish = now + (spent / _REFILL_SHARE if core.refill else self.publish_every)
        if st is not None:
            st.publish_interval_s = self.publish_every

    def rematerialise(self) -> int:
        """Redis lost its data (the worker found its generation marker gone): every owned row and the
        population's keys are written again (:meth:`ItemShards.rematerialise`), at most ``_REFILL_ROWS`` rows a
        publish and the first at once, so that the stage goes on applying ``cooc`` meanwhile. Returns how many
        rows are to be written again."""
        self.core.rematerialise()
        self._next_publish = float("-inf")
        return self._count_refill()

    def _count_refill(self) -> int:
        """Rows still to write again, also kept in ``stats.redis_rematerialise_pending`` (with a user stage's users)."""
        n = self.core.pending_refill()
        if self._stats is not None:
            self._stats.redis_rematerialise_pending += n - self._refill_n
        self._refill_n = n
        return n

    async def checkpoint(self, partitions: list[int]) -> None:
        """Snapshot the shards of ``partitions`` with their offsets, then commit those offsets."""
        mine = [p for p in partitions if p in self.core.shards]
        if not mine or self.snapshots is None:
            return
        offsets = {TopicPartition(self.topic, p): await self.consumer.position(TopicPartition(self.topic, p))
                   for p in mine}
        snaps = [(tp.partition, snapshot_bytes("items", tp.partition, off, self.core.state(tp.partition)))
                 for tp, off in offsets.items()]
        await self._kafka("write item snapshots", self.snapshots.save_many, snaps)
        await self._kafka("commit cooc offsets", self.consumer.commit, offsets)

    def _stop_partition(self, p: int, why: str) -> None:
        """A partition whose snapshot cannot be read is paused: its shard is never rebuilt from part of
        the stream, nor its snapshot overwritten; ``/health`` fails until a rebalance reads a good one."""
        self.core.stopped.add(p)
        self.consumer.pause(TopicPartition(self.topic, p))
        if self._stats is not None:
            self._stats.unreadable_state[f"{self.settings.topics.state_items}[{p}]"] = why[:500]
        log.error("cooc partition %d is NOT consumed: its state cannot be restored: %s. Fix or migrate the "
                  "snapshot (docs/operations.md, 'Unreadable state'), then restart the worker", p, why)

    async def release(self, partitions: list[int]) -> None:
        """Partitions revoked: publish and checkpoint their shards, then let them go."""
        async with self._lock:
            if self._stats is not None:
                for p in set(partitions) & self.core.stopped:
                    self._stats.unreadable_state.pop(f"{self.settings.topics.state_items}[{p}]", None)
            await self.publish(force=True)
            await self.checkpoint(partitions)
            self._turns.revoke(partitions)
            for p in partitions:
                self.core.release(p)
            self._count_refill()

    async def take(self, partitions: list[int]) -> None:
        """Partitions assigned: restore their snapshots and resume from the offsets they cover (under the
        lock, so that records fetched meanwhile are applied to the restored shards, not dropped)."""
        async with self._lock:
            found = await self.snapshots.load(partitions) if self.snapshots is not None else {}
            for p in partitions:
                snap = found.get(p)
                try:
                    if isinstance(snap, SnapshotError):
                        raise snap
                    if snap is None:
                        self.core.take(p)
                    else:
                        self.core.restore(p, snap.state, snap.arrays, snap.where)
                except StateError as exc:
                    self._stop_partition(p, str(exc))
                    continue
                if snap is not None:
                    self.consumer.seek(TopicPartition(self.topic, p), snap.offset)
            self._turns.assign(self.core.shards, time.monotonic())
            if self.refill_on_take:  # Redis was found empty at start: the restored shards' rows go to it again
                self.refill_on_take = False
                self.rematerialise()
            log.info("item stage took cooc partitions %s (%d from snapshots)", sorted(partitions), len(found))
