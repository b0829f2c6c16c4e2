"""Shared fixtures. Integration tests run against the real Kafka and Redis that ``infogap up`` starts.

Each integration test gets its own topics (a unique topic prefix), Redis key prefix and consumer
group, so tests never see each other's data and can run against a long-lived local stack.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest


def pytest_configure(config):
    """Kernels cached from an older models/ would be loaded stale (see infogap.stream.tools.kernel_cache)."""
    from infogap.stream.tools.kernel_cache import drop_stale_kernels

    drop_stale_kernels()


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def local_stack():
    """Kafka and Redis on loopback, started by the project's own `up` if not already answering."""
    from infogap.stream.tools import local
    from infogap.stream.settings import load

    settings = load()
    local.up(settings)
    return settings


@pytest.fixture(scope="session")
def redis_cluster():
    """The ``redis+cluster://`` URL of a Redis Cluster on loopback (3 masters, 1 replica each, 127.0.0.1:7100-7105),
    started by `cluster_up` if not already healthy and, like `local_stack`, left running."""
    from infogap.stream.tools import local
    from infogap.stream.settings import load

    return local.cluster_up(load(), masters=3, replicas=1, base_port=7100)


@pytest.fixture
def settings(local_stack):
    """Settings with per-test topics, Redis prefix and consumer group; the topics are created."""
    from infogap.stream.tools import local

    tag = uuid.uuid4().hex[:10]
    s = local_stack.model_copy(update={"topic_prefix": f"t{tag}.", "redis_prefix": f"test:{tag}:",
                                       "consumer_group": f"g-{tag}", "batch_timeout_ms": 50,
                                       "http_port": None,
                                       # the privacy floor (5 users) off: most tests plant a few users; it has its own
                                       "engine": {"min_users": 1}})
    local.ensure_topics(s)
    yield s
    _delete_topics(s)
    _delete_keys(s)


@pytest.fixture
def scoped_settings(local_stack):
    """A factory of settings with their own topics (created), Redis prefix and consumer group, for tests
    that run several independent streams; everything they created is dropped afterwards."""
    from infogap.stream.tools import local

    made = []

    def make():
        tag = uuid.uuid4().hex[:8]
        s = local_stack.model_copy(update={"topic_prefix": f"t{tag}.", "redis_prefix": f"test:{tag}:",
                                           "consumer_group": f"g-{tag}"})
        local.ensure_topics(s)
        made.append(s)
        return s

    yield make
    for s in made:
        _delete_topics(s)
        _delete_keys(s)


def _delete_keys(s) -> None:
    """Drop a test's Redis keys, so the shared server does not grow run after run."""
    from infogap.stream import connections

    r = connections.redis_sync(s)
    try:
        batch = []
        for key in r.scan_iter(match=f"{s.redis_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                r.unlink(*batch)
                batch = []
        if batch:
            r.unlink(*batch)
    except Exception:  # a failed cleanup must not fail the test that ran
        pass
    finally:
        r.close()


def _delete_topics(s) -> None:
    """Drop a test's topics so the local broker does not accumulate partitions run after run."""
    from infogap.stream import connections

    async def drop():
        admin = connections.admin(s)
        await admin.start()
        try:
            await admin.delete_topics(list(s.topics.all().values()))
        finally:
            await admin.close()

    try:
        asyncio.run(drop())
    except Exception:  # a failed cleanup must not fail the test that ran
        pass


async def wait_for(predicate, *, deadline_s: float = 60.0, interval_s: float = 0.05, what: str = "condition"):
    """Await ``predicate()`` (sync or async) until truthy; fail with ``what`` after the deadline (60 s unless told:
    what passes in a second here has taken over 40 s on a loaded CI machine, and a wait that passes ends early)."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)
