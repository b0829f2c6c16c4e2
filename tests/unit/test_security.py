"""Security settings and stream/connections.py without servers: validation, client options, nothing secret logged."""
from __future__ import annotations

import datetime as dt
import logging
import ssl

import pytest
from pydantic import SecretStr, ValidationError

from infogap.stream import connections
from infogap.stream.settings import Settings, load

KAFKA_PW = "kafka-Pa55-7f3e9"
REDIS_PW = "redis-Pa55-c0ffee"
URL_PW = "url-Pa55-beef42"
KEY_PW = "keyfile-Pa55-1234"
PSEUDO_KEY = "pseudonym-key-0123456789abcdef"
SECRETS = (KAFKA_PW, REDIS_PW, URL_PW, KEY_PW, PSEUDO_KEY)


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    """A self-signed CA certificate and its key, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("pem")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "infogap test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(KEY_PW.encode())))
    return d


def secured(pem, **over) -> Settings:
    base = dict(kafka_bootstrap="10.0.0.5:9093", kafka_security_protocol="SASL_SSL", kafka_username="svc",
                kafka_password=KAFKA_PW, kafka_sasl_mechanism="SCRAM-SHA-512", kafka_ssl_cafile=pem / "ca.pem",
                kafka_ssl_certfile=pem / "ca.pem", kafka_ssl_keyfile=pem / "key.pem", kafka_ssl_key_password=KEY_PW,
                redis_url="rediss://app@redis.internal:6380/1", redis_password=REDIS_PW,
                redis_ssl_cafile=pem / "ca.pem", pseudonym_key=PSEUDO_KEY)
    return Settings(**{**base, **over})


# ------------------------------------------------------------------ settings


def test_defaults_are_the_unsecured_local_path():
    s = Settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.kafka_password is None and s.redis_password is None and s.pseudonym_key is None
    assert connections.kafka_options(s) == {"bootstrap_servers": s.kafka_bootstrap}
    assert connections.redis_options(s) == {}


def test_security_settings_come_from_the_environment(monkeypatch, pem):
    env = {"INFOGAP_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "INFOGAP_KAFKA_SASL_MECHANISM": "scram-sha-256",
           "INFOGAP_KAFKA_USERNAME": "svc", "INFOGAP_KAFKA_PASSWORD": KAFKA_PW,
           "INFOGAP_KAFKA_SSL_CAFILE": str(pem / "ca.pem"), "INFOGAP_REDIS_URL": "rediss://10.1.1.1:6380/0",
           "INFOGAP_REDIS_USERNAME": "app", "INFOGAP_REDIS_PASSWORD": REDIS_PW,
           "INFOGAP_REDIS_SSL_CAFILE": str(pem / "ca.pem"), "INFOGAP_PSEUDONYM_KEY": PSEUDO_KEY}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load()
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
    assert s.kafka_password.get_secret_value() == KAFKA_PW
    assert (s.redis_username, s.redis_password.get_secret_value()) == ("app", REDIS_PW)
    assert s.kafka_ssl_cafile == pem / "ca.pem"
    assert s.pseudonym_key.get_secret_value() == PSEUDO_KEY


def test_secrets_are_not_in_repr_str_or_dumps(pem):
    s = secured(pem, redis_url=f"rediss://app:{URL_PW}@redis.internal:6380/1", redis_password=None)
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump()), repr(s.model_dump())):
        for secret in SECRETS:
            assert secret not in text
    assert "**********" in repr(s)
    assert s.redis_password.get_secret_value() == URL_PW  # moved out of the URL...
    assert s.redis_url == "rediss://redis.internal:6380/1" and s.redis_username == "app"  # ...which keeps no secret


def test_url_credentials_in_query_and_unix_urls_are_moved_too():
    s = Settings(redis_url=f"unix://:{URL_PW}@/run/redis.sock?db=2")
    assert s.redis_url == "unix:///run/redis.sock?db=2" and s.redis_password.get_secret_value() == URL_PW
    s = Settings(redis_url=f"redis://127.0.0.1:6379/0?username=app&password={URL_PW}")
    assert s.redis_url == "redis://127.0.0.1:6379/0" and s.redis_username == "app"
    s = Settings(redis_url=f"redis://127.0.0.1:6379/0", redis_password=URL_PW)
    assert s.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("kwargs, message", [
    ({"kafka_security_protocol": "SASL_SSL", "kafka_password": KAFKA_PW}, "needs INFOGAP_KAFKA_USERNAME"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_username": "svc"}, "needs INFOGAP_KAFKA_PASSWORD"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_username": "svc", "kafka_password": ""},
     "needs INFOGAP_KAFKA_PASSWORD"),
    ({"kafka_username": "svc", "kafka_password": KAFKA_PW}, "does not authenticate"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_username": "svc", "kafka_password": KAFKA_PW,
      "kafka_ssl_cafile": "/etc/hostname"}, "does not use TLS"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"},
     "INFOGAP_KAFKA_SSL_CAFILE=/nonexistent/ca.pem is not a readable file"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/etc/hostname"}, "needs INFOGAP_KAFKA_SSL_CERTFILE"),
    ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_username": "svc", "kafka_password": KAFKA_PW,
      "kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
    ({"redis_username": "app"}, "needs INFOGAP_REDIS_PASSWORD"),
    ({"redis_ssl_cafile": "/etc/hostname"}, "does not start with rediss://"),
    ({"redis_url": f"redis://:{URL_PW}@127.0.0.1:6379/0", "redis_password": REDIS_PW}, "different passwords"),
    ({"redis_url": f"redis://bob:{URL_PW}@127.0.0.1:6379/0", "redis_username": "alice"}, "different users"),
    ({"redis_url": f"http://:{URL_PW}@127.0.0.1:6379/0"}, "must start with redis://"),
    ({"pseudonym_key": "short"}, "at least 16 bytes"),
    ({"pseudonym_key": ""}, "at least 16 bytes"),
])
def test_misconfigurations_fail_with_a_clear_message_that_shows_no_secret(kwargs, message):
    with pytest.raises(ValidationError) as info:
        Settings(**kwargs)
    text = str(info.value)
    assert message in text
    for secret in SECRETS:
        assert secret not in text


def test_spellings_of_protocol_and_mechanism_are_normalised():
    s = Settings(kafka_security_protocol="sasl-plaintext", kafka_sasl_mechanism="scram_sha_512",
                 kafka_username="svc", kafka_password=KAFKA_PW)
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")


# ------------------------------------------------------------------ client options


def test_kafka_options_for_sasl_ssl_with_client_certificate(pem):
    opts = connections.kafka_options(secured(pem))
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("svc", KAFKA_PW)
    ctx = opts["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(c["subject"] == ((("commonName", "infogap test CA"),),) for c in ctx.get_ca_certs())


def test_kafka_options_for_ssl_without_ca_file_use_the_system_store():
    opts = connections.kafka_options(Settings(kafka_security_protocol="SSL"))
    assert opts["security_protocol"] == "SSL" and "sasl_mechanism" not in opts
    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_kafka_options_for_sasl_plaintext():
    opts = connections.kafka_options(Settings(kafka_bootstrap="127.0.0.1:9092", kafka_security_protocol="SASL_PLAINTEXT",
                                              kafka_username="svc", kafka_password=KAFKA_PW))
    assert opts == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "SASL_PLAINTEXT",
                    "sasl_mechanism": "PLAIN", "sasl_plain_username": "svc", "sasl_plain_password": KAFKA_PW}


def test_redis_options_carry_credentials_and_tls(pem):
    s = secured(pem, redis_ssl_certfile=pem / "ca.pem", redis_ssl_keyfile=pem / "key.pem")
    assert connections.redis_options(s) == {
        "username": "app", "password": REDIS_PW, "ssl_cert_reqs": "required", "ssl_ca_certs": str(pem / "ca.pem"),
        "ssl_certfile": str(pem / "ca.pem"), "ssl_keyfile": str(pem / "key.pem")}
    r = connections.redis_sync(s)
    kw = r.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["host"], kw["port"], kw["db"]) == ("app", REDIS_PW, "redis.internal",
                                                                                   6380, 1)
    assert kw["ssl_ca_certs"] == str(pem / "ca.pem")
    assert r.connection_pool.connection_class.__name__ == "SSLConnection"


def test_password_in_the_url_reaches_the_client():
    s = Settings(redis_url=f"redis://:{URL_PW}@127.0.0.1:6390/3")
    kw = connections.redis_sync(s).connection_pool.connection_kwargs
    assert (kw["password"], kw["port"], kw["db"]) == (URL_PW, 6390, 3)
    assert "username" not in kw or kw["username"] is None


async def test_building_every_client_logs_nothing_secret(pem, caplog):
    caplog.set_level(logging.DEBUG)
    for s in (secured(pem), secured(pem, kafka_security_protocol="SASL_PLAINTEXT", kafka_ssl_cafile=None,
                                    kafka_ssl_certfile=None, kafka_ssl_keyfile=None, kafka_ssl_key_password=None,
                                    kafka_sasl_mechanism="PLAIN")):
        clients = [connections.producer(s), connections.consumer(s, "events", group_id=None),
                   connections.admin(s)]
        r_async, r_sync = connections.redis_async(s), connections.redis_sync(s)
        for c in clients:
            if hasattr(c, "_client"):
                await c._client.close()
        await r_async.aclose()
        r_sync.close()
    text = caplog.text
    assert "kafka producer for 10.0.0.5:9093 (SASL_SSL sasl=SCRAM-SHA-512 user=svc)" in text  # it did log
    assert "sends the password unencrypted" in text  # SASL PLAIN without TLS off loopback is called out
    for secret in SECRETS:
        assert secret not in text
    assert all(r.name.startswith(("infogap.stream.connections", "aiokafka", "asyncio")) for r in caplog.records), \
        {r.name for r in caplog.records}


async def test_check_kafka_reports_a_closed_port_as_connection_error():
    s = Settings(kafka_bootstrap="127.0.0.1:1")
    with pytest.raises(ConnectionError, match="no Kafka bootstrap server at 127.0.0.1:1 answered"):
        await connections.check_kafka(s, timeout_s=2)


async def test_check_redis_reports_a_closed_port_as_connection_error():
    with pytest.raises(ConnectionError):
        await connections.check_redis(Settings(redis_url="redis://127.0.0.1:1/0"), timeout_s=2)


def test_secret_str_survives_model_copy():
    s = Settings(redis_password=REDIS_PW).model_copy(update={"redis_prefix": "x:"})
    assert isinstance(s.redis_password, SecretStr) and REDIS_PW not in repr(s)


def test_aiokafka_debug_logs_of_the_sasl_exchange_are_redacted(caplog):
    from aiokafka.protocol.admin import SaslAuthenticateRequest_v1

    caplog.set_level(logging.DEBUG, logger="aiokafka.conn")
    req = SaslAuthenticateRequest_v1(b"\0svc\0" + KAFKA_PW.encode())
    assert KAFKA_PW in str(req)  # what aiokafka would print
    logging.getLogger("aiokafka.conn").debug("Request to %s:%d %d: %s", "127.0.0.1", 9092, 3, req)
    assert KAFKA_PW not in caplog.text
    assert "SaslAuthenticateRequest_v1(<redacted>)" in caplog.text


def test_child_env_makes_a_child_connect_like_the_parent(pem, monkeypatch):
    parent = secured(pem, redis_url=f"rediss://app:{URL_PW}@redis.internal:6380/1", redis_password=None)
    env = connections.child_env(parent)
    for k in [k for k in __import__("os").environ if k.startswith("INFOGAP_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    child = load()
    assert connections.redis_options(child) == connections.redis_options(parent)
    a, b = connections.kafka_options(child), connections.kafka_options(parent)
    assert {k: v for k, v in a.items() if k != "ssl_context"} == {k: v for k, v in b.items() if k != "ssl_context"}
    assert child.pseudonym_key == parent.pseudonym_key and child.redis_url == parent.redis_url


def test_redteam_refuses_a_cluster_url_with_a_message_not_a_traceback(monkeypatch):
    """It plants wrong-type values at raw keys and scans one server: against a cluster it says so, before
    touching anything."""
    from typer.testing import CliRunner

    from infogap.stream.tools.cli import app

    monkeypatch.setenv("INFOGAP_REDIS_URL", "redis+cluster://127.0.0.1:7100")
    res = CliRunner().invoke(app, ["redteam", "--scale", "1"])
    assert res.exit_code == 2, res.output
    assert "runs against one Redis server" in res.output and "Traceback" not in res.output
