"""The delivery services a channel worker hands messages to, each answering one message at a time with an
:class:`Attempt`:

* ``accepted``;
* ``transient``, about this message (SMTP 4xx to RCPT, such as greylisting; HTTP 408, 409, 425): tried again
  up to ``max_attempts``; or about the service (refused or lost connections, timeouts, SMTP 421, HTTP 429
  and 5xx): the worker holds every message until the service answers again, however long;
* ``permanent`` (SMTP 5xx, other HTTP 4xx, redirects): never again. It is a *bounce* only when the service
  says the address is gone: an SMTP enhanced status 5.1.x or 5.2.1 to RCPT (``550 5.1.1 user unknown``),
  HTTP 410, or HTTP 404 with a JSON ``error`` that says unregistered or unknown. Relaying denied, a
  blocklist, a wrong URL or a message too large say nothing of the person, who is then not suppressed;
* ``doubt``: the connection broke after the mail's data was sent, so the service may have taken it: the
  worker asks the status API before sending it again.

* :class:`SmtpProvider` (``email``): SMTP with stdlib smtplib in a thread, one connection kept open. SMTP has
  no idempotency: a message in doubt after a crash is looked up in the service's status API
  (``status_url``, like an email service's search by Message-ID) before it is sent again.
* :class:`HttpProvider` (``app``, ``ads``): JSON over HTTP with the message id as ``Idempotency-Key``: a
  message in doubt is sent again, and the service counts it once.
"""
from __future__ import annotations

import asyncio
import logging
import re
import smtplib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import orjson

from infogap.stream.channels.config import ChannelConfig
from infogap.stream.channels.messages import address_for, email_for

log = logging.getLogger("infogap.channel")


@dataclass(frozen=True)
class Attempt:
    """What the provider said about one message."""

    outcome: str  # "accepted", "transient", "permanent" or "doubt"
    reason: str = ""
    bounce: bool = False  # permanent, and about the address: the person is suppressed on the channel
    service: bool = False  # transient, and about the service: hold every message, count no attempt


ACCEPTED = Attempt("accepted")
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def smtp_attempt(code: int, text: object, recipient: bool) -> Attempt:
    """An SMTP reply that is not success, as an :class:`Attempt` (see the module's docstring).

    >>> smtp_attempt(550, b"5.1.1 <u1@example.invalid>: user unknown", recipient=True).bounce
    True
    >>> [smtp_attempt(550, t, True).bounce for t in (b"5.7.1 relaying denied", b"user unknown")]
    [False, False]
    >>> smtp_attempt(421, b"4.3.2 shutting down", recipient=False).service
    True
    """
    detail = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    reason = f"SMTP {code} {detail}"[:300]
    if code >= 500:
        m = _ENHANCED.match(detail)
        gone = m is not None and (m.group(2) == "1" or (m.group(2), m.group(3)) == ("2", "1"))
        return Attempt("permanent", reason, bounce=recipient and gone)
    return Attempt("transient", reason, service=code == 421 or not recipient)


class SmtpProvider:
    """Email over SMTP (one connection, reopened after an error); ``accepted`` asks the status API."""

    idempotent = False

    def __init__(self, cfg: ChannelConfig):
        self.cfg = cfg
        self._smtp: smtplib.SMTP | None = None
        self._http: aiohttp.ClientSession | None = None

    async def send(self, msg: Mapping, now: float) -> Attempt:
        try:  # a message whose mail cannot be written (an odd id, a header): this message never can be
            raw = email_for(msg, self.cfg, now).as_bytes()
        except Exception as exc:
            return Attempt("permanent", f"cannot write the mail: {type(exc).__name__}: {exc}"[:300])
        return await asyncio.to_thread(self._send, raw, address_for(msg["user_id"], self.cfg.email_domain))

    def _send(self, raw: bytes, to: str) -> Attempt:
        """One SMTP transaction, step by step: a connection lost after the data went out is ``doubt``."""
        cfg = self.cfg
        try:
            if self._smtp is None:
                self._smtp = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=cfg.smtp_timeout_s)
                self._smtp.ehlo_or_helo_if_needed()
            smtp = self._smtp
            code, text = smtp.mail(cfg.email_from)
            if code != 250:
                smtp.rset()
                return smtp_attempt(code, text, recipient=False)
            code, text = smtp.rcpt(to)
            if code not in (250, 251):
                smtp.rset()
                return smtp_attempt(code, text, recipient=True)
        except (OSError, smtplib.SMTPException) as exc:  # refused, lost or timed out before the data: again later
            self._close()
            return Attempt("transient", f"SMTP {cfg.smtp_host}:{cfg.smtp_port}: {type(exc).__name__}: {exc}"[:300],
                           service=True)
        try:
            code, text = smtp.data(raw)
        except smtplib.SMTPDataError as exc:  # DATA itself refused: nothing was sent
            self._close()
            return smtp_attempt(exc.smtp_code, exc.smtp_error, recipient=False)
        except (OSError, smtplib.SMTPException) as exc:
            self._close()
            return Attempt("doubt", f"SMTP connection lost after the data was sent: {type(exc).__name__}")
        if code != 250:
            return smtp_attempt(code, text, recipient=False)
        return ACCEPTED

    async def accepted(self, message_id: str) -> bool | None:
        """Whether the service accepted ``message_id``; None when it cannot tell (no status API, unreachable)."""
        if not self.cfg.status_url:
            return None
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.http_timeout_s))
        try:
            async with self._http.get(self.cfg.status_url + quote(message_id, safe=""),
                                      allow_redirects=False) as resp:
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


def http_attempt(status: int, body: bytes) -> Attempt:
    """An HTTP answer that is not 2xx, as an :class:`Attempt` (see the module's docstring).

    >>> [http_attempt(404, b'{"error": "unregistered"}').bounce, http_attempt(404, b"404: Not Found").bounce]
    [True, False]
    >>> http_attempt(503, b"").service, http_attempt(409, b"").outcome, http_attempt(302, b"").outcome
    (True, 'transient', 'permanent')
    """
    reason = f"HTTP {status} {body[:200].decode('utf-8', 'replace')}"
    if status in (408, 409, 425):
        return Attempt("transient", reason)
    if status == 429 or status >= 500:
        return Attempt("transient", reason, service=True)
    gone = status == 410
    if status == 404:
        try:
            error = orjson.loads(body).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        gone = isinstance(error, str) and any(w in error.lower() for w in ("unregistered", "unknown"))
    return Attempt("permanent", reason, bounce=gone)


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
            async with self._http.post(self.url, json=dict(msg), headers={"Idempotency-Key": msg["message_id"]},
                                       allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return ACCEPTED
                return http_attempt(resp.status, await resp.content.read(2048))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Attempt("transient", f"{self.url}: {type(exc).__name__}: {exc}"[:300], service=True)
        except (TypeError, ValueError) as exc:  # a header value aiohttp will not send: this message never can be
            return Attempt("permanent", f"cannot send the request: {type(exc).__name__}: {exc}"[:300])

    async def accepted(self, message_id: str) -> bool | None:
        return None  # not needed: a message in doubt is sent again under its idempotency key

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def provider_for(cfg: ChannelConfig) -> SmtpProvider | HttpProvider:
    if cfg.channel == "email":
        return SmtpProvider(cfg)
    return HttpProvider(cfg.app_url if cfg.channel == "app" else cfg.ads_url, cfg.http_timeout_s)
