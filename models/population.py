"""What many users feed and no user owns, learned once for the whole stream: segment centers and trending.

Users are partitioned across user stages, but a segment id must mean the same group of people on
every worker (``ig:segment:{user}``, segment trending, push targeting), and trending must count
every user's events. So each user stage (an :class:`~infogap.models.engine.Engine` with
``population="remote"``) hands what it learns from to one :class:`PopulationLearner`:

- a **segment sample** at each scheduled segment update: the user's category mix by name and
  decayed RFM figures. The learner runs River's KMeans on them (:class:`~infogap.models.segments.Segmenter`).
- a **trend entry** per positive item event: item id, the user's segment, the type weight and time, and the
  user's bit (:func:`infogap.models.privacy.user_bit`): a trending entry is published only once
  ``min_users`` distinct users stand behind it (the privacy floor).

The learner's model (centers and category slots by name) and trending lists go back to the user
stages (:meth:`infogap.models.engine.Engine.load_population`), which then assign segments with those
centers without learning. Entries carry a sequence number per source (the stream: the ``events``
offset per partition), and the learner skips what it has applied, so a replay after a crash counts
nothing twice. Item ids and category names cross the boundary, never engine-local rows.

>>> from infogap.models import Engine, EngineConfig
>>> cfg = EngineConfig(n_segments=2, min_users=1)
>>> user_stage, learner = Engine(cfg, population="remote"), PopulationLearner(cfg)
>>> user_stage.learn_one({"event_id": "e1", "user_id": "ann", "type": "purchase", "ts": 1000.0, "item_id": "tea"})
>>> learner.learn(user_stage.drain_population(), source=0)
2
>>> learner.learn({"seg": [], "trend": [[0, "tea", -1, 8.0, 1000.0]]}, source=0)  # a replay: skipped
0
>>> learner.trending(1), learner.model()["n_seeded"]
([('tea', 8.0)], 1)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np

from infogap.models.catalog import MAX_ID_CHARS, Catalog
from infogap.models.catalog import MAX_TEXT_CHARS as MAX_CATEGORY_CHARS
from infogap.models.cooc_shard import MAX_SEQ, MAX_TS, MAX_WEIGHT, MIN_TS, plausible_clock, plausible_seqs
from infogap.models.events import Limits
from infogap.models.model_state import RENORM_EXPONENT
from infogap.models.privacy import NO_USER, mask_of
from infogap.models.segments import Segmenter
from infogap.models.sentiment import SentimentModel
from infogap.models.topics import TopicModel, topic_words
from infogap.models.state_fields import StateError, check, encode_float
from infogap.models.trending import Trending



#: The longest review text a sample may carry (the event contract's bound).
MAX_TEXT_CHARS = Limits().max_text_chars
#: The most categories a segment sample may name: a user's mix holds at most
#: :class:`~infogap.models.profile.Profiles`' ``max_features`` (32).
MAX_SAMPLE_CATEGORIES = 256
#: The largest feature a segment center may hold: features are shares and RFM figures scaled to [0, 1], times
#: weights below 1 (and NaN is no number within it).
MAX_CENTER = 1e3
#: The largest frequency, monetary or gap figure a sample may carry (the segmenter saturates far below: bounded so
#: that no figure is infinite in a sum).
MAX_FIGURE = 1e15


def segmenter_for(cfg) -> Segmenter:
    """The segmenter an engine config asks for (the engines and the learner build the same one)."""
    return Segmenter(n_segments=cfg.n_segments, n_category_slots=cfg.segment_categories, step=cfg.segment_step,
                     margin=cfg.segment_margin, seed=cfg.seed)


def trending_for(cfg) -> Trending:
    return Trending(n_segments=cfg.n_segments, half_life_days=cfg.trending_half_life_days,
                    momentum_half_life_days=cfg.momentum_half_life_days, min_users=getattr(cfg, "min_users", 1))


def _number(x, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi


def _seq(x) -> bool:
    return type(x) is int and 0 <= x < MAX_SEQ


def _sample_error(e) -> str | None:
    if not (isinstance(e, list) and len(e) == 5 and _seq(e[0]) and isinstance(e[1], dict)):
        return "is not [seq, {category: share}, frequency, monetary, gap_days or null]"
    if len(e[1]) > MAX_SAMPLE_CATEGORIES:
        return f"has {len(e[1])} categories, over {MAX_SAMPLE_CATEGORIES}"
    if not all(isinstance(n, str) and len(n) <= MAX_CATEGORY_CHARS and _number(v, 0.0, 1.0)
               for n, v in e[1].items()):
        return f"has a category name over {MAX_CATEGORY_CHARS} characters or a share outside [0, 1]"
    if not (_number(e[2], -MAX_FIGURE, MAX_FIGURE) and _number(e[3], -MAX_FIGURE, MAX_FIGURE)
            and (e[4] is None or _number(e[4], -MAX_FIGURE, MAX_FIGURE))):
        return f"has a frequency, monetary or gap_days figure that is not a number within {MAX_FIGURE:g}"
    return None


def _trend_error(e, latest_ts: float = MAX_TS) -> str | None:
    # (the user bit, 6th, since the privacy floor: an entry without adds no user)
    if not (isinstance(e, list) and len(e) in (5, 6) and _seq(e[0]) and isinstance(e[1], str)
            and type(e[2]) is int and (len(e) == 5 or (type(e[5]) is int and 0 <= e[5] < 64))):
        return "is not [seq, item_id, segment, weight, ts, user bit]"
    if not 0 < len(e[1]) <= MAX_ID_CHARS:
        return f"has an item id empty or over {MAX_ID_CHARS} characters"
    if not (_number(e[3], 0.0, MAX_WEIGHT) and e[3] > 0):
        return f"has a weight outside (0, {MAX_WEIGHT:g}]"
    if not _number(e[4], MIN_TS, latest_ts):
        return f"has a time outside [{MIN_TS:.0f}, {latest_ts:.0f}] (epoch seconds)"
    return None


def _review_error(e) -> str | None:
    if not (isinstance(e, list) and len(e) == 3 and _seq(e[0]) and isinstance(e[1], str)
            and 0 < len(e[1]) <= MAX_TEXT_CHARS and (e[2] is None or type(e[2]) is bool)):
        return f"is not [seq, text of at most {MAX_TEXT_CHARS} characters, liked or null]"
    return None


def check_batch(batch, latest_ts: float = MAX_TS) -> tuple[list, list, list, dict]:
    """The batch's good segment samples, trend entries and labelled reviews, and the bad ones (``{"seg": [...],
    "trend": [...], "review": [...], "reason": the first one's}``, empty when none): a record carries many users'
    entries, one bad entry costs only itself. ``ValueError`` when the batch itself is not an object of lists.
    ``latest_ts``: the latest event time accepted.

    >>> check_batch({"seg": [], "trend": [], "review": [[7, "很好", True]]})
    ([], [], [[7, '很好', True]], {})
    >>> _, _, reviews, bad = check_batch({"review": [[7, "", True], [8, "ok", None]]})
    >>> reviews, bad["review"]
    ([[8, 'ok', None]], [[7, '', True]])
    >>> bad["reason"]
    "review 0 is not [seq, text of at most 2000 characters, liked or null]: [7, '', True]"
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"population batch must be an object, not {type(batch).__name__}")
    fields = {"seg": batch.get("seg", []), "trend": batch.get("trend", []), "review": batch.get("review", [])}
    if not all(isinstance(v, list) for v in fields.values()):
        raise ValueError("population batch fields 'seg', 'trend' and 'review' must be lists")
    checks = {"seg": ("segment sample", _sample_error), "review": ("review", _review_error),
              "trend": ("trend entry", partial(_trend_error, latest_ts=min(latest_ts, MAX_TS)))}
    good, bad = {}, {}
    for field, entries in fields.items():
        name, error_of = checks[field]
        good[field] = []
        for k, e in enumerate(entries):
            why = error_of(e)
            if why is None:
                good[field].append(e)
            else:
                bad.setdefault(field, []).append(e)
                bad.setdefault("reason", f"{name} {k} {why}: {str(e)[:80]}")
    return good["seg"], good["trend"], good["review"], bad


