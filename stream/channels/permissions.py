"""Whom a channel worker may still contact: consent from ``users``, erasures from ``erasures``.

Every channel worker reads both compacted topics whole, as the user stage does, and reads them up to their
end offsets again before each batch of messages: a consent withdrawn (an ``unsubscribe`` event, a hard
bounce, or the app backend's own ``users`` record) or an erasure that is on its topic before a batch starts
holds for every message of that batch, including messages put on ``push`` before it. Only the channel's
consent bit is kept per user, under the pseudonymous id ``push`` messages carry.

>>> p = Permissions("email", Pseudonymizer(None), ErasureLedger())
>>> p.apply_users(b'{"user_id": "u1", "consent": {"email": true}}', b"u1"); p.why_not("u1"), p.why_not("u2")
(None, 'no_consent')
>>> p.apply_users(None, b"u1"); p.why_not("u1")
'no_consent'
"""
from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from infogap.models.push_policy import UserPrefs
from infogap.stream import connections
from infogap.stream.core.erasures import ErasureLedger
from infogap.stream.pseudonym import Pseudonymizer
from infogap.stream.settings import Settings

log = logging.getLogger("infogap.channel")


class Permissions:
    """The consent of one channel per (pseudonymous) user, and the erasure ledger."""

    def __init__(self, channel: str, pseudonymize: Pseudonymizer, ledger: ErasureLedger):
        self.channel = channel
        self.pseudonymize = pseudonymize
        self.ledger = ledger
        self._consent: dict[str, bool] = {}
        self.bad_records = 0

    def __len__(self) -> int:
        return len(self._consent)

    def apply_users(self, value: bytes | None, key: bytes | None) -> None:
        """One ``users`` record: a user's consent, or a tombstone (the user has none any more). A record that
        does not parse is skipped (the user stage sends it to the DLQ with the reason)."""
        try:
            if value is None:
                user = self.pseudonymize(key.decode("utf-8")) if key else None
                if user is not None:
                    self._consent.pop(user, None)
                return
            prefs = UserPrefs.parse(value, key)
        except (ValueError, UnicodeDecodeError):
            self.bad_records += 1
            return
        user = self.pseudonymize(prefs.user_id)
        if prefs.consent.get(self.channel) is True:
            self._consent[user] = True
        else:
            self._consent.pop(user, None)

    def why_not(self, user_id: str) -> str | None:
        """Why ``user_id`` may not get a message of this channel now (``erased``, ``no_consent``: none on record,
        or withdrawn), or None if they may."""
        if self.ledger.erased(user_id):
            return "erased"
        if not self._consent.get(user_id):
            return "no_consent"
        return None


class PermissionReader:
    """Keeps :class:`Permissions` current from the ``users`` and ``erasures`` topics (plain aiokafka)."""

    def __init__(self, settings: Settings, permissions: Permissions):
        self.settings = settings
        self.permissions = permissions
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: list[TopicPartition] = []

    async def start(self) -> None:
        t = self.settings.topics
        self._consumer = connections.consumer(self.settings, group_id=None, enable_auto_commit=False)
        await self._consumer.start()
        parts = []
        for topic in (t.erasures, t.users):
            partitions = await connections.wait_partitions(self._consumer, topic)
            parts += [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)
        self._parts = parts

    async def sync(self) -> int:
        """Apply every record up to the topics' current end offsets; the number applied."""
        consumer, n = self._consumer, 0
        ends = await consumer.end_offsets(self._parts)
        erasures = self.settings.topics.erasures
        while True:
            behind = [tp for tp in self._parts if await consumer.position(tp) < ends[tp]]
            if not behind:
                return n
            batch = await consumer.getmany(*behind, timeout_ms=200, max_records=10_000)
            for tp, recs in batch.items():
                for rec in recs:
                    if tp.topic == erasures:
                        self.permissions.ledger.apply_record(rec.key)
                    else:
                        self.permissions.apply_users(rec.value, rec.key)
                    n += 1

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
