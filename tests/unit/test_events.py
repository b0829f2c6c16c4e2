"""Validation of the event contract: every bad input is an InvalidEvent with a reason, never a crash."""
from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from infogap.models.dedupe import Deduplicator
from infogap.models.events import EVENT_TYPES, Event, InvalidEvent, Limits, as_event, parse_event, validate_event
from infogap.stream.core.ingest import Ingest

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


CONSENT = {"event_id": "unsub-m-1", "user_id": "u42", "type": "unsubscribe", "ts": 1_700_000_000.0,
           "context": {"channel": "email", "campaign": "recs", "variant": "B", "message_id": "m-1"}}


@pytest.mark.parametrize("typ", ["unsubscribe", "push_bounce", "Push_Bounce"])
@pytest.mark.parametrize("channel", ["email", "app", "ads"])
def test_unsubscribe_and_push_bounce_name_a_channel_and_need_no_item(typ, channel):
    e = parse_event(orjson.dumps({**CONSENT, "type": typ, "context": {**CONSENT["context"], "channel": channel}}),
                    now=NOW, key=b"u42")
    assert (e.type, e.item_id, e.user_id) == (typ.lower(), None, "u42")
    assert e.context == {**CONSENT["context"], "channel": channel}


@pytest.mark.parametrize("typ", ["unsubscribe", "push_bounce"])
@pytest.mark.parametrize("context, code, reason", [
    (None, "missing_field", "field 'context.channel' is required for '{typ}' events: the channel whose consent it "
                            "turns off, one of email, app, ads"),
    ({"campaign": "recs", "message_id": "m-1"}, "missing_field", "field 'context.channel' is required for '{typ}'"),
    ({"channel": None}, "missing_field", "field 'context.channel' is required"),  # null values are dropped
    ({"channel": "sms"}, "bad_value", "field 'context.channel' is 'sms'; '{typ}' events need one of email, app, ads"),
    ({"channel": "Email"}, "bad_value", "field 'context.channel' is 'Email'; '{typ}' events need one of email"),
    ({"channel": 3}, "bad_value", "field 'context.channel' is '3'"),
    ({"channel": ""}, "bad_value", "field 'context.channel' is ''"),
])
def test_unsubscribe_and_push_bounce_without_a_known_channel_are_refused_with_a_reason(typ, context, code, reason):
    doc = {k: v for k, v in CONSENT.items() if k != "context"}
    doc["type"] = typ
    if context is not None:
        doc["context"] = context
    assert reason_of(doc).startswith(reason.format(typ=typ))
    assert code_of(doc) == code


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
        self.value, self.key, self.topic, self.partition, self.offset = value, b"u1", "events", 0, offset


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

    from infogap.models.dedupe import Deduplicator
    from infogap.models.events import Event, Limits
    from infogap.stream.core.ingest import Ingest

    doc = {"event_id": "e1", "user_id": "alice", "type": "review", "ts": 1.7e9, "item_id": "i1", "value": 9.5,
           "rating": 4.0, "session_id": "s1", "context": {"campaign": "c"}, "text": "Great tea, 很好喝"}
    rec = type("Rec", (), {"value": orjson.dumps(doc), "key": b"alice", "topic": "events", "partition": 0, "offset": 3})
    ingest = Ingest(Limits(), Deduplicator(60.0, 100), pseudonymize=lambda u: f"p-{u}")
    (e,) = ingest.accept([rec], now=1.7e9).events
    assert dataclasses.asdict(e) == {**doc, "user_id": "p-alice"}
    assert {f.name for f in dataclasses.fields(Event)} == set(doc)  # a new field: add it above


# --- reason codes, record keys, text bounds, clock skew, DLQ bounds (issue 18, findings 4a, 7, 8, 10)

def code_of(doc_or_raw, **kwargs) -> str:
    raw = doc_or_raw if isinstance(doc_or_raw, bytes) else orjson.dumps(doc_or_raw)
    with pytest.raises(InvalidEvent) as exc:
        parse_event(raw, now=NOW, **kwargs)
    return exc.value.code


