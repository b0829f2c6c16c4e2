"""``infogap bench``: end-to-end throughput, freshness, lag and memory of one worker process.

Three measurements, each on its own topics, consumer group and Redis prefix:

1. **throughput**: N synthetic events are loaded into Kafka first, then one worker process
   (``infogap worker``, a real subprocess) drains them; events/s is measured from its first
   consumed batch to the last, so producer speed does not cap it (when the first batch holds every
   event, as with a few thousand events, from that batch's own processing time).
2. **freshness**: the worker runs while events are produced at a fixed rate; freshness is the
   time from the producer's send (the Kafka record's CreateTime) to the batch's Redis write
   being acknowledged, as the worker measures it (``/stats``): p50, p95, p99. Consumer lag is
   sampled meanwhile.
3. **memory**: the worker's RSS after each run, and the model's own memory per 100k users and
   per 10k items (tracemalloc over an in-process ``models.Engine``), then the users' memory after a
   flood of 200k one-event user ids evicted as a worker's partition does (``max_users_per_partition``).

With ``repeat``, the runs of 1 and 2 take turns that many times and each is reported as its median
run (:func:`infogap.stream.tools.repeats.median_run`): this machine's speed drifts by up to a third within minutes.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import aiohttp
import orjson

from infogap.stream import connections
from infogap.stream.tools import local
from infogap.stream.tools.repeats import median_run
from infogap.stream.tools.replay import publish, sample_prefs
from infogap.stream.settings import Settings
from infogap.stream.store import open_store
from infogap.stream.tools.synthetic import SyntheticStream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> dict[str, float]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_mb": round(out.get("VmRSS", 0.0), 1), "peak_rss_mb": round(out.get("VmHWM", 0.0), 1)}


class WorkerProcess:
    """An ``infogap worker`` subprocess on its own topics, group, Redis prefix and HTTP port."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None):
        self.settings = settings
        self.port = free_port()
        env = {**os.environ, **connections.child_env(settings), "INFOGAP_TOPIC_PREFIX": settings.topic_prefix,
               "INFOGAP_CONSUMER_GROUP": settings.consumer_group, "INFOGAP_REDIS_PREFIX": settings.redis_prefix,
               "INFOGAP_HTTP_HOST": "127.0.0.1", "INFOGAP_HTTP_PORT": str(self.port), **(extra_env or {})}
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "infogap.stream.tools.cli", "--log-level", "WARNING", "worker"],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)

    async def stats(self) -> dict | None:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.port}/stats") as r:
                return orjson.loads(await r.read())
        except aiohttp.ClientError:
            return None

    async def wait_until(self, predicate, deadline_s: float, what: str, interval: float = 0.05) -> dict:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}; see {self._log.name}")
            st = await self.stats()
            if st is not None and predicate(st):
                return st
            await asyncio.sleep(interval)
        raise TimeoutError(f"timed out after {deadline_s:.0f} s waiting for {what}; see {self._log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def _scoped(settings: Settings, tag: str) -> Settings:
    return settings.model_copy(update={"topic_prefix": f"bench-{tag}.", "consumer_group": f"bench-{tag}",
                                       "redis_prefix": f"bench:{tag}:"})


async def _cleanup(s: Settings) -> None:
    admin = connections.admin(s)
    await admin.start()
    try:
        await admin.delete_topics(list(s.topics.all().values()))
    except Exception:  # cleanup is best effort; topics of a bench are harmless
        pass
    finally:
        await admin.close()
    store = open_store(s)
    try:
        await store.clear()
    finally:
        await store.close()


BAD_RECORDS = (b"{not json", b'{"event_id": "x", "user_id": "u", "type": "view", "ts": "yesterday"}',
               b'{"event_id": "y", "type": "view", "ts": 1.7e9}', b"\xff\xfe", b"[1, 2, 3]")


def _workers(s: Settings, out: Path, name: str, split: bool) -> tuple[WorkerProcess, WorkerProcess | None]:
    """The measured worker process; with ``split``, it runs the user stage only and a second process
    runs the item stage (``INFOGAP_STAGES``), so each stage has a core of its own."""
    if not split:
        return WorkerProcess(s, out / f"bench-worker-{name}.log"), None
    return (WorkerProcess(s, out / f"bench-worker-{name}.log", {"INFOGAP_STAGES": "users"}),
            WorkerProcess(s, out / f"bench-worker-{name}-items.log", {"INFOGAP_STAGES": "items"}))


def _prefs(stream: SyntheticStream, prefs: bool) -> list[dict]:
    """A ``users`` record for every user of ``stream`` when ``prefs`` (the push policy and the decision log then
    run for each user ranked), else none."""
    return [sample_prefs(f"u{k}") for k in range(stream.n_users)] if prefs else []


async def throughput(settings: Settings, n: int, stream: SyntheticStream, out: Path, bad_per_good: int = 0,
                     split: bool = False, prefs: bool = False) -> dict:
    """Drain ``n`` preloaded good events (with ``bad_per_good`` bad records after each, for the flood run)."""
    s = _scoped(settings, ("fl-" if bad_per_good else "tp-") + uuid.uuid4().hex[:6])
    local.ensure_topics(s)
    good = [orjson.dumps(e) for e in stream.events(n, start_ts=time.time() - n / 1000.0)]
    events = [x for k, g in enumerate(good)
              for x in [g] + [BAD_RECORDS[(k + j) % len(BAD_RECORDS)] for j in range(bad_per_good)]]
    n = len(events)
    t0 = time.perf_counter()
    await publish(s, events, total=n, items=stream.items(), users=_prefs(stream, prefs), progress=False)
    produce_s = time.perf_counter() - t0
    worker, items = _workers(s, out, "flood" if bad_per_good else "throughput", split)
    try:
        first = await worker.wait_until(lambda st: st["events_in"] > 0, 120, "the first batch")
        t_first, n_first = time.perf_counter(), first["events_in"]
        lags = []

        def done(st):
            lags.append(st["lag"])
            return st["events_in"] >= n

        last = await worker.wait_until(done, 600, f"{n} events consumed")
        elapsed = time.perf_counter() - t_first
        mem = _rss_mb(worker.proc.pid)
        items_mem = _rss_mb(items.proc.pid) if items is not None else None
    finally:
        worker.stop()
        if items is not None:
            items.stop()
        await _cleanup(s)
    if n_first < n:
        rate = (last["events_in"] - n_first) / max(elapsed, 1e-9)
    else:  # one batch held everything: there is no second batch to time from
        elapsed = last["last_batch_s"]
        rate = n / max(elapsed, 1e-9)
    return {"events": n, "producer_events_per_s": round(n / produce_s), "seconds": round(elapsed, 3),
            "one_batch": n_first >= n,
            "events_per_s": round(rate), "good_events_per_s": round(rate / (1 + bad_per_good)),
            "bad_per_good": bad_per_good, "dead_letters": last["dead_letters"],
            "batches": last["batches"], "batch_seconds": last["batch_seconds"], "recs_written": last["recs_written"],
            "max_lag": max(lags, default=0), "worker_memory": mem, "item_stage_memory": items_mem}


async def freshness(settings: Settings, rate: float, seconds: float, stream: SyntheticStream, out: Path,
                    split: bool = False, prefs: bool = False) -> dict:
    s = _scoped(settings, "fr-" + uuid.uuid4().hex[:6])
    local.ensure_topics(s)
    n = int(rate * seconds)
    events = [orjson.dumps(e) for e in stream.events(n, start_ts=time.time() - seconds, per_second=rate,
                                                     prefix="f")]
    worker, items = _workers(s, out, "freshness", split)
    try:
        await publish(s, [], items=stream.items(), users=_prefs(stream, prefs), progress=False)
        await worker.wait_until(lambda st: st["batches"] >= 0, 120, "the worker to start")
        await asyncio.sleep(2.0)  # the worker joins its group and catches up on the catalog
        lags: list[int] = []

        async def sample_lag():
            while True:
                st = await worker.stats()
                if st:
                    lags.append(st["lag"])
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_lag())
        t0 = time.perf_counter()
        await publish(s, events, total=n, rate=rate, progress=False)
        sent_s = time.perf_counter() - t0
        last = await worker.wait_until(lambda st: st["events_in"] >= n, 120, f"{n} events consumed")
        sampler.cancel()
        mem = _rss_mb(worker.proc.pid)
    finally:
        worker.stop()
        if items is not None:
            items.stop()
        await _cleanup(s)
    f = last["freshness_seconds"]
    return {"target_rate": rate, "achieved_rate": round(n / sent_s), "events": n,
            "freshness_ms": {k: round(v * 1000, 1) for k, v in f.items()}, "max_lag": max(lags, default=0),
            "batches": last["batches"], "batch_seconds": last["batch_seconds"],
            "worker_memory": mem}


