"""The console's pages without servers: an in-memory store, no worker; what a person (or an attacker) sees."""
from __future__ import annotations

import base64

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from infogap.stream.console.app import Console
from infogap.stream.console.sources import Sources
from infogap.stream.settings import Settings
from infogap.stream.store import MemoryStore, keys_for
from infogap.stream.store.base import decision_entry

KEY = "a pseudonym key of at least 32 bytes....."


async def _client(settings: Settings, store: MemoryStore) -> TestClient:
    console = Console(settings.model_copy(update={"console_workers": []}), Sources(settings, store=store))
    client = TestClient(TestServer(console.app()))
    await client.start_server()
    return client


@pytest.fixture
def store():
    return MemoryStore(keys_for(Settings()))


async def test_a_users_page_shows_recommendations_and_decisions_escaped_with_a_strict_policy(store):
    doc = {"user_id": "u1", "items": [{"item_id": "<i>x", "score": 0.5, "reason": "<script>alert(1)</script>"}],
           "segment": 2, "generated_at": 1.7e9, "model_version": "t"}
    await store.write(recs=[doc], decisions={"u1": [decision_entry("email", "daily_cap", 1.7e9)]})
    client = await _client(Settings(), store)
    try:
        r = await client.get("/users/u1")
        html = await r.text()
        assert r.status == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
        assert "/items/%3Ci%3Ex" in html and "held: the channel&#39;s daily cap is reached" in html
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        fragment = await (await client.get("/users/u1", headers={"X-Fragment": "1"})).text()
        assert "<html" not in fragment and 'id="recs"' in fragment
        assert "No data about this user" in await (await client.get("/users/nobody")).text()
    finally:
        await client.close()


async def test_with_pseudonyms_a_raw_id_is_looked_up_by_its_pseudonym_and_never_shown(store):
    s = Settings(pseudonym_key=KEY)
    pseudonym = Sources(s, store=store).user_id("alice")
    await store.write(recs=[{"user_id": pseudonym, "items": [], "segment": None, "generated_at": 1.0,
                             "model_version": "t"}])
    client = await _client(s, store)
    try:
        for url in ("/users?q=alice", "/users/alice"):
            r = await client.get(url)
            html = await r.text()
            assert r.status == 200 and str(r.url).endswith(f"/users/{pseudonym}"), url
            assert pseudonym in html and "alice" not in html, url
    finally:
        await client.close()


async def test_bound_beyond_loopback_the_console_needs_a_token_and_asks_every_request_for_it(store):
    with pytest.raises(ValueError, match="INFOGAP_CONSOLE_TOKEN"):
        Console(Settings(console_host="0.0.0.0"))
    token = "a console token of some length"
    client = await _client(Settings(console_host="0.0.0.0", console_token=token), store)
    try:
        r = await client.get("/users/u1")
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        wrong = base64.b64encode(b"ops:guess").decode()
        assert (await client.get("/", headers={"Authorization": f"Basic {wrong}"})).status == 401
        good = base64.b64encode(f"ops:{token}".encode()).decode()
        assert (await client.get("/users/u1", headers={"Authorization": f"Basic {good}"})).status == 200
        assert (await client.get("/users/u1", headers={"Authorization": f"Bearer {token}"})).status == 200
    finally:
        await client.close()


async def test_the_console_only_reads(store):
    client = await _client(Settings(), store)
    try:
        for method in ("POST", "PUT", "DELETE"):
            assert (await client.request(method, "/users/u1")).status == 405
        assert (await client.get("/static/../app.py")).status in (403, 404)
        assert orjson.loads(orjson.dumps(store.writes)) == 0
    finally:
        await client.close()


async def test_a_workers_inspect_routes_refuse_beyond_loopback_without_a_token():
    from aiohttp import web

    from infogap.stream import web_access

    async def user(_request):
        return web.json_response({"user_id": "u1"})

    for host, token, headers, status in (("0.0.0.0", None, {}, 403), ("0.0.0.0", KEY, {}, 401),
                                         ("0.0.0.0", KEY, {"Authorization": f"Bearer {KEY}"}, 200),
                                         ("127.0.0.1", None, {}, 200)):
        from pydantic import SecretStr

        app = web.Application(middlewares=[web_access.guard(host, SecretStr(token) if token else None, "/inspect/")])
        app.router.add_get("/inspect/users/u1", user)
        app.router.add_get("/health", user)
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            assert (await client.get("/inspect/users/u1", headers=headers)).status == status, (host, token, headers)
            assert (await client.get("/health")).status == 200  # probes need no token
        finally:
            await client.close()


async def test_the_experiments_page_gives_each_variant_its_intervals_and_a_verdict_against_the_control(store):
    from infogap.models.experiments import Counts, Segment

    many = (1 << 60) - 1  # the users' bitmap: 60 users behind each variant (the privacy floor shows them)
    await store.write_experiment("winter", {Segment(0, "recs", "email", "new"): Counts(sent=1000, clicks=80, users=many),
                                            Segment(1, "recs", "email", "control"): Counts(sent=1000, clicks=50,
                                                                                           users=many)})
    s = Settings(experiment={"name": "winter", "variants": {"control": 1, "new": 1, "late": 1}})
    client = await _client(s, store)
    try:
        html = await (await client.get("/experiments")).text()
        assert "new ahead of control on CTR: +3.0 points, 95 % interval [+0.8, +5.2] excludes 0" in html
        assert "not enough data yet: late has sent 0 messages, control 1,000" in html
        assert "8.0% <span class=\"ci\">[6.5%, 9.8%]</span>" in html  # new's CTR and its Wilson interval
    finally:
        await client.close()


