"""A channel worker: a faust-streaming app that delivers one channel's ``push`` messages exactly once.

``infogap channel email|app|ads`` runs :class:`ChannelApp`: one agent over ``push`` (its own consumer
group, ``{consumer_group}.channel.{channel}``: every channel sees every message and keeps its own), taking
messages in batches. For each batch it:

1. reads ``users``, ``erasures`` and ``suppressions`` up to their end offsets (:mod:`.permissions`): a consent
   withdrawn, an erasure or a suppression before the batch holds for all of it (and they are read again
   before each round of retries, and checked again right before each message is handed over);
2. looks each message up in the ``outcomes`` table (:mod:`.outcomes`): a message with a final outcome is
   never handed over again; one left ``pending`` by a crash is in doubt: the email service's status API
   says whether it took it (else it is sent again), an HTTP service gets it again under the same
   idempotency key;
3. skips messages it may not send (no consent, erased, suppressed, expired), and for the rest, a window at a
   time, writes ``pending`` and waits for Kafka to acknowledge it, then hands them over at ``rate_per_s``
   at most (the window is one message when a message in doubt could not be looked up);
4. records each outcome: ``sent`` (and an ``impression`` event, plus simulated opens and clicks), ``bounced``
   (a ``push_bounce`` event, a ``push.dlq`` record, and the user suppressed on this channel), ``refused``
   (the message, not the address: a ``push.dlq`` record), or, after ``max_attempts`` transient failures of
   the message with exponential backoff, ``failed`` (a ``push.dlq`` record). While the service itself is
   unreachable or overloaded, every message waits, however long, without counting attempts;
5. returns, and Faust commits the offsets. A stop or a rebalance waits for the batch to end
   (``stream_wait_empty``); a batch that cannot end (Kafka refusing a write, a bug, a cancellation) ends
   the process instead (exit 70), so that nothing of it is committed.

A worker killed anywhere in between finds, after its restart, the messages of the uncommitted batches again,
and the table as Kafka last acknowledged it: each message is handed over once (see docs/channels.md). The
email worker serves the unsubscribe links of its mails (``/unsubscribe``, RFC 8058 one-click); every worker
serves ``/stats``.
"""
from __future__ import annotations

import asyncio
import html
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faust
import orjson
from faust.types import TP
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily

from infogap.stream import connections
from infogap.stream.channels import outcomes, unsubscribe
from infogap.stream.channels.config import ChannelConfig
from infogap.stream.channels.messages import (bounce_event, check_message, dead_letter, feedback_events,
                                              unsubscribe_event)
from infogap.stream.channels.permissions import PermissionReader, Permissions
from infogap.stream.channels.providers import Attempt, provider_for
from infogap.stream.core.erasures import ErasureLedger
from infogap.stream.pseudonym import Pseudonymizer
from infogap.stream.settings import TOPIC_PARTITIONS, Settings

log = logging.getLogger("infogap.channel")

#: Test seam: ``point:n`` kills the worker with SIGKILL the n-th time it reaches ``point`` (one of
#: :data:`CRASH_POINTS`), to prove that a crash there sends nothing twice (tests/integration/test_channels.py).
CRASH_ENV = "INFOGAP_CHANNEL_CRASH_AT"
CRASH_POINTS = ("before_delivery", "after_accept", "before_commit")
#: Entries of messages that carry no expiry stay in the outcomes table this long.
KEEP_WITHOUT_EXPIRY_S = 2 * 86_400.0
#: ... and no entry longer than this (a message may claim to expire in a thousand years).
MAX_KEEP_S = 7 * 86_400.0
MAX_BACKOFF_S = 30.0
#: Messages whose ``pending`` is written (and acknowledged) together before they are handed over, one by one.
PENDING_WINDOW = 50
#: The exit code of a worker that could not complete a batch (a Faust agent that raised would stay down while
#: its process lives on): its supervisor restarts it, and the batch is taken again.
EXIT_BATCH_FAILED = 70


@dataclass
class ChannelStats:
    received: int = 0
    sent: int = 0
    other_channel: int = 0
    duplicates: int = 0
    in_doubt: int = 0
    held: int = 0
    revoked: int = 0
    invalid: int = 0
    bounced: int = 0
    refused: int = 0
    failed: int = 0
    retries: int = 0
    events_out: int = 0
    batches: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(self.skipped)}


@dataclass
class _Todo:
    partition: int
    msg: dict
    key: bytes
    keep_until: float
    doubt: bool
    expires: float | None = None
    pending: bool = False
    attempts: int = 0
    last: Attempt | None = None