@pytest.mark.parametrize("doc, code", [
    (b"{", "not_json"), (b"[1]", "not_object"), (b" " * 20_000, "too_large"),
    ({k: v for k, v in GOOD.items() if k != "user_id"}, "missing_field"),
    ({**GOOD, "type": "teleport"}, "unknown_type"), ({**GOOD, "type": 3}, "bad_type"),
    ({**GOOD, "user_id": "  "}, "bad_value"), ({**GOOD, "user_id": "u" * 257}, "too_long"),
    ({**GOOD, "item_id": None}, "missing_field"), ({**GOOD, "ts": 12.0}, "ts_out_of_range"),
    ({**GOOD, "ts": NOW + 3600}, "ts_out_of_range"), ({**GOOD, "ts": "soon"}, "bad_value"),
    ({**GOOD, "value": 1e300}, "bad_value"), ({**GOOD, "context": "email"}, "bad_type"),
])
def test_each_rejection_has_a_code_from_the_fixed_set(doc, code):
    from infogap.models.events import REASON_CODES

    assert code_of(doc) == code and code in REASON_CODES
    with pytest.raises(InvalidEvent, match="empty record") as exc:
        parse_event(None, now=NOW)
    assert exc.value.code == "empty"


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.dictionaries(st.sampled_from(sorted(GOOD) + ["context"]), json_values))
def test_every_rejection_of_arbitrary_input_has_a_known_code(raw):
    from infogap.models.events import REASON_CODES

    try:
        if isinstance(raw, bytes):
            parse_event(raw, now=NOW, key=b"u1")
        else:
            validate_event(raw, now=NOW, key=b"u1")
    except InvalidEvent as exc:
        assert exc.code in REASON_CODES and exc.code != "other"


def test_the_default_future_is_minutes_not_a_day():
    assert Limits().max_future_s <= 600
    assert parse_event(orjson.dumps({**GOOD, "ts": NOW + 60}), now=NOW).ts == NOW + 60
    assert code_of({**GOOD, "ts": NOW + 86_340}) == "ts_out_of_range"


@pytest.mark.parametrize("doc, code, reason", [
    ({**GOOD, "session_id": "s" * 257}, "too_long", "field 'session_id' is 257 characters long"),
    ({**GOOD, "context": {"campaign": "c" * 257}}, "too_long", "field 'context.campaign' is 257 characters"),
    ({**GOOD, "context": {"k" * 65: "x"}}, "bad_value", "field 'context' has a key that is not a printable"),
    ({**GOOD, "context": {"cam\npaign": "x"}}, "bad_value", "field 'context' has a key that is not a printable"),
    ({**GOOD, "context": {"campaign": "a\x00b"}}, "bad_value", "field 'context.campaign' contains control"),
    ({**GOOD, "context": {f"k{i}": "v" for i in range(33)}}, "too_long", "field 'context' has 33 keys"),
    ({**GOOD, "ts": "2024-11-24T12:00:00Z" + " " * 60}, "too_long", "field 'ts' is 80 characters long"),
])
def test_every_text_field_has_a_length_limit(doc, code, reason):
    with pytest.raises(InvalidEvent) as exc:
        parse_event(orjson.dumps(doc), now=NOW)
    assert exc.value.code == code and exc.value.reason.startswith(reason), exc.value.reason


def test_unknown_types_when_allowed_are_still_bounded():
    allow = Limits(allow_unknown_types=True)
    assert code_of({**GOOD, "type": "w" * 65}, limits=allow) == "too_long"
    assert code_of({**GOOD, "type": "wish\x01list"}, limits=allow) == "bad_value"
    assert code_of({**GOOD, "type": "w" * 10_000}) == "too_long"  # its length is checked before anything quotes it


