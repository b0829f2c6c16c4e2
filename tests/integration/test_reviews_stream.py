"""Reviews through a real worker, Kafka and Redis: what a customer writes changes what Redis serves them.

Two planted pairs (a Kindle with its cover, a kettle with its teapot), each bought by 10 people. Other customers
write rated Chinese reviews; the population learner learns the sentiment and topic models from them and
publishes them; the worker reads alice's reviews, which carry no rating, with those models.
"""
from __future__ import annotations

import asyncio

import orjson
from typer.testing import CliRunner

from infogap.stream import connections
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce, running_worker

ITEMS = [("kindle", "Kindle Paperwhite", "Books"), ("cover", "Kindle cover", "Books"),
         ("kettle", "Steel kettle", "Kitchen"), ("teapot", "Glass teapot", "Kitchen"), ("mug", "Mug", "Kitchen")]
LIKED = ["质量很好，非常满意，推荐购买", "很喜欢，物流很快，质量不错", "非常好用，满意，会回购"]
DISLIKED = ["质量太差，很失望，不推荐", "用了一天就坏了，太差了，退货", "很失望，质量差，不值这个价"]


def _events():
    out, k = [], 0

    def add(user, typ, item, **extra):
        nonlocal k
        out.append({"event_id": f"e{k}", "user_id": user, "type": typ, "ts": 1_732_460_000.0 + k, "item_id": item,
                    **extra})
        k += 1

    for n in range(10):
        for a, b in (("kindle", "cover"), ("kettle", "teapot")):
            add(f"{a}-buyer{n}", "purchase", a)
            add(f"{a}-buyer{n}", "purchase", b)
    for n in range(40):  # the rated reviews that teach the sentiment model
        liked = n % 2 == 0
        add(f"critic{n}", "review", "mug", text=(LIKED if liked else DISLIKED)[n % 3], rating=5 if liked else 1)
    add("alice", "view", "kindle")
    add("alice", "view", "kettle")
    return out


def _recs(raw) -> list[dict]:
    return orjson.loads(raw)["items"] if raw else []


async def test_a_written_review_changes_the_stored_recommendations_and_the_report_shows_the_topics(settings):
    settings = settings.model_copy(update={"neighbour_max_age_s": 0.0, "publish_interval_s": 0.2,
                                           "review_models_publish_s": 0.2, "push_enabled": False})
    key = f"{settings.redis_prefix}recs:alice"
    r = connections.redis_async(settings)
    try:
        async with running_worker(settings) as worker:
            await produce(settings, settings.topics.items,
                          [(i, {"item_id": i, "title": t, "category": c}) for i, t, c in ITEMS])
            events = _events()
            await produce(settings, settings.topics.events, [(e["user_id"], e) for e in events])
            await wait_for(lambda: worker.stats.events_in >= len(events), deadline_s=60, what="the events processed")
            # the published sentiment model has learned the 40 rated reviews, and the worker reads with it
            await wait_for(lambda: worker.engine.sentiment.n_learned >= 40, deadline_s=30,
                           what="the worker to load the learner's sentiment model")
            await produce(settings, settings.topics.events,  # alice views the kettle again: ranked with both pairs
                          [("alice", {"event_id": "a1", "user_id": "alice", "type": "view", "item_id": "kettle",
                                      "ts": 1_732_470_000.0})])
            await wait_for(lambda: r.get(key), what="alice's recommendations")

            async def ranked_with_both():
                ids = [x["item_id"] for x in _recs(await r.get(key))]
                return {"cover", "teapot"} <= set(ids[:3])
            await wait_for(ranked_with_both, deadline_s=30, what="the cover and the teapot recommended to alice")

            # no rating: the worker reads the text with the learned model (disliked), and the teapot falls
            await produce(settings, settings.topics.events,
                          [("alice", {"event_id": "a2", "user_id": "alice", "type": "review", "item_id": "kettle",
                                      "ts": 1_732_470_010.0, "text": "水壶质量太差，很失望，用了一天就坏了"})])

            async def teapot_fell():
                ids = [x["item_id"] for x in _recs(await r.get(key))]
                return ids[:1] == ["cover"] and "teapot" not in ids[:2] and "kettle" not in ids
            await wait_for(teapot_fell, deadline_s=30, what="the teapot below the cover after the disliked review")
            assert worker.engine.profile("alice")["categories"].get("Kitchen", 0.0) < \
                worker.engine.profile("alice")["categories"]["Books"]

            # a liked review of the Kindle: its cover's reason says so
            await produce(settings, settings.topics.events,
                          [("alice", {"event_id": "a3", "user_id": "alice", "type": "review", "item_id": "kindle",
                                      "ts": 1_732_470_020.0, "text": "非常满意，质量很好，推荐"})])

            async def liked_reason():
                items = _recs(await r.get(key))
                return items and items[0]["item_id"] == "cover" and \
                    items[0]["reason"].startswith("you liked Kindle Paperwhite (review)")
            await wait_for(liked_reason, deadline_s=30, what="'you liked Kindle Paperwhite (review)' as the reason")
            async def topics_published():  # learned from every review: the 40 rated ones and alice's 2
                raw = await r.get(f"{settings.redis_prefix}model:topics")
                return raw is not None and orjson.loads(raw)["n_learned"] == 42
            await wait_for(topics_published, what="the topic model published with every review")
    finally:
        await r.aclose()
    from infogap.stream.tools.cli import app

    env = {"INFOGAP_REDIS_URL": settings.redis_url, "INFOGAP_REDIS_PREFIX": settings.redis_prefix}
    out = await asyncio.to_thread(CliRunner().invoke, app, ["report"], env=env)  # (the CLI runs its own loop)
    assert out.exit_code == 0, out.output
    assert "What reviews talk about (42 reviews learned)" in out.output
    assert any(w in out.output for w in ("质量", "失望", "满意")), out.output


