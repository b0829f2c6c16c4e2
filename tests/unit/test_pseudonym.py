"""stream/pseudonym.py and the client's reads by raw id."""
from __future__ import annotations

import hashlib
import hmac
import pickle
import re
import string

import orjson
import pytest
from hypothesis import assume, given, settings as hsettings, strategies as st
from pydantic import SecretStr

from infogap.stream.client import InfogapClient
from infogap.stream.pseudonym import HEX_CHARS, PREFIX, PSEUDONYM_LENGTH, Pseudonymizer, pseudonymize
from infogap.stream.settings import Settings

KEY = "k" * 16 + "-test-key-0001"
FORMAT = re.compile(rf"^{PREFIX}[0-9a-f]{{{HEX_CHARS}}}$")
# user ids as the event contract accepts them: printable, stripped, non-empty
user_ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=80).map(
    str.strip).filter(lambda s: s and s.isprintable())
keys = st.binary(min_size=16, max_size=64)


@given(user_ids.filter(lambda u: not Pseudonymizer.is_pseudonym(u)), keys)
def test_deterministic_and_well_formed(uid, key):
    a, b = Pseudonymizer(key), Pseudonymizer(bytes(key))
    assert a(uid) == b(uid) == a(uid)
    assert FORMAT.match(a(uid)) and len(a(uid)) == PSEUDONYM_LENGTH == 34


@given(user_ids.filter(lambda u: not Pseudonymizer.is_pseudonym(u)), keys)
def test_is_the_documented_hmac(uid, key):
    expected = "p_" + hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:32]
    assert Pseudonymizer(key)(uid) == expected == pseudonymize(uid, key)


@given(user_ids, keys, keys)
def test_depends_on_the_key(uid, k1, k2):
    assume(k1 != k2)
    assert Pseudonymizer(k1)(uid) != Pseudonymizer(k2)(uid)


@given(user_ids, user_ids, keys)
def test_distinct_ids_get_distinct_pseudonyms(u1, u2, key):
    assume(u1 != u2)
    assert Pseudonymizer(key)(u1) != Pseudonymizer(key)(u2)


@given(user_ids, keys)
def test_raw_id_is_not_contained_nor_the_unkeyed_hash(uid, key):
    # an id made only of hex digits (and the prefix's letters) can appear in 32 random hex digits by chance
    assume(len(uid) >= 8 or not set(uid) <= set(string.hexdigits.lower() + "p_"))
    out = Pseudonymizer(key)(uid)
    assert uid not in out
    digest = hashlib.sha256(uid.encode()).hexdigest()
    assert digest[:HEX_CHARS] not in out  # not a plain (unkeyed) hash that anyone could recompute from a guess


@given(user_ids, keys)
def test_idempotent_so_feedback_events_from_push_map_to_the_same_user(uid, key):
    p = Pseudonymizer(key)
    assert p(p(uid)) == p(uid) and Pseudonymizer.is_pseudonym(p(uid))
    assert Pseudonymizer(b"another key, 16+ bytes")(p(uid)) == p(uid)  # a pseudonym is never hashed again


def test_no_collisions_in_a_large_sample():
    p = Pseudonymizer(KEY)
    n = 200_000
    out = {p(f"u{i}") for i in range(n)} | {p(str(i)) for i in range(n)}
    assert len(out) == 2 * n


def test_same_key_in_every_form_gives_the_same_pseudonyms():
    forms = [KEY, KEY.encode(), SecretStr(KEY), Settings(pseudonym_key=KEY).pseudonym_key]
    assert len({Pseudonymizer(k)("u42") for k in forms}) == 1
    assert Pseudonymizer.from_settings(Settings(pseudonym_key=KEY))("u42") == Pseudonymizer(KEY)("u42")


def test_ids_are_normalised_like_the_event_contract():
    p = Pseudonymizer(KEY)
    assert p(42) == p("42") == p(" 42\t")
    with pytest.raises(TypeError):
        p(True)
    with pytest.raises(TypeError):
        p(None)


def test_identity_without_a_key():
    p = Pseudonymizer.from_settings(Settings())
    assert not p.enabled
    assert p("u42") == "u42" and p(7) == "7" and pseudonymize("alice", None) == "alice"
    with pytest.raises(ValueError, match="empty"):
        Pseudonymizer(b"")


def test_the_key_is_not_shown_nor_pickled():
    p = Pseudonymizer(KEY)
    assert KEY not in repr(p) and KEY not in str(p)
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(p)


class FakeRedis:
    """The two calls InfogapClient makes for a user, over a dict."""

    def __init__(self, data: dict[str, bytes]):
        self.data = data

    def get(self, key: str):
        return self.data.get(key)


def _doc(user_id: str) -> bytes:
    return orjson.dumps({"user_id": user_id, "items": [{"item_id": "m1", "score": 0.5, "reason": "r"}],
                         "segment": 2, "generated_at": 1.7e9, "model_version": "v1"})


def test_client_reads_by_raw_id_what_the_worker_wrote_under_the_pseudonym():
    p = Pseudonymizer(KEY)
    pu = p("u42")
    fake = FakeRedis({f"ig:recs:{pu}": _doc(pu), f"ig:segment:{pu}": b"2"})
    client = InfogapClient(fake, "ig:", pseudonym_key=SecretStr(KEY))
    recs = client.recommendations("u42")
    assert recs is not None and recs.user_id == "u42" and [i.item_id for i in recs.items] == ["m1"]
    assert client.segment("u42") == 2
    assert client.recommendations("u43") is None
    # without the key the raw id finds nothing, and the raw id is nowhere in Redis
    assert InfogapClient(fake, "ig:").recommendations("u42") is None
    assert not any("u42" in k or b"u42" in v for k, v in fake.data.items())


def test_client_without_a_key_reads_raw_ids_as_before():
    fake = FakeRedis({"ig:recs:u42": _doc("u42")})
    assert InfogapClient(fake, "ig:").recommendations("u42").user_id == "u42"


def test_client_from_settings_takes_key_prefix_and_credentials():
    s = Settings(redis_url="redis://:pw-123@127.0.0.1:6390/0", redis_prefix="x:", pseudonym_key=KEY)
    client = InfogapClient.from_settings(s)
    assert client.keys.prefix == "x:"
    assert client.client.connection_pool.connection_kwargs["password"] == "pw-123"
    assert client._pseudonym("u42") == Pseudonymizer(KEY)("u42")
    client.client.close()


@hsettings(max_examples=50)
@given(user_ids)
def test_client_and_worker_side_agree_for_any_id(uid):
    p = Pseudonymizer(KEY)
    fake = FakeRedis({f"ig:recs:{p(uid)}": _doc(p(uid))})
    assert InfogapClient(fake, "ig:", pseudonym_key=KEY).recommendations(uid).user_id == uid.strip()
