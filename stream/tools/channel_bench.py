"""``infogap channel-bench``: messages per second of one channel worker (faust-streaming agent, its outcomes
table, consent read before each batch) against the provider stand-in, end to end over real Kafka.

The worker runs as its own process with no rate limit; the figure is the accepted messages' count over the time
from the first to the last the stand-in accepted (the worker's start and Kafka's group join are left out).
"""
from __future__ import annotations

import asyncio
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson

from infogap.stream import connections
from infogap.stream.settings import Settings
from infogap.stream.tools import local
from infogap.stream.tools.bench import free_port
from infogap.stream.tools.provider_standin import ProviderStandIn


async def _produce(settings: Settings, topic: str, records) -> None:
    producer = connections.producer(settings, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [await producer.send(topic, orjson.dumps(v), key=k.encode()) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _drop(settings: Settings) -> None:
    admin = connections.admin(settings)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics()
                if t.startswith(settings.topic_prefix) or t.startswith(settings.consumer_group + ".")]
        await admin.delete_topics(mine)
    except Exception:  # cleanup is best effort: a bench's topics are harmless
        pass
    finally:
        await admin.close()


async def once(settings: Settings, channel: str, messages: int, out: Path) -> dict:
    """One run: ``messages`` pushes of ``channel`` to as many users, all consenting."""
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"topic_prefix": f"chbench-{tag}.", "consumer_group": f"chbench-{tag}"})
    local.ensure_topics(s)
    now = time.time()
    users = [f"b{i}" for i in range(messages)]
    await _produce(s, s.topics.users, [(u, {"user_id": u, "consent": {channel: True}}) for u in users])
    await _produce(s, s.topics.push, [(u, {"message_id": f"m-{tag}-{i}", "user_id": u, "channel": channel,
                                           "items": [{"item_id": "sku-1", "title": "Lamp", "reason": "popular"}],
                                           "reason": "new picks", "campaign": "bench", "created_at": now,
                                           "expires_at": now + 3600}) for i, u in enumerate(users)])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("mail.log", "aiohttp.access"):  # aiosmtpd and aiohttp log every command and request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    with ProviderStandIn() as standin, open(out / f"channel-{channel}-{tag}.log", "wb") as log:
        env = {**os.environ, **connections.child_env(s), "INFOGAP_TOPIC_PREFIX": s.topic_prefix,
               "INFOGAP_CONSUMER_GROUP": s.consumer_group, "INFOGAP_LOCAL_DIR": str(out / tag),
               "INFOGAP_CHANNEL_SMTP_PORT": str(standin.smtp_port), "INFOGAP_CHANNEL_STATUS_URL": standin.status_url,
               "INFOGAP_CHANNEL_APP_URL": standin.app_url, "INFOGAP_CHANNEL_ADS_URL": standin.ads_url,
               "INFOGAP_CHANNEL_RATE_PER_S": orjson.dumps({channel: 1e9}).decode(),
               "INFOGAP_CHANNEL_WEB_PORT": str(free_port()), "INFOGAP_CHANNEL_BATCH_MAX_RECORDS": "500"}
        proc = subprocess.Popen([sys.executable, "-m", "infogap.stream.tools.cli", "--log-level", "WARNING",
                                 "channel", channel], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120 + messages / 100
            ids = [f"m-{tag}-{i}" for i in range(messages)]
            while not standin.count(ids[-1]) or not all(standin.count(m) for m in ids):  # cheap, no copies
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {channel} worker delivered {sum(map(standin.count, ids))} of "
                                       f"{messages} messages; see {log.name}")
                await asyncio.sleep(0.5)
            times = [a["accepted_at"] for a in standin.accepted(channel)]
        finally:
            proc.terminate()
            proc.wait(30)
    await _drop(s)
    seconds = times[-1] - times[0]
    return {"channel": channel, "messages": messages, "seconds": seconds, "msgs_per_s": (messages - 1) / seconds}


async def run(settings: Settings, channels: list[str], messages: int, repeat: int, out: Path,
              faust_events: int = 0) -> dict:
    """Median messages/s per channel over ``repeat`` runs, and with ``faust_events`` the events/s of a bare Faust
    agent on that many events; writes ``channel-bench.json`` in ``out``."""
    res: dict = {"machine": {"cores": os.cpu_count()}, "messages": messages, "channels": {}}
    for channel in channels:
        runs = [await once(settings, channel, messages, out) for _ in range(repeat)]
        res["channels"][channel] = {"msgs_per_s_median": statistics.median(r["msgs_per_s"] for r in runs),
                                    "runs": runs}
    if faust_events:
        runs = [await faust_events_rate(settings, faust_events, out) for _ in range(repeat)]
        res["faust_events"] = {"events": faust_events, "events_per_s_median": statistics.median(runs), "runs": runs}
    (out / "channel-bench.json").write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    return res


# ---------------------------------------------------------------------------------------------- the events path
def _faust_events_consumer(bootstrap: str, topic: str, group: str, expected: int, result: str) -> None:
    """Child process: a Faust agent that reads ``topic`` in batches (``take_events``) and decodes each event, the
    least a Faust agent on the ``events`` path would do; writes its rate to ``result`` and exits."""
    import faust

    app = faust.App(group, broker=f"kafka://{bootstrap}", store="memory://", web_enabled=False,
                    consumer_auto_offset_reset="earliest", stream_wait_empty=False)
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = {"n": 0, "first": None}

    @app.agent(source)
    async def count(stream):
        async for events in stream.take_events(1000, within=0.2):
            if seen["first"] is None:
                seen["first"] = time.perf_counter()
            for ev in events:
                orjson.loads(ev.value)
            seen["n"] += len(events)
            if seen["n"] >= expected:
                rate = (seen["n"] - len(events)) / max(1e-9, time.perf_counter() - seen["first"])
                Path(result).write_text(str(rate))
                os._exit(0)

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


async def faust_events_rate(settings: Settings, events: int, out: Path) -> float:
    """Events/s of a bare faust-streaming agent over ``events`` contract events (nothing learned)."""
    from infogap.stream.tools.synthetic import SyntheticStream

    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"topic_prefix": f"chbench-{tag}.", "consumer_group": f"chbench-{tag}"})
    local.ensure_topics(s)
    stream = SyntheticStream(seed=7)
    await _produce(s, s.topics.events, [(e["user_id"], e) for e in stream.events(events, start_ts=time.time() - 3600)])
    out.mkdir(parents=True, exist_ok=True)
    result = (out / f"faust-events-{tag}.txt").resolve()
    code = ("from infogap.stream.tools.channel_bench import _faust_events_consumer as f; "
            f"f({s.kafka_bootstrap!r}, {s.topics.events!r}, {s.consumer_group!r}, {events}, {str(result)!r})")
    with open(out / f"faust-events-{tag}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                cwd=out)
        try:
            proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
    await _drop(s)
    return float(result.read_text())
