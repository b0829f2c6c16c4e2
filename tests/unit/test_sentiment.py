"""The online review sentiment model (models/sentiment.py): tokens, labels, the lexicon prior, learning, state."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest

from infogap.models.sentiment import (Lexicon, SentimentModel, chinese_seed_lexicon, label_of,
                                      plain_tokens)

POS_WORDS = ["zorbly", "quimp", "flarn", "glimmerous", "bexing"]
NEG_WORDS = ["snudge", "wrocked", "plaffy", "grunth", "mirkle"]
FILLER = ["the", "item", "arrived", "box", "colour", "size", "seller", "price", "order", "week", "phone", "case"]
ZH_POS, ZH_NEG, ZH_FILLER = "甲乙丙丁", "戊己庚辛", "东西包装快递颜色尺寸今天昨天朋友"


def planted(n: int, seed: int, *, zh: bool = False) -> list[tuple[str, bool]]:
    """Reviews of filler words with one or two planted words of their label (none in any lexicon)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        if zh:
            words = [rng.choice(ZH_FILLER) for _ in range(rng.randint(4, 10))]
            words += rng.sample(ZH_POS if positive else ZH_NEG, rng.randint(1, 2))
            rng.shuffle(words)
            out.append(("".join(words), positive))
        else:
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
            words += rng.sample(POS_WORDS if positive else NEG_WORDS, rng.randint(1, 2))
            rng.shuffle(words)
            out.append((" ".join(words), positive))
    return out


@pytest.mark.parametrize("zh", [False, True], ids=["latin", "chinese"])
def test_learns_a_planted_vocabulary(zh):
    model = SentimentModel(lexicon=Lexicon({}))
    train, test = planted(400, seed=1, zh=zh), planted(200, seed=2, zh=zh)
    assert all(model.predict_one(text) == 0.5 for text, _ in test[:20])  # nothing learned, no lexicon word
    for text, positive in train:
        model.learn_one(text, positive)
    assert model.n_learned == 400
    wrong = [(text, positive, p) for text, positive in test if ((p := model.predict_one(text)) > 0.5) != positive]
    assert not wrong, wrong[:5]
    # and the probabilities are confident and calibrated in the right direction
    pos, neg = (ZH_POS[:2], ZH_NEG[:2]) if zh else (" ".join(POS_WORDS[:2]), " ".join(NEG_WORDS[:2]))
    assert model.predict_one(pos) > 0.9 and model.predict_one(neg) < 0.1


def test_a_model_taught_the_opposite_predicts_the_opposite():
    model = SentimentModel(lexicon=Lexicon({}))
    for text, positive in planted(400, seed=1):
        model.learn_one(text, not positive)
    assert all((model.predict_one(text) < 0.5) == positive for text, positive in planted(100, seed=3))


def test_label_of():
    assert [label_of(r) for r in (5, 4.5, 4, 3.9, 3, 2.1, 2, 1, 0)] == [True, True, True, None, None, None,
                                                                       False, False, False]
    assert label_of(None) is None and label_of(float("nan")) is None and label_of(True) is None
    assert label_of("5") is None  # type: ignore[arg-type]
    assert label_of(7, positive_min=8, negative_max=5) is None and label_of(9, positive_min=8, negative_max=5)
    with pytest.raises(ValueError, match="must be above"):
        label_of(3, positive_min=2, negative_max=2)


def test_lexicon_negation_in_chinese():
    lex = Lexicon(chinese_seed_lexicon())
    assert lex.score_text("不好") < 0 < lex.score_text("好")
    assert lex.score_text("不错") > 0 and lex.score_text("很不错") > 0
    assert lex.score_text("不满意") < 0 < lex.score_text("满意")
    assert lex.score_text("不差") > 0 > lex.score_text("很差")
    assert lex.score_text("没有问题") > 0 and lex.score_text("不推荐") < 0
    assert lex.score_text("差不多") == 0.0 and lex.score_text("今天到的") == 0.0
    # negation ends at punctuation, and what follows a contrast word weighs more
    assert lex.score_text("不，好") > 0
    assert lex.score_text("质量很好，但是物流太慢了") < 0 < lex.score_text("物流太慢了，但是质量很好")
    assert -1.0 <= lex.score_text("好好好好好好好好好好好好好好好好") <= 1.0


