"""Health and metrics of a worker over HTTP: ``/health``, ``/metrics`` (Prometheus) and ``/stats`` (JSON).

``/health`` answers 200 only while both Kafka and Redis answer (checked live, with a short timeout) and
the worker reports no fault (Redis refusing its writes, batches stalled while input waits), else 503 with
what is down and, where known, why (``reasons``). ``/stats`` gives the counters and freshness percentiles
that ``infogap bench`` reads.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields

import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from infogap.models.events import REASON_CODES, ReasonCode

log = logging.getLogger("infogap.http")
#: the DLQ metric's label values, as plain strings: the fixed set of reason codes
_DLQ_LABELS = {str(c): str(c) for c in REASON_CODES}


class Reservoir:
    """The last ``size`` samples of a latency, for percentiles (a ring buffer).

    >>> r = Reservoir(4)
    >>> for x in (1.0, 2.0, 3.0, 4.0, 5.0): r.add(x)
    >>> r.percentiles((50,)), r.count
    ({'p50': 3.5}, 5)
    >>> r.add_many(np.array([6.0, 7.0, 8.0, 9.0, 10.0, 11.0])); sorted(r.values().tolist()), r.count
    ([8.0, 9.0, 10.0, 11.0], 11)
    """

    def __init__(self, size: int = 100_000):
        self._buf = np.zeros(size)
        self._n = 0
        self.count = 0
        self.total = 0.0

    def add(self, x: float) -> None:
        self._buf[self._n % len(self._buf)] = x
        self._n += 1
        self.count += 1
        self.total += x

    def add_many(self, xs: np.ndarray) -> None:
        """Add an array of samples at once (vectorised)."""
        n = len(xs)
        if not n:
            return
        size = len(self._buf)
        tail = xs[-size:]
        self._buf[(self._n + n - len(tail) + np.arange(len(tail))) % size] = tail
        self._n += n
        self.count += n
        self.total += float(xs.sum())

    def values(self) -> np.ndarray:
        return self._buf[: min(self._n, len(self._buf))]

    def percentiles(self, ps=(50, 95, 99)) -> dict[str, float]:
        v = self.values()
        if not len(v):
            return {}
        return {f"p{p}": float(x) for p, x in zip(ps, np.percentile(v, ps))}


@dataclass
class WorkerStats:
    """What the worker did; the single source of the counters on ``/metrics`` and ``/stats``."""

    events_in: int = 0
    events_ok: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    erased_users: int = 0
    erased_events: int = 0  # events of erased users, not learned (stream/core/erasures.py)
    #: users records written with a channel's consent turned off (unsubscribe and push_bounce events)
    consent_withdrawn: int = 0
    #: feedback the experiment metrics did not attribute: naming no known campaign/variant, or past the segment cap
    experiment_unattributed: int = 0
    experiment_overflow: int = 0
    pushes: int = 0
    batches: int = 0
    recs_written: int = 0
    redis_retries: int = 0
    kafka_retries: int = 0
    redis_wrong_type: int = 0  # infogap keys found holding another type (logged with the key; overwritten)
    #: values read from Redis that are not what infogap writes there (a neighbour row, the population, a review
    #: model): logged with the key, the last good one kept until an item stage writes the key again
    redis_unreadable: int = 0
    #: times this worker found that Redis had lost its data (the generation marker gone or changed) and began
    #: writing every key it holds state for again; and the keys written again so far
    redis_rematerialisations: int = 0
    redis_keys_rematerialised: int = 0
    redis_rematerialise_pending: int = 0  # users and rows still to write again (0: Redis is whole)
    checkpoints: int = 0  # checkpoints written (snapshots of this worker's partitions, then the commit)
    checkpoint_seconds: float = 0.0  # how long the last checkpoint took (snapshot of every partition + commit)
    checkpoint_locked_seconds: float = 0.0  # the part of it that held batches back (taking the state)
    last_batch_s: float = 0.0
    lag: int = 0
    partitions: int = 0  # events partitions this worker owns now
    #: seconds from the item stage's last publish to its next (publish_interval_s, more under a backlog:
    #: how old ig:similar and the neighbour rows may get); 0 without an item stage or before its first
    publish_interval_s: float = 0.0
    #: seconds a user stage keeps a neighbour row before reading it again if its shard published
    #: (neighbour_max_age_s, more under a backlog); 0 without a user stage or before its first batch
    neighbour_max_age_s: float = 0.0
    #: partitions whose state snapshot could not be read, stopped until an operator acts: "topic[p]" -> why
    unreadable_state: dict[str, str] = field(default_factory=dict)
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    pushes_by_channel: dict[str, int] = field(default_factory=dict)
    #: push decisions held back, by rule (infogap.models.push_policy.RULES): the rule held for every channel, or one
    pushes_held: dict[str, int] = field(default_factory=dict)
    #: with INFOGAP_PRIVACY_EPSILON: epsilon this worker's publishes spent on noise since it started, per kind
    #: (similar, trending), and today (UTC) by the ledgers of the partitions it owns (docs/privacy.md)
    privacy_epsilon_spent: dict[str, float] = field(default_factory=dict)
    privacy_epsilon_today: dict[str, float] = field(default_factory=dict)
    batch_seconds: Reservoir = field(default_factory=lambda: Reservoir(10_000))
    freshness_seconds: Reservoir = field(default_factory=Reservoir)

    def count_dead(self, code: str) -> None:
        """Count one dead letter under its reason code; a value outside the fixed set counts as ``other``,
        so the ``reason`` label never carries input and has at most ``len(REASON_CODES)`` values."""
        key = _DLQ_LABELS.get(code, ReasonCode.OTHER)
        self.dlq_by_reason[key] = self.dlq_by_reason.get(key, 0) + 1
        self.dead_letters += 1

    def to_dict(self) -> dict:
        # the fields read directly: asdict would deep-copy the reservoirs (100,000 samples) at every /stats read
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if not isinstance(getattr(self, f.name), (Reservoir, dict))}
        d["dlq_by_reason"] = dict(self.dlq_by_reason)
        d["unreadable_state"] = dict(self.unreadable_state)
        d["pushes_by_channel"] = dict(self.pushes_by_channel)
        d["pushes_held"] = dict(self.pushes_held)
        d["privacy_epsilon_spent"] = dict(self.privacy_epsilon_spent)
        d["privacy_epsilon_today"] = dict(self.privacy_epsilon_today)
        d["batch_seconds"] = self.batch_seconds.percentiles()
        d["freshness_seconds"] = self.freshness_seconds.percentiles()
        d["freshness_samples"] = self.freshness_seconds.count
        return d


class StatsCollector:
    """Exposes :class:`WorkerStats` to Prometheus at scrape time (no second set of counters)."""

    def __init__(self, stats: WorkerStats):
        self.stats = stats

    def collect(self):
        s = self.stats
        for name, doc, value in (("events_in", "records read from the events topic", s.events_in),
                                 ("events_ok", "valid, unique events applied", s.events_ok),
                                 ("duplicates", "events skipped as duplicates by event_id", s.duplicates),
                                 ("erasures", "users erased", s.erased_users),
                                 ("erased_events", "events of erased users, not learned", s.erased_events),
                                 ("consent_withdrawn", "users records written with a channel's consent turned "
                                  "off (unsubscribe and push_bounce events)", s.consent_withdrawn),
                                 ("batches", "micro-batches processed", s.batches),
                                 ("checkpoints", "checkpoints written (state snapshots, then the offsets)",
                                  s.checkpoints),
                                 ("recs_written", "ig:recs documents written", s.recs_written),
                                 ("redis_retries", "Redis writes retried after an error", s.redis_retries),
                                 ("kafka_retries", "Kafka operations retried after an error", s.kafka_retries),
                                 ("redis_wrong_type", "infogap keys found holding another Redis type (WRONGTYPE; "
                                  "the key is logged, then overwritten or reported)", s.redis_wrong_type),
                                 ("redis_unreadable", "values read from Redis that are not what infogap writes "
                                  "there (a neighbour row, the population, a review model; logged with the key, "
                                  "the last good one kept)", s.redis_unreadable),
                                 ("redis_rematerialisations", "times Redis was found to have lost its data (the "
                                  "generation marker gone or changed) and every key was written again from "
                                  "state", s.redis_rematerialisations),
                                 ("redis_keys_rematerialised", "Redis keys written again from state after a data "
                                  "loss", s.redis_keys_rematerialised)):
            yield CounterMetricFamily(f"infogap_{name}", doc, value=value)
        dlq = CounterMetricFamily("infogap_dlq", "records sent to the dead-letter topic, by reason "
                                  "code (infogap.models.events.ReasonCode)", labels=["reason"])
        for reason, n in s.dlq_by_reason.items():
            dlq.add_metric([reason], n)
        yield dlq
        unreadable = GaugeMetricFamily("infogap_unreadable_state", "1 for each partition stopped because its "
                                       "state snapshot could not be read (see the worker's log and /stats)",
                                       labels=["partition"])
        for where in s.unreadable_state:
            unreadable.add_metric([where], 1)
        yield unreadable
        pushes = CounterMetricFamily("infogap_pushes", "push messages sent", labels=["channel"])
        for channel, n in s.pushes_by_channel.items():
            pushes.add_metric([channel], n)
        yield pushes
        held = CounterMetricFamily("infogap_pushes_held", "push decisions held back, by rule "
                                   "(infogap.models.push_policy.RULES)", labels=["rule"])
        for rule, n in s.pushes_held.items():
            held.add_metric([rule], n)
        yield held
        eps = CounterMetricFamily("infogap_privacy_epsilon_spent", "epsilon this worker's publishes spent on "
                                  "Laplace noise since it started (INFOGAP_PRIVACY_EPSILON per publish; "
                                  "docs/privacy.md)", labels=["kind"])
        for kind, x in s.privacy_epsilon_spent.items():
            eps.add_metric([kind], x)
        yield eps
        today = GaugeMetricFamily("infogap_privacy_epsilon_today", "epsilon spent on noise today (UTC) by the "
                                  "publishes of the cooc partitions this worker owns", labels=["kind"])
        for kind, x in s.privacy_epsilon_today.items():
            today.add_metric([kind], x)
        yield today
        yield GaugeMetricFamily("infogap_experiment_unattributed", "feedback events of the partitions this worker "
                                "owns that named no known campaign or variant, not counted", value=s.experiment_unattributed)
        yield GaugeMetricFamily("infogap_experiment_overflow", "feedback events of the partitions this worker owns "
                                "past INFOGAP_EXPERIMENT_MAX_SEGMENTS, not counted", value=s.experiment_overflow)
        yield GaugeMetricFamily("infogap_consumer_lag", "records behind the end of the events topic", value=s.lag)
        yield GaugeMetricFamily("infogap_checkpoint_seconds", "how long the last checkpoint took",
                                value=s.checkpoint_seconds)
        yield GaugeMetricFamily("infogap_checkpoint_locked_seconds", "the part of the last checkpoint that held "
                                "batches back", value=s.checkpoint_locked_seconds)
        yield GaugeMetricFamily("infogap_redis_rematerialise_pending", "users and neighbour rows still to write "
                                "again after a Redis data loss (0: nothing pending)",
                                value=s.redis_rematerialise_pending)
        yield GaugeMetricFamily("infogap_publish_interval_seconds", "seconds from the item stage's last publish "
                                "of neighbour rows to its next (longer under a backlog)", value=s.publish_interval_s)
        yield GaugeMetricFamily("infogap_neighbour_max_age_seconds", "seconds a user stage keeps a neighbour row "
                                "before reading it again (longer under a backlog)", value=s.neighbour_max_age_s)
        for name, res in (("batch_seconds", s.batch_seconds), ("freshness_seconds", s.freshness_seconds)):
            summary = SummaryMetricFamily(f"infogap_{name}", f"{name.replace('_', ' ')} (recent percentiles as gauges)",
                                          count_value=res.count, sum_value=res.total)
            yield summary
            for p, v in res.percentiles().items():
                yield GaugeMetricFamily(f"infogap_{name}_{p}", f"{name} {p} over recent samples", value=v)


async def health_report(checks: dict[str, Callable[[], Awaitable[bool | str]]],
                        faults: Callable[[], dict[str, str]] | None = None) -> tuple[bool, dict]:
    """(healthy, body) of ``/health``. A check answers True (up), False or a reason (a str: down, and why);
    ``faults`` gives the worker's own findings, name -> reason, each down. Reasons are in ``body["reasons"]``.

    >>> async def up(): return True
    >>> async def refused(): return "OOM"
    >>> asyncio.run(health_report({"kafka": up}))
    (True, {'status': 'ok', 'checks': {'kafka': 'up'}})
    >>> ok, body = asyncio.run(health_report({"kafka": up, "redis": refused}, lambda: {"progress": "stalled"}))
    >>> ok, body["checks"], body["reasons"]
    (False, {'kafka': 'up', 'redis': 'down', 'progress': 'down'}, {'redis': 'OOM', 'progress': 'stalled'})
    """
    results, reasons = {}, {}
    for name, check in checks.items():
        try:
            got = await asyncio.wait_for(check(), 2.0)
        except Exception:  # unreachable: a failed probe is an answer, not an error of the endpoint
            got = False
        if isinstance(got, str):
            reasons[name] = got
        results[name] = got is True or (bool(got) and not isinstance(got, str))
    for name, reason in (faults() if faults is not None else {}).items():
        results[name] = False
        reasons[name] = reason
    ok = all(results.values())
    body = {"status": "ok" if ok else "unhealthy", "checks": {k: "up" if v else "down" for k, v in results.items()}}
    if reasons:
        body["reasons"] = reasons
    return ok, body


def build_app(stats: WorkerStats, checks: dict[str, Callable[[], Awaitable[bool | str]]],
              faults: Callable[[], dict[str, str]] | None = None) -> web.Application:
    """The HTTP app of a worker; ``checks`` name each dependency's live probe, ``faults`` the worker's own
    findings (see :func:`health_report`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...

    async def health(_request: web.Request) -> web.Response:
        ok, body = await health_report(checks, faults)
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    async def stats_json(_request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(stats.to_dict()), content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats_json)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app``; returns the runner to ``cleanup()`` on shutdown."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("health and metrics on http://%s:%d/health /metrics /stats", host, port)
    return runner
