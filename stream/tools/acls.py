"""Kafka ACLs for infogap's topics: who may read and write which topic, applied through the admin API.

Roles, each one or more principals (``User:name``; a bare name means ``User:name``):

=============  ====================================================================================
worker         read ``events``, ``items``, ``users``, ``cooc``, ``state.users``, ``state.items``,
               ``erasures``; write ``cooc``, ``state.users``, ``state.items``, ``erasures``, ``users``
               (the tombstones of ``forget`` events), ``push``, ``events.dlq``; read its consumer
               groups ``<consumer_group>`` and ``<consumer_group>.items``
producers      write ``events`` (the clickstream)
catalog        write ``items``
preferences    write ``users``
channels       read ``push``, ``users``, ``erasures``, ``suppressions``; write ``events`` (feedback),
               ``push.dlq``, ``suppressions``; read the groups ``<consumer_group>.channel.*``; read, write
               and create the topics ``<consumer_group>.channel.*`` (the Faust apps' changelogs)
operators      read ``events.dlq`` (optional: no operator principal, no grant)
=============  ====================================================================================

Topic and group names are the ones of the settings (``INFOGAP_TOPIC_PREFIX``, ``INFOGAP_CONSUMER_GROUP``), as
literal ACLs. Nobody but the worker may write the internal topics ``cooc``, ``state.users``, ``state.items``
and ``erasures``: a broker with an authorizer denies what no ACL allows, and :func:`check` (run by ``apply``)
fails when an ACL lets any other principal write, delete or reconfigure them. Two broker settings are the
operator's to get right, as the admin API does not show them: ``allow.everyone.if.no.acl.found=false`` (the
default) and ``super.users`` (they bypass every ACL: keep it to the brokers and the administrator).

aiokafka's admin client has no ACL calls; the CreateAcls / DescribeAcls requests are sent with its
protocol classes (version 1, which Kafka 2.0 to 4.x accept).

    python -m infogap.stream.tools.acls plan [--format kafka-acls]   # what would be granted (no connection)
    python -m infogap.stream.tools.acls apply                        # grant, then check (as a principal that may alter ACLs)
    python -m infogap.stream.tools.acls check                        # exit 2 when a grant is missing or another may write

>>> p = Principals.from_mapping({"worker": "w", "producers": "p", "catalog": "c", "preferences": "pr",
...                              "channels": "ch"})
>>> from infogap.stream.settings import Settings
>>> bs = bindings(Settings(topic_prefix="t."), p)
>>> [(b.resource_name, b.operation_name) for b in bs if b.principal == "User:p"]
[('t.events', 'WRITE')]
>>> [b.resource_name for b in bs if b.operation_name == "WRITE" and b.resource_name == "t.state.users"]
['t.state.users']
>>> internal = protected_topics(Settings(topic_prefix="t."))
>>> {b.principal for b in bs if b.operation_name == "WRITE" and b.resource_name in internal}
{'User:w'}
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.protocol.admin import (
    CreateAclsRequest_v1,
    DescribeAclsRequest_v1,
)
from aiokafka.protocol.api import Request

from infogap.stream.settings import Settings

log = logging.getLogger(__name__)

# Kafka's wire codes (org.apache.kafka.common.resource.ResourceType / PatternType, acl.AclOperation /
# AclPermissionType)
RESOURCE = {"ANY": 1, "TOPIC": 2, "GROUP": 3, "CLUSTER": 4, "TRANSACTIONAL_ID": 5}
PATTERN = {"ANY": 1, "MATCH": 2, "LITERAL": 3, "PREFIXED": 4}
OPERATION = {"ANY": 1, "ALL": 2, "READ": 3, "WRITE": 4, "CREATE": 5, "DELETE": 6, "ALTER": 7, "DESCRIBE": 8,
             "CLUSTER_ACTION": 9, "DESCRIBE_CONFIGS": 10, "ALTER_CONFIGS": 11, "IDEMPOTENT_WRITE": 12}
PERMISSION = {"ANY": 1, "DENY": 2, "ALLOW": 3}
_NAMES = {table: {v: k for k, v in codes.items()} for table, codes in
          (("resource", RESOURCE), ("pattern", PATTERN), ("operation", OPERATION), ("permission", PERMISSION))}

#: operations on a topic that let a principal change or remove its records: writing, deleting records or the
#: topic, and altering it or its configuration (cleanup.policy, retention)
WRITE_LIKE = frozenset({"ALL", "WRITE", "DELETE", "ALTER", "ALTER_CONFIGS"})
#: contract names of the topics only the worker writes
INTERNAL_TOPICS = ("cooc", "state.users", "state.items", "erasures")

ROLES = ("worker", "producers", "catalog", "preferences", "channels", "operators")
#: the principals when neither the environment (INFOGAP_ACL_<ROLE>) nor an argument names them
DEFAULT_PRINCIPALS = {"worker": "User:infogap-worker", "producers": "User:infogap-producer",
                      "catalog": "User:infogap-catalog", "preferences": "User:infogap-preferences",
                      "channels": "User:infogap-channels", "operators": ""}
_PRINCIPAL = re.compile(r"[A-Za-z][A-Za-z0-9]*:[^\s,]+")

_SECURITY_DISABLED = 54  # the broker runs no authorizer
_CLUSTER_AUTHORIZATION_FAILED = 31


class AclError(RuntimeError):
    """ACLs could not be applied or read; the message says why."""


def _principal(name: str) -> str:
    name = name.strip()
    if ":" not in name:
        name = f"User:{name}"
    if not _PRINCIPAL.fullmatch(name):
        raise ValueError(f"{name!r} is not a Kafka principal (User:<name>)")
    return name


@dataclass(frozen=True)
class Principals:
    """The principals of each role (tuples; ``operators`` may be empty)."""

    worker: tuple[str, ...]
    producers: tuple[str, ...]
    catalog: tuple[str, ...]
    preferences: tuple[str, ...]
    channels: tuple[str, ...]
    operators: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, str | Iterable[str] | None]) -> Principals:
        """Roles from ``{role: "User:a,User:b"}`` (or lists); a missing role takes :data:`DEFAULT_PRINCIPALS`."""
        got: dict[str, tuple[str, ...]] = {}
        for role in ROLES:
            raw = values.get(role)
            if raw is None:
                raw = DEFAULT_PRINCIPALS[role]
            parts = raw.split(",") if isinstance(raw, str) else list(raw)
            got[role] = tuple(dict.fromkeys(_principal(x) for x in parts if x.strip()))
        for role in ROLES[:-1]:
            if not got[role]:
                raise ValueError(f"no principal for the {role} role")
        if any(p.endswith(":*") for p in got["worker"]):
            raise ValueError("the worker principal cannot be a wildcard: it alone may write the internal topics")
        shared = set(got["worker"]) & {p for role in ROLES[1:] for p in got[role]}
        if shared:
            raise ValueError(f"{', '.join(sorted(shared))} is both the worker and another role: the worker's "
                             f"principal must be its own, as only it may write the internal topics")
        return cls(**got)

    @classmethod
    def from_env(cls, overrides: Mapping[str, str | None] | None = None) -> Principals:
        """Roles from ``INFOGAP_ACL_WORKER``, ``..._PRODUCERS``, ``..._CATALOG``, ``..._PREFERENCES``,
        ``..._CHANNELS``, ``..._OPERATORS`` (comma-separated principals), then ``overrides`` (not None)."""
        values: dict[str, str | None] = {r: os.environ.get(f"INFOGAP_ACL_{r.upper()}") for r in ROLES}
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values)


@dataclass(frozen=True, order=True)
class Binding:
    """One ACL: ``permission`` ``principal`` may ``operation`` the resource (host ``*``)."""

    resource_type: int
    resource_name: str
    pattern_type: int
    principal: str
    operation: int
    permission: int = PERMISSION["ALLOW"]
    host: str = "*"

    @property
    def operation_name(self) -> str:
        return _NAMES["operation"].get(self.operation, str(self.operation))

    def describe(self) -> str:
        pat = _NAMES["pattern"].get(self.pattern_type, str(self.pattern_type)).lower()
        res = _NAMES["resource"].get(self.resource_type, str(self.resource_type)).lower()
        return (f"{_NAMES['permission'].get(self.permission, self.permission)} {self.principal} "
                f"{self.operation_name} {res} {self.resource_name!r} ({pat}, host {self.host})")

    def kafka_acls_command(self) -> str:
        """The same grant as a ``kafka-acls.sh`` line of a Kafka distribution (``$BOOTSTRAP`` to fill in)."""
        res = {RESOURCE["TOPIC"]: "--topic", RESOURCE["GROUP"]: "--group"}[self.resource_type]
        pat = {PATTERN["LITERAL"]: "literal", PATTERN["PREFIXED"]: "prefixed"}[self.pattern_type]
        op = "".join(w.capitalize() for w in self.operation_name.split("_"))
        return (f"kafka-acls.sh --bootstrap-server \"$BOOTSTRAP\" --command-config \"$ADMIN_CONFIG\" --add "
                f"--allow-principal '{self.principal}' --operation {op} {res} '{self.resource_name}' "
                f"--resource-pattern-type {pat}")

    def wire(self) -> tuple:
        return (self.resource_type, self.resource_name, self.pattern_type, self.principal, self.host,
                self.operation, self.permission)


def protected_topics(settings: Settings) -> list[str]:
    """The internal topics (prefix applied) that only the worker may write."""
    names = settings.topics.all()
    return [names[t] for t in INTERNAL_TOPICS]


def bindings(settings: Settings, principals: Principals) -> list[Binding]:
    """Every ALLOW ACL infogap needs, for the topic prefix and consumer group of ``settings``."""
    t = settings.topics.all()
    group = settings.consumer_group
    topic, grp = RESOURCE["TOPIC"], RESOURCE["GROUP"]
    lit, pre = PATTERN["LITERAL"], PATTERN["PREFIXED"]
    read, write = OPERATION["READ"], OPERATION["WRITE"]
    out: list[Binding] = []

    def grant(who: Iterable[str], rtype: int, names: Iterable[str], op: int, pattern: int = lit) -> None:
        out.extend(Binding(rtype, name, pattern, p, op) for p in who for name in names)

    w = principals.worker
    grant(w, topic, [t[n] for n in ("events", "items", "users", *INTERNAL_TOPICS)], read)
    grant(w, topic, [t[n] for n in (*INTERNAL_TOPICS, "users", "push", "events.dlq")], write)
    grant(w, grp, [group, f"{group}.items"], read)
    grant(principals.producers, topic, [t["events"]], write)
    grant(principals.catalog, topic, [t["items"]], write)
    grant(principals.preferences, topic, [t["users"]], write)
    grant(principals.channels, topic, [t[n] for n in ("push", "users", "erasures", "suppressions")], read)
    grant(principals.channels, topic, [t[n] for n in ("events", "push.dlq", "suppressions")], write)
    grant(principals.channels, grp, [f"{group}.channel."], read, pre)
    # the Faust apps' own topics: the outcomes changelogs and the assignor's, named after their group
    for op in (read, write, OPERATION["CREATE"]):
        grant(principals.channels, topic, [f"{group}.channel."], op, pre)
    grant(principals.operators, topic, [t["events.dlq"]], read)
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------ the wire


class _CreateAcls(Request[CreateAclsRequest_v1]):
    API_KEY = 30

    def __init__(self, creations: list[Binding]):
        self._creations = creations

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class([b.wire() for b in self._creations])


class _DescribeAcls(Request[DescribeAclsRequest_v1]):
    API_KEY = 29

    def build(self, request_struct_class: type[DescribeAclsRequest_v1]) -> DescribeAclsRequest_v1:
        # every ACL: any resource type and pattern, any name, principal, host, operation and permission
        return request_struct_class(RESOURCE["ANY"], None, PATTERN["ANY"], None, None, OPERATION["ANY"],
                                    PERMISSION["ANY"])


def _admin(settings: Settings):
    from infogap.stream import connections

    return connections.admin(settings, client_id="infogap-acls")


def _raise_for(code: int, message: str | None, settings: Settings, what: str) -> None:
    if code == 0:
        return
    if code == _SECURITY_DISABLED:
        raise AclError(f"Kafka at {settings.kafka_bootstrap} runs no authorizer, so ACLs are neither kept nor "
                       f"enforced and any client that reaches it may write every topic: set "
                       f"authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer (KRaft) "
                       f"and authenticated listeners (SASL or mutual TLS) first")
    if code == _CLUSTER_AUTHORIZATION_FAILED:
        raise AclError(f"{what}: {settings.kafka_username or 'this client'} may not {what.split()[0]} ACLs at "
                       f"{settings.kafka_bootstrap}; run as the administrator (a super user or ALTER/DESCRIBE on "
                       f"the cluster)")
    raise AclError(f"{what} at {settings.kafka_bootstrap} failed: error {code} {message or ''}".rstrip())


async def create(settings: Settings, wanted: list[Binding]) -> None:
    """Create the ACLs ``wanted`` (an ACL that exists already is kept; Kafka makes creation idempotent)."""
    admin = _admin(settings)
    await admin.start()
    try:
        resp = await admin._send_request(_CreateAcls(wanted))
    finally:
        await admin.close()
    for b, (code, message) in zip(wanted, resp.creation_responses, strict=True):
        _raise_for(code, message, settings, f"create ACL {b.describe()}")


async def existing(settings: Settings) -> list[Binding]:
    """Every ACL the cluster holds."""
    admin = _admin(settings)
    await admin.start()
    try:
        resp = await admin._send_request(_DescribeAcls())
    finally:
        await admin.close()
    _raise_for(resp.error_code, resp.error_message, settings, "describe ACLs")
    return [Binding(rtype, name, pattern, principal, op, perm, host)
            for rtype, name, pattern, acls in resp.resources for principal, host, op, perm in acls]


async def broker_settings(settings: Settings) -> dict[str, str]:
    """The broker's ``authorizer.class.name`` ({} when this client may not read the broker's configuration).

    The authorizer's own settings (``allow.everyone.if.no.acl.found``, ``super.users``) are not KafkaConfig
    keys: the broker reports them as sensitive, without a value, so they cannot be checked from here.
    """
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    names = ["authorizer.class.name"]
    admin = _admin(settings)
    await admin.start()
    try:
        brokers = (await admin.describe_cluster())["brokers"]
        node = str(brokers[0]["node_id"])
        resps = await admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, node, dict.fromkeys(names))])
    except Exception as exc:  # noqa: BLE001 - a report without the broker's settings, not a failure
        log.debug("could not read the broker configuration: %r", exc)
        return {}
    finally:
        await admin.close()
    out: dict[str, str] = {}
    for resp in resps:
        for res in resp.resources:
            if res[0] == 0:
                out.update({entry[0]: entry[1] for entry in res[4] if entry[0] in names and entry[1] is not None})
    return out


# ------------------------------------------------------------------------------------------ the checks


def write_grants_to_others(acls: Iterable[Binding], topics: Iterable[str], allowed: Iterable[str]) -> list[Binding]:
    """The ALLOW ACLs among ``acls`` that let a principal not in ``allowed`` write, delete or reconfigure one
    of ``topics`` (literal, wildcard ``*`` and prefixed ACLs all count).

    >>> w = Binding(RESOURCE["TOPIC"], "t.", PATTERN["PREFIXED"], "User:ops", OPERATION["ALL"])
    >>> r = Binding(RESOURCE["TOPIC"], "*", PATTERN["LITERAL"], "User:bi", OPERATION["READ"])
    >>> [b.principal for b in write_grants_to_others([w, r], ["t.cooc"], ["User:worker"])]
    ['User:ops']
    """
    topics, allowed = list(topics), set(allowed)
    out = []
    for b in acls:
        if (b.resource_type != RESOURCE["TOPIC"] or b.permission != PERMISSION["ALLOW"]
                or b.operation_name not in WRITE_LIKE or b.principal in allowed):
            continue
        if b.pattern_type == PATTERN["LITERAL"]:
            hit = b.resource_name == "*" or b.resource_name in topics
        elif b.pattern_type == PATTERN["PREFIXED"]:
            hit = any(t.startswith(b.resource_name) for t in topics)
        else:
            hit = True  # a pattern type this code does not know: report it rather than trust it
        if hit:
            out.append(b)
    return out


@dataclass
class Report:
    """What :func:`check` found; ``ok`` when nothing is missing and nobody else may write internal topics."""

    missing: list[Binding] = field(default_factory=list)
    others_may_write: list[Binding] = field(default_factory=list)
    broker: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.others_may_write or self.problems)

    def lines(self) -> list[str]:
        out = [f"missing: {b.describe()}" for b in self.missing]
        out += [f"may write an internal topic: {b.describe()}" for b in self.others_may_write]
        return out + self.problems


async def check(settings: Settings, principals: Principals) -> Report:
    """Compare the cluster's ACLs with :func:`bindings` and look for anyone else allowed to write the internal
    topics; also read the broker's authorizer class when this client may."""
    acls = await existing(settings)
    have = set(acls)
    report = Report(missing=[b for b in bindings(settings, principals) if b not in have],
                    others_may_write=write_grants_to_others(acls, protected_topics(settings), principals.worker),
                    broker=await broker_settings(settings))
    if report.broker.get("authorizer.class.name") == "":
        report.problems.append(f"Kafka at {settings.kafka_bootstrap} runs no authorizer: ACLs are not enforced")
    return report


