"""Laplace noise on what the item stage publishes, and the epsilon it spends per day (docs/privacy.md).

Off unless ``INFOGAP_PRIVACY_EPSILON`` is set. Then every publish adds noise of scale
``INFOGAP_PRIVACY_SENSITIVITY / epsilon`` (Laplace) to each published count:

- ``ig:similar``: each neighbour's ``support``; its ``score`` (cosine), ``confidence`` and ``lift``, which are the
  same pair count over item counts, are scaled by the same factor (so they do not give the exact count away), and
  the list is ordered by the noisy score;
- ``ig:trending`` and ``ig:trending:seg:{k}``: each score (the list ordered by the noisy scores);

and the publish's epsilon is entered in the ledger of its ``cooc`` partition
(:class:`~infogap.models.privacy.PrivacyLedger`, kind ``similar`` or ``trending``, per UTC day of the worker's
clock), kept in the partition's snapshot and written to ``ig:privacy:{partition}`` for ``infogap report``.

The random draws are made here, in the shell (``models/`` holds only :func:`~infogap.models.privacy.laplace_noised`,
which takes them), from a generator seeded from the operating system: noise that could be replayed could be
subtracted.
"""
from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable

import numpy as np

from infogap.models.privacy import PrivacyLedger, laplace_noised


def utc_day(t: float) -> str:
    """The UTC date of epoch seconds ``t``, as the ledger keys its days.

    >>> utc_day(1732460000.0)
    '2024-11-24'
    """
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d")


class PublishNoise:
    """Laplace noise of ``sensitivity / epsilon`` on published counts; ``clock`` (epoch seconds) names the day
    the spend is entered under; ``rng``: a generator (tests pass a seeded one).

    >>> noise = PublishNoise(1.0, rng=np.random.default_rng(0), clock=lambda: 1732460000.0)
    >>> out = noise.similar([{"item_id": "b", "score": 0.5, "support": 10.0, "confidence": 0.2, "lift": 2.0}])
    >>> out[0]["support"] != 10.0, round(out[0]["score"] / out[0]["support"], 6) == round(0.5 / 10.0, 6)
    (True, True)
    >>> led = PrivacyLedger(); noise.spend(led, "similar"); led.day("2024-11-24")
    {'similar': 1.0}
    """

    def __init__(self, epsilon: float, sensitivity: float = 1.0, rng: np.random.Generator | None = None,
                 clock: Callable[[], float] = time.time):
        if not epsilon > 0 or not sensitivity > 0:
            raise ValueError(f"epsilon and sensitivity must be > 0, got {epsilon} and {sensitivity}")
        self.epsilon = float(epsilon)
        self.sensitivity = float(sensitivity)
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self.clock = clock
        #: epsilon spent by this process since it started, per kind (infogap_privacy_epsilon_spent_total)
        self.spent: dict[str, float] = {}

    def _noised(self, values) -> np.ndarray:
        values = np.asarray(values, np.float64)
        return laplace_noised(values, self.rng.laplace(0.0, 1.0, values.size), self.epsilon, self.sensitivity)

    def similar(self, neighbours: list[dict]) -> list[dict]:
        """One item's published neighbours (``ig:similar``'s entries) with a noisy support, best noisy score first."""
        if not neighbours:
            return neighbours
        support = np.array([n["support"] for n in neighbours], np.float64)
        noisy = self._noised(support)
        factor = np.divide(noisy, support, out=np.zeros_like(noisy), where=support > 0)
        out = [{**n, "support": float(s), "score": float(n["score"] * f), "confidence": float(n["confidence"] * f),
                "lift": float(n["lift"] * f)} for n, s, f in zip(neighbours, noisy.tolist(), factor.tolist())]
        return sorted(out, key=lambda n: -n["score"])

    def trending(self, entries: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """A trending list with noisy scores, best noisy score first (entries that fall to 0 are left out)."""
        if not entries:
            return entries
        noisy = self._noised([s for _, s in entries])
        return sorted(((i, float(s)) for (i, _), s in zip(entries, noisy.tolist()) if s > 0), key=lambda e: -e[1])

    def spend(self, ledger: PrivacyLedger, kind: str) -> None:
        """Enter one publish of ``kind`` (its epsilon) in ``ledger``, under today's UTC date."""
        ledger.spend(utc_day(self.clock()), kind, self.epsilon)
        self.spent[kind] = self.spent.get(kind, 0.0) + self.epsilon

    def today(self, ledgers) -> dict[str, float]:
        """Epsilon spent today (UTC) by ``ledgers`` together, per kind."""
        return PrivacyLedger.merged(ledgers).day(utc_day(self.clock()))

    def counts(self, counts: dict) -> dict:
        """Experiment report cells (:class:`~infogap.models.experiments.Counts` per segment) with noisy counts: every
        count and the revenue get Laplace noise (counts rounded, never below 0), the cost follows the noisy ``sent``
        (an exact cost would give ``sent`` away), the user bitmap is kept (the floor is decided on it, and it is no
        count). Drawn afresh at each call: each report run is a release of its own.

        >>> from infogap.models.experiments import Counts, Segment
        >>> noise = PublishNoise(0.5, rng=np.random.default_rng(1))
        >>> out = noise.counts({Segment(0, "recs", "email", "A"): Counts(sent=100, clicks=7, cost=0.1, users=31)})
        >>> c = next(iter(out.values())); c.users, c.cost == c.sent * 0.001, c.sent != 100 or c.clicks != 7
        (31, True, True)
        """
        from infogap.models.experiments import Counts

        out = {}
        for seg, c in counts.items():
            ints = self._noised([c.sent, c.impressions, c.opens, c.clicks, c.conversions]).round().astype(int).tolist()
            revenue = float(self._noised([c.revenue])[0])
            sent = ints[0]
            out[seg] = Counts(*ints, revenue=revenue, revenue_sq=revenue * revenue if sent <= 1 else
                              c.revenue_sq * (revenue / c.revenue) ** 2 if c.revenue > 0 else 0.0,
                              cost=c.cost * sent / c.sent if c.sent else 0.0, users=c.users)
        return out
