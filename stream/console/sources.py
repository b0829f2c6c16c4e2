"""What the console reads, and nothing it writes: the workers' HTTP endpoints, the store, the dead-letter topics.

- :class:`Sampler` asks every worker's ``/stats`` and ``/health`` (and a user stage's ``/inspect/segments``)
  every ``console_refresh_s`` and keeps the last :data:`HISTORY` samples in memory: the overview's charts and
  the segments' sizes over time. A worker that does not answer is shown down, never waited for.
- :class:`Sources` reads one user, one item, the segments, the experiments and the latest dead letters on
  demand. Per-user data comes from the store (recommendations, segment, push decisions) and from the worker that
  holds the user (``/inspect/users/{id}``); with pseudonymisation on, the id asked for is turned into its
  pseudonym first, and only the pseudonym is shown.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
import orjson
from aiokafka import TopicPartition

from infogap.models.events import PII_FIELDS
from infogap.stream import connections
from infogap.stream.pseudonym import Pseudonymizer
from infogap.stream.settings import Settings
from infogap.stream.store import Store, StoreUnavailable, open_store

log = logging.getLogger("infogap.console")

#: samples kept per worker: 10 minutes at one every 2 s
HISTORY = 300
#: a worker's answer is waited for this long
WORKER_TIMEOUT_S = 1.5
#: how often the console looks for new experiments and variants (a SCAN of the keyspace)
EXPERIMENT_LIST_S = 30.0
#: how long the console waits for Kafka (starting its consumer, metadata, one topic's tail)
KAFKA_TIMEOUT_S = 5.0
#: dead letters shown per topic, and the bytes of each shown
DLQ_SHOWN = 50
PREVIEW_BYTES = 300


class KafkaUnavailable(Exception):
    """Kafka did not answer the console (the reason: the exception's type, never a value)."""


@dataclass
class WorkerView:
    """What the console knows of one worker: its URL, the samples ``(monotonic time, /stats)``, its health."""

    url: str
    samples: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    health: dict | None = None  # the /health body; None: did not answer
    segments: dict | None = None  # /inspect/segments of a user stage

    @property
    def kind(self) -> str:
        last = self.last
        return "channel" if "channel" in last else "stream" if "events_in" in last else "unknown"

    @property
    def last(self) -> dict:
        return self.samples[-1][1] if self.samples else {}

    def rate(self, name: str) -> list[tuple[float, float]]:
        """Per-second rate of a counter between samples: ``(time, rate)``."""
        out, prev = [], None
        for t, s in self.samples:
            if prev is not None and t > prev[0] and name in s and name in prev[1]:
                out.append((t, max(0.0, (s[name] - prev[1][name]) / (t - prev[0]))))
            prev = (t, s)
        return out

    def series(self, name: str, key: str | None = None, scale: float = 1.0) -> list[tuple[float, float]]:
        """A gauge over the samples (``key``: inside a dict such as ``freshness_seconds``)."""
        out = []
        for t, s in self.samples:
            v = s.get(name)
            if key is not None:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                out.append((t, v * scale))
        return out


def summed(workers, name: str) -> dict[str, int]:
    """A counter by label (``dlq_by_reason``, ``pushes_by_channel``, ...) of the workers' last samples, summed.

    >>> w = WorkerView("a"); w.samples.append((0.0, {"dlq_by_reason": {"not_json": 2}}))
    >>> summed([w, w], "dlq_by_reason")
    {'not_json': 4}
    """
    out: dict[str, int] = {}
    for w in workers:
        for k, n in (w.last.get(name) or {}).items():
            out[k] = out.get(k, 0) + n
    return out


class Sampler:
    """Samples every worker each ``refresh_s`` in the background (:meth:`run`)."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession):
        self.settings = settings
        self.session = session
        self.workers = [WorkerView(u.rstrip("/")) for u in settings.console_workers]
        self.headers = auth_headers(settings)
        #: segment -> [(time, users)], summed over the user stages
        self.segment_sizes: dict[int, deque] = {}

    async def _get(self, url: str) -> tuple[int, dict] | None:
        headers = self.headers if "/inspect/" in url else {}  # the token goes only where it is asked for
        try:
            async with self.session.get(url, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT_S)) as r:
                body = await r.read()
                doc = orjson.loads(body) if r.content_type == "application/json" else None
                return r.status, doc if isinstance(doc, dict) else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, OSError):
            return None

    async def sample_once(self) -> None:
        now = time.monotonic()

        async def one(w: WorkerView) -> None:
            stats, health = await asyncio.gather(self._get(w.url + "/stats"), self._get(w.url + "/health"))
            if stats is not None and stats[0] == 200:
                w.samples.append((now, stats[1]))
            w.health = health[1] if health is not None else None
            if w.kind == "stream" and stats is not None:
                got = await self._get(w.url + "/inspect/segments")
                w.segments = got[1] if got is not None and got[0] == 200 else None

        await asyncio.gather(*(one(w) for w in self.workers))
        sizes: dict[int, int] = {}
        for w in self.workers:
            for seg in segment_rows(w.segments):
                sizes[seg["segment"]] = sizes.get(seg["segment"], 0) + seg["users"]
        for seg, n in sizes.items():
            self.segment_sizes.setdefault(seg, deque(maxlen=HISTORY)).append((now, n))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sample_once()
            except Exception:  # a sample lost is shown as a gap; the console goes on
                log.exception("sampling the workers failed")
            try:
                await asyncio.wait_for(stop.wait(), self.settings.console_refresh_s)
            except asyncio.TimeoutError:
                pass


def segment_rows(view) -> list[dict]:
    """The well-formed rows of a worker's ``/inspect/segments`` answer (another shape is ignored, not fatal)."""
    rows = view.get("segments") if isinstance(view, dict) else None
    if not isinstance(rows, list):
        return []
    rows = [r for r in rows if isinstance(r, dict) and type(r.get("segment")) is int and type(r.get("users")) is int]
    for r in rows:  # (a worker from before review topics has none)
        topics = r.get("topics")
        r["topics"] = {k: v for k, v in topics.items() if isinstance(k, str) and k.isdigit()
                       and isinstance(v, (int, float))} if isinstance(topics, dict) else {}
    return rows


def topic_rows(topics: list) -> list[dict]:
    """The well-formed topics of a worker's ``/inspect/segments`` answer: ``{"topic", "words", "share"}``.

    >>> topic_rows([{"topic": 0, "words": ["battery", "charge"], "share": 0.4}, {"topic": "x"}, 7])
    [{'topic': 0, 'words': ['battery', 'charge'], 'share': 0.4}]
    """
    return [{"topic": t["topic"], "words": [w for w in t["words"] if isinstance(w, str)], "share": t["share"]}
            for t in topics if isinstance(t, dict) and type(t.get("topic")) is int
            and isinstance(t.get("words"), list) and isinstance(t.get("share"), (int, float))]


def auth_headers(settings: Settings) -> dict[str, str]:
    """The token the workers' ``/inspect`` routes ask for when they are not on loopback."""
    token = settings.console_token
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}