async def worker_flood(settings: Settings, ids: int, cap: int, out: Path = Path("out/bench")) -> dict:
    """A user-stage worker process's RSS before and after a flood of ``ids`` one-event user ids, with
    ``INFOGAP_MAX_USERS_PER_PARTITION=cap`` (0: no cap). Not part of :func:`run` (a minute or two)."""
    s = _scoped(settings, "ev-" + uuid.uuid4().hex[:6])
    local.ensure_topics(s)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time() - ids / 100.0
    events = [orjson.dumps({"event_id": f"e{k}", "user_id": f"flood-{k}", "type": "view", "item_id": f"i{k % 500}",
                            "ts": t0 + k / 100.0}) for k in range(ids)]
    await publish(s, [], items=[{"item_id": f"i{k}", "title": f"Item {k}"} for k in range(500)], progress=False)
    worker = WorkerProcess(s, out / "bench-worker-eviction.log",
                           {"INFOGAP_MAX_USERS_PER_PARTITION": str(cap), "INFOGAP_STAGES": "users"})
    try:
        await worker.wait_until(lambda st: st["batches"] >= 0, 120, "the worker to start")
        await asyncio.sleep(2.0)  # the worker joins its group and reads the catalog
        before = _rss_mb(worker.proc.pid)
        await publish(s, events, total=ids, progress=False)
        await worker.wait_until(lambda st: st["events_in"] >= ids, 600, f"{ids} events consumed")
        after = _rss_mb(worker.proc.pid)
    finally:
        worker.stop()
        await _cleanup(s)
    return {"ids": ids, "max_users_per_partition": cap, "rss_before_mb": before["rss_mb"],
            "rss_after_mb": after["rss_mb"], "peak_rss_mb": after["peak_rss_mb"]}


