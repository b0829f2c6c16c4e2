"""The push rules: consent, quiet hours in the user's zone, daily caps, no repeats, material change."""
from __future__ import annotations

import pytest

from infogap.models.push_policy import PushConfig, PushPolicy, UserPrefs

NOON_UTC = 1_732_449_600.0  # 2024-11-24 12:00 UTC


def prefs(**kw) -> UserPrefs:
    doc = {"user_id": "u1", "consent": {"email": True, "app": True, "ads": False}, "timezone": "UTC",
           "quiet_hours": [22, 8]}
    doc.update(kw)
    return UserPrefs.from_record(doc)


def recs(*items):
    return [(i, 1.0 - k / 10, f"because {i}") for k, i in enumerate(items)]


def test_consented_channels_only():
    msgs = PushPolicy(PushConfig(min_new_items=1)).decide(prefs(), recs("a", "b"), now=NOON_UTC)
    assert sorted(m.channel for m in msgs) == ["app", "email"]
    assert PushPolicy().decide(prefs(consent={"email": False}), recs("a"), now=NOON_UTC) == []
    assert PushPolicy().decide(None, recs("a"), now=NOON_UTC) == []


def test_quiet_hours_are_in_the_users_time_zone_and_dropped():
    tokyo = prefs(timezone="Asia/Tokyo")  # 12:00 UTC is 21:00 in Tokyo, 23:00 at UTC+11
    assert PushPolicy(PushConfig(min_new_items=1)).decide(tokyo, recs("a"), now=NOON_UTC)
    late = prefs(timezone="Pacific/Noumea")
    assert PushPolicy(PushConfig(min_new_items=1)).decide(late, recs("a"), now=NOON_UTC) == []


def test_daily_cap_resets_on_the_users_local_day():
    p = PushPolicy(PushConfig(min_new_items=1, daily_cap={"email": 2}))
    u = prefs(consent={"email": True})
    sent = [len(p.decide(u, recs(f"i{k}"), now=NOON_UTC + k * 60)) for k in range(4)]
    assert sent == [1, 1, 0, 0]
    assert len(p.decide(u, recs("next-day"), now=NOON_UTC + 86_400)) == 1


def test_an_item_is_not_pushed_twice_within_the_window():
    p = PushPolicy(PushConfig(min_new_items=1, daily_cap={"app": 100}, repeat_window_s=3600))
    u = prefs(consent={"app": True})
    first = p.decide(u, recs("a", "b"), now=NOON_UTC)
    again = p.decide(u, recs("c", "a", "b"), now=NOON_UTC + 60)
    assert [i["item_id"] for i in first[0].items] == ["a", "b"]
    assert [i["item_id"] for i in again[0].items] == ["c"]
    assert p.decide(u, recs("a", "b"), now=NOON_UTC + 120) == []  # only repeats left
    later = p.decide(u, recs("z", "b", "a"), now=NOON_UTC + 7200)  # the window has passed: a and b again
    assert [i["item_id"] for i in later[0].items] == ["z", "b", "a"]


def test_only_a_material_change_of_the_top_n_pushes():
    p = PushPolicy(PushConfig(min_new_items=2, daily_cap={"app": 100}, repeat_window_s=0))
    u = prefs(consent={"app": True})
    assert p.decide(u, recs("a", "b", "c"), now=NOON_UTC)
    assert p.decide(u, recs("a", "b", "d"), now=NOON_UTC + 1) == []  # one new item: not material
    assert p.decide(u, recs("a", "e", "f"), now=NOON_UTC + 2)


def test_a_message_names_its_items_by_title_for_the_person_who_reads_it():
    titles = {"a": "Red shoes", "b": "Blue hat"}
    (m,) = PushPolicy(PushConfig(min_new_items=1)).decide(prefs(consent={"email": True}), recs("a", "b", "c"),
                                                          now=NOON_UTC, title=lambda i: titles.get(i, i))
    assert m.reason == "new picks for you: Red shoes and 2 more (because a)"
    assert [(i["item_id"], i["title"]) for i in m.items] == [("a", "Red shoes"), ("b", "Blue hat"), ("c", "c")]
    (bare,) = PushPolicy(PushConfig(min_new_items=1)).decide(prefs(consent={"email": True}), recs("a"), now=NOON_UTC)
    assert bare.reason == "new picks for you: a (because a)" and "title" not in bare.items[0]


@pytest.mark.parametrize("doc, reason", [
    ({"consent": {}}, "non-empty 'user_id'"),
    ({"user_id": "u", "timezone": "Mars/Base"}, "unknown time zone"),
    ({"user_id": "u", "quiet_hours": [25, 3]}, "'quiet_hours' must be"),
    ({"user_id": "u", "consent": ["email"]}, "'consent' must be an object"),
])
def test_bad_users_records_are_explained(doc, reason):
    with pytest.raises(ValueError, match=reason):
        UserPrefs.from_record(doc)


