"""The store: one interface (:class:`Store`), three implementations, picked by ``INFOGAP_REDIS_URL``.

>>> from infogap.stream.settings import Settings
>>> type(open_store(Settings(redis_url="redis+cluster://127.0.0.1:7100"))).__name__
'RedisClusterStore'
>>> open_store(Settings(redis_url="redis://127.0.0.1:6379/0")).keys
RedisKeys(prefix='ig:', cluster=False)
"""
from __future__ import annotations

from infogap.stream.store.base import Store, StoreError, StoreUnavailable, WrongTypeError
from infogap.stream.store.keys import RedisKeys
from infogap.stream.store.memory import MemoryStore

__all__ = ["MemoryStore", "RedisKeys", "Store", "StoreError", "StoreUnavailable", "WrongTypeError", "open_store",
           "keys_for"]


def keys_for(settings) -> RedisKeys:
    """The key layout for ``settings``: hash tags on Redis Cluster."""
    return RedisKeys(settings.redis_prefix, cluster=settings.redis_cluster)


def open_store(settings, **client_kwargs) -> Store:
    """The Redis or Redis Cluster store that ``settings`` name (``client_kwargs`` go to the client, such as
    ``socket_timeout``). Nothing connects until the first call."""
    from infogap.stream import connections
    from infogap.stream.store.redis_cluster import RedisClusterStore
    from infogap.stream.store.redis_node import RedisStore

    client = connections.redis_async(settings, **client_kwargs)
    cls = RedisClusterStore if settings.redis_cluster else RedisStore
    return cls(client, keys_for(settings), settings.recs_ttl_s, decisions_max=settings.decision_log_max,
               decisions_ttl_s=settings.decision_log_ttl_s)