def _row_bytes(engine) -> int:
    co = engine.state.cooc
    return co.nb.nbytes + co.vals.nbytes + co.sq.nbytes + co.users.nbytes + co.slot_arrays().table.nbytes


def _flood(engine, held: list[str], n: int, items: int, t0: float, settings: Settings) -> dict:
    """``n`` one-event user ids learned after the users ``held``, one partition's eviction after each batch
    of ``batch_max_records`` events (as :meth:`infogap.stream.worker.Worker.process`); users at the end."""
    from infogap.models.push_policy import PushConfig
    from infogap.stream.core.user_partition import UserPartition

    part = UserPartition.new(0, settings, PushConfig())
    part.users.update(held)
    step, t = max(1, settings.batch_max_records), time.perf_counter()
    for k0 in range(0, n, step):
        evs = [{"event_id": f"fl{k}", "user_id": f"flood-{k}", "item_id": f"i{k % items}", "type": "view",
                "ts": t0 + k * 0.01} for k in range(k0, min(n, k0 + step))]
        engine.learn_many(evs)
        part.users.update(e["user_id"] for e in evs)
        part.evict(engine, evs[-1]["ts"], len(evs), settings)
    return {"ids": n, "max_users_per_partition": settings.max_users_per_partition,
            "users_after": engine.stats()["users"], "user_rows": engine.stats()["user_rows"],
            "seconds": round(time.perf_counter() - t, 1)}


def model_memory(users: int = 100_000, items: int = 10_000, events_per_user: int = 5, flood: int = 200_000,
                 settings: Settings | None = None) -> dict:
    """Traced memory of an in-process Engine: per 10k items (catalog + co-occurrence) and per 100k users,
    and the users' memory before and after a flood of ``flood`` one-event user ids, evicted as a worker's
    partition does with ``settings`` (``max_users_per_partition``...; 0 there: no cap)."""
    from infogap.models import Engine, EngineConfig

    stream = SyntheticStream(n_users=users, n_items=items, groups=16, seed=7)
    engine = Engine(EngineConfig())
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for it in stream.items():
        engine.upsert_item(it)
    engine.learn_many([{"event_id": f"w{i}", "user_id": "warmup", "item_id": f"i{i}", "type": "view",
                        "ts": 1.7e9 + i} for i in range(items)])
    engine.forget_user("warmup")
    after_items = tracemalloc.get_traced_memory()[0]
    rows_before = _row_bytes(engine)
    t0 = 1.7e9 + items
    evs = [dict(e, user_id=f"u{k % users}") for k, e in
           enumerate(stream.events(users * events_per_user, start_ts=t0, per_second=1000.0, prefix="m"))]
    engine.learn_many(evs)
    n_events, last_ts = len(evs), evs[-1]["ts"]
    del evs  # the events are not the model's memory
    after_users = tracemalloc.get_traced_memory()[0]
    # an item's co-occurrence row takes its slots when it gets neighbours, mostly while users' events are
    # learned: what the slot arrays and their index grew by then belongs to the items
    rows = _row_bytes(engine) - rows_before
    users_mb = (after_users - after_items - rows) / 2**20
    out = {"items": items, "users": users, "events": n_events,
           "mb_per_10k_items": round((after_items - base + rows) / 2**20 * 10_000 / items, 1),
           "mb_per_100k_users": round(users_mb * 100_000 / users, 1)}
    if flood:
        fl = _flood(engine, [f"u{k}" for k in range(users)], flood, items, last_ts + 1.0, settings or Settings())
        after_mb = (tracemalloc.get_traced_memory()[0] - after_items - (_row_bytes(engine) - rows_before)) / 2**20
        out["flood"] = {**fl, "users_before": users, "mb_users_before": round(users_mb, 1),
                        "mb_users_after": round(after_mb, 1), "mb_growth": round(after_mb - users_mb, 1),
                        "mb_per_100k_users_after": round(after_mb * 100_000 / max(fl["users_after"], 1), 1)}
    tracemalloc.stop()
    return out


