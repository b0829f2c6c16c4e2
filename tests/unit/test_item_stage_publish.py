"""The item stage's publish pacing: under a backlog, publishing takes at most ``publish_max_share`` of its time."""
from __future__ import annotations

import asyncio
import time

from infogap.models import Engine, EngineConfig
from infogap.stream.item_stage import ItemStage
from infogap.stream.observability import WorkerStats
from infogap.stream.settings import Settings


class _SlowStore:
    """A Redis store whose every write takes ``seconds`` (a slow or unreachable Redis)."""

    def __init__(self, seconds: float):
        self.seconds, self.writes = seconds, []

    async def write(self, **kw):
        await asyncio.sleep(self.seconds)
        self.writes.append(sorted(kw["rows"]))


def _stage(store, **settings) -> ItemStage:
    """(In a running loop: the stage's Kafka consumer is made with it, and never started here.)"""
    stage = ItemStage(Settings(http_port=None, **settings), EngineConfig(), store, stats=WorkerStats())
    stage.core.take(1)
    shard = stage.core.shards[1]
    users = Engine(stage.core.config, cooc="remote")  # a user stage's engine: "a" and "b" seen together
    users.learn_many([{"user_id": "u", "item_id": i, "type": "purchase", "ts": float(t)} for t, i in enumerate("ab")])
    shard.apply(users.drain_pair_deltas(), source=0)
    return stage


async def _publish_twice(stage: ItemStage | None, force_second: bool = False, **make) -> ItemStage:
    stage = stage or _stage(**make)
    stage.core.dirty = {1: {"a"}}
    await stage.publish()
    stage.core.dirty = {1: {"b"}}
    await stage.publish(force=force_second)
    await stage.consumer.stop()
    return stage


def test_a_publish_that_encodes_slowly_pushes_the_next_one_back_to_keep_its_share_of_the_time(monkeypatch):
    import infogap.stream.core.item_shards as item_shards

    slow = item_shards.encode_row

    def encode_row(row, numbering):
        t = time.thread_time()
        while time.thread_time() - t < 0.05:  # CPU, as a publish of many rows takes
            pass
        return slow(row, numbering)

    monkeypatch.setattr(item_shards, "encode_row", encode_row)
    store = _SlowStore(0.0)
    # a 1 % share: the next publish is due 5 s after the first, far beyond any stall of a loaded machine
    stage = asyncio.run(_publish_twice(None, store=store, publish_interval_s=0.01, publish_max_share=0.01))
    assert store.writes == [["a"]]  # the second came too soon: its row waits, still dirty
    assert stage.core.dirty == {1: {"b"}}
    assert stage.publish_every >= 0.05 / 0.01
    assert stage._stats.publish_interval_s == stage.publish_every  # on /metrics and /stats


def test_waiting_on_redis_does_not_push_publishes_back():
    store = _SlowStore(0.3)  # e.g. retried through an outage
    stage = asyncio.run(_publish_twice(None, store=store, publish_interval_s=0.01, publish_max_share=0.25))
    assert stage.publish_every < 0.3 / 0.25
    assert store.writes == [["a"], ["b"]]  # the second was due again after its 0.3 s wait


def test_a_quick_publish_keeps_the_configured_interval_and_a_forced_one_always_goes():
    store = _SlowStore(0.0)
    stage = asyncio.run(_publish_twice(None, store=store, publish_interval_s=60.0, publish_max_share=0.25))
    assert store.writes == [["a"]] and stage.publish_every == 60.0
    asyncio.run(_publish_twice(stage, force_second=True))
    assert store.writes == [["a"], ["b"]]  # the first of these was not due; the forced one went


def test_after_a_redis_data_loss_every_owned_row_is_published_again_a_chunk_per_publish(monkeypatch):
    """``ItemStage.rematerialise`` (the worker found Redis emptied): rows unchanged since their last publish are
    written again, ``_REFILL_ROWS`` a publish, without waiting the publish interval; counted for /metrics."""
    import infogap.stream.item_stage as item_stage

    monkeypatch.setattr(item_stage, "_REFILL_ROWS", 1)
    store = _SlowStore(0.0)

    async def run() -> ItemStage:
        stage = _stage(store, publish_interval_s=60.0)
        await stage.publish()  # nothing changed: nothing written
        assert stage.rematerialise() == 2 and stage._stats.redis_rematerialise_pending == 2
        await stage.publish()
        assert stage._stats.redis_rematerialise_pending == 1
        await asyncio.sleep(0.1)  # paced by its CPU time (well under a millisecond), not publish_interval_s
        await stage.publish()
        await asyncio.sleep(0.1)
        await stage.publish()  # nothing left
        await stage.consumer.stop()
        return stage

    stage = asyncio.run(run())
    assert sorted(w[0] for w in store.writes) == ["a", "b"] and all(len(w) == 1 for w in store.writes), store.writes
    assert stage._stats.redis_keys_rematerialised == 4  # similar and nbrow of each
    assert stage._stats.redis_rematerialise_pending == 0 and not stage.core.refill
