"""``infogap redteam``: a hostile producer and an unlucky operator against real worker processes.

One run, on topics, a consumer group and a Redis prefix of its own (the Kafka and Redis of ``infogap up``):

1. **Good traffic**: a catalog, users with consent, and ``G`` good events of many users, interleaved with
   everything below.
2. **Hostile records on every input topic**, in families (``RedTeam.hostile_*``): on ``events`` not JSON, deep
   nesting, ~1 MiB (up to the topic's ``max.message.bytes``), wrong types, NaN/Infinity, absurd, far-future and
   late timestamps, many distinct unknown types, oversize ids and contexts, control characters, key !=
   user_id, null keys; and events that must be applied as good (PII fields, a clock 200 s ahead, experiment
   contexts of every shape) or counted once (duplicate event ids); on ``items``, ``users``, ``erasures`` and
   ``cooc`` garbage of every shape; on ``state.users`` / ``state.items`` a pickle whose ``__reduce__`` runs
   ``touch <marker>``, random bytes and well-formed records with the wrong schema.
3. **Faults**: wrong-type values at the run's Redis keys, a second worker joining (rebalance), erasures
   (``users`` tombstones and a ``forget`` event of users with purchases) followed at once by a SIGKILL of the
   owning worker, the pre-erasure snapshot of its partition put back on ``state.users``, and a restart; all of
   the run's Redis keys deleted (a Redis that lost its data); then a crafted ``cooc`` record of valid layout
   whose indexes point outside its item list.
4. **Checks** (:func:`run` returns them; the command exits 1 if one fails): workers alive unless killed by
   the run; every good event applied exactly once (each user's event count in the final snapshots equals the
   good events sent) and every good user with recommendations in Redis; the DLQ holds exactly the hostile
   records meant for it (by source topic, partition and offset); the marker never created; erased users with
   no Redis key, in no last snapshot, and no push after their erasure; bounded ``infogap_dlq`` series and
   experiment hashes; no PII in Redis, pushes or snapshots; wrong-type keys overwritten or reported.

``--scale`` multiplies users, good events and the larger hostile families; scales 1 to 5 take under a minute
(most of it is workers starting and a SIGKILLed member's session timing out).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import random
import re
import shlex
import signal
import subprocess
import time
import uuid
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import zstandard
from aiokafka import TopicPartition

from infogap.models.events import REASON_CODES
from infogap.models.experiments import kafka_partition
from infogap.stream import connections
from infogap.stream.tools import local
from infogap.stream.tools.bench import WorkerProcess
from infogap.stream.core.erasures import ErasureLedger
from infogap.stream.settings import Settings
from infogap.stream.snapshots import MAGIC, SnapshotStore, encode

T_GOOD = "good"
#: what must become of a record: dead-lettered, applied (never dead-lettered), skipped as a duplicate or as an
#: erased user's, refused by the broker at produce time, or (state records) stopping its partition
DLQ, APPLIED, DUPLICATE, ERASED, REFUSED, STOPS = "dlq", "applied", "duplicate", "erased", "refused", "stops"
PARTITIONS = 6
EXPERIMENT = {"name": "rt", "variants": {"A": 1, "B": 1}}


@dataclass
class Sent:
    family: str
    topic: str  # contract name (events, items, ...)
    expect: str
    key: bytes | None = None
    partition: int = -1
    offset: int = -1
    error: str | None = None  # the produce error, if the broker refused it


class _Evil:
    """Unpickled, runs ``touch <marker>``: what a worker must never do with a record of a state topic."""

    def __init__(self, marker: Path):
        self.cmd = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Worker(WorkerProcess):
    """A worker process with a name, its log path kept, and whether the run killed it."""

    def __init__(self, name: str, settings: Settings, log_path: Path, env: dict[str, str]):
        super().__init__(settings, log_path, env)
        self.name, self.log_path, self.killed, self.stopped = name, log_path, False, False
        self.crash_seen = False  # a crash already reported by a check: later waits go on without it
        self.last_stats: dict | None = None

    async def poll_stats(self) -> dict | None:
        st = await self.stats()
        if st is not None:
            self.last_stats = st
        return st

    def kill(self) -> None:
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def died(self) -> bool:
        """Exited without the run's SIGKILL or SIGTERM."""
        return not self.killed and not self.stopped and self.proc.poll() is not None