async def apply(settings: Settings, principals: Principals) -> Report:
    """Create every ACL of :func:`bindings` (idempotent), then :func:`check`."""
    wanted = bindings(settings, principals)
    await create(settings, wanted)
    log.info("%d ACLs granted for topic prefix %r and group %r", len(wanted), settings.topic_prefix,
             settings.consumer_group)
    # the controller applies them through the metadata log; a broker sees them a moment later
    for _ in range(50):
        report = await check(settings, principals)
        if not report.missing:
            break
        await asyncio.sleep(0.1)
    return report


# ------------------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    """``python -m infogap.stream.tools.acls {plan,apply,check}``: infogap's Kafka ACLs for the settings' topic prefix and
    consumer group. Connection and admin credentials come from INFOGAP_KAFKA_* (the administrator's)."""
    from infogap.stream.settings import load

    parser = argparse.ArgumentParser(prog="python -m infogap.stream.tools.acls", description=main.__doc__)
    parser.add_argument("command", choices=["plan", "apply", "check"])
    for role in ROLES:
        parser.add_argument(f"--{role}", metavar="PRINCIPALS",
                            help=f"comma-separated principals (default $INFOGAP_ACL_{role.upper()}, else "
                                 f"{DEFAULT_PRINCIPALS[role] or 'none'})")
    parser.add_argument("--topic-prefix", help="default $INFOGAP_TOPIC_PREFIX")
    parser.add_argument("--consumer-group", help="default $INFOGAP_CONSUMER_GROUP")
    parser.add_argument("--format", choices=["text", "kafka-acls"], default="text",
                        help="plan: readable lines, or kafka-acls.sh commands of a Kafka distribution")
    parser.add_argument("--wait", type=float, default=0.0, help="apply/check: wait this long for Kafka first")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    update: dict[str, Any] = {}
    if args.topic_prefix is not None:
        update["topic_prefix"] = args.topic_prefix
    if args.consumer_group is not None:
        update["consumer_group"] = args.consumer_group
    try:
        settings = load().model_copy(update=update)
        principals = Principals.from_env({r: getattr(args, r) for r in ROLES})
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    if args.command == "plan":
        for b in bindings(settings, principals):
            print(b.kafka_acls_command() if args.format == "kafka-acls" else b.describe())
        return 0
    from aiokafka.errors import KafkaError

    from infogap.stream.tools import local

    try:
        if args.wait > 0:
            local.wait_for_kafka(settings, args.wait)
        report = asyncio.run(apply(settings, principals) if args.command == "apply" else check(settings, principals))
    except (AclError, local.LocalServerError) as exc:
        log.error("%s", exc)
        return 1
    except KafkaError as exc:
        log.error("Kafka at %s: %r", settings.kafka_bootstrap, exc)
        return 1
    for line in report.lines():
        log.error("%s", line)
    if not report.ok:
        return 2
    log.info("ACLs in place: of the principals without super.users, only %s may write %s (check "
             "allow.everyone.if.no.acl.found=false on every broker: it cannot be read from here)",
             ", ".join(principals.worker), ", ".join(protected_topics(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
