"""The Grafana dashboard asks only for metrics that live workers expose: a stream worker (fed events, one of them
bad) and a channel worker (one message delivered) are scraped, and every metric name of every panel's query must
be on one of their ``/metrics`` pages."""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, running_worker
from tests.integration.test_channels import ChannelProcess, consent, push

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "infogap.json"
_METRIC = re.compile(r"\b((?:infogap|process)_[a-z0-9_]+)\b")


def queried_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    return {m for panel in dash["panels"] for target in panel["targets"] for m in _METRIC.findall(target["expr"])}


def exposed(text: str) -> set[str]:
    """Every series name a scrape can return: samples, and for a counter without series yet, ``{name}_total``."""
    out = set()
    for family in text_string_to_metric_families(text):
        out.add(family.name)
        out |= {s.name for s in family.samples}
        if family.type == "counter":
            out.add(family.name + "_total")
        if family.type == "summary":
            out |= {family.name + "_sum", family.name + "_count"}
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


async def test_every_metric_a_dashboard_panel_queries_exists_on_a_live_worker(settings, tmp_path):
    from infogap.stream.tools.provider_standin import ProviderStandIn

    wanted = queried_metrics()
    assert {"infogap_events_ok_total", "infogap_consumer_lag", "infogap_freshness_seconds_p99",
            "infogap_dlq_total", "infogap_channel_messages_total", "process_resident_memory_bytes",
            "infogap_checkpoints_total"} <= wanted
    s = settings.model_copy(update={"http_port": free_port(), "http_host": "127.0.0.1"})
    now = time.time()
    events = [("u1", {"event_id": f"e{i}", "user_id": "u1", "item_id": f"sku-{i % 3}", "type": "view",
                      "ts": now - 60 + i}) for i in range(6)] + [("u1", b"{not json")]
    async with running_worker(s) as worker:
        await produce(s, s.topics.events, events)
        await wait_for(lambda: worker.stats.events_ok >= 6 and worker.stats.dead_letters >= 1,
                       what="the events applied and the bad one dead-lettered")
        await worker.checkpoint()
        names = exposed(await asyncio.to_thread(scrape, s.http_port))  # the worker serves on this loop
    with ProviderStandIn() as standin:
        channel = ChannelProcess(settings, standin, tmp_path, "app")
        try:
            await consent(settings, "u9")
            await produce(settings, settings.topics.push, [("u9", push("m-g1", "u9", "app", now=now))])
            channel.start()
            await wait_for(lambda: standin.count("m-g1") == 1, deadline_s=40, what="the app message delivered")
            await wait_for(lambda: (channel.stats() or {}).get("batches", 0) >= 1, what="the batch completed")
            names |= exposed(await asyncio.to_thread(scrape, channel.port))
        finally:
            channel.stop()
    missing = sorted(wanted - names)
    assert not missing, f"the dashboard queries metrics no worker exposes: {missing}"
