"""The store on Redis Cluster: the same writes as on one server, grouped per node.

Redis Cluster refuses a command whose declared keys span slots. The keys about one user carry it as a hash
tag (:class:`~infogap.stream.store.keys.RedisKeys` with ``cluster=True``), so that a user's recommendations and
segment share a slot. A batch's keys (thousands of users, thousands of rows: as many slots) are grouped by
the node that serves them, and each node gets one script call per 1,000 keys, flagged
``allow-cross-slot-keys`` (Redis >= 7.0) and naming its keys in ARGV: a command per slot cost the
client ~30 us each and a third of the worker's throughput. Reads of rows go the same way. Scripts are sent
whole (``EVAL``): a replica promoted by a failover has no script cache.

When a slot has moved (a failover, a resharding), a node refuses the call; the error is a
:class:`~infogap.stream.store.base.StoreUnavailable`, the cluster's layout is read again, and the caller's retry
groups the keys anew.

A reader that sees a ``cooc`` partition's new token must see the rows published with it: the tokens are
written after the rows were acknowledged, not in the same ``MSET`` as on one server.

>>> from redis.crc import key_slot
>>> keys = RedisKeys("ig:", cluster=True)
>>> key_slot(keys.recs("u42").encode()) == key_slot(keys.segment("u42").encode())
True
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence

import redis.asyncio as aioredis
from redis.crc import key_slot

from infogap.stream.store.base import StoreUnavailable
from infogap.stream.store.keys import RedisKeys
from infogap.stream.store.redis_node import (PUSH_DECISIONS, REPLACE_ZSET, SET_WITH_TTL_KEYS, RedisStore,
                                             decisions_args, translated)

#: ``SET key value [EX ttl]`` for keys of one node, any slots (ARGV: the TTL or 0, the keys, then the values).
SET_ON_NODE = """#!lua flags=allow-cross-slot-keys
local n = (#ARGV - 1) / 2
local ttl = tonumber(ARGV[1])
for i = 1, n do
  if ttl > 0 then
    redis.call('SET', ARGV[1 + i], ARGV[1 + n + i], 'EX', ttl)
  else
    redis.call('SET', ARGV[1 + i], ARGV[1 + n + i])
  end
end
return n
"""
#: ``SET key value NX`` for keys of one node, any slots (ARGV: the value, then the keys).
SET_NX_ON_NODE = """#!lua flags=allow-cross-slot-keys
for i = 2, #ARGV do
  redis.call('SET', ARGV[i], ARGV[1], 'NX')
end
return #ARGV - 1
"""
#: ``DEL`` of keys of one node, any slots (ARGV: the keys); the number deleted, as ``DEL`` answers.
DEL_ON_NODE = """#!lua flags=allow-cross-slot-keys
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('DEL', ARGV[i])
end
return n
"""
#: Generation markers, spread over the slots by their hash tags (``ig:generation:{0}`` ...): a master that loses
#: its data alone (restarted empty before its replica took over) loses the markers it held. With 1,024 of them a
#: master serving 1 % of the slots holds none with a chance of 3 in 100,000.
GENERATION_MARKERS = 1024
#: ``GET`` of keys of one node, any slots (ARGV: the keys); nil where a key is absent or holds another type,
#: as ``MGET`` answers.
GET_ON_NODE = """#!lua flags=no-writes,allow-cross-slot-keys
local out = {}
for i = 1, #ARGV do
  local v = redis.pcall('GET', ARGV[i])
  if type(v) == 'table' and v.err then v = false end
  out[i] = v
end
return out
"""


def by_slot(keys: Iterable[str]) -> dict[int, list[int]]:
    """Slot -> the positions of ``keys`` that hash to it, in order.

    >>> list(by_slot(["a{u1}", "b{u1}", "c"]).values())
    [[0, 1], [2]]
    """
    out: dict[int, list[int]] = {}
    for k, key in enumerate(keys):
        out.setdefault(key_slot(key.encode()), []).append(k)
    return out


class RedisClusterStore(RedisStore):
    """The store on Redis Cluster (``redis.asyncio.RedisCluster``)."""

    def __init__(self, client: aioredis.RedisCluster, keys: RedisKeys, recs_ttl_s: int, **bounds):
        if not keys.cluster:
            raise ValueError("Redis Cluster needs the key layout with hash tags: RedisKeys(prefix, cluster=True)")
        super().__init__(client, keys, recs_ttl_s, **bounds)

    def _by_node(self, keys: Sequence[str]) -> list[tuple[object, list[int]]]:
        """(node, positions of ``keys`` it serves), in chunks of at most ``SET_WITH_TTL_KEYS``."""
        nodes = self.client.nodes_manager
        grouped: dict[str, tuple[object, list[int]]] = {}
        for slot, positions in by_slot(keys).items():
            node = nodes.get_node_from_slot(slot)
            grouped.setdefault(node.name, (node, []))[1].extend(positions)
        return [(node, positions[i: i + SET_WITH_TTL_KEYS]) for node, positions in grouped.values()
                for i in range(0, len(positions), SET_WITH_TTL_KEYS)]

    def _queue_set(self, pipe, keys: list[str], values: list, ttl: int) -> None:
        for node, part in self._by_node(keys):
            pipe.execute_command("EVAL", SET_ON_NODE, 1, keys[part[0]], ttl, *(keys[k] for k in part),
                                 *(values[k] for k in part), target_nodes=node)

    async def _queue_set_with_ttl(self, pipe, keys: list[str], values: list) -> None:
        self._queue_set(pipe, keys, values, self.recs_ttl_s)

    async def _queue_decisions(self, pipe, keys: list[str], entries: list[list[bytes]]) -> None:
        for node, part in self._by_node(keys):
            pipe.execute_command("EVAL", PUSH_DECISIONS, 1, keys[part[0]],
                                 *decisions_args(self, [keys[k] for k in part], [entries[k] for k in part]),
                                 target_nodes=node)

    async def _queue_replace_zset(self, pipe, key: str, ranked: list[tuple[str, float]]) -> None:
        pipe.eval(REPLACE_ZSET, 1, key, *(x for item, score in ranked for x in (float(score), item)))

    def _queue_mset(self, pipe, items: dict) -> None:
        self._queue_set(pipe, list(items), list(items.values()), 0)

    def _queue_delete(self, pipe, keys: list[str]) -> None:
        for node, part in self._by_node(keys):
            pipe.execute_command("EVAL", DEL_ON_NODE, 1, keys[part[0]], *(keys[k] for k in part), target_nodes=node)

    async def _layout(self) -> None:
        """The cluster's layout, read when the client has none yet: what the keys are grouped by."""
        with translated():
            await self.client.initialize()

    async def _mget(self, keys: list[str]) -> list:
        if not keys:
            return []
        await self._layout()
        pipe = self.client.pipeline(transaction=False)
        parts = self._by_node(keys)
        for node, part in parts:
            pipe.execute_command("EVAL_RO", GET_ON_NODE, 1, keys[part[0]], *(keys[k] for k in part),
                                 target_nodes=node)
        out: list = [None] * len(keys)
        for (node, part), values in zip(parts, await self._relayout_on_failure(pipe.execute())):
            for k, value in zip(part, values):
                out[k] = value
        return out

    async def _relayout_on_failure(self, pending):
        """Await ``pending``; on a refusal, read the cluster's layout again before the caller retries (a slot
        moved: the keys' grouping by node was stale)."""
        try:
            with translated():
                return await pending
        except StoreUnavailable:
            try:
                await self.client.nodes_manager.initialize()
            except Exception:  # the layout is read again at the next call; the error that counts is raised
                pass
            raise

    async def write(self, rows_published: Mapping[int, str] | None = None, **parts) -> None:
        """As on one server (:meth:`Store.write`); the rows' tokens once the rows are written."""
        await self._layout()
        await self._relayout_on_failure(super().write(**parts))
        if rows_published:
            await self._relayout_on_failure(super().write(rows_published=rows_published))

    async def erase_user(self, user_id: str) -> int:
        await self._layout()
        return await self._relayout_on_failure(super().erase_user(user_id))

    async def delete_own(self, keys: list[str]) -> list[str]:
        await self._layout()
        return await self._relayout_on_failure(super().delete_own(keys))

    def generation_markers(self) -> list[str]:
        return [f"{self.keys.generation()}:{{{k}}}" for k in range(GENERATION_MARKERS)]

    async def generation(self) -> tuple[bytes, bool]:
        """The markers' values, hashed into one token: any marker gone (a master that lost its data, or all of
        them: the cluster's) is set again (``NX``: the first worker to find it gone sets it, the others read
        that), and the token changes."""
        markers = self.generation_markers()
        seen = await self._mget(markers)
        missing = [m for m, v in zip(markers, seen) if v is None]
        if missing:
            token = secrets.token_hex(16)
            await self._set_nx(missing, token)
            seen = await self._mget(markers)
            other = [m for m, v in zip(markers, seen) if v is None]  # held another type: replaced
            if other:
                await self.delete_own(other)
                await self._set_nx(other, token)
                seen = await self._mget(markers)
        digest = hashlib.blake2b(b"\0".join(v or b"" for v in seen), digest_size=16).hexdigest()
        return digest.encode(), bool(missing)

    async def _set_nx(self, keys: list[str], value: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for node, part in self._by_node(keys):
            pipe.execute_command("EVAL", SET_NX_ON_NODE, 1, keys[part[0]], value, *(keys[k] for k in part),
                                 target_nodes=node)
        await self._relayout_on_failure(pipe.execute())
