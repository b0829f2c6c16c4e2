"""stream/tools/acls.py without a broker: the grants per role, the principals, the check for stray writers; and the
authorizer option of stream/tools/local.py's server_properties (tests/integration/test_kafka_acls.py runs them)."""
from __future__ import annotations

from pathlib import Path

import pytest

from infogap.stream.tools import acls, local
from infogap.stream.settings import Settings

S = Settings(topic_prefix="p.", consumer_group="g")
P = acls.Principals.from_mapping({"worker": "w", "producers": "User:a,User:b", "catalog": "c",
                                  "preferences": "pr", "channels": "ch", "operators": "ops"})


def _grants() -> set[tuple[str, str, str, str]]:
    return {(b.principal.removeprefix("User:"), b.operation_name, b.resource_name,
             acls._NAMES["pattern"][b.pattern_type]) for b in acls.bindings(S, P)}


def test_each_role_gets_exactly_its_grants():
    internal = ["p.cooc", "p.state.users", "p.state.items", "p.erasures"]
    expected = {("w", "READ", t, "LITERAL") for t in ["p.events", "p.items", "p.users", *internal]}
    expected |= {("w", "WRITE", t, "LITERAL") for t in [*internal, "p.users", "p.push", "p.events.dlq"]}
    expected |= {("w", "READ", "g", "LITERAL"), ("w", "READ", "g.items", "LITERAL")}
    expected |= {("a", "WRITE", "p.events", "LITERAL"), ("b", "WRITE", "p.events", "LITERAL"),
                 ("c", "WRITE", "p.items", "LITERAL"), ("pr", "WRITE", "p.users", "LITERAL"),
                 ("ch", "READ", "g.channel.", "PREFIXED"), ("ops", "READ", "p.events.dlq", "LITERAL")}
    expected |= {("ch", "READ", t, "LITERAL") for t in ["p.push", "p.users", "p.erasures", "p.suppressions"]}
    expected |= {("ch", "WRITE", t, "LITERAL") for t in ["p.events", "p.push.dlq", "p.suppressions"]}
    expected |= {("ch", op, "g.channel.", "PREFIXED") for op in ("READ", "WRITE", "CREATE")}  # Faust's own topics
    assert _grants() == expected
    writers = {who for who, op, name, _ in _grants() if op == "WRITE" and name in internal}
    assert writers == {"w"}
    assert acls.write_grants_to_others(acls.bindings(S, P), acls.protected_topics(S), P.worker) == []


def test_principals_defaults_and_refusals(monkeypatch):
    for role in acls.ROLES:
        monkeypatch.delenv(f"INFOGAP_ACL_{role.upper()}", raising=False)
    d = acls.Principals.from_env()
    assert d.worker == ("User:infogap-worker",) and d.operators == ()
    monkeypatch.setenv("INFOGAP_ACL_PRODUCERS", "web, User:mobile")
    assert acls.Principals.from_env({"catalog": "User:pim"}).producers == ("User:web", "User:mobile")
    assert acls.Principals.from_env({"catalog": "User:pim"}).catalog == ("User:pim",)
    with pytest.raises(ValueError, match="both the worker and another role"):
        acls.Principals.from_mapping({"worker": "x", "producers": "x"})
    with pytest.raises(ValueError, match="wildcard"):
        acls.Principals.from_mapping({"worker": "User:*"})
    with pytest.raises(ValueError, match="no principal for the catalog role"):
        acls.Principals.from_mapping({"catalog": " "})
    with pytest.raises(ValueError, match="not a Kafka principal"):
        acls.Principals.from_mapping({"worker": "User:a b"})


@pytest.mark.parametrize(("name", "pattern", "op", "hit"), [
    ("p.state.users", "LITERAL", "WRITE", True), ("*", "LITERAL", "ALL", True), ("p.", "PREFIXED", "DELETE", True),
    ("", "PREFIXED", "ALTER_CONFIGS", True), ("p.state.users", "LITERAL", "READ", False),
    ("p.events", "LITERAL", "WRITE", False), ("q.", "PREFIXED", "WRITE", False),
])
def test_stray_writers_of_internal_topics_are_found(name, pattern, op, hit):
    b = acls.Binding(acls.RESOURCE["TOPIC"], name, acls.PATTERN[pattern], "User:x", acls.OPERATION[op])
    assert acls.write_grants_to_others([b], acls.protected_topics(S), P.worker) == ([b] if hit else [])
    worker_grant = acls.Binding(b.resource_type, name, b.pattern_type, "User:w", b.operation)
    assert acls.write_grants_to_others([worker_grant], acls.protected_topics(S), P.worker) == []


def test_kafka_acls_commands_for_a_distribution():
    lines = [b.kafka_acls_command() for b in acls.bindings(S, P)]
    assert ("kafka-acls.sh --bootstrap-server \"$BOOTSTRAP\" --command-config \"$ADMIN_CONFIG\" --add "
            "--allow-principal 'User:ch' --operation Read --group 'g.channel.' --resource-pattern-type prefixed"
            ) in lines


def test_server_properties_authorizer_option():
    s = Settings(kafka_bootstrap="127.0.0.1:19092", local_dir=Path("/tmp/x"))
    plain = local.server_properties(s, sasl_users={"admin": "pw1", "app": "pw2"})
    assert "authorizer.class.name" not in plain
    props = local.server_properties(s, sasl_users={"admin": "pw1", "app": "pw2"}, super_users=["admin"])
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == f"User:{local.BROKER_USER};User:admin"
    with pytest.raises(local.LocalServerError, match="not among sasl_users"):
        local.server_properties(s, sasl_users={"app": "pw2"}, super_users=["admin"])
    with pytest.raises(local.LocalServerError, match="needs sasl_users"):
        local.server_properties(s, super_users=["admin"])
