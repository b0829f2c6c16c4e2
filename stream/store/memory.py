"""The store in this process's memory: for tests and the pure pipeline, no server needed.

>>> import asyncio
>>> store = MemoryStore(recs_ttl_s=60)
>>> asyncio.run(store.write(recs=[{"user_id": "u1", "items": []}], segments={"u1": 2}))
>>> asyncio.run(store.segment("u1")), asyncio.run(store.erase_user("u1")), asyncio.run(store.recs("u1"))
(2, 2, None)
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import orjson

from infogap.models.experiments import Counts, Segment
from infogap.models.retention import Cohort, CohortCounts
from infogap.stream.store.base import Store, encode_momentum, add_decision, population_reply
from infogap.stream.store.keys import RedisKeys


class MemoryStore(Store):
    """A dict of keys (the same layout as Redis) to values, with expiry times read from ``clock``
    (monotonic seconds; tests move it)."""

    def __init__(self, keys: RedisKeys | None = None, recs_ttl_s: int = 86_400,
                 clock: Callable[[], float] = time.monotonic, decisions_max: int = 50,
                 decisions_ttl_s: int = 7 * 86_400):
        self.keys = keys or RedisKeys()
        self.recs_ttl_s = recs_ttl_s
        self.decisions_max, self.decisions_ttl_s = decisions_max, decisions_ttl_s
        self.clock = clock
        self._values: dict[str, object] = {}
        self._expires: dict[str, float] = {}
        #: (experiment, variant) -> segment -> counts
        self._experiments: dict[tuple[str, str], dict[Segment, Counts]] = {}
        #: experiment -> cohort -> counts
        self._retention: dict[str, dict[Cohort, CohortCounts]] = {}
        self.writes = 0  # calls of write(): what a test of batching counts

    def _get(self, key: str):
        at = self._expires.get(key)
        if at is not None and at <= self.clock():
            self._values.pop(key, None)
            self._expires.pop(key, None)
        return self._values.get(key)

    def _set(self, key: str, value, ttl_s: float | None = None) -> None:
        self._values[key] = value
        if ttl_s is None:
            self._expires.pop(key, None)
        else:
            self._expires[key] = self.clock() + ttl_s

    def _delete(self, key: str) -> bool:
        self._expires.pop(key, None)
        return self._values.pop(key, None) is not None

    async def write(self, recs: Iterable[Mapping] = (), segments: Mapping[str, int | None] | None = None,
                    similar: Mapping[str, list] | None = None, rows: Mapping[str, bytes] | None = None,
                    trending: Mapping[int | None, list[tuple[str, float]]] | None = None,
                    population: Mapping | None = None,
                    momentum: tuple[list[str], list[float]] | None = None,
                    rows_published: Mapping[int, str] | None = None,
                    decisions: Mapping[str, Sequence[Mapping]] | None = None,
                    models: Mapping[str, bytes] | None = None,
                    privacy: Mapping[int, bytes] | None = None) -> None:
        k, ttl = self.keys, self.recs_ttl_s
        self.writes += 1
        for user_id, entries in (decisions or {}).items():
            log = [orjson.loads(e) for e in self._get(k.decisions(user_id)) or []]  # newest first
            for entry in entries:
                add_decision(log, entry)
            self._set(k.decisions(user_id), [orjson.dumps(e) for e in log[: self.decisions_max]], self.decisions_ttl_s)
        for doc in recs:
            self._set(k.recs(doc["user_id"]), orjson.dumps(doc), ttl)
        for user_id, seg in (segments or {}).items():
            if seg is None:
                self._delete(k.segment(user_id))
            else:
                self._set(k.segment(user_id), str(seg).encode(), ttl)
        for item, neighbours in (similar or {}).items():
            self._set(k.similar(item), orjson.dumps(neighbours))
        for item, row in (rows or {}).items():
            self._set(k.neighbour_row(item), bytes(row))
        for p, token in (rows_published or {}).items():
            self._set(k.rows_published(p), str(token).encode())
        for seg, ranked in (trending or {}).items():
            if ranked:
                self._set(k.trending(seg), sorted(((float(s), i) for i, s in ranked), reverse=True))
            else:
                self._delete(k.trending(seg))
        if population is not None:
            self._set(k.segment_model(), orjson.dumps(population))
        if momentum is not None:
            self._set(k.momentum(), encode_momentum(*momentum))
        for name, blob in (models or {}).items():
            self._set(k.learned_model(name), bytes(blob))
        for p, blob in (privacy or {}).items():
            self._set(k.privacy(p), bytes(blob))

    async def write_experiment(self, experiment: str, counts: Mapping[Segment, Counts]) -> int:
        for seg, c in counts.items():
            self._experiments.setdefault((experiment, seg.variant), {})[seg] = Counts.from_dict(c.to_dict())
        return len(counts)

    async def write_retention(self, experiment: str, counts: Mapping[Cohort, CohortCounts]) -> int:
        for cohort, c in counts.items():
            self._retention.setdefault(experiment, {})[Cohort(*cohort)] = CohortCounts.from_dict(c.to_dict())
        return len(counts)

    async def erase_user(self, user_id: str) -> int:
        return sum(self._delete(key) for key in self.keys.user_keys(user_id))

    async def recs(self, user_id: str) -> bytes | None:
        return self._get(self.keys.recs(user_id))

    async def segment(self, user_id: str) -> int | None:
        raw = self._get(self.keys.segment(user_id))
        return None if raw is None else int(raw)

    async def decisions(self, user_id: str, n: int = 50) -> list[dict]:
        return [orjson.loads(e) for e in (self._get(self.keys.decisions(user_id)) or [])[:n]]

    async def similar(self, item_id: str) -> list[dict]:
        raw = self._get(self.keys.similar(item_id))
        return [] if raw is None else orjson.loads(raw)

    async def trending(self, segment: int | None = None, n: int = 10) -> list[tuple[str, float]]:
        return [(i, s) for s, i in (self._get(self.keys.trending(segment)) or [])[:n]]

    async def read_rows(self, items: Sequence[str]) -> list[bytes | None]:
        return [self._get(self.keys.neighbour_row(i)) for i in items]

    async def read_tokens(self, partitions: int) -> list[bytes | None]:
        return [self._get(self.keys.rows_published(p)) for p in range(partitions)]

    async def read_model(self, name: str) -> bytes | None:
        return self._get(self.keys.learned_model(name))

    async def read_privacy(self, partitions: int) -> list[bytes | None]:
        return [self._get(self.keys.privacy(p)) for p in range(partitions)]

    async def read_population(self, n_segments: int, n: int) -> dict:
        k = self.keys
        trending = {seg: await self.trending(seg, n) for seg in (None, *range(n_segments))}
        return population_reply(self._get(k.segment_model()), self._get(k.momentum()), trending)

    async def experiments(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for (name, variant), segments in self._experiments.items():
            if segments:
                found.setdefault(name, []).append(variant)
        return {k: sorted(v) for k, v in sorted(found.items())}

    async def read_experiment(self, experiment: str, variants: list[str] | None = None) -> dict[Segment, Counts]:
        if variants is None:
            variants = (await self.experiments()).get(experiment, [])
        return {seg: Counts.from_dict(c.to_dict()) for v in variants
                for seg, c in self._experiments.get((experiment, v), {}).items()}

    async def retention_names(self) -> list[str]:
        return sorted(name for name, cohorts in self._retention.items() if cohorts)

    async def read_retention(self, experiment: str) -> dict[Cohort, CohortCounts]:
        return {k: c.copy() for k, c in self._retention.get(experiment, {}).items() if not c.is_empty()}

    async def generation(self) -> tuple[bytes, bool]:
        key = self.keys.generation()
        token = self._get(key)
        if token is not None:
            return token, False
        token = secrets.token_hex(16).encode()
        self._set(key, token)
        return token, True

    async def delete_own(self, keys: list[str]) -> list[str]:
        for key in keys:
            if key.startswith(self.keys.prefix):
                self._delete(key)
        return [key for key in keys if not key.startswith(self.keys.prefix)]

    async def clear(self) -> int:
        n = (sum(1 for key in list(self._values) if self._get(key) is not None) + len(self._experiments)
             + len(self._retention))
        self._values.clear()
        self._expires.clear()
        self._experiments.clear()
        self._retention.clear()
        return n

    async def ping(self) -> bool:
        return True
