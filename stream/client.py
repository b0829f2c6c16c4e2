"""A small typed client for app backends: read what the workers wrote to Redis (or Redis Cluster).

>>> import redis
>>> client = InfogapClient(redis.Redis.from_url("redis://127.0.0.1:6379/0"))  # doctest: +SKIP
>>> client.recommendations("u42")  # doctest: +SKIP
Recs(user_id='u42', items=[RecItem(item_id='m50', score=0.91, reason='...')], ...)

When the workers pseudonymise user ids (``INFOGAP_PSEUDONYM_KEY``), give the client the same key and keep
asking by the raw id; ``InfogapClient.from_settings(load())`` takes the key, credentials and TLS from the
environment like the workers do. The redis-cli equivalents are in the README ("Reading recommendations").
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis
from pydantic import SecretStr

from infogap.stream.pseudonym import Pseudonymizer
from infogap.stream.store.keys import RedisKeys


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
    """Reads recommendations, neighbours, trending and segments (sync redis-py client).

    ``pseudonym_key``: the workers' ``INFOGAP_PSEUDONYM_KEY`` when they pseudonymise user ids; user-facing
    methods then take the raw id, and :class:`Recs` carries the id the caller asked for.
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster, prefix: str = "ig:", *,
                 pseudonym_key: SecretStr | str | bytes | None = None):
        self.client = client
        self.keys = RedisKeys(prefix, cluster=isinstance(client, redis.RedisCluster))
        self._pseudonym = Pseudonymizer(pseudonym_key)

    @classmethod
    def from_url(cls, url: str = "redis://127.0.0.1:6379/0", prefix: str = "ig:", *,
                 pseudonym_key: SecretStr | str | bytes | None = None, **kwargs) -> InfogapClient:
        """``kwargs`` go to ``redis.Redis.from_url`` (``username=``, ``password=``, ``ssl_ca_certs=`` ...); a
        ``redis+cluster://host:port[,host:port...]`` URL reads from Redis Cluster."""
        from infogap.stream.settings import redis_nodes

        if url.partition("://")[0].endswith("+cluster"):
            from redis.cluster import ClusterNode

            nodes = [ClusterNode(h, p) for h, p in redis_nodes(url)]
            if url.startswith("rediss"):
                kwargs.setdefault("ssl", True)
            return cls(redis.RedisCluster(startup_nodes=nodes, **kwargs), prefix, pseudonym_key=pseudonym_key)
        return cls(redis.Redis.from_url(url, **kwargs), prefix, pseudonym_key=pseudonym_key)

    @classmethod
    def from_settings(cls, settings, **kwargs) -> InfogapClient:
        """Address, credentials, TLS, key prefix and pseudonym key from :class:`infogap.stream.settings.Settings`."""
        from infogap.stream import connections

        return cls(connections.redis_sync(settings, **kwargs), settings.redis_prefix,
                   pseudonym_key=settings.pseudonym_key)

    def recommendations(self, user_id: str) -> Recs | None:
        """The user's top-N, or None if the user has none (unknown, expired or erased)."""
        raw = self.client.get(self.keys.recs(self._pseudonym(user_id)))
        if raw is None:
            return None
        recs = Recs.from_json(raw)
        if self._pseudonym.enabled:  # the stored id is the pseudonym; the caller knows the person by the raw id
            recs = Recs(str(user_id).strip(), recs.items, recs.segment, recs.generated_at, recs.model_version)
        return recs

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
        raw = self.client.get(self.keys.segment(self._pseudonym(user_id)))
        return None if raw is None else int(raw)