async def test_a_hostile_review_model_in_redis_is_refused_and_the_learner_s_next_one_is_read(settings):
    """Redis holds topic and sentiment models that ask for a billion buckets, a runaway learning rate and
    a huge stacker weight. The worker refuses them (it would otherwise run out of memory at every restart: a
    crash loop), goes on with the models it has, and reads the learner's own models once it publishes them."""
    from infogap.models.sentiment import SentimentModel
    from infogap.models.topics import TopicModel

    settings = settings.model_copy(update={"neighbour_max_age_s": 0.0, "publish_interval_s": 0.2,
                                           "review_models_publish_s": 0.2, "push_enabled": False})
    topics = TopicModel(n_topics=2, n_buckets=4).to_state()
    topics["settings"]["n_buckets"] = 10**9
    sentiment = SentimentModel().to_state()
    sentiment["config"]["lr"] = 1e308
    sentiment["stack"]["weights"]["lex"] = -1e300
    r = connections.redis_async(settings)
    try:
        await r.set(f"{settings.redis_prefix}model:topics", orjson.dumps(topics))
        await r.set(f"{settings.redis_prefix}model:sentiment", orjson.dumps(sentiment))
        async with running_worker(settings) as worker:
            await produce(settings, settings.topics.items,
                          [(i, {"item_id": i, "title": t, "category": c}) for i, t, c in ITEMS])
            events = _events()
            await produce(settings, settings.topics.events, [(e["user_id"], e) for e in events])
            await wait_for(lambda: worker.stats.events_ok >= len(events), what="every event learned")
            # the learner's models, learned from the 40 rated reviews, replace the hostile ones in Redis and are read
            await wait_for(lambda: worker.engine.sentiment.n_learned >= 40 and worker.engine.topics.n_learned >= 40,
                           what="the worker to read the learner's models")
            assert worker.engine.topics.n_buckets == TopicModel().n_buckets and worker.engine.sentiment.lr < 1
            await wait_for(lambda: r.get(f"{settings.redis_prefix}recs:alice"), what="alice's recommendations")
    finally:
        await r.aclose()
