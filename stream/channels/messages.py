"""What a channel worker reads and writes: push messages checked, the mail of a message, and the events and
dead letters that report what became of it. Pure functions of their arguments.

infogap keeps no PII: an email goes to the pseudonymous ``{user_id}@{email_domain}`` (``example.invalid`` by
default); a real deployment points the worker at a delivery service that resolves the user id to an address.
"""
from __future__ import annotations

import email.policy
import hashlib
import re
from collections.abc import Mapping
from email.message import EmailMessage

import orjson

from infogap.models.catalog import check_id
from infogap.models.experiments import unit_hash
from infogap.stream.channels import unsubscribe
from infogap.stream.channels.config import ChannelConfig

#: Headers are not folded below 998 characters (RFC 5322's limit): a folded ``List-Unsubscribe`` URL would be
#: RFC 2047-encoded, and mail clients would not find the link.
_MAIL_POLICY = email.policy.SMTP.clone(max_line_length=998)
#: A push.dlq record keeps at most this many bytes of a record that was not a push message.
MAX_RAW_PREVIEW = 4096
#: A push.dlq record keeps a message whole up to this size as JSON, else a preview of MAX_RAW_PREVIEW bytes.
MAX_DLQ_MESSAGE_BYTES = 64 * 1024


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
        try:
            check_id(name, msg[name])
        except ValueError as exc:
            return f"push message: {exc}"
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
    context = context_of(msg)
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


def context_of(msg: Mapping) -> dict[str, str]:
    """The attribution context of the events reporting on ``msg``."""
    context = {"channel": msg["channel"], "campaign": msg.get("campaign"), "variant": msg.get("variant"),
               "message_id": msg["message_id"]}
    return {k: str(v) for k, v in context.items() if v is not None}


def bounce_event(msg: Mapping, at: float) -> dict:
    """The ``push_bounce`` event of a message the provider refused for good (the user stage turns consent off).

    >>> bounce_event({"message_id": "m-1", "user_id": "u1", "channel": "email"}, 5.0)["event_id"]
    'bounce-m-1'
    """
    return {"event_id": f"bounce-{msg['message_id']}", "user_id": msg["user_id"], "type": "push_bounce", "ts": at,
            "context": context_of(msg)}


def unsubscribe_event(user_id: str, channel: str, at: float) -> dict:
    """The ``unsubscribe`` event of a person who followed a message's unsubscribe link."""
    digest = hashlib.blake2b(f"{channel}|{user_id}".encode(), digest_size=8).hexdigest()  # repeats count once
    return {"event_id": f"unsub-{digest}", "user_id": user_id, "type": "unsubscribe",
            "ts": at, "context": {"channel": channel}}


def dead_letter(msg: Mapping | None, raw: bytes | None, channel: str, code: str, reason: str, at: float) -> bytes:
    """A ``push.dlq`` record: the message (or a preview of the raw record), why and when (docs/contracts.md).
    A message over :data:`MAX_DLQ_MESSAGE_BYTES` as JSON is kept as a preview of its text: the record must stay
    under the producer's request size."""
    if msg is not None:
        text = orjson.dumps(msg)
        message = msg if len(text) <= MAX_DLQ_MESSAGE_BYTES else text[:MAX_RAW_PREVIEW].decode("utf-8", "replace")
    else:
        message = (raw or b"")[:MAX_RAW_PREVIEW].decode("utf-8", "replace")
    return orjson.dumps({"message": message, "channel": channel, "reason": reason[:1000], "code": code, "at": at})


def email_for(msg: Mapping, cfg: ChannelConfig, now: float) -> EmailMessage:
    """The email of one push message: plain text, the attribution context and the unsubscribe headers."""
    em = EmailMessage(policy=_MAIL_POLICY)
    em["From"] = cfg.email_from
    em["To"] = address_for(msg["user_id"], cfg.email_domain)
    em["Subject"] = "New picks for you"
    em["Message-ID"] = f"<{msg['message_id']}@infogap.invalid>"
    em["X-Infogap-Message-Id"] = msg["message_id"]
    em["X-Infogap-Campaign"] = str(msg.get("campaign") or "")
    em["X-Infogap-Variant"] = str(msg.get("variant") or "")
    for name, value in unsubscribe.headers(cfg.unsubscribe_key, msg["user_id"], "email", now, cfg.unsubscribe_ttl_s,
                                           cfg.unsubscribe_url, cfg.email_domain).items():
        em[name] = value
    lines = [str(msg.get("reason") or "New picks for you."), ""]
    lines += [f"- {i.get('title') or i['item_id']}" + (f": {i['reason']}" if i.get("reason") else "")
              for i in msg["items"]]
    lines += ["", "Unsubscribe: " + em["List-Unsubscribe"].split(", <")[1].rstrip(">")]
    em.set_content("\n".join(lines) + "\n")
    return em
