"""The channel worker's pure parts: unsubscribe tokens and headers, outcomes, pacing, permissions, mails."""
from __future__ import annotations

import email
from email import policy

import pytest

from infogap.stream.channels import ChannelConfig, email_for, outcomes, unsubscribe
from infogap.stream.channels.messages import bounce_event, check_message, dead_letter
from infogap.stream.channels.permissions import Permissions
from infogap.stream.core.erasures import ErasureLedger
from infogap.stream.pseudonym import Pseudonymizer

KEY = b"k" * 32
NOW = 1_800_000_000.0


def msg(**kw):
    return {"message_id": "m-1", "user_id": "u1", "channel": "email", "campaign": "winter", "variant": "B",
            "items": [{"item_id": "sku-1", "title": "Lamp", "reason": "popular"}], **kw}


def test_a_token_names_one_user_and_channel_and_cannot_be_forged_or_reused_late():
    token = unsubscribe.sign(KEY, "u42", "email", NOW + 60)
    assert unsubscribe.verify(KEY, token, NOW) == ("u42", "email")
    body, mac = token.split(".")
    other = unsubscribe.sign(KEY, "u43", "email", NOW + 60).split(".")[0]
    for bad in (f"{other}.{mac}", f"{body}.{mac[:-1]}A", body, "", "a" * 600, None, 42, f"{body}.{mac}.x"):
        with pytest.raises(ValueError, match="not valid"):
            unsubscribe.verify(KEY, bad, NOW)
    with pytest.raises(ValueError, match="not valid"):
        unsubscribe.verify(b"x" * 32, token, NOW)
    with pytest.raises(ValueError, match="expired"):
        unsubscribe.verify(KEY, token, NOW + 61)


def test_a_token_for_an_id_with_newlines_or_an_unknown_channel_is_refused():
    with pytest.raises(ValueError, match="not valid"):
        unsubscribe.verify(KEY, unsubscribe.sign(KEY, "u1", "sms", NOW + 60), NOW)
    assert unsubscribe.verify(KEY, unsubscribe.sign(KEY, "a\nb", "app", NOW + 60), NOW) == ("a\nb", "app")


def test_the_mail_carries_unfolded_rfc_8058_headers_a_client_can_read():
    cfg = ChannelConfig(channel="email", unsubscribe_key=KEY, unsubscribe_url="https://mail.example.com/")
    raw = email_for(msg(), cfg, NOW).as_bytes()
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    mailto, url = [p.strip().strip("<>") for p in parsed["List-Unsubscribe"].split(",")]
    assert mailto.startswith("mailto:unsubscribe@example.invalid?subject=unsubscribe%20")
    assert url.startswith("https://mail.example.com/unsubscribe?t=")
    assert b"=?utf-8?" not in raw  # not RFC 2047-encoded: clients would not find the link
    token = url.split("t=")[1]
    assert unsubscribe.verify(KEY, token, NOW) == ("u1", "email")
    assert parsed["Message-ID"] == "<m-1@infogap.invalid>" and "Lamp: popular" in parsed.get_content()


def test_a_push_record_that_could_inject_headers_is_refused_before_any_mail_is_built():
    assert "control characters" in check_message(msg(message_id="m-1\r\nBcc: all@example.com"))
    assert "control characters" in check_message(msg(user_id="u1\nx"))
    assert check_message(msg(channel=7)) is not None and check_message(msg(items=[])) is not None
    assert check_message(msg()) is None


def test_outcomes_decode_anything_unreadable_as_in_doubt_never_as_not_sent():
    assert outcomes.decode(None) is None
    for junk in (b"", b"[]", b'{"s": "maybe"}', b"\xff", b'{"s": []}', b'{"s": {}}'):
        assert outcomes.decode(junk)["s"] == "pending" and not outcomes.is_final(outcomes.decode(junk))
    sent = outcomes.decode(outcomes.encode("sent", NOW, 3, NOW + 10, "x" * 500))
    assert outcomes.is_final(sent) and sent["p"] == 3 and len(sent["why"]) == 200
    assert not outcomes.expired(sent, NOW + 10) and outcomes.expired(sent, NOW + 11)


def test_the_token_bucket_paces_to_its_rate_after_the_burst():
    bucket = outcomes.TokenBucket(rate=4.0, burst=4.0, now=0.0)
    waits = [bucket.wait(0.0) for _ in range(8)]
    assert waits[:4] == [0.0] * 4 and waits[4:] == [0.25, 0.5, 0.75, 1.0]
    assert bucket.wait(10.0) == 0.0  # refilled (to the burst, no more)
    assert [bucket.wait(10.0) for _ in range(4)][-1] == 0.25


def test_permissions_follow_consent_tombstones_erasures_and_pseudonyms():
    ledger = ErasureLedger(KEY)
    p = Permissions("app", Pseudonymizer("a pseudonym key of 32 bytes....."), ledger, suppression_key=KEY)
    p.apply_users(b'{"user_id": "u1", "consent": {"app": true, "email": false}}', b"u1")
    p.apply_users(b'{"user_id": "u2", "consent": {"email": true}}', b"u2")
    p.apply_users(b'{"user_id": "victim", "consent": {"app": true}}', b"mallory")  # key mismatch: ignored
    p.apply_users(b"not json", b"u3")
    u1 = p.pseudonymize("u1")
    assert (p.why_not(u1), p.why_not(p.pseudonymize("u2")), p.why_not(p.pseudonymize("victim"))) == (
        None, "no_consent", "no_consent")
    assert p.bad_records == 2
    p.apply_suppression(p.suppression_key(u1), b"{}")
    assert p.why_not(u1) == "suppressed" and p.suppression_key(u1, "email") != p.suppression_key(u1)
    assert len(p.suppression_key(u1)) == 32 and u1.encode() not in p.suppression_key(u1)
    ledger.add(u1)
    assert p.why_not(u1) == "erased"
    p.apply_suppression(p.suppression_key(u1), None)  # a tombstone lifts it
    assert not p.suppressed


def test_reports_name_the_message_and_keep_raw_records_short():
    assert bounce_event(msg(), NOW) == {"event_id": "bounce-m-1", "user_id": "u1", "type": "push_bounce", "ts": NOW,
                                        "context": {"channel": "email", "campaign": "winter", "variant": "B",
                                                    "message_id": "m-1"}}
    import orjson
    doc = orjson.loads(dead_letter(None, b"x" * 10_000, "email", "invalid", "not a push message", NOW))
    assert len(doc["message"]) == 4096 and doc["code"] == "invalid"
    big = orjson.loads(dead_letter(msg(reason="y" * 100_000), None, "email", "expired", "late", NOW))
    assert isinstance(big["message"], str) and len(big["message"]) == 4096
