"""Apache Kafka (KRaft) and Redis on loopback, for development, the demo and the integration tests.

``up`` is idempotent: what already answers at ``settings.kafka_bootstrap`` / ``settings.redis_url`` is left
alone, anything missing is started from ``settings.local_dir``, and the contract topics are created.
``down`` stops only the processes ``up`` started (by pid file, after checking ``/proc/<pid>/cmdline``).

Layout of ``settings.local_dir``::

    kafka-libs/            jars copied by Maven from deploy/pom.xml (+ .fetched stamp)
    kafka/server.properties, kafka/log4j2.properties, kafka/data/, kafka/kafka.log, kafka/kafka.pid
    redis/redis.log, redis/redis.pid
    redis-cluster/<port>/redis.log, redis.pid, nodes.conf   (``cluster_up``; redis-cluster/create.log)

>>> props = server_properties(Settings(kafka_bootstrap="127.0.0.1:19092", local_dir=Path("/tmp/x")))
>>> props["listeners"], props["process.roles"]
('PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:9093', 'broker,controller')
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from infogap.stream.settings import COMPACTED_TOPICS, TOPIC_CONFIGS, TOPIC_PARTITIONS, Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

POM = Path(__file__).resolve().parents[2] / "deploy" / "pom.xml"
KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

START_TIMEOUT_S = 120.0  # both servers answering, from process start
STOP_TIMEOUT_S = 30.0  # SIGTERM -> SIGKILL
FETCH_TIMEOUT_S = 900.0  # mvn on a cold ~/.m2
TOPIC_TIMEOUT_S = 60.0

_TOPIC_ALREADY_EXISTS = 36


class LocalServerError(RuntimeError):
    """A local server could not be fetched, started, reached or stopped; the message says what to look at."""


@dataclass(frozen=True)
class Paths:
    """Where ``up`` keeps jars, configuration, data, logs and pid files."""

    root: Path

    @property
    def libs(self) -> Path:
        return self.root / "kafka-libs"

    @property
    def libs_stamp(self) -> Path:
        return self.libs / ".fetched"

    @property
    def kafka_dir(self) -> Path:
        return self.root / "kafka"

    @property
    def kafka_data(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def kafka_props(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def kafka_log4j(self) -> Path:
        return self.kafka_dir / "log4j2.properties"

    @property
    def kafka_log(self) -> Path:
        return self.kafka_dir / "kafka.log"

    @property
    def kafka_pid(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    @property
    def redis_pid(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def redis_cluster_dir(self) -> Path:
        return self.root / "redis-cluster"


def paths(settings: Settings) -> Paths:
    return Paths(Path(settings.local_dir).expanduser())


# --------------------------------------------------------------------------------------------- public API


def up(settings: Settings, *, sasl_users: Mapping[str, str] | None = None,
       redis_users: Mapping[str, str] | None = None, super_users: Collection[str] | None = None) -> None:
    """Make Kafka and Redis answer at the configured addresses and create the contract topics.

    Servers that already answer are left alone (whoever started them); missing ones are started on loopback
    from ``settings.local_dir``. Raises :class:`LocalServerError` with the log file to read if they don't come up.

    Secured servers (for tests of authentication; the default path starts neither): ``sasl_users`` (user ->
    password) makes the broker's client listener SASL_PLAINTEXT with the PLAIN mechanism, and ``settings``
    must then name one of these users (``kafka_security_protocol="SASL_PLAINTEXT"``, ``kafka_username``,
    ``kafka_password``). A Redis started here requires the settings' password (``requirepass``, or an ACL user
    for ``redis_username``); ``redis_users`` (user -> password) adds ACL users with full access. ``super_users``
    (names among ``sasl_users``) also turns on the StandardAuthorizer: only ACLs grant access, and these users
    (the settings' user among them, as ``up`` creates the topics) bypass them.
    """
    t0 = time.monotonic()
    p = paths(settings)
    kafka_ok, redis_ok = _run(_probe_both(settings))
    if not (kafka_ok and redis_ok):
        with _lock(p):  # two `up`s at once (CLI + tests, xdist workers): one starts, the other waits
            kafka_ok, redis_ok = _run(_probe_both(settings))
            started: list[str] = []
            if not kafka_ok:
                _start_kafka(settings, p, sasl_users, super_users)
                started.append("kafka")
            if not redis_ok:
                _start_redis(settings, p, redis_users)
                started.append("redis")
            _wait_until_answering(settings, p, started)
    ensure_topics(settings)
    log.info("local servers up (kafka %s, redis %s) in %.1f s",
             settings.kafka_bootstrap, settings.redis_url, time.monotonic() - t0)


def down(settings: Settings) -> None:
    """Stop the Kafka and Redis that ``up`` started from ``settings.local_dir``; anything else is left alone."""
    p = paths(settings)
    cluster_down(settings)
    _stop("redis", p.redis_pid, _is_our_redis(settings))
    _stop("kafka", p.kafka_pid, _is_our_kafka(p))


def status(settings: Settings) -> dict[str, Any]:
    """What runs and what answers: ``{"kafka": {...}, "redis": {...}, "topics": {name: partitions}}``."""
    p = paths(settings)
    kafka_ok, redis_ok = _run(_probe_both(settings))
    kpid = _live_pid(p.kafka_pid, _is_our_kafka(p))
    rpid = _live_pid(p.redis_pid, _is_our_redis(settings))
    out: dict[str, Any] = {
        "kafka": {"address": settings.kafka_bootstrap, "answering": kafka_ok, "pid": kpid,
                  "managed": kpid is not None, "log": str(p.kafka_log)},
        "redis": {"address": settings.redis_url, "answering": redis_ok, "pid": rpid,
                  "managed": rpid is not None, "log": str(p.redis_log)},
        "topics": {},
    }
    if cluster := cluster_status(settings):
        out["redis_cluster"] = cluster
    if kafka_ok:
        try:
            out["topics"] = _run(_describe_topics(settings, list(settings.topics.all().values())))
        except Exception as exc:  # noqa: BLE001 - status reports, it does not fail
            out["topics_error"] = repr(exc)
    return out


def ensure_topics(settings: Settings, *, replication_factor: int = 1) -> None:
    """Create the contract topics (``TOPIC_PARTITIONS``, prefix applied, compaction for ``COMPACTED_TOPICS``);
    existing topics are kept and only checked. ``replication_factor`` 1 suits the single local node; use 3 on a
    production cluster (``python -m infogap.stream.tools.local ensure-topics --replication-factor 3``)."""
    _run(_ensure_topics(settings, replication_factor))


def reset_topics(settings: Settings) -> None:
    """Delete the contract topics of ``settings`` (its prefix) and create them empty again."""
    _run(_delete_topics(settings))
    ensure_topics(settings)


async def _delete_topics(settings: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from infogap.stream import connections

    admin = AIOKafkaAdminClient(**connections.kafka_options(settings), client_id="infogap-local")
    await admin.start()
    try:
        names = set(settings.topics.all().values())
        existing = [t for t in await admin.list_topics() if t in names]
        if existing:
            await admin.delete_topics(existing)
        deadline = time.monotonic() + TOPIC_TIMEOUT_S
        while names & set(await admin.list_topics()):
            if time.monotonic() > deadline:
                raise LocalServerError(f"topics {sorted(names)} were not deleted within {TOPIC_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def fetch_kafka_jars(settings: Settings, *, force: bool = False) -> Path:
    """Copy the Kafka jars of ``deploy/pom.xml`` into ``<local_dir>/kafka-libs`` (once per pom version)."""
    p = paths(settings)
    if not POM.is_file():
        raise LocalServerError(f"{POM} not found: run from a checkout of infogap (pip install -e .)")
    stamp = hashlib.sha256(POM.read_bytes()).hexdigest()
    if not force and p.libs_stamp.is_file() and p.libs_stamp.read_text().strip() == stamp:
        return p.libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalServerError("Maven (mvn) is not on PATH; install it (apt-get install -y maven) "
                               "or run deploy/install.sh")
    if p.libs.is_symlink():
        p.libs.unlink()
    elif p.libs.exists():
        shutil.rmtree(p.libs)
    p.libs.mkdir(parents=True)
    cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={p.libs}"]
    if settings.maven_repo is not None:
        cmd.append(f"-Dmaven.repo.local={Path(settings.maven_repo).expanduser()}")
    log.info("fetching Kafka jars: %s", " ".join(cmd))
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LocalServerError(f"mvn did not finish within {FETCH_TIMEOUT_S:.0f} s: {' '.join(cmd)}") from exc
    if res.returncode != 0 or not any(p.libs.glob("kafka_2.13-*.jar")):
        tail = (res.stdout + res.stderr)[-3000:]
        raise LocalServerError(f"mvn failed (exit {res.returncode}) fetching Kafka jars: {' '.join(cmd)}\n{tail}")
    p.libs_stamp.write_text(stamp + "\n")
    log.info("Kafka jars in %s (%.1f s)", p.libs, time.monotonic() - t0)
    return p.libs


def server_properties(settings: Settings, *, sasl_users: Mapping[str, str] | None = None,
                      super_users: Collection[str] | None = None) -> dict[str, str]:
    """The KRaft configuration of the single combined broker+controller node.

    With ``sasl_users`` (user -> password) the client listener is SASL_PLAINTEXT with the PLAIN mechanism
    (users in ``listener.name.sasl_plaintext.plain.sasl.jaas.config``), and the broker authenticates to itself
    and to its controller as :data:`BROKER_USER` with a random password made here; no listener is left
    unauthenticated.

    With ``super_users`` as well (names among ``sasl_users``), the node runs the KRaft StandardAuthorizer: what
    no ACL allows is denied (``allow.everyone.if.no.acl.found=false``), except to these users and the broker.
    """
    props = _plain_properties(settings)
    if sasl_users is None:
        if super_users is not None:
            raise LocalServerError("super_users (an authorizer) needs sasl_users: ACLs name authenticated users")
        return props
    props = {**props, **_sasl_properties(settings, sasl_users)}
    if super_users is not None:
        unknown = [u for u in super_users if u not in sasl_users]
        if unknown:
            raise LocalServerError(f"super user(s) {', '.join(unknown)} not among sasl_users")
        props.update({"authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                      "allow.everyone.if.no.acl.found": "false",
                      "super.users": ";".join(f"User:{u}" for u in (BROKER_USER, *super_users))})
    return props


#: the user the broker authenticates as to itself and to the controller, when SASL is on
BROKER_USER = "infogap-broker"
_SASL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _sasl_properties(settings: Settings, sasl_users: Mapping[str, str]) -> dict[str, str]:
    if not sasl_users:
        raise LocalServerError("sasl_users is empty: give at least one user -> password")
    for user, password in sasl_users.items():
        if not _SASL_NAME.fullmatch(user) or user == BROKER_USER:
            raise LocalServerError(f"SASL user name {user!r} must be 1-64 of A-Z a-z 0-9 _ - and not {BROKER_USER}")
        if not password or any(c in password for c in '"\\;') or not password.isprintable():
            raise LocalServerError(f"the password of SASL user {user!r} must be non-empty printable text "
                                   f"without quotes, backslashes or semicolons")
    broker_pw = secrets.token_hex(24)  # the broker's own password: new at every start, known to nobody else
    users = {BROKER_USER: broker_pw, **sasl_users}
    jaas = ("org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{BROKER_USER}" password="{broker_pw}" '
            + " ".join(f'user_{u}="{pw}"' for u, pw in users.items()) + ";")
    host, port, cport = settings.kafka_host, settings.kafka_port, settings.kafka_controller_port
    return {
        "listeners": f"SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "advertised.listeners": f"SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
        "listener.name.controller.plain.sasl.jaas.config": jaas,
    }


def _plain_properties(settings: Settings) -> dict[str, str]:
    p = paths(settings)
    host, port, cport = settings.kafka_host, settings.kafka_port, settings.kafka_controller_port
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{cport}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(p.kafka_data),
        "num.partitions": "6",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "12",  # default 50 makes the first consumer group slow to start
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "6",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": "168",
        "log.segment.bytes": str(256 * 1024 * 1024),
        "num.io.threads": "4",
        "num.network.threads": "3",
        "delete.topic.enable": "true",
    }


# --------------------------------------------------------------------------------------------- probes


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    th = threading.Thread(target=target, name="infogap-local", daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def _kafka_answers(settings: Settings, timeout: float = 5.0) -> bool:
    """True when a metadata request returns at least one registered broker."""
    if not _tcp_open(settings.kafka_host, settings.kafka_port):
        return False
    from aiokafka.admin import AIOKafkaAdminClient

    from infogap.stream import connections

    admin = AIOKafkaAdminClient(**connections.kafka_options(settings), client_id="infogap-local",
                                request_timeout_ms=int(timeout * 1000))
    try:
        async with asyncio.timeout(timeout):
            if settings.kafka_security_protocol != "PLAINTEXT":
                await connections.check_kafka(settings, timeout)  # a refused login is an error, not "down"
            await admin.start()
            cluster = await admin.describe_cluster()
        return bool(cluster.get("brokers"))
    except connections.CredentialsRefused as exc:
        raise LocalServerError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - "not answering" is the answer
        log.debug("kafka at %s not answering: %r", settings.kafka_bootstrap, exc)
        return False
    finally:
        await admin.close()


async def _redis_answers(settings: Settings, timeout: float = 2.0) -> bool:
    if urlparse(settings.redis_url).scheme != "unix" and not _tcp_open(settings.redis_host, settings.redis_port):
        return False
    from infogap.stream import connections

    try:
        await connections.check_redis(settings, timeout)
        return True
    except connections.CredentialsRefused as exc:
        raise LocalServerError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        log.debug("redis at %s not answering: %r", settings.redis_url, exc)
        return False


async def _probe_both(settings: Settings) -> tuple[bool, bool]:
    k, r = await asyncio.gather(_kafka_answers(settings), _redis_answers(settings))
    return k, r


# --------------------------------------------------------------------------------------------- processes


@contextlib.contextmanager
def _lock(p: Paths) -> Iterator[None]:
    p.root.mkdir(parents=True, exist_ok=True)
    with open(p.root / ".up.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _is_our_kafka(p: Paths):
    props = str(p.kafka_props)

    def check(argv: list[str]) -> bool:
        return bool(argv) and os.path.basename(argv[0]) == "java" and KAFKA_MAIN in argv and props in argv

    return check


def _is_our_redis(settings: Settings):
    return _is_redis_on(settings.redis_port)


def _is_redis_on(redis_port: int):
    # as started: redis-server --bind H --port P ...; once running, redis rewrites it to "redis-server H:P"
    port = str(redis_port)

    def check(argv: list[str]) -> bool:
        if not argv or "redis-server" not in os.path.basename(argv[0].split()[0]):
            return False
        words = " ".join(argv).split()
        return any(w.endswith(f":{port}") for w in words) or any(
            a == "--port" and b == port for a, b in zip(words, words[1:]))

    return check


def _live_pid(pid_file: Path, is_ours) -> int | None:
    """The pid in ``pid_file`` if that process still runs and still is the server we started."""
    pid = _read_pid(pid_file)
    if pid is None or _is_zombie(pid) or not is_ours(_cmdline(pid)):
        return None
    return pid


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _gone(pid: int) -> bool:
    _reap(pid)
    return not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _stop(name: str, pid_file: Path, is_ours) -> None:
    pid = _read_pid(pid_file)
    if pid is None:
        log.info("%s: no pid file at %s, nothing to stop", name, pid_file)
        return
    if _gone(pid) or not is_ours(_cmdline(pid)):
        log.info("%s: pid %d from %s is not running (or is no longer ours); leaving it alone", name, pid, pid_file)
        pid_file.unlink(missing_ok=True)
        return
    log.info("%s: stopping pid %d", name, pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and not _gone(pid):
        time.sleep(0.1)
    if not _gone(pid):
        log.warning("%s: pid %d ignored SIGTERM for %.0f s; sending SIGKILL", name, pid, STOP_TIMEOUT_S)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not _gone(pid):
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    log.info("%s: stopped", name)


def _spawn(cmd: list[str], log_file: Path, pid_file: Path, cwd: Path) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd, start_new_session=True, close_fds=True)
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _require_loopback(what: str, host: str, address: str) -> None:
    if host not in LOOPBACK:
        raise LocalServerError(f"{what} at {address} does not answer, and infogap only starts servers on "
                               f"loopback (127.0.0.1); start it yourself or point the settings at a local address")


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise LocalServerError("java is not on PATH; Kafka 4.3 needs Java 17+ (apt-get install -y openjdk-17-jre-headless)")
    return java


def _write_kafka_config(settings: Settings, p: Paths, sasl_users: Mapping[str, str] | None = None,
                        super_users: Collection[str] | None = None) -> None:
    p.kafka_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# written by infogap (stream/tools/local.py); edits are overwritten by `infogap up`"]
    lines += [f"{k}={v}" for k, v in server_properties(settings, sasl_users=sasl_users,
                                                        super_users=super_users).items()]
    _write_private(p.kafka_props, "\n".join(lines) + "\n")
    p.kafka_log4j.write_text(
        "# written by infogap (stream/tools/local.py)\n"
        "status = warn\n"
        "shutdownHook = disable\n"  # else log4j stops before Kafka has logged its controlled shutdown
        "appender.console.type = Console\n"
        "appender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.stdout.ref = STDOUT\n"
        "logger.statechange.name = state.change.logger\n"
        "logger.statechange.level = WARN\n"
        "logger.request.name = kafka.request.logger\n"
        "logger.request.level = WARN\n"
        "logger.clients.name = org.apache.kafka.clients\n"
        "logger.clients.level = WARN\n"
    )


def _new_cluster_id() -> str:
    while True:  # Kafka's Uuid.randomUuid() also avoids ids that start with '-' (they look like CLI flags)
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _format_storage(settings: Settings, p: Paths) -> None:
    if (p.kafka_data / "meta.properties").is_file():
        return
    cid = _new_cluster_id()
    cmd = [_java(), "-Xmx256m", f"-Dlog4j2.configurationFile={p.kafka_log4j}", "-cp", f"{p.libs}/*",
           STORAGE_TOOL, "format", "--standalone", "--ignore-formatted", "-t", cid, "-c", str(p.kafka_props)]
    log.info("formatting Kafka storage in %s (cluster id %s)", p.kafka_data, cid)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    with open(p.kafka_log, "a") as out:
        out.write(f"\n===== format: {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        raise LocalServerError(f"Kafka storage format failed (exit {res.returncode}); see {p.kafka_log}:\n"
                               f"{(res.stdout + res.stderr)[-2000:]}")


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _start_kafka(settings: Settings, p: Paths, sasl_users: Mapping[str, str] | None = None,
                 super_users: Collection[str] | None = None) -> None:
    if _live_pid(p.kafka_pid, _is_our_kafka(p)) is not None:
        log.info("kafka: pid %s is starting already; waiting for it", _read_pid(p.kafka_pid))
        return
    _require_loopback("Kafka", settings.kafka_host, settings.kafka_bootstrap)
    if _tcp_open(settings.kafka_host, settings.kafka_port):
        raise LocalServerError(f"port {settings.kafka_port} is taken by something that is not a Kafka broker; "
                               f"free it or set INFOGAP_KAFKA_BOOTSTRAP to another port")
    if sasl_users is not None:
        s = settings
        if (s.kafka_security_protocol != "SASL_PLAINTEXT" or s.kafka_sasl_mechanism != "PLAIN"
                or s.kafka_username not in sasl_users or s.kafka_password is None
                or sasl_users[s.kafka_username] != s.kafka_password.get_secret_value()):
            raise LocalServerError("a broker started with sasl_users is checked with the settings' credentials: "
                                   "set kafka_security_protocol=SASL_PLAINTEXT, kafka_sasl_mechanism=PLAIN and "
                                   "kafka_username / kafka_password to one of sasl_users")
    elif settings.kafka_security_protocol != "PLAINTEXT":
        raise LocalServerError(f"Kafka at {settings.kafka_bootstrap} does not answer, and infogap starts a local "
                               f"broker with {settings.kafka_security_protocol} only for tests (sasl_users); "
                               f"start it yourself or unset INFOGAP_KAFKA_SECURITY_PROTOCOL")
    java = _java()
    fetch_kafka_jars(settings)
    _write_kafka_config(settings, p, sasl_users, super_users)
    p.kafka_data.mkdir(parents=True, exist_ok=True)
    _format_storage(settings, p)
    cmd = [java, f"-Xmx{settings.kafka_heap}", f"-Xms{settings.kafka_heap}", "-XX:+UseG1GC",
           "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={p.kafka_log4j}", f"-Dkafka.logs.dir={p.kafka_dir}",
           "-cp", f"{p.libs}/*", KAFKA_MAIN, str(p.kafka_props)]
    pid = _spawn(cmd, p.kafka_log, p.kafka_pid, p.kafka_dir)
    log.info("kafka: started pid %d on %s (log %s)", pid, settings.kafka_bootstrap, p.kafka_log)


def _redis_acl_line(user: str, password: str) -> str:
    """An ACL rule with full access that stores only the SHA-256 of the password (no secret on disk or argv)."""
    if not _SASL_NAME.fullmatch(user):
        raise LocalServerError(f"Redis user name {user!r} must be 1-64 of A-Z a-z 0-9 _ -")
    if not password:
        raise LocalServerError(f"the password of Redis user {user!r} is empty")
    return f"user {user} reset on #{hashlib.sha256(password.encode()).hexdigest()} ~* &* +@all"


def _start_redis(settings: Settings, p: Paths, redis_users: Mapping[str, str] | None = None) -> None:
    if _live_pid(p.redis_pid, _is_our_redis(settings)) is not None:
        log.info("redis: pid %s is starting already; waiting for it", _read_pid(p.redis_pid))
        return
    url = urlparse(settings.redis_url)
    if url.scheme != "redis":
        cluster = url.scheme.endswith("+cluster")
        hint = "; start a local cluster with `infogap up --redis-cluster 3`" if cluster else ""
        raise LocalServerError(f"redis at {settings.redis_url} does not answer; infogap only starts a local "
                               f"redis for redis:// URLs{hint}")
    _require_loopback("Redis", settings.redis_host, settings.redis_url)
    if _tcp_open(settings.redis_host, settings.redis_port):
        raise LocalServerError(f"port {settings.redis_port} is taken by something that does not answer Redis PING; "
                               f"free it or set INFOGAP_REDIS_URL to another port")
    exe = shutil.which("redis-server")
    if exe is None:
        raise LocalServerError("redis-server is not on PATH; apt-get install -y redis-server (or deploy/install.sh)")
    p.redis_dir.mkdir(parents=True, exist_ok=True)
    acl = {user: pw for user, pw in (redis_users or {}).items()}
    if settings.redis_password is not None:  # the settings' own credentials always work
        acl[settings.redis_username or "default"] = settings.redis_password.get_secret_value()
    elif settings.redis_username:
        raise LocalServerError("redis_username without redis_password")
    cmd = [exe]
    if acl:  # passwords (as hashes) in a private config file, never on the command line or in the log
        conf = p.redis_dir / "acl.conf"
        _write_private(conf, "# written by infogap (stream/tools/local.py)\n"
                       + "".join(_redis_acl_line(u, pw) + "\n" for u, pw in acl.items()))
        cmd.append(str(conf))
    cmd += ["--bind", settings.redis_host, "--port", str(settings.redis_port), "--protected-mode", "yes",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(p.redis_dir),
            "--loglevel", "notice"]
    pid = _spawn(cmd, p.redis_log, p.redis_pid, p.redis_dir)
    log.info("redis: started pid %d on %s:%d (log %s)", pid, settings.redis_host, settings.redis_port, p.redis_log)


def _wait_until_answering(settings: Settings, p: Paths, started: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = {"kafka": "kafka" in started, "redis": "redis" in started}
    checks = {
        "kafka": (lambda: _run(_kafka_answers(settings, timeout=3.0)), p.kafka_pid, _is_our_kafka(p), p.kafka_log),
        "redis": (lambda: _run(_redis_answers(settings)), p.redis_pid, _is_our_redis(settings), p.redis_log),
    }
    while any(waiting.values()):
        for name, pending in waiting.items():
            if not pending:
                continue
            answers, pid_file, is_ours, log_file = checks[name]
            if answers():
                waiting[name] = False
                log.info("%s: answering", name)
            elif (pid := _read_pid(pid_file)) is None or _gone(pid):
                # (not _live_pid: right after the fork /proc/<pid>/cmdline can still be empty for a moment)
                raise LocalServerError(f"{name} exited during startup; see {log_file}:\n{_tail(log_file)}")
        if not any(waiting.values()):
            break
        if time.monotonic() > deadline:
            late = [n for n, w in waiting.items() if w]
            logs = ", ".join(str(checks[n][3]) for n in late)
            raise LocalServerError(f"{' and '.join(late)} did not answer within {START_TIMEOUT_S:.0f} s; see {logs}")
        time.sleep(0.25)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------- redis cluster

CLUSTER_HOST = "127.0.0.1"
CLUSTER_SCHEME = "redis+cluster"
CLUSTER_SLOTS = 16384
CLUSTER_TIMEOUT_S = 60.0  # nodes answering, created, every node ok and every replica in sync
CLUSTER_GRACE_S = 5.0  # a running cluster that is not healthy gets this long to become so before a restart

RedisAuth = tuple[str | None, str | None]  # (username, password)


def cluster_up(settings: Settings, masters: int = 3, replicas: int = 1, base_port: int = 7100) -> str:
    """Make a Redis Cluster of ``masters`` masters with ``replicas`` replicas each answer on 127.0.0.1, ports
    ``base_port``..; return its URL ``redis+cluster://`` + the masters' addresses.

    A healthy cluster of that shape started here before is kept; nodes of a broken or different one are stopped
    and started afresh (empty). The nodes require the settings' Redis credentials, like the single Redis of ``up``.
    """
    if masters < 3 or replicas < 0:
        raise LocalServerError(f"a Redis Cluster needs at least 3 masters (redis-cli --cluster create); "
                               f"got {masters} masters, {replicas} replicas")
    t0 = time.monotonic()
    p = paths(settings)
    ports = list(range(base_port, base_port + masters * (1 + replicas)))
    auth = _redis_auth(settings)
    if (url := _healthy_cluster_url(p, ports, masters, replicas, auth, grace_s=CLUSTER_GRACE_S)) is not None:
        return url
    with _lock(p):  # as in `up`: of two callers at once, one starts the cluster, the other waits and keeps it
        if (url := _healthy_cluster_url(p, ports, masters, replicas, auth)) is not None:
            return url
        log.info("redis cluster: starting %d nodes on ports %d-%d afresh", len(ports), ports[0], ports[-1])
        _stop_cluster_nodes(p, wipe=True)
        _start_cluster_nodes(p, ports, auth)
        _wait_for_cluster(p, ports, lambda: next((f"node {port} does not answer" for port in ports
                                                  if not _cluster_node_answers(port, auth)), None))
        _create_cluster(p, ports, replicas, auth)
        _wait_for_cluster(p, ports, lambda: _cluster_problem(ports, masters, replicas, auth))
        url = cluster_url(_master_ports(ports, auth))
    log.info("redis cluster up at %s in %.1f s", url, time.monotonic() - t0)
    return url


def cluster_down(settings: Settings) -> None:
    """Stop the Redis Cluster nodes that ``cluster_up`` started from ``settings.local_dir``."""
    _stop_cluster_nodes(paths(settings), wipe=False)


def cluster_status(settings: Settings) -> dict[str, Any] | None:
    """``{"url", "nodes": [{"port", "pid", "role", "cluster_state", "log"}]}`` of the cluster started here;
    None without one."""
    nodes = {port: d for port, d in _cluster_node_dirs(paths(settings)).items() if (d / "redis.pid").exists()}
    if not nodes:
        return None
    auth = _redis_auth(settings)
    out: dict[str, Any] = {"url": None, "nodes": []}
    for port, d in nodes.items():
        entry: dict[str, Any] = {"port": port, "pid": _live_pid(d / "redis.pid", _is_redis_on(port)), "role": None,
                                 "cluster_state": None, "log": str(d / "redis.log")}
        with contextlib.suppress(Exception), _redis_node(port, auth) as r:
            entry["role"] = r.info("replication")["role"]
            entry["cluster_state"] = r.execute_command("CLUSTER INFO")["cluster_state"]
        out["nodes"].append(entry)
    with contextlib.suppress(Exception):
        out["url"] = cluster_url(_master_ports(list(nodes), auth))
    return out


def cluster_failover(url_or_ports: str | Iterable[int], master_port: int, *, settings: Settings | None = None) -> int:
    """Promote a replica of the master at ``master_port`` with CLUSTER FAILOVER (coordinated: no write is lost);
    return its port once it is a master, the old master its replica and every node reports ``cluster_state:ok``.
    ``settings`` gives the credentials, if the cluster has any."""
    auth = _redis_auth(settings) if settings is not None else (None, None)
    nodes = _cluster_nodes_from(cluster_ports(url_or_ports), auth)
    master = next((n for n in nodes if n["port"] == master_port), None)
    if master is None or "master" not in master["flags"]:
        raise LocalServerError(f"no master at port {master_port} in the cluster (nodes: "
                               f"{sorted((n['port'], sorted(n['flags'])) for n in nodes)})")
    candidates = sorted(n["port"] for n in nodes if n["master"] == master["id"] and not n["flags"] & {"fail", "fail?"})
    in_sync = [port for port in candidates if _replication(port, auth).get("master_link_status") == "up"]
    if not in_sync:
        raise LocalServerError(f"the master at {master_port} has no replica in sync (replicas: {candidates})")
    new = in_sync[0]
    with _redis_node(new, auth) as r:
        r.execute_command("CLUSTER FAILOVER")
    ports = [n["port"] for n in nodes]
    _wait_for_cluster(None, ports, lambda: _failover_problem(ports, new, master_port, auth))
    log.info("redis cluster: %d took over from %d", new, master_port)
    return new


def cluster_url(ports: Iterable[int], host: str = CLUSTER_HOST) -> str:
    """The ``redis+cluster://`` URL naming nodes by port.

    >>> cluster_url([7100, 7101])
    'redis+cluster://127.0.0.1:7100,127.0.0.1:7101'
    """
    return f"{CLUSTER_SCHEME}://" + ",".join(f"{host}:{port}" for port in ports)


def cluster_ports(url_or_ports: str | Iterable[int]) -> list[int]:
    """The ports of a ``redis+cluster://`` URL of loopback nodes (ports given as such are returned as a list).

    >>> cluster_ports("redis+cluster://127.0.0.1:7100,127.0.0.1:7101")
    [7100, 7101]
    """
    if not isinstance(url_or_ports, str):
        return [int(port) for port in url_or_ports]
    scheme, sep, rest = url_or_ports.partition("://")
    ports = []
    for address in rest.split("/", 1)[0].split(",") if scheme == CLUSTER_SCHEME and sep else ():
        host, _, port = address.strip().rpartition(":")
        if host.strip("[]") not in LOOPBACK or not port.isdigit():
            ports = []
            break
        ports.append(int(port))
    if not ports:  # (the URL itself is not repeated: it may hold a password)
        raise LocalServerError(f"expected {CLUSTER_SCHEME}://127.0.0.1:PORT[,127.0.0.1:PORT...] of local nodes")
    return ports


def cluster_node_command(exe: str, port: int, node_dir: Path, conf: Path | None = None) -> list[str]:
    """The ``redis-server`` command line of one node; ``conf`` is the private file with its credentials."""
    return [exe, *([str(conf)] if conf is not None else []),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
            "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0",  # default: replicas wait 5 s
            "--bind", CLUSTER_HOST, "--port", str(port),
            "--protected-mode", "yes", "--daemonize", "no", "--dir", str(node_dir),
            "--logfile", str(node_dir / "redis.log"), "--loglevel", "notice"]


def cluster_create_command(cli: str, ports: list[int], replicas: int, user: str | None = None) -> list[str]:
    """``redis-cli --cluster create``; the password goes in ``REDISCLI_AUTH``, never on the command line."""
    return [cli, *(["--user", user] if user else []), "--cluster", "create",
            *(f"{CLUSTER_HOST}:{port}" for port in ports), "--cluster-replicas", str(replicas), "--cluster-yes"]


def parse_cluster_nodes(text: str) -> list[dict[str, Any]]:
    """CLUSTER NODES as ``[{"id", "port", "flags": set, "master": id | None, "connected": bool, "slots": n}]``."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        slots = 0
        for part in fields[8:]:
            if not part.startswith("["):  # [slot->-id] / [slot-<-id]: a slot being migrated
                lo, _, hi = part.partition("-")
                slots += int(hi or lo) - int(lo) + 1
        nodes.append({"id": fields[0], "port": int(fields[1].split("@")[0].rpartition(":")[2]),
                      "flags": set(fields[2].split(",")), "master": None if fields[3] == "-" else fields[3],
                      "connected": fields[7] == "connected", "slots": slots})
    return nodes


def _redis_auth(settings: Settings) -> RedisAuth:
    if settings.redis_username and settings.redis_password is None:
        raise LocalServerError("redis_username without redis_password")
    password = settings.redis_password.get_secret_value() if settings.redis_password is not None else None
    return settings.redis_username, password


def _redis_node(port: int, auth: RedisAuth):
    import redis

    return redis.Redis(host=CLUSTER_HOST, port=port, username=auth[0], password=auth[1], decode_responses=True,
                       socket_timeout=2.0, socket_connect_timeout=1.0)


def _replication(port: int, auth: RedisAuth) -> dict[str, Any]:
    with _redis_node(port, auth) as r:
        return r.info("replication")


def _cluster_nodes_from(ports: list[int], auth: RedisAuth) -> list[dict[str, Any]]:
    """CLUSTER NODES of the first of ``ports`` that answers."""
    import redis

    for port in ports:
        try:
            with _redis_node(port, auth) as r:
                return parse_cluster_nodes(r.execute_command("CLUSTER", "NODES"))
        except redis.RedisError as exc:
            log.debug("redis cluster node %d: %r", port, exc)
    raise LocalServerError(f"no Redis Cluster node answers on ports {ports}")


def _master_ports(ports: list[int], auth: RedisAuth) -> list[int]:
    return sorted(n["port"] for n in _cluster_nodes_from(ports, auth) if "master" in n["flags"] and n["slots"])


def _cluster_node_dirs(p: Paths) -> dict[int, Path]:
    root = p.redis_cluster_dir
    return {int(d.name): d for d in sorted(root.iterdir()) if d.name.isdigit()} if root.is_dir() else {}


def _cluster_problem(ports: list[int], masters: int, replicas: int, auth: RedisAuth) -> str | None:
    """Why the nodes on ``ports`` are not (yet) one healthy cluster of this shape, as every node sees it;
    None when they are."""
    import redis

    views = set()
    for port in ports:
        try:
            with _redis_node(port, auth) as r:
                info, repl = r.execute_command("CLUSTER INFO"), r.info("replication")
                views.add(_topology(parse_cluster_nodes(r.execute_command("CLUSTER", "NODES"))))
        except redis.RedisError as exc:
            return f"node {port}: {exc!r}"
        if info.get("cluster_state") != "ok":
            return f"node {port}: cluster_state:{info.get('cluster_state')}"
        if int(info.get("cluster_slots_assigned", 0)) != CLUSTER_SLOTS:
            return f"node {port}: {info.get('cluster_slots_assigned')} of {CLUSTER_SLOTS} slots assigned"
        if repl["role"] == "slave" and repl.get("master_link_status") != "up":
            return f"replica {port}: master_link_status:{repl.get('master_link_status')}"
    if len(views) != 1:
        return f"the nodes do not agree on the topology yet ({len(views)} views)"
    view = dict(next(iter(views)))
    shards = [sum(1 for m in view.values() if m == port) for port, master in view.items() if master is None]
    if sorted(view) != sorted(ports) or len(shards) != masters or any(n != replicas for n in shards):
        return f"shape: nodes {sorted(view)}, {len(shards)} masters with {shards} replicas, not {masters} x {replicas}"
    return None


def _topology(nodes: list[dict[str, Any]]) -> frozenset[tuple[int, int | None]]:
    """(port, its master's port or None for a master) of every node in one node's CLUSTER NODES."""
    port_of = {n["id"]: n["port"] for n in nodes}
    return frozenset((n["port"], port_of.get(n["master"], -1) if n["master"] else None) for n in nodes)


def _healthy_cluster_url(p: Paths, ports: list[int], masters: int, replicas: int, auth: RedisAuth,
                         grace_s: float = 0.0) -> str | None:
    """The URL of the cluster already running here with this shape, once healthy; None if not healthy within
    ``grace_s`` (which lets a failover or a replica's sync in progress finish instead of restarting the cluster)."""
    dirs = _cluster_node_dirs(p)
    live = {port for port, d in dirs.items() if _live_pid(d / "redis.pid", _is_redis_on(port)) is not None}
    if live != set(ports):
        return None
    deadline = time.monotonic() + grace_s
    while (problem := _cluster_problem(ports, masters, replicas, auth)) is not None:
        if time.monotonic() >= deadline:
            log.info("redis cluster on ports %d-%d is not healthy: %s", ports[0], ports[-1], problem)
            return None
        time.sleep(0.05)
    return cluster_url(_master_ports(ports, auth))


def _stop_cluster_nodes(p: Paths, *, wipe: bool) -> None:
    """Stop every node started here (by pid file); ``wipe`` also forgets their cluster (nodes.conf, data)."""
    for port, d in _cluster_node_dirs(p).items():
        if (d / "redis.pid").exists():
            _stop(f"redis cluster node {port}", d / "redis.pid", _is_redis_on(port))
        if wipe:
            for name in ("nodes.conf", "dump.rdb"):
                (d / name).unlink(missing_ok=True)


def _start_cluster_nodes(p: Paths, ports: list[int], auth: RedisAuth) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        raise LocalServerError("redis-server is not on PATH; apt-get install -y redis-server (or deploy/install.sh)")
    taken = [port for port in ports if _tcp_open(CLUSTER_HOST, port) or _tcp_open(CLUSTER_HOST, port + 10000)]
    if taken:
        raise LocalServerError(f"ports {taken} (or their cluster bus port +10000) are taken by processes not "
                               f"started here; free them or use another base_port")
    user, password = auth
    if password is not None and not password.isprintable():
        raise LocalServerError("the Redis password must be printable text")
    for port in ports:
        d = p.redis_cluster_dir / str(port)
        d.mkdir(parents=True, exist_ok=True)
        conf = None
        if password is not None:  # the settings' credentials; replicas use them to reach their master
            conf = d / "auth.conf"
            _write_private(conf, "# written by infogap (stream/tools/local.py)\n"
                           f"{_redis_acl_line(user or 'default', password)}\n"
                           + (f"masteruser {user}\n" if user else "")
                           + 'masterauth "{}"\n'.format(password.replace("\\", "\\\\").replace('"', '\\"')))
        pid = _spawn(cluster_node_command(exe, port, d, conf), d / "redis.log", d / "redis.pid", d)
        log.debug("redis cluster node %d: started pid %d", port, pid)


def _cluster_node_answers(port: int, auth: RedisAuth) -> bool:
    try:
        with _redis_node(port, auth) as r:
            return bool(r.ping())
    except Exception:  # noqa: BLE001 - "not answering" is the answer
        return False


def _create_cluster(p: Paths, ports: list[int], replicas: int, auth: RedisAuth) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise LocalServerError("redis-cli is not on PATH; apt-get install -y redis-tools (or deploy/install.sh)")
    cmd = cluster_create_command(cli, ports, replicas, auth[0])
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if auth[1] is not None:
        env["REDISCLI_AUTH"] = auth[1]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CLUSTER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LocalServerError(f"{' '.join(cmd)} did not finish within {CLUSTER_TIMEOUT_S:.0f} s") from exc
    create_log = p.redis_cluster_dir / "create.log"
    with open(create_log, "a") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        raise LocalServerError(f"redis-cli --cluster create failed (exit {res.returncode}); see {create_log}:\n"
                               f"{(res.stdout + res.stderr)[-2000:]}")


def _wait_for_cluster(p: Paths | None, ports: list[int], problem: Callable[[], str | None]) -> None:
    """Poll ``problem()`` until it is None; fail with its last answer after ``CLUSTER_TIMEOUT_S``, or at once
    if a node started here (``p``) has exited."""
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    while (why := problem()) is not None:
        for port in ports if p is not None else ():
            log_file = p.redis_cluster_dir / str(port) / "redis.log"
            if (pid := _read_pid(log_file.with_name("redis.pid"))) is None or _gone(pid):
                raise LocalServerError(f"redis cluster node {port} exited; see {log_file}:\n{_tail(log_file)}")
        if time.monotonic() > deadline:
            raise LocalServerError(f"redis cluster on ports {ports[0]}-{ports[-1]} not ready within "
                                   f"{CLUSTER_TIMEOUT_S:.0f} s: {why}")
        time.sleep(0.05)


def _failover_problem(ports: list[int], new: int, old: int, auth: RedisAuth) -> str | None:
    """Why the failover from ``old`` to ``new`` is not (yet) complete and seen by every node; None when it is."""
    import redis

    try:
        new_role, old_repl = _replication(new, auth)["role"], _replication(old, auth)
        if new_role != "master":
            return f"{new} is still a {new_role}"
        if old_repl["role"] != "slave" or old_repl.get("master_port") != new:
            return f"{old} is not yet a replica of {new}"
        if old_repl.get("master_link_status") != "up":
            return f"{old}: master_link_status:{old_repl.get('master_link_status')}"
        for port in ports:
            with _redis_node(port, auth) as r:
                state = r.execute_command("CLUSTER INFO").get("cluster_state")
                view = {n["port"]: n["flags"] for n in parse_cluster_nodes(r.execute_command("CLUSTER", "NODES"))}
            if state != "ok":
                return f"node {port}: cluster_state:{state}"
            if "master" not in view.get(new, ()) or "slave" not in view.get(old, ()):
                return f"node {port} does not see the new roles yet"
    except redis.RedisError as exc:
        return repr(exc)
    return None


# --------------------------------------------------------------------------------------------- topics


async def _describe_topics(settings: Settings, names: list[str]) -> dict[str, int]:
    """Existing topics among ``names`` -> partition count."""
    from aiokafka.admin import AIOKafkaAdminClient

    from infogap.stream import connections

    admin = AIOKafkaAdminClient(**connections.kafka_options(settings), client_id="infogap-local")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in names if n in existing]
        if not wanted:
            return {}
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(wanted) if t["error_code"] == 0}
    finally:
        await admin.close()


