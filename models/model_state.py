"""What an engine has learned, by name: the state the ranker reads and the learning steps write.

An :class:`~infogap.models.engine.Engine` wires one :class:`ModelState`; the modules around it (the
ranker, the compiled learning step, the user export) take this object, never the engine's
attributes. Its parts are the models themselves, each keyed by dense rows: the
:class:`~infogap.models.catalog.Catalog` (items), the :class:`~infogap.models.profile.Profiles`
(users), the :class:`~infogap.models.cooccurrence.CoOccurrence` rows, the
:class:`~infogap.models.trending.Trending` scores, the :class:`~infogap.models.segments.Segmenter`,
and per item the number of positive events (``item_events``). Besides them, the event clock that
every decayed value is stored against: the reference time ``t0`` and the newest event time ``now``.

**Decay.** A decayed quantity with rate ``lam`` is stored as ``w * exp(lam * (t - t0))`` (one addition
per event) and read as ``stored * exp(-lam * (now - t0))``: :meth:`ModelState.growth` is the first
factor, :meth:`ModelState.decay` the second. Before ``lam * (t - t0)`` of the fastest rate passes
:data:`RENORM_EXPONENT`, :meth:`ModelState.renormalise` moves ``t0`` and rescales every part.
"""
from __future__ import annotations

import math

import numpy as np

from infogap.models.catalog import Catalog
from infogap.models.cooccurrence import CoOccurrence
from infogap.models.profile import Profiles
from infogap.models.segments import Segmenter
from infogap.models.trending import Trending

#: The reference time is moved when ``lambda * (t - t0)`` of the fastest decay passes this (far from
#: overflow: every learner of decayed values, the engine, the co-occurrence shard and the population
#: learner, moves it at this exponent).
RENORM_EXPONENT = 40.0
#: Values read from outside the process (neighbour rows, the population model, momentum, trending) are refused
#: with a time beyond this (2100-01-01 UTC) either side of 0 ...
MAX_STORED_TS = 4_102_444_800.0
#: ... or a decayed count (a weight, a popularity, a score) larger than this: far beyond any real count, far
#: below overflow once scaled to a reference time.
MAX_STORED_VALUE = 1e15


class ModelState:
    """The learned parts of an engine by name, and the event clock they are stored against.

    Parameters
    ----------
    catalog, profiles, cooc, trending, segmenter
        The parts (see the module docstring); ``item_events`` (positive events per item row) is made
        here and grows with :meth:`ensure_items`.

    Attributes
    ----------
    t0
        Reference time of the stored decayed values (None before any event).
    now
        The newest event time learned (``-inf`` before any).
    lam_max
        The fastest decay rate of the parts: what :meth:`renormalisation_due` checks.

    Examples
    --------
    >>> s = ModelState(Catalog(), Profiles(half_life_days=1.0), CoOccurrence(door_bits=0), Trending(), Segmenter())
    >>> s.t0, s.now, s.decay(s.profiles.lam)
    (None, -inf, 1.0)
    >>> s.t0, s.now = 0.0, 86400.0
    >>> round(s.decay(s.profiles.lam), 6), round(s.growth(s.profiles.lam, 86400.0), 6)
    (0.5, 2.0)
    >>> s.ensure_items(3); s.item_events.size >= 3
    True
    """

    def __init__(self, catalog: Catalog, profiles: Profiles, cooc: CoOccurrence, trending: Trending,
                 segmenter: Segmenter):
        self.catalog = catalog
        self.profiles = profiles
        self.cooc = cooc
        self.trending = trending
        self.segmenter = segmenter
        #: per item row: the positive events it had (what makes an item "new" for the ranker)
        self.item_events = np.zeros(catalog.category.shape[0], np.int64)
        self.t0: float | None = None
        self.now = -math.inf
        self.lam_max = max(profiles.lam, cooc.lam, trending.lam, trending.lam_m)

    def growth(self, lam: float, ts: float) -> float:
        """``exp(lam * (ts - t0))``: what a value of event time ``ts`` is stored as, per unit."""
        return math.exp(lam * (ts - self.t0))

    def decay(self, lam: float, resolution_s: float = 0.0) -> float:
        """The stored values' decay factor now (``now`` rounded down to ``resolution_s`` when given)."""
        if self.t0 is None or not math.isfinite(self.now):
            return 1.0
        now = self.now - self.now % resolution_s if resolution_s > 0 else self.now
        return math.exp(-lam * (now - self.t0))

    def renormalisation_due(self, ts: float) -> bool:
        """Whether an event at ``ts`` must first move the reference time (:meth:`renormalise`)."""
        return self.lam_max * (ts - self.t0) > RENORM_EXPONENT

    def renormalise(self, t_new: float) -> None:
        """Move the reference time to ``t_new``, rescaling every decayed value of every part."""
        dt = t_new - self.t0
        self.profiles.rescale(math.exp(-self.profiles.lam * dt))
        self.cooc.rescale(math.exp(-self.cooc.lam * dt))
        self.trending.rescale(math.exp(-self.trending.lam * dt), math.exp(-self.trending.lam_m * dt))
        self.t0 = t_new

    def ensure_items(self, n: int) -> None:
        """Room for ``n`` item rows in every per-item array."""
        self.cooc.ensure(n)
        self.trending.ensure(n)
        cap = self.item_events.shape[0]
        if n > cap:
            grown = np.zeros(max(n, 2 * cap), np.int64)
            grown[:cap] = self.item_events
            self.item_events = grown