def test_the_record_key_must_name_the_events_user():
    from infogap.stream.pseudonym import Pseudonymizer

    raw = orjson.dumps(GOOD)
    assert parse_event(raw, now=NOW, key=b"u1").user_id == "u1"
    assert parse_event(orjson.dumps({**GOOD, "user_id": 42}), now=NOW, key=b"42").user_id == "42"
    for key, reason in ((None, "the record key is null"), (b"u2", "the record key is not the event's user_id"),
                        (b"\xff", "the record key is not"), (b"", "the record key is not")):
        with pytest.raises(InvalidEvent) as exc:
            parse_event(raw, now=NOW, key=key)
        assert exc.value.code == "key_mismatch" and exc.value.reason.startswith(reason)
        assert "produce with key=user_id" in exc.value.reason and "u1" not in exc.value.reason.split(";")[0][-4:]
    # compared after pseudonymisation: the pseudonym of the key and of the user_id are the same user
    p = Pseudonymizer("a test key of at least 16 bytes")
    assert parse_event(raw, now=NOW, key=p("u1").encode(), user_id_of=p).user_id == p("u1")
    assert parse_event(orjson.dumps({**GOOD, "user_id": p("u1")}), now=NOW, key=b"u1", user_id_of=p).user_id == p("u1")
    with pytest.raises(InvalidEvent, match="not the event's user_id"):
        parse_event(raw, now=NOW, key=p("u2").encode(), user_id_of=p)
    assert parse_event(raw, now=NOW).user_id == "u1"  # no key given: not checked


class TimedRec:
    def __init__(self, doc, offset, timestamp_s, key=b"u1"):
        self.value, self.key, self.topic, self.partition = orjson.dumps(doc), key, "events", 0
        self.offset, self.timestamp = offset, None if timestamp_s is None else int(timestamp_s * 1000)


@pytest.mark.parametrize("stamped", [True, False])
def test_one_event_far_ahead_moves_neither_the_watermark_nor_the_dedupe_horizon(stamped):
    """Kept within max_future_s (a day here), it is applied with its own ts, but time moves only to the record's
    timestamp (or the worker's clock) plus the allowed skew: the next good events, up to an hour old, are not late."""
    ingest = Ingest(Limits(max_future_s=86_400), Deduplicator(86_400), max_lateness_s=86_400, max_skew_s=300)
    at = (lambda t: NOW) if stamped else (lambda t: None)
    first = [TimedRec({**GOOD, "event_id": f"a{k}", "ts": NOW - 3600 + k}, k, at(k)) for k in range(3)]
    ahead = TimedRec({**GOOD, "event_id": "x", "ts": NOW + 86_340}, 3, at(3))
    after = [TimedRec({**GOOD, "event_id": f"b{k}", "ts": NOW - 60 * k}, 4 + k, at(4)) for k in range(1, 61)]
    again = TimedRec({**GOOD, "event_id": "a0", "ts": NOW - 3600}, 70, at(5))  # a duplicate of the first
    out = ingest.accept(first + [ahead] + after + [again], now=NOW)
    assert not out.dead and out.duplicates == 1
    assert [e.event_id for e in out.events] == ["a0", "a1", "a2", "x"] + [f"b{k}" for k in range(1, 61)]
    assert out.events[3].ts == NOW + 86_340  # the model sees the event's own time
    assert ingest.watermarks[("events", 0)] == NOW + 300


def test_a_record_stamped_in_the_future_is_bounded_by_the_workers_clock():
    ingest = Ingest(Limits(max_future_s=86_400), Deduplicator(), max_lateness_s=600, max_skew_s=300)
    out = ingest.accept([TimedRec({**GOOD, "ts": NOW + 80_000}, 0, NOW + 80_000),
                         TimedRec({**GOOD, "event_id": "e2", "ts": NOW - 200}, 1, NOW)], now=NOW)
    assert len(out.events) == 2 and ingest.watermarks[("events", 0)] == NOW + 300
    odd = TimedRec({**GOOD, "event_id": "e3", "ts": NOW + 1000}, 2, None, key=b"u1")
    odd.timestamp, odd.partition = -1, 1  # no timestamp (an old message format): the worker's clock bounds it
    ingest.accept([odd], now=NOW)
    assert ingest.watermarks[("events", 1)] == NOW + 300