class RedTeam:
    def __init__(self, base: Settings, scale: int, out: Path, seed: int = 18):
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        tag = uuid.uuid4().hex[:8]
        self.s = base.model_copy(update={"topic_prefix": f"redteam-{tag}.", "consumer_group": f"redteam-{tag}",
                                         "redis_prefix": f"redteam:{tag}:", "experiment": EXPERIMENT,
                                         "snapshot_interval_s": 1.0})
        self.scale, self.out, self.rng = scale, out, random.Random(seed)
        self.marker = (out / f"pwned-{tag}").resolve()
        self.env = {"INFOGAP_SNAPSHOT_INTERVAL_S": "1", "INFOGAP_BATCH_TIMEOUT_MS": "50",
                    "INFOGAP_PUBLISH_INTERVAL_S": "1", "INFOGAP_EXPERIMENT": orjson.dumps(EXPERIMENT).decode()}
        self.sent: list[Sent] = []
        self.good: dict[str, set[str]] = defaultdict(set)  # user -> event ids that must be applied once
        self.good_events: dict[str, dict] = {}  # event id -> event (for duplicates)
        self.workers: list[_Worker] = []
        self.checks: list[dict] = []
        self.info: dict = {"topic_prefix": self.s.topic_prefix, "redis_prefix": self.s.redis_prefix,
                           "scale": scale, "marker": str(self.marker), "phases": {}}
        self.now = time.time()
        self.pii = f"rt-pii-{tag}"
        n_users = 40 * scale
        self.users = [f"rt-u{k}" for k in range(n_users)]
        self.items = [f"rt-i{k}" for k in range(20 + 10 * scale)]
        self.v_early, self.v_tomb = "rt-victim-early", "rt-victim-tomb"
        self.v_forget = next(f"rt-victim-forget{j}" for j in range(1000)
                             if kafka_partition(f"rt-victim-forget{j}", PARTITIONS) ==
                             kafka_partition(self.v_tomb, PARTITIONS))
        self.victims = [self.v_early, self.v_tomb, self.v_forget]
        self.erased_at: dict[str, float] = {}
        self.planted_keys: dict[str, str] = {}  # Redis key -> the type infogap writes there
        self._producer = self._big = self._admin = self._probe = self._redis = None
        self._seq = 0
        self._ledger: dict[str, float] = {}  # erasure digest -> time of its last ledger record
        self.families: dict[str, dict] = {}
        self._pii_in_snapshots: set[str] = set()

    # ------------------------------------------------------------------ plumbing
    async def __aenter__(self):
        local.ensure_topics(self.s)
        self._producer = connections.producer(self.s, acks="all", linger_ms=5)
        self._big = connections.producer(self.s, acks="all", max_request_size=8 * 1024 * 1024)
        self._admin = connections.admin(self.s)
        self._probe = connections.consumer(self.s, group_id=None, enable_auto_commit=False)
        for c in (self._producer, self._big, self._admin, self._probe):
            await c.start()
        self._redis = connections.redis_async(self.s)
        return self

    async def __aexit__(self, *exc):
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGKILL)
                w.proc.wait(10)
            w._log.close()
        for c in (self._producer, self._big, self._probe):
            try:
                await c.stop()
            except Exception:  # closing is best effort
                pass
        try:
            await self._admin.delete_topics(list(self.s.topics.all().values()))
        except Exception:  # a red-team run's topics are harmless if left
            pass
        await self._admin.close()
        keys = [k async for k in self._redis.scan_iter(match=f"{self.s.redis_prefix}*", count=10_000)]
        for i in range(0, len(keys), 10_000):
            await self._redis.unlink(*keys[i:i + 10_000])
        await self._redis.aclose()

    def topic(self, name: str) -> str:
        return self.s.topics.all()[name]

    async def send(self, batch: list[tuple]) -> None:
        """Produce ``(family, topic, expect, key, value[, headers[, partition]])`` in order; records where each
        landed. Values over 900 kB go alone through a producer allowing them."""
        futures = []
        for family, name, expect, key, value, *rest in batch:
            headers, partition = (rest + [None, None])[:2]
            rec = Sent(family, name, expect, key)
            self.sent.append(rec)
            # alone, through a producer of their own: values over 900 kB, and what the broker refuses (it refuses
            # the whole batch a record is in)
            producer = self._big if expect == REFUSED or value is not None and len(value) > 900_000 else self._producer
            try:
                fut = await producer.send(self.topic(name), value, key=key, headers=headers, partition=partition)
                if producer is self._big:
                    fut = await fut  # acked (or refused) before anything else is sent through it
            except Exception as exc:  # refused, before it left or by the broker
                fut = exc
            futures.append((rec, fut))
        for rec, fut in futures:
            try:
                md = await fut if asyncio.isfuture(fut) else fut
                if isinstance(md, BaseException):
                    raise md
                rec.partition, rec.offset = md.partition, md.offset
            except Exception as exc:
                rec.error = f"{type(exc).__name__}: {exc}"[:200]

    def worker(self, name: str) -> _Worker:
        w = _Worker(name, self.s, self.out / f"redteam-{name}.log", self.env)
        self.workers.append(w)
        return w

    def live(self) -> list[_Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def check(self, name: str, ok: bool, detail: str, **counts) -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail, **counts})
        return ok

    async def ends(self, topic: str) -> dict[int, int]:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: off for tp, off in (await self._probe.end_offsets(parts)).items()}

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        got = await self._admin.list_consumer_group_offsets(group)
        return {p: max(0, got[TopicPartition(topic, p)].offset) if TopicPartition(topic, p) in got else 0
                for p in range(PARTITIONS)}

    async def behind(self, events=range(PARTITIONS), cooc=range(PARTITIONS)) -> int:
        """Events plus cooc records (of the partitions given) not yet covered by a committed offset, hence by a
        snapshot, of the workers."""
        n = 0
        for group, topic, partitions in ((self.s.consumer_group, self.topic("events"), events),
                                         (f"{self.s.consumer_group}.items", self.topic("cooc"), cooc)):
            ends, done = await self.ends(topic), await self.committed(group, topic)
            n += sum(max(0, ends[p] - done[p]) for p in partitions)
        return n

    async def wait(self, what: str, predicate, deadline_s: float = 90.0, interval: float = 0.25):
        """Await ``predicate()`` (async) while no worker died; raise TimeoutError naming ``what``."""
        end = time.monotonic() + deadline_s
        while True:
            dead = [w for w in self.workers if w.died() and not w.crash_seen]
            if dead:
                raise WorkerDied(dead[0], what)
            got = await predicate()
            if got:
                return got
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {deadline_s:.0f} s waiting for {what}")
            await asyncio.sleep(interval)

    async def caught_up(self, what: str, events=range(PARTITIONS), cooc=range(PARTITIONS),
                        deadline_s: float = 90.0) -> None:
        async def done():
            return await self.behind(events, cooc) == 0

        await self.wait(what, done, deadline_s)

    async def partitions_owned(self) -> int:
        sts = [await w.poll_stats() for w in self.live()]
        return sum(st["partitions"] for st in sts if st)

    # ------------------------------------------------------------------ good traffic
    def _event(self, user: str, typ: str | None = None, ts: float | None = None, **extra) -> dict:
        self._seq += 1
        typ = typ or self.rng.choice(["view", "view", "click", "add_to_cart", "purchase", "rate", "impression"])
        e = {"event_id": f"g-{self._seq}", "user_id": user, "type": typ,
             "ts": round(ts if ts is not None else self.now - self.rng.uniform(0, 7200), 3)}
        if typ not in ("push_open", "push_click", "forget"):
            e["item_id"] = self.rng.choice(self.items)
        if typ == "rate":
            e["rating"] = self.rng.choice([1, 2, 3, 4, 5])
        if typ == "purchase":
            e["value"] = round(self.rng.uniform(5, 50), 2)
        e.update(extra)
        return e

    def good_event(self, user: str, family: str = T_GOOD, expect: str = APPLIED, **kw) -> tuple:
        e = self._event(user, **kw)
        if expect == APPLIED:
            self.good[user].add(e["event_id"])
            self.good_events[e["event_id"]] = e
        return (family, "events", expect, user.encode(), orjson.dumps(e))

    def good_traffic(self, users: list[str], per_user: int) -> list[tuple]:
        out = [self.good_event(u) for u in users for _ in range(per_user)]
        self.rng.shuffle(out)
        return out

    def interleave(self, good: list[tuple], hostile: list[tuple]) -> list[tuple]:
        out = list(good)
        for h in hostile:
            out.insert(self.rng.randrange(len(out) + 1), h)
        return out

    def catalog(self) -> list[tuple]:
        return [(T_GOOD, "items", APPLIED, i.encode(),
                 orjson.dumps({"item_id": i, "title": f"Product {i}", "category": f"c{k % 5}",
                               "tags": [f"t{k % 7}", f"t{k % 3}"], "price": 5.0 + k, "available": True}))
                for k, i in enumerate(self.items)]

    def prefs(self, user: str, family: str = T_GOOD) -> tuple:
        return (family, "users", APPLIED, user.encode(),
                orjson.dumps({"user_id": user, "consent": {"email": True, "app": True}, "timezone": "UTC",
                              "quiet_hours": None}))

    # ------------------------------------------------------------------ hostile families
    def hostile_events(self, part: int) -> list[tuple]:
        """Hostile ``events`` records; ``part`` 1 before the rebalance, 2 after (late events and duplicates
        need earlier good events of their partitions)."""
        rng, now, u = self.rng, self.now, self.users
        out: list[tuple] = []

        def dlq(family, value, key=b"rt-u0"):
            out.append((family, "events", DLQ, key, value))

        def ev(**kw):
            base = {"event_id": f"h-{uuid.uuid4().hex[:10]}", "user_id": rng.choice(u), "type": "view",
                    "item_id": rng.choice(self.items), "ts": now - 60}
            base.update(kw)
            return {k: v for k, v in base.items() if v is not ...}

        def dj(family, **kw):
            e = ev(**kw)
            key = str(e["user_id"]).encode() if isinstance(e.get("user_id"), (str, int)) else b"rt-u0"
            dlq(family, orjson.dumps(e), key)

        if part == 1:
            for v in (b"{not json", b"\xff\xfe\xfd", b"", b'{"event_id": "x", ', b"nul", b"\x00" * 16,
                      b"<xml/>", b"{'single': 'quotes'}"):
                dlq("ev_not_json", v)
            out.append(("ev_null_value", "events", DLQ, b"rt-u1", None))
            for v in (b"[1, 2, 3]", b'"a string"', b"42", b"null", b"true"):
                dlq("ev_not_object", v)
            dlq("ev_deep_nesting", b"[" * 5000 + b"]" * 5000)
            dlq("ev_deep_nesting", orjson.dumps(ev()).replace(b'"type"', b'"context":' + b"[" * 1000
                                                                 + b"]" * 1000 + b',"type"'))
            dlq("ev_deep_nesting", b'{"a":' * 2000 + b"1" + b"}" * 2000)
            for kw in ({"user_id": ["rt-u0"]}, {"user_id": {"id": "rt-u0"}}, {"user_id": True}, {"user_id": 1.5},
                       {"event_id": None}, {"event_id": ["x"]}, {"type": 5}, {"ts": True}, {"ts": [1]},
                       {"value": "1"}, {"rating": "5", "type": "rate"}, {"item_id": {}}, {"context": "str"},
                       {"session_id": []}, {"type": None}, {"ts": None}, {"item_id": ...}):
                dj("ev_wrong_types", **kw)
            for v in (b'{"event_id":"n1","user_id":"rt-u0","type":"view","item_id":"rt-i0","ts":NaN}',
                      b'{"event_id":"n2","user_id":"rt-u0","type":"view","item_id":"rt-i0","ts":Infinity}',
                      b'{"event_id":"n3","user_id":"rt-u0","type":"view","item_id":"rt-i0","ts":-Infinity}',
                      b'{"event_id":"n4","user_id":"rt-u0","type":"view","item_id":"rt-i0","ts":1e999}',
                      b'{"event_id":"n5","user_id":"rt-u0","type":"rate","item_id":"rt-i0","ts":1.7e9,"rating":1e400}'):
                dlq("ev_nan_infinity", v)
            dj("ev_nan_infinity", value=1e300, type="purchase")
            for ts in (-1, 0, 1e20, 2 ** 63, "yesterday", "2024-11-24T12:00:00", 1e13, 315_532_800, "9" * 70,
                       now / 1e6):
                dj("ev_absurd_ts", ts=ts)
            for ahead in (86_340, 3_600, 600):  # 23 h 59 min, an hour, ten minutes ahead
                dj("ev_far_future", ts=now + ahead)
            for k in range(200 * self.scale):
                dj("ev_unknown_types", type=f"rt-type-{k}-{uuid.uuid4().hex[:6]}")
            dj("ev_unknown_types", type="x" * 65)
            for kw in ({"event_id": "e" * 300}, {"user_id": "u" * 10_000}, {"item_id": "i" * 257},
                       {"session_id": "s" * 300}, {"ts": "2024-11-24T12:00:00+00:00" + " " * 60}):
                dj("ev_oversize_ids", **kw)
            for ctx in ({"campaign": "c" * 300}, {f"k{j}": "v" for j in range(40)}, {"k" * 100: "v"},
                        {"nested": {"a": 1}}, {"list": [1]}):
                dj("ev_oversize_context", context=ctx)
            for kw in ({"event_id": "a\nb"}, {"user_id": "rt-u0\x00x"}, {"item_id": "rt-i0\x1b[31m"},
                       {"context": {"campaign": "x\ty"}}, {"context": {"a\nb": "x"}}, {"session_id": "s\x07x"},
                       {"type": "\x00view"}):
                dj("ev_control_chars", **kw)
            for _ in range(3):
                victim = rng.choice(u)
                e = self._event(victim)
                out.append(("ev_key_mismatch", "events", DLQ, b"mallory", orjson.dumps(e)))
                out.append(("ev_null_key", "events", DLQ, None, orjson.dumps(self._event(rng.choice(u)))))
            out.append(("ev_key_mismatch", "events", DLQ, b"\xff\xfe", orjson.dumps(self._event("rt-u2"))))
            out.append(("ev_key_mismatch", "events", DLQ, b"k" * 5000, orjson.dumps(self._event("rt-u3"))))
            for kw in ({"event_id": ...}, {"user_id": ...}, {"ts": ...}, {"type": ...}, {"item_id": ...}):
                dj("ev_missing_fields", **kw)
            for kw in ({"rating": -1, "type": "rate"}, {"rating": 11, "type": "rate"}, {"value": 1e10},
                       {"event_id": "   "}):
                dj("ev_bad_numbers", **kw)
            # ~1 MiB: the events topic allows up to its max.message.bytes; the DLQ copy must be cut, not dropped
            size = self.info["events_max_message_bytes"] - 1024
            pad = "x" * (size - len(orjson.dumps(ev(padding=""))))
            dlq("ev_huge", orjson.dumps(ev(user_id="rt-u4", padding=pad)), b"rt-u4")
            # applied as good: PII dropped at ingest, a clock 200 s ahead, experiment contexts of every shape
            for user in u[:5 * self.scale]:
                out.append(self.good_event(user, "ev_pii_fields", email=f"{self.pii}@example.com",
                                           phone=self.pii, ip_address=self.pii,
                                           context={"email": self.pii, "ip": self.pii, "campaign": "spring"}))
                out.append(self.good_event(user, "ev_clock_ahead_200s", ts=now + 200))
            for k in range(20 * self.scale):
                ctx = {"campaign": rng.choice(["spring", "recs", f"rt-c{k}", "a:b"]),
                       "channel": rng.choice(["email", "app", f"ch{k}", "x:y"]),
                       "variant": rng.choice(["A", "B", f"v{k}", "A:B", "none"])}
                out.append(self.good_event(rng.choice(u), "ev_experiment_contexts",
                                           typ=rng.choice(["push_click", "push_open", "impression", "click"]),
                                           context=ctx))
        else:
            for user in rng.sample(u, min(len(u), 10)):  # 3 days old after their partitions saw newer events
                late = self._event(user, ts=now - 3 * 86_400)
                out.append(("ev_late", "events", DLQ, user.encode(), orjson.dumps(late)))
            for eid in rng.sample(sorted(self.good_events), min(len(self.good_events), 10 * self.scale)):
                e = self.good_events[eid]
                out.append(("ev_duplicate_ids", "events", DUPLICATE, e["user_id"].encode(), orjson.dumps(e)))
        return out

    def hostile_items(self) -> list[tuple]:
        out: list[tuple] = []

        def dlq(family, value, key):
            out.append((family, "items", DLQ, key, value))

        dlq("it_deep_title", b'{"item_id": "rt-deep", "title": ' + b"[" * 1000 + b"]" * 1000 + b"}", b"rt-deep")
        dlq("it_tags_100k", orjson.dumps({"item_id": "rt-tags", "tags": ["a"] * 100_000}), b"rt-tags")
        dlq("it_tags_100k", orjson.dumps({"item_id": "rt-tags2", "tags": [f"{k}" for k in range(50_000)]}),
            b"rt-tags2")
        dlq("it_list_item_id", orjson.dumps({"item_id": ["rt-i0"], "title": "x"}), b'["rt-i0"]')
        dlq("it_available_string", orjson.dumps({"item_id": "rt-avail", "available": "false"}), b"rt-avail")
        dlq("it_bad_ids", orjson.dumps({"item_id": "rt-a\nb"}), b"rt-a\nb")
        dlq("it_bad_ids", orjson.dumps({"item_id": "i" * 10_000}), b"i" * 10_000)
        dlq("it_bad_ids", orjson.dumps({"item_id": "rt-k1"}), b"rt-k2")
        dlq("it_bad_fields", orjson.dumps({"item_id": "rt-p", "price": -5}), b"rt-p")
        dlq("it_bad_fields", orjson.dumps({"item_id": "rt-p2", "price": "9.5"}), b"rt-p2")
        dlq("it_bad_fields", orjson.dumps({"item_id": "rt-c", "category": "c" * 300}), b"rt-c")
        dlq("it_bad_fields", orjson.dumps({"item_id": "rt-t", "tags": ["ok", "bad\x00"]}), b"rt-t")
        dlq("it_not_json", b"{bad", b"rt-nj")
        dlq("it_not_json", b"[]", b"rt-nj2")
        dlq("it_huge", orjson.dumps({"item_id": "rt-huge", "title": "T" * 900_000}), b"rt-huge")
        for key in (b"\xff\xfe", b"rt-a\nb", b"x" * 10_000, b""):
            dlq("it_tombstone_garbage_key", None, key)
        out.append(("it_null_key", "items", REFUSED, None, orjson.dumps({"item_id": "rt-nk"})))
        for k in range(4):  # cut to their bound, applied
            i = f"rt-big{k}"
            out.append(("it_title_120kB", "items", APPLIED, i.encode(),
                        orjson.dumps({"item_id": i, "title": f"{k} " + "T" * 120_000, "category": "c0"})))
        return out

    def hostile_users(self) -> list[tuple]:
        out: list[tuple] = []

        def dlq(family, doc, key):
            out.append((family, "users", DLQ, key, doc if isinstance(doc, (bytes, type(None))) else orjson.dumps(doc)))

        dlq("us_timezone_path", {"user_id": "rt-tz", "consent": {"email": True}, "timezone": "UTC/" + "x/" * 300 + "y"},
            b"rt-tz")
        dlq("us_timezone_path", {"user_id": "rt-tz2", "timezone": "../../etc/passwd"}, b"rt-tz2")
        dlq("us_timezone_path", {"user_id": "rt-tz3", "timezone": "Mars/Olympus_Mons"}, b"rt-tz3")
        dlq("us_key_mismatch", {"user_id": "rt-u0", "consent": {"email": False}}, b"mallory")
        dlq("us_key_mismatch", {"user_id": "rt-u1", "consent": {"email": True}}, b"RT-U1")
        for consent in (["email"], {"email": "yes"}, {f"c{k}": True for k in range(100)}, {"e\nmail": True},
                        "all", 1):
            dlq("us_bad_consent", {"user_id": "rt-cons", "consent": consent}, b"rt-cons")
        for quiet in ([25, 3], "night", [1, 2, 3], [True, False]):
            dlq("us_bad_quiet_hours", {"user_id": "rt-q", "quiet_hours": quiet}, b"rt-q")
        dlq("us_not_json", b"{bad", b"rt-nj")
        dlq("us_not_json", b"[1]", b"rt-nj2")
        dlq("us_huge", {"user_id": "rt-big", "pad": "x" * 900_000}, b"rt-big")
        for key in (b"\xff\xfe", b"rt-a\x00b", b"x" * 10_000, b" "):
            dlq("us_tombstone_garbage_key", None, key)
        out.append(("us_null_key", "users", REFUSED, None, orjson.dumps({"user_id": "rt-nk"})))
        return out

    def hostile_erasures(self) -> list[tuple]:
        out = [("er_garbage_key", "erasures", DLQ, key, b"{}")
               for key in (b"not-a-digest", b"\xff\xfe", b"A" * 32, b"0" * 31, b"0" * 10_000, b"g" * 32)]
        out.append(("er_null_key", "erasures", REFUSED, None, b"{}"))
        return out

    def hostile_cooc(self) -> list[tuple]:
        rng = self.rng
        out: list[tuple] = []
        for p in range(PARTITIONS):
            out.append(("co_garbage_no_headers", "cooc", DLQ, None, rng.randbytes(64), None, p))
            out.append(("co_garbage_with_headers", "cooc", DLQ, None, rng.randbytes(200), [("source", b"0")], p))
        for src in (b"abc", b"", b"1e9", b"\xff"):
            out.append(("co_bad_source_header", "cooc", DLQ, None, b"\x00\x00\x00\x02{}", [("source", src)], 1))
        pop = [("source", b"0"), ("kind", b"population")]
        for v in (b"not json", b'{"seg": 5}', b'{"trend": [["x"]]}', b"[]", b'{"seg": [[1, {"a": "x"}, 1, 1, null]]}'):
            out.append(("co_population_garbage", "cooc", DLQ, None, v, pop, 0))
        out.append(("co_population_wrong_partition", "cooc", DLQ, None, b'{"seg": [], "trend": []}', pop, 3))
        out.append(("co_truncated", "cooc", DLQ, None, _cooc_record(self.now, 0)[:-7], [("source", b"0")], 2))
        return out

    # ------------------------------------------------------------------ faults
    async def plant_wrong_types(self) -> None:
        """Values of another Redis type at the keys infogap writes (and one it only reads)."""
        p, r = self.s.redis_prefix, self._redis
        plant = {f"{p}recs:rt-u5": ("lpush", "string"), f"{p}segment:rt-u6": ("hset", "string"),
                 f"{p}exp:rt:A": ("set", "hash"), f"{p}exp:rt:B": ("lpush", "hash"),
                 f"{p}trending": ("set", "zset"), f"{p}trending:seg:0": ("sadd", "zset"),
                 f"{p}segments:model": ("lpush", "string"), f"{p}momentum": ("hset", "string"),
                 f"{p}similar:rt-i1": ("sadd", "string"), f"{p}nbrow:rt-i2": ("lpush", "string"),
                 f"{p}nbrow-published:0": ("hset", "string"), f"{p}generation": ("lpush", "string")}
        for key, (cmd, want) in plant.items():
            await r.delete(key)
            if cmd == "set":
                await r.set(key, "rt-planted")
            elif cmd == "hset":
                await r.hset(key, "rt", "planted")
            else:
                await getattr(r, cmd)(key, "rt-planted")
            self.planted_keys[key] = want

    async def redis_keys_about(self, user: str) -> list[str]:
        return [k.decode() async for k in self._redis.scan_iter(match=f"{self.s.redis_prefix}*{user}*", count=1000)]

    async def users_without_recs(self, users) -> list[str]:
        users = list(users)
        got = await self._redis.mget([f"{self.s.redis_prefix}recs:{u}" for u in users]) if users else []
        return [u for u, v in zip(users, got) if v is None]

    async def last_snapshots(self, kind: str) -> dict:
        topic = self.topic(f"state.{kind}")
        return await SnapshotStore(self.s, topic, kind).load(list(range(PARTITIONS)))

    async def raw_latest(self, kind: str) -> dict[int, tuple[int, bytes | None]]:
        return await SnapshotStore(self.s, self.topic(f"state.{kind}"), kind).latest(list(range(PARTITIONS)))

    async def snapshot_users(self, p: int) -> list[str]:
        snap = (await SnapshotStore(self.s, self.topic("state.users"), "users").load([p])).get(p)
        return [] if snap is None or isinstance(snap, Exception) else snap.state["users"]["users"]

    async def owner_of(self, user: str) -> _Worker:
        """The live worker that processes ``user``'s partition: the one whose events_in grows after one more
        good event of the user (sent when nothing else is in flight)."""
        before = {w.name: (await w.poll_stats() or {}).get("events_in", 0) for w in self.live()}
        await self.send([self.good_event(user, typ="purchase")])

        async def moved():
            for w in self.live():
                st = await w.poll_stats()
                if st and st["events_in"] > before.get(w.name, 0):
                    return w
            return None

        return await self.wait(f"the owner of {user}'s partition", moved, 30)

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict:
        t_run = time.perf_counter()
        cfg = await self._admin.describe_configs([_topic_resource(self.topic("events"))])
        self.info["events_max_message_bytes"] = int(
            {c[0]: c[1] for c in cfg[0].resources[0][4]}.get("max.message.bytes") or 1_048_588)
        try:
            await self._phases()
        except (WorkerDied, TimeoutError) as exc:
            if isinstance(exc, WorkerDied):
                self.check("workers alive", False, f"{exc.worker.name} exited with {exc.worker.proc.returncode} "
                           f"while waiting for {exc.what}: {_traceback(exc.worker.log_path)}")
            else:
                self.check("run completed", False, str(exc))
            await self.dlq_checks()  # what the records did up to there
        self.info["worker_runs"] = [{"worker": w.name, "killed_by_run": w.killed, "exit": w.proc.poll(),
                                     **{k: (w.last_stats or {}).get(k) for k in _STATS}} for w in self.workers]
        self.info["seconds"] = round(time.perf_counter() - t_run, 1)
        self.info["marker_exists"] = self.marker.exists()
        return self.report()

    async def _phases(self) -> None:
        s, u = self.s, self.users
        t0 = time.perf_counter()
        # ---- setup: catalog, users, hostile side records already there when the first worker starts
        await self.send(self.catalog())
        await self.send([self.prefs(x) for x in u + self.victims])
        await self.send(self.hostile_items()[::2] + self.hostile_users()[::2] + self.hostile_erasures()[::2])
        await self.plant_wrong_types()
        self.worker("w1")
        await self.wait("w1 ready with 6 partitions", lambda: _eq(self.partitions_owned(), PARTITIONS), 120)
        self.info["phases"]["start"] = round(time.perf_counter() - t0, 1)

        # ---- chunk 1: good events (victims have purchases) with hostile events and side records, live
        chunk1 = self.good_traffic(u, 3) + [self.good_event(v, typ="purchase") for v in self.victims for _ in range(3)]
        await self.send(self.interleave(chunk1, self.hostile_events(1)))
        await self.send(self.hostile_items()[1::2] + self.hostile_users()[1::2] + self.hostile_erasures()[1::2]
                        + self.hostile_cooc())
        await self.caught_up("chunk 1 applied")
        # an early erasure (no crash): its partition then moves in the rebalance
        await self.send([("erase_tombstone", "users", APPLIED, self.v_early.encode(), None)])
        self.erased_at[self.v_early] = time.time()
        await self.wait("the early victim erased from Redis", lambda: _empty(self.redis_keys_about(self.v_early)), 10,
                        0.02)
        self.info["phases"]["chunk1"] = round(time.perf_counter() - t0, 1)

        # ---- a second worker joins: rebalance; chunk 2 with late events and duplicates
        w2 = self.worker("w2")
        await self.wait("w2 serving", lambda: _ge(w2.poll_stats(), "partitions", 1), 120)
        chunk2 = self.good_traffic(u, 2) + [self.good_event(v, typ="purchase") for v in (self.v_tomb, self.v_forget)]
        chunk2 += [self.good_event(self.v_early, "ev_erased_user", ERASED) for _ in range(3)]
        await self.send(self.interleave(chunk2, self.hostile_events(2)))
        await self.caught_up("chunk 2 applied")
        self.info["phases"]["rebalance+chunk2"] = round(time.perf_counter() - t0, 1)
        await self.wrong_types_check()
        gen = f"{s.redis_prefix}generation"
        if (await self._redis.type(gen)).decode() not in ("string", "none"):
            # left so, no worker could ever tell a data loss: put right, so that the loss below tests the repair
            await self._redis.delete(gen)
            self.info["generation_marker_deleted_by_run"] = True

        # ---- erasure, then at once a SIGKILL of the owner, the old snapshot put back, and a restart
        p = kafka_partition(self.v_tomb, PARTITIONS)
        await self.wait("a snapshot holding both victims' purchases",
                        lambda: _holds(self.snapshot_users(p), [self.v_tomb, self.v_forget]), 30)
        owner = await self.owner_of(self.v_tomb)
        await self.caught_up("the owner probe applied")
        old = (await self.raw_latest("users"))[p]
        forget = self._event(self.v_forget, typ="forget")
        t_erase = time.perf_counter()
        await self.send([("erase_tombstone", "users", APPLIED, self.v_tomb.encode(), None),
                         ("erase_forget", "events", APPLIED, self.v_forget.encode(), orjson.dumps(forget))])
        for v in (self.v_tomb, self.v_forget):
            await self.wait(f"{v} erased from Redis", lambda v=v: _empty(self.redis_keys_about(v)), 10, 0.01)
            self.erased_at[v] = time.time()
        self.info["erasure_to_redis_clear_s"] = round(time.perf_counter() - t_erase, 3)
        owner.kill()
        self.info["killed"] = {"worker": owner.name, "partition": p, "after_erasure_s":
                               round(time.perf_counter() - t_erase, 3)}
        await self._producer.send_and_wait(self.topic("state.users"), old[1], key=f"p{p}".encode(), partition=p)
        self.info["old_snapshot_put_back"] = {"partition": p, "offset_of_original": old[0],
                                              "holds_victims": True}
        w3 = self.worker("w3")  # the restart
        chunk3 = self.good_traffic(u, 2)
        chunk3 += [self.good_event(v, "ev_erased_user", ERASED) for v in self.victims for _ in range(2)]
        chunk3 += [self.prefs(self.v_tomb, "us_erased_user_returns")]  # ignored: an erased id stays erased
        await self.send(chunk3)
        await self.wait("w3 serving and all partitions owned",
                        lambda: _all(_ge(w3.poll_stats(), "partitions", 1), _eq(self.partitions_owned(), PARTITIONS)),
                        120)
        await self.caught_up("chunk 3 applied after the crash", deadline_s=120)
        self.info["phases"]["erasure+kill+restart+chunk3"] = round(time.perf_counter() - t0, 1)
        missing = await self.users_without_recs(u)
        self.check("every good user has recs (before the Redis loss)", not missing,
                   f"{len(u) - len(missing)} of {len(u)} users have recs; missing: {missing[:5]}",
                   users=len(u), missing=len(missing))

        # ---- Redis loses its data (every key of the run deleted): every key written again from state
        keys = [k async for k in self._redis.scan_iter(match=f"{s.redis_prefix}*", count=10_000)]
        for i in range(0, len(keys), 10_000):
            await self._redis.unlink(*keys[i:i + 10_000])
        t_loss = time.perf_counter()
        try:
            await self.wait("every good user's recs back after the Redis loss",
                            lambda: _empty(self.users_without_recs(u)), 60, 0.5)
            self.info["redis_loss_repaired_s"] = round(time.perf_counter() - t_loss, 1)
        except TimeoutError:
            self.info["redis_loss_repaired_s"] = None
        missing = await self.users_without_recs(u)
        self.check("Redis loss repaired: every good user has recs again", not missing,
                   f"{len(keys)} keys deleted; {len(u) - len(missing)} of {len(u)} users' recs back "
                   f"in {self.info['redis_loss_repaired_s']} s", keys_deleted=len(keys), missing=len(missing))
        await self.metrics_check("after the crash phase")
        await self.stop_all()
        self.info["phases"]["redis-loss+stop"] = round(time.perf_counter() - t0, 1)
        await self.snapshot_checks("after the crash phase")

        # ---- hostile state records: the partitions they land on stop loudly; nothing runs; repaired, nothing lost
        await self.state_phase()
        self.info["phases"]["state"] = round(time.perf_counter() - t0, 1)
        await self.snapshot_checks("final")
        await self.output_checks()
        # ---- last: crafted cooc records of valid layout (kept last: what they do cannot mask the checks above)
        await self.cooc_layout_probe()
        self.info["phases"]["cooc-probe"] = round(time.perf_counter() - t0, 1)
        await self.dlq_checks()

    async def stop_all(self) -> None:
        live = [w for w in self.live() if not w.killed]
        for w in live:
            await w.poll_stats()
            w.proc.send_signal(signal.SIGTERM)
        for w in live:
            try:
                await asyncio.to_thread(w.proc.wait, 60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
            w.stopped = True
            if w.proc.returncode != 0:
                self.check(f"{w.name} stopped cleanly", False, f"exit {w.proc.returncode}: {_traceback(w.log_path)}")

    # ------------------------------------------------------------------ checks
    async def wrong_types_check(self) -> None:
        logs = "".join(w.log_path.read_text(errors="replace") for w in self.workers)
        fixed, reported, neither = [], [], []
        for key, want in self.planted_keys.items():
            have = (await self._redis.type(key)).decode()
            if have in (want, "none"):
                fixed.append(key)
            elif key in logs:
                reported.append(key)
            else:
                neither.append(f"{key} ({have})")
        counted = sum([(await w.poll_stats() or {}).get("redis_wrong_type", 0) for w in self.live()])
        self.check("wrong-type Redis keys overwritten or reported", not neither,
                   f"{len(self.planted_keys)} planted: {len(fixed)} now of infogap's type (or deleted), "
                   f"{len(reported)} named in a worker log, neither: {neither}; infogap_redis_wrong_type={counted}",
                   planted=len(self.planted_keys), overwritten=len(fixed), reported=len(reported), neither=len(neither))

    async def metrics_check(self, when: str) -> None:
        series, sizes, exp = [], [], []
        async with aiohttp.ClientSession() as session:
            for w in self.live():
                async with session.get(f"http://127.0.0.1:{w.port}/metrics") as r:
                    text = await r.text()
                sizes.append(len(text))
                series.append(len([ln for ln in text.splitlines() if ln.startswith("infogap_dlq_total{")]))
        exp = sorted([k.decode() async for k in self._redis.scan_iter(match=f"{self.s.redis_prefix}exp:*")])
        allowed = {f"{self.s.redis_prefix}exp:rt:{v}" for v in ("A", "B", "none")}
        self.check(f"bounded infogap_dlq series ({when})", series and max(series) <= len(REASON_CODES),
                   f"series per worker {series} (at most {len(REASON_CODES)} reason codes); /metrics bytes {sizes}",
                   max_series=max(series, default=0), metrics_bytes=max(sizes, default=0))
        self.check(f"experiment hashes only for the experiment's variants ({when})", set(exp) <= allowed,
                   f"{len(exp)} exp hashes: {exp[:6]}", exp_hashes=len(exp))

    async def snapshot_checks(self, when: str) -> None:
        """Every good event applied exactly once (each user's n_events in the last snapshots) and no victim."""
        from infogap.models.user_state import users_from_state

        snaps = await self.last_snapshots("users")
        bad = [f"{p}: {s}" for p, s in snaps.items() if isinstance(s, Exception)]
        counts: dict[str, int] = {}
        for p, snap in snaps.items():
            if isinstance(snap, Exception):
                continue
            st = users_from_state(snap.state["users"], snap.arrays)
            counts.update(zip(st["users"], st["n_events"].tolist()))
        expected = {x: len(ids) for x, ids in self.good.items() if x not in self.victims}
        wrong = {x: (counts.get(x), n) for x, n in expected.items() if counts.get(x) != n}
        total = sum(expected.values())
        self.check(f"every good event applied exactly once ({when})", not wrong and not bad,
                   f"{total - sum(n for _, n in wrong.values())} of {total} good events of {len(expected)} users "
                   f"counted once in the last snapshots; wrong (snapshot, sent): {dict(list(wrong.items())[:5])}"
                   + (f"; unreadable: {bad}" if bad else ""), good_events=total, users=len(expected),
                   users_wrong=len(wrong))
        held = [v for v in self.victims if v in counts]
        text = {v: [] for v in self.victims}
        for kind in ("users", "items"):
            for p, snap in (await self.last_snapshots(kind)).items():
                if not isinstance(snap, Exception):
                    tree = orjson.dumps(snap.state)
                    if self.pii.encode() in tree:
                        self._pii_in_snapshots.add(f"state.{kind}[{p}]")
                    for v in self.victims:
                        if v.encode() in tree:
                            text[v].append(f"state.{kind}[{p}]")
        found = {v: w for v, w in text.items() if w}
        self.check(f"erased users in no last snapshot ({when})", not held and not found,
                   f"{len(self.victims)} erased users; held as users: {held}; id found in: {found}",
                   erased=len(self.victims))

    async def output_checks(self) -> None:
        """Erased users and PII, against Redis, the push topic and the erasure ledger; the marker."""
        s, r = self.s, self._redis
        left = {v: await self.redis_keys_about(v) for v in self.victims}
        self.check("erased users have no Redis keys", not any(left.values()),
                   f"keys left: { {v: k for v, k in left.items() if k} }", erased=len(self.victims))
        pii_at, victims_in_values, n_keys = [], [], 0
        async for key in r.scan_iter(match=f"{s.redis_prefix}*", count=1000):
            n_keys += 1
            blob = await _redis_value(r, key)
            if self.pii.encode() in blob:
                pii_at.append(key.decode())
            if any(v.encode() in blob for v in self.victims):
                victims_in_values.append(key.decode())
        ledger = await self.read_all("erasures")
        pushes = await self.read_all("push")
        after = [m for m in pushes if m.key is not None and m.key.decode(errors="replace") in self.erased_at
                 and m.timestamp / 1000 > self._ledger_time(m.key.decode())]
        before = sum(1 for m in pushes if m.key is not None and m.key.decode(errors="replace") in self.erased_at)
        self.check("no push to an erased user after the erasure", not after,
                   f"{len(pushes)} pushes; to erased users: {before} before their erasure, {len(after)} after",
                   pushes=len(pushes), pushes_after_erasure=len(after))
        pii_push = [m.offset for m in pushes if self.pii.encode() in (m.value or b"")]
        self.check("no PII in Redis, pushes or snapshots", not pii_at and not pii_push and not self._pii_in_snapshots,
                   f"{n_keys} Redis keys scanned, PII in {pii_at[:5]}; pushes with PII {len(pii_push)}; snapshots "
                   f"with PII {sorted(self._pii_in_snapshots)}", redis_keys=n_keys)
        self.check("no erased user's id in Redis values", not victims_in_values, f"in {victims_in_values[:5]}")
        ids = [m for m in ledger if m.key and any(v.encode() in m.key for v in self.victims)]
        self.check("the erasure ledger holds digests, not ids", not ids,
                   f"{len(ledger)} ledger records, {len(ids)} naming a user")

    def _ledger_time(self, user: str) -> float:
        """When the last worker recorded ``user``'s erasure (the ledger record's time), else when the run saw
        it done in Redis."""
        return self._ledger.get(self._digest(user), self.erased_at[user])

    def _digest(self, user: str) -> str:
        key = self.s.state_key or self.s.pseudonym_key
        return ErasureLedger(key.get_secret_value().encode() if key is not None else None).digest(user)

    async def read_all(self, name: str) -> list:
        topic = self.topic(name)
        consumer = connections.consumer(self.s, group_id=None, enable_auto_commit=False,
                                        max_partition_fetch_bytes=8 * 1024 * 1024)
        await consumer.start()
        out = []
        try:
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not parts:
                parts = [TopicPartition(topic, p) for p in sorted(await connections.wait_partitions(consumer, topic))]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            ends = await consumer.end_offsets(parts)
            while any([await consumer.position(tp) < ends[tp] for tp in parts]):
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(recs)
        finally:
            await consumer.stop()
        if name == "erasures":
            self._ledger = {}
            for m in out:
                k = (m.key or b"").decode(errors="replace")
                self._ledger[k] = max(self._ledger.get(k, 0.0), m.timestamp / 1000)
        return out

    async def dlq_checks(self) -> None:
        """Per family: records sent, dead-lettered (distinct sources), and what was expected."""
        dlq = await self.read_all("events.dlq")
        where = {(self.topic(x.topic), x.partition, x.offset): x for x in self.sent if x.offset >= 0}
        seen: dict[tuple, list] = defaultdict(list)
        unknown_sources = 0
        for m in dlq:
            h = {k: v for k, v in (m.headers or ())}
            try:
                src = (h["source_topic"].decode(), int(h["source_partition"]), int(h["source_offset"]))
            except (KeyError, ValueError):
                unknown_sources += 1
                continue
            seen[src].append(h.get("reason_code", b"").decode())
        families: dict[str, dict] = {}
        wrong: list[str] = []
        for x in self.sent:
            f = families.setdefault(f"{x.topic}/{x.family}", {"topic": x.topic, "family": x.family,
                                                                "expect": x.expect, "sent": 0, "dlq": 0,
                                                                "refused": 0, "dlq_copies": 0, "codes": Counter()})
            f["sent"] += 1
            if x.error is not None:
                f["refused"] += 1
                if x.expect != REFUSED:
                    wrong.append(f"{x.family}: not produced ({x.error})")
                continue
            if x.expect == REFUSED:
                wrong.append(f"{x.family}: the broker took it (offset {x.offset})")
            codes = seen.get((self.topic(x.topic), x.partition, x.offset))
            if codes:
                f["dlq"] += 1
                f["dlq_copies"] += len(codes)
                f["codes"].update(codes)
            if x.expect == DLQ and not codes:
                wrong.append(f"{x.family}: {x.topic}[{x.partition}]@{x.offset} not in the DLQ")
            elif x.expect != DLQ and codes:
                wrong.append(f"{x.family} ({x.expect}): {x.topic}[{x.partition}]@{x.offset} in the DLQ ({codes[0]})")
        ours = {src for src in seen if src in where}
        foreign = [src for src in seen if src not in where]  # dead letters of records the run did not send
        for f in families.values():
            f["codes"] = dict(f["codes"])
        self.families = families
        hostile = [x for x in self.sent if x.expect == DLQ]
        self.check("the DLQ holds exactly the hostile records meant for it", not wrong and not foreign,
                   f"{len(dlq)} DLQ records ({len(seen)} distinct sources, {len(ours)} of them sent by the run) for "
                   f"{len(hostile)} hostile records; wrong: {wrong[:8]}; from records the run did not send: "
                   f"{foreign[:5]}", dlq_records=len(dlq), hostile=len(hostile), wrong=len(wrong),
                   foreign=len(foreign))
        self.check("the marker file was never created", not self.marker.exists(), str(self.marker))

    # ------------------------------------------------------------------ state topics
    async def state_phase(self) -> None:
        """Hostile records on state.users and state.items while no worker runs; a worker starts on them."""
        saved = {kind: await self.raw_latest(kind) for kind in ("users", "items")}
        for kind in ("users", "items"):
            missing = [p for p in range(PARTITIONS) if p not in saved[kind] or saved[kind][p][1] is None]
            if missing:
                raise TimeoutError(f"state.{kind} partitions {missing} have no snapshot to put back after the test")
        evil = pickle.dumps((0, 0, _Evil(self.marker)))
        offs = {p: saved["users"][p][0] for p in range(PARTITIONS)}
        users_planted = {
            0: ("st_users_pickle_zlib", zlib.compress(pickle.dumps((0, offs[0], _Evil(self.marker))))),
            1: ("st_users_pickle_raw", pickle.dumps((1, offs[1], _Evil(self.marker)))),
            2: ("st_users_wrong_schema", encode("users", 2, 0, {"part": {"bogus": 1}, "users": {"version": 2}})),
            3: ("st_users_pickle_in_igsnap", _sealed_raw("users", 3, evil)),
        }
        items_planted = {
            0: ("st_items_pickle_zstd", zstandard.ZstdCompressor().compress(pickle.dumps((0, 0, _Evil(self.marker))))),
            1: ("st_items_random_bytes", self.rng.randbytes(4096)),
            2: ("st_items_wrong_schema", encode("items", 2, 0, {"shard": [1, 2, 3], "population": "x"})),
            4: ("st_items_random_igsnap", MAGIC + bytes([3, 0]) + self.rng.randbytes(200)),
        }
        batch = [(fam, "state.users", STOPS, f"p{p}".encode(), v, None, p) for p, (fam, v) in users_planted.items()]
        batch += [(fam, "state.items", STOPS, f"p{p}".encode(), v, None, p) for p, (fam, v) in items_planted.items()]
        await self.send(batch)
        stopped_want = ({f"{self.topic('state.users')}[{p}]" for p in users_planted}
                        | {f"{self.topic('state.items')}[{p}]" for p in items_planted})
        ends_before = await self.ends(self.topic("events"))
        w5 = self.worker("w5")
        st = await self.wait("w5 took the partitions and stopped the unreadable ones",
                             lambda: _unreadable(w5, stopped_want), 120)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{w5.port}/health") as r:
                health = (r.status, await r.json())
        healthy = [p for p in range(PARTITIONS) if p not in users_planted]
        chunk4 = self.good_traffic(self.users, 2)
        await self.send(chunk4)
        await self.caught_up("chunk 4 applied on the healthy partitions", healthy,
                             [p for p in range(PARTITIONS) if p not in items_planted])
        ends = await self.ends(self.topic("events"))
        done = await self.committed(self.s.consumer_group, self.topic("events"))
        waiting = {p: ends[p] - done[p] for p in users_planted}
        from infogap.stream.tools.state_migration import migrate

        quiet = logging.getLogger("infogap.migrate")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # its refusals are the expected outcome here
        try:
            migrated = await migrate(self.s, dry_run=True)  # unpickles through its allow-list, in this process
        finally:
            quiet.setLevel(level)
        got = set(st["unreadable_state"])
        self.check("unreadable state records stop their partitions only", got == stopped_want and health[0] == 503
                   and all(waiting[p] > 0 for p in users_planted) and w5.proc.poll() is None,
                   f"{len(batch)} hostile state records; stopped {sorted(got)}; /health {health[0]} "
                   f"{health[1].get('checks')}; events waiting on stopped partitions {waiting}; "
                   f"{sum(ends[p] - ends_before[p] for p in healthy)} applied on the others",
                   planted=len(batch), stopped=len(got))
        self.check("no code run from a state record (worker, and `infogap state migrate --dry-run`)",
                   not self.marker.exists() and migrated["refused"] >= 4 and migrated["migrated"] == 0,
                   f"marker {'CREATED' if self.marker.exists() else 'absent'}; migrate --dry-run: {migrated}",
                   migrate_refused=migrated["refused"])
        await self.stop_all()
        # an operator puts the good snapshots back (docs/operations.md): the waiting events are applied, none lost
        repair = [(f"st_{kind}_repair", f"state.{kind}", APPLIED, f"p{p}".encode(), saved[kind][p][1], None, p)
                  for kind, planted in (("users", users_planted), ("items", items_planted)) for p in planted]
        await self.send(repair)
        w6 = self.worker("w6")
        await self.wait("w6 with every partition", lambda: _eq(self.partitions_owned(), PARTITIONS), 120)
        await self.caught_up("the waiting events applied after the repair", deadline_s=120)
        st6 = await w6.poll_stats()
        missing = await self.users_without_recs(self.users)
        self.check("after the repair every partition runs, every good user has recs",
                   not st6["unreadable_state"] and not missing,
                   f"unreadable {st6['unreadable_state']}; users without recs {missing[:5]}", missing=len(missing))
        await self.metrics_check("after the state phase")
        await self.stop_all()

    async def cooc_layout_probe(self) -> None:
        """``cooc`` records that decode (valid layout) but whose indexes point past their item list."""
        w7 = self.worker("w7")
        await self.wait("w7 with every partition", lambda: _eq(self.partitions_owned(), PARTITIONS), 120)
        probe_users = [f"rt-probe{k}" for k in range(6)]
        # from a source no user stage has (99): no high-water mark skips them
        await self.send([("co_valid_layout_bad_index", "cooc", DLQ, None, _cooc_record(self.now, row),
                          [("source", b"99")], p) for p, row in zip(range(PARTITIONS), (7, 1, -5, 7, 100, 3))])
        await self.send([self.good_event(x, "probe_good", typ="purchase") for x in probe_users for _ in range(2)])
        err = None
        try:
            await self.caught_up("the probe's events and cooc records applied", deadline_s=60)
            await asyncio.sleep(1.0)
            if w7.died():
                raise WorkerDied(w7, "the cooc probe")
        except (WorkerDied, TimeoutError) as exc:
            err = exc
        again = None
        if isinstance(err, WorkerDied):  # does it die again on a restart?
            err.worker.crash_seen = True
            w8 = self.worker("w8")
            try:
                await self.wait("w8 after the crash", lambda: _eq(self.partitions_owned(), PARTITIONS), 60)
                await asyncio.sleep(5)
                again = "died again" if w8.died() else "survived"
            except (WorkerDied, TimeoutError) as exc:
                again = f"died again ({type(exc).__name__})"
        missing = await self.users_without_recs(probe_users)
        self.check("valid-layout cooc records with bad indexes: worker alive, good events after them applied",
                   err is None and not missing,
                   (f"{err.worker.name} exited {err.worker.proc.returncode}: {_traceback(err.worker.log_path)}; "
                    f"restart: {again}" if isinstance(err, WorkerDied) else f"{err}" if err else "ok")
                   + f"; probe users without recs: {len(missing)} of {len(probe_users)}")
        await self.stop_all()

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        dead = [w for w in self.workers if w.died()]
        if not any(c["check"] == "workers alive" for c in self.checks):
            crashed = [w for w in self.workers if not w.killed and w.proc.returncode not in (None, 0) and w not in dead]
            self.check("workers alive (exited only by the run's SIGKILL or SIGTERM)", not dead and not crashed,
                       f"{len(self.workers)} worker processes, {sum(w.killed for w in self.workers)} SIGKILLed by the "
                       f"run; died: {[(w.name, w.proc.returncode, _traceback(w.log_path)) for w in dead + crashed]}",
                       workers=len(self.workers))
        tracebacks = {w.name: _count_tracebacks(w.log_path) for w in self.workers}
        self.info["tracebacks_in_worker_logs"] = tracebacks
        good = sum(len(ids) for x, ids in self.good.items())
        return {"ok": all(c["ok"] for c in self.checks), "checks": self.checks,
                "counts": {"good_events": good, "good_users": len(self.good), "sent": len(self.sent),
                           "hostile": sum(1 for x in self.sent if x.family[:3] in _HOSTILE
                                          and not x.family.endswith("_repair")),
                           "families": self.families},
                "info": self.info}


class WorkerDied(Exception):
    def __init__(self, worker: _Worker, what: str):
        super().__init__(f"{worker.name} died while waiting for {what}")
        self.worker, self.what = worker, what


_HOSTILE = ("ev_", "it_", "us_", "er_", "co_", "st_")
_STATS = ("events_in", "events_ok", "dead_letters", "duplicates", "erased_users", "erased_events", "pushes",
          "redis_wrong_type", "redis_rematerialisations", "redis_keys_rematerialised", "dlq_by_reason")


def _cooc_record(now: float, row: int) -> bytes:
    from infogap.models.cooc_shard import PairDeltas

    return PairDeltas(items=["rt-i0"], row=np.array([row]), nb=np.array([0]), d=np.ones((1, 4)),
                      ts=np.array([now]), seq=np.array([1]), occ=np.array([0]), occ_ts=np.array([now]),
                      occ_pairs=np.array([1.0]), occ_seq=np.array([1])).to_bytes()


def _sealed_raw(kind: str, partition: int, body: bytes) -> bytes:
    """An IGSNAP record with a valid checksum whose body is ``body`` (here a pickle): anyone can forge one
    without INFOGAP_STATE_KEY."""
    from infogap.stream.snapshots import seal

    return seal(kind, partition, body)


def _topic_resource(topic: str):
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    return ConfigResource(ConfigResourceType.TOPIC, topic)


async def _redis_value(r, key: bytes) -> bytes:
    t = (await r.type(key)).decode()
    if t == "string":
        return await r.get(key) or b""
    if t == "hash":
        return orjson.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                             for k, v in (await r.hgetall(key)).items()})
    if t == "zset":
        return b" ".join(m for m, _ in await r.zrange(key, 0, -1, withscores=True))
    if t == "list":
        return b" ".join(await r.lrange(key, 0, -1))
    if t == "set":
        return b" ".join(await r.smembers(key))
    return b""


