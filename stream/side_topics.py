"""Compacted topics a process reads whole: from the beginning at start, then up to their end offsets whenever
asked (the user stage's ``erasures``, ``items`` and ``users`` before each batch; a channel worker's ``users``,
``erasures`` and ``suppressions``), so that a record produced before a batch holds for all of it.

Two consumers, no group: one fetches; the other only asks the end offsets, on a connection of its own. The
broker answers a connection's requests in order, and on the fetching one each answer waited behind a long
poll (20 ms a batch with ``fetch_max_wait_ms=20``, 0.2-0.5 s with the default): the largest fixed cost of a
small batch.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from infogap.stream import connections
from infogap.stream.settings import Settings


class SideTopics:
    """Reads ``topics`` whole; :meth:`sync` applies every record up to their current end offsets."""

    def __init__(self, settings: Settings, topics: Sequence[str]):
        self.settings = settings
        self.topics = list(topics)
        self._reader: AIOKafkaConsumer | None = None
        self._ends: AIOKafkaConsumer | None = None
        self.parts: list[TopicPartition] = []

    async def start(self) -> None:
        """Connect, and read every topic from its beginning (on the next :meth:`sync`)."""
        s = self.settings  # aiokafka clients are made inside the running loop
        self._reader = connections.consumer(s, group_id=None, enable_auto_commit=False,
                                            auto_offset_reset="earliest", fetch_max_wait_ms=20)
        self._ends = connections.consumer(s, group_id=None, enable_auto_commit=False)
        await self._reader.start()
        await self._ends.start()
        parts = []
        for topic in self.topics:
            parts += [TopicPartition(topic, p) for p in sorted(await connections.wait_partitions(self._reader, topic))]
        self._reader.assign(parts)
        await self._reader.seek_to_beginning(*parts)
        self.parts = parts

    async def partitions(self, topic: str) -> set[int]:
        """The partitions of ``topic`` (any topic), waiting for it to exist; asked by the consumer that is
        assigned nothing (an assigned one only learns the metadata of its own topics)."""
        return await connections.wait_partitions(self._ends, topic)

    async def sync(self, apply: Callable[[object], Awaitable[None] | None], only: str | None = None) -> int:
        """Apply (``apply(record)``, awaited when it returns an awaitable) every record of the topics (or of topic
        ``only``) up to their current end offsets, in offset order per partition; the number applied."""
        reader, n = self._reader, 0
        parts = [tp for tp in self.parts if only is None or tp.topic == only]
        ends = await self._ends.end_offsets(parts)
        while True:
            behind = [tp for tp in parts if await reader.position(tp) < ends[tp]]
            if not behind:
                return n
            batch = await reader.getmany(*behind, timeout_ms=200, max_records=10_000)
            for recs in batch.values():
                for rec in recs:
                    pending = apply(rec)
                    if pending is not None:
                        await pending
                    n += 1

    async def stop(self) -> None:
        try:
            if self._reader is not None:
                await self._reader.stop()
        finally:
            if self._ends is not None:
                await self._ends.stop()
