"""The secured local servers of stream/tools/local.py (SASL broker, Redis with passwords) without starting them."""
from __future__ import annotations

import hashlib
import stat

import pytest

from infogap.stream.tools import local
from infogap.stream.settings import Settings

PW = "alice-Pa55-9d2"


@pytest.fixture
def sasl_settings(tmp_path) -> Settings:
    return Settings(kafka_bootstrap="127.0.0.1:1", kafka_controller_port=2, redis_url="redis://127.0.0.1:3/0",
                    local_dir=tmp_path, kafka_security_protocol="SASL_PLAINTEXT", kafka_username="alice",
                    kafka_password=PW, redis_password="redis-Pa55-77")


def test_default_properties_are_unchanged_by_the_sasl_option(sasl_settings):
    plain = Settings(kafka_bootstrap="127.0.0.1:1", kafka_controller_port=2, local_dir=sasl_settings.local_dir)
    props = local.server_properties(plain)
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1,CONTROLLER://127.0.0.1:2"
    assert not any("sasl" in k for k in props)
    assert local.server_properties(plain, sasl_users=None) == props


def test_sasl_properties_leave_no_listener_unauthenticated(sasl_settings):
    props = local.server_properties(sasl_settings, sasl_users={"alice": PW, "bob": "bob-pw"})
    assert props["listeners"] == "SASL_PLAINTEXT://127.0.0.1:1,CONTROLLER://127.0.0.1:2"
    assert props["listener.security.protocol.map"] == "CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
    assert props["sasl.enabled.mechanisms"] == "PLAIN"
    assert props["inter.broker.listener.name"] == "SASL_PLAINTEXT"
    jaas = props["listener.name.sasl_plaintext.plain.sasl.jaas.config"]
    assert jaas.startswith("org.apache.kafka.common.security.plain.PlainLoginModule required ")
    assert f'user_alice="{PW}"' in jaas and 'user_bob="bob-pw"' in jaas and jaas.endswith(";")
    assert f'username="{local.BROKER_USER}"' in jaas
    assert props["listener.name.controller.plain.sasl.jaas.config"] == jaas
    assert "PLAINTEXT://" not in props["listeners"].replace("SASL_PLAINTEXT://", "")


@pytest.mark.parametrize("users", [{}, {"al ice": "pw"}, {"alice": 'p"w'}, {"alice": ""}, {"alice": "a;b"},
                                   {local.BROKER_USER: "pw"}])
def test_bad_sasl_users_are_refused(sasl_settings, users):
    with pytest.raises(local.LocalServerError):
        local.server_properties(sasl_settings, sasl_users=users)


def test_config_with_passwords_is_private(sasl_settings):
    p = local.paths(sasl_settings)
    local._write_kafka_config(sasl_settings, p, {"alice": PW})
    assert stat.S_IMODE(p.kafka_props.stat().st_mode) == 0o600
    assert f'user_alice="{PW}"' in p.kafka_props.read_text()


def test_redis_acl_lines_keep_only_hashes():
    line = local._redis_acl_line("app", "s3cret-pw")
    assert "s3cret-pw" not in line
    assert line == f"user app reset on #{hashlib.sha256(b's3cret-pw').hexdigest()} ~* &* +@all"
    with pytest.raises(local.LocalServerError):
        local._redis_acl_line("bad name", "pw")


def test_up_refuses_sasl_users_that_do_not_include_the_settings_user(sasl_settings, monkeypatch):
    monkeypatch.setattr(local, "_start_redis", lambda *a, **k: None)
    with pytest.raises(local.LocalServerError, match="one of sasl_users"):
        local.up(sasl_settings, sasl_users={"bob": "bob-pw"})
    with pytest.raises(local.LocalServerError, match="one of sasl_users"):
        local.up(sasl_settings, sasl_users={"alice": "not-the-settings-password"})
    assert not local.paths(sasl_settings).kafka_props.exists()


def test_up_does_not_start_a_secured_broker_without_sasl_users(sasl_settings, monkeypatch):
    monkeypatch.setattr(local, "_start_redis", lambda *a, **k: None)
    with pytest.raises(local.LocalServerError, match="only for tests"):
        local.up(sasl_settings)
