"""Reviews change recommendations by what they say: a planted review stream (issue 22).

The catalog has two planted pairs: people who buy the Kindle also buy its cover, people who buy the
kettle also buy the teapot. Alice has looked at both the Kindle and the kettle, so both partners are
recommended to her. What she writes next decides which one stays.
"""
from __future__ import annotations

import orjson
import pytest

from infogap.models import Engine, EngineConfig
from infogap.models.events import InvalidEvent, ReasonCode, parse_event

ITEMS = [("kindle", "Kindle Paperwhite", "Books"), ("cover", "Kindle cover", "Books"),
         ("kettle", "Steel kettle", "Kitchen"), ("teapot", "Glass teapot", "Kitchen"),
         ("novel", "A novel", "Books"), ("mug", "Mug", "Kitchen")]
LIKED = ["Great reader, love it, excellent screen", "excellent quality, love it", "great value, works perfectly"]
DISLIKED = ["Terrible, broke after a day, awful", "awful quality, broke, terrible waste", "terrible, do not buy, awful"]


def _engine(**cfg) -> Engine:
    e = Engine(EngineConfig(**cfg))
    for item_id, title, category in ITEMS:
        e.upsert_item({"item_id": item_id, "title": title, "category": category})
    events, k = [], 0
    for n in range(12):  # the planted pairs, each bought by 12 people
        for a, b in (("kindle", "cover"), ("kettle", "teapot")):
            for item in (a, b):
                events.append({"event_id": f"p{k}", "user_id": f"{a}-buyer{n}", "type": "purchase",
                               "ts": 1_000.0 + k, "item_id": item})
                k += 1
    for n in range(6):  # some noise: novels and mugs alone
        for item in ("novel", "mug"):
            events.append({"event_id": f"n{k}", "user_id": f"loner{n}", "type": "view", "ts": 1_000.0 + k,
                           "item_id": item})
            k += 1
    # rated reviews by others teach the sentiment model what liked and disliked read like
    for n in range(30):
        text, rating = (LIKED[n % 3], 5.0) if n % 2 else (DISLIKED[n % 3], 1.0)
        events.append({"event_id": f"r{k}", "user_id": f"critic{n}", "type": "review", "ts": 1_000.0 + k,
                       "item_id": "novel" if n % 2 else "mug", "text": text, "rating": rating})
        k += 1
    e.learn_many(events)
    for k, item in enumerate(("kindle", "kettle")):  # alice looks at both
        e.learn_one({"event_id": f"a{k}", "user_id": "alice", "type": "view", "ts": 5_000.0 + k, "item_id": item})
    return e


def _review(e: Engine, item: str, text: str, rating: float | None = None, ts: float = 6_000.0) -> None:
    ev = {"event_id": f"rev-{item}-{ts}", "user_id": "alice", "type": "review", "ts": ts, "item_id": item,
          "text": text}
    if rating is not None:
        ev["rating"] = rating
    e.learn_one(ev)


def _ids(e: Engine, user: str = "alice") -> list[str]:
    return [r.item_id for r in e.recommend(user, 4)]


def test_both_partners_are_recommended_before_any_review():
    e = _engine()
    assert _ids(e)[:2] in (["cover", "teapot"], ["teapot", "cover"])


@pytest.mark.parametrize("rating", [1.0, None], ids=["rated 1 of 5", "text only"])
def test_a_disliked_item_takes_its_neighbours_down_and_its_category_with_it(rating):
    e = _engine()
    before = e.profile("alice")["categories"]
    pairs_before = [(n.item_id, n.support) for n in e.similar("kettle")]
    _review(e, "kettle", "Terrible kettle, broke after a day, awful", rating)
    recs = _ids(e)
    assert recs[0] == "cover"  # the liked side's partner leads; the disliked side's falls behind
    assert "teapot" not in recs[:2]
    assert "kettle" not in recs  # a reviewed item is the user's
    after = e.profile("alice")["categories"]
    assert after.get("Kitchen", 0.0) < before["Kitchen"]  # the item's category lost weight in her profile
    # no co-occurrence from a disliked item: the kettle's pairs are exactly what they were
    after_pairs = [(n.item_id, n.support) for n in e.similar("kettle")]  # (decayed over the 1,000 s since)
    assert [i for i, _ in after_pairs] == [i for i, _ in pairs_before]
    assert [s for _, s in after_pairs] == pytest.approx([s for _, s in pairs_before], rel=1e-3)