def test_lexicon_negation_in_english_with_a_vader_like_dict():
    lex = Lexicon({"good": 0.475, "bad": -0.625, "great": 0.775})
    assert lex.score_text("not good") < 0 < lex.score_text("good")
    assert lex.score_text("isn't good") < 0 and lex.score_text("not very good") < 0
    assert lex.score_text("not that it was ever good") > 0  # beyond the window of 3 tokens
    assert lex.score_text("not bad") > 0 and lex.score_text("not not good") > 0
    assert lex.score_text("very good") > lex.score_text("good") > lex.score_text("slightly good") > 0
    assert lex.score_text("good but bad") < 0
    assert lex.score(["not", "good"]) == lex.score_text("not good")


def test_lexicon_refuses_bad_entries():
    with pytest.raises(ValueError, match="valence of 'x'"):
        Lexicon({"x": 2.0})
    with pytest.raises(ValueError, match="valence"):
        Lexicon({"x": True})
    with pytest.raises(ValueError, match="non-empty"):
        Lexicon({" ": 0.5})


def test_prediction_before_learning_is_the_lexicon_prior():
    model = SentimentModel()
    assert model.predict_one("今天到的") == 0.5
    assert model.predict_one("很满意") > 0.7 and model.predict_one("太差了，退货") < 0.3
    p = model.predict_one("不错")
    assert p == pytest.approx(1 / (1 + math.exp(-model.lexicon_weight * model.lexicon.score_text("不错"))))


def test_the_lexicon_helps_where_the_naive_bayes_has_not_seen_the_words():
    model = SentimentModel()
    for text, positive in planted(200, seed=1):
        model.learn_one(text, positive)
    # no planted word, only lexicon words: the prior still decides
    assert model.predict_one("很满意") > 0.5 > model.predict_one("很失望")


def test_log_odds_are_river_naive_bayes_own():
    model = SentimentModel(lexicon=Lexicon({}))
    for text, positive in planted(300, seed=4, zh=True):
        model.learn_one(text, positive)
    for text, _ in planted(50, seed=5, zh=True) + [("东西甲乙 unknownword", True)]:
        x = model._tokens(text)
        known = {f: c for f, c in x.items() if f in model._nb.feature_counts}
        jll = model._nb.joint_log_likelihood(known)
        assert model._log_odds(x) == pytest.approx(jll[True] - jll[False], rel=1e-9, abs=1e-9)


def test_reads_do_not_change_the_model():
    model = SentimentModel()
    for text, positive in planted(100, seed=1, zh=True):
        model.learn_one(text, positive)
    before = json.dumps(model.to_state(), ensure_ascii=False)
    for text in ("全新的词语", "never seen words", "", "！！！"):
        model.predict_one(text)
    assert json.dumps(model.to_state(), ensure_ascii=False) == before


def test_learn_one_wants_a_bool():
    with pytest.raises(ValueError, match="True or False"):
        SentimentModel().learn_one("好", 1)  # type: ignore[arg-type]


