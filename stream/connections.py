"""Every Kafka and Redis connection is made here, from the settings (security included).

Kafka: ``settings.kafka_security_protocol`` PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; SASL with
``kafka_sasl_mechanism`` PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 and ``kafka_username`` / ``kafka_password``;
TLS through aiokafka's ``create_ssl_context`` (``kafka_ssl_cafile``, optional client ``kafka_ssl_certfile`` /
``kafka_ssl_keyfile`` / ``kafka_ssl_key_password``). Redis: ``redis_username`` / ``redis_password`` (an ACL user,
or the default user's ``requirepass``), TLS with ``rediss://`` and ``redis_ssl_cafile``.

The options returned by :func:`kafka_options` and :func:`redis_options` hold passwords in clear: pass them to
a client, never to a log. This module logs what it connects to and how, never a secret.

>>> from infogap.stream.settings import Settings
>>> kafka_options(Settings(kafka_bootstrap="127.0.0.1:19092"))
{'bootstrap_servers': '127.0.0.1:19092'}
>>> redis_options(Settings(redis_url="redis://127.0.0.1:6379/0"))
{}
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from urllib.parse import urlparse

import redis
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context

from infogap.stream.settings import Settings, redis_nodes

log = logging.getLogger(__name__)

_LOOPBACK = ("127.", "localhost", "::1", "[::1]")


class CredentialsRefused(RuntimeError):
    """A server answered but refused the configured credentials or TLS; the message says which setting to check."""


class MissingTopics(RuntimeError):
    """Topics a process reads or writes do not exist; the message names them and how to create them."""


class _RedactSaslExchange(logging.Filter):
    """aiokafka logs every request and response at DEBUG, the SASL ones included: a PLAIN
    ``SaslAuthenticateRequest`` holds ``\\0user\\0password`` in clear (SCRAM ones a crackable proof). Replace
    those arguments before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(type(a).__name__.startswith("SaslAuthenticate") for a in args):
            record.args = tuple(f"{type(a).__name__}(<redacted>)" if type(a).__name__.startswith("SaslAuthenticate")
                                else a for a in args)
        return True


_REDACT = _RedactSaslExchange()
logging.getLogger("aiokafka.conn").addFilter(_REDACT)  # idempotent: addFilter ignores a filter it already has


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of SSL / SASL_SSL connections (hostname checked; system CAs when no CA file is set)."""
    key_pw = settings.kafka_ssl_key_password
    return create_ssl_context(
        cafile=settings.kafka_ssl_cafile and str(settings.kafka_ssl_cafile.expanduser()),
        certfile=settings.kafka_ssl_certfile and str(settings.kafka_ssl_certfile.expanduser()),
        keyfile=settings.kafka_ssl_keyfile and str(settings.kafka_ssl_keyfile.expanduser()),
        password=key_pw.get_secret_value() if key_pw is not None else None)


def kafka_options(settings: Settings) -> dict:
    """Connection keyword arguments shared by every aiokafka client (they may hold a password: never log them)."""
    opts: dict = {"bootstrap_servers": settings.kafka_bootstrap}
    proto = settings.kafka_security_protocol
    if proto == "PLAINTEXT":
        return opts
    opts["security_protocol"] = proto
    if proto in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = kafka_ssl_context(settings)
    if proto in ("SASL_PLAINTEXT", "SASL_SSL"):
        if not settings.kafka_username or settings.kafka_password is None:  # (a model_copy skips validation)
            raise ValueError(f"{proto} needs INFOGAP_KAFKA_USERNAME and INFOGAP_KAFKA_PASSWORD")
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_username
        opts["sasl_plain_password"] = settings.kafka_password.get_secret_value()
        if proto == "SASL_PLAINTEXT" and settings.kafka_sasl_mechanism == "PLAIN" and not all(
                part.strip().startswith(_LOOPBACK) for part in settings.kafka_bootstrap.split(",")):
            log.warning("Kafka SASL PLAIN over SASL_PLAINTEXT sends the password unencrypted to %s; "
                        "use SASL_SSL off loopback", settings.kafka_bootstrap)
    return opts


def _describe_kafka(settings: Settings) -> str:
    s = settings
    auth = f" sasl={s.kafka_sasl_mechanism} user={s.kafka_username}" if s.kafka_security_protocol.startswith(
        "SASL") else ""
    return f"{s.kafka_bootstrap} ({s.kafka_security_protocol}{auth})"


def producer(settings: Settings, **kwargs) -> AIOKafkaProducer:
    log.debug("kafka producer for %s", _describe_kafka(settings))
    return AIOKafkaProducer(**kafka_options(settings), **kwargs)


def consumer(settings: Settings, *topics: str, **kwargs) -> AIOKafkaConsumer:
    log.debug("kafka consumer for %s", _describe_kafka(settings))
    return AIOKafkaConsumer(*topics, **kafka_options(settings), **kwargs)


def admin(settings: Settings, **kwargs) -> AIOKafkaAdminClient:
    log.debug("kafka admin client for %s", _describe_kafka(settings))
    return AIOKafkaAdminClient(**kafka_options(settings), **kwargs)


def redis_options(settings: Settings) -> dict:
    """Keyword arguments for ``Redis.from_url(settings.redis_url, ...)``: credentials and TLS (never log them).

    Credentials written inside ``INFOGAP_REDIS_URL`` were moved to ``redis_username`` / ``redis_password`` by
    the settings, so ``settings.redis_url`` itself carries no secret.
    """
    s = settings
    opts: dict = {}
    if s.redis_username:
        opts["username"] = s.redis_username
    if s.redis_password is not None:
        opts["password"] = s.redis_password.get_secret_value()
    if urlparse(s.redis_url).scheme in ("rediss", "rediss+cluster"):
        if s.redis_cluster:
            opts["ssl"] = True
        opts["ssl_cert_reqs"] = "required"
        if s.redis_ssl_cafile is not None:
            opts["ssl_ca_certs"] = str(s.redis_ssl_cafile.expanduser())
        if s.redis_ssl_certfile is not None:
            opts["ssl_certfile"] = str(s.redis_ssl_certfile.expanduser())
        if s.redis_ssl_keyfile is not None:
            opts["ssl_keyfile"] = str(s.redis_ssl_keyfile.expanduser())
    return opts


def _describe_redis(settings: Settings) -> str:
    s = settings
    auth = "password" if s.redis_password is not None else "no auth"
    return f"{s.redis_url} ({auth}{', user ' + s.redis_username if s.redis_username else ''})"


def redis_async(settings: Settings, **kwargs) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio client: a ``RedisCluster`` for a ``redis+cluster://`` URL (its nodes are where it starts
    to learn the cluster's layout), else a ``Redis``."""
    log.debug("redis (asyncio) client for %s", _describe_redis(settings))
    opts = {**redis_options(settings), **kwargs}
    if settings.redis_cluster:
        from redis.asyncio.cluster import ClusterNode

        return aioredis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_nodes(settings.redis_url)],
                                     **opts)
    return aioredis.Redis.from_url(settings.redis_url, **opts)


