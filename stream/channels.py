"""Channel workers: deliver one channel's ``push`` messages and report back on ``events``.

``infogap channel email|app|ads`` runs one :class:`ChannelWorker`. It consumes the ``push`` topic
in its own consumer group (``{consumer_group}.channel.{channel}``: every channel sees every
message and keeps only its own), and for each message of its channel:

* skips it if expired (``expires_at`` before the wall clock: delivery is real time) or already
  delivered (same ``message_id`` within ``dedupe_window_s``; in memory, so a crash between a
  delivery and the offset commit can deliver a message twice: at-least-once);
* delivers it: ``email`` by SMTP to ``smtp_host:smtp_port`` (stdlib smtplib in a thread, one
  connection per batch); ``app`` and ``ads`` append one JSON line per message to
  ``{sink_dir}/{channel}.jsonl`` (the stand-in for an app-push or ad-platform API);
* reports an ``impression`` event per delivered message (item_id = the first item; context
  ``{channel, campaign, variant, message_id}``), and in simulation mode ``push_open`` and
  ``push_click`` events decided by a hash of the message id (:func:`feedback_events`);
* commits the offsets only after the deliveries and the events are acknowledged.

infogap keeps no PII: an email goes to the pseudonymous ``{user_id}@{email_domain}``
(``example.invalid`` by default). A real deployment points ``smtp_host`` at a delivery service
that resolves the user id to an address (and handles bounces and unsubscribes) on its side.
"""
from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infogap.models.dedupe import Deduplicator
from infogap.models.experiments import unit_hash
from infogap.models.push_policy import CHANNELS
from infogap.stream import connections
from infogap.stream.settings import Settings

log = logging.getLogger("infogap.channel")


@dataclass(frozen=True)
class ChannelConfig:
    """What a channel worker needs beyond the connections (see docs/experiments.md)."""

    channel: str
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_timeout_s: float = 10.0
    email_from: str = "infogap@example.invalid"
    email_domain: str = "example.invalid"
    sink_dir: Path = field(default_factory=lambda: Path.home() / ".infogap" / "channels")
    open_rate: float = 0.0  # simulation: share of delivered messages reported opened (0: off)
    click_rate: float = 0.0  # simulation: share of opened messages reported clicked
    skip_expired: bool = True  # False: deliver messages past expires_at too (replays of historical data)
    dedupe_window_s: float = 2 * 86_400.0
    batch_max_records: int = 500

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"unknown channel {self.channel!r}; use one of {', '.join(CHANNELS)}")
        for name in ("open_rate", "click_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")

    @classmethod
    def from_settings(cls, settings: Settings, channel: str, **overrides) -> ChannelConfig:
        """From ``channel_*`` settings where present (defaults otherwise), then explicit overrides."""
        base = cls(channel=channel)
        values = {}
        for name in ("smtp_host", "smtp_port", "smtp_timeout_s", "email_from", "email_domain", "sink_dir",
                     "open_rate", "click_rate", "skip_expired"):
            setting = getattr(settings, f"channel_{name}", None)
            if setting is not None:
                values[name] = setting
        if "sink_dir" not in values and getattr(settings, "local_dir", None) is not None:
            values["sink_dir"] = Path(settings.local_dir) / "channels"
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "sink_dir" in values:
            values["sink_dir"] = Path(values["sink_dir"])
        return replace(base, **values)


# ------------------------------------------------------------------------------------------ pure parts
def address_for(user_id: str, domain: str) -> str:
    """The pseudonymous address of a user: infogap holds no email addresses.

    >>> address_for("u42", "example.invalid"), address_for("a b/é", "example.invalid")
    ('u42@example.invalid', 'a_b__@example.invalid')
    """
    local = re.sub(r"[^A-Za-z0-9._+-]", "_", user_id).strip(".") or "_"
    return f"{local}@{domain}"


def check_message(msg: object) -> str | None:
    """Why a ``push`` record cannot be delivered, or None if it can."""
    if not isinstance(msg, dict):
        return "a push message must be a JSON object"
    for name in ("message_id", "user_id", "channel"):
        if not isinstance(msg.get(name), str) or not msg[name]:
            return f"push message needs a non-empty string {name!r}"
    items = msg.get("items")
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) and i.get("item_id") for i in items):
        return "push message needs a non-empty 'items' list of objects with 'item_id'"
    return None