def trained(n: int = 500, **kw) -> SentimentModel:
    model = SentimentModel(**kw)
    for text, positive in planted(n // 2, seed=7, zh=True) + planted(n // 2, seed=8):
        model.learn_one(text + " 很好" if positive else text + " 太差", positive)
    return model


def test_state_round_trip_predicts_identically():
    model = trained(max_vocab=60)
    assert model.vocabulary_size <= 75  # it pruned on the way
    state = model.to_state()
    text = json.dumps(state, ensure_ascii=False, allow_nan=False)  # JSON-safe, no NaN
    again = SentimentModel.from_state(json.loads(text))
    assert again.to_state() == state and again.n_learned == model.n_learned
    probes = [t for t, _ in planted(100, seed=9, zh=True) + planted(100, seed=10)] + ["不错", "not good", ""]
    assert [again.predict_one(t) for t in probes] == [model.predict_one(t) for t in probes]
    # and both go on learning the same way, pruning included
    for t, positive in planted(200, seed=11, zh=True):
        model.learn_one(t, positive)
        again.learn_one(t, positive)
    assert again.to_state() == model.to_state()
    assert [again.predict_one(t) for t in probes] == [model.predict_one(t) for t in probes]


def test_state_keeps_the_configuration_and_takes_the_tokenizer_and_lexicon_again():
    model = trained(200, alpha=0.25, max_vocab=1000, lr=0.1)
    lex = Lexicon({"great": 1.0})
    again = SentimentModel.from_state(model.to_state(), str.split, lexicon=lex)
    assert (again.alpha, again.max_vocab, again.lr) == (0.25, 1000, 0.1)
    assert again.tokenize is str.split and again.lexicon is lex


def _mutations():
    def cfg(**kw):
        return lambda s: s["config"].update(kw)

    def set_(key, value):
        return lambda s: s.__setitem__(key, value)

    return [
        ("not a dict", lambda s: "state", "not a dict"),
        ("format", set_("format", "infogap.sentiment/0"), "format"),
        ("config missing a key", lambda s: s["config"].pop("alpha"), "config keys"),
        ("config alpha text", cfg(alpha="0.5"), "config.alpha"),
        ("config alpha nan", cfg(alpha=float("nan")), "config.alpha"),
        ("config max_vocab float", cfg(max_vocab=10.5), "config.max_vocab"),
        ("config alpha negative", cfg(alpha=-1.0), r"alpha is -1.0; it must be a number in \[1e-06, 1000\]"),
        # what a hostile or corrupted state in the store would ask for: memory, overflow, a learner gone wild
        ("config max_vocab huge", cfg(max_vocab=10**15), "max_vocab is 1000000000000000"),
        ("config seed negative", cfg(seed=-5), "seed is -5"),
        ("config seed huge", cfg(seed=2**70), "seed is"),
        ("config lr huge", cfg(lr=1e308), r"lr is 1e\+308"),
        ("config prune_slack huge", cfg(prune_slack=1e300), "prune_slack is"),
        ("config lexicon_weight huge", cfg(lexicon_weight=-1e308), "lexicon_weight is"),
        ("n_learned negative", set_("n_learned", -1), "n_learned"),
        ("n_learned bool", set_("n_learned", True), "n_learned"),
        ("class counts shape", set_("class_counts", [1, 2, 3]), "class_counts"),
        ("class counts sum", lambda s: s["class_counts"].__setitem__(0, s["class_counts"][0] + 1), "add up"),
        ("tokens not a list", set_("tokens", {"a": 1}), "tokens is"),
        ("token row short", lambda s: s["tokens"].__setitem__(0, ["a", 1]), r"tokens\[0\]"),
        ("token count negative", lambda s: s["tokens"].__setitem__(0, ["a", -1, 2]), r"tokens\[0\]"),
        ("token count too big", lambda s: s["tokens"].__setitem__(0, ["a", 10**9, 2]), r"tokens\[0\]"),
        ("token not str", lambda s: s["tokens"].__setitem__(0, [3, 1, 2]), r"tokens\[0\]"),
        ("token zero counts", lambda s: s["tokens"].__setitem__(0, ["a", 0, 0]), r"tokens\[0\]"),
        ("token twice", lambda s: s["tokens"].append(list(s["tokens"][0])), "twice"),
        ("too many tokens", lambda s: s["tokens"].extend([f"t{i}", 1, 0] for i in range(2000)), "more than"),
        ("stack missing", lambda s: s.pop("stack"), "stack is"),
        ("stack weight nan", lambda s: s["stack"]["weights"].__setitem__("nb", float("inf")), "stack.weights"),
        ("stack weight huge", lambda s: s["stack"]["weights"].__setitem__("lex", -1e300), "stack.weights"),
        ("intercept huge", lambda s: s["stack"].__setitem__("intercept", 1e300), "stack.intercept"),
        ("stack weights keys", lambda s: s["stack"].__setitem__("weights", {"nb": 1.0}), "stack.weights"),
        ("intercept text", lambda s: s["stack"].__setitem__("intercept", "0"), "stack.intercept"),
        ("iterations negative", lambda s: s["stack"].__setitem__("n_iterations", -3), "n_iterations"),
    ]


@pytest.mark.parametrize("name,mutate,message", _mutations(), ids=[m[0] for m in _mutations()])
def test_from_state_refuses_malformed_states(name, mutate, message):
    state = copy.deepcopy(trained(300, max_vocab=1000).to_state())
    result = mutate(state)  # changes the state in place, except the first, which replaces it
    if name == "not a dict":
        state = result
    with pytest.raises(ValueError, match=message) as info:
        SentimentModel.from_state(state)
    assert "sentiment" in str(info.value) or "SentimentModel" in str(info.value)


def test_vocabulary_stays_bounded_on_an_endless_stream_of_new_tokens():
    model = SentimentModel(max_vocab=100, prune_slack=0.25, lexicon=Lexicon({}))
    sizes = []
    for i in range(3000):
        model.learn_one(f"common w{i}a w{i}b w{i}c", i % 2 == 0)
        sizes.append(model.vocabulary_size)
    assert max(sizes) <= 125 and model.vocabulary_size >= 100
    state = model.to_state()
    assert len(state["tokens"]) <= 125 and "common" in {row[0] for row in state["tokens"]}  # the frequent one stays
    # the class totals the naive Bayes divides by are those of the tokens kept
    nb = model._nb
    for label in (True, False):
        assert nb.class_totals[label] == sum(fc.get(label, 0) for fc in nb.feature_counts.values())
    assert len(json.dumps(state)) < 10_000


def test_plain_tokens_on_mixed_chinese_and_english():
    assert plain_tokens("这个手机很好用，Battery isn't great! 5星") == [
        "这", "这个", "个", "个手", "手", "手机", "机", "机很", "很", "很好", "好", "好用", "用",
        "battery", "is", "not", "great", "not_great", "5", "星"]
    assert plain_tokens("ＯＫ，不错") == ["ok", "不", "不错", "错"]  # full-width folded
    assert plain_tokens("Can't won't cannot") == ["can", "not", "will", "not", "not_will", "can", "not",
                                                           "not_can"]
    assert plain_tokens("") == [] and plain_tokens("！？。") == []
    assert plain_tokens("not. good") == ["not", "good"]  # punctuation ends the negation


def test_the_faster_learn_one_updates_river_naive_bayes_as_river_does():
    from river import naive_bayes

    ours, river = SentimentModel()._parts()[0], naive_bayes.MultinomialNB(alpha=0.5)
    for text, positive in planted(200, seed=12, zh=True):
        x = dict.fromkeys(plain_tokens(text), 1)
        ours.learn_one(x, positive)
        river.learn_one(x, positive)
    assert ours.class_counts == river.class_counts and ours.class_totals == river.class_totals
    assert dict(ours.feature_counts) == dict(river.feature_counts)
    x = dict.fromkeys(plain_tokens("甲乙东西"), 1)
    assert ours.joint_log_likelihood(x) == river.joint_log_likelihood(x)


def test_a_worker_that_reads_no_review_loads_neither_jieba_nor_rivers_naive_bayes():
    """jieba's dictionary (~70 MB) and River's naive Bayes with scipy.stats (~60 MB) are loaded by the first
    Chinese review and the first model that learns, not by every worker at start."""
    import subprocess
    import sys

    code = ("import sys; import infogap.stream.worker; from infogap.stream.text import sentiment_model; "
            "m = sentiment_model(); p = m.predict_one('fine, thanks'); "
            "print(sorted(x for x in ('jieba', 'river.naive_bayes', 'scipy.stats') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
    code = ("import sys; from infogap.stream.text import sentiment_model; m = sentiment_model(); "
            "m.learn_one('质量很好', True); print(sorted(x for x in ('jieba', 'river.naive_bayes') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "['jieba', 'river.naive_bayes']", out.stderr