async def _ensure_topics(settings: Settings, replication_factor: int = 1) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    names = settings.topics.all()
    from infogap.stream import connections

    admin = AIOKafkaAdminClient(**connections.kafka_options(settings), client_id="infogap-local",
                                request_timeout_ms=15_000)
    await admin.start()
    try:
        deadline = time.monotonic() + TOPIC_TIMEOUT_S
        created_any = False
        while True:
            existing = set(await admin.list_topics())
            missing = [c for c, real in names.items() if real not in existing]
            if not missing:
                break
            new = [NewTopic(names[c], TOPIC_PARTITIONS[c], replication_factor,
                            topic_configs={**({"cleanup.policy": "compact"} if c in COMPACTED_TOPICS else {}),
                                           **TOPIC_CONFIGS.get(c, {})})
                   for c in missing]
            resp = await admin.create_topics(new, timeout_ms=15_000)
            errors = {t[0]: t[1] for t in resp.topic_errors if t[1] not in (0, _TOPIC_ALREADY_EXISTS)}
            created = [names[c] for c in missing if names[c] not in errors]
            if created:
                created_any = True
                log.info("created topics %s", ", ".join(created))
            if not errors:
                break
            if time.monotonic() > deadline:
                raise LocalServerError(f"could not create topics at {settings.kafka_bootstrap}: "
                                       f"{errors} (Kafka error codes)")
            log.debug("topic creation not ready yet (%s); retrying", errors)
            await asyncio.sleep(0.5)
        partitions = await _wait_for_leaders(admin, list(names.values()), settings)
        if created_any:
            await _wait_until_servable(settings, partitions)
        await _check_topics(admin, settings)
        await _warm_group_coordinator(admin, settings)
    finally:
        await admin.close()


