"""State snapshots tied to offsets, kept in a compacted Kafka topic, in a format that runs no code.

The state of input partition ``p`` (of ``events`` for the user stage, of ``cooc`` for the item
stage) is written as one record to partition ``p`` of the stage's state topic, with the input
offset it covers. A worker commits its input offsets only right after a snapshot, so after a crash
it restores the snapshot and resumes exactly from the offset it covers: nothing lost, nothing
applied twice. Only the last record of a state partition matters (compaction keeps it).

**The record** (format 3) is ``IGSNAP``, the format byte, a flags byte, a 32-byte digest, then the
zstd-compressed body. The body is a JSON header (orjson) followed by the raw bytes of the numpy
arrays it refers to: ``{"kind", "partition", "offset", "state", "arrays": [[dtype, shape], ...]}``,
where an array in ``state`` is the object ``{"$nd": index}``. Reading builds only JSON values and
arrays of plain numeric dtypes (:data:`infogap.models.state_fields.ARRAY_DTYPES`), never objects: the
model objects are rebuilt by their own ``from_state`` against an explicit schema
(:mod:`infogap.models.state_fields`). Nothing read from the topic can run code.

The digest is HMAC-SHA256 of the kind, partition and compressed body under ``INFOGAP_STATE_KEY``
when one is set (flag bit 0), else their SHA-256 (a checksum: it catches corruption, not forgery;
the topic's ACLs must then keep other writers out, see ``deploy/kafka-acls.sh``). A worker with a
key refuses records without an HMAC; one without a key refuses records that carry one. The digest
covers the partition, so a record copied to another partition is refused too.

Records written before format 3 were pickles and are refused, with the message saying how to
migrate (``infogap state migrate``). zstd at level 1: 20k users' state in ~25 ms, in a thread.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass

import numpy as np
import orjson
import zstandard
from aiokafka import AIOKafkaProducer, TopicPartition

from infogap.models.state_fields import ARRAY_DTYPES, StateError
from infogap.stream import connections
from infogap.stream.settings import Settings

log = logging.getLogger("infogap.snapshots")

MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
#: the largest body a record may expand to (a record claiming more is refused before decompressing)
MAX_STATE_BYTES = 2 * 1024 * 1024 * 1024
FORMAT = 3
MAGIC = b"IGSNAP"
_HMAC = 1
_PREFIX = len(MAGIC) + 2 + 32
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_ARRAYS = 100_000


class SnapshotError(StateError):
    """A state record that cannot be restored; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A decoded snapshot: ``state`` is a plain tree whose arrays are in ``arrays`` (see the module)."""

    partition: int
    offset: int  # the next input offset to process after restoring
    state: object
    arrays: tuple = ()
    where: str = ""  # the record it was read from, "topic partition p offset o", for messages


class SnapshotTurns:
    """Which partition's snapshot is due: one at a time, each at most ``interval_s`` old.

    Snapshotting every partition at once stops the stage for as long as pickling all of it takes
    (~0.25 s for 20k users), the largest part of freshness p99 at 2,000 events/s. Turns are spread
    over the interval instead: the k-th of n partitions assigned together is first due k/n of an
    interval later. Time is passed in (monotonic seconds).

    >>> turns = SnapshotTurns(10.0)
    >>> turns.assign([0, 1], now=0.0)
    >>> turns.due(4.0), turns.due(5.0), turns.due(9.0), turns.due(10.0), turns.due(15.0)
    (None, 0, None, 1, 0)
    """

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._taken_at: dict[int, float] = {}

    def assign(self, partitions, now: float) -> None:
        """``partitions`` (all those the stage now holds) take turns from ``now`` on."""
        mine = sorted(partitions)
        for k, p in enumerate(mine):
            self._taken_at[p] = now - self.interval_s * (1 - (k + 1) / len(mine))

    def hurry(self, partition: int) -> None:
        """Make ``partition``'s turn due now (an erasure: its last snapshot must not hold the user for long)."""
        if partition in self._taken_at:
            self._taken_at[partition] = float("-inf")

    def revoke(self, partitions) -> None:
        for p in partitions:
            self._taken_at.pop(p, None)

    def due(self, now: float) -> int | None:
        """The partition to snapshot now (its turn is then counted as taken), or None."""
        if not self._taken_at:
            return None
        p = min(self._taken_at, key=self._taken_at.__getitem__)
        if now - self._taken_at[p] < self.interval_s:
            return None
        self._taken_at[p] = now
        return p