def test_the_teapot_falls_below_every_voted_item_after_a_dislike():
    e = _engine()
    _review(e, "kettle", "Terrible kettle, broke after a day, awful", 1.0)
    recs = e.recommend("alice", 6)
    teapot = [r for r in recs if r.item_id == "teapot"]
    assert not teapot or teapot[0].score < [r for r in recs if r.item_id == "cover"][0].score
    assert all("Steel kettle" not in r.reason for r in recs)  # a disliked item is never a reason


def test_a_liked_review_counts_like_a_strong_signal_and_says_so():
    e = _engine()
    _review(e, "kindle", "Great reader, love it, excellent screen")  # no rating: the model reads the text
    assert e.review_sentiment("Great reader, love it, excellent screen", None) > 0.2
    recs = e.recommend("alice", 4)
    assert recs[0].item_id == "cover"
    assert recs[0].reason.startswith("you liked Kindle Paperwhite (review)"), recs[0].reason
    assert e.profile("alice")["categories"]["Books"] > 0.5


def test_a_neutral_review_changes_no_ranking_but_owns_the_item():
    e = _engine()
    before = [r.item_id for r in e.recommend("alice", 5)]
    assert e.review_sentiment("zzz qqq", None) == 0.0  # nothing the model knows: neutral
    _review(e, "novel", "zzz qqq", None)
    assert [r.item_id for r in e.recommend("alice", 5)][:3] == [i for i in before if i != "novel"][:3]
    assert "novel" not in _ids(e)


def test_ratings_teach_the_sentiment_model():
    e = _engine()
    assert e.sentiment.n_learned == 30
    assert e.review_sentiment("Terrible kettle, broke after a day, awful", None) < -0.2


def test_a_negative_review_makes_no_pair_deltas_in_the_stream_split():
    users = Engine(EngineConfig(), cooc="remote")
    users.learn_one({"event_id": "1", "user_id": "u", "type": "view", "ts": 1.0, "item_id": "a"})
    users.drain_pair_deltas()
    users.learn_many([{"event_id": "2", "user_id": "u", "type": "review", "ts": 2.0, "item_id": "b",
                       "text": "awful", "rating": 1.0}])
    d = users.drain_pair_deltas()
    assert d is None or (d.row.size == 0 and d.occ.size == 0)
    users.learn_many([{"event_id": "3", "user_id": "u", "type": "view", "ts": 3.0, "item_id": "c"}])
    d = users.drain_pair_deltas()  # c pairs with a, never with the disliked b
    assert sorted({d.items[r] for r in d.row.tolist()} | {d.items[r] for r in d.nb.tolist()}) == ["a", "c"]


def test_learn_one_and_learn_many_agree_on_reviews():
    events = [{"event_id": str(k), "user_id": f"u{k % 3}", "type": t, "ts": 10.0 + k, "item_id": f"i{k % 5}",
               **({"text": txt, "rating": r} if t == "review" else {})}
              for k, (t, txt, r) in enumerate([("view", "", None), ("review", "awful", 1.0), ("view", "", None),
                                               ("review", "great", 5.0), ("purchase", "", None)] * 6)]
    for e in events:
        if e["type"] == "review" and e["rating"] is None:
            del e["rating"]
    one, many = Engine(), Engine()
    for e in events:
        one.learn_one(e)
    many.learn_many(events)
    for u in ("u0", "u1", "u2"):
        assert one.recommend(u, 5) == many.recommend(u, 5)
        assert one.profile(u) == many.profile(u)


