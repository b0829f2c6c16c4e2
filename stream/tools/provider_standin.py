"""A local stand-in for the delivery services the channel workers talk to: an email service (SMTP), an app-push
service and an ad platform (HTTP), on real sockets on loopback, for the integration tests and for developers.

Deliveries are keyed by the user id: the local part of the recipient address (email) or the ``user_id`` of the
JSON body (``POST /v1/app/send``, ``POST /v1/ads/send``). Rules make a user fail permanently (`reject`) or
transiently for the next few attempts (`defer`). ``GET /v1/messages/{message_id}`` is the delivery status API
(like an email service's message search by Message-ID) that the email worker asks after a crash.

Run it by hand with ``python -m infogap.stream.tools.provider_standin --smtp-port 1025 --http-port 8025``.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import email
import email.policy
import logging
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

CHANNELS = ("email", "app", "ads")
MAX_BODY = 1 << 20
KEPT_HEADERS = ("Message-ID", "X-Infogap-Message-Id", "List-Unsubscribe", "List-Unsubscribe-Post", "Subject",
                "From", "To")
_HTTP_REJECT = {"app": (404, "unregistered"), "ads": (404, "unknown audience member")}


class ProviderStandIn:
    """An email service (SMTP), an app-push service and an ad platform (HTTP) on 127.0.0.1, for tests and demos.

    >>> import smtplib
    >>> from email.message import EmailMessage
    >>> with ProviderStandIn() as providers:
    ...     mail = EmailMessage()
    ...     mail["From"], mail["To"], mail["Subject"] = "recs@example.invalid", "u1@example.invalid", "For you"
    ...     mail["X-Infogap-Message-Id"] = "m-1"
    ...     mail.set_content("Three picks for you.")
    ...     with smtplib.SMTP(providers.host, providers.smtp_port, local_hostname="localhost") as smtp:
    ...         refused = smtp.send_message(mail)
    ...     sent = providers.accepted("email")
    >>> refused, providers.count("m-1"), sent[0]["user_id"], sent[0]["headers"]["Subject"]
    ({}, 1, 'u1', 'For you')
    """

    def __init__(self, host: str = "127.0.0.1", smtp_port: int = 0, http_port: int = 0,
                 spool: Path | None = None) -> None:
        self.host = host
        self.smtp_port = smtp_port
        self.http_port = http_port
        self.spool = Path(spool) if spool is not None else None
        self._lock = threading.Lock()
        self._spool_lock = threading.Lock()
        self._rejects: dict[tuple[str, str], tuple[int | None, str | None]] = {}
        self._defers: dict[tuple[str, str], list[Any]] = {}
        self._records: list[dict] = []
        self._attempts: list[dict] = []
        self._counts: dict[str, int] = {}
        self._first: dict[str, dict] = {}
        self._keys: dict[str, set[str]] = {c: set() for c in CHANNELS}
        self._queued = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._smtp_server: asyncio.AbstractServer | None = None
        self._smtp_sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self._runner: web.AppRunner | None = None

    @property
    def _base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def status_url(self) -> str:
        """The delivery status API; the worker appends the message id."""
        return f"{self._base}/v1/messages/"

    @property
    def app_url(self) -> str:
        return f"{self._base}/v1/app/send"

    @property
    def ads_url(self) -> str:
        return f"{self._base}/v1/ads/send"

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> ProviderStandIn:
        """Run both servers on one event loop in a daemon thread; return once both listen."""
        if self._thread is not None:
            raise RuntimeError("already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="provider-standin", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(timeout=30)
        except BaseException:
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(10)
                loop.close()
            raise
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Close both servers and their connections and end the thread; a no-op when not running."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=15)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(15)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> ProviderStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _open(self) -> None:
        from aiosmtpd.smtp import SMTP

        loop = asyncio.get_running_loop()
        handler = _SmtpHandler(self)

        def session() -> SMTP:
            protocol = SMTP(handler, data_size_limit=MAX_BODY, enable_SMTPUTF8=True, hostname="provider-standin",
                            ident="infogap provider stand-in", timeout=60, loop=loop)
            self._smtp_sessions.add(protocol)
            return protocol

        self._smtp_server = await loop.create_server(session, self.host, self.smtp_port)
        self.smtp_port = self._smtp_server.sockets[0].getsockname()[1]
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/app/send", self._http_send)
        app.router.add_post("/v1/ads/send", self._http_send)
        app.router.add_get("/v1/messages/{message_id}", self._http_status)
        app.router.add_get("/v1/messages", self._http_list)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.http_port)
        await site.start()
        self.http_port = self._runner.addresses[0][1]
        if self.spool is not None:
            try:
                self.spool.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("spool %s unusable (%s)", self.spool, exc)

    async def _close(self) -> None:
        if self._smtp_server is not None:
            self._smtp_server.close()
            for protocol in list(self._smtp_sessions):
                if protocol.transport is not None:
                    protocol.transport.close()
            self._smtp_sessions.clear()
            await self._smtp_server.wait_closed()
            self._smtp_server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- rules -----------------------------------------------------------------------------------------------

    def reject(self, user_id: str, channel: str = "email", code: int | None = None, text: str | None = None) -> None:
        """Fail every delivery to ``user_id`` on ``channel`` permanently (email: a 5xx code; HTTP: 4xx/5xx)."""
        _check_channel(channel)
        if code is not None:
            low = 500 if channel == "email" else 400
            if not low <= code <= 599:
                raise ValueError(f"a permanent failure on {channel} needs a code in {low}..599, not {code}")
        if text is not None and ("\r" in text or "\n" in text):
            raise ValueError("text must be one line")
        with self._lock:
            self._rejects[(user_id, channel)] = (code, text)

    def defer(self, user_id: str, times: int, channel: str = "email", code: int | None = None) -> None:
        """Fail the next ``times`` attempts to ``user_id`` on ``channel`` transiently (email: 4xx; HTTP: 429/5xx)."""
        _check_channel(channel)
        if times < 0:
            raise ValueError("times must be >= 0")
        if code is not None:
            ok = 400 <= code <= 499 if channel == "email" else code == 429 or 500 <= code <= 599
            if not ok:
                raise ValueError(f"a transient failure on {channel} cannot answer {code}")
        with self._lock:
            self._defers[(user_id, channel)] = [times, code]

    def clear_rules(self) -> None:
        with self._lock:
            self._rejects.clear()
            self._defers.clear()

    def _rule(self, user_id: str, channel: str) -> tuple[str, int | None, str | None]:
        """What the rules say about the next attempt (call with the lock held): a deferral is used up first."""
        deferred = self._defers.get((user_id, channel))
        if deferred is not None and deferred[0] > 0:
            deferred[0] -= 1
            return "deferred", deferred[1], None
        if (user_id, channel) in self._rejects:
            return ("rejected", *self._rejects[(user_id, channel)])
        return "accepted", None, None

    # --- what was received -----------------------------------------------------------------------------------

    def accepted(self, channel: str | None = None) -> list[dict]:
        """Every accepted delivery in order (duplicates included), optionally of one channel only.

        Each is ``channel, message_id, user_id, accepted_at`` plus, for email, ``to, mail_from, headers, body``
        (the kept headers, the text body) and, for HTTP, ``idempotency_key, body`` (the JSON body)."""
        with self._lock:
            return copy.deepcopy([r for r in self._records if channel is None or r["channel"] == channel])

    def count(self, message_id: str) -> int:
        """How many times ``message_id`` was accepted, on any channel."""
        with self._lock:
            return self._counts.get(message_id, 0)

    @property
    def attempts(self) -> list[dict]:
        """Every attempt in order: ``channel, user_id, message_id, outcome, code, at`` (+ ``duplicate`` for HTTP).

        ``outcome`` is ``accepted``, ``deferred``, ``rejected`` or ``invalid`` (a malformed HTTP request). A
        refused email recipient has no ``message_id``: the message is refused before its content is sent."""
        with self._lock:
            return copy.deepcopy(self._attempts)

    def _attempt(self, channel: str, user_id: str | None, message_id: str | None, outcome: str, code: int,
                 **extra: Any) -> None:
        with self._lock:
            self._attempts.append({"channel": channel, "user_id": user_id, "message_id": message_id,
                                   "outcome": outcome, "code": code, "at": time.time(), **extra})
        if outcome != "accepted":
            log.debug("%s %s for %s (%s)", channel, outcome, user_id, code)

    def _accept(self, record: dict, idempotency_key: str | None = None) -> bool:
        """Record an accepted delivery; False (and nothing recorded) if ``idempotency_key`` was already accepted."""
        channel, message_id = record["channel"], record["message_id"]
        with self._lock:
            if idempotency_key is not None:
                if idempotency_key in self._keys[channel]:
                    return False
                self._keys[channel].add(idempotency_key)
            self._records.append(record)
            if message_id is not None:
                self._counts[message_id] = self._counts.get(message_id, 0) + 1
                self._first.setdefault(message_id, record)
            self._queued += 1
        log.debug("%s accepted %s for %s", channel, message_id, record["user_id"])
        if self.spool is not None:
            self._spool(record)
        return True

    def _spool(self, record: dict) -> None:
        assert self.spool is not None
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            line = orjson.dumps(record, default=str) + b"\n"
            with self._spool_lock, open(self.spool / f"{record['channel']}.jsonl", "ab") as f:
                f.write(line)
        except (OSError, TypeError) as exc:
            log.warning("could not spool a %s record (%s)", record["channel"], exc)

    def _status(self, message_id: str) -> dict | None:
        with self._lock:
            first = self._first.get(message_id)
            if first is None:
                return None
            return {"message_id": message_id, "channel": first["channel"], "status": "accepted",
                    "accepted_at": first["accepted_at"], "count": self._counts[message_id]}

    # --- HTTP ------------------------------------------------------------------------------------------------

    async def _http_send(self, request: web.Request) -> web.Response:
        channel = "app" if request.path.startswith("/v1/app/") else "ads"
        try:
            body = orjson.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            self._attempt(channel, None, None, "invalid", 413)
            return _json({"error": f"body larger than {MAX_BODY} bytes"}, 413)
        except orjson.JSONDecodeError as exc:
            self._attempt(channel, None, None, "invalid", 400)
            return _json({"error": f"body is not JSON: {exc}"}, 400)
        problem = _push_problem(body)
        if problem:
            self._attempt(channel, None, None, "invalid", 400)
            return _json({"error": problem}, 400)
        message_id, user_id = body["message_id"], body["user_id"]
        key = request.headers.get("Idempotency-Key") or None
        if key is not None:
            with self._lock:
                seen = key in self._keys[channel]
            if seen:
                self._attempt(channel, user_id, message_id, "accepted", 200, duplicate=True)
                return _json({"status": "accepted", "duplicate": True})
        with self._lock:
            outcome, code, text = self._rule(user_id, channel)
        if outcome == "deferred":
            code = code or 503
            self._attempt(channel, user_id, message_id, outcome, code)
            return _json({"error": "rate limited" if code == 429 else "unavailable"}, code, {"Retry-After": "1"})
        if outcome == "rejected":
            default_code, default_text = _HTTP_REJECT[channel]
            code = code or default_code
            self._attempt(channel, user_id, message_id, outcome, code)
            return _json({"error": text or default_text}, code)
        record = {"channel": channel, "message_id": message_id, "user_id": user_id, "accepted_at": time.time(),
                  "idempotency_key": key, "body": body}
        fresh = self._accept(record, key)
        self._attempt(channel, user_id, message_id, "accepted", 200, duplicate=not fresh)
        return _json({"status": "accepted", "duplicate": not fresh})

    async def _http_status(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"]
        status = self._status(message_id)
        if status is None:
            return _json({"message_id": message_id, "status": "unknown"}, 404)
        return _json(status)

    async def _http_list(self, request: web.Request) -> web.Response:
        channel = request.query.get("channel") or None
        user_id = request.query.get("user_id") or None
        out = [{k: v for k, v in r.items() if k != "body"} for r in self.accepted(channel)
               if user_id is None or r["user_id"] == user_id]
        return _json(out)


class _SmtpHandler:
    """aiosmtpd hooks: the rules at RCPT, the record at DATA."""

    def __init__(self, standin: ProviderStandIn) -> None:
        self.standin = standin

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        s = self.standin
        user_id = _local_part(address)
        with s._lock:
            outcome, code, text = s._rule(user_id, "email")
        if outcome == "deferred":
            code = code or 451
            s._attempt("email", user_id, None, outcome, code)
            return f"{code} 4.3.0 try again later"
        if outcome == "rejected":
            code = code or 550
            s._attempt("email", user_id, None, outcome, code)
            return f"{code} {text or f'5.1.1 <{address}>: user unknown'}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        s = self.standin
        raw = envelope.original_content or b""
        headers, body = _parse_mail(raw)
        message_id = _message_id(headers)
        for address in envelope.rcpt_tos:
            user_id = _local_part(address)
            s._accept({"channel": "email", "message_id": message_id, "user_id": user_id, "accepted_at": time.time(),
                       "to": address, "mail_from": envelope.mail_from, "headers": headers, "body": body})
            s._attempt("email", user_id, message_id, "accepted", 250)
        with s._lock:
            queued = s._queued
        return f"250 2.0.0 Ok: queued as Q{queued}"


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json",
                        headers=headers)


def _push_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name in ("message_id", "user_id"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} must be a non-empty string"
    return None


def _check_channel(channel: str) -> None:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r} (one of {', '.join(CHANNELS)})")


def _local_part(address: str) -> str:
    return address.rpartition("@")[0] if "@" in address else address


def _parse_mail(raw: bytes) -> tuple[dict[str, str], str]:
    """The kept headers and the text body (``\n`` line ends) of a message; a malformed one yields what could be read."""
    raw = raw.replace(b"\r\n", b"\n")
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        plain = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:  # the email package rarely raises, but a hostile message must not fail the session
        return {}, raw.decode("utf-8", "replace")
    headers = {}
    for name in KEPT_HEADERS:
        try:
            value = msg[name]
        except Exception:  # a header the default policy cannot parse: keep it as sent
            value = plain[name]
        if value is not None:
            headers[name] = str(value)
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
        body = part.get_content() if part is not None else ""
    except Exception:
        payload = msg.get_payload(decode=True) if not msg.is_multipart() else None
        body = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return headers, body if isinstance(body, str) else body.decode("utf-8", "replace")


def _message_id(headers: dict[str, str]) -> str | None:
    own = headers.get("X-Infogap-Message-Id", "").strip()
    if own:
        return own
    mid = headers.get("Message-ID", "").strip().strip("<>").partition("@")[0].strip()
    return mid or None


# --- command line ----------------------------------------------------------------------------------------------


def serve(host: str = "127.0.0.1", smtp_port: int = 1025, http_port: int = 8025, spool: Path | None = None, *,
          rejects: Iterable[tuple[str, str]] = (), defers: Iterable[tuple[str, int, str]] = (),
          echo: Callable[[str], None] | None = None) -> None:
    """Run the stand-in until Ctrl-C or SIGTERM; ``rejects`` are ``(user, channel)``, ``defers`` ``(user, times,
    channel)``."""
    echo = echo or _say
    standin = ProviderStandIn(host, smtp_port, http_port, spool)
    for user_id, channel in rejects:
        standin.reject(user_id, channel)
    for user_id, times, channel in defers:
        standin.defer(user_id, times, channel)
    done = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set()) if in_main else None
    try:
        with standin:
            echo(f"email (SMTP)     {standin.host}:{standin.smtp_port}")
            echo(f"app push (POST)  {standin.app_url}")
            echo(f"ads (POST)       {standin.ads_url}")
            echo(f"status (GET)     {standin.status_url}{{message_id}}")
            if spool is not None:
                echo(f"spool            {spool}/{{email,app,ads}}.jsonl")
            echo("Ctrl-C to stop")
            try:
                while not done.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _say(line: str) -> None:
    print(line, flush=True)


def _parse_reject(value: str) -> tuple[str, str]:
    user_id, _, channel = value.rpartition(":")
    if user_id and channel in CHANNELS:
        return user_id, channel
    if not value:
        raise argparse.ArgumentTypeError("empty user id")
    return value, "email"


def _parse_defer(value: str) -> tuple[str, int, str]:
    parts = value.split(":")
    channel = parts.pop() if len(parts) >= 3 and parts[-1] in CHANNELS else "email"
    if len(parts) < 2 or not parts[-1].isdigit() or not ":".join(parts[:-1]):
        raise argparse.ArgumentTypeError(f"expected USER:TIMES[:CHANNEL], got {value!r}")
    return ":".join(parts[:-1]), int(parts[-1]), channel


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m infogap.stream.tools.provider_standin``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="provider_standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--http-port", type=int, default=8025)
    parser.add_argument("--spool", type=Path, default=None, help="append accepted deliveries to DIR/{channel}.jsonl")
    parser.add_argument("--reject", type=_parse_reject, action="append", default=[], metavar="USER[:CHANNEL]",
                        help="fail every delivery to USER permanently (repeatable; channel email by default)")
    parser.add_argument("--defer", type=_parse_defer, action="append", default=[], metavar="USER:TIMES[:CHANNEL]",
                        help="fail the next TIMES deliveries to USER transiently (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%X")
    for noisy in ("mail.log", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        serve(args.host, args.smtp_port, args.http_port, args.spool, rejects=args.reject, defers=args.defer)
    except OSError as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
