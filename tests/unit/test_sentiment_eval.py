"""The prequential review sentiment evaluation (stream/tools/sentiment_eval.py) on a tiny synthetic stream."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from infogap.models.sentiment import Lexicon, chinese_seed_lexicon, plain_tokens
from infogap.stream.tools import sentiment_eval as se

GOOD, BAD, FILLER = "甲乙丙丁", "戊己庚辛", "东西包装快递颜色尺寸今天昨天朋友手机电池屏幕"


def synthetic(n: int, seed: int = 0) -> list[tuple[str, bool]]:
    """Chinese-looking reviews: filler characters, planted label characters, a lexicon word now and then; 60 %
    negative, so that the majority class is not a coin toss; some exact repeats."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.4
        chars = [rng.choice(FILLER) for _ in range(rng.randint(5, 12))] + rng.sample(GOOD if positive else BAD, 2)
        if rng.random() < 0.3:
            chars.append("满意" if positive else "失望")
        rng.shuffle(chars)
        out.append(("".join(chars), positive))
    return out + out[:20]


def test_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 5, size=40) / 4.0  # many ties
        labels = rng.random(40) < 0.5
        pos, neg = scores[labels], scores[~labels]
        pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p, q in itertools.product(pos, neg)]
        assert se.auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
    assert se.auc([0.2, 0.3], [True, True]) is None and se.auc([0.5] * 4, [True, False, True, False]) == 0.5


def test_curve_windows():
    preds = np.array([0.9, 0.1, 0.8, 0.2, 0.9, 0.9, 0.1])
    labels = np.array([True, False, True, True, False, True, True])
    c = se.curve(preds, labels, window=3)
    assert c["end"] == [3, 6] and c["accuracy"][0] == 1.0  # the last window of 1 < 3 / 2 is dropped
    assert se.curve(preds, labels, window=100)["end"] == [7]


def test_majority_baseline_follows_the_counts():
    m = se.Majority()
    assert m.predict_one("x") == 0.5
    m.learn_one("x", False)
    assert m.predict_one("x") == 0.0
    m.learn_one("x", True)
    m.learn_one("x", True)
    assert m.predict_one("x") == 1.0


def test_evaluate_writes_json_and_png_and_beats_the_baselines(tmp_path):
    stream = synthetic(600)
    models = se.build_models(("plain",), lexicon=Lexicon(chinese_seed_lexicon()))
    assert list(models) == ["sentiment-plain", "nb-only-plain", "majority", "lexicon"]
    report = se.evaluate(stream, tmp_path / "out", models=models, window=100, dataset={"name": "synthetic"},
                         topics_tokenizer=str.split)
    data = json.loads((tmp_path / "out" / "sentiment.json").read_text())
    assert set(data) == {"dataset", "options", "models", "seconds", "topics"}
    assert data["topics"]["n_topics"] == 10 and len(data["topics"]["topics"]) == 10
    assert data["topics"]["learn_us"] > 0 and se.topics_table(report) is not None
    assert data["dataset"]["n_reviews"] == 620 and data["dataset"]["n_unseen"] == 600
    r = data["models"]["sentiment-plain"]
    for key in ("accuracy", "auc", "accuracy_unseen", "auc_unseen", "predict_us", "learn_us", "predict_us_median",
                "curve", "state_bytes", "vocabulary", "n_learned"):
        assert key in r, key
    assert set(r["curve"]) == {"end", "accuracy", "auc"} and r["curve"]["end"][:2] == [100, 200]
    assert r["n_learned"] == 620 and r["state_bytes"] > 0
    maj, lex = data["models"]["majority"], data["models"]["lexicon"]
    assert 0.55 < maj["accuracy"] < 0.65  # the negatives' share
    assert r["accuracy"] > maj["accuracy"] + 0.2 and r["auc"] > maj["auc"] + 0.3
    assert r["accuracy"] > lex["accuracy"] + 0.1 and r["auc_unseen"] > lex["auc_unseen"]
    assert 0 < lex["coverage"] < 1
    assert data["options"]["beats_baselines_by_2_points"] == {"sentiment-plain": True}
    png = (tmp_path / "out" / "sentiment_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert report.models["sentiment-plain"]["accuracy"] == r["accuracy"]


def test_evaluate_refuses_an_empty_stream(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        se.evaluate([], tmp_path, models={"majority": se.Majority()})


def test_build_models_names_an_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'spacy'"):
        se.build_models(("spacy",), lexicon=Lexicon({}))


def test_the_command_runs_on_a_small_stream(tmp_path, monkeypatch):
    from rich.console import Console
    from typer.testing import CliRunner

    from infogap.stream.tools import cli, reviews_data

    monkeypatch.setattr(reviews_data, "load_reviews", lambda cache_dir=None: synthetic(300, seed=1))
    monkeypatch.setattr(cli, "console", Console(width=100))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli.app, ["evaluate-reviews", "--out", str(out), "--limit", "250", "--tokenizer",
                                       "plain", "--window", "50"])
    assert res.exit_code == 0, res.output
    assert "sentiment-plain" in res.output and "majority" in res.output and "sentiment-jieba" not in res.output
    data = json.loads((out / "sentiment.json").read_text())
    assert data["dataset"]["n_reviews"] == 250 and data["dataset"]["limit"] == 250
    res = CliRunner().invoke(cli.app, ["evaluate-reviews", "--tokenizer", "bert"])
    assert res.exit_code == 2 and "unknown tokenizer" in res.output


def test_plain_tokens_is_the_plain_factory():
    assert se.build_models(("plain",), ablation=False, lexicon=Lexicon({}))["sentiment-plain"].tokenize is plain_tokens
