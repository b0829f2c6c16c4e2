"""stream/local.py without Kafka or Redis: configuration, pid-file safety, error messages."""
from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import time

import pytest

from stream import local
from stream.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(kafka_bootstrap="127.0.0.1:29092", kafka_controller_port=29093,
                    redis_url="redis://127.0.0.1:26379/0", local_dir=tmp_path)


def test_server_properties_single_combined_kraft_node(settings, tmp_path):
    props = local.server_properties(settings)
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:29093"
    assert "controller.quorum.voters" not in props  # --standalone formatting forbids it
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["log.dirs"].startswith(str(tmp_path))


def test_written_config_is_a_properties_file(settings):
    p = local.paths(settings)
    local._write_kafka_config(settings, p)
    lines = [ln for ln in p.kafka_props.read_text().splitlines() if ln and not ln.startswith("#")]
    assert dict(ln.split("=", 1) for ln in lines) == local.server_properties(settings)
    assert "shutdownHook = disable" in p.kafka_log4j.read_text()


def test_cluster_id_is_a_kafka_uuid():
    for _ in range(200):
        cid = local._new_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_process_recognition(settings):
    p = local.paths(settings)
    is_kafka, is_redis = local._is_our_kafka(p), local._is_our_redis(settings)
    java = ["/usr/bin/java", "-Xmx512m", "-cp", f"{p.libs}/*", "kafka.Kafka", str(p.kafka_props)]
    assert is_kafka(java)
    assert not is_kafka(java[:-1] + ["/elsewhere/server.properties"])  # another local_dir's broker
    assert not is_kafka(["/usr/bin/python3", "kafka.Kafka", str(p.kafka_props)])
    assert is_redis(["/usr/bin/redis-server", "--bind", "127.0.0.1", "--port", "26379"])
    assert is_redis(["/usr/bin/redis-server 127.0.0.1:26379"])  # argv as rewritten by a running redis
    assert not is_redis(["/usr/bin/redis-server 127.0.0.1:6379"])
    assert not is_redis(["/bin/sleep", "26379"])
    assert not is_kafka([]) and not is_redis([])


def test_down_leaves_a_foreign_process_alone(settings):
    """A pid file pointing at a process that is not ours (pid reuse): not signalled, pid file removed."""
    p = local.paths(settings)
    p.kafka_dir.mkdir(parents=True)
    p.redis_dir.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        p.kafka_pid.write_text(f"{other.pid}\n")
        p.redis_pid.write_text(f"{other.pid}\n")
        local.down(settings)
        assert other.poll() is None, "down() killed a process it did not start"
        assert not p.kafka_pid.exists() and not p.redis_pid.exists()
    finally:
        other.kill()
        other.wait()


def test_down_without_pid_files_is_a_no_op(settings):
    local.down(settings)


def test_down_stops_what_it_started(settings, caplog):
    """A process whose cmdline matches ours is stopped with SIGTERM (and reaped, no zombie left)."""
    caplog.set_level(logging.INFO, logger="stream.local")
    p = local.paths(settings)
    p.redis_dir.mkdir(parents=True)
    # `exec -a` gives the process the argv of a redis-server on our port
    proc = subprocess.Popen(["bash", "-c", f"exec -a redis-server {sys.executable} -c 'import time; time.sleep(60)' "
                                           f"--port {settings.redis_port}"])
    try:
        p.redis_pid.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 5  # until bash has exec'd
        while local._live_pid(p.redis_pid, local._is_our_redis(settings)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert local._live_pid(p.redis_pid, local._is_our_redis(settings)) == proc.pid
        local.down(settings)
        # down() reaped its child already (so Popen.wait() can no longer see the signal): check /proc
        assert local._gone(proc.pid)
        assert f"stopping pid {proc.pid}" in caplog.text
        assert not p.redis_pid.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stale_pid_file_is_not_live(settings):
    p = local.paths(settings)
    p.kafka_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    p.kafka_pid.write_text(f"{dead.pid}\n")
    assert local._live_pid(p.kafka_pid, local._is_our_kafka(p)) is None
    p.kafka_pid.write_text("not a pid")
    assert local._live_pid(p.kafka_pid, local._is_our_kafka(p)) is None


def test_up_refuses_to_start_servers_off_loopback(tmp_path):
    s = Settings(kafka_bootstrap="kafka.invalid:9092", redis_url="redis://127.0.0.1:1/0", local_dir=tmp_path)
    with pytest.raises(local.LocalServerError, match="only starts servers on loopback"):
        local.up(s)
    assert not (tmp_path / "redis").exists(), "nothing may be started when the settings point elsewhere"


def test_fetch_without_maven_says_how_to_install_it(settings, monkeypatch):
    monkeypatch.setattr(local.shutil, "which", lambda name: None)
    with pytest.raises(local.LocalServerError, match="apt-get install -y maven"):
        local.fetch_kafka_jars(settings)


def test_fetch_is_skipped_when_the_stamp_matches(settings, monkeypatch):
    import hashlib

    p = local.paths(settings)
    p.libs.mkdir(parents=True)
    p.libs_stamp.write_text(hashlib.sha256(local.POM.read_bytes()).hexdigest() + "\n")
    monkeypatch.setattr(local.subprocess, "run", lambda *a, **k: pytest.fail("mvn must not run"))
    assert local.fetch_kafka_jars(settings) == p.libs


def test_module_cli_rejects_unknown_commands():
    with pytest.raises(SystemExit):
        local.main(["frobnicate"])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_zombie_detection():
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while not local._is_zombie(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert local._is_zombie(proc.pid)
    assert local._gone(proc.pid)  # reaps it
