"""Validation of the event contract: every bad input is an InvalidEvent with a reason, never a crash."""
from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from models.dedupe import Deduplicator
from models.events import EVENT_TYPES, Event, InvalidEvent, Limits, as_event, parse_event, validate_event
from stream.ingest import Ingest

NOW = 1_800_000_000.0
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "sku-1", "type": "click", "ts": 1_700_000_000.0}


def reason_of(doc_or_raw) -> str:
    raw = doc_or_raw if isinstance(doc_or_raw, bytes) else orjson.dumps(doc_or_raw)
    with pytest.raises(InvalidEvent) as exc:
        parse_event(raw, now=NOW)
    return exc.value.reason


def test_a_good_event_is_normalised():
    e = parse_event(orjson.dumps({**GOOD, "user_id": 42, "type": " Purchase ", "value": 19, "ts": 1_700_000_000_000,
                                  "context": {"channel": "email", "campaign": "winter", "n": 3}}), now=NOW)
    assert e == Event("e1", "42", "purchase", 1_700_000_000.0, "sku-1", 19.0, None, None,
                      {"channel": "email", "campaign": "winter", "n": "3"})


def test_iso_timestamps_need_a_zone():
    assert parse_event(orjson.dumps({**GOOD, "ts": "2024-11-24T13:00:00+01:00"}), now=NOW).ts == 1_732_449_600.0
    assert "has no time zone" in reason_of({**GOOD, "ts": "2024-11-24T13:00:00"})


def test_pii_fields_are_dropped_everywhere():
    e = parse_event(orjson.dumps({**GOOD, "email": "a@b.c", "phone": "+33", "ip": "1.2.3.4", "name": "Ann",
                                  "context": {"email": "a@b.c", "campaign": "x"}}), now=NOW)
    assert "a@b.c" not in repr(e) and "Ann" not in repr(e) and "1.2.3.4" not in repr(e)
    assert e.context == {"campaign": "x"}


@pytest.mark.parametrize("doc, reason", [
    ({k: v for k, v in GOOD.items() if k != "user_id"}, "missing required field 'user_id'"),
    ({**GOOD, "type": "teleport"}, "unknown event type 'teleport'"),
    ({**GOOD, "type": 3}, "field 'type' must be a string, got a number"),
    ({**GOOD, "user_id": ["u"]}, "field 'user_id' must be a string (or an integer), got an array"),
    ({**GOOD, "user_id": True}, "field 'user_id' must be a string (or an integer), got a boolean"),
    ({**GOOD, "user_id": "  "}, "field 'user_id' is empty"),
    ({**GOOD, "item_id": None}, "field 'item_id' is required for 'click' events"),
    ({**GOOD, "ts": 12.0}, "field 'ts' is 12, before the earliest accepted time"),
    ({**GOOD, "ts": NOW + 10 * 86_400}, "field 'ts' is 864000 s in the future"),
    ({**GOOD, "ts": "soon"}, "field 'ts' 'soon' is not ISO-8601"),
    ({**GOOD, "value": "19.99"}, "field 'value' must be a number, got a string"),
    ({**GOOD, "value": 1e300}, "field 'value' is 1e+300, outside the accepted range"),
    ({**GOOD, "context": "email"}, "field 'context' must be an object, got a string"),
    ({**GOOD, "context": {"campaign": {"a": 1}}}, "field 'context.campaign' must be a string, got an object"),
])
def test_each_kind_of_bad_event_has_a_reason_a_person_can_act_on(doc, reason):
    assert reason_of(doc).startswith(reason)


def test_raw_level_rejections():
    assert reason_of(b"\xff\xfe{") .startswith("not valid JSON")
    assert reason_of(b"[1, 2]") == "an event must be a JSON object, got an array"
    assert reason_of(b"NaN").startswith("not valid JSON")
    assert reason_of(b"[" * 5000 + b"]" * 5000).startswith("not valid JSON")
    assert reason_of(b"{" + b" " * 20_000 + b"}").startswith("payload is 20002 bytes, over the limit of 16384")
    with pytest.raises(InvalidEvent, match="empty record"):
        parse_event(None, now=NOW)