def feedback_events(msg: Mapping, delivered_at: float, open_rate: float = 0.0, click_rate: float = 0.0) -> list[dict]:
    """Contract events reporting one delivered message: an impression, and simulated opens and clicks.

    Simulation is deterministic: a message is opened if ``unit_hash("open", message_id) < open_rate``
    and, once opened, clicked if ``unit_hash("click", message_id) < click_rate``. Event ids derive from
    the message id, so a re-delivery reports duplicates that ingest counts once.

    >>> msg = {"message_id": "m-1", "user_id": "u1", "channel": "app", "campaign": "recs", "variant": "B",
    ...        "items": [{"item_id": "sku-1"}, {"item_id": "sku-2"}]}
    >>> [(e["type"], e["event_id"], e.get("item_id")) for e in feedback_events(msg, 1.7e9, 1.0, 1.0)]
    [('impression', 'imp-m-1', 'sku-1'), ('push_open', 'open-m-1', None), ('push_click', 'click-m-1', 'sku-1')]
    """
    mid, user = msg["message_id"], msg["user_id"]
    context = {"channel": msg["channel"], "campaign": msg.get("campaign"), "variant": msg.get("variant"),
               "message_id": mid}
    context = {k: str(v) for k, v in context.items() if v is not None}
    items = msg["items"]
    out = [{"event_id": f"imp-{mid}", "user_id": user, "type": "impression", "item_id": items[0]["item_id"],
            "ts": delivered_at, "context": context}]
    if open_rate > 0 and unit_hash("open", mid) < open_rate:
        out.append({"event_id": f"open-{mid}", "user_id": user, "type": "push_open", "ts": delivered_at + 1.0,
                    "context": context})
        if click_rate > 0 and unit_hash("click", mid) < click_rate:
            item = items[min(len(items) - 1, int(unit_hash("item", mid) * len(items)))]["item_id"]
            out.append({"event_id": f"click-{mid}", "user_id": user, "type": "push_click", "item_id": item,
                        "ts": delivered_at + 2.0, "context": context})
    return out


def email_for(msg: Mapping, cfg: ChannelConfig) -> EmailMessage:
    """The email of one push message (plain text; headers carry the attribution context)."""
    em = EmailMessage()
    em["From"] = cfg.email_from
    em["To"] = address_for(msg["user_id"], cfg.email_domain)
    em["Subject"] = "New picks for you"
    em["Message-ID"] = f"<{msg['message_id']}@infogap.invalid>"
    em["X-Infogap-Message-Id"] = msg["message_id"]
    em["X-Infogap-Campaign"] = str(msg.get("campaign") or "")
    em["X-Infogap-Variant"] = str(msg.get("variant") or "")
    lines = [str(msg.get("reason") or "New picks for you."), ""]
    lines += [f"- {i.get('title') or i['item_id']}" + (f": {i['reason']}" if i.get("reason") else "")
              for i in msg["items"]]
    em.set_content("\n".join(lines) + "\n")
    return em


# ------------------------------------------------------------------------------------------ delivery
@dataclass
class DeliveryResult:
    delivered: list[dict] = field(default_factory=list)
    failed: list[tuple[dict, str]] = field(default_factory=list)  # permanent: dropped with a reason
    retry: list[dict] = field(default_factory=list)  # transient: tried again


class SmtpDelivery:
    """Email through an SMTP server, one connection per batch, in a thread (stdlib smtplib)."""

    def __init__(self, cfg: ChannelConfig):
        self.cfg = cfg

    async def deliver(self, messages: Sequence[dict], delivered_at: float) -> DeliveryResult:
        return await asyncio.to_thread(self._send, list(messages))

    def _send(self, messages: list[dict]) -> DeliveryResult:
        cfg, res, i = self.cfg, DeliveryResult(), 0
        try:
            smtp = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=cfg.smtp_timeout_s)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("SMTP %s:%s unavailable (%s)", cfg.smtp_host, cfg.smtp_port, exc)
            res.retry = messages
            return res
        try:
            for i, msg in enumerate(messages):
                try:
                    smtp.send_message(email_for(msg, cfg))
                    res.delivered.append(msg)
                except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                    res.failed.append((msg, f"refused by the SMTP server: {exc}"))
            i = len(messages)
        except (OSError, smtplib.SMTPException) as exc:  # connection lost: this one and the rest again
            log.warning("SMTP connection lost after %d messages (%s)", i, exc)
            res.retry = messages[i:]
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()
        return res


