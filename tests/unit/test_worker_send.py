"""The worker's produce path: what the broker did not acknowledge is sent again, after a pause (fake producer)."""
from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from infogap.stream.settings import Settings
from infogap.stream.worker import Worker


class _Producer:
    """Acks every message except the first ``refuse`` deliveries, which time out."""

    def __init__(self, refuse: int, error: Exception | None = None):
        self.refuse, self.error = refuse, error or KafkaTimeoutError()
        self.acked: list[bytes] = []

    async def send(self, topic, value, key=None, headers=None, partition=None):
        fut = asyncio.get_running_loop().create_future()
        if self.refuse:
            self.refuse -= 1
            fut.set_exception(self.error)
        else:
            self.acked.append(value)
            fut.set_result(None)
        return fut


def _messages(*values: bytes) -> list[tuple]:
    return [("events.dlq", v, None, None) for v in values]


def test_messages_not_acknowledged_are_resent_after_a_pause_and_counted():
    worker = Worker(Settings(http_port=None))
    worker._producer = _Producer(refuse=2)
    t0 = asyncio.run(_timed(worker._send_all(_messages(b"a", b"b", b"c"))))
    assert worker._producer.acked == [b"c", b"a", b"b"]  # a and b timed out, then went on the resend
    assert worker.stats.kafka_retries == 1
    assert t0 >= 0.2  # the first resend waits 0.2 s: a broker outage is not hammered


def test_a_message_the_broker_can_never_take_raises_instead_of_being_resent():
    worker = Worker(Settings(http_port=None))
    worker._producer = _Producer(refuse=1, error=MessageSizeTooLargeError())
    with pytest.raises(MessageSizeTooLargeError):  # resending could never help
        asyncio.run(worker._send_all(_messages(b"huge", b"ok")))
    assert worker.stats.kafka_retries == 0


async def _timed(coro) -> float:
    loop = asyncio.get_running_loop()
    t = loop.time()
    await coro
    return loop.time() - t


def test_a_large_population_batch_goes_in_records_under_the_limit_that_teach_the_learner_the_same():
    """20,000 events in one batch made one population record of 1.5 MB, over Kafka's 1 MiB default: the
    worker stopped. Cut by event, the records are small and the learner ends where the whole batch takes it."""
    import orjson

    from infogap.models import Engine, EngineConfig
    from infogap.models.population import PopulationLearner
    from infogap.stream.tools.synthetic import SyntheticStream
    from infogap.stream.core.user_stage import population_records

    cfg = EngineConfig()
    engine = Engine(cfg, cooc="remote", population="remote")
    stream = SyntheticStream(n_users=2_000, n_items=500, groups=4, seed=5)
    engine.learn_many(stream.events(20_000, start_ts=1.7e9))
    batch = engine.drain_population()
    records = population_records(batch, limit=64 * 1024)
    assert len(records) > 4 and all(len(r) <= 64 * 1024 for r in records)
    whole, pieces = PopulationLearner(cfg), PopulationLearner(cfg)
    whole.learn(orjson.loads(orjson.dumps(batch)), source=3)
    for raw in records:
        pieces.learn(orjson.loads(raw), source=3)
    assert pieces.applied == whole.applied == len(batch["seg"]) + len(batch["trend"])
    assert pieces.model() == whole.model() and pieces.hwm == whole.hwm
    assert pieces.trending(20) == whole.trending(20)
