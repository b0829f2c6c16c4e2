"""Writes the serving read model to Redis: pipelined, one round trip per batch.

Redis is the shared read model, never the only copy of state: everything here can be
rebuilt from the workers' state.

Error replies: pipelines are run by :func:`execute`, which reads every reply and then raises the first
refusal (OOM, READONLY, ...: :func:`refusal` says why, for logs and ``/health``), or
:class:`WrongTypeError` naming the keys that hold another type. Every write here sets absolute values,
so the caller retries the whole write (``Worker._redis_retrying``): a batch half written is rewritten whole.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from stream.redis_keys import RedisKeys


class WrongTypeError(ResponseError):
    """WRONGTYPE replies; ``keys`` names the keys that hold another type."""

    def __init__(self, keys: list[str]):
        super().__init__(f"WRONGTYPE at {', '.join(keys)[:500]}")
        self.keys = keys


#: error codes (the reply's first word, or words in a script's error text) -> what they mean
_REFUSALS = {"OOM": "Redis is out of memory (maxmemory with noeviction) and refuses writes",
             "READONLY": "Redis is a read-only replica (a failover?) and refuses writes",
             "MASTERDOWN": "the replica lost its primary", "LOADING": "Redis is loading its data",
             "BUSY": "Redis is busy running a script", "TRYAGAIN": "Redis asks to try again",
             "MISCONF": "Redis refuses writes after a failed save (stop-writes-on-bgsave-error)",
             "NOPERM": "the Redis user lacks a permission", "NOAUTH": "Redis asks for authentication",
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
    if name in ("EVALSHA", "EVAL"):
        keys = args[3: 3 + int(args[2])]
    elif name == "MSET":
        keys = args[1::2]
    else:
        keys = args[1:2]
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


async def execute(pipe) -> list:
    """Run ``pipe`` reading every reply, then raise: the first refusal (any error reply but WRONGTYPE), else
    :class:`WrongTypeError` naming the keys of the wrong type. (redis-py's own ``execute`` raises the first
    error, which names no key; every reply is read either way, the other commands are applied.)"""
    stack = [args for args, _options in pipe.command_stack]
    replies = await pipe.execute(raise_on_error=False)
    errors = [(args, r) for args, r in zip(stack, replies) if isinstance(r, ResponseError)]
    if not errors:
        return replies
    other = next((r for _args, r in errors if not is_wrong_type(r)), None)
    if other is not None:
        raise other
    raise WrongTypeError(list(dict.fromkeys(k for args, _r in errors for k in _command_keys(args))))


def encode_momentum(item_ids: list[str], values: list[float]) -> bytes:
    """Item ids (a JSON list) and their float64 values, for the internal ``ig:momentum`` key.

    >>> decode_momentum(encode_momentum(["a", "b"], [1.5, 0.25]))
    (['a', 'b'], [1.5, 0.25])
    """
    head = orjson.dumps(item_ids)
    return len(head).to_bytes(4, "little") + head + np.asarray(values, "<f8").tobytes()


def decode_momentum(raw: bytes) -> tuple[list[str], list[float]]:
    size = int.from_bytes(raw[:4], "little")
    return orjson.loads(raw[4: 4 + size]), np.frombuffer(raw[4 + size:], "<f8").tolist()


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


class RedisStore:
    """Batch writer for ``recs``, ``segment``, ``similar`` and ``trending`` keys (and the population
    model the user stages read back)."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, recs_ttl_s: int):
        self.client = client
        self.keys = keys
        self.recs_ttl_s = recs_ttl_s
        self._set_with_ttl = client.register_script(SET_WITH_TTL)

    async def write(self, recs: Iterable[Mapping] = (), segments: Mapping[str, int | None] | None = None,
                    similar: Mapping[str, list] | None = None, rows: Mapping[str, bytes] | None = None,
                    trending: Mapping[int | None, list[tuple[str, float]]] | None = None,
                    population: Mapping | None = None,
                    momentum: tuple[list[str], list[float]] | None = None,
                    rows_published: Mapping[int, str] | None = None) -> None:
        """Write one batch of results in a single pipeline (not a transaction). ``rows`` are written in
        one ``MSET`` with ``rows_published`` (cooc partition -> its new token), so a reader that sees a
        token sees the rows published with it."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        n = 0
        keys, values = [], []  # set with the TTL
        for doc in recs:
            keys.append(k.recs(doc["user_id"]))
            values.append(orjson.dumps(doc))
        for user_id, seg in (segments or {}).items():
            if seg is None:
                pipe.delete(k.segment(user_id))
                n += 1
            else:
                keys.append(k.segment(user_id))
                values.append(str(seg))
        for i in range(0, len(keys), SET_WITH_TTL_KEYS):
            await self._set_with_ttl(keys[i: i + SET_WITH_TTL_KEYS],
                                     [self.recs_ttl_s, *values[i: i + SET_WITH_TTL_KEYS]], client=pipe)
            n += 1
        items = {k.similar(i): orjson.dumps(neighbours) for i, neighbours in (similar or {}).items()}
        items.update((k.neighbour_row(i), row) for i, row in (rows or {}).items())
        items.update((k.rows_published(p), token) for p, token in (rows_published or {}).items())
        if items:  # one command for all of them: per-command overhead dominates thousands of small SETs
            pipe.mset(items)
            n += 1
        for seg, ranked in (trending or {}).items():
            key = k.trending(seg)
            if ranked:  # written aside then renamed: readers never see a half-written or empty set
                tmp = f"{key}:next"
                pipe.delete(tmp)
                pipe.zadd(tmp, {item: float(score) for item, score in ranked})
                pipe.rename(tmp, key)
            else:
                pipe.delete(key)
            n += 1
        if population is not None:
            pipe.set(k.segment_model(), orjson.dumps(population))
            n += 1
        if momentum is not None:
            pipe.set(k.momentum(), encode_momentum(*momentum))
            n += 1
        if n:
            await execute(pipe)

    async def read_population(self, n_segments: int, n: int) -> dict:
        """What :meth:`models.engine.Engine.load_population` takes, in one round trip: the population
        model (``model``; with ``at``, the time the scores are decayed to), the top ``n`` of each
        trending set (``trending``) and the momentum of every item (``momentum``); ``at`` is None
        before the learner has published."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.get(k.segment_model())
        pipe.get(k.momentum())
        segments = [None, *range(n_segments)]
        for seg in segments:
            pipe.zrevrange(k.trending(seg), 0, n - 1, withscores=True)
        raw, raw_m, *lists = await execute(pipe)
        model = orjson.loads(raw) if raw is not None else None
        trending = {seg: [(i.decode() if isinstance(i, bytes) else i, float(sc)) for i, sc in ranked]
                    for seg, ranked in zip(segments, lists)}
        return {"model": model, "trending": trending, "at": (model or {}).get("at"),
                "momentum": decode_momentum(raw_m) if raw_m is not None else None}

    async def delete_own(self, keys: list[str]) -> list[str]:
        """Delete those of ``keys`` under this store's prefix (to overwrite a key of the wrong type);
        returns the others, left alone."""
        own = [k for k in keys if k.startswith(self.keys.prefix)]
        if own:
            await self.client.delete(*own)
        return [k for k in keys if not k.startswith(self.keys.prefix)]

    async def erase_user(self, user_id: str) -> int:
        """Delete every key about ``user_id``; returns how many existed."""
        return await self.client.delete(*self.keys.user_keys(user_id))