def preview(raw: bytes | None, hidden=PII_FIELDS, text_ok: bool = True) -> str:
    """The first :data:`PREVIEW_BYTES` of a record as text, for a person; the page escapes it like any other text.

    A JSON record is shown with the values of ``hidden`` fields (PII; with pseudonymisation on, ``user_id`` too),
    at any depth and of any type, replaced by ``"…"``. Anything else is shown as text (bytes that are not UTF-8
    as U+FFFD, control characters but tab and newline as ``\\xNN``) with the string values of hidden fields cut
    out, or, when ``text_ok`` is false (pseudonymisation on: a raw id could be anywhere in it), only its length.

    >>> print(preview(b'{"email": "a@b.c", "a": 1, "user_id": 4711, "ctx": {"phone": 5}}', PII_FIELDS | {"user_id"}))
    {"email":"…","a":1,"user_id":"…","ctx":{"phone":"…"}}
    >>> print(preview(b'not json, "email": "a@b.c"\\x00<script>'))
    not json, "email": "…"\\x00<script>
    >>> preview(b"user=bob", text_ok=False)
    '(8 bytes, not JSON: not shown while ids are pseudonymised)'
    """
    if raw is None:
        return "(null)"
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if doc is not None:
        text = orjson.dumps(_redacted(doc, frozenset(h.lower() for h in hidden))).decode()
    elif not text_ok:
        return f"({len(raw)} bytes, not JSON: not shown while ids are pseudonymised)"
    else:
        text = raw[:PREVIEW_BYTES].decode("utf-8", errors="replace")
        text = _hidden_values(hidden).sub(lambda m: m[1] + '"…"', text)
    cut = len(text) > PREVIEW_BYTES or (doc is None and len(raw) > PREVIEW_BYTES)
    text = "".join(c if c.isprintable() or c in "\t\n" else f"\\x{ord(c):02x}" for c in text[:PREVIEW_BYTES])
    return text + (" …" if cut else "")