def test_an_erasure_or_a_consent_withdrawn_is_applied_however_late():
    """A bounce report or an unsubscribe may arrive hours after the user's last click: it is a person's request,
    not behaviour, and is never dropped as late (a late click is)."""
    ingest = Ingest(Limits(max_future_s=86_400), Deduplicator(), max_lateness_s=600, max_skew_s=300)
    old = NOW - 7200
    recs = [TimedRec({**GOOD, "ts": NOW}, 0, NOW),
            TimedRec({**GOOD, "event_id": "late-view", "ts": old}, 1, NOW),
            TimedRec({"event_id": "b", "user_id": "u1", "type": "push_bounce", "ts": old,
                      "context": {"channel": "email"}}, 2, NOW),
            TimedRec({"event_id": "s", "user_id": "u1", "type": "unsubscribe", "ts": old,
                      "context": {"channel": "app"}}, 3, NOW),
            TimedRec({"event_id": "f", "user_id": "u1", "type": "forget", "ts": old}, 4, NOW)]
    out = ingest.accept(recs, now=NOW)
    assert [e.event_id for e in out.events] == ["e1", "b", "s", "f"]
    assert [(d.offset, d.code) for d in out.dead] == [(1, "late")]


def test_ingest_sends_a_mismatched_key_to_the_dlq_with_its_code():
    out = Ingest(Limits(), Deduplicator()).accept([TimedRec(GOOD, 0, NOW, key=None), TimedRec(GOOD, 1, NOW, b"u9"),
                                                  TimedRec(GOOD, 2, NOW)], now=NOW)
    assert [e.event_id for e in out.events] == ["e1"] and out.duplicates == 0
    assert [(d.offset, d.code) for d in out.dead] == [(0, "key_mismatch"), (1, "key_mismatch")]
    assert dict(out.dead[0].headers())["reason_code"] == b"key_mismatch"
    unchecked = Ingest(Limits(), Deduplicator(), check_keys=False).accept([TimedRec(GOOD, 0, NOW, key=None)], now=NOW)
    assert len(unchecked.events) == 1


def test_a_dead_letter_has_a_code_from_the_fixed_set_and_bounded_size():
    from infogap.stream.core.ingest import MAX_DLQ_KEY_BYTES, MAX_DLQ_VALUE_BYTES, DeadLetter

    assert DeadLetter(b"x", None, "bad t.items record: boom", "t.items", 0, 1).code == "bad_items_record"
    assert DeadLetter(b"x", None, "bad", "t1.users", 0, 1).code == "bad_users_record"
    assert DeadLetter(b"x", None, "bad cooc record: KeyError", "t1.cooc", 0, 1).code == "bad_cooc_record"
    assert DeadLetter(b"x", None, "late event: 5 s", "t1.events", 0, 1, "late").code == "late"
    assert DeadLetter(b"x", None, "?", "t1.events", 0, 1, "unknown event type 'zz'").code == "other"
    big = DeadLetter(b"v" * (3 * 1024 * 1024), b"k" * 50_000, "r" * 100_000, "t1.events", 2, 7, "too_large")
    topic, value, key, headers = big.message("t1.events.dlq")
    h = dict(headers)
    assert topic == "t1.events.dlq" and value == b"v" * MAX_DLQ_VALUE_BYTES and key == b"k" * MAX_DLQ_KEY_BYTES
    assert h["truncated"] == str(3 * 1024 * 1024).encode() and h["key_truncated"] == b"50000"
    assert h["reason_code"] == b"too_large" and len(h["reason"]) <= 2000 and h["source_offset"] == b"7"
    small = DeadLetter(b"abc", b"k", "r", "t1.events", 0, 1, "not_json").message("dlq")
    assert small[1:3] == (b"abc", b"k") and "truncated" not in dict(small[3])


def test_the_dlq_metric_is_keyed_by_code_never_by_text():
    from infogap.stream.observability import WorkerStats

    st = WorkerStats()
    for i in range(1000):
        st.count_dead(f"unknown event type 't{i}'")
    st.count_dead("late")
    st.count_dead("late")
    assert st.dlq_by_reason == {"other": 1000, "late": 2} and st.dead_letters == 1002
    assert all(type(k) is str for k in st.dlq_by_reason)
