"""Records of the ``items`` and ``users`` topics: strict checks, bounded work, bounded push messages (issue 18)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest

from infogap.models.catalog import (MAX_ITEM_RECORD_BYTES, MAX_TAGS, MAX_TITLE_CHARS, Catalog, InvalidItem, parse_item,
                            validate_item)
from infogap.models.push_policy import MAX_USERS_RECORD_BYTES, PushConfig, PushPolicy, UserPrefs
from infogap.stream.settings import Settings
from infogap.stream.worker import Worker

NOON_UTC = 1_732_449_600.0


# ---------------------------------------------------------------------- items
@pytest.mark.parametrize("doc, reason", [
    ([1, 2], "an items record must be a JSON object, got an array"),
    ({"title": "x"}, "missing required field 'item_id'"),
    ({"item_id": ["a"]}, "field 'item_id' must be a string (or an integer), got an array"),
    ({"item_id": True}, "field 'item_id' must be a string (or an integer), got a boolean"),
    ({"item_id": "  "}, "field 'item_id' is empty"),
    ({"item_id": "a\nb"}, "field 'item_id' contains control characters"),
    ({"item_id": "x" * 10_000}, "field 'item_id' is 10000 characters long, over the limit of 256"),
    ({"item_id": "a", "title": [[["deep"]]]}, "field 'title' must be a string, got an array"),
    ({"item_id": "a", "category": 5}, "field 'category' must be a string, got a number"),
    ({"item_id": "a", "category": "c" * 257}, "field 'category' is 257 characters long"),
    ({"item_id": "a", "category": "a\tb"}, "field 'category' contains control characters"),
    ({"item_id": "a", "tags": "gift"}, "field 'tags' must be an array of strings, got a string"),
    ({"item_id": "a", "tags": ["x", None]}, "field 'tags' must be an array of strings, got null in it"),
    ({"item_id": "a", "tags": ["t"] * (MAX_TAGS + 1)}, f"field 'tags' has {MAX_TAGS + 1} tags, over the limit"),
    ({"item_id": "a", "tags": ["y" * 300]}, "field 'tags' has a tag of 300 characters"),
    ({"item_id": "a", "tags": ["a\nb"]}, "field 'tags' has a tag with control characters"),
    ({"item_id": "a", "price": "12"}, "field 'price' must be a number, got a string"),
    ({"item_id": "a", "price": True}, "field 'price' must be a number, got a boolean"),
    ({"item_id": "a", "price": -1}, "field 'price' is -1.0; expected a finite number >= 0"),
    ({"item_id": "a", "price": float("inf")}, "field 'price' is inf"),
    ({"item_id": "a", "available": "false"}, "field 'available' must be true or false, got a string"),
    ({"item_id": "a", "available": 0}, "field 'available' must be true or false, got a number"),
    ({"item_id": "a", "available": None}, "field 'available' must be true or false, got null"),
])
def test_a_bad_item_is_refused_with_its_reason_and_the_catalog_is_unchanged(doc, reason):
    with pytest.raises(InvalidItem) as err:
        validate_item(doc)
    assert err.value.reason.startswith(reason), err.value.reason
    c = Catalog()
    with pytest.raises(ValueError):
        c.upsert(doc)
    assert len(c) == 0


def test_a_good_item_is_normalised_and_stays_as_it_was():
    item = validate_item({"item_id": 42, "title": "Mug", "category": "", "tags": ["a", "", "b", "a"], "price": 3,
                          "available": False, "extra": {"deep": [1]}})
    assert item == {"item_id": "42", "title": "Mug", "category": None, "tags": ["a", "b"], "price": 3.0,
                    "available": False}
    assert validate_item(item) == item  # idempotent: the worker checks it, the catalog checks it again
    assert validate_item({"item_id": " sku "})["available"] is True


def test_a_long_title_is_cut_not_refused():
    c = Catalog()
    r = c.upsert({"item_id": "big", "title": "T" * 120_000 + "\n"})
    assert len(c.title(r)) == MAX_TITLE_CHARS and c.title(r).endswith("\u2026")
    assert c.title(c.upsert({"item_id": "nl", "title": "a\nb"})) == "a b"


def test_100k_tags_are_refused_unread_and_only_the_first_features_are_kept():
    class Unread(list):
        """100,000 tags that fail the test if a single one is read."""
        def __iter__(self):
            raise AssertionError("the tags were read before the list's length was checked")

        def __getitem__(self, k):
            raise AssertionError("the tags were read before the list's length was checked")

    with pytest.raises(InvalidItem, match="over the limit"):
        Catalog().upsert({"item_id": "many", "tags": Unread(f"t{i}" for i in range(100_000))})
    tags = [f"t{i}" for i in range(MAX_TAGS)]
    c = Catalog()
    for k in range(20):  # the most tags accepted, all distinct, then all the same
        c.upsert({"item_id": f"i{k}", "category": "c", "tags": tags if k % 2 else ["x"] * MAX_TAGS})
    assert c.feature_names(c.find("i1")) == ["c"] + tags[:7]
    assert c.feature_names(c.find("i0")) == ["c", "x"]


def test_parse_item_checks_size_json_and_key():
    raw = orjson.dumps({"item_id": "a", "title": "x" * MAX_ITEM_RECORD_BYTES})
    with pytest.raises(InvalidItem, match=f"payload is {len(raw)} bytes"):
        parse_item(raw, b"a")
    with pytest.raises(InvalidItem, match="not valid JSON"):
        parse_item(b"[" * 3000, b"a")
    with pytest.raises(InvalidItem, match="the record key is null"):
        parse_item(b'{"item_id": "a"}', None)
    with pytest.raises(InvalidItem, match="the record key is not the item's 'item_id'"):
        parse_item(b'{"item_id": "a"}', b"\xff")
    assert parse_item(b'{"item_id": "a"}', b" a ")["item_id"] == "a"


# ---------------------------------------------------------------------- users
@pytest.mark.parametrize("doc, reason", [
    ("x", "a users record must be a JSON object"),
    ({"user_id": "u" * 300}, "field 'user_id' is 300 characters long"),
    ({"user_id": "a\nb"}, "field 'user_id' contains control characters"),
    ({"user_id": "u", "timezone": "UTC/" + "x/" * 300 + "y"}, "field 'timezone' is 605 characters long"),
    ({"user_id": "u", "timezone": "../../etc/passwd"}, "field 'timezone' '../../etc/passwd' is not an IANA"),
    ({"user_id": "u", "timezone": "/etc/localtime"}, "field 'timezone' '/etc/localtime' is not an IANA"),
    ({"user_id": "u", "timezone": "zone.tab"}, "field 'timezone' 'zone.tab' is not an IANA"),
    ({"user_id": "u", "timezone": "America"}, "unknown time zone 'America'"),
    ({"user_id": "u", "timezone": ["UTC"]}, "field 'timezone' must be a string"),
    ({"user_id": "u", "consent": {"email": "yes"}}, "field 'consent.email' must be true, false or null"),
    ({"user_id": "u", "consent": {"e" * 100: True}}, "field 'consent' has a key that is not a channel name"),
    ({"user_id": "u", "consent": {f"c{i}": True for i in range(17)}}, "field 'consent' has 17 keys"),
])
def test_a_bad_users_record_is_refused_with_its_reason(doc, reason):
    with pytest.raises(ValueError) as err:
        UserPrefs.from_record(doc)
    assert str(err.value).startswith(reason), str(err.value)


def test_users_record_key_must_be_its_raw_user_id():
    assert UserPrefs.parse(b'{"user_id": 42}', b"42").user_id == "42"
    assert UserPrefs.parse(b'{"user_id": "dan"}', b" dan ").user_id == "dan"
    for key in (b"mallory", None, b"\xff", b"p_" + b"0" * 32):
        with pytest.raises(ValueError, match="the record key"):
            UserPrefs.parse(b'{"user_id": "victim"}', key)
    with pytest.raises(ValueError, match="payload is"):
        UserPrefs.parse(b'{"user_id": "u", "pad": "' + b"x" * MAX_USERS_RECORD_BYTES + b'"}', b"u")
    with pytest.raises(ValueError, match="not valid JSON"):
        UserPrefs.parse(b"{", b"u")


# ---------------------------------------------------------------------- push messages
def _prefs():
    return UserPrefs.from_record({"user_id": "u1", "consent": {"email": True, "app": True}, "quiet_hours": None})


def test_a_push_message_is_cut_to_its_size_limit_never_refused():
    recs = [(f"i{k}", 1.0 - k / 100, "goes with " + "R" * 5_000) for k in range(20)]
    cfg = PushConfig(min_new_items=1, items_per_push=20, max_message_bytes=3_000, daily_cap={"email": 1})
    policy = PushPolicy(cfg)
    (m,) = policy.decide(_prefs(), recs, now=NOON_UTC, title=lambda i: "T" * 400)
    assert len(orjson.dumps(m.to_dict())) <= 3_000
    assert 1 <= len(m.items) < 20 and all(len(i["title"]) <= 80 and len(i["reason"]) <= 80 for i in m.items)
    # only the items sent count as pushed: the others can go in the next message
    again = PushPolicy(PushConfig(min_new_items=1, items_per_push=20, daily_cap={"email": 5}))
    sent = again.decide(_prefs(), recs, now=NOON_UTC, title=lambda i: "T" * 400)
    assert len(sent[0].items) == 20  # 64 KiB by default: cut, but all items fit
    assert len(orjson.dumps(sent[0].to_dict())) <= PushConfig().max_message_bytes


def test_a_message_that_cannot_fit_is_not_sent_and_not_counted():
    policy = PushPolicy(PushConfig(min_new_items=1, max_message_bytes=100, daily_cap={"email": 1}))
    assert policy.decide(_prefs(), [("a", 1.0, "r")], now=NOON_UTC) == []
    policy.config = PushConfig(min_new_items=1, daily_cap={"email": 1})
    assert [m.channel for m in policy.decide(_prefs(), [("b", 1.0, "r")], now=NOON_UTC)] == ["email"]


# ---------------------------------------------------------------------- the worker's side-topic handler
def _record(topic, key, value, offset=0):
    return SimpleNamespace(topic=topic, key=key, value=value, partition=0, offset=offset)


def _worker():
    worker = Worker(Settings(http_port=None))
    sent = []

    async def send(dead):
        for d in dead:
            worker.stats.count_dead(d.code)
        sent.extend(dead)

    worker._send_counted_dead = send
    return worker, sent


def test_no_exception_from_one_side_record_stops_the_worker_and_each_goes_to_the_dlq():
    worker, sent = _worker()
    items, users = worker.topics.items, worker.topics.users
    records = [
        _record(items, None, None), _record(items, b"x" * 300, None), _record(users, None, None),
        _record(items, None, b'{"item_id": "a"}'), _record(users, None, b'{"user_id": "u"}'),
        _record(items, b"deep", b'{"item_id": "deep", "title": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
        _record(users, b"tz", orjson.dumps({"user_id": "tz", "timezone": "UTC/" + "x/" * 300 + "y"})),
    ]
    for rec in records:
        asyncio.run(worker._apply_side(rec))
    assert len(sent) == len(records) and not worker.core.catalog_ids and not worker.core.prefs
    assert all(d.reason.startswith(("bad items record: ", "bad users record: ")) for d in sent)
    assert {d.code for d in sent} == {"bad_items_record", "bad_users_record"}
    assert sent[0].reason.startswith("bad items record: a tombstone (null value) needs the item_id as its key")
    # an error of any type (here a bug's RecursionError) is a dead letter, not the end of the worker
    worker.engine.upsert_item = lambda item: (_ for _ in ()).throw(RecursionError("deep"))
    asyncio.run(worker._apply_side(_record(items, b"b", b'{"item_id": "b"}')))
    assert sent[-1].reason == "bad items record: cannot be applied (RecursionError)" and "b" not in worker.core.catalog_ids
    del worker.engine.upsert_item
    # good records and tombstones are applied
    asyncio.run(worker._apply_side(_record(users, b"ann", b'{"user_id": "ann", "consent": {"app": true}}')))
    asyncio.run(worker._apply_side(_record(items, b"a", b'{"item_id": "a", "available": false}')))
    assert "ann" in worker.core.prefs and worker.core.catalog_ids == {"a"} and worker.core.unavailable == {"a"}
    asyncio.run(worker._apply_side(_record(items, b" a ", None)))  # (users tombstones: tests of erasure)
    assert not worker.core.catalog_ids and worker.core.unavailable == {"a"} and not worker.engine.state.catalog.available[0]
