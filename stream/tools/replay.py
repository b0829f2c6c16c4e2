"""Publish a clickstream to Kafka: an event file or the built-in MovieLens sample.

The sample is MovieLens-100K (see :mod:`infogap.stream.tools.movielens`): items go to ``items``, each
user gets a synthetic marketing-preferences record on ``users`` (consent, time zone, quiet
hours; deterministic per user id, no PII), and the ratings go to ``events`` as ``rate``
events in timestamp order, keyed by ``user_id``.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from infogap.stream import connections
from infogap.stream.settings import Settings

_TIMEZONES = ("America/New_York", "America/Chicago", "America/Los_Angeles", "Europe/London", "Europe/Paris")


def sample_prefs(user_id: str) -> dict:
    """A deterministic synthetic ``users`` record for a sample user.

    >>> sample_prefs("u1") == sample_prefs("u1")
    True
    >>> sorted(sample_prefs("u1"))
    ['consent', 'quiet_hours', 'timezone', 'user_id']
    """
    h = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return {"user_id": user_id,
            "consent": {"email": h[0] % 10 < 7, "app": h[1] % 10 < 5, "ads": h[2] % 10 < 4},
            "timezone": _TIMEZONES[h[3] % len(_TIMEZONES)], "quiet_hours": [22, 8]}


def read_event_file(path: Path) -> Iterator[bytes]:
    """Raw lines of a JSON-lines file, as they are: bad lines are sent too (and land in the DLQ)."""
    with open(path, "rb") as fh:
        for line in fh:
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line


def _key(value: bytes | dict) -> bytes | None:
    if isinstance(value, dict):
        return str(value.get("user_id", "")).encode() or None
    try:
        uid = orjson.loads(value).get("user_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return None if uid is None else str(uid).encode()


async def publish(settings: Settings, events: Iterable[bytes | dict], *, total: int | None = None,
                  rate: float | None = None, items: Iterable[dict] = (), users: Iterable[dict] = (),
                  progress: bool = True) -> int:
    """Send items, users, then events (at ``rate`` events/s, or as fast as possible); return events sent."""
    topics = settings.topics
    producer = connections.producer(settings, linger_ms=20, max_batch_size=512 * 1024, acks="all")
    await producer.start()
    sent = 0
    try:
        pending = [await producer.send(topics.items, orjson.dumps(it), key=str(it["item_id"]).encode())
                   for it in items]
        pending += [await producer.send(topics.users, orjson.dumps(u), key=str(u["user_id"]).encode())
                    for u in users]
        await asyncio.gather(*pending)
        pending = []
        start = time.perf_counter()
        with Progress(TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]:>8.0f} ev/s"), TimeRemainingColumn(),
                      disable=not progress, transient=False) as bar:
            task = bar.add_task("events", total=total, rate=0.0)
            for ev in events:
                value = ev if isinstance(ev, (bytes, bytearray)) else orjson.dumps(ev)
                pending.append(await producer.send(topics.events, bytes(value), key=_key(ev)))
                sent += 1
                if len(pending) >= 5_000 or (rate and sent % max(1, int(rate // 20)) == 0):
                    await asyncio.gather(*pending)
                    pending = []
                    elapsed = time.perf_counter() - start
                    bar.update(task, completed=sent, rate=sent / max(elapsed, 1e-9))
                    if rate:
                        ahead = sent / rate - elapsed
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            await asyncio.gather(*pending)
            bar.update(task, completed=sent, rate=sent / max(time.perf_counter() - start, 1e-9))
    finally:
        await producer.stop()
    return sent


async def publish_sample(settings: Settings, *, limit: int | None = None, rate: float | None = None,
                         progress: bool = True) -> int:
    """Publish the MovieLens-100K sample (first ``limit`` ratings in time order)."""
    from infogap.stream.tools.movielens import load_movielens

    ml = load_movielens()
    events = ml.events if limit is None else ml.events[:limit]
    users = sorted({e["user_id"] for e in events})
    return await publish(settings, events, total=len(events), rate=rate, items=ml.items,
                         users=[sample_prefs(u) for u in users], progress=progress)