def test_each_decision_names_the_rule_that_held_a_push_back():
    """What a person looking at one user would ask: why did she get no email today? Each decision says it."""
    from infogap.models.push_policy import RULES

    p = PushPolicy(PushConfig(min_new_items=1, daily_cap={"email": 1, "app": 3, "ads": 5}))
    u = prefs()

    def why(items, at, who=u):
        return [(d.channel, d.rule, d.sent) for d in p.decisions(who, recs(*items), now=at)]

    assert why(["a"], NOON_UTC) == [("email", None, True), ("app", None, True), ("ads", "no_consent", False)]
    assert why(["a"], NOON_UTC + 60) == [(None, "no_change", False)]
    assert why(["a", "b"], NOON_UTC + 120) == [("email", "daily_cap", False), ("app", None, True),
                                              ("ads", "no_consent", False)]
    assert why(["c"], NOON_UTC + 11 * 3600) == [(None, "quiet_hours", False)]  # 23:00 UTC
    assert why(["a"], NOON_UTC + 22 * 3600) == [(None, "repeat", False)]  # 'a' pushed within the repeat window
    assert why(["d"], NOON_UTC + 240, prefs(consent={"email": False})) == [(None, "no_consent", False)]
    assert why([], NOON_UTC + 300) == [(None, "no_recommendations", False)]
    assert p.decisions(None, recs("e"), now=NOON_UTC)[0].rule == "no_consent"
    big = PushPolicy(PushConfig(min_new_items=1, max_message_bytes=10))
    assert {d.rule for d in big.decisions(u, recs("a"), now=NOON_UTC) if d.channel != "ads"} == {"too_large"}
    assert {d.rule for d in p.decisions(u, recs("z1", "z2"), now=NOON_UTC + 400)} <= set(RULES) | {None}


def test_decide_is_the_messages_of_the_decisions():
    a, b = PushPolicy(PushConfig(min_new_items=1)), PushPolicy(PushConfig(min_new_items=1))
    for k, items in enumerate([["a"], ["a", "b"], ["c"], ["c", "d", "e"]]):
        at = NOON_UTC + 60 * k
        sent = [d.message for d in b.decisions(prefs(), recs(*items), now=at) if d.sent]
        assert a.decide(prefs(), recs(*items), now=at) == sent
    assert a.to_state() == b.to_state()


def test_a_rule_that_holds_again_on_the_same_channel_says_it_repeats():
    """What the decision log skips: the rule that held a channel (or every channel) back last time, again."""
    p = PushPolicy(PushConfig(min_new_items=1, daily_cap={"email": 1, "app": 0}))
    u = prefs(consent={"email": True, "app": True})

    def repeat(items, at):
        return [(d.channel, d.rule, d.repeat) for d in p.decisions(u, recs(*items), now=at)]

    assert repeat(["a"], NOON_UTC) == [("email", None, False), ("app", "daily_cap", False), ("ads", "no_consent", False)]
    assert repeat(["a"], NOON_UTC + 60) == [(None, "no_change", False)]
    assert repeat(["a"], NOON_UTC + 120) == [(None, "no_change", True)]
    # a material change: email's cap is new, app's cap and ads' consent held last time too
    assert repeat(["b"], NOON_UTC + 180) == [("email", "daily_cap", False), ("app", "daily_cap", True),
                                             ("ads", "no_consent", True)]
    assert repeat(["c"], NOON_UTC + 240) == [("email", "daily_cap", True), ("app", "daily_cap", True),
                                             ("ads", "no_consent", True)]
    restored = PushPolicy(p.config)
    restored.restore_state(p.to_state())  # not part of the snapshot: the first decisions after a restart are new
    assert [d.repeat for d in restored.decisions(u, recs("d"), now=NOON_UTC + 300)] == [False, False, False]


def test_a_rule_for_every_channel_that_comes_back_after_a_send_is_not_a_repeat():
    """Quiet hours on night 1, an email on day 2, quiet hours on night 2: the night-2 hold is a decision of its own."""
    p = PushPolicy(PushConfig(min_new_items=1))
    u = prefs(consent={"email": True})  # quiet hours 22-8 UTC
    night, day = NOON_UTC + 11 * 3600, NOON_UTC + 24 * 3600
    assert [(d.rule, d.repeat) for d in p.decisions(u, recs("a"), now=night)] == [("quiet_hours", False)]
    assert [d.sent for d in p.decisions(u, recs("b"), now=day)][0]
    assert [(d.rule, d.repeat) for d in p.decisions(u, recs("c"), now=night + 86_400)] == [("quiet_hours", False)]
    assert [(d.rule, d.repeat) for d in p.decisions(u, recs("d"), now=night + 86_460)] == [("quiet_hours", True)]
    assert [(d.rule, d.repeat) for d in p.decisions(u, [], now=night + 86_520)] == [("no_recommendations", False)]
    assert [(d.rule, d.repeat) for d in p.decisions(u, recs("e"), now=night + 86_580)] == [("quiet_hours", False)]
