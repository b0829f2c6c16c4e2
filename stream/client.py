"""A small typed client for app backends: read what the workers wrote to Redis.

>>> import redis
>>> client = InfogapClient(redis.Redis.from_url("redis://127.0.0.1:6379/0"))  # doctest: +SKIP
>>> client.recommendations("u42")  # doctest: +SKIP
Recs(user_id='u42', items=[RecItem(item_id='m50', score=0.91, reason='...')], ...)

The redis-cli equivalents are in the README ("Reading recommendations").
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis

from stream.redis_keys import RedisKeys


@dataclass(frozen=True, slots=True)
class RecItem:
    item_id: str
    score: float
    reason: str


@dataclass(frozen=True, slots=True)
class Recs:
    """A user's current recommendations, as ``ig:recs:{user_id}`` holds them."""

    user_id: str
    items: list[RecItem]
    segment: int | None
    generated_at: float
    model_version: str

    @classmethod
    def from_json(cls, raw: bytes | str) -> Recs:
        d = orjson.loads(raw)
        return cls(d["user_id"], [RecItem(i["item_id"], float(i["score"]), i["reason"]) for i in d["items"]],
                   d.get("segment"), float(d["generated_at"]), str(d["model_version"]))


@dataclass(frozen=True, slots=True)
class SimilarItem:
    item_id: str
    score: float
    support: float
    confidence: float
    lift: float


class InfogapClient:
    """Reads recommendations, neighbours, trending and segments (sync redis-py client)."""

    def __init__(self, client: redis.Redis, prefix: str = "ig:"):
        self.client = client
        self.keys = RedisKeys(prefix)

    @classmethod
    def from_url(cls, url: str = "redis://127.0.0.1:6379/0", prefix: str = "ig:", **kwargs) -> InfogapClient:
        return cls(redis.Redis.from_url(url, **kwargs), prefix)

    def recommendations(self, user_id: str) -> Recs | None:
        """The user's top-N, or None if the user has none (unknown, expired or erased)."""
        raw = self.client.get(self.keys.recs(user_id))
        return None if raw is None else Recs.from_json(raw)

    def similar(self, item_id: str) -> list[SimilarItem]:
        raw = self.client.get(self.keys.similar(item_id))
        if raw is None:
            return []
        return [SimilarItem(d["item_id"], float(d["score"]), float(d["support"]), float(d["confidence"]),
                            float(d["lift"])) for d in orjson.loads(raw)]

    def trending(self, segment: int | None = None, n: int = 10) -> list[tuple[str, float]]:
        """Top ``n`` trending items overall or in a segment, best first."""
        rows = self.client.zrevrange(self.keys.trending(segment), 0, n - 1, withscores=True)
        return [(item.decode() if isinstance(item, bytes) else item, float(score)) for item, score in rows]

    def segment(self, user_id: str) -> int | None:
        raw = self.client.get(self.keys.segment(user_id))
        return None if raw is None else int(raw)
