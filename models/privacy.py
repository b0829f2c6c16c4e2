"""The privacy floor: what is published stands on at least ``k`` distinct users; and the noise budget's ledger.

**User bitmaps.** Every aggregate that can be published (a co-occurrence pair, a trending entry, an experiment
report cell) keeps a 64-bit *user bitmap* beside its counts: each contribution ORs in bit
:func:`user_bit` of the user who made it, a stable hash of the user id (CRC-32, the same in every process and on
every machine). One user sets one bit, however many events they make, so ``popcount(bitmap) >= k`` implies at
least ``k`` distinct users. Two users may share a bit (a collision): the count is then lower than the number of
users, never higher, so the floor errs on the side of publishing less. With ``k`` users the chance that all
their bits differ is ``64! / (64 - k)! / 64^k``: 85 % for 5 users, 48 % for 10; on average a pair needs about
5.2 users to pass ``k = 5`` and 10.8 to pass ``k = 10``. The bitmap never decays and is never cleared by an
erasure (it holds no id, only 64 buckets of many users each): it says how many people ever stood behind an
aggregate, not how many do now.

>>> user_bit("u42") == user_bit("u42"), 0 <= user_bit("u42") < 64
(True, True)
>>> m = 0
>>> for u in ("ann", "bob", "ann", "ann"): m |= 1 << user_bit(u)
>>> popcount(np.uint64(m))  # two users, however many events
2
>>> at_floor(np.uint64(m), 2), at_floor(np.uint64(m), 3), at_floor(np.uint64(0), 1)
(True, False, True)

**Laplace noise** (optional) is drawn by the stream layer, which reads the clock and owns the random
generator; here are only the pure parts: :func:`laplace_noised` adds given unit draws to counts, and
:class:`PrivacyLedger` sums the epsilon spent per day.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
from numba import njit

from infogap.models.state_fields import StateError

#: Bits of a user bitmap.
BITS = 64
#: A user bitmap with every bit set: a row that was already at the floor where it was learned (a read-side copy).
ALL_USERS = np.uint64(0xFFFFFFFFFFFFFFFF)
#: "No user bit": an update from a writer older than the bitmaps (it adds no user).
NO_USER = 255


def user_bit(user_id: str) -> int:
    """The bit (0..63) a user sets in every bitmap: the low 6 bits of the CRC-32 of the id's UTF-8 bytes."""
    return zlib.crc32(user_id.encode("utf-8")) & (BITS - 1)


def user_mask(user_id: str) -> int:
    """``1 << user_bit(user_id)``: a bitmap of one user, as a Python int (experiment report cells).

    >>> user_mask("u42") == 1 << user_bit("u42")
    True
    """
    return 1 << user_bit(user_id)


_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_S1, _S2, _S4, _S56 = np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(56)


@njit(cache=True, nogil=True)
def popcount(x):  # pragma: no cover - compiled; tested through its doctest
    """Set bits of a uint64 (at most :data:`BITS`): the distinct users a bitmap proves, at least. Branch-free (a
    bit loop took up to 64 rounds for a popular pair's bitmap, at every one of its updates)."""
    x = np.uint64(x)
    x = x - ((x >> _S1) & _M1)
    x = (x & _M2) + ((x >> _S2) & _M2)
    x = (x + (x >> _S4)) & _M4
    return np.int64((x * _H01) >> _S56)


@njit(cache=True, nogil=True)
def at_floor(x, k):  # pragma: no cover - compiled
    """Whether bitmap ``x`` shows at least ``k`` users; ``k <= 1`` is "no floor" (true even for an empty bitmap,
    so that state from before the bitmaps keeps its weights when the floor is off)."""
    return k <= 1 or popcount(x) >= k


@njit(cache=True, nogil=True)
def mask(bit):  # pragma: no cover - compiled
    """The bitmap of one user of bit ``bit`` (0..63); 0 for :data:`NO_USER` (a kernel takes the bit, a small int, not
    the uint64 mask: numba reads a Python int faster than a numpy scalar)."""
    return np.uint64(1) << np.uint64(bit) if 0 <= bit < BITS else np.uint64(0)


def bit_count(x: int) -> int:
    """:func:`popcount` of a Python int (a report cell's bitmap).

    >>> bit_count(0b1011), bit_count(0)
    (3, 0)
    """
    return (int(x) & 0xFFFFFFFFFFFFFFFF).bit_count()


def mask_of(bits: np.ndarray) -> np.ndarray:
    """Per-update bits (``NO_USER``: none) as uint64 bitmaps of one user each (0 for none).

    >>> mask_of(np.array([0, 3, NO_USER], np.uint8)).tolist()
    [1, 8, 0]
    """
    bits = np.asarray(bits, np.uint8)
    out = np.left_shift(np.uint64(1), np.minimum(bits, BITS - 1).astype(np.uint64))
    out[bits >= BITS] = 0
    return out


