"""The stream worker: ``events`` in micro-batches, recommendations to Redis and pushes out.

One asyncio process. The high-volume ``events`` topic is read with an aiokafka consumer
group in batches (``getmany``), offsets committed by hand only after the batch's Redis
writes, dead letters and pushes are acknowledged (at-least-once; duplicates are counted
once by ``event_id``). The compacted ``items`` and ``users`` topics are read whole by every
worker (a global table) and caught up to their end before each batch, so a catalog or
consent change produced before an event is applied before that event.

Per batch: ingest (validate, dedupe, DLQ) → ``models.Engine.learn_many`` → for each touched
user ``recommend`` → push policy → one Redis pipeline → DLQ/push produce → commit.
"""
from __future__ import annotations

import asyncio
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

from models import Engine, EngineConfig
from models.dedupe import Deduplicator
from models.events import Event, Limits
from models.experiments import FEEDBACK_TYPES, ExperimentMetrics
from models.push_policy import PushConfig, PushPolicy, UserPrefs
from stream import connections
from stream.experiments_store import ExperimentStore, experiment_from_settings, metrics_config
from stream.ingest import DeadLetter, Ingest
from stream.observability import WorkerStats, build_app, serve
from stream.pseudonym import Pseudonymizer
from stream.redis_keys import RedisKeys
from stream.redis_store import RedisStore
from stream.settings import Settings
from stream.snapshots import Snapshot, SnapshotStore

log = logging.getLogger("infogap.worker")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked and self.worker._snapshots is not None and self.worker.ready.is_set():
            await self.worker.checkpoint()

    async def on_partitions_assigned(self, assigned) -> None:
        await self.worker.on_assigned(assigned)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(half_life_days=settings.half_life_days, top_n=settings.top_n)