# ----------------------------------------------------------------------------------- the contract


def _parse(doc: bytes):
    return parse_event(doc, now=2e9)


def test_a_review_must_carry_text():
    with pytest.raises(InvalidEvent) as exc:
        _parse(b'{"event_id": "e", "user_id": "u", "type": "review", "ts": 1.7e9, "item_id": "i", "rating": 5}')
    assert exc.value.code == ReasonCode.MISSING_FIELD and "'text' is required for 'review'" in exc.value.reason


def test_review_text_is_bounded_and_contact_details_are_masked():
    long = "x" * 2001
    with pytest.raises(InvalidEvent) as exc:
        _parse(b'{"event_id": "e", "user_id": "u", "type": "review", "ts": 1.7e9, "item_id": "i", "text": "'
               + long.encode() + b'"}')
    assert exc.value.code == ReasonCode.TOO_LONG
    e = _parse('{"event_id": "e", "user_id": "u", "type": "review", "ts": 1.7e9, "item_id": "i", '
               '"text": "很好用! 联系我 13812345678 或 ann@example.com", "rating": 5}'.encode())
    assert e.text == "很好用! 联系我 [contact] 或 [contact]" and e.rating == 5.0
    assert "ann@" not in str(e.to_dict())


def test_text_on_other_types_is_not_kept():
    e = _parse(b'{"event_id": "e", "user_id": "u", "type": "view", "ts": 1.7e9, "item_id": "i", "text": "hi"}')
    assert e.text is None and "text" not in e.to_dict()


# ------------------------------------------------------------------------ the split stream: one sentiment model


def test_user_stages_send_reviews_to_the_population_learner_which_learns_each_once():
    from infogap.models.population import PopulationLearner, check_batch

    cfg = EngineConfig()
    users, learner = Engine(cfg, population="remote"), PopulationLearner(cfg)
    users.learn_many([{"event_id": str(k), "user_id": f"u{k}", "type": "review", "ts": 10.0 + k, "item_id": "i",
                       "text": text, "rating": rating}
                      for k, (text, rating) in enumerate([("great, love it", 5.0), ("awful, broke", 1.0),
                                                          ("it is a kettle", 3.0)])])
    batch = users.drain_population()
    assert [r[1:] for r in batch["review"]] == [["great, love it", True], ["awful, broke", False],
                                                ["it is a kettle", None]]  # a 3 of 5 teaches topics, not sentiment
    assert users.sentiment.n_learned == 0  # a user stage reads with the learner's model, it does not learn its own
    assert learner.learn(batch, source=0) > 0 and learner.sentiment.n_learned == 2
    learner.learn(batch, source=0)  # a replay after a crash
    assert learner.sentiment.n_learned == 2
    restored = PopulationLearner.from_state(cfg, learner.to_state())
    assert restored.sentiment.n_learned == 2
    assert restored.sentiment.predict_one("awful") == learner.sentiment.predict_one("awful")
    users.load_sentiment(learner.sentiment.to_state())
    assert users.sentiment.n_learned == 2
    assert check_batch({"review": [[1, "x", "yes"]]})[3]["reason"].startswith("review 0")  # dropped, not learned


def test_a_learner_snapshot_from_before_reviews_restores_with_a_new_sentiment_model():
    from infogap.models.population import PopulationLearner

    state = PopulationLearner(EngineConfig()).to_state()
    del state["sentiment"]
    assert PopulationLearner.from_state(EngineConfig(), state).sentiment.n_learned == 0


# ------------------------------------------------------------------------------------------ topics