def laplace_noised(values, unit_noise, epsilon: float, sensitivity: float = 1.0) -> np.ndarray:
    """``values`` plus Laplace noise of scale ``sensitivity / epsilon``, from ``unit_noise`` (draws of the
    standard Laplace distribution, one per value, made by the caller); clipped at 0, as a count is never
    negative (clipping is post-processing: it costs no privacy).

    >>> laplace_noised([10.0, 0.5], np.array([0.5, -2.0]), epsilon=0.5).tolist()
    [11.0, 0.0]
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    out = np.asarray(values, np.float64) + np.asarray(unit_noise, np.float64) * (sensitivity / epsilon)
    return np.maximum(out, 0.0)


class PrivacyLedger:
    """The epsilon spent on noisy publishes, per day and per kind of publication (``similar``, ``trending``,
    ``report``), summed by sequential composition: each publish that releases noisy counts adds its epsilon.

    ``spend(day, kind, epsilon)``: one publish; ``day`` is a date string the caller gives (the stream: UTC).

    >>> led = PrivacyLedger()
    >>> led.spend("2024-11-24", "similar", 0.5); led.spend("2024-11-24", "similar", 0.5)
    >>> led.spend("2024-11-24", "trending", 1.0); led.spend("2024-11-25", "similar", 0.5)
    >>> led.day("2024-11-24"), led.total("2024-11-24")
    ({'similar': 1.0, 'trending': 1.0}, 2.0)
    >>> PrivacyLedger.from_state(led.to_state()).days == led.days
    True
    >>> PrivacyLedger.merged([led, led]).total("2024-11-25")
    1.0
    """

    #: days kept (older ones are dropped as new ones come)
    MAX_DAYS = 62

    def __init__(self):
        #: day -> kind -> (epsilon spent, publishes)
        self.days: dict[str, dict[str, list]] = {}

    def spend(self, day: str, kind: str, epsilon: float, n: int = 1) -> None:
        entry = self.days.setdefault(day, {}).setdefault(kind, [0.0, 0])
        entry[0] += float(epsilon) * n
        entry[1] += n
        if len(self.days) > self.MAX_DAYS:
            for old in sorted(self.days)[: len(self.days) - self.MAX_DAYS]:
                del self.days[old]

    def day(self, day: str) -> dict[str, float]:
        """Epsilon spent on ``day`` per kind."""
        return {kind: e[0] for kind, e in sorted(self.days.get(day, {}).items())}

    def total(self, day: str) -> float:
        """Epsilon spent on ``day``, every kind together."""
        return float(sum(e[0] for e in self.days.get(day, {}).values()))

    def to_state(self) -> dict:
        return {"days": {d: {k: [float(e[0]), int(e[1])] for k, e in kinds.items()} for d, kinds in self.days.items()}}

    @classmethod
    def from_state(cls, state, where: str = "privacy ledger") -> PrivacyLedger:
        days = state.get("days") if isinstance(state, Mapping) else None
        if not (isinstance(days, Mapping) and all(
                isinstance(d, str) and isinstance(kinds, Mapping) and all(
                    isinstance(k, str) and isinstance(e, list) and len(e) == 2
                    and type(e[0]) in (int, float) and math.isfinite(e[0]) and e[0] >= 0
                    and type(e[1]) is int and e[1] >= 0 for k, e in kinds.items())
                for d, kinds in days.items())):
            raise StateError(f"{where}: 'days' must map day -> kind -> [epsilon >= 0, publishes >= 0]")
        out = cls()
        out.days = {d: {k: [float(e[0]), int(e[1])] for k, e in kinds.items()} for d, kinds in days.items()}
        return out

    @classmethod
    def merged(cls, ledgers) -> PrivacyLedger:
        """Several workers' ledgers summed (each publishes its own partitions; a person's events may reach
        every one of them, so their epsilons add)."""
        out = cls()
        for led in ledgers:
            for d, kinds in led.days.items():
                for k, (eps, n) in kinds.items():
                    entry = out.days.setdefault(d, {}).setdefault(k, [0.0, 0])
                    entry[0] += eps
                    entry[1] += n
        return out


@njit(cache=True, nogil=True)
def _floor_mask(users, k, out):  # pragma: no cover - compiled
    for j in range(users.size):
        out[j] = k <= 1 or popcount(users[j]) >= k
    return out


def floor_mask(users: np.ndarray, k: int) -> np.ndarray:
    """Per bitmap, whether it shows at least ``k`` users (every one when ``k <= 1``).

    >>> floor_mask(np.array([0b111, 0b1, 0], np.uint64), 2).tolist()
    [True, False, False]
    """
    users = np.ascontiguousarray(users, np.uint64).ravel()
    return _floor_mask(users, int(k), np.empty(users.size, np.bool_))
