"""The topic model's state as read from outside (the store, a snapshot): every setting bounded before anything is
made, so a corrupted or hostile state is a ``ValueError`` naming the setting, never a worker out of memory."""
from __future__ import annotations

import copy
import tracemalloc

import orjson
import pytest

from infogap.models.topics import TopicModel


def _state() -> dict:
    m = TopicModel(n_topics=3, n_buckets=32)
    for words in (["tea", "green", "leaves"], ["screen", "bright"]) * 5:
        m.learn_one(words)
    return orjson.loads(orjson.dumps(m.to_state()))  # as the store holds it


HOSTILE = [  # (setting, value, what the error says)
    ("n_buckets", 10**9, r"n_buckets is 1000000000; it must be an integer in \[2, 1,048,576\]"),
    ("n_topics", 10**6, r"n_topics is 1000000"),
    ("n_topics", True, r"n_topics is True"),
    ("max_iter", 10**12, r"max_iter is 1000000000000"),  # a review's E-step would never end
    ("max_words", 10**12, r"max_words is"),
    ("seed", -5, r"seed is -5"),  # numpy's uint64 overflow
    ("alpha", -1.0, r"alpha is -1.0"),
    ("eta", 1e308, r"eta is 1e\+308"),
    ("tol", float("nan"), r"tol is nan"),
    ("kappa", 0.5, r"kappa is 0.5; it must be a number in \(0.5, 1\]"),
    ("n_documents", float("inf"), r"n_documents is inf"),
    ("tau0", "64", r"tau0 is '64'"),
]


@pytest.mark.parametrize("name,value,message", HOSTILE, ids=[f"{n}={v!r}" for n, v, _ in HOSTILE])
def test_a_setting_out_of_range_is_refused_before_anything_is_made(name, value, message):
    state = _state()
    state["settings"][name] = value
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            TopicModel.from_state(state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # nothing the size of what was asked for was allocated


def test_a_shape_within_each_bound_but_too_large_together_is_refused():
    state = _state()
    state["settings"].update(n_topics=1000, n_buckets=1 << 20)
    with pytest.raises(ValueError, match="holds more than 1,048,576 weights"):
        TopicModel.from_state(state)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("weights"), "'weights' must be 3 x 32"),
    (lambda s: s.__setitem__("weights", [[-1.0] * 32] * 3), "finite numbers >= 0"),
    (lambda s: s["settings"].pop("seed"), r"settings lack \['seed'\]"),
    (lambda s: s.__setitem__("words", [["w", 0]]), r"\[word, count >= 1\]"),
    (lambda s: s.__setitem__("buckets", [[32, "w"]]), r"\[bucket, word\]"),
    (lambda s: s.__setitem__("buckets", [[0, "w"]] * 33), "33 buckets"),
    (lambda s: s["settings"].__setitem__("max_words", 2), "words and"),
], ids=["no weights", "negative weights", "a setting missing", "a zero count", "a bucket outside",
        "more buckets than columns", "more words than kept"])
def test_a_malformed_state_is_refused_with_what_is_wrong(mutate, message):
    state = _state()
    mutate(state)
    with pytest.raises(ValueError, match=message):
        TopicModel.from_state(state)


def test_a_state_reads_back_as_the_same_model():
    state = _state()
    back = TopicModel.from_state(copy.deepcopy(state))
    assert back.to_state() == state
    assert back.mix(["tea", "leaves"]) == TopicModel.from_state(state).mix(["tea", "leaves"])
