"""Channel workers (faust-streaming) against real Kafka and the provider stand-in (aiosmtpd SMTP, HTTP APIs).

Each test runs ``infogap channel ...`` as its own process, as an operator would, and checks what people would
see: the mails and app messages the services accepted (and how many times), the events and dead letters on
the topics, and the worker's ``/stats``.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlparse

import orjson
import pytest

from infogap.stream import connections
from infogap.stream.channels.app import EXIT_BATCH_FAILED
from infogap.stream.tools.provider_standin import ProviderStandIn
from tests.conftest import wait_for
from tests.integration.kafka_helpers import free_port, produce, read_topic, running_worker


@pytest.fixture
def standin():
    with ProviderStandIn() as s:
        yield s


class ChannelProcess:
    """``infogap channel CHANNEL`` in a child process, with the test's topics and the stand-in's endpoints."""

    def __init__(self, settings, standin, tmp_path, channel: str = "email", **env):
        self.settings, self.channel = settings, channel
        self.port = free_port()
        self.env = {**os.environ, **connections.child_env(settings),
                    "INFOGAP_TOPIC_PREFIX": settings.topic_prefix, "INFOGAP_CONSUMER_GROUP": settings.consumer_group,
                    "INFOGAP_LOCAL_DIR": str(tmp_path), "INFOGAP_CHANNEL_WEB_PORT": str(self.port),
                    "INFOGAP_CHANNEL_SMTP_PORT": str(standin.smtp_port),
                    "INFOGAP_CHANNEL_STATUS_URL": standin.status_url, "INFOGAP_CHANNEL_APP_URL": standin.app_url,
                    "INFOGAP_CHANNEL_ADS_URL": standin.ads_url, "INFOGAP_CHANNEL_INSTANCE_ID": f"test-{channel}",
                    "INFOGAP_CHANNEL_RETRY_BASE_S": "0.05",
                    **{k: str(v) for k, v in env.items()}}
        self.log = tmp_path / f"{channel}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, **env) -> ChannelProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "infogap.stream.tools.cli", "--log-level", "WARNING",
                                          "channel", self.channel],
                                         env={**self.env, **{k: str(v) for k, v in env.items()}},
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def stats(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=2) as r:
                return orjson.loads(r.read())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def channels(settings, standin, tmp_path):
    made: list[ChannelProcess] = []

    def make(channel: str = "email", **env) -> ChannelProcess:
        made.append(ChannelProcess(settings, standin, tmp_path, channel, **env))
        return made[-1]

    yield make
    for p in made:
        p.stop()
    asyncio.run(_drop_faust_topics(settings))


async def _drop_faust_topics(settings) -> None:
    """The changelog and assignor topics Faust made for the test's consumer group."""
    admin = connections.admin(settings)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(settings.consumer_group + ".channel.")]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


def push(mid: str, user: str, channel: str = "email", *, now: float, expires_in: float = 3600.0) -> dict:
    return {"message_id": mid, "user_id": user, "channel": channel,
            "items": [{"item_id": "sku-1", "title": "Desk lamp", "score": 0.5, "reason": "bought together"}],
            "reason": "new picks for you: Desk lamp", "campaign": "winter", "variant": "B",
            "created_at": now - 5.0, "expires_at": now + expires_in}


async def consent(settings, *users: str, channels=("email", "app", "ads"), value: bool = True) -> None:
    await produce(settings, settings.topics.users,
                  [(u, {"user_id": u, "consent": {c: value for c in channels}, "quiet_hours": None}) for u in users])


