"""Pseudonymous user ids: a keyed HMAC-SHA256 of the raw id, applied once where ids enter infogap.

With a key (``INFOGAP_PSEUDONYM_KEY``), every user id the workers keep (model state, Redis keys and values,
the ``push`` topic) is ``p_`` followed by the first :data:`HEX_CHARS` hex digits (128 bits) of
``HMAC-SHA256(key, user_id as UTF-8)``. Without the key the id cannot be computed from a guess, nor the raw id
recovered from the pseudonym. App backends that hold the key compute the same pseudonym to read
(:class:`infogap.stream.client.InfogapClient` does it for them). Without a key, ids pass through unchanged.

Idempotent: an id that already is a pseudonym (``p_`` and 32 lower-case hex digits) is kept as it is, so
feedback events built from the ``push`` topic (impressions, opens, clicks of a pseudonymous user) reach the
same user when they come back through ingest. A raw id of exactly that shape is therefore taken as a pseudonym.

>>> p = Pseudonymizer("an example key of 32 bytes......")
>>> p("u42")
'p_6af99a12ac1096f2009906f3118eb4b8'
>>> p("u42") == p("u42") and p("u42") != p("u43")
True
>>> Pseudonymizer(None)("u42")
'u42'
"""
from __future__ import annotations

import hashlib
import hmac
import re

from pydantic import SecretStr

PREFIX = "p_"
#: Hex digits kept from the 64 of the HMAC: 128 bits, so a collision among even 10^12 users has a probability
#: below 10^-14 (birthday bound), while the Redis keys stay short.
HEX_CHARS = 32
PSEUDONYM_LENGTH = len(PREFIX) + HEX_CHARS
_PSEUDONYM = re.compile(rf"{PREFIX}[0-9a-f]{{{HEX_CHARS}}}")


class Pseudonymizer:
    """Map raw user ids to stable pseudonyms with a secret key (or leave them as they are without one).

    Parameters
    ----------
    key
        The HMAC key (``SecretStr``, ``str`` or ``bytes``), or None for the identity mapping.

    Apply it exactly once to each raw id, after the id is normalised as the event contract does it
    (``str(user_id).strip()``): integers are accepted and turned into their decimal string, so ``42`` and
    ``"42"`` name the same user. The key never appears in ``repr``.

    Examples
    --------
    >>> p = Pseudonymizer(SecretStr("another key, long enough"))
    >>> p.enabled, len(p("alice")), p("alice").startswith("p_")
    (True, 34, True)
    >>> p(42) == p("42") == p(" 42 ")
    True
    >>> p(p("alice")) == p("alice")
    True
    >>> p
    Pseudonymizer(enabled=True)
    """

    __slots__ = ("_key",)

    def __init__(self, key: SecretStr | str | bytes | None):
        if isinstance(key, SecretStr):
            key = key.get_secret_value()
        if isinstance(key, str):
            key = key.encode()
        if key is not None and not key:
            raise ValueError("the pseudonym key is empty; pass None to keep user ids as given")
        self._key: bytes | None = key

    @classmethod
    def from_settings(cls, settings) -> Pseudonymizer:
        """The pseudonymizer of ``settings.pseudonym_key`` (identity when it is unset)."""
        return cls(settings.pseudonym_key)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __call__(self, user_id: str | int) -> str:
        if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
            raise TypeError(f"a user id is a string (or an integer), not {type(user_id).__name__}")
        raw = str(user_id).strip()
        if self._key is None or _PSEUDONYM.fullmatch(raw):
            return raw
        return PREFIX + hmac.digest(self._key, raw.encode(), hashlib.sha256).hex()[:HEX_CHARS]

    pseudonymize = __call__

    @staticmethod
    def is_pseudonym(user_id: str) -> bool:
        """True for ids of the pseudonym form ``p_`` + 32 lower-case hex digits."""
        return _PSEUDONYM.fullmatch(user_id) is not None

    def __repr__(self) -> str:
        return f"Pseudonymizer(enabled={self.enabled})"

    def __reduce__(self):
        raise TypeError("a Pseudonymizer holds a secret key and is not pickled; build it from the settings")


def pseudonymize(user_id: str | int, key: SecretStr | str | bytes | None) -> str:
    """One-off form of :class:`Pseudonymizer` (build the class once on hot paths).

    >>> pseudonymize("u42", None)
    'u42'
    """
    return Pseudonymizer(key)(user_id)