def redis_sync(settings: Settings, **kwargs) -> redis.Redis | redis.RedisCluster:
    """A blocking client (``RedisCluster`` for a ``redis+cluster://`` URL)."""
    log.debug("redis client for %s", _describe_redis(settings))
    opts = {**redis_options(settings), **kwargs}
    if settings.redis_cluster:
        from redis.cluster import ClusterNode

        return redis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_nodes(settings.redis_url)],
                                  **opts)
    return redis.Redis.from_url(settings.redis_url, **opts)


async def check_kafka(settings: Settings, timeout_s: float = 10.0) -> None:
    """Open one connection to a bootstrap server with the configured security (TLS handshake, SASL login).

    aiokafka reports a refused login only as ``KafkaConnectionError: Unable to bootstrap``; call this first
    (the worker does at start) to fail with the broker's own reason instead. Raises :class:`CredentialsRefused`
    when a broker refuses the credentials or the TLS handshake, ``ConnectionError`` when none answers.
    """
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaError, SaslAuthenticationFailed, UnsupportedSaslMechanismError
    from aiokafka.protocol.metadata import MetadataRequest

    opts = kafka_options(settings)
    opts.pop("bootstrap_servers")
    last: BaseException | None = None
    for part in settings.kafka_bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        host = host.strip("[]")
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(host, int(port), client_id="infogap-check",
                                         request_timeout_ms=int(timeout_s * 1000), **opts)
        except (SaslAuthenticationFailed, UnsupportedSaslMechanismError) as exc:
            raise CredentialsRefused(
                f"Kafka at {host}:{port} refused the login of {_describe_kafka(settings)}: {exc}; check "
                f"INFOGAP_KAFKA_USERNAME, INFOGAP_KAFKA_PASSWORD and INFOGAP_KAFKA_SASL_MECHANISM") from None
        except ssl.SSLError as exc:
            raise CredentialsRefused(
                f"TLS handshake with Kafka at {host}:{port} failed ({exc.reason or exc}); check "
                f"INFOGAP_KAFKA_SECURITY_PROTOCOL and INFOGAP_KAFKA_SSL_CAFILE / _CERTFILE / _KEYFILE") from None
        except (OSError, KafkaError, TimeoutError) as exc:
            last = exc
            continue
        try:  # a listener that wants SASL or TLS accepts the TCP connection and drops it at the first request
            async with asyncio.timeout(timeout_s):
                await conn.send(MetadataRequest([]))
            return
        except (OSError, KafkaError, TimeoutError) as exc:
            raise CredentialsRefused(
                f"Kafka at {host}:{port} accepted a {settings.kafka_security_protocol} connection but dropped it at "
                f"the first request ({exc!r}); it probably expects another INFOGAP_KAFKA_SECURITY_PROTOCOL") from None
        finally:
            conn.close()
    raise ConnectionError(f"no Kafka bootstrap server at {settings.kafka_bootstrap} answered "
                          f"({settings.kafka_security_protocol}): {last!r}")