def _traceback(log: Path, frames: int = 5) -> str:
    """The last traceback of a worker log in one line: its last frames in the project, then the error (plain or
    as typer's rich handler prints it); else the log's last lines."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    k = text.rfind("Traceback")
    if k < 0:
        return " | ".join(ln.strip() for ln in text.strip().splitlines()[-3:])
    tail = text[k:].splitlines()
    where = [f"{Path(m[1]).name}:{m[2]} {m[3]}" for ln in tail
             if (m := re.search(r'(/[^\s"]+\.py)"?(?::|, line )(\d+),? in (\w+)', ln)) and "/site-packages/" not in m[1]
             and "/lib/python" not in m[1]]
    error = next((ln.strip() for ln in reversed(tail) if re.match(r"^\w+(\.\w+)*(Error|Exception|Exit)\b", ln.strip())),
                 tail[-1].strip())
    return " > ".join(where[-frames:]) + f": {error}"


def _count_tracebacks(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count("Traceback")
    except OSError:
        return 0


async def _eq(awaitable, n) -> bool:
    return (await awaitable) == n


async def _ge(awaitable, key: str, n) -> bool:
    st = await awaitable
    return bool(st) and st.get(key, 0) >= n


async def _all(*awaitables) -> bool:
    return all([await a for a in awaitables])


async def _empty(awaitable) -> bool:
    return not await awaitable


async def _holds(awaitable, users: list[str]) -> bool:
    got = await awaitable
    return all(x in got for x in users)


async def _unreadable(w: _Worker, want: set[str]):
    st = await w.poll_stats()
    return st if st and st["partitions"] == PARTITIONS and set(st["unreadable_state"]) >= want else None


async def run(settings: Settings, *, scale: int = 1, out: Path = Path("out/redteam")) -> dict:
    """The whole red-team run (see the module); writes ``redteam.json`` and the worker logs to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    local.up(settings)
    async with RedTeam(settings, scale, out) as rt:
        result = await rt.run()
    (out / "redteam.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2, default=str))
    return result


def family_rows(result: dict) -> list[tuple[str, ...]]:
    """(topic, family, expected, sent, dead-lettered (distinct records), refused by the broker) per family."""
    return [(f["topic"], f["family"], f["expect"], str(f["sent"]), str(f["dlq"]), str(f["refused"]))
            for _, f in sorted(result["counts"]["families"].items())]

