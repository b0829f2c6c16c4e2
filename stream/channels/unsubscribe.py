"""Unsubscribe links: signed, expiring tokens and the ``List-Unsubscribe`` headers of RFC 2369 and RFC 8058.

A token names one user and one channel until an expiry time, signed with HMAC-SHA256 under the worker's
unsubscribe key: it cannot be forged for another user, nor reused after it expires, and it carries the
pseudonymous id only (infogap holds no addresses). ``POST {url}/unsubscribe?t=TOKEN`` with the body
``List-Unsubscribe=One-Click`` unsubscribes at once (RFC 8058: mail clients send it without asking); ``GET``
shows a confirmation page and changes nothing (link scanners follow every GET).

>>> key = b"k" * 32
>>> token = sign(key, "u42", "email", expires_at=2_000_000_000)
>>> verify(key, token, now=1_900_000_000)
('u42', 'email')
>>> verify(key, token, now=2_100_000_000)
Traceback (most recent call last):
...
ValueError: the unsubscribe link has expired
>>> verify(b"another key......" * 2, token, now=1_900_000_000)
Traceback (most recent call last):
...
ValueError: the unsubscribe link is not valid
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote

from infogap.models.push_policy import CHANNELS

#: Bytes of the HMAC kept in a token (128 bits).
MAC_BYTES = 16
#: A token longer than this is refused before it is decoded (an id of 256 characters of 4 UTF-8 bytes fits).
MAX_TOKEN_CHARS = 1536
_DOMAIN = b"infogap-unsubscribe\n"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def subkey(key: bytes, purpose: bytes) -> bytes:
    """A key of its own for one purpose, derived from the worker's unsubscribe key: the token MAC and the
    suppression digests never share a key with each other, nor with the pseudonyms (HMAC-SHA256 too)."""
    return hmac.new(key, b"infogap/" + purpose, hashlib.sha256).digest()


def sign(key: bytes, user_id: str, channel: str, expires_at: float) -> str:
    """A token for ``user_id`` to leave ``channel`` until ``expires_at`` (epoch seconds)."""
    payload = f"{channel}\n{int(expires_at)}\n{user_id}".encode()
    mac = hmac.new(subkey(key, b"unsubscribe-token"), _DOMAIN + payload, hashlib.sha256).digest()[:MAC_BYTES]
    return f"{_b64(payload)}.{_b64(mac)}"


def verify(key: bytes, token: object, now: float) -> tuple[str, str]:
    """``(user_id, channel)`` of a valid token; ValueError with a reason a person can read otherwise."""
    invalid = ValueError("the unsubscribe link is not valid")
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS or token.count(".") != 1:
        raise invalid
    body, mac = token.split(".")
    try:
        payload, mac_raw = _unb64(body), _unb64(mac)
    except ValueError:
        raise invalid from None
    expected = hmac.new(subkey(key, b"unsubscribe-token"), _DOMAIN + payload, hashlib.sha256).digest()[:MAC_BYTES]
    if not hmac.compare_digest(mac_raw, expected):
        raise invalid
    try:
        channel, expires, user_id = payload.decode("utf-8").split("\n", 2)
        expires_at = int(expires)
    except ValueError:
        raise invalid from None
    if channel not in CHANNELS or not user_id:
        raise invalid
    if expires_at < now:
        raise ValueError("the unsubscribe link has expired")
    return user_id, channel


def headers(key: bytes, user_id: str, channel: str, now: float, ttl_s: float, base_url: str,
            mail_domain: str) -> dict[str, str]:
    """The ``List-Unsubscribe`` (a mailto and an https URL) and ``List-Unsubscribe-Post`` headers of a mail.

    >>> h = headers(b"k" * 32, "u1", "email", 0.0, 60.0, "https://mail.example.com", "example.com")
    >>> h["List-Unsubscribe-Post"], h["List-Unsubscribe"].startswith("<mailto:unsubscribe@example.com?subject=")
    ('List-Unsubscribe=One-Click', True)
    """
    token = sign(key, user_id, channel, now + ttl_s)
    url = f"{base_url.rstrip('/')}/unsubscribe?t={quote(token)}"
    mailto = f"mailto:unsubscribe@{mail_domain}?subject={quote('unsubscribe ' + token)}"
    return {"List-Unsubscribe": f"<{mailto}>, <{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
