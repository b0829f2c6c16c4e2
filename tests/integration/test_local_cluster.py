"""The local Redis Cluster that ``infogap.stream.tools.local.cluster_up`` starts (3 masters, 1 replica each, 127.0.0.1:7100-7105).

The shared cluster is left running; restarting a broken cluster and ``cluster_down`` are tested on a second one
with its own ports and ``local_dir``.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import redis
from redis.cluster import ClusterNode

from infogap.stream.tools import local
from infogap.stream.settings import load

pytestmark = pytest.mark.integration


def _auth(settings) -> dict:
    password = settings.redis_password.get_secret_value() if settings.redis_password is not None else None
    return {"username": settings.redis_username, "password": password}


def _cluster_client(ports: list[int], settings) -> redis.RedisCluster:
    return redis.RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port) for port in ports],
                              decode_responses=True, **_auth(settings))


def _node(port: int, settings) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, **_auth(settings))


def _topology(port: int, settings) -> list[dict]:
    with _node(port, settings) as r:
        return local.parse_cluster_nodes(r.execute_command("CLUSTER", "NODES"))


def _free_base_port(count: int) -> int:
    """A base port with ``count`` free ports from it (and their cluster bus ports, +10000)."""
    for base in range(7200, 7900, 20):
        if not any(local._tcp_open("127.0.0.1", port) or local._tcp_open("127.0.0.1", port + 10000)
                   for port in range(base, base + count)):
            return base
    pytest.skip("no 6 consecutive free ports in 7200-7900")


def test_three_masters_three_replicas_and_every_slot_covered(redis_cluster):
    s = load()
    masters = local.cluster_ports(redis_cluster)
    nodes = _topology(masters[0], s)
    master_ids = {n["id"]: n["port"] for n in nodes if "master" in n["flags"]}
    replicas = [n for n in nodes if "slave" in n["flags"]]
    assert sorted(master_ids.values()) == sorted(masters) and len(masters) == 3
    assert len(replicas) == 3
    assert sorted(master_ids[r["master"]] for r in replicas) == sorted(masters), "one replica per master"
    assert sum(n["slots"] for n in nodes if "master" in n["flags"]) == local.CLUSTER_SLOTS
    for n in nodes:
        with _node(n["port"], s) as r:
            info = r.execute_command("CLUSTER INFO")
            assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == local.CLUSTER_SLOTS
            if n in replicas:
                assert r.info("replication")["master_link_status"] == "up"


def test_a_key_written_through_one_node_is_readable_through_another(redis_cluster):
    s = load()
    masters = local.cluster_ports(redis_cluster)
    keys = [f"test:cluster:{uuid.uuid4().hex}:{i}" for i in range(20)]  # spread over the slots of all masters
    with _cluster_client(masters[:1], s) as writer, _cluster_client(masters[-1:], s) as reader:
        try:
            for key in keys:
                writer.set(key, key[-2:])
            assert {writer.get_node_from_key(key).port for key in keys} == set(masters)
            assert [reader.get(key) for key in keys] == [key[-2:] for key in keys]
            owner = writer.get_node_from_key(keys[0]).port
            with _node(owner, s) as r:  # the master of the key's slot holds it, no redirection
                assert r.get(keys[0]) == keys[0][-2:]
        finally:
            for key in keys:
                writer.delete(key)


def test_failover_swaps_a_master_and_its_replica_and_keeps_the_data(redis_cluster):
    s = load()
    masters = local.cluster_ports(redis_cluster)
    key = f"test:cluster:{uuid.uuid4().hex}"
    with _cluster_client(masters, s) as client:
        client.set(key, "before")
        old = client.get_node_from_key(key).port
        try:
            new = local.cluster_failover(redis_cluster, old, settings=s)
            assert new != old
            with _node(new, s) as r:
                assert r.info("replication")["role"] == "master"
                assert r.get(key) == "before"  # the new master owns the slot now
            with _node(old, s) as r:
                repl = r.info("replication")
                assert repl["role"] == "slave" and repl["master_port"] == new and repl["master_link_status"] == "up"
            views = {n["port"]: n["flags"] for n in _topology(old, s)}
            assert "master" in views[new] and "slave" in views[old]
            assert client.get(key) == "before"  # an existing client follows the MOVED redirection
            with _cluster_client(masters, s) as fresh:
                assert fresh.get(key) == "before"
                fresh.set(key, "after")
            # and back, so the shared cluster keeps the layout that the session's URL names
            assert local.cluster_failover(redis_cluster, new, settings=s) == old
            assert client.get(key) == "after"
            assert local.cluster_up(s) == redis_cluster
        finally:
            client.delete(key)


def test_cluster_up_again_keeps_the_running_cluster_and_is_fast(redis_cluster):
    s = load()
    before = {n["port"]: n["pid"] for n in local.cluster_status(s)["nodes"]}
    t0 = time.monotonic()
    first = local.cluster_up(s)
    second = local.cluster_up(s)
    elapsed = time.monotonic() - t0
    assert first == second == local.cluster_status(s)["url"]
    assert {n["port"]: n["pid"] for n in local.cluster_status(s)["nodes"]} == before
    assert elapsed < 2.0, f"two cluster_up() of a running cluster took {elapsed:.2f} s"


def test_a_broken_cluster_is_started_afresh_and_down_stops_it(tmp_path):
    s = load().model_copy(update={"local_dir": tmp_path})
    base = _free_base_port(6)
    try:
        url = local.cluster_up(s, base_port=base)
        assert local.cluster_ports(url) == [base, base + 1, base + 2]
        nodes = local.cluster_status(s)["nodes"]
        assert [n["port"] for n in nodes] == list(range(base, base + 6))
        assert all(n["cluster_state"] == "ok" for n in nodes)
        first_pids = {n["port"]: n["pid"] for n in nodes}
        os.kill(first_pids[base + 5], signal.SIGKILL)  # a replica dies: the cluster is no longer whole
        assert local.cluster_up(s, base_port=base) == url
        nodes = local.cluster_status(s)["nodes"]
        assert all(n["cluster_state"] == "ok" for n in nodes)
        second_pids = {n["pid"] for n in nodes}
        assert not set(first_pids.values()) & second_pids, "every node started afresh"
        with _cluster_client([base], s) as client:
            assert client.dbsize() == 0  # empty: nodes.conf and data were wiped
    finally:
        local.cluster_down(s)
    assert local.cluster_status(s) is None
    assert all(local._gone(pid) for pid in {*first_pids.values(), *second_pids})
    assert not any(local._tcp_open("127.0.0.1", port) for port in range(base, base + 6))
