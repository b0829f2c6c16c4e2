"""``infogap state migrate``: rewrite the pickled snapshots of infogap before format 3 in format 3.

Workers never unpickle (a pickle can run code, :mod:`infogap.stream.snapshots`); a partition whose last
snapshot is a pickle is stopped and says so. An operator who knows that the state topics were
written only by infogap's own workers runs this once, with the workers stopped: it reads each
partition's last record and, if it is a pickle, loads it with an unpickler that builds only the
classes infogap's snapshots held (an allow-list: a payload naming anything else, ``os.system``
say, is refused), converts it to the plain tree of format 3 and writes it back. Records already in
format 3 are left alone.
"""
from __future__ import annotations

import asyncio
import io
import logging
import pickle
import random
import zlib

import zstandard

from infogap.stream import connections
from infogap.stream.settings import Settings
from infogap.stream.snapshots import _ZSTD_MAGIC, MAGIC, SnapshotStore, snapshot_bytes

log = logging.getLogger("infogap.migrate")

#: (module, name) pairs a pre-format-3 snapshot could hold (its module names as they are now: :func:`_module_now`);
#: nothing else is ever built
_ALLOWED = {
    ("infogap.stream.core.user_partition", "UserPartition"), ("infogap.models.dedupe", "Deduplicator"),
    ("infogap.models.push_policy", "PushPolicy"), ("infogap.models.push_policy", "PushConfig"),
    ("infogap.models.push_policy", "_UserPushState"), ("infogap.models.experiments", "ExperimentMetrics"),
    ("infogap.models.experiments", "MetricsConfig"), ("infogap.models.experiments", "Segment"), ("infogap.models.experiments", "Counts"),
    ("infogap.models.experiments", "_Msg"), ("infogap.models.cooc_shard", "CoOccurrenceShard"),
    ("infogap.models.cooccurrence", "CoOccurrence"), ("infogap.models.slot_table", "SlotTable"),
    ("infogap.models.population", "PopulationLearner"), ("infogap.models.engine", "EngineConfig"),
    ("infogap.models.segments", "Segmenter"), ("infogap.models.segments", "_KMeans"), ("infogap.models.trending", "Trending"),
    ("infogap.models.catalog", "Catalog"), ("collections", "deque"), ("collections", "defaultdict"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "dict"),
    ("builtins", "float"), ("functools", "partial"), ("random", "Random"), ("_random", "Random"),
    ("river.base.estimator", "EstimatorMeta"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    # a partition of this version pickled (the tests make old snapshots so); a real old snapshot holds none
    ("infogap.models.retention", "Cohorts"), ("infogap.models.retention", "RetentionConfig"),
}
_ALLOWED_PREFIXES = ("numpy.dtypes",)
#: where the modules such a snapshot names live now
_MOVED = {"stream.user_partition": "infogap.stream.core.user_partition"}


def _module_now(module: str) -> str:
    """``models.x`` -> ``infogap.models.x``; ``stream.user_partition`` -> ``infogap.stream.core.user_partition``.

    >>> _module_now("models.dedupe"), _module_now("numpy"), _module_now("stream.user_partition")
    ('infogap.models.dedupe', 'numpy', 'infogap.stream.core.user_partition')
    """
    if module in _MOVED:
        return _MOVED[module]
    return f"infogap.{module}" if module.startswith("models.") else module


def _bound_gauss(obj, name: str):
    """The one attribute lookup such a pickle makes (River's centers draw from ``Random.gauss``)."""
    if isinstance(obj, random.Random) and name == "gauss":
        return obj.gauss
    raise pickle.UnpicklingError(f"getattr(..., {name!r}) is not something an infogap snapshot holds; refused")


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):
            return _bound_gauss
        module = _module_now(module)
        if (module, name) in _ALLOWED or (module.startswith(_ALLOWED_PREFIXES) and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something an infogap snapshot holds; refused")


def load_legacy(blob: bytes) -> tuple[int, int, object]:
    """``(partition, offset, state)`` of a pickled snapshot, built through the allow-list only.

    >>> import os
    >>> class Evil:
    ...     def __reduce__(self):
    ...         return os.system, ("echo pwned",)
    >>> load_legacy(zlib.compress(pickle.dumps((0, 1, Evil()))))
    Traceback (most recent call last):
    ...
    _pickle.UnpicklingError: posix.system is not something an infogap snapshot holds; refused
    """
    raw = zstandard.ZstdDecompressor().decompress(blob) if blob[:4] == _ZSTD_MAGIC else zlib.decompress(blob)
    partition, offset, state = _AllowListUnpickler(io.BytesIO(raw)).load()
    return partition, offset, state


def tree_of(kind: str, state: dict) -> dict:
    """The format-3 tree of a legacy snapshot's state objects."""
    if kind == "users":
        return {"part": state["part"].to_state(), "users": state["users"]}
    pop = state.get("population")
    return {"shard": state["shard"].to_state(), "population": None if pop is None else pop.to_state()}


async def migrate(settings: Settings, *, dry_run: bool = False) -> dict[str, int]:
    """Rewrite every pickled last snapshot of both state topics; returns counts by outcome."""
    counts = {"migrated": 0, "already format 3": 0, "refused": 0}
    for kind, topic in (("users", settings.topics.state_users), ("items", settings.topics.state_items)):
        store = SnapshotStore(settings, topic, kind)
        probe = connections.consumer(settings, group_id=None)
        await probe.start()
        try:
            partitions = sorted(await connections.wait_partitions(probe, topic))
        finally:
            await probe.stop()
        latest = await store.latest(partitions)
        if not dry_run:
            await store.start()
        try:
            for p, (offset, value) in sorted(latest.items()):
                if value is None or value.startswith(MAGIC):
                    counts["already format 3"] += 1
                    continue
                try:
                    part, covered, state = load_legacy(value)
                    if part != p:
                        raise ValueError(f"a snapshot of partition {part} on partition {p}")
                    body = snapshot_bytes(kind, p, covered, tree_of(kind, state))
                except Exception as exc:  # noqa: BLE001 - reported, the record is left alone
                    counts["refused"] += 1
                    log.error("%s partition %d offset %d not migrated: %s: %s", topic, p, offset,
                              type(exc).__name__, exc)
                    continue
                if not dry_run:
                    await store.save_many([(p, body)])
                counts["migrated"] += 1
                log.info("%s partition %d: snapshot at offset %d rewritten in format 3 (covers offset %d)",
                         topic, p, offset, covered)
        finally:
            if not dry_run:
                await store.stop()
    return counts


def run(settings: Settings, dry_run: bool = False) -> dict[str, int]:
    return asyncio.run(migrate(settings, dry_run=dry_run))