class JsonlDelivery:
    """Appends ``{**message, "delivered_at"}`` as one JSON line per message to a file (app and ads sink)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    async def deliver(self, messages: Sequence[dict], delivered_at: float) -> DeliveryResult:
        await asyncio.to_thread(self._append, messages, delivered_at)
        return DeliveryResult(delivered=list(messages))

    def _append(self, messages: Sequence[dict], delivered_at: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(b"".join(orjson.dumps({**m, "delivered_at": delivered_at}) + b"\n" for m in messages))
            f.flush()


def delivery_for(cfg: ChannelConfig):
    return SmtpDelivery(cfg) if cfg.channel == "email" else JsonlDelivery(cfg.sink_dir / f"{cfg.channel}.jsonl")


# ------------------------------------------------------------------------------------------ worker
@dataclass
class ChannelStats:
    received: int = 0
    delivered: int = 0
    other_channel: int = 0
    expired: int = 0
    duplicates: int = 0
    invalid: int = 0
    failed: int = 0
    retries: int = 0
    events_out: int = 0
    batches: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class ChannelWorker:
    """Consumes ``push`` for one channel, delivers, reports ``impression`` (and simulated) events.

    ``clock`` gives wall-clock epoch seconds, for expiry and the reported events' ``ts``.
    """

    def __init__(self, settings: Settings, config: ChannelConfig, *, delivery=None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.config = config
        self.channel = config.channel
        self.group_id = f"{settings.consumer_group}.channel.{config.channel}"
        self.delivery = delivery or delivery_for(config)
        self.dedupe = Deduplicator(config.dedupe_window_s, 1_000_000)
        self.clock = clock
        self.stats = ChannelStats()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set; always closes its connections."""
        self._stop = stop = stop or asyncio.Event()
        s = self.settings
        self._producer = connections.producer(s, linger_ms=5, acks="all")
        self._consumer = connections.consumer(s, s.topics.push, group_id=self.group_id, enable_auto_commit=False,
                                              auto_offset_reset="earliest")
        try:
            await self._producer.start()
            await self._consumer.start()
            self.ready.set()
            log.info("%s channel worker ready: group=%s topic=%s", self.channel, self.group_id, s.topics.push)
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=s.batch_timeout_ms,
                                                     max_records=self.config.batch_max_records)
                records = [r for recs in batch.values() for r in recs]
                if records and await self.process(records):
                    await self._consumer.commit()
        finally:
            for closer in (self._consumer.stop, self._producer.stop):
                try:
                    await closer()
                except Exception:  # closing is best effort: the process is ending anyway
                    log.exception("error while closing")

    async def process(self, records) -> bool:
        """Deliver one batch and report it; False if stopped before everything was delivered (no commit)."""
        st = self.stats
        now = self.clock()
        todo: list[dict] = []
        for rec in records:
            st.received += 1
            try:
                msg = orjson.loads(rec.value) if rec.value is not None else None
            except orjson.JSONDecodeError:
                msg = None
            reason = check_message(msg)
            if reason is not None:
                st.invalid += 1
                log.warning("skipping push record %s/%s@%s: %s", rec.topic, rec.partition, rec.offset, reason)
                continue
            if msg["channel"] != self.channel:
                st.other_channel += 1
                continue
            expires = msg.get("expires_at")
            if self.config.skip_expired and isinstance(expires, (int, float)) and expires <= now:
                st.expired += 1
                continue
            created = msg.get("created_at")
            if self.dedupe.seen(msg["message_id"], float(created) if isinstance(created, (int, float)) else now):
                st.duplicates += 1
                continue
            todo.append(msg)
        delay = 0.2
        while todo:
            delivered_at = self.clock()
            res = await self.delivery.deliver(todo, delivered_at)
            for msg, why in res.failed:
                st.failed += 1
                log.warning("message %s not delivered: %s", msg["message_id"], why)
            if res.delivered:
                await self._report(res.delivered, delivered_at)
                st.delivered += len(res.delivered)
            todo = res.retry
            if todo:
                st.retries += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    return False
                except asyncio.TimeoutError:
                    delay = min(delay * 2, 10.0)
        st.batches += 1
        return True

    async def _report(self, delivered: list[dict], delivered_at: float) -> None:
        cfg, topic = self.config, self.settings.topics.events
        futures = []
        for msg in delivered:
            for ev in feedback_events(msg, delivered_at, cfg.open_rate, cfg.click_rate):
                futures.append(await self._producer.send(topic, orjson.dumps(ev), key=msg["user_id"].encode()))
        if futures:
            await asyncio.gather(*futures)
        self.stats.events_out += len(futures)