async def all_committed(settings, group: str) -> bool:
    """Whether ``group`` committed every ``push`` record: the worker is done with the topic."""
    from aiokafka import TopicPartition

    admin = connections.admin(settings)
    consumer = connections.consumer(settings, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        parts = [TopicPartition(settings.topics.push, p)
                 for p in sorted(await connections.wait_partitions(consumer, settings.topics.push))]
        ends = await consumer.end_offsets(parts)
        return all(ends[tp] == 0 or (tp in committed and committed[tp].offset >= ends[tp]) for tp in parts)
    finally:
        await consumer.stop()
        await admin.close()


async def topic_values(settings, topic: str, until, deadline_s: float = 20.0) -> list[dict]:
    recs = await read_topic(settings, topic, until=lambda rs: until([orjson.loads(r.value) for r in rs]),
                            deadline_s=deadline_s)
    return [orjson.loads(r.value) for r in recs]


# ---------------------------------------------------------------------------------------------- exactly once
@pytest.mark.parametrize("channel, point, nth", [("email", "before_delivery", 3), ("email", "after_accept", 3),
                                                 ("email", "before_commit", 1), ("app", "after_accept", 3)])
async def test_a_worker_killed_at_any_point_delivers_each_message_exactly_once(settings, standin, channels,
                                                                             channel, point, nth):
    now = time.time()
    users = [f"u{i}" for i in range(8)]
    await consent(settings, *users)
    msgs = [push(f"m-{channel}-{i}", u, channel, now=now) for i, u in enumerate(users)]
    await produce(settings, settings.topics.push, [(m["user_id"], m) for m in msgs])

    worker = channels(channel)
    worker.start(INFOGAP_CHANNEL_CRASH_AT=f"{point}:{nth}")
    await wait_for(lambda: worker.proc.poll() is not None, deadline_s=60, what=f"the SIGKILL at {point}")
    assert worker.proc.returncode == -signal.SIGKILL, worker.tail()
    before = {m["message_id"]: standin.count(m["message_id"]) for m in msgs}
    if point == "before_commit":  # killed after its first batch, before Faust committed it
        assert sum(before.values()) >= 1
    else:  # killed part-way: the first two were sent, the third was being handed over
        assert 2 <= sum(before.values()) <= 3

    worker.start()
    group = f"{settings.consumer_group}.channel.{channel}"
    await wait_for(lambda: all_committed(settings, group), deadline_s=60, what="every push record committed")
    assert {m["message_id"]: standin.count(m["message_id"]) for m in msgs} == {m["message_id"]: 1 for m in msgs}
    stats = worker.stats()
    assert stats["received"] >= len(msgs) - sum(before.values())
    if point != "before_commit":
        assert stats["in_doubt"] >= 1  # the message being handed over when the worker died was found pending


# ---------------------------------------------------------------------------------------------- failures
async def test_a_hard_bounce_is_reported_dead_lettered_and_suppresses_the_user(settings, standin, channels):
    now = time.time()
    standin.reject("gone", "email")
    await consent(settings, "gone", "here")
    worker = channels("email").start()
    await produce(settings, settings.topics.push, [("gone", push("m-b1", "gone", now=now)),
                                                   ("here", push("m-ok", "here", now=now))])
    dlq = await topic_values(settings, settings.topics.push_dlq, until=lambda vs: len(vs) >= 1)
    assert [(d["code"], d["message"]["message_id"], d["channel"]) for d in dlq] == [("bounced", "m-b1", "email")]
    assert "550" in dlq[0]["reason"] and "user unknown" in dlq[0]["reason"]
    events = await topic_values(settings, settings.topics.events,
                                until=lambda vs: {"push_bounce", "impression"} <= {v["type"] for v in vs})
    bounce = next(v for v in events if v["type"] == "push_bounce")
    assert bounce["user_id"] == "gone" and bounce["context"] == {"channel": "email", "campaign": "winter",
                                                                 "variant": "B", "message_id": "m-b1"}
    assert [a["message_id"] for a in standin.accepted("email")] == ["m-ok"]

    await produce(settings, settings.topics.push, [("gone", push("m-b2", "gone", now=now))])
    await wait_for(lambda: (worker.stats() or {}).get("skipped", {}).get("suppressed") == 1,
                   what="the next message to the bounced user suppressed")
    assert [a["user_id"] for a in standin.attempts if a["user_id"] == "gone"] == ["gone"]  # never tried again
    (entry,) = await read_topic(settings, settings.topics.suppressions, until=lambda rs: len(rs) >= 1)
    assert len(entry.key) == 32 and b"gone" not in entry.key + entry.value  # a keyed digest, never the id
    assert orjson.loads(entry.value)["why"] == "hard_bounce"


async def test_transient_failures_are_retried_with_backoff_then_dead_lettered(settings, standin, channels):
    now = time.time()
    standin.defer("slow", times=2, channel="email")
    standin.defer("down", times=1000, channel="email")
    await consent(settings, "slow", "down")
    worker = channels("email", INFOGAP_CHANNEL_MAX_ATTEMPTS=4).start()
    await produce(settings, settings.topics.push, [("slow", push("m-slow", "slow", now=now)),
                                                   ("down", push("m-down", "down", now=now))])
    dlq = await topic_values(settings, settings.topics.push_dlq, until=lambda vs: len(vs) >= 1, deadline_s=60)
    assert [(d["code"], d["message"]["message_id"]) for d in dlq] == [("gave_up", "m-down")]
    assert dlq[0]["reason"].startswith("gave up after 4 attempts") and "451" in dlq[0]["reason"]
    # the two may be in different batches: m-slow's third try can come after m-down was given up
    await wait_for(lambda: ((worker.stats() or {}).get("sent") or 0) >= 1, what="m-slow sent on its third try")
    assert standin.count("m-slow") == 1 and standin.count("m-down") == 0
    assert [a["outcome"] for a in standin.attempts if a["user_id"] == "down"] == ["deferred"] * 4
    stats = worker.stats()
    assert (stats["sent"], stats["failed"], stats["bounced"]) == (1, 1, 0) and stats["retries"] >= 2
    events = await topic_values(settings, settings.topics.events, until=lambda vs: len(vs) >= 1)
    assert [v["type"] for v in events] == ["impression"]  # a transient failure is not a bounce


async def test_http_channels_retry_and_bounce_like_email(settings, standin, channels):
    now = time.time()
    standin.reject("stale-token", "app")
    standin.defer("busy", times=1, channel="app")
    await consent(settings, "stale-token", "busy")
    channels("app").start()
    await produce(settings, settings.topics.push, [("stale-token", push("m-a1", "stale-token", "app", now=now)),
                                                   ("busy", push("m-a2", "busy", "app", now=now))])
    dlq = await topic_values(settings, settings.topics.push_dlq, until=lambda vs: len(vs) >= 1)
    assert [(d["code"], d["channel"]) for d in dlq] == [("bounced", "app")] and "404" in dlq[0]["reason"]
    await wait_for(lambda: standin.count("m-a2") == 1, what="the deferred app message accepted on retry")


async def test_the_rate_limit_paces_deliveries(settings, standin, channels):
    now = time.time()
    users = [f"r{i}" for i in range(12)]
    await consent(settings, *users)
    channels("ads", INFOGAP_CHANNEL_RATE_PER_S='{"ads": 4}').start()
    await produce(settings, settings.topics.push,
                  [(u, push(f"m-r{i}", u, "ads", now=now)) for i, u in enumerate(users)])
    await wait_for(lambda: len(standin.accepted("ads")) == 12, deadline_s=40, what="12 ad messages")
    times = [a["accepted_at"] for a in standin.accepted("ads")]
    # 4 per second with a burst of 4: the last of 12 comes at least (12 - 4) / 4 = 2 s after the first
    assert times[-1] - times[0] >= 1.9


# ---------------------------------------------------------------------------------------------- consent
async def test_one_click_unsubscribe_suppresses_for_good_and_reports_the_event(settings, standin, channels):
    now = time.time()
    await consent(settings, "ann")
    worker = channels("email").start()
    await produce(settings, settings.topics.push, [("ann", push("m-u1", "ann", now=now))])
    await wait_for(lambda: standin.count("m-u1") == 1, what="the first mail")
    mail = standin.accepted("email")[0]
    assert mail["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    mailto, url = [part.strip().strip("<>") for part in mail["headers"]["List-Unsubscribe"].split(",")]
    assert mailto.startswith("mailto:unsubscribe@example.invalid?subject=unsubscribe%20")
    token = parse_qs(urlparse(url).query)["t"][0]
    assert url.startswith(f"http://127.0.0.1:{worker.port}/unsubscribe?t=") and "ann" not in token

    with urllib.request.urlopen(url, timeout=5) as r:  # GET (a link scanner) only asks
        assert r.status == 200 and b"<form" in r.read()
    forged = url.replace(token, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(urllib.request.Request(forged, data=b"List-Unsubscribe=One-Click"), timeout=5)
    assert bad.value.code == 400 and b"not valid" in bad.value.read()
    assert worker.stats()["suppressed"] == 0

    post = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST")
    with urllib.request.urlopen(post, timeout=5) as r:
        assert r.status == 200 and b"unsubscribed" in r.read()
    events = await topic_values(settings, settings.topics.events,
                                until=lambda vs: any(v["type"] == "unsubscribe" for v in vs))
    unsub = next(v for v in events if v["type"] == "unsubscribe")
    assert (unsub["user_id"], unsub["context"]) == ("ann", {"channel": "email"})

    worker.stop()
    worker.start()  # the suppression list outlives the worker
    await produce(settings, settings.topics.push, [("ann", push("m-u2", "ann", now=now))])
    group = f"{settings.consumer_group}.channel.email"
    try:  # (a restarted Faust worker may take long to rejoin on a loaded machine: a generous deadline)
        await wait_for(lambda: ((worker.stats() or {}).get("skipped") or {}).get("suppressed", 0) >= 1, deadline_s=90,
                       what="the message after the unsubscribe suppressed")
        await wait_for(lambda: all_committed(settings, group), deadline_s=30, what="every push record committed")
    except AssertionError as e:
        raise AssertionError(f"{e}; m-u2 sent {standin.count('m-u2')}x; stats {worker.stats()}\n{worker.tail()}")
    assert standin.count("m-u2") == 0 and standin.count("m-u1") == 1


async def test_consent_withdrawn_or_erased_before_a_batch_stops_messages_already_on_push(settings, standin, channels):
    now = time.time()
    await consent(settings, "kim", "lee", "max")
    await produce(settings, settings.topics.push, [(u, push(f"m-{u}", u, now=now)) for u in ("kim", "lee", "max")])
    await consent(settings, "kim", value=False)  # withdrawn after the message was put on push
    await produce(settings, settings.topics.users, [("lee", None)])  # lee erased
    worker = channels("email").start()
    await wait_for(lambda: standin.count("m-max") == 1, deadline_s=40, what="max's mail")
    group = f"{settings.consumer_group}.channel.email"
    await wait_for(lambda: all_committed(settings, group), deadline_s=30, what="every push record committed")
    assert standin.count("m-kim") == 0 and standin.count("m-lee") == 0
    assert worker.stats()["skipped"] == {"no_consent": 2}


async def test_an_unsubscribe_event_stops_a_message_already_on_push_through_the_user_stage(settings, standin,
                                                                                            channels):
    """The whole way: an ``unsubscribe`` event on ``events``, the user stage's ``users`` record with the consent off,
    and the channel worker that then finds, on ``push``, a message decided before the unsubscribe: not sent."""
    now = time.time()
    await consent(settings, "pia", "quinn")
    await produce(settings, settings.topics.push, [(u, push(f"m-{u}", u, now=now)) for u in ("pia", "quinn")])
    event = {"event_id": "unsub-1", "user_id": "pia", "type": "unsubscribe", "ts": now,
             "context": {"channel": "email", "message_id": "m-earlier"}}
    async with running_worker(settings):
        await produce(settings, settings.topics.events, [("pia", event)])

        def email_off(recs) -> bool:
            return any(r.key == b"pia" and r.value is not None
                       and orjson.loads(r.value)["consent"].get("email") is False for r in recs)

        users = await read_topic(settings, settings.topics.users, until=email_off, deadline_s=30)
        assert email_off(users)
    worker = channels("email").start()
    await wait_for(lambda: standin.count("m-quinn") == 1, deadline_s=40, what="quinn's mail")
    await wait_for(lambda: all_committed(settings, f"{settings.consumer_group}.channel.email"), deadline_s=30,
                   what="every push record committed")
    assert standin.count("m-pia") == 0 and worker.stats()["skipped"] == {"no_consent": 1}


async def test_a_refused_address_is_a_bounce_but_a_refused_message_is_not(standin):
    """550 to RCPT (user unknown) and HTTP 404 name the address: the person is suppressed. 552 to DATA (too
    large) names the message: the address stays good for the next one."""
    from infogap.stream.channels import ChannelConfig
    from infogap.stream.channels.providers import HttpProvider, SmtpProvider

    now = time.time()
    standin.reject("gone", "email")
    standin.reject("gone", "app")
    smtp = SmtpProvider(ChannelConfig(channel="email", smtp_port=standin.smtp_port))
    huge = push("m-huge", "ok", now=now)
    huge["items"][0]["title"] = "x" * (2 << 20)  # over the service's 1 MiB limit
    try:
        gone = await smtp.send(push("m-gone", "gone", now=now), now)
        too_large = await smtp.send(huge, now)
        fine = await smtp.send(push("m-fine", "ok", now=now), now)  # the same connection goes on
    finally:
        await smtp.close()
    assert (gone.outcome, gone.bounce) == ("permanent", True) and "550" in gone.reason
    assert (too_large.outcome, too_large.bounce) == ("permanent", False) and "552" in too_large.reason
    assert fine.outcome == "accepted" and standin.count("m-fine") == 1
    app = HttpProvider(standin.app_url, 5.0)
    try:
        unregistered = await app.send(push("m-a", "gone", "app", now=now), now)
        bad = await app.send({"message_id": "m-b", "channel": "app"}, now)  # no user_id: a bad request
    finally:
        await app.close()
    assert (unregistered.bounce, bad.outcome, bad.bounce) == (True, "permanent", False)


async def test_a_stop_or_a_second_worker_mid_batch_loses_and_repeats_nothing(settings, standin, channels):
    """SIGTERM in the middle of a batch (every deploy): the worker ends the batch, then stops. A second worker
    joining while the first is sending (a rebalance): partitions move. Each message goes out once."""
    now = time.time()
    users = [f"w{i}" for i in range(32)]
    await consent(settings, *users)
    msgs = [push(f"m-w{i}", u, now=now) for i, u in enumerate(users)]
    await produce(settings, settings.topics.push, [(m["user_id"], m) for m in msgs[:16]])
    first = channels("email", INFOGAP_CHANNEL_RATE_PER_S='{"email": 4}')
    first.start()
    await wait_for(lambda: len(standin.accepted("email")) >= 3, deadline_s=40, what="three mails")
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(60)
    assert first.proc.returncode in (0, EXIT_BATCH_FAILED), first.tail()
    assert all(standin.count(m["message_id"]) <= 1 for m in msgs)

    await produce(settings, settings.topics.push, [(m["user_id"], m) for m in msgs[16:]])
    first.start()  # a restart: the group join and the tables' recovery come first (over 40 s once in CI)
    await wait_for(lambda: len(standin.accepted("email")) >= 20, deadline_s=90, what="twenty mails")
    second = channels("email", INFOGAP_CHANNEL_RATE_PER_S='{"email": 4}', INFOGAP_CHANNEL_INSTANCE_ID="test-email-2")
    second.start()  # joins the group: partitions move while the first is sending
    group = f"{settings.consumer_group}.channel.email"
    await wait_for(lambda: all_committed(settings, group), deadline_s=90, what="every push record committed")
    assert {m["message_id"]: standin.count(m["message_id"]) for m in msgs} == {m["message_id"]: 1 for m in msgs}


async def test_an_outage_of_the_email_service_holds_messages_until_it_is_back(settings, channels, tmp_path):
    """Refused connections are the service's, not the messages': no attempt is counted, nothing is given up."""
    now = time.time()
    port = free_port()
    await consent(settings, "oli", "pat")
    with ProviderStandIn(smtp_port=free_port()) as status:  # the status API stays up; SMTP is down at first
        worker = channels("email", INFOGAP_CHANNEL_SMTP_PORT=port, INFOGAP_CHANNEL_MAX_ATTEMPTS=2,
                          INFOGAP_CHANNEL_STATUS_URL=status.status_url)
        worker.start()
        await produce(settings, settings.topics.push, [(u, push(f"m-{u}", u, now=now)) for u in ("oli", "pat")])
        await wait_for(lambda: ((worker.stats() or {}).get("held") or 0) >= 3, deadline_s=40,
                       what="three rounds held while the service is down")
        with ProviderStandIn(smtp_port=port) as back:
            await wait_for(lambda: back.count("m-oli") == 1 and back.count("m-pat") == 1, deadline_s=60,
                           what="both mails once the service is back")
        # the stand-in counts a mail before it answers 250; the worker counts it sent after the answer
        await wait_for(lambda: ((worker.stats() or {}).get("sent") or 0) >= 2, what="both mails counted sent")
        stats = worker.stats()
        assert (stats["sent"], stats["failed"]) == (2, 0), stats
    dlq = await read_topic(settings, settings.topics.push_dlq, deadline_s=2)
    assert dlq == []