async def check_redis(settings: Settings, timeout_s: float = 5.0) -> None:
    """PING Redis with the configured credentials and TLS.

    Raises :class:`CredentialsRefused` when Redis refuses them (redis-py's ``AuthenticationError`` is a
    ``ConnectionError``, which a retry loop would otherwise retry forever), ``ConnectionError`` when Redis
    does not answer.
    """
    from redis.exceptions import (AuthenticationError, AuthenticationWrongNumberOfArgsError, ResponseError,
                                  TimeoutError as RedisTimeoutError)
    from redis.exceptions import ConnectionError as RedisConnectionError, RedisClusterException

    client = redis_async(settings, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        await client.ping()
    except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
        raise CredentialsRefused(f"Redis at {_describe_redis(settings)} refused the login: {exc}; check "
                                 f"INFOGAP_REDIS_USERNAME and INFOGAP_REDIS_PASSWORD (or the URL)") from None
    except ResponseError as exc:
        if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
            raise CredentialsRefused(f"Redis at {_describe_redis(settings)} needs other credentials: {exc}; set "
                                     f"INFOGAP_REDIS_PASSWORD (and INFOGAP_REDIS_USERNAME for an ACL user)") from None
        raise
    except (RedisConnectionError, RedisTimeoutError) as exc:
        if isinstance(exc.__context__, ssl.SSLError) or "SSL" in str(exc):
            raise CredentialsRefused(f"TLS handshake with Redis at {settings.redis_url} failed ({exc}); check "
                                     f"INFOGAP_REDIS_SSL_CAFILE / _CERTFILE / _KEYFILE") from None
        raise ConnectionError(f"Redis at {settings.redis_url} does not answer: {exc}") from None
    except RedisClusterException as exc:  # no startup node answered, or no slot is covered
        raise ConnectionError(f"Redis Cluster at {settings.redis_url} does not answer: {exc}") from None
    except ssl.SSLError as exc:
        raise CredentialsRefused(f"TLS handshake with Redis at {settings.redis_url} failed ({exc.reason or exc}); "
                                 f"check INFOGAP_REDIS_SSL_CAFILE / _CERTFILE / _KEYFILE") from None
    finally:
        await client.aclose()


async def check(settings: Settings) -> None:
    """:func:`check_kafka` and :func:`check_redis`: call once when a process starts, before its clients."""
    await asyncio.gather(check_kafka(settings), check_redis(settings))


_ENV_FIELDS = ("kafka_bootstrap", "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_username",
               "kafka_password", "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile",
               "kafka_ssl_key_password", "redis_url", "redis_username", "redis_password", "redis_ssl_cafile",
               "redis_ssl_certfile", "redis_ssl_keyfile", "pseudonym_key")


def child_env(settings: Settings) -> dict[str, str]:
    """``INFOGAP_*`` variables that make a child process connect (and pseudonymise) like ``settings``.

    For ``subprocess.Popen(env={**os.environ, **child_env(s), ...})``: the values include the secrets, so hand
    them to the child's environment only, never to a log or a command line.

    >>> child_env(Settings())["INFOGAP_KAFKA_SECURITY_PROTOCOL"]
    'PLAINTEXT'
    """
    from pydantic import SecretStr

    out = {}
    for name in _ENV_FIELDS:
        value = getattr(settings, name)
        if value is None:
            continue
        out[f"INFOGAP_{name.upper()}"] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return out


async def check_topics(producer: AIOKafkaProducer, topics: list[str], wait_s: float = 5.0) -> None:
    """Raise :class:`MissingTopics` naming those of ``topics`` the cluster does not list after ``wait_s``
    (a topic just created may take a moment to show); then ``producer`` tracks them all in its metadata.

    The broker does not create topics (``auto.create.topics.enable`` is off): a worker whose dead-letter
    topic was missing held its batch on the first bad record instead of failing at start.
    """
    topics = list(dict.fromkeys(topics))
    where = getattr(producer.client, "_bootstrap_servers", "the cluster")
    end = time.monotonic() + wait_s
    while True:
        listed = (await producer.client.fetch_all_metadata()).topics()
        missing = [t for t in topics if t not in listed]
        if not missing:
            break
        if time.monotonic() >= end:
            raise MissingTopics(
                f"Kafka topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'do' if len(missing) > 1 else 'does'} not exist at {where} (or this client may "
                f"not describe {'them' if len(missing) > 1 else 'it'}); create the topics with `infogap up` (local) or "
                f"`python -m infogap.stream.tools.local ensure-topics --replication-factor 3`, and allow the worker to describe, "
                f"read and write them")
        await asyncio.sleep(0.5)
    await asyncio.gather(*(producer.client.add_topic(t) for t in topics))


async def wait_partitions(consumer: AIOKafkaConsumer, topic: str, deadline_s: float = 30.0) -> set[int]:
    """The partitions of ``topic`` as soon as ``consumer`` has its metadata (a started consumer that
    subscribed to nothing knows no topic until it asks)."""
    end = time.monotonic() + deadline_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return partitions
        if time.monotonic() > end:
            raise RuntimeError(f"topic {topic!r} does not exist; run `infogap up` to create the topics")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.2)
