"""The store: everything infogap keeps outside its workers, behind one interface.

The store is the shared read model, never the only copy of state: everything in it can be rebuilt
from the workers' state (:meth:`Store.generation` tells when it was lost). Three implementations share
this interface and one test suite (``tests/test_store_contract.py``): :class:`~infogap.stream.store.memory.MemoryStore`
(tests and the pure pipeline), :class:`~infogap.stream.store.redis_node.RedisStore` (one Redis) and
:class:`~infogap.stream.store.redis_cluster.RedisClusterStore` (Redis Cluster); :func:`infogap.stream.store.open_store`
picks one from ``INFOGAP_REDIS_URL``.

What is kept (key names in :class:`~infogap.stream.store.keys.RedisKeys`, formats in docs/contracts.md):

- per user, written by the user stage: recommendations (a JSON document, with a TTL), segment, and the push
  decisions (the newest :attr:`Store.decisions_max`, each sent or held back by a rule; kept
  :attr:`Store.decisions_ttl_s` after the last);
- per item, written by the item stage: ``similar`` (JSON) and the neighbour row the user stages rank
  with, with a token per ``cooc`` partition that changes at each publish;
- the population's trending sets (global and per segment), segment model and momentum;
- experiment counters, absolute values per segment (:mod:`infogap.stream.experiments_store`);
- the control group's cohort figures, absolute values per cohort (:mod:`infogap.models.retention`);
- the generation marker.

Every write sets absolute values, so a write that failed half way is retried whole. Failures are
two exceptions: :class:`StoreUnavailable` (unreachable, or refusing writes: wait and retry) and
:class:`WrongTypeError` (keys holding another type: delete them with :meth:`Store.delete_own`, retry).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import orjson

from infogap.models.catalog import MAX_ID_CHARS
from infogap.models.experiments import Counts, Segment
from infogap.models.model_state import MAX_STORED_TS, MAX_STORED_VALUE
from infogap.models.retention import Cohort, CohortCounts
from infogap.models.segments import check_model
from infogap.stream.store.keys import RedisKeys


class StoreError(Exception):
    """A store operation failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached, or refuses the operation for now (out of memory, a failover, ...);
    ``reason`` says which, for logs and ``/health`` (never a value or a secret); ``refused``: the store answered
    (a PING would pass, so ``/health`` reports the reason)."""

    def __init__(self, reason: str, refused: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.refused = refused


class WrongTypeError(StoreError):
    """Keys that hold another type than infogap writes there; ``keys`` names them."""

    def __init__(self, keys: list[str]):
        super().__init__(f"WRONGTYPE at {', '.join(keys)[:500]}")
        self.keys = keys


def encode_momentum(item_ids: list[str], values: list[float]) -> bytes:
    """Item ids (a JSON list) and their float64 values, for the internal ``ig:momentum`` key.

    >>> decode_momentum(encode_momentum(["a", "b"], [1.5, 0.25]))
    (['a', 'b'], [1.5, 0.25])
    """
    head = orjson.dumps(item_ids)
    return len(head).to_bytes(4, "little") + head + np.asarray(values, "<f8").tobytes()


def decode_momentum(raw: bytes) -> tuple[list[str], list[float]]:
    """The item ids and values of :func:`encode_momentum`'s bytes; a ValueError unless they are as many item ids as
    values, each a number from 0 to :data:`~infogap.models.model_state.MAX_STORED_VALUE`.

    >>> decode_momentum(encode_momentum(["a", "b"], [1.5]))
    Traceback (most recent call last):
    ...
    ValueError: the momentum is not as many item ids as values from 0 to 1e+15
    """
    size = int.from_bytes(raw[:4], "little")
    ids = orjson.loads(raw[4: 4 + size])
    if (len(raw) - 4 - size) % 8:
        raise ValueError("the momentum's values are not float64s")
    values = np.frombuffer(raw[4 + size:], "<f8")
    if not (type(ids) is list and len(ids) == values.size and all(_is_item_id(i) for i in ids)
            and ((values >= 0) & (values <= MAX_STORED_VALUE)).all()):  # (NaN fails)
        raise ValueError(f"the momentum is not as many item ids as values from 0 to {MAX_STORED_VALUE:g}")
    return ids, values.tolist()


def _is_item_id(v: object) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_ID_CHARS


def decision_entry(channel: str | None, rule: str | None, at: float, message_id: str | None = None,
                   items: Sequence[str] = ()) -> dict:
    """One entry of a user's push decision log: ``rule`` ``"sent"`` (with the ``message_id`` and ``items``) or
    the rule that held the push back (:data:`infogap.models.push_policy.RULES`); ``channel`` None when the rule
    held for every channel; ``at`` the event time, to the millisecond.

    >>> decision_entry("email", None, 10.0001, "m-1", ["a"])
    {'rule': 'sent', 'channel': 'email', 'at': 10.0, 'message_id': 'm-1', 'items': ['a']}
    """
    at = round(float(at), 3)
    if rule is None:
        return {"rule": "sent", "channel": channel, "at": at, "message_id": message_id, "items": list(items)}
    return {"rule": rule, "channel": channel, "at": at}


#: How many of a log's newest entries are looked at for a decision already logged (a batch replayed).
DECISIONS_LOOKBACK = 8


def mergeable(entry: Mapping) -> bool:
    """Whether an entry may merge into a run: a rule that held the push back on every channel."""
    return entry["channel"] is None and entry["rule"] != "sent"


def add_decision(log: list[dict], new: Mapping) -> None:
    """Add ``new`` to ``log`` (newest first), as every store does (Redis:
    :data:`~infogap.stream.store.redis_node.PUSH_DECISIONS`):

    - a decision already logged is not added again (a batch replayed after a crash decides the same again):
      an equal entry among the newest :data:`DECISIONS_LOOKBACK`, or a rule held for every channel at a time
      within the newest entry's run of that rule;
    - the same rule holding for every channel again (``no_change`` at each batch, ``quiet_hours`` through the
      night) is merged into the newest entry, with ``since`` (when the run began) and ``n`` (how many).

    >>> log = []
    >>> for t in (10.0, 20.0, 30.0, 20.0): add_decision(log, decision_entry(None, "no_change", t))
    >>> log
    [{'rule': 'no_change', 'channel': None, 'at': 30.0, 'since': 10.0, 'n': 3}]
    >>> for m in ("m-1", "m-2", "m-1"): add_decision(log, decision_entry("email", None, 40.0, m, ["x"]))
    >>> [e.get("message_id", e["rule"]) for e in log]
    ['m-2', 'm-1', 'no_change']
    """
    if any(old == new for old in log[:DECISIONS_LOOKBACK]):
        return
    head = log[0] if log else None
    if (head is not None and mergeable(new) and "channel" in head and head["channel"] is None
            and head.get("rule") == new["rule"] and all(type(head.get(f, 0.0)) in (int, float) for f in ("at", "since", "n"))
            and "at" in head):
        if head.get("since", head["at"]) <= new["at"] <= head["at"]:
            return  # within the run already counted
        log[0] = {**head, "at": max(head["at"], new["at"]), "since": min(head.get("since", head["at"]), new["at"]),
                  "n": head.get("n", 1) + 1}
        return
    log.insert(0, dict(new))


def population_reply(model_raw: bytes | None, momentum_raw: bytes | None,
                     trending: Mapping[int | None, list[tuple[str, float]]]) -> dict:
    """What :meth:`Store.read_population` returns, from the raw values read; a ValueError for values that are not
    the learner's: a segment ``model`` that is not one (:func:`~infogap.models.segments.check_model`, when it has
    seeded centers) or whose ``at`` is not a time within :data:`~infogap.models.model_state.MAX_STORED_TS`, a
    momentum as :func:`decode_momentum` refuses it, or trending entries that are not an item id and a finite score
    within :data:`~infogap.models.model_state.MAX_STORED_VALUE` (an infinite ZSET score).

    >>> population_reply(b'{"n_seeded": 0, "centers": [], "slots": {}, "at": 1e300}', None, {})
    Traceback (most recent call last):
    ...
    ValueError: the population model's 'at' is not a time within 4.10244e+09
    """
    model = orjson.loads(model_raw) if model_raw is not None else None
    if model is not None:
        if type(model) is not dict:
            raise ValueError("the population model is not a JSON object")
        if model.get("n_seeded"):  # (without seeded centers, the engine reads only 'at')
            check_model(model)
        at = model.get("at")
        if at is not None and (type(at) not in (int, float) or not abs(at) <= MAX_STORED_TS):  # (NaN fails)
            raise ValueError(f"the population model's 'at' is not a time within {MAX_STORED_TS:g}")
    for entries in trending.values():
        if not all(_is_item_id(i) and type(x) in (int, float) and abs(x) <= MAX_STORED_VALUE for i, x in entries):
            raise ValueError(f"a trending set holds other than item ids scored within {MAX_STORED_VALUE:g}")
    return {"model": model, "trending": dict(trending), "at": None if model is None else model.get("at"),
            "momentum": decode_momentum(momentum_raw) if momentum_raw is not None else None}


class Store(ABC):
    """The interface of every store. ``keys`` is its key layout; ``recs_ttl_s`` the recommendations' TTL;
    ``decisions_max`` and ``decisions_ttl_s`` bound each user's push decision log."""

    keys: RedisKeys
    recs_ttl_s: int
    decisions_max: int = 50
    decisions_ttl_s: int = 7 * 86_400

    # ------------------------------------------------------------------ writes
    @abstractmethod
    async def write(self, recs: Iterable[Mapping] = (), segments: Mapping[str, int | None] | None = None,
                    similar: Mapping[str, list] | None = None, rows: Mapping[str, bytes] | None = None,
                    trending: Mapping[int | None, list[tuple[str, float]]] | None = None,
                    population: Mapping | None = None,
                    momentum: tuple[list[str], list[float]] | None = None,
                    rows_published: Mapping[int, str] | None = None,
                    decisions: Mapping[str, Sequence[Mapping]] | None = None,
                    models: Mapping[str, bytes] | None = None,
                    privacy: Mapping[int, bytes] | None = None) -> None:
        """Write one batch of results: ``recs`` (documents with a ``user_id``, kept ``recs_ttl_s``), each user's
        new push ``decisions`` (:func:`decision_entry`, oldest first: added to the user's log by
        :func:`add_decision`),
        ``segments`` (user -> segment, None deletes; kept as long as the recommendations), ``similar`` and
        neighbour ``rows`` per item, each ``cooc`` partition's new token in ``rows_published`` (a reader
        that sees a token sees the rows published with it), ``trending`` per segment (None: global; a
        set is replaced whole, never seen half written; empty deletes it), the ``population`` model,
        the ``momentum`` (item ids, values), learned ``models`` by name (JSON bytes, each replaced whole) and each
        ``cooc`` partition's ``privacy`` ledger (JSON bytes, replaced whole)."""

    @abstractmethod
    async def write_experiment(self, experiment: str, counts: Mapping[Segment, Counts]) -> int:
        """Set the absolute counts of the given segments of ``experiment``; returns how many segments."""

    @abstractmethod
    async def write_retention(self, experiment: str, counts: Mapping[Cohort, CohortCounts]) -> int:
        """Set the absolute counts of the given cohorts of ``experiment`` (zeros included: a cohort whose records
        all left); returns how many cohorts."""

    @abstractmethod
    async def erase_user(self, user_id: str) -> int:
        """Delete every key about ``user_id``; returns how many existed."""

    # ------------------------------------------------------------------ reads
    @abstractmethod
    async def recs(self, user_id: str) -> bytes | None:
        """A user's recommendations document (JSON bytes), or None (unknown, expired, erased)."""

    @abstractmethod
    async def segment(self, user_id: str) -> int | None:
        """A user's segment, or None."""

    @abstractmethod
    async def decisions(self, user_id: str, n: int = 50) -> list[dict]:
        """A user's newest ``n`` push decisions, newest first (entries that cannot be read are left out)."""

    @abstractmethod
    async def similar(self, item_id: str) -> list[dict]:
        """An item's published neighbours (``item_id``, ``score``, ``support``, ``confidence``, ``lift``)."""

    @abstractmethod
    async def trending(self, segment: int | None = None, n: int = 10) -> list[tuple[str, float]]:
        """The top ``n`` trending items overall (None) or in a segment, best first."""

    @abstractmethod
    async def read_rows(self, items: Sequence[str]) -> list[bytes | None]:
        """The neighbour rows of ``items`` (None where there is none), in their order."""

    @abstractmethod
    async def read_tokens(self, partitions: int) -> list[bytes | None]:
        """The rows' token of each of ``partitions`` ``cooc`` partitions (None: none published yet)."""

    @abstractmethod
    async def read_population(self, n_segments: int, n: int) -> dict:
        """What :meth:`infogap.models.engine.Engine.load_population` takes: the population ``model`` (with ``at``,
        the time the scores are decayed to; None before the learner has published), the top ``n`` of
        each ``trending`` set and the ``momentum`` of every item."""

    @abstractmethod
    async def read_model(self, name: str) -> bytes | None:
        """A learned model the population learner published under ``name`` (``write(models=...)``), or None."""

    @abstractmethod
    async def read_privacy(self, partitions: int) -> list[bytes | None]:
        """The privacy ledger of each of ``partitions`` ``cooc`` partitions (None: none written)."""

    @abstractmethod
    async def experiments(self) -> dict[str, list[str]]:
        """Experiment name -> its variants found in the store."""

    @abstractmethod
    async def read_experiment(self, experiment: str, variants: list[str] | None = None) -> dict[Segment, Counts]:
        """Every segment of ``experiment`` (all variants found, or the ones given), per shard."""

    @abstractmethod
    async def retention_names(self) -> list[str]:
        """The experiments (or push campaigns) with cohort figures in the store, sorted."""

    @abstractmethod
    async def read_retention(self, experiment: str) -> dict[Cohort, CohortCounts]:
        """Every cohort of ``experiment``, per shard (empty when none); cohorts with nobody entered are left out."""

    # ------------------------------------------------------------------ upkeep
    @abstractmethod
    async def generation(self) -> tuple[bytes, bool]:
        """The generation marker: a token set once per life of the store's data, set now if absent.
        Returns (token, whether it was absent: the store lost its data or is new)."""

    @abstractmethod
    async def delete_own(self, keys: list[str]) -> list[str]:
        """Delete those of ``keys`` under this store's prefix (to overwrite a key of the wrong type);
        returns the others, left alone."""

    @abstractmethod
    async def clear(self) -> int:
        """Delete every key under this store's prefix; returns how many."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the store answers (raises :class:`StoreUnavailable` when it does not)."""

    async def close(self) -> None:
        """Let go of connections."""