def _credentials(settings: Settings):
    opts = connections.kafka_options(settings)
    proto = opts.get("security_protocol", "PLAINTEXT")
    if proto.startswith("SASL_"):
        return faust.SASLCredentials(username=opts["sasl_plain_username"], password=opts["sasl_plain_password"],
                                     mechanism=opts["sasl_mechanism"], ssl_context=opts.get("ssl_context"))
    if proto == "SSL":
        return faust.SSLCredentials(opts["ssl_context"])
    return None


class ChannelApp:
    """The channel worker of ``config.channel``; :meth:`run` blocks until SIGINT/SIGTERM.

    >>> app = ChannelApp(Settings(consumer_group="shop"), ChannelConfig(channel="app"))
    >>> keys = app.permissions.suppression_key
    >>> app.app.conf.id, app.outcomes.name, keys("u42") == keys("u43")
    ('shop.channel.app', 'outcomes', False)
    """

    def __init__(self, settings: Settings, config: ChannelConfig, *, provider=None,
                 clock: Callable[[], float] = time.time):
        s, t, cfg = settings, settings.topics, config
        self.settings, self.config, self.channel, self.clock = s, config, config.channel, clock
        self.provider = provider or provider_for(config)
        self.stats = ChannelStats()
        partitions = TOPIC_PARTITIONS["push"]
        datadir = Path(s.local_dir).expanduser() / "faust"
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            f"{s.consumer_group}.channel.{cfg.channel}",
            broker=[f"kafka://{h.strip()}" for h in s.kafka_bootstrap.split(",")],
            broker_credentials=_credentials(s), store="memory://", topic_partitions=partitions,
            producer_acks=-1, producer_linger=0.005, consumer_auto_offset_reset="earliest", stream_wait_empty=True,
            consumer_group_instance_id=cfg.instance_id, broker_session_timeout=10.0, broker_heartbeat_interval=3.0,
            datadir=str(datadir / cfg.channel),
            web_enabled=True, web_host=cfg.web_host, web_port=cfg.web_port, web_bind=cfg.web_host,
            web_router_enabled=False, web_tables_enabled=False, web_graph_enabled=False,
            web_stats_enabled=False, web_metrics_enabled=False)
        raw = {"key_type": bytes, "value_type": bytes}
        topic = {**raw, "key_serializer": "raw", "value_serializer": "raw"}
        self.push_topic = self.app.topic(t.push, **topic)
        self.events_topic = self.app.topic(t.events, **topic)
        self.dlq_topic = self.app.topic(t.push_dlq, **topic)
        self.suppressions_topic = self.app.topic(t.suppressions, **topic)
        self.outcomes = self.app.Table("outcomes", partitions=partitions, **raw)
        ledger_key = s.state_key or s.pseudonym_key  # the user stage's: the same digests
        self.permissions = Permissions(cfg.channel, Pseudonymizer.from_settings(s),
                                       ErasureLedger(ledger_key.get_secret_value().encode() if ledger_key else None),
                                       suppression_key=cfg.unsubscribe_key)
        self.reader = PermissionReader(s, self.permissions)
        self.bucket = outcomes.TokenBucket(cfg.rate_per_s, max(1.0, cfg.rate_per_s), time.monotonic())
        self._started = False
        self._futures: list = []
        crash = os.environ.get(CRASH_ENV, "")
        point, _, nth = crash.partition(":")
        self._crash_at = (point, int(nth or 1)) if point in CRASH_POINTS else None
        self._crash_seen = 0
        self.app.agent(self.push_topic, name=f"infogap.channel.{cfg.channel}.deliver")(self._deliver)
        self.app.timer(60.0)(self._forget_expired)
        self._routes()

    # ------------------------------------------------------------------ running
    def run(self) -> None:
        """Run the Faust worker in this process until SIGINT/SIGTERM."""
        worker = faust.Worker(self.app, loglevel=logging.getLevelName(log.getEffectiveLevel()).lower(),
                              quiet=True, override_logging=False)
        worker.execute_from_commandline()

    async def _deliver(self, stream):
        async for events in stream.take_events(self.config.batch_max_records, within=self.config.batch_within_s):
            try:
                if not self._started:
                    await self.reader.start()
                    self._started = True
                await self.handle(events)
            except BaseException:  # Kafka refusing a write, a bug, a cancellation mid-batch: Faust would ack it
                log.critical("the %s channel worker stops: a batch could not be completed; its messages are taken "
                             "again after the restart, each still sent once", self.channel, exc_info=True)
                os._exit(EXIT_BATCH_FAILED)
            self._crash("before_commit")

    # ------------------------------------------------------------------ one batch
    async def handle(self, events) -> None:
        """Deliver one batch of ``push`` records (see the module's docstring); returns once every outcome,
        event and dead letter is acknowledged by Kafka."""
        st, cfg = self.stats, self.config
        now = self.clock()
        await self.reader.sync()
        todo: list[_Todo] = []
        seen: set[bytes] = set()
        for ev in events:
            st.received += 1
            try:
                msg = orjson.loads(ev.value) if ev.value is not None else None
            except orjson.JSONDecodeError:
                msg = None
            reason = check_message(msg)
            if reason is not None:
                st.invalid += 1
                self._dead(None, ev.value, ev.key, "invalid", reason, now)
                continue
            if msg["channel"] != self.channel:
                st.other_channel += 1
                continue
            key = msg["message_id"].encode()
            doc = outcomes.decode(self.outcomes.get(key))
            if outcomes.is_final(doc) or key in seen:
                st.duplicates += 1
                continue
            seen.add(key)
            expires = msg.get("expires_at")
            expires = float(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else None
            keep = (min(expires, now + MAX_KEEP_S) + 3_600.0 if expires is not None and cfg.skip_expired
                    else now + KEEP_WITHOUT_EXPIRY_S)
            item = _Todo(ev.message.partition, msg, key, keep, doubt=doc is not None,
                         expires=expires if cfg.skip_expired else None, pending=doc is not None)
            st.in_doubt += item.doubt
            todo.append(item)
        await self._send_all(todo)
        st.batches += 1
        futures, self._futures = self._futures, []
        await asyncio.gather(*futures)

    def _blocked(self, item: _Todo, now: float) -> bool:
        """Whether the message may not go out now (recorded ``skipped`` with the reason); also when a rebalance
        gave its partition to another worker (then left alone: that worker sends it)."""
        if TP(self.push_topic.get_topic_name(), item.partition) not in self.app.consumer.assignment():
            self.stats.revoked += 1
            return True
        why = self.permissions.why_not(item.msg["user_id"])
        if why is None and item.expires is not None and item.expires <= now:
            why = "expired"
            self._dead(item.msg, None, None, "expired", f"expired at {item.expires} before it could be sent", now)
        if why is None:
            return False
        self.stats.skipped[why] += 1
        self._record(item, "skipped", now, why)
        return True

    async def _send_all(self, todo: list[_Todo]) -> None:
        """Hand the messages over (see the module's docstring), until each has a final outcome."""
        cfg, st = self.config, self.stats
        window = 1 if not (self.provider.idempotent or cfg.status_url) else PENDING_WINDOW
        delay = cfg.retry_base_s
        while todo:
            again: list[_Todo] = []
            held = False
            for start in range(0, len(todo), window):
                now = self.clock()
                ready = []
                for item in todo[start:start + window]:
                    if held:
                        again.append(item)
                    elif self._blocked(item, now):
                        continue
                    elif item.doubt and not self.provider.idempotent:
                        settled = await self._settle(item, now)
                        if settled is None:  # the status API cannot tell now: hold, ask again later
                            held = True
                            again.append(item)
                        elif not settled:
                            ready.append(item)
                    else:
                        ready.append(item)
                fresh = [i for i in ready if not i.pending]
                if fresh:
                    await asyncio.gather(*[self._record(i, "pending", now) for i in fresh])
                    for i in fresh:
                        i.pending = True
                for item in ready:
                    if held:
                        again.append(item)
                        continue
                    held = await self._hand_over(item, again)
            todo = again
            if todo:
                st.retries += 1
                st.held += held
                await asyncio.sleep(delay)
                delay = min(MAX_BACKOFF_S, delay * 2)
                await self.reader.sync()

    async def _hand_over(self, item: _Todo, again: list[_Todo]) -> bool:
        """One message to the provider; True if the service is unreachable or overloaded (hold the rest)."""
        wait = self.bucket.wait(time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)
        now = self.clock()
        if self._blocked(item, now):  # an unsubscribe served, or a rebalance, while this batch ran
            return False
        self._crash("before_delivery")
        item.last = result = await self.provider.send(item.msg, now)
        now = self.clock()
        if result.outcome == "accepted":
            self._crash("after_accept")
            self._sent(item, now)
        elif result.outcome == "doubt":  # the data went out and the answer did not come back: ask first
            item.doubt = True
            again.append(item)
        elif result.bounce:
            self._bounced(item, now)
        elif result.outcome == "permanent":
            self._refused(item, now)
        elif result.service:
            again.append(item)
            return True
        else:
            item.attempts += 1
            if item.attempts < self.config.max_attempts:
                again.append(item)
            else:
                self._failed(item, now)
        return False

    async def _settle(self, item: _Todo, now: float) -> bool | None:
        """A message in doubt, on a provider without idempotency: True if settled (the provider took it, or
        there is no way to ask: then not repeated), False to send it, None if the status API cannot tell now."""
        accepted = await self.provider.accepted(item.msg["message_id"])
        if accepted is True:
            self._sent(item, now)
            return True
        if accepted is False:
            item.doubt = False
            return False
        if self.config.status_url:
            return None
        self._record(item, "unknown", now, "in_doubt")
        self._dead(item.msg, None, None, "in_doubt", "the worker stopped while handing the message over, and "
                   "no status API (INFOGAP_CHANNEL_STATUS_URL) can tell whether it was taken; not repeated", now)
        return True

    # ------------------------------------------------------------------ outcomes
    def _sent(self, item: _Todo, now: float) -> None:
        self.stats.sent += 1
        self._record(item, "sent", now)
        events = feedback_events(item.msg, now, self.config.open_rate, self.config.click_rate)
        self._emit(item.msg["user_id"], events)

    def _bounced(self, item: _Todo, now: float) -> None:
        self.stats.bounced += 1
        self._record(item, "bounced", now)
        self._emit(item.msg["user_id"], [bounce_event(item.msg, now)])
        self._dead(item.msg, None, None, "bounced", f"the {self.channel} provider refused the address for good: "
                   f"{item.last.reason}", now)
        fut = self._suppress(item.msg["user_id"], self.channel, "hard_bounce", now)
        if fut is not None:
            self._futures.append(fut)

    def _refused(self, item: _Todo, now: float) -> None:
        """The service refused this message for good, not the address: no bounce, no suppression."""
        self.stats.refused += 1
        self._record(item, "refused", now)
        self._dead(item.msg, None, None, "refused", f"the {self.channel} provider refused this message for good "
                   f"(the address stays): {item.last.reason}", now)

    def _failed(self, item: _Todo, now: float) -> None:
        self.stats.failed += 1
        self._record(item, "failed", now)
        self._dead(item.msg, None, None, "gave_up", f"gave up after {item.attempts} attempts; last: "
                   f"{item.last.reason}", now)

    def _record(self, item: _Todo, state: str, now: float, why: str | None = None):
        """Set the message's outcome (``why``: a code, never a provider's text, which may hold an address); the
        returned future resolves once Kafka has the changelog record."""
        value = outcomes.encode(state, now, item.partition, item.keep_until, why)
        fut = self.outcomes.send_changelog(item.partition, item.key, value)
        self.outcomes.data[item.key] = value
        self._futures.append(fut)
        return fut

    def _emit(self, user_id: str, events: list[dict]) -> None:
        for ev in events:
            self._futures.append(self.events_topic.send_soon(key=user_id.encode(), value=orjson.dumps(ev)))
        self.stats.events_out += len(events)

    def _dead(self, msg, raw, key, code: str, reason: str, now: float) -> None:
        if code not in ("invalid", "expired"):
            log.warning("message %s to push.dlq (%s)", msg and msg.get("message_id"), code)
        value = dead_letter(msg, raw, self.channel, code, reason, now)
        key = msg["user_id"].encode() if msg is not None else (key[:256] if key is not None else None)
        self._futures.append(self.dlq_topic.send_soon(key=key, value=value))

    # ------------------------------------------------------------------ suppression
    def _suppress(self, user_id: str, channel: str, why: str, now: float):
        """Put the user on ``channel``'s suppression list (here at once; every worker on its next read); the
        future of its record, or None if they were on it already."""
        key = self.permissions.suppression_key(user_id, channel)
        if key in self.permissions.suppressed:
            return None
        self.permissions.suppressed.add(key)
        return self.suppressions_topic.send_soon(key=key, value=orjson.dumps({"why": why, "at": now}))

    async def _forget_expired(self) -> None:
        """Entries of messages that can no longer be delivered leave the table (and its changelog): final ones
        only (a ``pending`` entry stays until it is settled), of this worker's partitions."""
        now = self.clock()
        mine = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.push_topic.get_topic_name()}
        try:
            for key, value in list(self.outcomes.data.items()):
                doc = outcomes.decode(value)
                p = doc.get("p")
                if (outcomes.is_final(doc) and outcomes.expired(doc, now) and isinstance(p, int)
                        and not isinstance(p, bool) and p in mine):
                    self.outcomes.send_changelog(p, key, None, value_serializer="raw")
                    self.outcomes.data.pop(key, None)
        except Exception:  # never fatal: the entries stay until the next pass
            log.exception("could not drop expired outcomes")

    # ------------------------------------------------------------------ crash seam
    def _crash(self, point: str) -> None:
        if self._crash_at is not None and self._crash_at[0] == point:
            self._crash_seen += 1
            if self._crash_seen == self._crash_at[1]:
                log.warning("%s=%s: SIGKILL now", CRASH_ENV, os.environ.get(CRASH_ENV))
                os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ web
    def _routes(self) -> None:
        channel_app = self

        class Unsubscribe(faust.web.View):
            async def get(self, request):
                token = request.query.get("t", "")
                try:
                    unsubscribe.verify(channel_app.config.unsubscribe_key, token, channel_app.clock())
                except ValueError as exc:
                    return self.html(_page(str(exc).capitalize() + "."), status=400)
                form = (f'<form method="post" action="?t={html.escape(token, quote=True)}">'
                        '<button type="submit">Unsubscribe</button></form>')
                return self.html(_page(f"Stop receiving {channel_app.channel} messages from us?", form))

            async def post(self, request):
                status, text = await channel_app.unsubscribe(request.query.get("t", ""))
                return self.html(_page(text), status=status)

        class Stats(faust.web.View):
            async def get(self, request):
                return self.json({"channel": channel_app.channel, **channel_app.stats.as_dict(),
                                  "outcomes": len(channel_app.outcomes.data),
                                  "suppressed": len(channel_app.permissions.suppressed),
                                  "users_with_consent": len(channel_app.permissions)})

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_StatsCollector(self))
        ProcessCollector(registry=registry)

        class Metrics(faust.web.View):
            async def get(self, request):
                return self.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

        if self.channel == "email":  # the only channel whose messages carry unsubscribe links
            self.app.page("/unsubscribe")(Unsubscribe)
        self.app.page("/stats")(Stats)
        self.app.page("/metrics")(Metrics)

    async def unsubscribe(self, token: str) -> tuple[int, str]:
        """Act on a one-click unsubscribe: suppress the user on the token's channel, and report an
        ``unsubscribe`` event (the user stage turns the consent off in the ``users`` record)."""
        now = self.clock()
        try:
            user_id, channel = unsubscribe.verify(self.config.unsubscribe_key, token, now)
        except ValueError as exc:
            return 400, str(exc).capitalize() + "."
        if self.permissions.ledger.erased(user_id):  # nothing to write about a person erased
            return 200, f"You are unsubscribed from our {channel} messages."
        suppressed = self._suppress(user_id, channel, "unsubscribe", now)
        if suppressed is not None:  # the first click: a repeated one writes nothing more
            await suppressed
            await (await self.events_topic.send(key=user_id.encode(),
                                                value=orjson.dumps(unsubscribe_event(user_id, channel, now))))
        return 200, f"You are unsubscribed from our {channel} messages."


