"""What became of each message: the values of a channel worker's ``outcomes`` table, and the worker's pace.

The table (a Faust table, backed by a compacted changelog topic) maps a ``message_id`` to one of:

* ``pending``: the worker is about to hand the message to the provider. Written, and acknowledged by Kafka,
  *before* the provider sees the message: a worker that finds ``pending`` after a restart knows the message
  may have been accepted, and asks the provider (``status_url``) or repeats it under the same idempotency key;
* ``sent``, ``bounced`` (the address refused for good), ``refused`` (the message refused for good),
  ``failed`` (transient failures until ``max_attempts``), ``skipped`` (no consent, suppressed, erased,
  expired) and ``unknown`` (in doubt, with no way to ask the provider: not repeated, so at most once): final,
  the message is never handed over again.

Values are small JSON objects (``{"s": state, "t": time, "p": partition, "k": keep until}``); a value that does
not decode is taken as ``pending`` (in doubt), never as "not sent".

>>> value = encode("sent", at=100.0, partition=2, keep_until=200.0)
>>> decode(value)["s"], is_final(decode(value)), decode(b"not json")["s"]
('sent', True, 'pending')
"""
from __future__ import annotations

import orjson

FINAL = frozenset({"sent", "bounced", "refused", "failed", "skipped", "unknown"})
STATES = FINAL | {"pending"}


def encode(state: str, at: float, partition: int, keep_until: float, why: str | None = None) -> bytes:
    """The table value of a message now in ``state``."""
    doc = {"s": state, "t": at, "p": partition, "k": keep_until}
    if why:
        doc["why"] = why[:200]
    return compact(orjson.dumps(doc))


def compact(raw: bytes) -> bytes:
    """``raw`` copied to an object of its own size. A bytes object from ``orjson.dumps`` keeps the allocation it
    was written in, about 4 kB whatever its length (measured: 4,120 bytes of RSS per kept 50-byte value), and a
    table keeps them by the million."""
    return bytes(memoryview(raw))


def decode(value: bytes | None) -> dict | None:
    """The table value as a dict (None when there is none); one that does not decode is ``pending``."""
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("s"), str) or doc["s"] not in STATES:
        return {"s": "pending", "t": 0.0, "p": 0, "k": float("inf")}
    return doc


def is_final(doc: dict | None) -> bool:
    return doc is not None and doc["s"] in FINAL


def expired(doc: dict, now: float) -> bool:
    """Whether an entry may leave the table: its message can no longer be delivered (expired, or past the
    dedupe window in replays)."""
    keep = doc.get("k")
    return isinstance(keep, (int, float)) and keep < now


class TokenBucket:
    """At most ``rate`` messages per second, in bursts of at most ``burst``: :meth:`wait` says how long to wait
    before the next one (time is an argument).

    >>> b = TokenBucket(rate=2.0, burst=1.0, now=0.0)
    >>> b.wait(0.0), b.wait(0.0), b.wait(0.5)
    (0.0, 0.5, 0.5)
    """

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, now

    def wait(self, now: float) -> float:
        """Take one token; the seconds to wait before using it (0 when one was there)."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
