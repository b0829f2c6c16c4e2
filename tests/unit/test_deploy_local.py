"""stream/tools/local.py without Kafka or Redis: configuration, pid-file safety, error messages."""
from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import time

import pytest
from pydantic import SecretStr

from infogap.stream.tools import local
from infogap.stream.settings import Settings


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
    caplog.set_level(logging.INFO, logger="infogap.stream.tools.local")
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


# --------------------------------------------------------------------------------------------- redis cluster


def test_cluster_url_round_trip():
    url = local.cluster_url([7100, 7101, 7102])
    assert url == "redis+cluster://127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102"
    assert local.cluster_ports(url) == [7100, 7101, 7102]
    assert local.cluster_ports((7100, "7101")) == [7100, 7101]


@pytest.mark.parametrize("url", ["redis://127.0.0.1:7100", "redis+cluster://", "redis+cluster://10.0.0.1:7100",
                                 "redis+cluster://127.0.0.1:x", "redis+cluster://u:secret@127.0.0.1:7100"])
def test_cluster_ports_refuses_what_is_not_a_local_cluster_url(url):
    with pytest.raises(local.LocalServerError) as err:
        local.cluster_ports(url)
    assert "secret" not in str(err.value)


def test_cluster_node_command(tmp_path):
    cmd = local.cluster_node_command("/usr/bin/redis-server", 7101, tmp_path / "7101")
    pairs = dict(zip(cmd[1::2], cmd[2::2]))
    assert pairs["--cluster-enabled"] == "yes" and pairs["--cluster-config-file"] == "nodes.conf"
    assert pairs["--cluster-node-timeout"] == "2000" and pairs["--save"] == "" and pairs["--appendonly"] == "no"
    assert pairs["--bind"] == "127.0.0.1" and pairs["--port"] == "7101" and pairs["--daemonize"] == "no"
    assert pairs["--dir"] == str(tmp_path / "7101") and pairs["--logfile"] == str(tmp_path / "7101" / "redis.log")
    with_conf = local.cluster_node_command("/usr/bin/redis-server", 7101, tmp_path, tmp_path / "auth.conf")
    assert with_conf[1] == str(tmp_path / "auth.conf")  # a config file must come first
    assert local._is_redis_on(7101)(cmd) and not local._is_redis_on(7100)(cmd)
    assert local._is_redis_on(7101)(["/usr/bin/redis-server 127.0.0.1:7101 [cluster]"])  # argv as rewritten


def test_cluster_create_command_keeps_the_password_off_the_command_line():
    cmd = local.cluster_create_command("/usr/bin/redis-cli", [7100, 7101, 7102, 7103, 7104, 7105], 1, user="alice")
    assert cmd[:3] == ["/usr/bin/redis-cli", "--user", "alice"]
    assert cmd[3:5] == ["--cluster", "create"]
    assert cmd[5:11] == [f"127.0.0.1:{p}" for p in range(7100, 7106)]
    assert cmd[11:] == ["--cluster-replicas", "1", "--cluster-yes"]
    assert "-a" not in cmd and "--user" not in local.cluster_create_command("redis-cli", [1, 2, 3], 0)


def test_parse_cluster_nodes():
    text = (
        "aaa 127.0.0.1:7100@17100 myself,master - 0 0 1 connected 0-5460\n"
        "bbb 127.0.0.1:7101@17101 master - 0 1700000000000 2 connected 5461-10922 [10923->-ccc]\n"
        "ccc 127.0.0.1:7102@17102 master,fail? - 0 1700000000000 3 disconnected 10923 10924-16383\n"
        "ddd 127.0.0.1:7103@17103 slave aaa 0 1700000000000 1 connected\n"
        "eee :7104@17104 myself,master - 0 0 0 connected\n"
    )
    nodes = {n["port"]: n for n in local.parse_cluster_nodes(text)}
    assert [nodes[p]["slots"] for p in (7100, 7101, 7102, 7103, 7104)] == [5461, 5462, 5461, 0, 0]
    assert nodes[7100]["flags"] == {"myself", "master"} and nodes[7100]["master"] is None
    assert nodes[7103]["master"] == "aaa" and nodes[7102]["connected"] is False
    assert local._topology(list(nodes.values())) == frozenset(
        {(7100, None), (7101, None), (7102, None), (7103, 7100), (7104, None)})


def test_cluster_up_needs_three_masters(settings):
    with pytest.raises(local.LocalServerError, match="at least 3 masters"):
        local.cluster_up(settings, masters=2)
    assert not local.paths(settings).redis_cluster_dir.exists()


def test_cluster_down_and_status_without_a_cluster(settings):
    local.cluster_down(settings)
    assert local.cluster_status(settings) is None


def test_cluster_down_stops_only_its_own_nodes(settings):
    """A node dir whose pid file names another process (pid reuse) is left alone, like `down`."""
    d = local.paths(settings).redis_cluster_dir / "1"  # (port 1: nothing answers there)
    d.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d / "redis.pid").write_text(f"{other.pid}\n")
        assert local.cluster_status(settings)["nodes"] == [
            {"port": 1, "pid": None, "role": None, "cluster_state": None, "log": str(d / "redis.log")}]
        local.down(settings)
        assert other.poll() is None, "cluster_down() killed a process it did not start"
        assert not (d / "redis.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_cluster_credentials_file(settings, tmp_path, monkeypatch):
    """With a password, each node gets a private config: an ACL hash for clients, masterauth for its replicas."""
    s = settings.model_copy(update={"redis_username": "alice", "redis_password": SecretStr('p"w\\1')})
    spawned = []
    monkeypatch.setattr(local, "_spawn", lambda cmd, *a: spawned.append(cmd) or 1)
    monkeypatch.setattr(local, "_tcp_open", lambda host, port, timeout=0.5: False)
    local._start_cluster_nodes(local.paths(s), [7100], local._redis_auth(s))
    conf = local.paths(s).redis_cluster_dir / "7100" / "auth.conf"
    assert spawned[0][1] == str(conf) and not any("p\"w" in a for a in spawned[0])
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    text = conf.read_text()
    assert "user alice reset on #" in text and "masteruser alice\n" in text
    assert 'masterauth "p\\"w\\\\1"\n' in text