class _StatsCollector:
    """A channel worker's :class:`ChannelStats` for Prometheus, read at scrape time. Label values come from a
    fixed set (outcomes, skip reasons), never from input."""

    def __init__(self, channel_app: ChannelApp):
        self.app = channel_app

    def collect(self):
        st, channel = self.app.stats, self.app.channel
        messages = CounterMetricFamily("infogap_channel_messages", "push messages of this channel by outcome "
                                       "(sent, bounced, refused, failed, skipped_<reason>, duplicate, invalid)",
                                       labels=["channel", "outcome"])
        for outcome, n in (("sent", st.sent), ("bounced", st.bounced), ("refused", st.refused),
                           ("failed", st.failed), ("duplicate", st.duplicates), ("invalid", st.invalid),
                           *((f"skipped_{why}", n) for why, n in st.skipped.items())):
            messages.add_metric([channel, outcome], n)
        yield messages
        for name, doc, value in (("channel_retry_rounds", "rounds of retries (transient failures, outages)",
                                  st.retries),
                                 ("channel_held_rounds", "rounds held because the service was unreachable or "
                                  "overloaded", st.held),
                                 ("channel_in_doubt", "messages found pending after a restart", st.in_doubt),
                                 ("channel_batches", "batches of push records completed", st.batches)):
            family = CounterMetricFamily(f"infogap_{name}", doc, labels=["channel"])
            family.add_metric([channel], value)
            yield family


def _page(text: str, extra: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>Unsubscribe</title></head>"
            f"<body><p>{html.escape(text)}</p>{extra}</body></html>")