def _redacted(doc, hidden: frozenset, depth: int = 0):
    if depth > 20:
        return "…"
    if isinstance(doc, dict):
        return {k: "…" if k.lower() in hidden else _redacted(v, hidden, depth + 1) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_redacted(v, hidden, depth + 1) for v in doc]
    return doc


@functools.cache
def _hidden_values(names: frozenset) -> re.Pattern:
    """``"name": "value"`` of any of ``names`` (a value cut by the preview's end too)."""
    alt = "|".join(sorted(map(re.escape, names)))
    return re.compile(rf'("(?:{alt})"\s*:\s*)"(?:[^"\\]|\\.)*"?', re.IGNORECASE)


class Sources:
    """The console's reads (see the module)."""

    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        self.store = store or open_store(settings, socket_timeout=2.0)
        self.pseudonym = Pseudonymizer(settings.pseudonym_key)
        self.session: aiohttp.ClientSession | None = None
        self.sampler: Sampler | None = None
        self._dlq = None
        self._dlq_lock = asyncio.Lock()
        self._dlq_cache: tuple[float, dict] | None = None
        #: per kind of read ("experiments", "retention"): (when, what was read) and (when, the names found)
        self._read_cache: dict[str, tuple[float, dict]] = {}
        self._found: dict[str, tuple[float, dict | list]] = {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        self.sampler = Sampler(self.settings, self.session)

    async def close(self) -> None:
        if self._dlq is not None:
            await self._dlq.stop()
        if self.session is not None:
            await self.session.close()
        await self.store.close()

    @property
    def workers(self) -> list[WorkerView]:
        return self.sampler.workers

    # ------------------------------------------------------------------ health
    async def redis_ok(self) -> str:
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            return "up"
        except StoreUnavailable as exc:
            return f"down: {exc.reason}"
        except (asyncio.TimeoutError, OSError) as exc:
            return f"down: {type(exc).__name__}"

    async def kafka_ok(self) -> str:
        try:
            async with self._dlq_lock:
                consumer = await self._dlq_consumer()
                await asyncio.wait_for(consumer.topics(), KAFKA_TIMEOUT_S)
            return "up"
        except Exception as exc:  # any failure to reach it is the answer
            return f"down: {type(exc).__name__}"

    # ------------------------------------------------------------------ a user, an item, the segments
    def user_id(self, raw: str) -> str:
        """The id the workers keep for ``raw`` (its pseudonym when pseudonymisation is on)."""
        return self.pseudonym(raw)

    async def _inspect(self, path: str) -> dict | None:
        """The answer to ``/inspect{path}`` of the stream worker that holds it (200), asked of all at once; workers
        that did not answer the last sample are not asked."""
        asked = [w for w in self.workers if w.kind == "stream" and w.health is not None]
        for got in await asyncio.gather(*(self.sampler._get(w.url + "/inspect" + path) for w in asked)):
            if got is not None and got[0] == 200:
                return got[1]
        return None

    async def user(self, user_id: str) -> dict:
        recs, segment, decisions, held = await asyncio.gather(
            self.store.recs(user_id), self.store.segment(user_id), self.store.decisions(user_id),
            self._inspect(f"/users?id={quote(user_id, safe='')}"))
        return {"user_id": user_id, "recs": orjson.loads(recs) if recs is not None else None, "segment": segment,
                "decisions": decisions, "held": held}

    async def item(self, item_id: str) -> dict:
        similar, held = await asyncio.gather(self.store.similar(item_id),
                                             self._inspect(f"/items?id={quote(item_id, safe='')}"))
        return {"item_id": item_id, "similar": similar, "held": held}

    async def segments(self) -> dict:
        views = [w.segments for w in self.workers if w.segments]
        merged: dict[int, dict] = {}
        for view in views:
            for seg in segment_rows(view):
                m = merged.setdefault(seg["segment"], {**seg, "users": 0})
                m["users"] += seg["users"]
        trending = await asyncio.gather(*(self.store.trending(s, 5) for s in merged))
        for (s, m), top in zip(merged.items(), trending):
            m["trending"] = top
            m["history"] = list(self.sampler.segment_sizes.get(s, ()))
        topics = next((v["topics"] for v in views if isinstance(v, dict) and isinstance(v.get("topics"), list)
                       and v["topics"]), [])
        return {"segments": [merged[s] for s in sorted(merged)], "global": await self.store.trending(None, 10),
                "workers": len(views), "topics": topic_rows(topics)}

    # ------------------------------------------------------------------ experiments
    async def retention(self) -> dict:
        """Every experiment's (or push campaign's) control-group cohorts (``ig:ret``), as :meth:`_read_all` reads."""
        return await self._read_all("retention", self.store.retention_names,
                                    lambda name, _: self.store.read_retention(name))

    async def experiments(self) -> dict:
        """Every experiment's counts, as :meth:`_read_all` reads."""
        return await self._read_all("experiments", self.store.experiments, self.store.read_experiment)

    async def _read_all(self, what: str, find, read) -> dict:
        """``read(name, its variants)`` of every name ``find()`` gives (a dict of variants, or a list), those
        with data, read at most once per refresh. Which exist is a SCAN of the whole keyspace (0.36 s with
        100,000 users' keys): found again every :data:`EXPERIMENT_LIST_S` only."""
        now = time.monotonic()
        cached = self._read_cache.get(what)
        if cached is not None and now - cached[0] < self.settings.console_refresh_s:
            return cached[1]
        found = self._found.get(what)
        if found is None or now - found[0] >= EXPERIMENT_LIST_S:
            found = self._found[what] = (now, await find())
        names = found[1] if isinstance(found[1], dict) else dict.fromkeys(found[1])
        data = {}
        for name, variants in names.items():
            got = await read(name, variants)
            if got:
                data[name] = got
        self._read_cache[what] = (now, data)
        return data

    # ------------------------------------------------------------------ dead letters
    async def _dlq_consumer(self):
        """The console's one consumer (no group, never commits); call under ``_dlq_lock``."""
        if self._dlq is None:
            consumer = connections.consumer(self.settings, group_id=None, enable_auto_commit=False)
            try:
                await asyncio.wait_for(consumer.start(), KAFKA_TIMEOUT_S)
            except BaseException:
                await consumer.stop()
                raise
            self._dlq = consumer
        return self._dlq

    async def dead_letters(self) -> dict:
        """The latest :data:`DLQ_SHOWN` records of ``events.dlq`` and of ``push.dlq``, newest first, each with its
        reason, code, source and a preview; cached for one refresh. Raises :class:`KafkaUnavailable`."""
        async with self._dlq_lock:
            now = time.monotonic()
            if self._dlq_cache is not None and now - self._dlq_cache[0] < self.settings.console_refresh_s:
                return self._dlq_cache[1]
            try:
                consumer = await self._dlq_consumer()
                topics = self.settings.topics
                out = {}
                for topic in (topics.dlq, topics.push_dlq):
                    out[topic] = await asyncio.wait_for(self._tail(consumer, topic), 2 * KAFKA_TIMEOUT_S)
            except Exception as exc:
                raise KafkaUnavailable(type(exc).__name__) from None
            self._dlq_cache = (now, out)
            return out

    async def _tail(self, consumer, topic: str) -> list[dict]:
        try:
            parts = await connections.wait_partitions(consumer, topic, deadline_s=3.0)
        except RuntimeError:  # the topic does not exist (yet): nothing to show
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begins[tp], ends[tp] - DLQ_SHOWN))
        records = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any([await consumer.position(tp) < ends[tp] for tp in tps]):
            got = await consumer.getmany(*tps, timeout_ms=300, max_records=DLQ_SHOWN * len(tps))
            records += [r for rs in got.values() for r in rs if r.offset < ends[TopicPartition(r.topic, r.partition)]]
        rows = []
        hidden = PII_FIELDS | {"user_id"} if self.settings.pseudonym_key is not None else PII_FIELDS
        for r in sorted(records, key=lambda r: r.timestamp, reverse=True)[:DLQ_SHOWN]:
            h = {k: (v or b"").decode("utf-8", errors="replace")[:500] for k, v in (r.headers or ())}
            code, reason = h.get("reason_code"), h.get("reason", "")
            if code is None:  # push.dlq: the reason is in the value ({"message", "channel", "reason", "code", "at"})
                try:
                    doc = orjson.loads(r.value or b"")
                except orjson.JSONDecodeError:
                    doc = None
                if isinstance(doc, dict):
                    code, reason = str(doc.get("code", "?"))[:40], str(doc.get("reason", ""))[:500]
            rows.append({"topic": r.topic, "partition": r.partition, "offset": r.offset, "timestamp": r.timestamp / 1000,
                         "code": code or "?", "reason": reason,
                         "source": (f"{h['source_topic']}[{h.get('source_partition', '?')}]@{h.get('source_offset', '?')}"
                                    if "source_topic" in h else f"{r.topic}[{r.partition}]@{r.offset}"),
                         # the key of events.dlq is the raw user id: not shown when ids are pseudonymised
                         "key": "(hidden)" if "user_id" in hidden else preview(r.key, hidden)[:80],
                         "preview": preview(r.value, hidden, text_ok="user_id" not in hidden)})
        return rows