def snapshot_bytes(kind: str, partition: int, offset: int, state: object) -> bytes:
    """The body of a snapshot (not yet sealed): taken while its state must not change.

    ``state`` is a plain tree (see :mod:`infogap.models.state_fields`) whose numpy arrays are written as
    raw bytes after the JSON header.
    """
    arrays: list[np.ndarray] = []

    def lift(o):
        if isinstance(o, np.ndarray):
            if o.dtype not in ARRAY_DTYPES:
                raise TypeError(f"an array of {o.dtype} cannot go in a snapshot")
            arrays.append(np.ascontiguousarray(o))
            return {"$nd": len(arrays) - 1}
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"a {type(o).__name__} cannot go in a snapshot; give its state as plain values")

    try:
        tree = orjson.dumps({"kind": kind, "partition": partition, "offset": offset, "state": state},
                            default=lift)
    except TypeError as exc:  # orjson's, with lift's reason as its cause
        raise TypeError(str(exc.__cause__ or exc)) from None
    layout = orjson.dumps([[a.dtype.str, list(a.shape)] for a in arrays])
    head = len(tree).to_bytes(8, "big") + len(layout).to_bytes(8, "big") + tree + layout
    return b"".join([head, *(a.data.cast("B") if a.size else b"" for a in arrays)])


def _digest(key: bytes | None, kind: str, partition: int, payload: bytes) -> bytes:
    scope = f"{kind}:{partition}:".encode()
    if key is None:
        return hashlib.sha256(scope + payload).digest()
    return hmac.new(key, scope + payload, hashlib.sha256).digest()


def seal(kind: str, partition: int, body: bytes, key: bytes | None = None) -> bytes:
    """The record of a body: compressed with zstd level 1 (it releases the GIL) and digested."""
    payload = zstandard.ZstdCompressor(level=1).compress(body)
    flags = _HMAC if key is not None else 0
    return MAGIC + bytes([FORMAT, flags]) + _digest(key, kind, partition, payload) + payload


def encode(kind: str, partition: int, offset: int, state: object, key: bytes | None = None) -> bytes:
    """A whole record at once (tests and tools; the worker takes the body under its lock and seals it later).

    >>> rec = encode("users", 3, 42, {"x": np.arange(3), "t": "-inf"})
    >>> snap = decode(rec, "users", 3); snap.offset, snap.state["t"], snap.arrays[0].tolist()
    (42, '-inf', [0, 1, 2])
    """
    return seal(kind, partition, snapshot_bytes(kind, partition, offset, state), key)


def decode(blob: bytes, kind: str, partition: int, key: bytes | None = None) -> Snapshot:
    """The snapshot in a record of ``kind`` read from ``partition``; :class:`SnapshotError` if it cannot be
    trusted or read. Checks the digest before decompressing anything."""
    if not isinstance(blob, (bytes, bytearray)) or not blob:
        raise SnapshotError("the record is empty")
    if not blob.startswith(MAGIC):
        if blob[:4] == _ZSTD_MAGIC or blob[:1] == b"x":
            raise SnapshotError("a pickle written by infogap before snapshot format 3; it is not read, because a "
                                "pickle can run code. If this topic was written only by your own workers, stop "
                                "them and run `infogap state migrate` once to rewrite it in format 3")
        raise SnapshotError("not an infogap snapshot (no IGSNAP header)")
    if len(blob) < _PREFIX:
        raise SnapshotError("the record is cut short")
    fmt, flags = blob[len(MAGIC)], blob[len(MAGIC) + 1]
    if fmt != FORMAT:
        raise SnapshotError(f"snapshot format {fmt}; this infogap reads format {FORMAT} (a newer version wrote "
                            "it: run that version, or let it write a new snapshot first)")
    digest, payload = blob[len(MAGIC) + 2:_PREFIX], bytes(blob[_PREFIX:])
    if flags & _HMAC and key is None:
        raise SnapshotError("the snapshot is signed (HMAC) and this worker has no INFOGAP_STATE_KEY to check it")
    if key is not None and not flags & _HMAC:
        raise SnapshotError("the snapshot is not signed and INFOGAP_STATE_KEY is set: refused (written by a "
                            "worker without the key, or by someone else)")
    if not hmac.compare_digest(digest, _digest(key, kind, partition, payload)):
        what = "HMAC" if key is not None else "checksum"
        raise SnapshotError(f"the {what} does not match: the record was altered, is corrupt, was written for "
                            f"another partition, or with another key")
    try:
        size = zstandard.frame_content_size(payload)
        if size < 0 or size > MAX_STATE_BYTES:
            raise SnapshotError(f"the body would be {size} bytes; at most {MAX_STATE_BYTES} are read")
        body = zstandard.ZstdDecompressor().decompress(payload)
    except zstandard.ZstdError as exc:
        raise SnapshotError(f"cannot decompress: {exc}") from None
    return _parse(body, kind, partition)