async def _wait_for_leaders(admin, topics: list[str], settings: Settings) -> dict[str, list[int]]:
    """Return once every partition of ``topics`` has a leader, so that the first produce after
    ``ensure_topics`` does not meet NotLeaderForPartition while a new topic is still being placed."""
    deadline = time.monotonic() + TOPIC_TIMEOUT_S
    while True:
        described = await admin.describe_topics(topics)
        pending = [t["topic"] for t in described
                   if t["error_code"] != 0 or any(p["error_code"] != 0 or p["leader"] < 0 for p in t["partitions"])]
        if not pending:
            return {t["topic"]: [p["partition"] for p in t["partitions"]] for t in described}
        if time.monotonic() > deadline:
            raise LocalServerError(f"topics {pending} at {settings.kafka_bootstrap} have no leader after "
                                   f"{TOPIC_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.1)


async def _wait_until_servable(settings: Settings, partitions: dict[str, list[int]]) -> None:
    """Metadata names a leader a moment before the broker serves a new partition; ask every partition's
    leader for its end offset (aiokafka retries NotLeaderForPartition) so that the caller's first produce
    succeeds at once."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from infogap.stream import connections

    consumer = AIOKafkaConsumer(**connections.kafka_options(settings), client_id="infogap-local",
                                enable_auto_commit=False, request_timeout_ms=int(TOPIC_TIMEOUT_S * 1000),
                                retry_backoff_ms=20)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
        async with asyncio.timeout(TOPIC_TIMEOUT_S):
            await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def _check_topics(admin, settings: Settings) -> None:
    """Warn (do not change) when an existing topic differs from the contract."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    names = settings.topics.all()
    described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(list(names.values()))}
    for contract, real in names.items():
        have = described.get(real)
        if have is not None and have != TOPIC_PARTITIONS[contract]:
            log.warning("topic %s has %d partitions, the contract says %d (left as is)",
                        real, have, TOPIC_PARTITIONS[contract])
    compacted = [names[c] for c in COMPACTED_TOPICS]
    resources = [ConfigResource(ConfigResourceType.TOPIC, n, configs={"cleanup.policy": None}) for n in compacted]
    for resp in await admin.describe_configs(resources):
        for res in resp.resources:
            topic, entries = res[3], res[4]
            policy = next((e[1] for e in entries if e[0] == "cleanup.policy"), None)
            if policy is not None and "compact" not in policy:
                log.warning("topic %s has cleanup.policy=%s, the contract says compact (left as is)", topic, policy)


