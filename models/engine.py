"""The ``models.Engine`` facade: one in-process model that the stream, the evaluation and the tests share.

It wires the pure models together, all keyed by dense rows (``Catalog`` for items,
``Profiles`` for users):

- :class:`~infogap.models.profile.Profiles`: decayed behaviour vectors (items, categories/tags), RFM,
  bounded history, consumed items;
- :class:`~infogap.models.cooccurrence.CoOccurrence`: decayed top-M item-item neighbours, directional and
  symmetric, with support/confidence/lift;
- :class:`~infogap.models.segments.Segmenter`: River KMeans segments with stable ids;
- :class:`~infogap.models.trending.Trending`: global and per-segment decayed popularity;
- :mod:`infogap.models.ranker`: the hybrid blend, filters, diversity and reasons.

Time is the events' ``ts`` (epoch seconds); the engine's clock is the newest ``ts`` seen. There is
no I/O, no clock read and no randomness. ``learn_many`` runs the same code as ``learn_one`` over
whole batches (numpy for the pair generation and array updates), so both give the same state.

**What ``forget_user`` keeps.** Every per-user structure is erased: history, behaviour vectors,
RFM, consumed items, segment membership. Aggregates that many users feed are kept: item
co-occurrence weights and counts, item popularity/trending and the segment centers. They hold no
user id, and a pair is published by :meth:`Engine.similar` or cited in a reason only once ``min_users``
distinct users made it (the privacy floor, counted by a 64-bit user bitmap per pair:
:mod:`infogap.models.privacy`), and a trending entry is listed only once ``min_users`` users stand behind it,
so nothing published singles a person out. A pair below the floor still votes in rankings unless
``floor_votes`` is set (docs/privacy.md says what each setting protects against).
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from zlib import crc32

import numpy as np

from infogap.models.candidate_sources import active_sources
from infogap.models.catalog import Catalog
from infogap.models.cooc_shard import CoOccurrenceShard, PairDeltas
from infogap.models.cooccurrence import _MASK, _SHIFT, DOOR_PERIOD, CoOccurrence, PairWeights
from infogap.models.event_weights import DEFAULT_EVENT_WEIGHTS, TYPE_CODE, EventWeights
from infogap.models.events import EVENT_TYPES, NOT_LEARNED_TYPES, Event, as_event
from infogap.models.learn_core import learn_event
from infogap.models.model_state import MAX_STORED_VALUE, RENORM_EXPONENT, ModelState
from infogap.models.population import segmenter_for, trending_for
from infogap.models.privacy import ALL_USERS, NO_USER, mask_of
from infogap.models.profile import Profiles
from infogap.models.ranker import Neighbour, Recommendation, RankerSettings, query_tables, rank, settings_for
from infogap.models.sentiment import SentimentModel, label_of
from infogap.models.topics import SETTINGS as TOPIC_SETTINGS, TopicModel, topic_words
from infogap.models.slot_table import SlotTable

__all__ = ["DEFAULT_EVENT_WEIGHTS", "Engine", "EngineConfig", "Neighbour", "Recommendation", "warm_up"]

#: 2: the learned parts in ``state`` (:class:`~infogap.models.model_state.ModelState`); 1: as engine attributes
STATE_VERSION = 2
#: The name prefix of a review topic among a user's profile features: ``topic:3``.
TOPIC_FEATURE = "topic:"
#: learn_many works through batches of at most this many events (bounds temporary arrays).
_CHUNK = 1024
#: :meth:`Engine.load_rows` and :meth:`Engine.load_population` refuse values their time would scale by more than
#: this (a time read from outside, far ahead of the engine's reference time: the values would overflow).
MAX_LOAD_GROWTH = math.exp(4 * RENORM_EXPONENT)


#: Fields of a trend entry (item row, segment, scaled weight, scaled momentum weight, user bit) and of a history
#: entry (user row, item row, ts, pair weight, entry number, type code, occurrence scale, seq, rating, user bit) in a
#: block's lists; the user bit is :func:`infogap.models.privacy.user_bit` of the event's user.
_TREND, _ENTRY = 5, 10


def topic_number(feature: str) -> int | None:
    """The topic a profile feature name stands for (``topic:3`` -> 3), None for a category or tag.

    >>> topic_number("topic:3"), topic_number("Books"), topic_number("topic:x")
    (3, None, None)
    """
    if feature.startswith(TOPIC_FEATURE) and feature[len(TOPIC_FEATURE):].isdigit():
        return int(feature[len(TOPIC_FEATURE):])
    return None

#: An event block as columns: user ids, types, timestamps, item ids, values, ratings, and the texts (None when
#: the block has no review).
_Columns = tuple[list, list, list, list, list, list, list | None]


def _columns(events: list) -> _Columns:
    """Events (contract dicts or :class:`~infogap.models.events.Event`) as columns: a list per field is a tenth of
    the cost of building an ``Event`` per dict, and ``learn_many`` reads every field of every event."""
    if len(events) == 1 and type(events[0]) is dict:  # learn_one: a fifth of the cost of the lists below
        e = events[0]
        return [e["user_id"]], [e["type"]], [e["ts"]], [e.get("item_id")], [e.get("value")], [e.get("rating")], \
            [e.get("text")]
    if all(type(e) is dict for e in events):
        types = [e["type"] for e in events]
        return ([e["user_id"] for e in events], types, [e["ts"] for e in events],
                [e.get("item_id") for e in events], [e.get("value") for e in events],
                [e.get("rating") for e in events], [e.get("text") for e in events] if "review" in types else None)
    evs = [as_event(e) for e in events]
    types = [e.type for e in evs]
    return ([e.user_id for e in evs], types, [e.ts for e in evs], [e.item_id for e in evs],
            [e.value for e in evs], [e.rating for e in evs], [e.text for e in evs] if "review" in types else None)


@dataclass(frozen=True)
class EngineConfig:
    """Every tunable of the engine (defaults tuned on MovieLens-100K, prequential).

    Parameters
    ----------
    half_life_days
        Half-life of the user profiles (category/tag vector, frequency, monetary), in event time.
    top_n
        Default length of :meth:`Engine.recommend`.
    event_weights, rating_scale, rating_in_pairs
        Weight per event type (:data:`DEFAULT_EVENT_WEIGHTS` for missing ones); ``rate`` is scaled by
        ``rating / rating_scale`` in the profile and trending (and in the pairs if
        ``rating_in_pairs``). Non-positive weights never enter co-occurrence, nor the history but for a disliked
        item's review (a vote against its neighbours).
    exclude_types
        Event types that make an item the user's: never recommended to them again.
    review_positive_min, review_negative_max, review_min_confidence, review_dislike
        Reviews (:mod:`infogap.models.sentiment`): a rating of at least ``review_positive_min`` makes a review
        liked, at most ``review_negative_max`` disliked (and the sentiment model learns its text so); a review
        without such a rating is liked or disliked as the model reads its text, with the sentiment
        ``2 P(liked) - 1``, or neutral (no weight) when that is closer to 0 than ``review_min_confidence``. A
        review weighs its type's weight times its sentiment: a liked item counts like a strong signal; a
        disliked one makes no pairs and no trend, lowers the item's categories in the user's profile and stays in
        the history as a vote against its neighbours, weighing ``review_dislike`` times a liked item's vote.
    n_topics, topic_weight, topic_min_share
        Review topics (:mod:`infogap.models.topics`): topics learned; a review adds ``topic_weight`` split by its
        topic mix (the topics with at least ``topic_min_share`` of it) to the user's decayed profile, as features
        ``topic:<k>`` beside the categories (so segments see them too).
    history_len, max_consumed
        Per-user memory bounds: ring-buffer history length, remembered owned items.
    cooc_half_life_days, window, dir_window, dir_decay, sym_decay, gap_tau_s, gap_floor
        Co-occurrence learning: each new item pairs with the user's last ``window`` items (the
        "A then B" weight only within ``dir_window``), k-th predecessor weighted ``decay ** (k-1)``
        and ``gap_floor + (1 - gap_floor) / (1 + gap / gap_tau_s)`` for the time between them.
    pair_agreement, pair_feature_boost
        What a pair's two events say about each other: two ratings weigh the pair's weights by
        ``exp(-pair_agreement * |rating_a - rating_b|)`` (in rating units); the symmetric weight is
        multiplied by ``1 + pair_feature_boost * J``, J the Jaccard overlap of the two items'
        categories/tags. 0 turns either off.
    n_neighbours, evict_fraction, door_bits, min_support
        Memory bound M per item, share of a full row freed at once, admission door size (0: off),
        co-occurrences needed before a pair is published by :meth:`Engine.similar` or cited.
    min_users
        The privacy floor: a pair is published by :meth:`Engine.similar` and cited in a reason, and a trending
        entry (global or per segment) is listed, only once at least this many distinct users made it (by their
        bits in a 64-bit bitmap: :mod:`infogap.models.privacy`). 1 turns it off.
    floor_votes
        Whether a pair also votes in rankings only from its ``min_users``-th user (strict: what one person did
        then cannot shape another's list; it costs HR@10, docs/privacy.md). By default every pair votes.
    reason_min_support
        A reason cites a pair ("bought together with X N times (lift L)") only with at least this many
        co-occurrences (and ``min_support``) and a lift above 1 as shown; else the next true reason.
    pop_exponent, sym_weight, momentum, momentum_half_life_days
        Ranker: neighbour votes are scaled by ``pop ** -pop_exponent`` on both ends, symmetric
        votes weigh ``sym_weight``, and ``(recent pop / long pop) ** momentum`` favours rising items.
    query_len, query_dir_len, query_dir_decay, query_sym_decay, query_gap_tau_s, query_gap_floor
        How many recent items vote, how many of them vote "what comes next", and their weights.
    w_cooc, w_segment, w_global, w_content, content_history
        Blend weights of the candidate sources (content only for users with fewer than
        ``content_history`` items).
    w_cart
        Blend weight of the items still in the user's cart (0: off;
        :class:`~infogap.models.candidate_sources.StillInCart`).
    max_category_share, new_item_slots, new_item_days, new_item_max_events, new_item_min_share
        Diversity cap per category; slots for catalog items added within ``new_item_days`` with
        fewer than ``new_item_max_events`` events, for users whose mix has that category.
    n_segments, segment_every, segment_step, segment_categories, segment_margin, seed
        River KMeans segments: updated on a user's 1st, 2nd, 4th, ... event and every
        ``segment_every`` events (see :class:`~infogap.models.segments.Segmenter`).
    trending_half_life_days
        Half-life of global and per-segment trending.

    Examples
    --------
    >>> EngineConfig(half_life_days=7, top_n=10).top_n
    10
    >>> EngineConfig(window=0)
    Traceback (most recent call last):
    ...
    ValueError: window must be >= 1, got 0
    """

    # profile
    half_life_days: float = 7.0
    top_n: int = 10
    event_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    rating_scale: float = 3.0
    rating_in_pairs: bool = False
    exclude_types: tuple[str, ...] = ("purchase", "rate", "dismiss", "review")
    review_positive_min: float = 4.0
    review_negative_max: float = 2.0
    review_min_confidence: float = 0.2
    review_dislike: float = 1.0
    n_topics: int = 10
    topic_weight: float = 2.0
    topic_min_share: float = 0.1
    history_len: int = 50
    max_consumed: int = 5000
    # co-occurrence (learning)
    cooc_half_life_days: float | None = 200.0
    window: int = 16
    dir_window: int = 10
    dir_decay: float = 0.6
    sym_decay: float = 0.95
    gap_tau_s: float = 60.0
    gap_floor: float = 0.5
    pair_agreement: float = 0.3
    pair_feature_boost: float = 1.0
    n_neighbours: int = 400
    evict_fraction: float = 0.25
    min_support: int = 2
    min_users: int = 5
    floor_votes: bool = False
    reason_min_support: int = 3
    door_bits: int = 0
    pop_exponent: float = 0.2
    # ranker (query)
    query_len: int = 20
    query_dir_len: int = 5
    query_dir_decay: float = 0.5
    query_sym_decay: float = 0.9
    query_gap_tau_s: float = 60.0
    query_gap_floor: float = 0.5
    sym_weight: float = 0.8
    w_cooc: float = 1.0
    w_segment: float = 0.02
    w_global: float = 0.01
    w_content: float = 0.01
    content_history: int = 5
    w_cart: float = 0.0
    max_category_share: float = 0.8
    new_item_slots: int = 1
    new_item_days: float = 14.0
    new_item_max_events: int = 5
    new_item_min_share: float = 0.15
    # segments and trending
    n_segments: int = 8
    segment_every: int = 100
    segment_step: float = 0.05
    segment_categories: int = 8
    segment_margin: float = 0.1
    trending_half_life_days: float = 3.0
    momentum_half_life_days: float = 30.0
    momentum: float = 0.3
    seed: int = 0

    def __post_init__(self):
        for name in ("top_n", "history_len", "window", "n_neighbours", "query_len", "n_segments", "segment_every",
                     "reason_min_support", "min_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window", "query_len"):
            if getattr(self, name) > self.history_len:
                raise ValueError(f"{name} ({getattr(self, name)}) must not exceed history_len ({self.history_len})")
        if self.n_neighbours < 2:
            raise ValueError(f"n_neighbours must be >= 2, got {self.n_neighbours}")
        if not 0.0 < self.evict_fraction < 1.0:
            raise ValueError(f"evict_fraction must be in (0, 1), got {self.evict_fraction}")
        for name in ("half_life_days", "trending_half_life_days"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 days (or None for no decay), got {v}")
        if self.cooc_half_life_days is not None and not self.cooc_half_life_days > 0:
            raise ValueError(f"cooc_half_life_days must be > 0 (or None), got {self.cooc_half_life_days}")
        for name in ("pair_agreement", "pair_feature_boost", "review_min_confidence", "review_dislike", "topic_weight",
                     "topic_min_share"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 2 <= self.n_topics <= TOPIC_SETTINGS["n_topics"][2]:
            raise ValueError(f"n_topics must be in [2, {TOPIC_SETTINGS['n_topics'][2]}], got {self.n_topics}")
        if not self.review_negative_max < self.review_positive_min:
            raise ValueError(f"review_negative_max ({self.review_negative_max}) must be below review_positive_min "
                             f"({self.review_positive_min})")
        if not self.rating_scale > 0:
            raise ValueError(f"rating_scale must be > 0, got {self.rating_scale}")
        unknown = set(self.event_weights) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"event_weights has unknown types {sorted(unknown)}; known: {', '.join(EVENT_TYPES)}")

    def fingerprint(self) -> str:
        """A short hash of the configuration, to stamp cached results with."""
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]


class Engine:
    """The pure online model core: learn from events, recommend, explain.

    Parameters
    ----------
    config
        An :class:`EngineConfig` (defaults when None).

    Examples
    --------
    >>> e = Engine(EngineConfig(half_life_days=7, top_n=10, min_users=3))  # a pair counts once 3 users made it
    >>> e.upsert_item({"item_id": "tea", "title": "Green tea", "category": "Drinks"})
    >>> baskets = [("a", "tea"), ("a", "cup"), ("b", "tea"), ("b", "cup"), ("c", "tea"), ("c", "cup"),
    ...            ("d", "jam"), ("d", "tea"), ("e", "tea")]
    >>> events = [{"event_id": f"e{k}", "user_id": u, "type": "purchase", "ts": 1000.0 + k, "item_id": i}
    ...           for k, (u, i) in enumerate(baskets)]
    >>> e.learn_many(events)
    >>> [(r.item_id, r.reason) for r in e.recommend("e", n=1)]
    [('cup', 'bought together with Green tea 3 times (lift 2.0)')]
    >>> e.similar("tea")[0].item_id, e.segment("c") is not None, e.known_user("zed")
    ('cup', True, False)
    >>> e.forget_user("c"); e.known_user("c")
    False

    A pair fewer than ``min_users`` users made is never published nor cited (the privacy floor); it votes in
    rankings unless ``floor_votes`` is set:

    >>> e.learn_many([{"user_id": "d", "type": "view", "ts": 2000.0 + k, "item_id": i} for k, i in
    ...               enumerate(["tea", "mug"] * 5)])  # d alone, many times
    >>> [n.item_id for n in e.similar("tea")], [r.reason for r in e.recommend("e", n=3) if r.item_id == "mug"]
    (['cup'], ['picked for you'])
    """

    def __init__(self, config: EngineConfig | None = None, *, cooc: str = "local", population: str = "local",
                 sentiment: SentimentModel | None = None):
        cfg = config or EngineConfig()
        for name, mode in (("cooc", cooc), ("population", population)):
            if mode not in ("local", "remote"):
                raise ValueError(f"{name} must be 'local' or 'remote', got {mode!r}")
        self.config = cfg
        #: "remote": co-occurrence is learned elsewhere (see :mod:`infogap.models.cooc_shard`); this engine
        #: emits its pair updates (:meth:`drain_pair_deltas`) and ranks with rows given to :meth:`load_rows`.
        self.cooc_mode = cooc
        #: "remote": segment centers and trending are learned elsewhere (:mod:`infogap.models.population`); this
        #: engine emits samples (:meth:`drain_population`) and uses what :meth:`load_population` gives it.
        self.population_mode = population
        self._pop_seg: list[list] = []
        self._pop_trend: list[list] = []
        self._pop_review: list[list] = []
        #: per push batch: (codes, deltas, ts, seq, occurrence rows, their ts, pairs made, seq, user bits)
        self._outbox: list[tuple] = []
        self._weights = EventWeights.for_config(cfg)
        segmenter = segmenter_for(cfg)
        segmenter.frozen = population == "remote"
        #: what the engine has learned, by name: what the ranker reads and the learning steps write
        self.state = ModelState(
            Catalog(),
            Profiles(history_len=cfg.history_len, half_life_days=cfg.half_life_days, max_consumed=cfg.max_consumed),
            CoOccurrence(n_neighbours=cfg.n_neighbours, half_life_days=cfg.cooc_half_life_days,
                         evict_fraction=cfg.evict_fraction, pop_exponent=cfg.pop_exponent, door_bits=cfg.door_bits,
                         evict_sym_weight=cfg.sym_weight, indexed=cooc == "local", min_users=cfg.min_users,
                         floor_votes=cfg.floor_votes),
            trending_for(cfg), segmenter)
        self._pairs = PairWeights(window=cfg.window, dir_window=cfg.dir_window, dir_decay=cfg.dir_decay,
                                  sym_decay=cfg.sym_decay, gap_tau_s=cfg.gap_tau_s, gap_floor=cfg.gap_floor,
                                  agreement=cfg.pair_agreement, feature_boost=cfg.pair_feature_boost)
        #: what :meth:`recommend` ranks with: the config, its query weight tables
        #: (:func:`infogap.models.ranker.query_tables`) and its candidate sources (read only)
        self.ranker_settings = RankerSettings(cfg, *query_tables(cfg), active_sources(cfg))
        #: reads the reviews without a telling rating, learns from those with one (the stream passes one that
        #: segments Chinese words and knows an English lexicon: :mod:`infogap.stream.text`)
        self.sentiment = sentiment if sentiment is not None else SentimentModel()
        #: what reviews are about (:mod:`infogap.models.topics`), read with the sentiment model's tokenizer
        self.topics = TopicModel(n_topics=cfg.n_topics, seed=cfg.seed)
        self.n_learned = 0

    # ------------------------------------------------------------------ learning
    def learn_one(self, event: Event | Mapping) -> None:
        """Learn from one event (a contract dict or an :class:`~infogap.models.events.Event`). A ``forget`` event
        forgets its user; ``unsubscribe`` and ``push_bounce`` events (consent, not behaviour) are not learned."""
        st = self.state
        if event.__class__ is dict:  # the commonest case, without the columns of _learn
            typ, ts = event["type"], event["ts"]
            if typ not in NOT_LEARNED_TYPES and st.t0 is not None and not st.renormalisation_due(ts):
                trends, entries = [], []
                self._learn_event(trends, entries, event["user_id"], typ, ts, event.get("item_id"),
                                  event.get("value"), event.get("rating"), self.n_learned, event.get("text"))
                self._finish_block(trends, entries, 1)
                return
        self._learn(_columns([event]))

    def learn_many(self, events: Iterable[Event | Mapping]) -> None:
        """Learn from events in order: the same state as ``learn_one`` in a loop, much faster."""
        self._learn(_columns(events if isinstance(events, list) else list(events)))

    def _learn(self, cols: _Columns) -> None:
        """Events in blocks: cut where a block reaches a multiple of _CHUNK learned events, at a forget (or
        another type not learned, :data:`~infogap.models.events.NOT_LEARNED_TYPES`) and where the reference time must
        move first."""
        users, types, tss = cols[0], cols[1], cols[2]
        st = self.state
        start = 0
        chunk = _CHUNK
        for k in range(len(types)):
            if k > start and (self.n_learned + k - start) % chunk == 0:
                self._learn_block(cols, start, k)  # blocks end at multiples of _CHUNK learned events
                start = k
            if types[k] in NOT_LEARNED_TYPES:  # forget, and the consent events: no behaviour
                self._learn_block(cols, start, k)
                if types[k] == "forget":
                    self.forget_user(users[k])
                start = k + 1
                continue
            if st.t0 is None:
                st.t0 = tss[k]
            elif st.renormalisation_due(tss[k]):
                self._learn_block(cols, start, k)
                st.renormalise(tss[k])
                start = k
        self._learn_block(cols, start, len(types))

    def _learn_block(self, cols: _Columns, start: int, end: int) -> None:
        """Learn events ``start:end`` of ``cols`` (no forget among them, no renormalisation due)."""
        if end <= start:
            return
        users, types, tss, items, values, ratings, texts = cols
        seq0 = self.n_learned - start  # event k's sequence number is seq0 + k
        trends, entries = [], []
        learn = self._learn_event
        for k in range(start, end):
            learn(trends, entries, users[k], types[k], tss[k], items[k], values[k], ratings[k], seq0 + k,
                  texts[k] if texts is not None else None)
        self._finish_block(trends, entries, end - start)

    def _learn_event(self, trends: list, entries: list, user_id: str, typ: str, ts: float, item_id: str | None,
                     value: float | None, rating: float | None, seq: int, text: str | None = None) -> None:
        """The steps of one event that are not array arithmetic, in order, for ``learn_one`` and ``learn_many``
        alike: the clock, the event's weights, the user's profile, then for an item event with a positive
        weight a trend entry (its _TREND fields appended to ``trends``) and, unless it repeats the user's last
        item, a history entry (its _ENTRY fields appended to ``entries``; flat lists of numbers: no object per
        entry for the garbage collector to track); last the user's segment when due. A new item gets its room in
        the per-item arrays at once. :meth:`_finish_block` applies the entries to the arrays. ``seq``: the
        event's sequence number (:attr:`n_learned` before it); ``text``: a review's. A disliked item's review takes
        a history entry with its negative weight (it votes against the item's neighbours) and nothing else."""
        st = self.state
        prof = st.profiles
        if ts > st.now:
            st.now = ts
        u = prof.row(user_id)
        weights = self._weights
        if typ == "review":
            w, pair_w, rating = weights.review(self._learn_review(u, ts, text, rating, seq))
        else:
            w, pair_w, rating = weights.of(typ, rating)
        exp, t0 = math.exp, st.t0
        su = exp(prof.lam * (ts - t0))
        remote_population = self.population_mode == "remote"
        if item_id is None:
            n, c, prev_ts = prof.learn(u, ts, su, value)
        else:
            cat = st.catalog
            i = cat.row(item_id)
            if i >= st.trending.n_items:  # a new item: room in every per-item array
                st.ensure_items(len(cat))
            n, c, prev_ts = prof.learn(u, ts, su, value, i, cat.features(i), w, typ in weights.owning_types,
                                       against=w < 0.0 and typ == "review")
            if w < 0.0:
                if c >= 0:  # a disliked item: its entry (no trend, no pairs, no occurrence)
                    entries += (u, i, ts, w, c, TYPE_CODE[typ], 0.0, seq, 0.0, NO_USER)
            elif w > 0.0:
                tr, segment = st.trending, prof.segment[u]
                bit = crc32(user_id.encode()) & 63  # privacy.user_bit(user_id) inline (BITS - 1 = 63): the user's bit
                trends += i, segment, w * exp(tr.lam * (ts - t0)), exp(tr.lam_m * (ts - t0)), bit
                if remote_population:
                    self._pop_trend.append([seq, item_id, int(segment), w, ts, bit])
                if c >= 0:  # (a remote co-occurrence gets the pairs unscaled: the shard scales by event time)
                    entries += (u, i, ts, pair_w, c, TYPE_CODE.get(typ, 0),
                                1.0 if self.cooc_mode == "remote" else exp(st.cooc.lam * (ts - t0)), seq, rating,
                                bit)
        if not n & (n - 1) or n % self.config.segment_every == 0:  # n = 1, 2, 4, 8, ... and every `segment_every`
            self._update_segment(u, ts, prev_ts, seq)
        elif remote_population and prof.segment[u] < 0 and st.segmenter.n_seeded:
            self._update_segment(u, ts, prev_ts, -1)  # the centers arrived after the user's last update

    def _finish_block(self, trends: list, entries: list, n_block: int) -> None:
        """After the ``n_block`` events of a block: their trend and history entries into the arrays (one
        entry: one compiled call), and the admission door reset when the block ended on its period."""
        st = self.state
        self.n_learned += n_block
        remote = self.cooc_mode == "remote"
        if n_block == 1 and trends and entries and not remote:  # one history entry and its trend: one compiled call
            u, i, ts, pair_w, c, type_code, scale, _, rating, bit = entries
            _, segment, x, xm, _ = trends
            learn_event(st, self._pairs, self.config.window, u, i, segment, x, xm, ts, pair_w, c, type_code, scale,
                        rating, bit)
        else:
            self._learn_arrays(trends, entries, remote)
        if not remote and self.n_learned % DOOR_PERIOD < n_block:  # the block passed a multiple of the period
            st.cooc.reset_door()

    def _learn_arrays(self, trends: list, entries: list, remote: bool) -> None:
        """A block's trend entries and history entries, in order."""
        st = self.state
        if trends:
            ti, tseg, tx, tm, tbit = (trends[k::_TREND] for k in range(_TREND))
            np.add.at(st.item_events, ti, 1)
            st.trending.add(ti, tseg, tx, tm, mask_of(tbit))
        if entries:
            pu, pi, pts, pw, pc, ptype, psc, pseq, prt, pbit = (entries[k::_ENTRY] for k in range(_ENTRY))
            if not remote:
                if min(pw) > 0.0:
                    st.cooc.add_occurrences(pi, psc)
                else:  # a disliked item is no occurrence
                    keep = [k for k, w in enumerate(pw) if w > 0.0]
                    st.cooc.add_occurrences([pi[k] for k in keep], [psc[k] for k in keep])
            self._learn_pairs(np.asarray(pu, np.int64), np.asarray(pi, np.int64), np.asarray(pts), np.asarray(pw),
                              np.asarray(pc, np.int64), np.asarray(ptype, np.int8), np.asarray(psc),
                              np.asarray(pseq, np.int64), np.asarray(prt), np.asarray(pbit, np.uint8))

    def _learn_pairs(self, pu, pi, pts, pw, pc, ptype, scale, pseq, prt, pbit) -> None:
        """A batch of pushes: history windows (ring + earlier pushes of the batch), pairs (each carrying its
        event's user bit ``pbit``), ring writes."""
        cfg = self.config
        prof = self.state.profiles
        h, w = cfg.history_len, cfg.window
        p = pu.shape[0]
        order = np.argsort(pu, kind="stable")
        rank = np.empty(p, np.int64)
        rank[order] = np.arange(p)
        su = pu[order]
        start = np.r_[True, su[1:] != su[:-1]]
        gstart = np.maximum.accumulate(np.where(start, np.arange(p), 0))
        offset = rank - gstart[rank]  # earlier pushes of the same user in this batch
        kk = np.arange(1, w + 1)
        inb = offset[:, None] >= kk
        src = order[np.maximum(rank[:, None] - kk, 0)]
        cnt = pc[:, None] - kk
        ring_ok = (~inb) & (cnt >= 0)
        ridx = cnt % h
        urow = pu[:, None]
        prev_items = np.where(inb, pi[src], np.where(ring_ok, prof.hist_item[urow, ridx], -1))
        prev_ts = np.where(inb, pts[src], prof.hist_ts[urow, ridx])
        prev_w = np.where(inb, pw[src], prof.hist_w[urow, ridx])
        prev_rt = np.where(inb, prt[src], prof.hist_rating[urow, ridx])
        fm = self.state.catalog.feat_mask
        codes, deltas, ev = self._pairs.many(pi, pts, pw, scale, prev_items, prev_ts, prev_w, prt, prev_rt, fm[pi],
                                             fm[prev_items])
        ev2 = np.repeat(ev, 2)
        if self.cooc_mode == "remote":
            occ = slice(None) if pw.min() > 0.0 else pw > 0.0  # (a disliked item is no occurrence)
            self._outbox.append((np.asarray(codes, np.int64), deltas, pts[ev2], pseq[ev2], pi[occ], pts[occ],
                                 np.bincount(ev, minlength=p).astype(np.float64)[occ], pseq[occ], pbit[ev2]))
        else:
            self.state.cooc.update(codes, deltas, pbit[ev2])
            self.state.cooc.raw_pair_total += len(codes) // 2  # (two updates per pair)
        prof.write_entries(pu, pc, pi, pts, pw, ptype, prt)

    def drain_pair_deltas(self) -> PairDeltas | None:
        """The co-occurrence updates learned since the last call (``cooc="remote"`` engines), or None.

        ``seq`` numbers are :attr:`n_learned` at each event (the first event learned is 0).
        """
        if not self._outbox:
            return None
        codes, d, ts, seq, occ, occ_ts, occ_pairs, occ_seq, ubit = (np.concatenate(x) for x in zip(*self._outbox))
        self._outbox = []
        rows, nbs = codes >> _SHIFT, codes & _MASK
        every = np.concatenate([rows, nbs, occ.astype(np.int64)])
        where = np.zeros(len(self.state.catalog), np.int64)  # np.unique's (used, inverse), without its sort
        where[every] = 1
        used = np.flatnonzero(where)
        where[used] = np.arange(used.size)
        inverse = where[every]
        n, m = rows.size, occ.size
        ids = self.state.catalog.item_id
        return PairDeltas(items=[ids(r) for r in used.tolist()], row=inverse[:n], nb=inverse[n: 2 * n], d=d,
                          ts=ts, seq=seq, occ=inverse[2 * n: 2 * n + m], occ_ts=occ_ts, occ_pairs=occ_pairs,
                          occ_seq=occ_seq, ubit=ubit)

    def drain_population(self) -> dict[str, list] | None:
        """The segment samples, trend entries and labelled reviews learned since the last call
        (``population="remote"`` engines), or None: ``{"seg": [[seq, {category: share}, frequency, monetary,
        gap_days or None]], "trend": [[seq, item_id, segment, weight, ts, user bit]]}`` and, when there are any,
        ``"review": [[seq, text, liked or None]]``, with ``seq`` as in :meth:`drain_pair_deltas`, for
        :meth:`infogap.models.population.PopulationLearner.learn`."""
        if not self._pop_seg and not self._pop_trend and not self._pop_review:
            return None
        out = {"seg": self._pop_seg, "trend": self._pop_trend}
        if self._pop_review:
            out["review"] = self._pop_review
        self._pop_seg, self._pop_trend, self._pop_review = [], [], []
        return out

    def load_population(self, model: Mapping | None, trending: Mapping[int | None, list[tuple[str, float]]],
                        at: float, momentum: tuple[list[str], list[float]] | None = None) -> list[str]:
        """Assign segments with ``model``'s centers (:meth:`infogap.models.population.PopulationLearner.model`)
        and rank with ``trending`` (``{None: global, segment: ...}`` lists of ``(item_id, score at
        time at)``; items not listed score 0) and ``momentum`` (``(item ids, values at time at)``,
        :meth:`~infogap.models.population.PopulationLearner.momentum`). For ``population="remote"`` engines.

        The lists replace the engine's trending scores; until the next load, this engine's own events
        add to them as usual (so a new deployment's first users see what is trending at once, and
        events the learner had not applied yet at ``at`` are counted by the next load, not twice).
        Users still without a segment get one from the loaded centers; returns their ids.

        Values that cannot be loaded (a model that does not fit, scores not finite within
        :data:`~infogap.models.model_state.MAX_STORED_VALUE`, a time ``at`` so far ahead that they would grow more
        than :data:`MAX_LOAD_GROWTH` times) are a ValueError (or an OverflowError) before anything changes.
        """
        cat, tr = self.state.catalog, self.state.trending
        t0 = at if self.state.t0 is None else self.state.t0
        scale, scale_m = math.exp(tr.lam * (at - t0)), math.exp(tr.lam_m * (at - t0))
        if not max(scale, scale_m) <= MAX_LOAD_GROWTH:
            raise ValueError(f"the population's time {at} is too far ahead of this engine's")
        loaded = {seg: (np.fromiter((cat.row(i) for i, _ in lst), np.int64, len(lst)),
                        np.fromiter((s for _, s in lst), np.float64, len(lst)))
                  for seg, lst in trending.items()}
        if momentum is not None:
            rows_m = np.fromiter(map(cat.row, momentum[0]), np.int64, len(momentum[0]))
            values_m = np.asarray(momentum[1], np.float64)
        if not all((np.abs(scores) <= MAX_STORED_VALUE).all() for _, scores in loaded.values()) or \
                (momentum is not None and not (np.abs(values_m) <= MAX_STORED_VALUE).all()):  # (NaN fails)
            raise ValueError(f"the population's trending scores or momentum are not finite within {MAX_STORED_VALUE:g}")
        if model is not None and model.get("n_seeded"):  # (a model that does not fit: a ValueError, nothing changed)
            self.state.segmenter.load_model(model, cat.feature)
        self.state.t0 = t0
        n = len(cat)
        self.state.ensure_items(n)
        if momentum is not None:
            tr.momentum_[:] = 0.0
            tr.momentum_[rows_m] = values_m * scale_m
        tr.global_[:] = 0.0
        tr.segment_[:] = 0.0
        tr.users_[:] = 0  # (the lists were published at the learner's privacy floor: their entries are at it)
        for seg, (rows, scores) in loaded.items():
            scores = scores * scale
            if seg is None:
                tr.global_[rows] = scores
                tr.users_[0, rows] = ALL_USERS
            elif 0 <= seg < tr.n_segments:
                tr.segment_[seg, rows] = scores
                tr.users_[1 + seg, rows] = ALL_USERS
        tr.global_max = float(tr.global_[:n].max(initial=0.0))
        tr.segment_max[:] = tr.segment_[:, :n].max(axis=1, initial=0.0)
        tr.changed()  # the scores were replaced: the remembered top lists are stale
        return self._assign_unassigned()

    def _assign_unassigned(self) -> list[str]:
        """Users without a segment (all their scheduled updates came before any centers) get their
        nearest one now; returns their ids."""
        seg, prof = self.state.segmenter, self.state.profiles
        if not seg.n_seeded or self.state.t0 is None or sum(seg.sizes()) == len(prof):  # everyone has one
            return []
        done = []
        for u, sg in enumerate(prof.segment):
            uid = prof.user_id(u) if sg < 0 else None
            if uid is not None:
                self._update_segment(u, self.state.now, prof.last_ts[u], -1)
                done.append(uid)
        return done

    def query_items(self, user_id: str) -> list[str]:
        """The recent items whose neighbour rows :meth:`recommend` reads for this user (newest first)."""
        prof = self.state.profiles
        u = prof.find(user_id)
        if u is None:
            return []
        k = min(self.config.query_len, prof.n_push[u], prof.history_len)
        items = prof.hist_item[u, prof.recent_positions(u, k)]
        ids = self.state.catalog.item_id
        return [ids(i) for i in items.tolist() if i >= 0]

    def load_rows(self, rows: Iterable[Mapping]) -> None:
        """Take co-occurrence rows learned elsewhere (:meth:`infogap.models.cooc_shard.CoOccurrenceShard.export_row`).

        A row that also carries its sender's ``numbering`` and the neighbours' ``numbers`` in it has
        them translated (:meth:`infogap.models.catalog.Catalog.translated`) instead of looked up by id.

        Rows as :func:`infogap.stream.core.neighbour_rows.decode_row` checks them load without an error, but for
        one whose time is so far ahead of the reference time that its values would grow more than
        :data:`MAX_LOAD_GROWTH` times: a ValueError (or an OverflowError) before that row changes anything.
        """
        co, cat = self.state.cooc, self.state.catalog
        pop_rows, pop_values, raw_values, sizes, factors, times = [], [], [], [], [], []
        newest = None  # (t, total, pair_total, raw counts) of the newest row: the totals as of then
        with_raw = True  # every row carries raw counts (rows from before them do not)
        for doc in rows:
            t = float(doc["t"])
            factor = 1.0 if self.state.t0 is None else self.state.growth(co.lam, t)  # (the first row sets t0 = t)
            if not factor <= MAX_LOAD_GROWTH:
                raise ValueError(f"the row of {doc['item_id']!r} is of a time too far ahead of this engine's")
            r = cat.row(doc["item_id"])
            numbering = doc.get("numbering")
            nbs = (cat.rows(doc["neighbours"]) if numbering is None
                   else cat.translated(numbering, doc["numbers"], doc["neighbours"]))
            self.state.ensure_items(len(cat))
            if self.state.t0 is None:
                self.state.t0 = t
            co.set_row(r, nbs, np.asarray(doc["values"], np.float64).reshape(4, -1), factor,
                       private=np.asarray(doc.get("private", ()), np.int64))
            pop_rows += (nbs, (r,))
            pop_values += (doc["neighbour_pop"], (doc["pop"],))
            if with_raw and doc.get("raw_pop") is not None:
                raw_values += (doc["neighbour_raw_pop"], (doc["raw_pop"],))
            else:
                with_raw = False
            sizes.append(nbs.size + 1)
            factors.append(factor)
            times.append(t)
            if newest is None or t >= newest[0]:
                newest = (t, doc["total"] * factor, doc["pair_total"] * factor,
                          (doc.get("raw_total"), doc.get("raw_pair_total")))
        if newest is not None:  # one update for all rows, entries in the same order as row by row
            raw = None
            if with_raw and newest[3][1] is not None:
                raw = (np.concatenate(raw_values), float(newest[3][0]), float(newest[3][1]))
            co.set_popularity(np.concatenate(pop_rows).astype(np.int64, copy=False),
                              np.concatenate(pop_values) * np.repeat(factors, sizes), newest[1], newest[2],
                              at=np.repeat(times, sizes), raw=raw)

    def drop_rows(self, item_ids: Iterable[str]) -> None:
        """Forget rows given to :meth:`load_rows` (a bounded cache evicting them)."""
        for item_id in item_ids:
            r = self.state.catalog.find(item_id)
            if r is not None:
                self.state.cooc.clear_row(r)

    def reserve_rows(self, n: int) -> None:
        """Room for ``n`` rows given to :meth:`load_rows`, taken at once: a cache that holds at most ``n``
        (:class:`infogap.stream.neighbour_cache.NeighbourCache`) then never waits on the rows' arrays growing
        (:meth:`infogap.models.cooccurrence.CoOccurrence.reserve_blocks`)."""
        self.state.cooc.reserve_blocks(n)

    def _update_segment(self, u: int, ts: float, prev_ts: float, seq: int) -> None:
        prof = self.state.profiles
        decay = math.exp(-prof.lam * (ts - self.state.t0))
        gap_days = (ts - prev_ts) / 86400.0 if prev_ts == prev_ts else math.inf
        mix, frequency, monetary = prof.mix(u), prof.freq[u] * decay, prof.money[u] * decay
        x = self.state.segmenter.features(mix, frequency, monetary, gap_days)
        old = prof.segment[u]
        if self.population_mode == "remote":  # the learner learns; this engine assigns with its centers
            if seq >= 0:  # a scheduled update (seq -1: only an assignment)
                name = self.state.catalog.feature_name
                self._pop_seg.append([seq, {name(f): v for f, v in mix.items()}, frequency, monetary,
                                      gap_days if math.isfinite(gap_days) else None])
            new = self.state.segmenter.nearest(x, old)
        else:
            new = self.state.segmenter.assign(x, old)
        if new != old:
            self.state.segmenter.set_member(u, old, new)
            prof.segment[u] = new

    def review_sentiment(self, text: str | None, rating: float | None) -> float:
        """A review's sentiment in [-1, 1] (see :class:`EngineConfig`): from its rating when the rating tells, else
        from its text as the sentiment model reads it, 0 when neutral (read only).

        >>> e = Engine()
        >>> e.review_sentiment("anything", 5.0), e.review_sentiment("anything", 1.0), e.review_sentiment("", None)
        (1.0, -1.0, 0.0)
        """
        return self._sentiment(self._label(rating), text)

    def _label(self, rating: float | None) -> bool | None:
        """What a review's rating says: liked (True), disliked (False) or nothing (None)."""
        cfg = self.config
        return label_of(rating, positive_min=cfg.review_positive_min, negative_max=cfg.review_negative_max)

    def _sentiment(self, label: bool | None, text: str | None, tokens: list[str] | None = None) -> float:
        """The sentiment of a review with the rating's ``label``: +-1 from it, else as the model reads ``text``
        (``tokens``: its tokens, when the caller has them)."""
        if label is not None:
            return 1.0 if label else -1.0
        if not text:
            return 0.0
        s = 2.0 * self.sentiment.predict_one(text, tokens) - 1.0
        return s if abs(s) >= self.config.review_min_confidence else 0.0

    def _learn_review(self, u: int, ts: float, text: str | None, rating: float | None, seq: int) -> float:
        """A review of user row ``u`` at ``ts``, learned: its text teaches the topic model, and the sentiment model
        when the rating tells (labelled so), here or (``population="remote"``) in the population learner, as a
        sample ``[seq, text, liked or None]`` of :meth:`drain_population`; its topic mix joins the user's decayed
        profile (features ``topic:<k>``, ``topic_weight`` split by the mix). Returns its sentiment."""
        label = self._label(rating)
        if not text:
            return self._sentiment(label, text)
        cfg = self.config
        tokens = self.sentiment.tokenize(text)  # (once, for both models)
        words = topic_words(tokens)
        if self.population_mode == "remote":
            self._pop_review.append([seq, text, label])
        else:
            if label is not None:
                self.sentiment.learn_one(text, label, tokens)
            self.topics.learn_one(words)
        if cfg.topic_weight > 0 and self.topics.n_learned:
            prof, feature = self.state.profiles, self.state.catalog.feature
            scale = cfg.topic_weight * math.exp(prof.lam * (ts - self.state.t0))
            for k, share in self.topics.mix(words).items():
                if share >= cfg.topic_min_share:
                    prof.add_features(u, (feature(f"{TOPIC_FEATURE}{k}"),), share * scale)
        return self._sentiment(label, text, tokens)

    def load_topics(self, state: Mapping) -> None:
        """Read reviews' topics with the population learner's topic model (its
        :meth:`~infogap.models.topics.TopicModel.to_state`); ``ValueError`` for a state that is not one."""
        self.topics = TopicModel.from_state(state)

    def load_sentiment(self, state: Mapping) -> None:
        """Read reviews with the population learner's sentiment model (its
        :meth:`~infogap.models.sentiment.SentimentModel.to_state`), with this engine's tokenizer and lexicon; raises
        ``ValueError`` for a state that is not one (the model in use stays)."""
        self.sentiment = SentimentModel.from_state(state, self.sentiment.tokenize, lexicon=self.sentiment.lexicon)

    # ------------------------------------------------------------------ catalog and users
    def upsert_item(self, item: Mapping) -> None:
        """Insert or update an item from the ``items`` topic (item_id, title, category, tags, price, available)."""
        self.state.catalog.upsert(item, now=self.state.now if self.state.now > -math.inf else None)
        self.state.ensure_items(len(self.state.catalog))

    def remove_item(self, item_id: str) -> None:
        """Remove an item from the catalog: it is no longer recommended (its statistics remain)."""
        self.state.catalog.remove(str(item_id))

    def forget_user(self, user_id: str) -> None:
        """Erase every per-user trace of ``user_id`` (see the module docstring for aggregates)."""
        r = self.state.profiles.find(user_id)
        if r is None:
            return
        self.state.segmenter.remove_member(r, self.state.profiles.segment[r])
        self.state.profiles.forget(user_id)

    def stale_users(self, user_ids: Collection[str], now: float, idle_s: float = math.inf,
                    keep: int | None = None) -> list[str]:
        """Of ``user_ids``, those to evict at event time ``now``: every one whose last event is more than
        ``idle_s`` before ``now`` (and unknown ones), then the least recent beyond ``keep`` (read only;
        one numpy pass over their last event times).

        >>> e = Engine()
        >>> for k, u in enumerate("abcd"): e.learn_one({"user_id": u, "type": "view", "ts": 100.0 * k, "item_id": "i"})
        >>> e.stale_users("abcd", now=300.0, idle_s=250.0), sorted(e.stale_users("abcd", now=300.0, keep=2))
        (['a'], ['a', 'b'])
        """
        ids = list(user_ids)
        ts = self.state.profiles.last_seen(ids)
        gone = ts < now - idle_s
        extra = int(ts.size - gone.sum()) - (ts.size if keep is None else max(int(keep), 0))
        if extra > 0:  # the least recent of those left
            left = np.flatnonzero(~gone)
            gone[left[np.argpartition(ts[left], extra - 1)[:extra]]] = True
        return [ids[k] for k in np.flatnonzero(gone).tolist()]

    def evict_users(self, user_ids: Iterable[str]) -> int:
        """Drop users from memory (rows and segment membership; their rows are reused), e.g. those of
        :meth:`stale_users`. Not an erasure: it frees memory, and a user who comes back starts fresh.
        Returns how many were held.

        >>> e = Engine(); e.learn_one({"user_id": "a", "type": "view", "ts": 1.0, "item_id": "i"})
        >>> e.evict_users(["a", "zed"]), e.known_user("a"), e.stats()["users"]
        (1, False, 0)
        """
        prof, seg = self.state.profiles, self.state.segmenter
        rows = sorted(r for r in map(prof.find, dict.fromkeys(user_ids)) if r is not None)
        for r in rows:
            seg.remove_member(r, prof.segment[r])
        prof.release(rows)
        return len(rows)

    def known_user(self, user_id: str) -> bool:
        """Whether the engine holds state for ``user_id``."""
        return self.state.profiles.find(user_id) is not None

    # ------------------------------------------------------------------ reading (never mutates)

    def recommend(self, user_id: str, n: int | None = None, *, exclude: Iterable[str] | None = None,
                  explain: bool = True, overrides: Mapping[str, float] | None = None) -> list[Recommendation]:
        """Top-``n`` items for ``user_id`` (``config.top_n`` when None), best first, each with a reason.

        Items the user purchased/rated/dismissed, items in ``exclude`` (a set is used as is) and
        unavailable items are never returned. An unknown user gets what is trending.
        ``explain=False`` skips building the reasons (they are then empty strings).
        ``overrides`` (an experiment variant's ranker settings, e.g. ``{"w_segment": 0.5}``) replace
        those config fields for this call only; keys outside
        :data:`infogap.models.experiments.RANKER_OVERRIDES` raise ``ValueError``. The derived settings are
        cached outside the engine's state (see :func:`infogap.models.ranker.settings_for`).
        """
        n = self.config.top_n if n is None else int(n)
        settings = settings_for(self, overrides) if overrides else self.ranker_settings
        return rank(self.state, settings, self.state.profiles.find(user_id), n, exclude, explain)

    def recommend_ids(self, user_id: str, n: int | None = None, *, exclude: Iterable[str] | None = None,
                      overrides: Mapping[str, float] | None = None) -> list[str]:
        """The item ids of :meth:`recommend` (with ``explain=False``), without building a Recommendation
        per item: what a caller that reads only the ids (the prequential evaluation) asks for.

        >>> e = Engine()
        >>> for item in ("a", "b", "c"):
        ...     e.learn_one({"user_id": "u", "item_id": item, "type": "view", "ts": 0.0})
        >>> e.recommend_ids("v", 2) == [r.item_id for r in e.recommend("v", 2)]
        True
        """
        n = self.config.top_n if n is None else int(n)
        settings = settings_for(self, overrides) if overrides else self.ranker_settings
        return rank(self.state, settings, self.state.profiles.find(user_id), n, exclude, False, ids=True)

    def similar(self, item_id: str, n: int = 10) -> list[Neighbour]:
        """Published neighbours of ``item_id`` (support >= ``min_support``), by cosine, best first."""
        r = self.state.catalog.find(item_id)
        if r is None or n <= 0:
            return []
        co = self.state.cooc
        nb, cos, support, conf, lift = co.published(r, self.config.min_support, self.state.catalog.available)
        decay = self.state.decay(co.lam)
        ids = self.state.catalog.item_id
        return [Neighbour(ids(b), c, s * decay, cf, lf) for b, c, s, cf, lf in
                zip(nb[:n].tolist(), cos[:n].tolist(), support[:n].tolist(), conf[:n].tolist(), lift[:n].tolist())]

    def title(self, item_id: str) -> str:
        """An item's display name: its catalog title, else its id (also for an item the catalog lacks).

        >>> e = Engine(); e.upsert_item({"item_id": "sku-7", "title": "Red shoes"})
        >>> e.title("sku-7"), e.title("sku-8")
        ('Red shoes', 'sku-8')
        """
        r = self.state.catalog.find(item_id)
        return item_id if r is None else self.state.catalog.title(r)

    def segment(self, user_id: str) -> int | None:
        """The user's segment id (stable over time), or None when unknown/unassigned."""
        r = self.state.profiles.find(user_id)
        if r is None:
            return None
        s = self.state.profiles.segment[r]
        return s if s >= 0 else None

    def trending(self, n: int = 10, segment: int | None = None) -> list[tuple[str, float]]:
        """``(item_id, decayed score)`` of the top trending available items, globally or in a segment."""
        t = self.state.trending
        decay = self.state.decay(t.lam)
        scores, avail = t.scores(segment), self.state.catalog.available
        return [(self.state.catalog.item_id(r), float(scores[r] * decay))
                for r in t.top_kept(n, segment, avail.__getitem__)] if n > 0 else []

    def profile(self, user_id: str) -> dict | None:
        """RFM figures, top categories/tags (shares of the categories), the topics of the user's reviews (shares of
        the topics, by topic number as a string, as in JSON) and segment of a user (None when unknown)."""
        prof = self.state.profiles
        r = prof.find(user_id)
        if r is None:
            return None
        out = prof.rfm(r, self.state.now, self.state.decay(prof.lam))
        name = self.state.catalog.feature_name
        named = [(name(f), s) for f, s in prof.mix(r).items()]
        cats = [(n, s) for n, s in named if topic_number(n) is None]
        topics = [(str(topic_number(n)), s) for n, s in named if topic_number(n) is not None]
        for key, pairs in (("categories", cats), ("topics", topics)):
            total = sum(s for _, s in pairs) or 1.0
            top = sorted(((n, round(s / total, 4)) for n, s in pairs), key=lambda kv: (-kv[1], kv[0]))[:5]
            out[key] = {n: s for n, s in top if s > 0}  # shares that round to 0: none
        out["events"] = prof.n_events[r]
        out["segment"] = self.segment(user_id)
        return out

    def item(self, item_id: str) -> dict | None:
        """The catalog's entry of an item (``item_id``, ``title``, ``category``, ``tags``, ``price``, ``available``),
        or None when the catalog does not hold it.

        >>> e = Engine(EngineConfig()); e.upsert_item({"item_id": "sku-1", "title": "Tea", "category": "Drinks"})
        >>> e.item("sku-1")["title"], e.item("nope")
        ('Tea', None)
        """
        cat = self.state.catalog
        r = cat.find(item_id)
        if r is None or not cat.in_catalog[r]:
            return None
        names = cat.feature_names(r)
        category = cat.category_name(r)
        price = float(cat.price[r])
        return {"item_id": item_id, "title": cat.title(r), "category": category,
                "tags": names[1:] if category is not None else names, "price": price if price == price else None,
                "available": bool(cat.available[r])}

    def recent_items(self, user_id: str, n: int = 10) -> list[dict]:
        """The user's ``n`` most recent item events, newest first: ``item_id``, ``title``, ``at`` (event time) and
        ``weight`` (of the event's type).

        >>> e = Engine(EngineConfig()); e.learn_one({"event_id": "1", "user_id": "u", "item_id": "a", "type": "view", "ts": 5.0})
        >>> [(x["item_id"], x["at"]) for x in e.recent_items("u")]
        [('a', 5.0)]
        """
        prof, cat = self.state.profiles, self.state.catalog
        r = prof.find(user_id)
        if r is None:
            return []
        items, ts, w = prof.history(r, n)
        return [{"item_id": cat.item_id(i), "title": cat.title(i), "at": float(t), "weight": round(float(x), 4)}
                for i, t, x in zip(items.tolist(), ts.tolist(), w.tolist()) if i >= 0]

    def segments(self) -> list[dict]:
        """Every seeded segment as this engine holds it: ``segment``, ``users`` (members known here), what
        characterises it (``categories``: the center's top category shares, by name; ``topics``: its review topic
        shares, by topic number as a string; ``frequency``, ``monetary`` and ``active``: its RFM coordinates, scaled to [0, 1]).

        >>> Engine(EngineConfig()).segments()
        []
        """
        seg, cat = self.state.segmenter, self.state.catalog
        names = {k: cat.feature_name(f) for f, k in seg._slot_of.items() if f < cat.n_features}
        sizes = seg.sizes()
        w = seg.rfm_weight or 1.0
        out = []
        for c, center in enumerate(seg.centers()):
            shares = sorted(((names[k], v) for k, v in center.items() if k in names and v > 0.01),
                            key=lambda kv: (-kv[1], kv[0]))
            topics = [(str(topic_number(n)), v) for n, v in shares if topic_number(n) is not None][:3]
            shares = [(n, v) for n, v in shares if topic_number(n) is None][:5]
            out.append({"segment": c, "users": sizes[c], "categories": {k: round(v, 3) for k, v in shares},
                        "topics": {k: round(v, 3) for k, v in topics},
                        **{k: round(center.get(k, 0.0) / w, 3) for k in ("frequency", "monetary", "active")}})
        return out

    def stats(self) -> dict[str, int]:
        """Sizes of the state, for memory monitoring (``user_rows``: user rows allocated, in use or free)."""
        prof, co = self.state.profiles, self.state.cooc
        return {"users": len(prof), "user_rows": prof.n_rows, "items": len(self.state.catalog), "cooc_slots": co.n_slots,
                "cooc_slot_capacity": int(co.nb.size), "history_capacity": int(prof.hist_item.size),
                "consumed": int(prof.n_consumed), "segments": self.config.n_segments,
                "events_learned": self.n_learned}

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict:
        """A self-contained copy of the whole state (picklable), for snapshots."""
        return {"version": STATE_VERSION, "config": self.config, "state": copy.deepcopy(self.__dict__)}

    @classmethod
    def from_state(cls, state: Mapping) -> Engine:
        """Rebuild an engine from :meth:`to_state` output."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported engine state version {state.get('version')!r}; expected {STATE_VERSION}")
        engine = cls.__new__(cls)
        engine.__dict__.update(copy.deepcopy(dict(state["state"])))
        return engine


def warm_up() -> None:
    """Compile (or load from numba's cache) every compiled kernel now, with the types real use passes:
    a worker calls it before its first batch, the evaluation before it measures memory.

    >>> warm_up()
    """
    engine = Engine(EngineConfig(n_neighbours=4, door_bits=0, min_users=2))  # (3 users: the floor's paths too)
    events = [{"event_id": f"w{k}", "user_id": f"u{k % 3}", "type": "view", "ts": 1.0 + k, "item_id": f"i{k % 5}"}
              for k in range(40)]
    engine.learn_many(events[:30])
    for e in events[30:]:
        engine.learn_one(e)
    engine.recommend("u0", 3, exclude={"i1"})
    engine.recommend("u1", 3, explain=False)
    engine.similar("i1", 3)
    # the split stages: a user stage's records, an item stage's shard, its rows loaded by a user stage
    users = Engine(EngineConfig(n_neighbours=4, door_bits=0, min_users=2), cooc="remote")
    users.learn_many(events)
    shard = CoOccurrenceShard.for_engine(users.config)
    shard.apply(PairDeltas.from_bytes(users.drain_pair_deltas().to_bytes()), source=0)
    shard.similar("i1", 3)
    users.load_rows([shard.export_row(i) for i in shard.owned()])
    users.recommend("u0", 3)
    index = SlotTable(capacity=1)  # a learner's index growing
    index.insert_many(np.arange(40), np.arange(40))
    index.delete_many(np.arange(2))
