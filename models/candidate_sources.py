"""Candidate sources besides the compiled ones: where a new way of proposing items to a user goes.

The ranker's own sources run inside its one compiled call (:mod:`infogap.models.rank_core`): the
neighbour votes of the user's recent items, the segment and global trending, the category share. A
source here proposes, for one user, item rows with scores in ``[0, 1]``; for each request the ranker
asks every source whose weight (a field of :class:`~infogap.models.engine.EngineConfig`, named by
the source's :attr:`~CandidateSource.setting`) is above 0, joins the rows to the candidates, adds
``weight * score`` to their blend (where the category share is added), and when a source added the
largest part of a picked item's score, the item's reason is the source's. The filters still apply:
nothing the user owns, nothing unavailable or excluded, the category cap.

A new source is then a class here listed in :data:`SOURCES`, its weight in ``EngineConfig`` (and in
:data:`~infogap.models.experiments.RANKER_OVERRIDES` if variants may change it), and its tests.
Sources run in Python per request: a source that costs more than a few microseconds belongs in the
compiled call instead.

>>> [s.setting for s in SOURCES]
['w_cart']
"""
from __future__ import annotations

import numpy as np

from infogap.models.event_weights import TYPE_CODE
from infogap.models.selection import PARTS


class CandidateSource:
    """A source of candidates for a user's ranking (see the module docstring).

    Subclasses set :attr:`setting` and define :meth:`propose` and :meth:`reason`; they read the
    :class:`~infogap.models.model_state.ModelState` and never change it.
    """

    #: the ``EngineConfig`` field that weighs the source (0: off)
    setting: str = ""

    def propose(self, state, u: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """At most ``k`` distinct item rows (``int64``) for user row ``u`` and their scores in ``[0, 1]``."""
        raise NotImplementedError

    def reason(self, state, u: int, row: int) -> str:
        """What a person reads when this source added most of item ``row``'s score."""
        raise NotImplementedError


class StillInCart(CandidateSource):
    """Items the user put in the cart and has not bought, most recent first: "still in your cart".

    Among the user's history entries (the last ``history_len`` items), those of type ``add_to_cart``;
    an item bought since is owned and filtered by the ranker. The score halves every
    :attr:`half_life_days` since the item went into the cart, by event time.

    Examples
    --------
    >>> from infogap.models import Engine, EngineConfig
    >>> e = Engine(EngineConfig(w_cart=2.0))
    >>> e.learn_many([{"event_id": f"e{k}", "user_id": "u", "type": t, "ts": 1000.0 + k, "item_id": i}
    ...               for k, (t, i) in enumerate([("add_to_cart", "kettle"), ("view", "tea"), ("add_to_cart", "mug"),
    ...                                           ("purchase", "mug")])])
    >>> [(r.item_id, r.reason) for r in e.recommend("u", n=1)]
    [('kettle', 'still in your cart')]
    """

    setting = "w_cart"
    #: the score of an item put in the cart this long ago is 0.5
    half_life_days = 3.0
    _CART = TYPE_CODE["add_to_cart"]

    def propose(self, state, u: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        prof = state.profiles
        at = prof.recent_positions(u, min(int(prof.n_push[u]), prof.history_len))
        in_cart = prof.hist_type[u, at] == self._CART
        rows, first = np.unique(prof.hist_item[u, at[in_cart]], return_index=True)  # (newest entry of each)
        ts = prof.hist_ts[u, at[in_cart]][first]
        age_days = np.maximum(state.now - ts, 0.0) / 86400.0
        scores = 0.5 ** (age_days / self.half_life_days)
        if rows.size > k:
            best = np.argsort(-scores, kind="stable")[:k]
            rows, scores = rows[best], scores[best]
        return rows.astype(np.int64), scores

    def reason(self, state, u: int, row: int) -> str:
        return "still in your cart"


#: Every source the ranker may ask, in the order their codes are given (:data:`FIRST_SOURCE` + position).
SOURCES: tuple[CandidateSource, ...] = (StillInCart(),)
#: The code of the first source among the parts a pick's reason is read from (after
#: :data:`infogap.models.selection.PARTS`).
FIRST_SOURCE = len(PARTS)
_NO_ROWS, _NO_SCORES = np.zeros(0, np.int64), np.zeros(0)


def active_sources(cfg) -> tuple[tuple[int, float], ...]:
    """The sources a config weighs above 0, as ``(position in SOURCES, weight)`` (what
    :class:`~infogap.models.ranker.RankerSettings` keeps, so that a request with every source off asks
    nothing).

    >>> from infogap.models import EngineConfig
    >>> active_sources(EngineConfig()), active_sources(EngineConfig(w_cart=0.3))
    ((), ((0, 0.3),))
    """
    return tuple((k, float(getattr(cfg, s.setting))) for k, s in enumerate(SOURCES) if getattr(cfg, s.setting) > 0)


def proposals(state, active: tuple[tuple[int, float], ...], u: int,
              k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The proposals of the ``active`` sources (:func:`active_sources`) for user row ``u``, at most ``k``
    each, as three arrays for the compiled ranker: rows, weighted scores, and each row's source code
    (:data:`FIRST_SOURCE` + the source's position in :data:`SOURCES`). Empty when none is active."""
    if not active:
        return _NO_ROWS, _NO_SCORES, _NO_ROWS
    rows, scores, codes = [], [], []
    for at, w in active:
        r, s = SOURCES[at].propose(state, u, k)
        rows.append(r)
        scores.append(s * w)
        codes.append(np.full(r.size, FIRST_SOURCE + at, np.int64))
    return np.concatenate(rows), np.concatenate(scores), np.concatenate(codes)
