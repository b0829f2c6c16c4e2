"""Whom a channel worker may still contact: consent from ``users``, erasures from ``erasures``, and the
suppression list from ``suppressions``.

Every channel worker reads the three compacted topics whole, as the user stage reads the first two, and reads
them up to their end offsets again before each batch of messages and each round of retries: a consent
withdrawn (an ``unsubscribe`` event, a hard bounce, or the app backend's own ``users`` record), an erasure or
a suppression that is on its topic before then holds for every message after, including messages put on
``push`` before it. Only the channel's consent bit is kept per user, under the pseudonymous id ``push``
messages carry.

The suppression list is shared by every channel worker of every channel: its records are keyed by a keyed
digest of (channel, user id) (:meth:`Permissions.suppression_key`, never the id), written by the worker that
saw the hard bounce or served the unsubscribe link, and never deleted by infogap.

>>> p = Permissions("email", Pseudonymizer(None), ErasureLedger())
>>> p.apply_users(b'{"user_id": "u1", "consent": {"email": true}}', b"u1"); p.why_not("u1"), p.why_not("u2")
(None, 'no_consent')
>>> p.apply_users(None, b"u1"); p.why_not("u1")
'no_consent'
"""
from __future__ import annotations

import hashlib
import logging

from infogap.models.push_policy import UserPrefs
from infogap.stream.channels import unsubscribe
from infogap.stream.core.erasures import ErasureLedger
from infogap.stream.pseudonym import Pseudonymizer
from infogap.stream.settings import TOPIC_PARTITIONS, Settings
from infogap.stream.side_topics import SideTopics

log = logging.getLogger("infogap.channel")


class Permissions:
    """The consent of one channel per (pseudonymous) user, and the erasure ledger."""

    def __init__(self, channel: str, pseudonymize: Pseudonymizer, ledger: ErasureLedger,
                 suppression_key: bytes = b""):
        self.channel = channel
        self.pseudonymize = pseudonymize
        self.ledger = ledger
        self._consent: dict[str, bool] = {}
        self._suppression_key = unsubscribe.subkey(suppression_key, b"suppression")
        self.suppressed: set[bytes] = set()
        self.bad_records = 0

    def suppression_key(self, user_id: str, channel: str | None = None) -> bytes:
        """The suppression list's key of a user on a channel (this one by default): keyed BLAKE2b, hex."""
        return hashlib.blake2b(f"{channel or self.channel}|{user_id}".encode(), digest_size=16,
                               key=self._suppression_key, person=b"infogap-suppress").hexdigest().encode()

    def apply_suppression(self, key: bytes | None, value: bytes | None) -> None:
        """One ``suppressions`` record (its key is the digest; a tombstone lifts it: an operator's decision)."""
        if key is None or len(key) != 32:
            return
        if value is None:
            self.suppressed.discard(bytes(key))
        else:
            self.suppressed.add(bytes(key))

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
        or withdrawn; ``suppressed``), or None if they may."""
        if self.ledger.erased(user_id):
            return "erased"
        if not self._consent.get(user_id):
            return "no_consent"
        if self.suppression_key(user_id) in self.suppressed:
            return "suppressed"
        return None


class PermissionReader:
    """Keeps :class:`Permissions` current from the ``users``, ``erasures`` and ``suppressions`` topics."""

    def __init__(self, settings: Settings, permissions: Permissions):
        self.settings = settings
        self.permissions = permissions
        t = settings.topics
        self._side = SideTopics(settings, (t.erasures, t.users, t.suppressions))

    async def start(self) -> None:
        await self._side.start()
        push = await self._side.partitions(self.settings.topics.push)
        if len(push) != TOPIC_PARTITIONS["push"]:  # the outcomes table is partitioned like push, by count
            raise ValueError(f"topic {self.settings.topics.push} has {len(push)} partitions; channel workers need "
                             f"{TOPIC_PARTITIONS['push']} (the partitions of their outcomes table)")

    async def sync(self) -> int:
        """Apply every record up to the topics' current end offsets; the number applied."""
        return await self._side.sync(self._apply)

    def _apply(self, rec) -> None:
        t = self.settings.topics
        if rec.topic == t.erasures:
            self.permissions.ledger.apply_record(rec.key)
        elif rec.topic == t.suppressions:
            self.permissions.apply_suppression(rec.key, rec.value)
        else:
            self.permissions.apply_users(rec.value, rec.key)

    async def stop(self) -> None:
        await self._side.stop()