class PopulationLearner:
    """Segment centers (River KMeans) and decayed trending, learned from every user stage's entries.

    Parameters
    ----------
    config
        The user stages' :class:`~infogap.models.engine.EngineConfig` (segments, trending half-life).

    Examples
    --------
    >>> from infogap.models import EngineConfig
    >>> p = PopulationLearner(EngineConfig(n_segments=2, min_users=1))
    >>> p.learn({"seg": [[0, {"Tea": 1.0}, 1.0, 0.0, None]], "trend": [[0, "sencha", 0, 2.0, 50.0]]}, source=3)
    2
    >>> p.trending(5, segment=0), p.model()["slots"], p.hwm
    ([('sencha', 2.0)], {'Tea': 'c0'}, {3: 0})
    """

    def __init__(self, config, sentiment: SentimentModel | None = None):
        self.config = config
        #: learn from every user stage's reviews (the sentiment from those with a telling rating), and are
        #: published whole (``to_state``); reviews are read with the sentiment model's tokenizer
        self.sentiment = sentiment if sentiment is not None else SentimentModel()
        self.topics = TopicModel(n_topics=config.n_topics, seed=config.seed)
        self.segmenter = segmenter_for(config)
        self.trend = trending_for(config)
        self._names = Catalog()  # item ids -> rows, category names -> feature ids (nothing else)
        self._t0: float | None = None
        self.now = -math.inf
        #: highest sequence number applied, per source
        self.hwm: dict[int, int] = {}
        #: entries applied so far (a version for readers)
        self.applied = 0
        #: entries :meth:`learn` refused (not in snapshots)
        self.refused = 0

    def __setstate__(self, state: dict) -> None:
        """Unpickle (``infogap state migrate``), also a learner pickled before reviews: new review models."""
        self.__dict__.update(state)
        self.__dict__.setdefault("refused", 0)
        if "sentiment" not in state:
            self.sentiment = SentimentModel()
        if "topics" not in state:
            self.topics = TopicModel(n_topics=self.config.n_topics, seed=self.config.seed)

    def learn(self, batch: Mapping, source: int) -> int:
        """Apply a user stage's entries (:meth:`infogap.models.engine.Engine.drain_population`, sequence numbers
        increasing per source); entries at or below the source's high-water mark are skipped, bad ones
        (:func:`check_batch`) are counted in :attr:`refused` and change nothing. Returns how many were applied."""
        samples, trends, reviews, bad = check_batch(batch)
        self.refused += sum(len(v) for k, v in bad.items() if k != "reason")
        return self.learn_checked(samples, trends, reviews, source)

    def learn_checked(self, samples: list, trends: list, reviews: list, source: int) -> int:
        """:meth:`learn` of the entries :func:`check_batch` returned (for a caller that checked them already)."""
        hw = self.hwm.get(source, -1)
        top = hw
        done = 0
        seg, feature = self.segmenter, self._names.feature
        for seq, mix, frequency, monetary, gap_days in samples:
            if seq <= hw:
                continue
            x = seg.features({feature(name): share for name, share in mix.items()}, frequency, monetary,
                             math.inf if gap_days is None else gap_days)
            seg.assign(x, -1)
            top = max(top, seq)
            done += 1
        fresh = [e for e in trends if e[0] > hw]
        if fresh:
            self._add_trend(fresh)
            top = max(top, max(e[0] for e in fresh))
            done += len(fresh)
        for seq, text, liked in reviews:
            if seq > hw:
                tokens = self.sentiment.tokenize(text)  # (once, for both models)
                if liked is not None:
                    self.sentiment.learn_one(text, liked, tokens)
                self.topics.learn_one(topic_words(tokens))
                top = max(top, seq)
                done += 1
        if done:
            self.hwm[source] = top
            self.applied += done
        return done

    def _add_trend(self, entries: list) -> None:
        tr, row = self.trend, self._names.row
        lam, lam_m = tr.lam, tr.lam_m
        lam_max = max(lam, lam_m)
        items, segs, x, xm, bits = [], [], [], [], []
        for entry in entries:
            _, item_id, segment, w, ts = entry[:5]
            if self._t0 is None:
                self._t0 = ts
            elif lam_max * (ts - self._t0) > RENORM_EXPONENT:
                self._flush(items, segs, x, xm, bits)
                items, segs, x, xm, bits = [], [], [], [], []
                tr.rescale(math.exp(-lam * (ts - self._t0)), math.exp(-lam_m * (ts - self._t0)))
                self._t0 = ts
            if ts > self.now:
                self.now = ts
            items.append(row(item_id))
            segs.append(segment if 0 <= segment < tr.n_segments else -1)
            x.append(w * math.exp(lam * (ts - self._t0)))
            xm.append(w * math.exp(lam_m * (ts - self._t0)))
            bits.append(entry[5] if len(entry) == 6 else NO_USER)
        self._flush(items, segs, x, xm, bits)

    def _flush(self, items, segs, x, xm, bits) -> None:
        if items:
            self.trend.ensure(len(self._names))
            self.trend.add(items, segs, x, xm, mask_of(bits))

    def to_state(self) -> dict:
        """The learner as a plain tree for a snapshot (:mod:`infogap.models.state_fields`): the segment centers by
        category name, trending's scores, and the item ids and category names in their numbering."""
        names = self._names
        return {"model": self.segmenter.export_model(names.feature_name), "trend": self.trend.to_state(),
                "items": [names.item_id(r) for r in range(len(names))],
                "features": [names.feature_name(f) for f in range(names.n_features)],
                "t0": None if self._t0 is None else encode_float(self._t0), "now": encode_float(self.now),
                "hwm": [[s, n] for s, n in self.hwm.items()], "applied": self.applied,
                "sentiment": self.sentiment.to_state(), "topics": self.topics.to_state()}

    @classmethod
    def from_state(cls, config, state, arrays=(), where: str = "population learner",
                   sentiment: SentimentModel | None = None) -> PopulationLearner:
        """A learner of ``config`` that goes on from :meth:`to_state` (it learns on from the centers, and the
        sentiment model from its counts, read with the tokenizer and lexicon of ``sentiment`` when given).

        >>> from infogap.models import EngineConfig
        >>> p = PopulationLearner(EngineConfig(n_segments=2, min_users=1))
        >>> _ = p.learn({"seg": [[0, {"Tea": 1.0}, 1.0, 0.0, None]], "trend": [[0, "sencha", 0, 2.0, 50.0]]}, 3)
        >>> q = PopulationLearner.from_state(EngineConfig(n_segments=2, min_users=1), p.to_state())
        >>> q.trending(5, segment=0), q.model() == p.model(), q.hwm
        ([('sencha', 2.0)], True, {3: 0})
        """
        f = check(state, {"model": dict, "trend": dict, "items": list, "features": list, "t0": (float, type(None)),
                          "now": float, "hwm": list, "applied": int}, where, arrays)
        out = cls(config, sentiment)
        if state.get("sentiment") is not None:  # (a snapshot from before reviews has none: a new model)
            try:
                out.sentiment = SentimentModel.from_state(state["sentiment"], out.sentiment.tokenize,
                                                          lexicon=out.sentiment.lexicon)
            except ValueError as exc:
                raise StateError(f"{where}: sentiment: {exc}") from None
        if state.get("topics") is not None:
            try:
                out.topics = TopicModel.from_state(state["topics"])
            except ValueError as exc:
                raise StateError(f"{where}: topics: {exc}") from None
        if not all(type(x) is str for x in f["items"] + f["features"]):
            raise StateError(f"{where}: item ids and category names must be strings")
        if len(set(f["items"])) != len(f["items"]) or len(set(f["features"])) != len(f["features"]):
            raise StateError(f"{where}: item ids and category names must be distinct")
        if not plausible_seqs(f["hwm"]):
            raise StateError(f"{where}: 'hwm' must be [source, sequence number below 2**53] pairs")
        if not plausible_clock(f["t0"], f["now"]):
            raise StateError(f"{where}: 't0' and 'now' must be event times (epoch seconds up to {MAX_TS:g})")
        for item_id in f["items"]:
            out._names.row(item_id)
        for name in f["features"]:
            out._names.feature(name)
        out.trend.restore_state(f["trend"], arrays, f"{where}: trend")
        if out.trend.n_items > len(f["items"]):
            raise StateError(f"{where}: trending has scores for {out.trend.n_items} items, {len(f['items'])} named")
        m, seg = f["model"], out.segmenter
        n_seeded, centers, slots = m.get("n_seeded"), m.get("centers"), m.get("slots")
        if not (type(n_seeded) is int and 0 <= n_seeded <= seg.n_segments and isinstance(centers, list)
                and len(centers) == n_seeded and isinstance(slots, dict)
                and all(isinstance(c, list) and len(c) == len(seg.keys)
                        and all(type(v) in (int, float) and abs(v) <= MAX_CENTER for v in c) for c in centers)
                and all(type(k) is str and k in seg.keys for k in slots.values())):
            raise StateError(f"{where}: the segment model does not fit {seg.n_segments} segments of "
                             f"{len(seg.keys)} features")
        seg.load_model({"n_seeded": n_seeded, "centers": centers, "slots": slots}, out._names.feature, learning=True)
        out._t0, out.now, out.applied = f["t0"], f["now"], f["applied"]
        out.hwm = {s: n for s, n in f["hwm"]}
        return out

    # ------------------------------------------------------------------ reading
    def model(self) -> dict:
        """Segment centers and category slots by name, for :meth:`infogap.models.engine.Engine.load_population`."""
        return {**self.segmenter.export_model(self._names.feature_name), "applied": self.applied}

    def momentum(self) -> tuple[list[str], list[float]]:
        """Every item's slow-decayed popularity (the ranker's "momentum" numerator) at the newest
        entry's time: ``(item ids, values)``."""
        tr = self.trend
        if self._t0 is None:
            return [], []
        rows = np.flatnonzero(tr.momentum_[: len(self._names)] > 0)
        decay = math.exp(-tr.lam_m * (self.now - self._t0))
        return [self._names.item_id(r) for r in rows.tolist()], (tr.momentum_[rows] * decay).tolist()

    def trending(self, n: int = 10, segment: int | None = None,
                 eligible: Callable[[str], bool] | None = None) -> list[tuple[str, float]]:
        """``(item_id, score decayed to the newest entry's time)``, best first, globally or in a segment."""
        tr = self.trend
        if self._t0 is None or n <= 0:
            return []
        decay = math.exp(-tr.lam * (self.now - self._t0))
        ids, scores = self._names.item_id, tr.scores(segment)
        keep = (lambda r: True) if eligible is None else (lambda r: eligible(ids(r)))
        return [(ids(r), float(scores[r] * decay)) for r in tr.top_kept(n, segment, keep)]
