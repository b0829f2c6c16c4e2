"""The store on one Redis server: pipelined, one round trip per batch.

Error replies: pipelines are run by :func:`execute`, which reads every reply and then raises the first
refusal (OOM, READONLY, ...: :func:`refusal` says why, for logs and ``/health``) as
:class:`~infogap.stream.store.base.StoreUnavailable`, or :class:`~infogap.stream.store.base.WrongTypeError` naming the
keys that hold another type. Every write sets absolute values, so the caller retries the whole write
(``Worker._store_retrying``): a batch half written is rewritten whole.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import orjson
import redis.asyncio as aioredis
from redis.exceptions import (ConnectionError as RedisConnectionError, OutOfMemoryError, ReadOnlyError,
                              RedisClusterException, ResponseError, TimeoutError as RedisTimeoutError)

from infogap.models.experiments import Counts, Segment
from infogap.models.retention import Cohort, CohortCounts
from infogap.stream.experiments_store import (cohort_field, escape, field_name, glob_escape, parse_cohort_fields,
                                              parse_fields, unescape)
from infogap.stream.store.base import (DECISIONS_LOOKBACK, Store, StoreUnavailable, WrongTypeError, encode_momentum,
                                        mergeable, population_reply)
from infogap.stream.store.keys import RedisKeys


#: error codes (the reply's first word, or words in a script's error text) -> what they mean
_REFUSALS = {"OOM": "Redis is out of memory (maxmemory with noeviction) and refuses writes",
             "READONLY": "Redis is a read-only replica (a failover?) and refuses writes",
             "MASTERDOWN": "the replica lost its primary", "LOADING": "Redis is loading its data",
             "BUSY": "Redis is busy running a script", "TRYAGAIN": "Redis asks to try again",
             "MISCONF": "Redis refuses writes after a failed save (stop-writes-on-bgsave-error)",
             "NOPERM": "the Redis user lacks a permission", "NOAUTH": "Redis asks for authentication",
             "CLUSTERDOWN": "the Redis Cluster is down (a master failed and no replica has taken over yet)",
             "WRONGTYPE": "an infogap key holds another type"}


def refusal(exc: ResponseError) -> str:
    """A short reason for an error reply, for logs and ``/health``: its code and meaning, without the
    command or its values. Script errors carry the inner reply in their text.

    >>> refusal(OutOfMemoryError("Command # 1 (EVALSHA ...) of pipeline caused error: command not allowed"))
    'OOM: Redis is out of memory (maxmemory with noeviction) and refuses writes'
    >>> refusal(ResponseError("ERR Error running script (call to f_1): @user_script:4: -READONLY You can't"))
    'READONLY: Redis is a read-only replica (a failover?) and refuses writes'
    >>> refusal(ResponseError("Command # 2 (SET READONLY v) of pipeline caused error: ERR value is not an integer"))
    'ERR: value is not an integer'
    """
    detail = str(exc).rpartition("caused error: ")[2]
    code = getattr(exc, "status_code", None)
    if code not in _REFUSALS:
        if isinstance(exc, OutOfMemoryError) or "used memory > 'maxmemory'" in detail:
            code = "OOM"
        elif isinstance(exc, ReadOnlyError) or "read only replica" in detail:
            code = "READONLY"
        else:
            code = next((c for c in _REFUSALS if detail.startswith(c + " ") or f"-{c} " in detail), None)
    if code is not None:
        return f"{code}: {_REFUSALS[code]}"
    head, _, rest = detail.partition(" ")
    return f"{head}: {rest[:120]}" if head.isupper() and rest else f"{type(exc).__name__}: {detail[:120]}"


def is_wrong_type(exc: ResponseError) -> bool:
    """Whether an error reply is WRONGTYPE (a command's own, or inside a script's error text)."""
    return refusal(exc).startswith("WRONGTYPE:")


def _command_keys(args: tuple) -> list[str]:
    """The keys a queued command names (EVAL/EVALSHA: its KEYS; MSET: every other argument)."""
    name = (args[0].decode() if isinstance(args[0], bytes) else str(args[0])).upper()
    if name in ("EVALSHA", "EVAL", "EVAL_RO", "EVALSHA_RO"):
        keys = args[3: 3 + int(args[2])]
    elif name == "MSET":
        keys = args[1::2]
    else:
        keys = args[1:2]
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


def _queued(pipe) -> list[tuple]:
    """The arguments of the commands queued in ``pipe`` (a pipeline of one server or of a cluster)."""
    stack = getattr(pipe, "command_stack", None)
    if stack is not None:
        return [args for args, _options in stack]
    return [cmd.args for cmd in pipe._execution_strategy._command_queue]  # redis-py's ClusterPipeline


async def execute(pipe) -> list:
    """Run ``pipe`` reading every reply, then raise: the first refusal (any error reply but WRONGTYPE), else
    :class:`WrongTypeError` naming the keys of the wrong type. (redis-py's own ``execute`` raises the first
    error, which names no key; every reply is read either way, the other commands are applied.)

    A cluster's pipeline answers the commands of a node it could not reach with the connection error in
    their place: raised too, never taken for a reply (those commands were not applied)."""
    stack = _queued(pipe)
    replies = await pipe.execute(raise_on_error=False)
    unreached = next((r for r in replies if isinstance(r, Exception) and not isinstance(r, ResponseError)), None)
    if unreached is not None:
        raise unreached
    errors = [(args, r) for args, r in zip(stack, replies) if isinstance(r, ResponseError)]
    if not errors:
        return replies
    other = next((r for _args, r in errors if not is_wrong_type(r)), None)
    if other is not None:
        raise other
    raise WrongTypeError(list(dict.fromkeys(k for args, r in errors for k in _keys_named(r) or _command_keys(args))))


def _keys_named(exc: ResponseError) -> list[str]:
    """The keys a script names in its WRONGTYPE error (``WRONGTYPE ["key", ...]``), else none."""
    detail = str(exc).rpartition("caused error: ")[2]
    if not detail.startswith("WRONGTYPE ["):
        return []
    try:
        keys = orjson.loads(detail[len("WRONGTYPE "):])
    except orjson.JSONDecodeError:
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


#: ``SET key value EX ttl`` for every key given (ARGV: the TTL, then the values in the keys' order), one reply
#: in all. In a pipeline redis-py spends ~30 us of client CPU per command, packing it and parsing its
#: reply; a batch's 6,000 keys (recommendations and segments of 3,000 users) took 95 ms of the worker's
#: CPU as SETs and 18 ms as this script's calls.
SET_WITH_TTL = """
local ttl = ARGV[1]
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""
#: Keys per call of :data:`SET_WITH_TTL`: Redis serves no other client while a script runs (~2 ms per 1,000).
SET_WITH_TTL_KEYS = 1000
#: A sorted set replaced whole (ARGV: score, member, score, member, ...): readers never see it half written
#: or empty, and it is one key (a slot of its own on Redis Cluster, where a rename from a key aside may not be).
REPLACE_ZSET = """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""

#: Push decisions added to users' logs (ARGV: the TTL, the cap, the lookback, how many logs, their keys (any slots of
#: one node; KEYS names the first, to route the call), then per log how many entries and the entries, oldest
#: first, each prefixed ``m`` when it may merge into a run, else ``p``), as
#: :func:`~infogap.stream.store.base.add_decision` adds them: an entry equal to one of the newest is a replay (no
#: JSON is decoded but the head's, for a mergeable entry). Per log: one LRANGE, one LPUSH of its new entries, LTRIM
#: and EXPIRE. Log keys of another type are left alone and named at the end (``WRONGTYPE ["key", ...]``:
#: :func:`execute` raises them as :class:`WrongTypeError`; the worker deletes them and writes again, and the
#: other logs then find their entries already there). Any other refusal (a key this node no longer serves, after
#: a slot moved) fails the call as it is: the store reads the cluster's layout again and the write is retried.
PUSH_DECISIONS = """#!lua flags=allow-cross-slot-keys
local ttl, cap, lookback, nk = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function decode(x)
  local ok, d = pcall(cjson.decode, x)
  if ok and type(d) == 'table' and type(d.at) == 'number' and (d.since == nil or type(d.since) == 'number')
      and (d.n == nil or type(d.n) == 'number') then return d end
  return nil
