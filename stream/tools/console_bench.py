"""What the console costs: a page's render time with many users in the store, and a worker's CPU under the
console's sampling. ``python -m infogap.stream.tools.console_bench [--users 100000] [--seconds 60]``.

1. Writes ``users`` users' recommendations and push decisions under a fresh prefix of the local Redis, then
   times ``/users/{id}`` (random users), ``/experiments`` and ``/`` through the console's own HTTP server
   (medians of 50 requests).
2. Starts a worker process (``infogap worker``, idle), and reads its CPU seconds (``/proc``) over ``seconds``
   without the console, then with a console sampling it every ``refresh`` seconds.
3. Times what a busy worker does for one ``/stats`` read (``WorkerStats.to_dict`` with its latency reservoirs
   full: 100,000 freshness samples), which an idle worker's reservoirs do not show.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import uuid

import aiohttp

from infogap.stream.settings import load
from infogap.stream.store import open_store
from infogap.stream.store.base import decision_entry
from infogap.stream.tools import local
from infogap.stream.tools.bench import free_port


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _fill(settings, users: int) -> None:
    store = open_store(settings)
    try:
        for start in range(0, users, 5000):
            ids = [f"u{k}" for k in range(start, min(users, start + 5000))]
            docs = [{"user_id": u, "items": [{"item_id": f"i{j}", "score": 0.5, "reason": "trending now"}
                                             for j in range(10)], "segment": 1, "generated_at": 1.7e9,
                     "model_version": "bench"} for u in ids]
            await store.write(recs=docs, segments={u: 1 for u in ids},
                              decisions={u: [decision_entry("email", None, 1.7e9, "m-1", ["i1"]),
                                             decision_entry(None, "no_change", 1.7e9 + 60)] for u in ids})
    finally:
        await store.close()


async def _time(session, url, n: int = 50) -> float:
    """Median milliseconds of ``n`` GETs of ``url`` (a string, or a function giving each request's)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(url() if callable(url) else url) as r:
            await r.read()
            assert r.status == 200, (url, r.status)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def main(users: int, seconds: float, refresh: float) -> None:
    from infogap.stream.console.app import run_console

    base = load()
    local.up(base)
    tag = uuid.uuid4().hex[:8]
    s = base.model_copy(update={"redis_prefix": f"cbench:{tag}:", "topic_prefix": f"cbench{tag}.",
                                "consumer_group": f"cbench-{tag}", "http_port": free_port(),
                                "http_host": "127.0.0.1", "console_port": free_port(), "console_refresh_s": refresh})
    local.ensure_topics(s)
    s = s.model_copy(update={"console_workers": [f"http://127.0.0.1:{s.http_port}"]})
    t0 = time.perf_counter()
    await _fill(s, users)
    print(f"wrote {users:,} users' recommendations and decisions in {time.perf_counter() - t0:.1f} s")
    env = {**os.environ, "INFOGAP_REDIS_PREFIX": s.redis_prefix, "INFOGAP_TOPIC_PREFIX": s.topic_prefix,
           "INFOGAP_CONSUMER_GROUP": s.consumer_group, "INFOGAP_HTTP_PORT": str(s.http_port),
           "INFOGAP_HTTP_HOST": "127.0.0.1"}
    worker = subprocess.Popen([sys.executable, "-m", "infogap.stream.tools.cli", "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{s.http_port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the worker did not become healthy"
                await asyncio.sleep(0.5)
            await asyncio.sleep(5)  # past start-up
            c0 = _cpu_s(worker.pid)
            await asyncio.sleep(seconds)
            idle = (_cpu_s(worker.pid) - c0) / seconds
            stop, ready = asyncio.Event(), asyncio.Event()
            console = asyncio.create_task(run_console(s, ready, stop))
            await ready.wait()
            url = f"http://127.0.0.1:{s.console_port}"
            c0 = _cpu_s(worker.pid)
            await asyncio.sleep(seconds)
            sampled = (_cpu_s(worker.pid) - c0) / seconds
            scans = []
            store = open_store(s)
            for _ in range(5):  # what /experiments does once per refresh: a SCAN of the whole keyspace
                t0 = time.perf_counter()
                await store.experiments()
                scans.append(time.perf_counter() - t0)
            await store.close()
            pages = {"/users/{random}": await _time(session, lambda: f"{url}/users/u{random.randrange(users)}"),
                     "/experiments": await _time(session, url + "/experiments"),
                     "/": await _time(session, url + "/"), "/segments": await _time(session, url + "/segments")}
            stop.set()
            await console
        print(f"worker CPU: idle {100 * idle:.2f} % of a core; with the console sampling every {refresh:g} s "
              f"{100 * sampled:.2f} % (+{100 * (sampled - idle):.2f} points)")
        for page, ms in pages.items():
            print(f"{page}: median {ms:.1f} ms per request ({users:,} users in Redis)")
        print(f"/experiments uncached (the SCAN, once per refresh): median {1000 * statistics.median(scans):.0f} ms")
        busy = _busy_stats_ms()
        print(f"/stats of a busy worker (reservoirs full): {busy:.2f} ms of CPU per read, "
              f"{100 * busy / 1000 / refresh:.3f} % of a core at one read every {refresh:g} s")
    finally:
        worker.terminate()
        worker.wait(30)
        store = open_store(s)
        await store.clear()
        await store.close()  # (its few topics, prefixed cbench*, stay: `infogap down` and up again drop them)


def _busy_stats_ms(n: int = 50) -> float:
    """Median time of ``WorkerStats.to_dict`` with full reservoirs (what ``/stats`` computes)."""
    import numpy as np

    from infogap.stream.observability import WorkerStats

    stats = WorkerStats()
    rng = np.random.default_rng(0)
    stats.freshness_seconds.add_many(rng.random(100_000))
    stats.batch_seconds.add_many(rng.random(10_000))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        stats.to_dict()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--refresh", type=float, default=2.0)
    a = ap.parse_args()
    asyncio.run(main(a.users, a.seconds, a.refresh))