def _topic_reviews(n: int = 120) -> list[dict]:
    """Planted topics: half the reviewers write about batteries, half about screens, with shared filler."""
    import random

    rng = random.Random(3)
    power = "battery charge charger power hours lasts drains charging".split()
    screen = "screen display bright colours pixels resolution glare sharp".split()
    filler = "product arrived quickly works item".split()
    out = []
    for k in range(n):
        words = power if k % 2 else screen
        text = " ".join(rng.choice(words) for _ in range(8)) + " " + " ".join(rng.sample(filler, 2))
        out.append({"event_id": f"t{k}", "user_id": f"{'power' if k % 2 else 'screen'}-fan{k % 10}",
                    "type": "review", "ts": 100.0 + k, "item_id": f"i{k % 7}", "text": text})
    return out


def test_review_topics_are_learned_and_each_user_carries_the_topics_they_write_about():
    e = Engine(EngineConfig(n_topics=2))
    e.learn_many(_topic_reviews())
    topics = e.topics.describe(4)
    words = [set(t["words"]) for t in topics]
    power, screen = set("battery charge charger power hours lasts drains charging".split()), \
        set("screen display bright colours pixels resolution glare sharp".split())
    assert sorted([len(w & power), len(w & screen)] for w in words) == [[0, 4], [4, 0]], topics
    p, s = e.profile("power-fan1")["topics"], e.profile("screen-fan0")["topics"]
    assert max(p, key=p.get) != max(s, key=s.get)
    assert max(p.values()) > 0.8 and max(s.values()) > 0.8
    assert e.profile("power-fan1")["categories"] == {}  # the items have no category: topics are not categories


def test_the_population_learner_learns_topics_from_every_review_and_user_stages_read_with_its_model():
    from infogap.models.population import PopulationLearner

    cfg = EngineConfig(n_topics=2)
    users, learner = Engine(cfg, population="remote"), PopulationLearner(cfg)
    users.learn_many(_topic_reviews())
    batch = users.drain_population()
    assert len(batch["review"]) == 120 and {r[2] for r in batch["review"]} == {None}  # no rating: topics only
    learner.learn(batch, source=0)
    assert learner.topics.n_learned == 120 and learner.sentiment.n_learned == 0
    back = PopulationLearner.from_state(cfg, learner.to_state())
    assert back.topics.describe(4) == learner.topics.describe(4)
    users.load_topics(learner.topics.to_state())
    users.learn_many([{"event_id": "x", "user_id": "new", "type": "review", "ts": 999.0, "item_id": "i1",
                       "text": "battery charge lasts hours"}])
    mix = users.profile("new")["topics"]
    assert learner.topics.describe(8)[int(max(mix, key=mix.get))]["words"][0] in "battery charge charger power hours lasts "\
                                                                           "drains charging".split()


def test_the_item_stage_publishes_only_the_review_models_that_learned():
    """A review without a telling rating teaches topics only: the sentiment model (megabytes of counts) is not
    written again for it, and a publication with nothing new learned writes neither."""
    from infogap.models.cooc_shard import POPULATION_PARTITION
    from infogap.stream.core.item_shards import ItemShards
    from infogap.stream.settings import Settings

    cfg = EngineConfig(n_topics=2)
    shards = ItemShards(Settings(review_models_publish_s=0.0), cfg)
    shards.take(POPULATION_PARTITION)
    learner = shards.population
    learner.learn({"seg": [], "trend": [], "review": [[1, "great tea, love it", True]]}, source=0)
    assert sorted(shards.publication(now=1.0).models) == ["sentiment", "topics"]
    learner.learn({"seg": [], "trend": [], "review": [[2, "the tea leaves and the pot", None]]}, source=0)
    assert sorted(shards.publication(now=2.0).models) == ["topics"]
    assert shards.publication(now=3.0).models is None


def test_population_records_cut_between_events_keep_every_review():
    from infogap.stream.core.user_stage import population_records

    batch = {"seg": [], "trend": [[1, "i1", 0, 1.0, 5.0]], "review": [[1, "很好" * 20, True], [2, "差" * 30, False]]}
    records = [orjson.loads(r) for r in population_records(batch, limit=120)]
    assert len(records) == 2 and [r["review"] for r in records] == [[[1, "很好" * 20, True]], [[2, "差" * 30, False]]]