async def _warm_group_coordinator(admin, settings: Settings) -> None:
    """Ask for a group coordinator until one answers, so that Kafka creates ``__consumer_offsets`` now and the
    first consumer group that joins does not log GroupCoordinatorNotAvailable while it is being created."""
    deadline = time.monotonic() + TOPIC_TIMEOUT_S
    while True:
        try:
            await admin.find_coordinator(settings.consumer_group)
            return
        except Exception as exc:  # noqa: BLE001 - retriable while __consumer_offsets is being created
            if time.monotonic() > deadline:
                raise LocalServerError(f"no group coordinator at {settings.kafka_bootstrap} after "
                                       f"{TOPIC_TIMEOUT_S:.0f} s: {exc!r}") from exc
            log.debug("group coordinator not available yet: %r", exc)
            await asyncio.sleep(0.2)


def wait_for_kafka(settings: Settings, timeout_s: float) -> None:
    """Block until Kafka answers a metadata request (used by the one-shot topic job of docker-compose / k8s)."""
    deadline = time.monotonic() + timeout_s
    while not _run(_kafka_answers(settings, timeout=5.0)):
        if time.monotonic() > deadline:
            raise LocalServerError(f"Kafka at {settings.kafka_bootstrap} did not answer within {timeout_s:.0f} s")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    """``python -m infogap.stream.tools.local {up,down,status,ensure-topics}``: the same operations without the infogap CLI
    (the topic job of deploy/docker-compose.yml and deploy/k8s/ runs ``ensure-topics``)."""
    import argparse
    import json

    from infogap.stream.settings import load

    parser = argparse.ArgumentParser(prog="python -m infogap.stream.tools.local", description=main.__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "ensure-topics"])
    parser.add_argument("--replication-factor", type=int, default=1, help="ensure-topics: replication factor")
    parser.add_argument("--wait", type=float, default=0.0, help="ensure-topics: wait this long for Kafka first")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load()
    try:
        if args.command == "up":
            up(settings)
        elif args.command == "down":
            down(settings)
        elif args.command == "status":
            log.info("%s", json.dumps(status(settings), indent=2))
        else:
            if args.wait > 0:
                wait_for_kafka(settings, args.wait)
            ensure_topics(settings, replication_factor=args.replication_factor)
    except LocalServerError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
