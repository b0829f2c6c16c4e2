"""Channel workers against real Kafka: push messages in, emails (local aiosmtpd) or JSON lines out, events back."""
from __future__ import annotations

import asyncio
import contextlib
import email
import time
from email import policy

import orjson
from aiosmtpd.controller import Controller

from infogap.models.events import parse_event
from infogap.stream.channels import ChannelConfig, ChannelWorker, feedback_events
from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, read_topic


class Inbox:
    """aiosmtpd handler keeping every message received."""

    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 OK"


@contextlib.contextmanager
def smtp_server(port: int):
    inbox = Inbox()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield inbox
    finally:
        ctl.stop()


@contextlib.asynccontextmanager
async def running_channel(settings, config):
    worker = ChannelWorker(settings, config)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def push(mid, user, channel="email", variant="A", *, now, expires_in=3600.0, items=("sku-1", "sku-2")):
    return {"message_id": mid, "user_id": user, "channel": channel,
            "items": [{"item_id": i, "score": 0.5, "reason": "bought together"} for i in items],
            "reason": "new picks for you", "campaign": "winter", "variant": variant,
            "created_at": now - 5.0, "expires_at": now + expires_in}


async def test_email_worker_sends_mail_and_reports_impressions_opens_and_clicks(settings, tmp_path):
    now = time.time()
    port = free_port()
    records = [
        ("u1", push("m-a", "u1", now=now)),
        ("u2", push("m-b", "u2", variant="B", now=now)),
        ("u3", push("m-app", "u3", channel="app", now=now)),           # another channel's
        ("u4", push("m-old", "u4", now=now, expires_in=-10.0)),        # expired
        ("u1", push("m-a", "u1", now=now)),                            # the same message again
        ("u5", b"not json"),                                           # not a message
    ]
    cfg = ChannelConfig(channel="email", smtp_port=port, open_rate=1.0, click_rate=1.0, sink_dir=tmp_path)
    with smtp_server(port) as inbox:
        async with running_channel(settings, cfg) as worker:
            await produce(settings, settings.topics.push, records)
            await wait_for(lambda: worker.stats.received >= len(records) and worker.stats.batches >= 1,
                           what="all push records consumed")
            await wait_for(lambda: len(inbox.envelopes) >= 2, what="two emails")
        events = await read_topic(settings, settings.topics.events, until=lambda recs: len(recs) >= 6)
    st = worker.stats
    assert (st.delivered, st.other_channel, st.expired, st.duplicates, st.invalid) == (2, 1, 1, 1, 1)

    mails = {m["X-Infogap-Message-Id"]: m for m in
             (email.message_from_bytes(e.content, policy=policy.default) for e in inbox.envelopes)}
    assert set(mails) == {"m-a", "m-b"}
    assert mails["m-a"]["To"] == "u1@example.invalid" and mails["m-b"]["To"] == "u2@example.invalid"
    assert mails["m-b"]["X-Infogap-Variant"] == "B" and mails["m-b"]["X-Infogap-Campaign"] == "winter"
    assert "sku-1" in mails["m-a"].get_content()
    assert sorted(r for e in inbox.envelopes for r in e.rcpt_tos) == ["u1@example.invalid", "u2@example.invalid"]

    assert len(events) == 6
    parsed = [parse_event(r.value, now=time.time()) for r in events]  # every one is a valid contract event
    assert all(r.key.decode() == e.user_id for r, e in zip(events, parsed))
    got = {(e.type, e.context["message_id"]): e for e in parsed}
    assert set(got) == {(t, m) for t in ("impression", "push_open", "push_click") for m in ("m-a", "m-b")}
    imp = got[("impression", "m-b")]
    assert imp.user_id == "u2" and imp.item_id == "sku-1"
    assert dict(imp.context) == {"channel": "email", "campaign": "winter", "variant": "B", "message_id": "m-b"}
    assert got[("push_open", "m-a")].item_id is None


async def test_email_worker_retries_until_the_smtp_server_answers(settings, tmp_path):
    now = time.time()
    port = free_port()
    cfg = ChannelConfig(channel="email", smtp_port=port, sink_dir=tmp_path)
    async with running_channel(settings, cfg) as worker:
        await produce(settings, settings.topics.push, [("u1", push("m-r", "u1", now=now))])
        await wait_for(lambda: worker.stats.retries >= 1, what="a failed delivery attempt")
        with smtp_server(port) as inbox:
            await wait_for(lambda: worker.stats.delivered == 1, deadline_s=20, what="delivery after the retry")
    assert [e.rcpt_tos for e in inbox.envelopes] == [["u1@example.invalid"]]


async def test_app_worker_writes_json_lines_and_simulates_feedback_deterministically(settings, tmp_path):
    now = time.time()
    msgs = [push(f"m{i}", f"u{i}", channel="app", variant="AB"[i % 2], now=now) for i in range(30)]
    cfg = ChannelConfig(channel="app", sink_dir=tmp_path, open_rate=0.5, click_rate=0.5)
    async with running_channel(settings, cfg) as worker:
        await produce(settings, settings.topics.push, [(m["user_id"], m) for m in msgs])
        await wait_for(lambda: worker.stats.delivered >= 30, what="30 app messages delivered")
    expected = {e["event_id"] for m in msgs for e in feedback_events(m, 0.0, 0.5, 0.5)}
    assert 30 < len(expected) < 90  # some opened, some clicked: the hash decides
    events = await read_topic(settings, settings.topics.events, until=lambda recs: len(recs) >= len(expected))
    assert {orjson.loads(r.value)["event_id"] for r in events} == expected
    lines = [orjson.loads(x) for x in (tmp_path / "app.jsonl").read_bytes().splitlines()]
    assert sorted(x["message_id"] for x in lines) == sorted(m["message_id"] for m in msgs)
    assert all(x["delivered_at"] >= now for x in lines)