async def run(settings: Settings, *, events: int, rate: float, seconds: float, out: Path,
              users: int = 20_000, items: int = 5_000, memory: bool = True, split: bool = False,
              repeat: int = 1, prefs: bool = False) -> dict:
    """Every measurement ``repeat`` times (in turn, so a drift in the machine's speed reaches each
    alike); each reported as its median run, with every run's headline figure."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    out.mkdir(parents=True, exist_ok=True)
    local.up(settings)
    stream = SyntheticStream(n_users=users, n_items=items, groups=16, seed=42)
    runs: dict[str, list[dict]] = {"throughput": [], "flood": [], "freshness": []}
    for r in range(repeat):
        logs = out if repeat == 1 else out / f"run-{r + 1}"  # each run's worker logs kept
        logs.mkdir(exist_ok=True)
        runs["throughput"].append(await throughput(settings, events, stream, logs, split=split, prefs=prefs))
        runs["flood"].append(await throughput(settings, max(1, events // 10), stream, logs, bad_per_good=10,
                                              split=split, prefs=prefs))
        runs["freshness"].append(await freshness(settings, rate, seconds, stream, logs, split=split, prefs=prefs))
    result = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}, "split": split,
              "repeat": repeat, "prefs": prefs,
              "throughput": median_run(runs["throughput"], "runs_events_per_s", lambda r: r["events_per_s"]),
              "flood": median_run(runs["flood"], "runs_good_events_per_s", lambda r: r["good_events_per_s"]),
              "freshness": median_run(runs["freshness"], "runs_p99_ms", lambda r: r["freshness_ms"]["p99"])}
    if memory:
        result["model_memory"] = model_memory(settings=settings)
    (out / "bench.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return result


def summary_rows(res: dict) -> list[tuple[str, str]]:
    """(measure, value) rows of a :func:`run` result, for the terminal; with repeats, each headline
    figure is followed by every run's."""
    tp, fr, flood = res["throughput"], res["freshness"], res["flood"]

    def spread(runs: list[float], unit: str = "") -> str:
        return f" (median of {len(runs)}: {', '.join(f'{v:,.0f}' for v in runs)}{unit})" if len(runs) > 1 else ""

    one = " in one batch" if tp.get("one_batch") else ""
    rows = [("throughput, one worker", f"{tp['events_per_s']:,} events/s ({tp['events']:,} events, {tp['seconds']} s{one})"
             + spread(tp["runs_events_per_s"])),
            ("producer (for reference)", f"{tp['producer_events_per_s']:,} events/s"),
            ("batch latency p50 / p95 / p99", " / ".join(f"{v * 1000:.0f} ms" for v in tp["batch_seconds"].values()
                                                  if v is not None) or "-"),
            ("max consumer lag (throughput run)", f"{tp['max_lag']:,}"),
            ("flood: 10 bad records per good event", f"{flood['good_events_per_s']:,} good events/s, "
             f"{tp['good_events_per_s'] / max(1, flood['good_events_per_s']):.1f}x slower per good event"
             + spread(flood["runs_good_events_per_s"])),
            ("worker RSS after throughput run", f"{tp['worker_memory']['rss_mb']} MB"
             + (f" + item stage {tp['item_stage_memory']['rss_mb']} MB" if tp.get("item_stage_memory") else "")),
            (f"freshness at {fr['target_rate']:,.0f} ev/s p50/p95/p99",
             " / ".join(f"{v:.0f} ms" for v in fr["freshness_ms"].values()) + spread(fr["runs_p99_ms"], " ms p99")),
            ("achieved produce rate", f"{fr['achieved_rate']:,} events/s"),
            ("max consumer lag (freshness run)", f"{fr['max_lag']:,}")]
    if "model_memory" in res:
        mm = res["model_memory"]
        rows += [("model memory per 100k users", f"{mm['mb_per_100k_users']} MB"),
                 ("model memory per 10k items", f"{mm['mb_per_10k_items']} MB")]
        fl = mm.get("flood")
        if fl:
            cap = f"cap {fl['max_users_per_partition']:,}" if fl["max_users_per_partition"] else "no cap"
            rows.append((f"users' memory, flood of {fl['ids']:,} one-event ids ({cap})",
                         f"{fl['mb_users_before']} -> {fl['mb_users_after']} MB ({fl['users_before']:,} -> "
                         f"{fl['users_after']:,} users held; {fl['mb_per_100k_users_after']} MB per 100k held)"))
    return rows