def test_unknown_types_pass_when_configured():
    e = parse_event(orjson.dumps({**GOOD, "type": "wishlist"}), now=NOW, limits=Limits(allow_unknown_types=True))
    assert e.type == "wishlist"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@hsettings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_invalid_event(raw):
    try:
        parse_event(raw, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason


@hsettings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "event_id": json_values, "user_id": json_values, "item_id": json_values, "type": json_values | st.sampled_from(EVENT_TYPES),
    "ts": json_values | st.floats(), "value": json_values | st.floats(), "rating": json_values,
    "session_id": json_values, "context": json_values}))
def test_arbitrary_documents_never_raise_anything_but_invalid_event(doc):
    try:
        e = validate_event(doc, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason
    else:
        assert e.type in EVENT_TYPES and math.isfinite(e.ts) and e.user_id and e.event_id


@hsettings(max_examples=200, deadline=None)
@given(st.builds(Event, event_id=st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=20),
                 user_id=st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=20),
                 type=st.sampled_from(["view", "click", "purchase"]), ts=st.floats(700_000_000, NOW),
                 item_id=st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=20),
                 value=st.none() | st.floats(0, 1e6), rating=st.none(), session_id=st.none(), context=st.none()))
def test_a_valid_event_round_trips_through_its_wire_form(e):
    assert parse_event(orjson.dumps(e.to_dict()), now=NOW) == e
    assert as_event(e.to_dict()) == e


class Rec:
    def __init__(self, value, offset):
        self.value, self.key, self.topic, self.partition, self.offset = value, b"k", "events", 0, offset


def test_ingest_splits_good_bad_and_duplicate_records():
    good = orjson.dumps(GOOD)
    out = Ingest(Limits(), Deduplicator()).accept([Rec(good, 0), Rec(b"{", 1), Rec(good, 2)], now=NOW)
    assert [e.event_id for e in out.events] == ["e1"]
    assert out.duplicates == 1
    assert [(d.raw, d.offset) for d in out.dead] == [(b"{", 1)]
    assert dict(out.dead[0].headers())["source_offset"] == b"1"


def test_deduplicator_is_bounded_in_count():
    d = Deduplicator(window_s=1e9, max_ids=100)
    for i in range(1000):
        d.seen(f"e{i}", ts=float(i))
    assert len(d) == 100 and "e999" in d and "e0" not in d


def test_a_restored_deduplicator_remembers_and_forgets_as_the_original():
    """A snapshot holds it as arrays; one pickled before (a set and a deque) still loads."""
    import copy
    import pickle

    d = Deduplicator(window_s=10.0, max_ids=5)
    for i in range(8):
        d.seen(f"e{i}", ts=float(i))
    old_style = Deduplicator.__new__(Deduplicator)
    old_style.__setstate__(copy.deepcopy(d.__dict__))
    for back in (pickle.loads(pickle.dumps(d)), old_style):
        assert [f"e{i}" in back for i in range(8)] == [False] * 3 + [True] * 5
        assert back.seen("e7", ts=8.0) and not back.seen("e8", ts=20.0)  # e3..e7 are 12 s older than e8
        assert len(back) == 1


def test_ingest_keeps_every_field_of_an_event_but_its_user_id_which_it_pseudonymises():
    import dataclasses

    import orjson

    from models.dedupe import Deduplicator
    from models.events import Event, Limits
    from stream.ingest import Ingest

    doc = {"event_id": "e1", "user_id": "alice", "type": "purchase", "ts": 1.7e9, "item_id": "i1", "value": 9.5,
           "rating": 4.0, "session_id": "s1", "context": {"campaign": "c"}}
    rec = type("Rec", (), {"value": orjson.dumps(doc), "key": None, "topic": "events", "partition": 0, "offset": 3})
    ingest = Ingest(Limits(), Deduplicator(60.0, 100), pseudonymize=lambda u: f"p-{u}")
    (e,) = ingest.accept([rec], now=1.7e9).events
    assert dataclasses.asdict(e) == {**doc, "user_id": "p-alice"}
    assert {f.name for f in dataclasses.fields(Event)} == set(doc)  # a new field: add it above
