"""Online user segments: River's incremental :class:`river.cluster.KMeans` on a compact profile.

**Why KMeans.** Segment ids are published (Redis ``ig:segment:{user}``, segment trending, push
targeting), so they must stay stable while the stream runs. River's incremental k-means keeps
``n_segments`` fixed center slots and only nudges the winning center towards each new point
(``halflife`` is the step), so an id never changes meaning abruptly: there is no global
re-clustering step. The alternatives renumber: ``CluStream`` and ``STREAMKMeans`` rerun a batch
k-means over micro-clusters/chunks (every macro step may permute ids), ``DBSTREAM`` and
``DenStream`` create, merge and drop clusters as densities move (ids appear and vanish), and
their cost grows with the number of micro-clusters. KMeans is O(k * d) per update with d ~ 20,
deterministic (no randomness is used: unseeded centers start far away, see below), and pickles.

**Features** (fixed keys, so River's ``defaultdict`` centers never grow on a read): the user's
category/tag mix mapped onto ``n_category_slots`` slots (first come, first served; the rest pooled
in ``other``), plus three RFM figures scaled to [0, 1] and weighted by ``rfm_weight``:
frequency ``1 - exp(-f / 20)``, monetary ``log1p(m) / (1 + log1p(m))``, and how recently the user
was active before this event ``exp(-gap_days / 7)``.

**Stability.** Centers are seeded from the first users that are at least ``seed_distance``
apart (data-driven, deterministic) instead of random draws, so no center is born dead. A user is
moved to another segment only when its center is nearer than the current one by more than
``margin`` (hysteresis), which prevents flip-flopping users and relabelling storms.

>>> s = Segmenter(n_segments=2, seed_distance=0.5)
>>> a = s.assign(s.features({0: 1.0}, 0.0, 0.0, 0.0), current=-1)
>>> b = s.assign(s.features({1: 1.0}, 0.0, 0.0, 0.0), current=-1)
>>> a != b, s.assign(s.features({0: 0.9, 1: 0.1}, 0.0, 0.0, 0.0), current=-1) == a
(True, True)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from itertools import repeat
from operator import itemgetter

from river import cluster

_FAR = 1.0e3


def _values(keys: tuple[str, ...]) -> Callable:
    """``d -> (d[k] for k in keys)`` as a tuple, in C (cached: a segmenter's keys never change; it has
    at least the four RFM keys, so ``itemgetter`` always returns a tuple)."""
    get = _GETTERS.get(keys)
    if get is None:
        get = _GETTERS[keys] = itemgetter(*keys)
    return get


_GETTERS: dict[tuple[str, ...], Callable] = {}


def _sq_dist(center, x, keys) -> float:
    """Squared Euclidean distance over ``keys`` (present in both), by ``math.dist``: a Python loop over
    the keys was most of a segment update, which ran on ~6 % of the learned events."""
    get = _values(keys)
    return math.dist(get(center), get(x)) ** 2


class _KMeans(cluster.KMeans):
    """River's KMeans, nearest center found over the segmenter's fixed keys in their order.

    River's ``predict_one`` builds the union of a center's and the point's keys for every center and
    sums ``abs(d) ** p``; here every center and point has the same keys, so the distance is taken over
    them directly, in one order in every process (a set of str keys is ordered by the process's hash
    seed). It was a quarter of ``learn_many``. Learning is River's own.
    """

    keys: tuple[str, ...] = ()

    def predict_one(self, x):
        if self.p != 2 or not self.keys:
            return super().predict_one(x)
        return _nearest(self.centers, self.centers, self.keys, x)


def _nearest(centers, ids, keys: tuple[str, ...], x: dict[str, float]):
    """The first of the nearest of ``centers[c]`` for ``c`` in ``ids`` to ``x``, over ``keys``: the point's
    values are gathered once, each center's in C, and the distances compared unsquared (River's order)."""
    get, dist = _values(keys), math.dist
    xs = get(x)
    best, best_d = None, math.inf
    for c in ids:
        d = dist(get(centers[c]), xs)
        if best is None or d < best_d:
            best, best_d = c, d
    return best


def check_model(model: object) -> None:
    """A ValueError unless ``model`` is a segment model as :meth:`Segmenter.export_model` writes it (read from
    outside): ``n_seeded`` an int >= 0, as many ``centers``, each a list of as many finite numbers as the first,
    and ``slots`` category names to slot names.

    >>> check_model({"n_seeded": 1, "centers": [[0.5, "x"]], "slots": {}})
    Traceback (most recent call last):
    ...
    ValueError: the segment model's 'centers' are not 1 lists of finite numbers of one length
    """
    if type(model) is not dict:
        raise ValueError("the segment model is not a JSON object")
    n_seeded, centers, slots = model.get("n_seeded"), model.get("centers"), model.get("slots")
    if type(n_seeded) is not int or n_seeded < 0:
        raise ValueError("the segment model's 'n_seeded' is not an int >= 0")
    if not (type(centers) is list and len(centers) == n_seeded
            and all(type(c) is list and len(c) == len(centers[0]) for c in centers)
            and all(type(v) in (int, float) and math.isfinite(v) for c in centers for v in c)):
        raise ValueError(f"the segment model's 'centers' are not {n_seeded} lists of finite numbers of one length")
    if not (type(slots) is dict and all(type(v) is str for v in slots.values())):
        raise ValueError("the segment model's 'slots' are not category names to slot names")


class Segmenter:
    """Stable online segments over users' category mix and RFM, with River's KMeans.

    Parameters
    ----------
    n_segments
        Number of segments (center slots).
    n_category_slots
        Category/tag features given their own dimension.
    step
        KMeans ``halflife``: how far the winning center moves towards a point.
    margin
        Relative distance gain required to move a user to another segment.
    seed_distance
        Minimum distance between the points that seed the centers.
    rfm_weight
        Weight of the RFM dimensions relative to the category mix.
    seed
        Seed handed to River (no random draws are made with the defaults).

    Examples
    --------
    >>> s = Segmenter(n_segments=3)
    >>> x = s.features({4: 0.5, 2: 0.5}, frequency=3.0, monetary=0.0, gap_days=0.0)
    >>> round(sum(x[k] for k in s.keys[:8]), 6), len(x) == len(s.keys)
    (1.0, True)
    >>> s.assign(x, current=-1)
    0
    """

    def __init__(self, n_segments: int = 8, n_category_slots: int = 8, step: float = 0.05,
                 margin: float = 0.1, seed_distance: float = 0.6, rfm_weight: float = 0.5, seed: int = 0):
        if n_segments < 1:
            raise ValueError(f"n_segments must be >= 1, got {n_segments}")
        self.n_segments = n_segments
        self.n_category_slots = n_category_slots
        self.step = step
        self.margin = margin
        self.seed_distance = seed_distance
        self.rfm_weight = rfm_weight
        self.seed = seed
        self.keys = tuple(f"c{j}" for j in range(n_category_slots)) + ("other", "frequency", "monetary", "active")
        self._slot_of: dict[int, str] = {}
        self._km = _KMeans(n_clusters=n_segments, halflife=step, mu=_FAR, sigma=0.0, p=2, seed=seed)
        self._km.keys = self.keys
        for c in range(n_segments):  # materialise every key now: reads never create center entries later
            center = self._km.centers[c]
            for k in self.keys:
                center[k] = _FAR
        self._n_seeded = 0
        self._members: list[set[int]] = [set() for _ in range(n_segments)]
        #: centers loaded from a learner elsewhere (:meth:`load_model`): no new category slots here
        self.frozen = False

    #: bumped whenever a center or the number of seeded centers changes; :meth:`nearest` keeps the
    #: centers' values for a version (class defaults: segmenters pickled before they existed)
    _version = 0
    _values_at: tuple[int, list[tuple[float, ...]]] = (-1, [])

    # ------------------------------------------------------------------ features
    def features(self, mix: dict[int, float], frequency: float, monetary: float, gap_days: float) -> dict[str, float]:
        """The fixed-key feature dict of a user (``mix``: feature id -> share)."""
        x = dict.fromkeys(self.keys, 0.0)
        slot_of = self._slot_of
        for f in sorted(mix):  # slots go to features in id order: independent of the dict's order
            share = mix[f]
            k = slot_of.get(f)
            if k is None:
                if len(slot_of) < self.n_category_slots and not self.frozen:
                    k = f"c{len(slot_of)}"
                    slot_of[f] = k
                else:
                    k = "other"
            x[k] += share
        w = self.rfm_weight
        lm = math.log1p(max(monetary, 0.0))
        x["frequency"] = w * (1.0 - math.exp(-max(frequency, 0.0) / 20.0))
        x["monetary"] = w * lm / (1.0 + lm)
        x["active"] = w * math.exp(-max(gap_days, 0.0) / 7.0) if math.isfinite(gap_days) else 0.0
        return x

    # ------------------------------------------------------------------ learning
    def _dist(self, c: int, x: dict[str, float]) -> float:
        return _sq_dist(self._km.centers[c], x, self.keys)

    def assign(self, x: dict[str, float], current: int) -> int:
        """Learn from one user's features and return its (possibly unchanged) segment."""
        if self._n_seeded < self.n_segments:
            if self._n_seeded == 0 or min(self._dist(c, x) for c in range(self._n_seeded)) > self.seed_distance ** 2:
                c = self._n_seeded
                self._n_seeded += 1
                center = self._km.centers[c]
                for k in self.keys:
                    center[k] = x[k]
                self._version += 1
                return c
        # the nearest center moves towards x; every key exists in x and in every center, so River's
        # defaultdict centers never grow
        c = self._km.learn_predict_one(x)
        self._version += 1
        return self._settle(c, current, x)

    def _settle(self, c: int, current: int, x: dict[str, float]) -> int:
        """``c``, or ``current`` when its center is within ``margin`` of as near (hysteresis)."""
        if 0 <= current < self._n_seeded and current != c and \
                self._dist(current, x) <= (1.0 + self.margin) * self._dist(c, x):
            return current
        return c

    def nearest(self, x: dict[str, float], current: int) -> int:
        """The segment ``x`` belongs to without learning from it: the nearest seeded center, or
        ``current`` when its center is within the hysteresis margin (-1 before any center exists).

        >>> s = Segmenter(n_segments=2, seed_distance=0.5)
        >>> a, b = (s.assign(s.features({f: 1.0}, 0.0, 0.0, 0.0), current=-1) for f in (0, 1))
        >>> before = s.centers()
        >>> s.nearest(s.features({1: 0.8, 0: 0.2}, 0.0, 0.0, 0.0), current=a) == b, s.centers() == before
        (True, True)
        """
        if not self._n_seeded:
            return -1
        at = self._values_at
        if at[0] != self._version:  # the centers' values as tuples, kept while the centers stay as they are
            get = _values(self.keys)
            at = self._values_at = (self._version, [get(self._km.centers[c]) for c in range(self._n_seeded)])
        d = list(map(math.dist, at[1], repeat(_values(self.keys)(x))))
        c = d.index(min(d))  # the first of the nearest, as _nearest
        if 0 <= current < self._n_seeded and current != c and d[current] ** 2 <= (1.0 + self.margin) * d[c] ** 2:
            return current  # (what _settle decides: its _dist is this math.dist squared)
        return c

    @property
    def n_seeded(self) -> int:
        """How many centers have been seeded (0: none yet, so no user can be assigned)."""
        return self._n_seeded

    def export_model(self, feature_name) -> dict:
        """The centers and category slots (by name, via ``feature_name(id)``), for :meth:`load_model`."""
        return {"n_seeded": self._n_seeded, "slots": {feature_name(f): k for f, k in self._slot_of.items()},
                "centers": [[self._km.centers[c][k] for k in self.keys] for c in range(self._n_seeded)]}

    def load_model(self, model: dict, feature_id, learning: bool = False) -> None:
        """Assign with centers learned elsewhere from now on (``feature_id(name)`` maps slot names to this
        side's feature ids); :meth:`features` then gives no new slots, the learner does (unless
        ``learning``: this side goes on learning from the loaded centers). A model that is not one
        (:func:`check_model`) or does not fit this side's segments and features is a ValueError, before anything
        changes.

        >>> a, b = Segmenter(n_segments=2, seed_distance=0.5), Segmenter(n_segments=2)
        >>> _ = [a.assign(a.features({f: 1.0}, 0.0, 0.0, 0.0), current=-1) for f in (7, 9)]
        >>> b.load_model(a.export_model(str), int)
        >>> b.centers() == a.centers(), b.nearest(b.features({9: 1.0}, 0.0, 0.0, 0.0), current=-1)
        (True, 1)
        """
        check_model(model)
        if model["n_seeded"] > self.n_segments:
            raise ValueError(f"{model['n_seeded']} segment centers; this side has {self.n_segments}")
        if any(len(values) != len(self.keys) for values in model["centers"]):
            raise ValueError(f"segment centers of another length than this side's {len(self.keys)} features")
        if len(model["slots"]) > self.n_category_slots or not all(k in self.keys for k in model["slots"].values()):
            raise ValueError(f"category slots this side does not have (it has {self.n_category_slots})")
        for c, values in enumerate(model["centers"]):
            self._km.centers[c].update(zip(self.keys, values))
        self._n_seeded = model["n_seeded"]
        self._version += 1
        self._slot_of = {feature_id(name): k for name, k in model["slots"].items()}
        self.frozen = not learning

    def set_member(self, user_row: int, old: int, new: int) -> None:
        """Move a user row between membership lists."""
        if old == new:
            return
        if old >= 0:
            self._members[old].discard(user_row)
        if new >= 0:
            self._members[new].add(user_row)

    def remove_member(self, user_row: int, segment: int) -> None:
        """Forget a user's membership (its past pull on the center is an aggregate of many users)."""
        if segment >= 0:
            self._members[segment].discard(user_row)

    # ------------------------------------------------------------------ reading
    def sizes(self) -> list[int]:
        """Number of users in each segment."""
        return [len(m) for m in self._members]

    def members(self, segment: int) -> frozenset[int]:
        """User rows in a segment."""
        return frozenset(self._members[segment])

    def centers(self) -> list[dict[str, float]]:
        """Copies of the seeded centers."""
        return [dict(self._km.centers[c]) for c in range(self._n_seeded)]
