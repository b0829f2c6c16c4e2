"""The item stage's logic, without Kafka or Redis: ``cooc`` records in; neighbour rows, ``similar`` lists,
trending and the population model out, as one write for the store.

Each owned ``cooc`` partition is one :class:`~infogap.models.cooc_shard.CoOccurrenceShard`; the owner of partition
:data:`~infogap.models.cooc_shard.POPULATION_PARTITION` also runs the population learner. The shell
(:mod:`infogap.stream.item_stage`) consumes, paces the publishes and checkpoints; this module decides what each
record changes and what a publish writes.

>>> from infogap.models import Engine, EngineConfig
>>> from infogap.stream.settings import Settings
>>> shards = ItemShards(Settings(), EngineConfig())
>>> shards.take(1)
>>> users = Engine(EngineConfig(), cooc="remote")  # a user stage's engine: "a" and "b" seen together
>>> users.learn_many([{"user_id": "u", "item_id": i, "type": "purchase", "ts": float(t)} for t, i in enumerate("ab")])
>>> from infogap.stream.core.user_stage import Record
>>> shards.apply(1, [Record("cooc", 1, 0, None, users.drain_pair_deltas().to_bytes(), headers=(("source", b"0"),))])
[]
>>> pub = shards.publication()
>>> while pub.encode(250): pass
>>> write = pub.write()  # the rows of a and b, and a new token for partition 1
>>> sorted(write["rows"]), list(write["rows_published"])
(['a', 'b'], [1])
"""
from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable

import numpy as np
import orjson

from infogap.models import EngineConfig
from infogap.models.cooc_shard import POPULATION_KIND, POPULATION_PARTITION, CoOccurrenceShard, PairDeltas
from infogap.models.population import PopulationLearner, check_batch
from infogap.models.privacy import PrivacyLedger
from infogap.models.state_fields import StateError
from infogap.stream.core.ingest import DeadLetter
from infogap.stream.core.neighbour_rows import encode_row
from infogap.stream.privacy import PublishNoise
from infogap.stream.settings import Settings
from infogap.stream.text import sentiment_model


class Publication:
    """One publish: the rows changed since the last one, encoded a chunk at a time (:meth:`encode`, so that the
    shell can yield between chunks), then :meth:`write`, the keyword arguments of
    :meth:`~infogap.stream.store.Store.write`."""

    def __init__(self, shards: ItemShards, dirty: dict[int, set[str]], population: dict | None,
                 models: dict[str, bytes] | None = None):
        self._shards = shards
        self._todo = [(p, item) for p, items in dirty.items() if p in shards.shards for item in items]
        self._done = 0  # rows of _todo encoded (a backlog makes every row dirty: no copy of the rest per chunk)
        #: a new token per partition with changed rows: user stages re-read its rows (infogap.stream.neighbour_cache)
        self.tokens = {p: secrets.token_hex(8) for p, items in dirty.items() if items and p in shards.shards}
        self.similar: dict[str, list] = {}
        self.rows: dict[str, bytes] = {}
        self.population = population  # trending, model and momentum, when the learner has news
        self.models = models  # the learner's models published whole (sentiment, topics), when due
        self._noised: set[int] = set()  # partitions whose similar lists got noise (their ledgers spend at write)

    def encode(self, n: int) -> bool:
        """Encode up to ``n`` more rows; returns whether rows remain."""
        s = self._shards
        k, min_support, noise = s.settings.similar_n, s.config.min_support, s.noise
        start, self._done = self._done, min(self._done + n, len(self._todo))
        for p, item in self._todo[start:self._done]:
            shard = s.shards[p]
            similar = [nb._asdict() for nb in shard.similar(item, k, min_support, s.eligible)]
            if noise is not None:  # (Laplace noise on the support: docs/privacy.md)
                similar = noise.similar(similar)
                self._noised.add(p)
            self.similar[item] = similar
            self.rows[item] = encode_row(shard.export_row(item), s.numbering[p])
        return self._done < len(self._todo)

    def __bool__(self) -> bool:
        return bool(self.rows or self.population or self.models)

    def write(self) -> dict:
        """What to write; with noise on, each partition whose counts got noise enters this publish's epsilon in its
        ledger (``privacy``, written with them)."""
        s, spent = self._shards, set()
        if s.noise is not None:
            for p in self._noised:
                if p in s.ledgers:
                    s.noise.spend(s.ledgers[p], "similar")
                    spent.add(p)
            if self.population is not None and POPULATION_PARTITION in s.ledgers:
                s.noise.spend(s.ledgers[POPULATION_PARTITION], "trending")
                spent.add(POPULATION_PARTITION)
            self._noised = set()
        privacy = {p: orjson.dumps(s.ledgers[p].to_state()) for p in spent}
        return {"similar": self.similar, "rows": self.rows, "rows_published": self.tokens, **(self.population or {}),
                **({"models": self.models} if self.models else {}), **({"privacy": privacy} if privacy else {})}