async def test_odd_ids_reach_their_own_page_and_every_answer_carries_the_security_headers(store):
    odd = ["..", ".", "a{b}c", "with space", "x/y", "ünï"]
    await store.write(recs=[{"user_id": u, "items": [{"item_id": u, "score": 0.5, "reason": "r"}], "segment": None,
                             "generated_at": 1.0, "model_version": "t"} for u in odd])
    client = await _client(Settings(), store)
    try:
        for user in odd:
            r = await client.post("/users", data={"q": user}, allow_redirects=False)
            assert r.status == 303 and "Content-Security-Policy" in r.headers, user
            page = await client.get(r.headers["Location"])
            assert page.status == 200 and 'id="recs"' in await page.text(), (user, r.headers["Location"])
        assert "Content-Security-Policy" in (await client.get("/nowhere")).headers
    finally:
        await client.close()


async def test_on_loopback_a_request_under_another_sites_name_is_refused(store):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 must not read the console."""
    client = await _client(Settings(), store)
    try:
        r = await client.get("/users/u1", headers={"Host": "evil.example:8090"})
        assert r.status == 421 and "Content-Security-Policy" in r.headers
        assert (await client.get("/users/u1", headers={"Host": "localhost:8090"})).status == 200
    finally:
        await client.close()


async def test_a_malformed_login_is_refused_not_a_server_error(store):
    token = "a console token of some length"
    client = await _client(Settings(console_host="0.0.0.0", console_token=token), store)
    try:
        for value in ("Bearer \udcff\udcfe", "Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe").decode(), "Digest x"):
            r = await client.get("/", headers={"Authorization": value.encode("utf-8", "surrogateescape").decode("latin-1")})
            assert r.status == 401 and "Content-Security-Policy" in r.headers, value
    finally:
        await client.close()


async def test_without_kafka_the_dead_letter_page_says_so(store):
    from tests.integration.kafka_helpers import free_port

    s = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens there
    client = await _client(s, store)
    try:
        r = await client.get("/dlq")
        assert r.status == 503 and "Kafka does not answer the console" in await r.text()
    finally:
        await client.close()


async def test_the_segments_page_shows_each_segments_review_topics_and_what_each_topic_is_about(store):
    from infogap.models import Engine, EngineConfig
    from infogap.stream.console.sources import WorkerView
    from infogap.stream.inspection import segments_view

    e = Engine(EngineConfig(n_topics=2, n_segments=2))
    for k in range(60):  # battery people and screen people, each writing about their topic
        words = "battery charge power lasts" if k % 2 else "screen display bright <b>pixels</b>"
        e.learn_one({"event_id": str(k), "user_id": f"u{k % 6}", "type": "review", "ts": 100.0 + k,
                     "item_id": f"i{k % 3}", "text": words})
    sources = Sources(Settings(), store=store)
    console = Console(Settings().model_copy(update={"console_workers": []}), sources)
    client = TestClient(TestServer(console.app()))
    await client.start_server()
    # a worker's /inspect/segments answer, as the sampler keeps it (it never asks a worker without /stats samples)
    sources.workers.append(WorkerView("http://127.0.0.1:1", segments=orjson.loads(orjson.dumps(segments_view(e)))))
    try:
        html = await (await client.get("/segments")).text()
        assert 'id="topics"' in html and "battery" in html and "screen" in html
        assert "pixels" in html and "<b>" not in html  # (tokens are words: markup never survives)
        assert "topic 0" in html or "topic 1" in html  # a segment's topic shares
    finally:
        await client.close()


async def test_the_experiments_page_shows_the_control_groups_retention_under_the_privacy_floor(store):
    from infogap.models.retention import Cohort, CohortCounts

    await store.write_retention("recs", {
        Cohort(0, "recs", "email", "A", "treated"): CohortCounts(entered=40, d1_users=40, d1_returned=12),
        Cohort(0, "recs", "email", "A", "control"): CohortCounts(entered=3, d1_users=3, d1_returned=1),
        Cohort(0, "winter", "app", "A", "treated"): CohortCounts(entered=20, d1_users=20, d1_returned=10),
        Cohort(0, "winter", "app", "A", "control"): CohortCounts(entered=10, d1_users=10, d1_returned=2)})
    client = await _client(Settings(), store)
    try:
        html = await (await client.get("/experiments")).text()
        assert "recs: retention, treated vs control" in html
        assert "30.0%" in html and "33.3%" not in html and "&lt; 5 users" in html  # 3 control users: hidden
        assert "-3.3 pts" not in html  # nor the lift, which would give them away
        assert "50.0%" in html and "20.0%" in html and "+30.0 pts" in html  # winter: both arms at the floor
    finally:
        await client.close()