def _parse(body: bytes, kind: str, partition: int) -> Snapshot:
    try:
        n_tree, n_layout = int.from_bytes(body[:8], "big"), int.from_bytes(body[8:16], "big")
        if 16 + n_tree + n_layout > len(body):
            raise SnapshotError("the header runs past the body")
        head = orjson.loads(body[16:16 + n_tree])
        layout = orjson.loads(body[16 + n_tree:16 + n_tree + n_layout])
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"the header is not JSON: {exc}") from None
    if not isinstance(head, dict) or not isinstance(layout, list) or len(layout) > _MAX_ARRAYS:
        raise SnapshotError("the header is not a snapshot's")
    if head.get("kind") != kind or head.get("partition") != partition:
        raise SnapshotError(f"a {head.get('kind')!r} snapshot of partition {head.get('partition')!r}, "
                            f"found where {kind!r} partition {partition} was expected")
    offset = head.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise SnapshotError(f"bad offset {offset!r}")
    arrays, pos = [], 16 + n_tree + n_layout
    for entry in layout:
        try:
            dtype, shape = np.dtype(entry[0]), tuple(int(n) for n in entry[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise SnapshotError(f"bad array layout {str(entry)[:80]}: {exc}") from None
        if dtype not in ARRAY_DTYPES or any(n < 0 for n in shape):
            raise SnapshotError(f"an array of {dtype} {shape} is not allowed in a snapshot")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if pos + size > len(body):
            raise SnapshotError("an array runs past the body")
        arrays.append(np.frombuffer(body, dtype, size // dtype.itemsize, pos).reshape(shape).copy())
        pos += size
    return Snapshot(partition, offset, head.get("state"), tuple(arrays))


class SnapshotStore:
    """Save and load the latest snapshot per partition of one state topic (``kind``: users or items)."""

    def __init__(self, settings: Settings, topic: str, kind: str):
        self.settings = settings
        self.topic = topic
        self.kind = kind
        self.key = settings.state_key.get_secret_value().encode() if settings.state_key is not None else None
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = connections.producer(self.settings, acks="all", max_request_size=MAX_SNAPSHOT_BYTES)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def save_many(self, snapshots: list[tuple[int, bytes]]) -> int:
        """Write ``(partition, snapshot_bytes(...))`` pairs and wait until Kafka has them all; returns
        the bytes written."""
        futures, size = [], 0
        for partition, body in snapshots:
            blob = await asyncio.to_thread(seal, self.kind, partition, body, self.key)  # the loop goes on
            if len(blob) > MAX_SNAPSHOT_BYTES:
                raise ValueError(f"snapshot of partition {partition} is {len(blob)} bytes, over "
                                 f"{MAX_SNAPSHOT_BYTES}: add partitions or workers so each holds less state")
            size += len(blob)
            futures.append(await self._producer.send(self.topic, blob, key=f"p{partition}".encode(),
                                                     partition=partition))
        for f in futures:
            await f
        return size

    async def load(self, partitions: list[int]) -> dict[int, Snapshot | SnapshotError]:
        """The latest snapshot of each partition that has one, or the error that keeps it from being read
        (its message names the topic, partition and offset). Each partition is decoded on its own."""
        if not partitions:
            return {}
        out: dict[int, Snapshot | SnapshotError] = {}
        for p, (offset, value) in (await self.latest(partitions)).items():
            where = f"snapshot at {self.topic} partition {p} offset {offset}"
            try:
                if value is None:
                    raise SnapshotError("a tombstone (null value); a partition's state is never reset silently")
                snap = await asyncio.to_thread(decode, value, self.kind, p, self.key)
                out[p] = Snapshot(snap.partition, snap.offset, snap.state, snap.arrays, where)
            except SnapshotError as exc:
                out[p] = SnapshotError(f"{where}: {exc}")
        return out

    async def latest(self, partitions: list[int]) -> dict[int, tuple[int, bytes | None]]:
        """The last record of each of ``partitions`` that has one: ``{partition: (offset, value)}``."""
        consumer = connections.consumer(self.settings, group_id=None, enable_auto_commit=False,
                                        max_partition_fetch_bytes=MAX_SNAPSHOT_BYTES,
                                        fetch_max_bytes=MAX_SNAPSHOT_BYTES)
        await consumer.start()
        out: dict[int, tuple[int, bytes | None]] = {}
        try:
            tps = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            wanted = {tp: ends[tp] - 1 for tp in tps if ends[tp] > 0}
            for tp, last in wanted.items():
                consumer.seek(tp, last)
            while wanted:
                batch = await consumer.getmany(*wanted, timeout_ms=1000)
                for tp, records in batch.items():
                    for rec in records:
                        if rec.offset >= wanted.get(tp, float("inf")):
                            out[tp.partition] = (rec.offset, rec.value)
                            wanted.pop(tp, None)
        finally:
            await consumer.stop()
        return out
