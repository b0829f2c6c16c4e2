"""The erasure ledger: who was erased, kept for good as digests, so that no restore brings them back.

Erasing a user (a ``users`` tombstone or a ``forget`` event) clears the worker's memory and Redis at
once, but older copies of the user's state outlive it: the last snapshot of the user's partition (a
worker killed before its next snapshot leaves it as it was), and the events after that snapshot's
offset, which a restore replays. So every erasure is also written to the compacted ``erasures``
topic, key the user's digest (keyed BLAKE2b of the pseudonymous id: never the id itself), and every
worker reads that topic whole, like ``items`` and ``users``. Then:

- a restored partition's users are checked against it, and the erased ones forgotten before the
  partition serves anything (:meth:`infogap.stream.worker.Worker.restore_partition`);
- an event of an erased user is not learned (nor ranked, nor pushed): erasure is for good, a
  person who comes back gets a new id (the ``users`` record of an erased id is ignored too).

The ledger never shrinks: 16 bytes and a Kafka record per erased user.

>>> ledger = ErasureLedger(key=b"k" * 16)
>>> ledger.erased("u1"), ledger.add("u1"), ledger.erased("u1"), ledger.add("u1")
(False, True, True, False)
>>> len(ledger.digest("u1")), "u1" in ledger.digest("u1")
(32, False)
"""
from __future__ import annotations

import hashlib

#: the ledger record's key is this many bytes of digest, as hex
DIGEST_BYTES = 16


class ErasureLedger:
    """The digests of every erased user id, as read from (and written to) the ``erasures`` topic."""

    def __init__(self, key: bytes | None = None):
        self._key = (key or b"")[:64]
        self._digests: set[str] = set()

    def __len__(self) -> int:
        return len(self._digests)

    def digest(self, user_id: str) -> str:
        """The ledger's key of a (pseudonymous) user id: keyed BLAKE2b, hex."""
        return hashlib.blake2b(user_id.encode(), digest_size=DIGEST_BYTES, key=self._key,
                               person=b"infogap-erasure").hexdigest()

    def erased(self, user_id: str) -> bool:
        return bool(self._digests) and self.digest(user_id) in self._digests

    def add(self, user_id: str) -> bool:
        """Record an erasure; False when the user was erased already (nothing new to write)."""
        d = self.digest(user_id)
        if d in self._digests:
            return False
        self._digests.add(d)
        return True

    def apply_record(self, key: bytes | None) -> bool:
        """Take a record of the ``erasures`` topic (its key is the digest); False if it is not one."""
        try:
            d = key.decode("ascii") if key is not None else ""
        except UnicodeDecodeError:
            return False
        if len(d) != 2 * DIGEST_BYTES or not all(c in "0123456789abcdef" for c in d):
            return False
        self._digests.add(d)
        return True
