"""Who may read the per-user pages: the console's and the workers' ``/inspect`` routes.

Safe by default: bound to a loopback address, anyone on this machine may read, through a loopback name only
(``Host: 127.0.0.1``, ``localhost`` or ``[::1]``: a web page that rebinds its own name to 127.0.0.1 is refused);
bound elsewhere, every request needs ``INFOGAP_CONSOLE_TOKEN``, as a bearer token or as the password of basic
auth (any user name: the browser's login box). Without a token the routes refuse, saying how to set one.

>>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
(True, True, True, False)
>>> presented({"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()})
's3cret'
>>> presented({"Authorization": "Bearer s3cret"}), presented({})
('s3cret', None)
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
from collections.abc import Mapping

from aiohttp import web
from pydantic import SecretStr

REALM = 'Basic realm="infogap console", charset="UTF-8"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str | None) -> str:
    """The name in a ``Host`` header, without its port.

    >>> host_name("127.0.0.1:8090"), host_name("[::1]:8090"), host_name("localhost"), host_name(None)
    ('127.0.0.1', '::1', 'localhost', '')
    """
    host = (host_header or "").strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def presented(headers: Mapping[str, str]) -> str | None:
    """The token a request presents: a bearer token, or basic auth's password; None when none."""
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def guard(host: str, token: SecretStr | None, prefix: str = "/"):
    """An aiohttp middleware that lets requests under ``prefix`` through only as the module says: ``host`` is
    where the app is bound, ``token`` the configured secret."""
    secret = token.get_secret_value().encode() if token is not None else None
    open_here = secret is None and is_loopback(host)

    @web.middleware
    async def middleware(request: web.Request, handler):
        if not request.path.startswith(prefix):
            return await handler(request)
        if open_here:
            if not is_loopback(host_name(request.headers.get("Host"))):  # DNS rebinding: another site's name
                return web.Response(status=421, text="Ask this server by a loopback name (127.0.0.1, localhost).\n")
            return await handler(request)
        if secret is None:
            return web.Response(status=403, text="These pages show per-user data and this server is bound to "
                                "a non-loopback address: set INFOGAP_CONSOLE_TOKEN to require a login.\n")
        given = presented(request.headers)
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret):
            return web.Response(status=401, text="login required\n", headers={"WWW-Authenticate": REALM})
        return await handler(request)

    return middleware