end
local bad = {}
local a = 5 + nk
for i = 1, nk do
  local key, n = ARGV[4 + i], tonumber(ARGV[a])
  local first = a + 1
  a = a + 1 + n
  local recent = redis.pcall('LRANGE', key, 0, lookback - 1)
  if recent.err and string.sub(recent.err, 1, 9) ~= 'WRONGTYPE' then
    return redis.error_reply(recent.err)  -- not this node's key (a slot moved): re-read the layout, write again
  elseif recent.err then
    bad[#bad + 1] = key
  else
    local push = {}
    for j = first, first + n - 1 do
      local mergeable, e = string.sub(ARGV[j], 1, 1) == 'm', string.sub(ARGV[j], 2)
      local done = false
      for k = 1, math.min(#recent, lookback) do
        if recent[k] == e then
          done = true
          break
        end
      end
      if not done and mergeable and recent[1] then
        local head, new = decode(recent[1]), decode(e)
        if head and new and head.channel == cjson.null and head.rule == new.rule then
          done = true
          local since = head.since or head.at
          if not (since <= new.at and new.at <= head.at) then
            head.since = math.min(since, new.at)
            head.at = math.max(head.at, new.at)
            head.n = (head.n or 1) + 1
            recent[1] = cjson.encode(head)
            if #push > 0 then push[#push] = recent[1] else redis.call('LSET', key, 0, recent[1]) end
          end
        end
      end
      if not done then
        push[#push + 1] = e
        table.insert(recent, 1, e)
      end
    end
    if cap <= 0 then
      redis.call('DEL', key)
    else
      if #push > 0 then redis.call('LPUSH', key, unpack(push)) end
      redis.call('LTRIM', key, 0, cap - 1)
      redis.call('EXPIRE', key, ttl)
    end
  end
end
if #bad > 0 then return redis.error_reply('WRONGTYPE ' .. cjson.encode(bad)) end
return nk
"""

#: errors that mean the server (or a slot's master) cannot be reached now: waited through
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def decisions_args(store, keys: list[str], entries: list[list[bytes]]) -> list:
    """The ARGV of :data:`PUSH_DECISIONS` for the logs ``keys`` and their encoded entries."""
    args: list = [store.decisions_ttl_s, store.decisions_max, DECISIONS_LOOKBACK, len(keys), *keys]
    for mine in entries:
        args += [len(mine), *mine]
    return args


def decode_decisions(raw: list) -> list[dict]:
    """A decision log's entries as read (LRANGE), those that are not JSON objects left out."""
    out = []
    for e in raw:
        try:
            entry = orjson.loads(e)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


@contextmanager
def translated() -> Iterator[None]:
    """Redis's errors as the store's: :class:`StoreUnavailable` (with the reason) or :class:`WrongTypeError`."""
    try:
        yield
    except WrongTypeError:
        raise
    except ResponseError as exc:
        if is_wrong_type(exc):  # a single command's reply (a pipeline's are named by execute)
            raise WrongTypeError([]) from None
        raise StoreUnavailable(refusal(exc), refused=True) from None
    except _UNREACHABLE as exc:
        raise StoreUnavailable(f"Redis unreachable ({type(exc).__name__})") from None
    except RedisClusterException as exc:  # no node answers, a slot uncovered, or a command routed by a stale layout
        unreachable = "unreachable" if "Unreachable" in type(exc).__name__ or "connected" in str(exc) else "refusing"
        raise StoreUnavailable(f"Redis Cluster {unreachable} ({type(exc).__name__})", refused=True) from None


class RedisStore(Store):
    """The store on one Redis server (``redis.asyncio.Redis``)."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, recs_ttl_s: int, decisions_max: int = 50,
                 decisions_ttl_s: int = 7 * 86_400):
        self.client = client
        self.keys = keys
        self.recs_ttl_s = recs_ttl_s
        self.decisions_max, self.decisions_ttl_s = decisions_max, decisions_ttl_s
        self._set_with_ttl = client.register_script(SET_WITH_TTL)
        self._push_decisions = client.register_script(PUSH_DECISIONS)
        self._replace_zset = client.register_script(REPLACE_ZSET)

    # ---------------------------------------------------------------- how commands are grouped (Cluster: per slot)
    async def _queue_set_with_ttl(self, pipe, keys: list[str], values: list) -> None:
        for i in range(0, len(keys), SET_WITH_TTL_KEYS):
            await self._set_with_ttl(keys[i: i + SET_WITH_TTL_KEYS],
                                     [self.recs_ttl_s, *values[i: i + SET_WITH_TTL_KEYS]], client=pipe)

    async def _queue_replace_zset(self, pipe, key: str, ranked: list[tuple[str, float]]) -> None:
        await self._replace_zset([key], [x for item, score in ranked for x in (float(score), item)], client=pipe)

    async def _queue_decisions(self, pipe, keys: list[str], entries: list[list[bytes]]) -> None:
        for i in range(0, len(keys), SET_WITH_TTL_KEYS):
            await self._push_decisions(keys[i: i + 1], decisions_args(self, keys[i: i + SET_WITH_TTL_KEYS],
                                                                      entries[i: i + SET_WITH_TTL_KEYS]), client=pipe)

    def _queue_mset(self, pipe, items: dict) -> None:
        pipe.mset(items)  # one command for all of them: per-command overhead dominates thousands of small SETs

    def _queue_delete(self, pipe, keys: list[str]) -> None:
        pipe.delete(*keys)

    async def _mget(self, keys: list[str]) -> list:
        return await self.client.mget(keys) if keys else []

    # ---------------------------------------------------------------- writes
    async def write(self, recs: Iterable[Mapping] = (), segments: Mapping[str, int | None] | None = None,
                    similar: Mapping[str, list] | None = None, rows: Mapping[str, bytes] | None = None,
                    trending: Mapping[int | None, list[tuple[str, float]]] | None = None,
                    population: Mapping | None = None,
                    momentum: tuple[list[str], list[float]] | None = None,
                    rows_published: Mapping[int, str] | None = None,
                    decisions: Mapping[str, Sequence[Mapping]] | None = None,
                    models: Mapping[str, bytes] | None = None,
                    privacy: Mapping[int, bytes] | None = None) -> None:
        """One pipeline (not a transaction); ``rows`` and ``rows_published`` in one ``MSET``."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        keys, values, gone = [], [], []  # set with the TTL; deleted
        for doc in recs:
            keys.append(k.recs(doc["user_id"]))
            values.append(orjson.dumps(doc))
        for user_id, seg in (segments or {}).items():
            if seg is None:
                gone.append(k.segment(user_id))
            else:
                keys.append(k.segment(user_id))
                values.append(str(seg))
        if gone:
            self._queue_delete(pipe, gone)
        await self._queue_set_with_ttl(pipe, keys, values)
        if decisions:
            await self._queue_decisions(pipe, [k.decisions(u) for u in decisions],
                                        [[(b"m" if mergeable(e) else b"p") + orjson.dumps(e) for e in entries]
                                         for entries in decisions.values()])
        items = {k.similar(i): orjson.dumps(neighbours) for i, neighbours in (similar or {}).items()}
        items.update((k.neighbour_row(i), row) for i, row in (rows or {}).items())
        items.update((k.rows_published(p), token) for p, token in (rows_published or {}).items())
        if items:
            self._queue_mset(pipe, items)
        for seg, ranked in (trending or {}).items():
            if ranked:
                await self._queue_replace_zset(pipe, k.trending(seg), ranked)
            else:
                pipe.delete(k.trending(seg))
        if population is not None:
            pipe.set(k.segment_model(), orjson.dumps(population))
        if momentum is not None:
            pipe.set(k.momentum(), encode_momentum(*momentum))
        for name, blob in (models or {}).items():
            pipe.set(k.learned_model(name), blob)
        for p, blob in (privacy or {}).items():
            pipe.set(k.privacy(p), blob)
        if len(pipe):
            with translated():
                await execute(pipe)

    async def write_experiment(self, experiment: str, counts: Mapping[Segment, Counts]) -> int:
        """HSET the absolute counts (never HINCRBY: a batch replayed rewrites the same values)."""
        by_key: dict[str, dict[str, str]] = {}
        for seg, c in counts.items():
            mapping = by_key.setdefault(self.keys.experiment(experiment, escape(seg.variant)), {})
            for name, value in c.to_dict().items():
                mapping[field_name(seg, name)] = repr(value) if isinstance(value, float) else str(value)
        if by_key:
            pipe = self.client.pipeline(transaction=False)
            for key, mapping in by_key.items():
                pipe.hset(key, mapping=mapping)
            with translated():
                await execute(pipe)  # WRONGTYPE names its keys (the worker overwrites them)
        return len(counts)

    async def write_retention(self, experiment: str, counts: Mapping[Cohort, CohortCounts]) -> int:
        """HSET the absolute counts of the cohorts into the experiment's one hash (a replay rewrites the same)."""
        mapping: dict[str, str] = {}
        for cohort, c in counts.items():
            for name, value in c.to_dict().items():
                mapping[cohort_field(cohort, name)] = repr(value) if isinstance(value, float) else str(value)
        if mapping:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.keys.retention(experiment), mapping=mapping)
            with translated():
                await execute(pipe)  # WRONGTYPE names the key (the worker overwrites it)
        return len(counts)

    async def erase_user(self, user_id: str) -> int:
        pipe = self.client.pipeline(transaction=False)
        self._queue_delete(pipe, self.keys.user_keys(user_id))
        with translated():
            return sum(await execute(pipe))

    # ---------------------------------------------------------------- reads
    async def recs(self, user_id: str) -> bytes | None:
        with translated():
            return await self.client.get(self.keys.recs(user_id))

    async def segment(self, user_id: str) -> int | None:
        with translated():
            raw = await self.client.get(self.keys.segment(user_id))
        return None if raw is None else int(raw)

    async def decisions(self, user_id: str, n: int = 50) -> list[dict]:
        with translated():
            raw = await self.client.lrange(self.keys.decisions(user_id), 0, n - 1)
        return decode_decisions(raw)

    async def similar(self, item_id: str) -> list[dict]:
        with translated():
            raw = await self.client.get(self.keys.similar(item_id))
        return [] if raw is None else orjson.loads(raw)

    async def trending(self, segment: int | None = None, n: int = 10) -> list[tuple[str, float]]:
        with translated():
            ranked = await self.client.zrevrange(self.keys.trending(segment), 0, n - 1, withscores=True)
        return [(i.decode() if isinstance(i, bytes) else i, float(sc)) for i, sc in ranked]

    async def read_rows(self, items: Sequence[str]) -> list[bytes | None]:
        with translated():
            return await self._mget([self.keys.neighbour_row(i) for i in items])

    async def read_tokens(self, partitions: int) -> list[bytes | None]:
        with translated():
            return await self._mget([self.keys.rows_published(p) for p in range(partitions)])

    async def read_model(self, name: str) -> bytes | None:
        with translated():
            return await self.client.get(self.keys.learned_model(name))

    async def read_privacy(self, partitions: int) -> list[bytes | None]:
        with translated():
            return await self._mget([self.keys.privacy(p) for p in range(partitions)])

    async def read_population(self, n_segments: int, n: int) -> dict:
        """In one round trip."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.get(k.segment_model())
        pipe.get(k.momentum())
        segments = [None, *range(n_segments)]
        for seg in segments:
            pipe.zrevrange(k.trending(seg), 0, n - 1, withscores=True)
        with translated():
            raw, raw_m, *lists = await execute(pipe)
        trending = {seg: [(i.decode() if isinstance(i, bytes) else i, float(sc)) for i, sc in ranked]
                    for seg, ranked in zip(segments, lists)}
        return population_reply(raw, raw_m, trending)

    async def _scan(self, pattern: str) -> list[str]:
        with translated():
            return [k.decode() if isinstance(k, bytes) else k
                    async for k in self.client.scan_iter(match=pattern, count=1000)]

    async def experiments(self) -> dict[str, list[str]]:
        """By SCAN (on every master of a cluster)."""
        head = self.keys.experiment("", "")[:-1]  # "{prefix}exp:"
        found: dict[str, list[str]] = {}
        for key in await self._scan(glob_escape(head) + "*"):
            name, sep, variant = key[len(head):].rpartition(":")
            if sep and name:
                found.setdefault(name, []).append(unescape(variant))
        return {k: sorted(v) for k, v in sorted(found.items())}

    async def read_experiment(self, experiment: str, variants: list[str] | None = None) -> dict[Segment, Counts]:
        if variants is None:
            variants = (await self.experiments()).get(experiment, [])
        if not variants:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for v in variants:
            pipe.hgetall(self.keys.experiment(experiment, escape(v)))
        out: dict[Segment, Counts] = {}
        with translated():
            replies = await execute(pipe)
        for v, raw in zip(variants, replies):
            out.update(parse_fields(v, raw))
        return out

    async def retention_names(self) -> list[str]:
        """By SCAN (on every master of a cluster)."""
        head = self.keys.retention("")
        return sorted({key[len(head):] for key in await self._scan(glob_escape(head) + "*") if len(key) > len(head)})

    async def read_retention(self, experiment: str) -> dict[Cohort, CohortCounts]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.retention(experiment))
        with translated():
            (raw,) = await execute(pipe)
        return {k: c for k, c in parse_cohort_fields(raw).items() if not c.is_empty()}

    # ---------------------------------------------------------------- upkeep
    async def generation(self) -> tuple[bytes, bool]:
        key = self.keys.generation()
        with translated():
            try:
                seen = await self.client.get(key)
            except ResponseError as exc:
                if is_wrong_type(exc):
                    raise WrongTypeError([key]) from None
                raise
            if seen is not None:
                return seen, False
            pipe = self.client.pipeline(transaction=False)
            pipe.set(key, secrets.token_hex(16), nx=True)
            pipe.get(key)
            return (await execute(pipe))[1], True

    async def delete_own(self, keys: list[str]) -> list[str]:
        own = [k for k in keys if k.startswith(self.keys.prefix)]
        if own:
            pipe = self.client.pipeline(transaction=False)
            self._queue_delete(pipe, own)
            with translated():
                await execute(pipe)
        return [k for k in keys if not k.startswith(self.keys.prefix)]

    async def clear(self) -> int:
        keys = await self._scan(glob_escape(self.keys.prefix) + "*")
        for i in range(0, len(keys), 1000):
            pipe = self.client.pipeline(transaction=False)
            for key in keys[i: i + 1000]:
                pipe.delete(key)
            with translated():
                await execute(pipe)
        return len(keys)

    async def ping(self) -> bool:
        with translated():
            return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
