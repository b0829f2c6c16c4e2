"""The delivery services a channel worker hands messages to, each answering one message at a time with an
:class:`Attempt`: ``accepted``, ``transient`` (try again later: SMTP 4xx, HTTP 429/5xx, timeouts, refused
connections) or ``permanent`` (SMTP 5xx, HTTP 4xx: never again). A permanent failure is a *bounce* when it
is the address the service refuses (SMTP 5xx to RCPT, such as ``550 user unknown``; HTTP 404 or 410: the
device or audience member is gone): the person is then suppressed on the channel. When the service refuses
the message itself (SMTP 5xx to DATA, such as ``552`` too large; other HTTP 4xx), the address stays.

* :class:`SmtpProvider` (``email``): SMTP with stdlib smtplib in a thread, one connection kept open. SMTP has
  no idempotency: a message in doubt after a crash is looked up in the service's status API
  (``status_url``, like an email service's search by Message-ID) before it is sent again.
* :class:`HttpProvider` (``app``, ``ads``): JSON over HTTP with the message id as ``Idempotency-Key``: a
  message in doubt is sent again, and the service counts it once.
"""
from __future__ import annotations

import asyncio
import logging
import smtplib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from infogap.stream.channels.config import ChannelConfig
from infogap.stream.channels.messages import email_for

log = logging.getLogger("infogap.channel")


@dataclass(frozen=True)
class Attempt:
    """What the provider said about one message."""

    outcome: str  # "accepted", "transient" or "permanent"
    reason: str = ""
    bounce: bool = False  # permanent, and about the address: the person is suppressed on the channel


ACCEPTED = Attempt("accepted")


def _smtp_attempt(code: int, text: object, recipient: bool) -> Attempt:
    detail = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    permanent = code >= 500
    return Attempt("permanent" if permanent else "transient", f"SMTP {code} {detail}"[:300],
                   bounce=permanent and recipient)


class SmtpProvider:
    """Email over SMTP (one connection, reopened after an error); ``accepted`` asks the status API."""

    idempotent = False

    def __init__(self, cfg: ChannelConfig):
        self.cfg = cfg
        self._smtp: smtplib.SMTP | None = None
        self._http: aiohttp.ClientSession | None = None

    async def send(self, msg: Mapping, now: float) -> Attempt:
        try:
            mail = email_for(msg, self.cfg, now)
        except (ValueError, TypeError) as exc:  # a header a mail cannot carry: this message never can
            return Attempt("permanent", f"cannot build the mail: {exc}"[:300])
        return await asyncio.to_thread(self._send, mail)

    def _send(self, mail) -> Attempt:
        cfg = self.cfg
        try:
            if self._smtp is None:
                self._smtp = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=cfg.smtp_timeout_s)
            self._smtp.send_message(mail)
            return ACCEPTED
        except smtplib.SMTPRecipientsRefused as exc:
            (code, text), = exc.recipients.values()
            return _smtp_attempt(code, text, recipient=True)
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
            self._close()  # the session is mid-transaction: start the next message on a fresh one
            return _smtp_attempt(exc.smtp_code, exc.smtp_error, recipient=False)
        except (OSError, smtplib.SMTPException) as exc:  # connection refused, lost or timed out: again later
            self._close()
            return Attempt("transient", f"SMTP {cfg.smtp_host}:{cfg.smtp_port}: {type(exc).__name__}: {exc}"[:300])

    async def accepted(self, message_id: str) -> bool | None:
        """Whether the service accepted ``message_id``; None when it cannot tell (no status API, unreachable)."""
        if not self.cfg.status_url:
            return None
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.http_timeout_s))
        try:
            async with self._http.get(self.cfg.status_url + quote(message_id, safe="")) as resp:
                if resp.status == 200:
                    return True
                if resp.status == 404:
                    return False
                log.warning("status API answered %d for a message in doubt", resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("status API unreachable (%s)", exc)
        return None

    def _close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                pass

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                await asyncio.to_thread(smtp.quit)
            except (OSError, smtplib.SMTPException):
                smtp.close()
        if self._http is not None:
            await self._http.close()


class HttpProvider:
    """An app-push service or an ad platform: ``POST url`` with the message as JSON, ``Idempotency-Key``."""

    idempotent = True

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self._http: aiohttp.ClientSession | None = None

    async def send(self, msg: Mapping, now: float) -> Attempt:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with self._http.post(self.url, json=dict(msg),
                                       headers={"Idempotency-Key": msg["message_id"]}) as resp:
                if 200 <= resp.status < 300:
                    return ACCEPTED
                text = (await resp.text(errors="replace"))[:200]
                kind = "transient" if resp.status in (408, 425, 429) or resp.status >= 500 else "permanent"
                return Attempt(kind, f"HTTP {resp.status} {text}", bounce=resp.status in (404, 410))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Attempt("transient", f"{self.url}: {type(exc).__name__}: {exc}"[:300])

    async def accepted(self, message_id: str) -> bool | None:
        return None  # not needed: a message in doubt is sent again under its idempotency key

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def provider_for(cfg: ChannelConfig) -> SmtpProvider | HttpProvider:
    if cfg.channel == "email":
        return SmtpProvider(cfg)
    return HttpProvider(cfg.app_url if cfg.channel == "app" else cfg.ads_url, cfg.http_timeout_s)