class ItemShards:
    """The shards of the owned ``cooc`` partitions, the population learner (with partition 0), and what changed
    since the last publish. ``eligible`` says which items may be published as neighbours (the catalog's)."""

    def __init__(self, settings: Settings, config: EngineConfig, eligible: Callable[[str], bool] | None = None):
        self.settings = settings
        self.config = config
        self.eligible = eligible
        self.shards: dict[int, CoOccurrenceShard] = {}
        #: per partition, a random number naming its shard object's numbering of items (rows published
        #: with it are translated by readers, :meth:`infogap.models.catalog.Catalog.translated`); new per object
        self.numbering: dict[int, int] = {}
        #: the population learner, while this stage owns POPULATION_PARTITION
        self.population: PopulationLearner | None = None
        self._population_published = -1
        #: per review model, the reviews it had learned when it was last published; and when (monotonic seconds)
        self._review_models_published: tuple[dict[str, int], float] = ({}, -math.inf)
        self.dirty: dict[int, set[str]] = {}
        #: after a store data loss, per partition the owned items still to publish again (:meth:`rematerialise`)
        self.refill: dict[int, list[str]] = {}
        #: the population's keys are to be counted as written again
        self.population_lost = False
        #: partitions whose snapshot could not be read: held by no shard, never published again
        self.stopped: set[int] = set()
        self.applied = 0
        self.dead: list[DeadLetter] = []
        #: the wall clock (epoch seconds) that bounds the event times of records
        self.clock: Callable[[], float] = time.time
        #: end offset of each events partition as last read (a bound on cooc records' sequence numbers); None:
        #: not checked (tests that apply records by hand)
        self.events_ends: dict[int, int] | None = None
        #: Laplace noise on what is published (INFOGAP_PRIVACY_EPSILON), None: off; the shell may replace it (a clock)
        self.noise = (PublishNoise(settings.privacy_epsilon, settings.privacy_sensitivity)
                      if getattr(settings, "privacy_epsilon", None) else None)
        #: per owned partition, the epsilon its publishes spent per day (in its snapshot; ig:privacy:{partition})
        self.ledgers: dict[int, PrivacyLedger] = {}

    # ------------------------------------------------------------------ partitions
    def take(self, p: int) -> None:
        """Own partition ``p`` with a new shard (and learner): a partition without a snapshot."""
        self._own(p, CoOccurrenceShard.for_engine(self.config), PopulationLearner(self.config, sentiment_model()))

    def restore(self, p: int, state, arrays=(), where: str = "") -> None:
        """Own partition ``p`` with its shard (and learner) from a snapshot's ``state``. Raises
        :class:`~infogap.models.state_fields.StateError` when the snapshot does not fit the schemas (a
        snapshot without a state too)."""
        tree = state if isinstance(state, dict) else {}
        shard = CoOccurrenceShard.from_state(tree.get("shard"), arrays, f"{where}: shard")
        shard.set_floor(self.config.min_users, self.config.floor_votes)  # (configured now; a snapshot from before the floor: conservative)
        ledger = (PrivacyLedger.from_state(tree["privacy"], f"{where}: privacy") if tree.get("privacy") is not None
                  else PrivacyLedger())  # (a snapshot from before the ledger: nothing spent)
        pop = tree.get("population")
        if p == POPULATION_PARTITION:
            pop = (PopulationLearner(self.config, sentiment_model()) if pop is None else
                   PopulationLearner.from_state(self.config, pop, arrays, f"{where}: population", sentiment_model()))
        elif pop is not None:
            raise StateError(f"{where}: a population learner on partition {p}, not {POPULATION_PARTITION}")
        self._own(p, shard, pop, ledger)

    def _own(self, p: int, shard: CoOccurrenceShard, pop: PopulationLearner | None,
             ledger: PrivacyLedger | None = None) -> None:
        self.shards[p] = shard
        self.ledgers[p] = ledger if ledger is not None else PrivacyLedger()
        self.numbering[p] = secrets.randbits(63)
        if p == POPULATION_PARTITION:
            self.population = pop
            self._population_published = -1
            self._review_models_published = ({}, -math.inf)

    def release(self, p: int) -> None:
        self.shards.pop(p, None)
        self.numbering.pop(p, None)
        self.dirty.pop(p, None)
        self.refill.pop(p, None)
        self.ledgers.pop(p, None)
        self.stopped.discard(p)
        if p == POPULATION_PARTITION:
            self.population = None

    def state(self, p: int) -> dict:
        """What partition ``p``'s snapshot holds, as a plain tree: its shard, and the learner for partition 0."""
        pop = self.population if p == POPULATION_PARTITION else None
        return {"shard": self.shards[p].to_state(), "population": None if pop is None else pop.to_state(),
                "privacy": self.ledgers[p].to_state()}

    # ------------------------------------------------------------------ records
    def _latest_ts(self) -> float:
        """The latest event time a record may carry: a user stage accepts events up to ``max_future_s`` ahead of
        its clock, which may be ``max_clock_skew_s`` ahead of this one."""
        return self.clock() + self.settings.max_future_s + self.settings.max_clock_skew_s

    def _past_events(self, source: int, top: int) -> bool:
        """Whether sequence number ``top`` from ``source`` is past the end of that ``events`` partition as last
        read."""
        ends = self.events_ends
        if ends is None:
            return False
        if ends and not 0 <= source < len(ends):
            raise ValueError(f"source {source} is not a partition of events")
        return top >= ends.get(source, 0)

    def apply(self, partition: int, records, final: bool = True) -> list:
        """Apply ``cooc`` records of ``partition`` in order; a record that cannot be applied goes to ``dead``.

        A record's sequence numbers are its events' offsets in the ``events`` partition it names: one past
        the end of that partition is not a user stage's (applied, it would make the shard skip that source's
        real updates for good). Not ``final``: such a record and those after it are returned, to be applied
        once the end offsets are read again; ``final``: it is a dead letter."""
        shard = self.shards.get(partition)
        if shard is None:  # records fetched before a revoke reached us; the new owner applies them
            return []
        dirty = self.dirty.setdefault(partition, set())
        latest_ts = self._latest_ts()  # (once: the records of one call come within milliseconds)
        for k, rec in enumerate(records):
            try:
                headers = dict(rec.headers or ())
                source = int(headers["source"])
                if headers.get("kind") == POPULATION_KIND:
                    if partition != POPULATION_PARTITION or self.population is None:
                        raise ValueError(f"population entries on cooc partition {partition}, "
                                         f"not {POPULATION_PARTITION}")
                    samples, trends, reviews, bad = check_batch(orjson.loads(rec.value), latest_ts)
                    if bad and not (samples or trends or reviews):
                        raise ValueError(bad["reason"])
                    top = max((e[0] for e in samples + trends + reviews), default=-1)
                    if self._past_events(source, top):
                        if not final:
                            return records[k:]
                        raise ValueError(f"sequence number {top} is past the end of events partition {source}")
                    if bad:  # only the bad entries go to the DLQ: the other users' are learned
                        reason = f"bad cooc record: some population entries refused, first: {bad.pop('reason')}"[:300]
                        self.dead.append(DeadLetter(json.dumps(bad).encode(), rec.key, reason, rec.topic,
                                                    rec.partition, rec.offset))  # (json: ints may pass 64 bits)
                    self.population.learn_checked(samples, trends, reviews, source)
                    continue
                deltas = PairDeltas.from_bytes(rec.value, latest_ts)
                top = max(int(deltas.seq.max(initial=-1)), int(deltas.occ_seq.max(initial=-1)))
                if self._past_events(source, top):
                    if not final:
                        return records[k:]
                    raise ValueError(f"sequence number {top} is past the end of events partition {source}")
                shard.apply(deltas, source)
            except Exception as exc:  # not written by a user stage: kept in the DLQ, never fatal
                self.dead.append(DeadLetter(rec.value, rec.key, f"bad cooc record: {type(exc).__name__}: {exc}"[:300],
                                            rec.topic, rec.partition, rec.offset))
                continue
            items = deltas.items
            dirty.update(map(items.__getitem__, np.unique(deltas.row).tolist()))
            self.applied += len(deltas)
        return []

    # ------------------------------------------------------------------ publishing
    def publication(self, now: float | None = None) -> Publication:
        """What changed since the last publication (and is now taken as published): the changed rows, the
        population's trending sets, model and momentum if the learner applied anything since, and its sentiment
        and topic models if they learned since and ``review_models_publish_s`` passed since their last publication
        (``now``: a monotonic clock in seconds; the default publishes them whenever they learned)."""
        pop, population, models = self.population, None, None
        published, at = self._review_models_published
        if pop is not None and (now is None or now - at >= self.settings.review_models_publish_s):
            learned = {name: model for name, model in (("sentiment", pop.sentiment), ("topics", pop.topics))
                       if model.n_learned and model.n_learned != published.get(name)}
            if learned:  # (only the models that learned: a review without a telling rating teaches topics only)
                models = {name: orjson.dumps(model.to_state()) for name, model in learned.items()}
                self._review_models_published = ({**published, **{name: m.n_learned for name, m in learned.items()}},
                                                  -math.inf if now is None else now)
        if pop is not None and pop.applied > 0 and pop.applied != self._population_published:
            k, noise = self.settings.trending_n, self.noise
            trending = {seg: pop.trending(k if noise is None else 2 * k, seg, self.eligible)
                        for seg in (None, *range(self.config.n_segments))}
            if noise is not None:  # noisy scores, the top k of twice as many by them (docs/privacy.md)
                trending = {seg: noise.trending(lst)[:k] for seg, lst in trending.items()}
            population = {"trending": trending, "population": {**pop.model(), "at": pop.now},
                          "momentum": pop.momentum()}
            self._population_published = pop.applied
        dirty, self.dirty = self.dirty, {}
        return Publication(self, dirty, population, models)

    def rematerialise(self) -> int:
        """The store lost its data: every owned row's ``similar`` and ``nbrow`` and the population's keys are to
        be written again (:meth:`take_refill` moves them into publications a chunk at a time). Returns how many
        rows."""
        self.refill = {p: shard.owned() for p, shard in self.shards.items() if p not in self.stopped}
        self._population_published = -1  # the next publication holds the population's keys, changed or not
        self._review_models_published = ({}, -math.inf)
        self.population_lost = True
        return self.pending_refill()

    def pending_refill(self) -> int:
        return sum(map(len, self.refill.values()))

    def take_refill(self, budget: int) -> int:
        """Move up to ``budget`` rows still to write again into the changed rows; returns how many."""
        taken = 0
        for p in list(self.refill):
            items = self.refill.pop(p)
            if p not in self.shards:  # revoked meanwhile: its new owner holds the rows
                continue
            take, rest = items[:budget], items[budget:]
            self.dirty.setdefault(p, set()).update(take)
            budget -= len(take)
            taken += len(take)
            if rest:
                self.refill[p] = rest
            if budget <= 0:
                break
        return taken