class Worker:
    """Consumes ``events`` (plus ``items`` and ``users``) and serves the results.

    ``clock`` gives wall-clock epoch seconds: used to reject events from the future and to
    stamp ``generated_at``. Model time always comes from the events.
    """

    def __init__(self, settings: Settings, *, engine: Engine | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.topics = settings.topics
        self.engine = engine or Engine(engine_config(settings))
        self.pseudonymize = Pseudonymizer.from_settings(settings)
        self.catalog_ids: set[str] = set()  # items published on the items topic
        self.ingest = Ingest(Limits(settings.max_event_bytes, settings.min_event_ts, settings.max_future_s,
                                    settings.allow_unknown_types),
                             Deduplicator(settings.dedupe_window_s, settings.dedupe_max_ids), self.pseudonymize,
                             max_lateness_s=settings.max_lateness_s,
                             known_item=self.catalog_ids.__contains__ if settings.unknown_items == "dlq" else None)
        self.push_policy = PushPolicy(PushConfig(min_new_items=settings.push_min_new_items,
                                                 daily_cap=dict(settings.push_daily_cap),
                                                 repeat_window_s=settings.push_repeat_window_s,
                                                 ttl_s=settings.push_ttl_s, items_per_push=settings.push_items))
        self.prefs: dict[str, UserPrefs] = {}
        self.experiment = experiment_from_settings(settings)
        self.exp_metrics = ExperimentMetrics(metrics_config(settings))
        self.exp_name = self.experiment.name if self.experiment else self.push_policy.config.campaign
        self.clock = clock
        self.stats = WorkerStats()
        self._dirty_items: set[str] = set()
        self._published_at = float("-inf")
        self.ready = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._side: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._redis: aioredis.Redis | None = None
        self._store: RedisStore | None = None
        self._side_parts: list[TopicPartition] = []

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever); always closes its connections."""
        stop = stop or asyncio.Event()
        s = self.settings
        await self._check_credentials()
        self._redis = connections.redis_async(s, socket_timeout=5, socket_connect_timeout=2)
        self._store = RedisStore(self._redis, RedisKeys(s.redis_prefix), s.recs_ttl_s)
        self._exp_store = ExperimentStore(self._redis, RedisKeys(s.redis_prefix))
        self._producer = connections.producer(s, linger_ms=5, acks="all")
        self._consumer = connections.consumer(
            s, group_id=s.consumer_group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
        self._side = connections.consumer(s, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest")
        self._snapshots = SnapshotStore(s, self.topics.state_users) if s.snapshot_interval_s > 0 else None
        http = None
        try:
            if s.http_port is not None:
                http = await serve(build_app(self.stats, {"kafka": self._kafka_ok, "redis": self._redis_ok}),
                                   s.http_host, s.http_port)
            self._consumer.subscribe([self.topics.events], listener=_Rebalance(self))
            await self._kafka_retrying("start the Kafka clients", self._start_kafka)
            await self._kafka_retrying("read items and users", self._sync_side)
            self.ready.set()
            log.info("worker ready: group=%s topic=%s", s.consumer_group, self.topics.events)
            last_snapshot = time.monotonic()
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=s.batch_timeout_ms,
                                                     max_records=s.batch_max_records)
                records = [r for recs in batch.values() for r in recs]
                await self._kafka_retrying("read items and users", self._sync_side)
                if records:
                    await self.process(records)
                    self.stats.lag = await self._lag()
                    if self._snapshots is None:
                        await self._kafka_retrying("commit offsets", self._consumer.commit)
                if self._snapshots is not None and time.monotonic() - last_snapshot >= s.snapshot_interval_s:
                    await self.checkpoint()
                    last_snapshot = time.monotonic()
            if self._snapshots is not None and self._consumer.assignment():
                await self.checkpoint()
        finally:
            closers = [self._consumer.stop, self._side.stop, self._producer.stop, self._redis.aclose]
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
        await self._assign_side()
        await self._consumer.start()

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Everything a restarted worker needs to continue exactly (items and users are re-read from Kafka)."""
        return {"engine": self.engine, "dedupe": self.ingest.dedupe, "watermarks": self.ingest.watermarks,
                "push": self.push_policy, "experiments": self.exp_metrics}

    def restore(self, state: dict) -> None:
        self.engine = state["engine"]
        self.ingest.dedupe = state["dedupe"]
        self.ingest.watermarks = state["watermarks"]
        self.push_policy = state["push"]
        self.exp_metrics = state["experiments"]

    async def checkpoint(self) -> None:
        """Snapshot the state with the offsets it covers, then commit exactly those offsets.

        The state is the whole worker's for now (one snapshot, keyed by the set of partitions it covers):
        a worker restarted with the same assignment resumes exactly; per-partition state, which lets a
        rebalance move users between workers, comes with the partitioned user stage.
        """
        assigned = sorted(self._consumer.assignment(), key=lambda tp: tp.partition)
        if not assigned:
            return
        offsets = {tp: await self._consumer.position(tp) for tp in assigned}
        snap = Snapshot(0, 0, {"partitions": [tp.partition for tp in assigned],
                               "offsets": {tp.partition: off for tp, off in offsets.items()},
                               "state": self.state()})
        t0 = time.perf_counter()
        size = await self._kafka_retrying("write a state snapshot", self._snapshots.save_many, [snap])
        await self._kafka_retrying("commit offsets", self._consumer.commit, offsets)
        log.info("checkpoint: %d bytes, offsets %s (%.2f s)", size,
                 {tp.partition: o for tp, o in offsets.items()}, time.perf_counter() - t0)

    async def on_assigned(self, assigned) -> None:
        """Restore the snapshot that covers exactly this assignment, and resume from its offsets."""
        if self._snapshots is None or not assigned:
            return
        found = (await self._snapshots.load([0])).get(0)
        if found is None:
            return
        parts = sorted(tp.partition for tp in assigned)
        if found.state["partitions"] != parts:
            log.warning("snapshot covers partitions %s, this worker got %s: starting from committed offsets",
                        found.state["partitions"], parts)
            return
        self.restore(found.state["state"])
        for tp in assigned:
            self._consumer.seek(tp, found.state["offsets"][tp.partition])
        log.info("restored the snapshot of partitions %s at offsets %s", parts, found.state["offsets"])

    async def _kafka_retrying(self, what: str, fn, *args):
        """Retry a Kafka operation through a broker outage: the worker waits, it does not die."""
        delay = 0.2
        while True:
            try:
                return await fn(*args)
            except (KafkaError, OSError) as exc:
                if isinstance(exc, KafkaError) and not getattr(exc, "retriable", True) \
                        and not isinstance(exc, (KafkaConnectionError, KafkaTimeoutError, CommitFailedError)):
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
            partitions = await self._wait_partitions(self._side, topic)
            parts += [TopicPartition(topic, p) for p in sorted(partitions)]
        self._side.assign(parts)
        await self._side.seek_to_beginning(*parts)
        self._side_parts = parts

    @staticmethod
    async def _wait_partitions(consumer: AIOKafkaConsumer, topic: str, deadline_s: float = 30.0) -> set[int]:
        end = time.monotonic() + deadline_s
        while True:
            partitions = consumer.partitions_for_topic(topic)
            if partitions:
                return partitions
            if time.monotonic() > end:
                raise RuntimeError(f"topic {topic!r} does not exist; run `infogap up` to create the topics")
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)

    async def _sync_side(self) -> None:
        """Apply ``items`` and ``users`` records up to their current end offsets."""
        side = self._side
        ends = await side.end_offsets(self._side_parts)
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
                    return
                doc = orjson.loads(rec.value)
                if not isinstance(doc, dict) or not doc.get("item_id"):
                    raise ValueError("items record must be a JSON object with 'item_id'")
                self.engine.upsert_item(doc)
                self.catalog_ids.add(str(doc["item_id"]))
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
            self.stats.count_dead(reason)
            await self._send_dead([DeadLetter(rec.value, rec.key, reason, rec.topic, rec.partition, rec.offset)])

    # ------------------------------------------------------------------ the batch
    async def process(self, records) -> None:
        """Process one micro-batch of ``events`` records end to end (all but the commit)."""
        t0 = time.perf_counter()
        now = self.clock()
        result = self.ingest.accept(records, now)
        st = self.stats
        st.events_in += len(records)
        st.duplicates += result.duplicates
        for d in result.dead:
            st.count_dead(d.reason)

        touched: dict[str, float] = {}  # user -> newest event time in this batch
        chunk_items = {e.item_id for e in result.events if e.item_id is not None}
        chunk: list[Event] = []
        erased: list[str] = []
        for e in result.events:
            if e.type == "forget":
                self._learn(chunk)
                chunk = []
                self._forget_in_memory(e.user_id)
                touched.pop(e.user_id, None)
                erased.append(e.user_id)
                continue
            chunk.append(e)
            if e.type in FEEDBACK_TYPES:
                self.exp_metrics.observe(e)
            if e.ts > touched.get(e.user_id, float("-inf")):
                touched[e.user_id] = e.ts
        self._learn(chunk)
        st.events_ok += len(result.events)

        docs, segments, pushes = [], {}, []
        top_n, version = self.settings.top_n, self.settings.model_version
        for user_id, user_ts in touched.items():
            variant = self.experiment.assign(user_id) if self.experiment else None
            recs = self.engine.recommend(user_id, n=top_n)
            seg = self.engine.segment(user_id)
            segments[user_id] = seg
            docs.append({"user_id": user_id,
                         "items": [{"item_id": r.item_id, "score": round(float(r.score), 6), "reason": r.reason}
                                   for r in recs],
                         "segment": seg, "generated_at": now, "model_version": version})
            if self.settings.push_enabled:
                prefs = self.prefs.get(user_id)
                if prefs is not None:
                    pushes += self.push_policy.decide(prefs, recs, now=user_ts, variant=variant)

        self.exp_metrics.record_sends(pushes)
        await self._redis_retrying(self._store.write, recs=docs, segments=segments, **self._serving(chunk_items))
        changed = self.exp_metrics.drain_changed()
        if changed:
            await self._redis_retrying(self._exp_store.write, self.exp_name, changed)
        for user_id in erased:
            await self._redis_retrying(self._store.erase_user, user_id)
        await self._send_all([(self.topics.push, orjson.dumps(m.to_dict()), m.user_id.encode(), None)
                              for m in pushes] + self._dead_messages(result.dead))
        done = self.clock()
        created = np.fromiter((r.timestamp for r in records if r.timestamp is not None), float)
        st.freshness_seconds.add_many(done - created / 1000.0)
        for m in pushes:
            st.pushes_by_channel[m.channel] = st.pushes_by_channel.get(m.channel, 0) + 1
        st.pushes += len(pushes)
        st.erased_users += len(erased)
        st.recs_written += len(docs)
        st.batches += 1
        st.last_batch_s = time.perf_counter() - t0
        st.batch_seconds.add(st.last_batch_s)

    def _serving(self, items: set[str]) -> dict:
        """Neighbour lists of items touched since the last publish, and trending, at most every second."""
        self._dirty_items |= items
        now = time.monotonic()
        if now - self._published_at < self.settings.publish_interval_s:
            return {}
        self._published_at = now
        similar = {i: [n._asdict() for n in self.engine.similar(i, n=self.settings.similar_n)]
                   for i in self._dirty_items}
        self._dirty_items = set()
        k = self.settings.trending_n
        trending = {None: self.engine.trending(n=k)}
        for seg in range(self.engine.config.n_segments):
            trending[seg] = self.engine.trending(n=k, segment=seg)
        return {"similar": similar, "trending": trending}

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
        self.push_policy.forget_user(user_id)
        self.exp_metrics.forget_user(user_id)
        self.prefs.pop(user_id, None)

    async def erase_user(self, user_id: str) -> None:
        """Remove every trace of a user: model state, push state, preferences and Redis keys."""
        self._forget_in_memory(user_id)
        await self._redis_retrying(self._store.erase_user, user_id)
        self.stats.erased_users += 1

    def _dead_messages(self, dead: list[DeadLetter]) -> list[tuple]:
        return [(self.topics.dlq, d.raw, d.key, d.headers()) for d in dead]

    async def _send_dead(self, dead: list[DeadLetter]) -> None:
        await self._send_all(self._dead_messages(dead))

    async def _send_all(self, messages: list[tuple]) -> None:
        """Produce ``(topic, value, key, headers)`` messages; resend those that failed until all are acked."""
        delay = 0.2
        while messages:
            futures = []
            for topic, value, key, headers in messages:
                try:
                    futures.append(await self._producer.send(topic, value, key=key, headers=headers))
                except (KafkaError, OSError) as exc:
                    futures.append(exc)
            results = [f if isinstance(f, BaseException) else None for f in futures]
            pending = [(k, f) for k, f in enumerate(futures) if not isinstance(f, BaseException)]
            done = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
            for (k, _), r in zip(pending, done):
                results[k] = r if isinstance(r, BaseException) else None
            failed = [m for m, r in zip(messages, results) if r is not None]
            if failed:
                self.stats.kafka_retries += 1
                log.warning("%d of %d messages not acknowledged (%s); resending in %.1f s", len(failed),
                            len(messages), type(next(r for r in results if r is not None)).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            messages = failed
