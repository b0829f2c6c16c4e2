"""What one event weighs in what it feeds: the user's profile and trending, the item pairs, ownership.

Every learning path (:meth:`infogap.models.engine.Engine.learn_one`, ``learn_many``) asks
:meth:`EventWeights.of` (:meth:`EventWeights.review` for a review, by its sentiment) and nothing else what an
event counts for, so a new rule for what an event
weighs is a change here (and to its setting in :class:`~infogap.models.engine.EngineConfig`).

- the **weight** of its type (:data:`DEFAULT_EVENT_WEIGHTS` for types the config leaves out), a ``rate``
  scaled by ``rating / rating_scale``: added to the profile's category/tag vector and, when positive,
  to trending; a non-positive weight never enters the co-occurrence, nor the history but for a disliked item's
  review (a vote against its neighbours), and a negative one lowers the user's affinity for the item's
  categories;
- the **pair weight**, the type's weight unscaled by the rating unless ``rating_in_pairs``: the weight of
  the event in the co-occurrence pairs it makes;
- its **rating** (0 for none): the pairs of two rated events weigh by how alike the ratings are;
- whether it makes the item the user's (``exclude_types``): never recommended to them again.

A ``review`` weighs by what it says (:meth:`EventWeights.review`): its type's weight times its sentiment
in [-1, 1], so a liked item counts like a strong signal and a disliked one against the item.
"""
from __future__ import annotations

from collections.abc import Mapping

from infogap.models.events import EVENT_TYPES

#: Weight of each event type in the behaviour vector; ``rate`` is scaled by ``rating / rating_scale``.
#: Non-positive weights never enter the history or the co-occurrence; a negative weight lowers the
#: user's affinity for the item's categories.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "rate": 3.0,
    "impression": 0.0, "dismiss": -2.0, "push_open": 0.5, "push_click": 2.0, "review": 6.0,
}
#: An event type's code in the history (``hist_type``): its position in :data:`~infogap.models.events.EVENT_TYPES`.
TYPE_CODE: dict[str, int] = {t: i for i, t in enumerate(EVENT_TYPES)}


class EventWeights:
    """The weights, rating and ownership of events, by type.

    Parameters
    ----------
    by_type
        Weight per event type; :data:`DEFAULT_EVENT_WEIGHTS` for the types it leaves out.
    rating_scale, rating_in_pairs
        A ``rate`` event weighs ``rating / rating_scale`` times its type's weight (in the pairs too
        with ``rating_in_pairs``).
    owning_types
        Types that make the item the user's (a frozenset).

    Examples
    --------
    >>> w = EventWeights({"rate": 3.0}, rating_scale=3.0, owning_types=("purchase", "rate"))
    >>> w.of("view", None), w.of("rate", 4.0), w.of("rate", None), "rate" in w.owning_types
    ((1.0, 1.0, 0.0), (4.0, 3.0, 4.0), (3.0, 3.0, 0.0), True)
    """

    def __init__(self, by_type: Mapping[str, float] | None = None, rating_scale: float = 3.0,
                 rating_in_pairs: bool = False, owning_types: tuple[str, ...] = ()):
        by_type = by_type or {}
        self.by_type = {t: float(by_type.get(t, DEFAULT_EVENT_WEIGHTS.get(t, 0.0))) for t in EVENT_TYPES}
        self.rating_scale = rating_scale
        self.rating_in_pairs = rating_in_pairs
        self.owning_types = frozenset(owning_types)

    @classmethod
    def for_config(cls, cfg) -> EventWeights:
        """The weights of an :class:`~infogap.models.engine.EngineConfig`."""
        return cls(cfg.event_weights, cfg.rating_scale, cfg.rating_in_pairs, tuple(cfg.exclude_types))

    def review(self, sentiment: float) -> tuple[float, float, float]:
        """``(weight, pair weight, 0)`` of a review whose sentiment is ``sentiment`` (-1 disliked ... 1 liked): the
        ``review`` weight times the sentiment in both. A negative weight never makes pairs; the engine keeps it
        in the history as a vote against the item's neighbours.

        >>> EventWeights().review(1.0), EventWeights().review(-0.5)
        ((6.0, 6.0, 0.0), (-3.0, -3.0, 0.0))
        """
        w = self.by_type.get("review", 0.0) * sentiment
        return w, w, 0.0

    def of(self, typ: str, rating: float | None) -> tuple[float, float, float]:
        """``(weight, pair weight, rating or 0)`` of an event of type ``typ`` (see the module docstring)."""
        w = self.by_type.get(typ, 0.0)
        if typ == "rate" and rating is not None:
            scaled = w * (rating / self.rating_scale)
            return scaled, scaled if self.rating_in_pairs else w, rating
        return w, w, 0.0
