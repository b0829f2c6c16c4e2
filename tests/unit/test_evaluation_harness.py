"""stream/tools/evaluate.py: event files, the implicit peers behind the online protocol, the run and the command."""
from __future__ import annotations

import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from infogap.models.evaluation import prequential
from infogap.stream.tools.evaluate import (EvalOptions, ImplicitPeer, Report, load_dataset, make_model, parse_models, parse_refit,
                             read_event_file, run_model, table)


def planted(n=1500, seed=0):
    """Two groups of users, each interacting only with its own pool of items, in time order."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for t in range(n):
        g = int(rng.integers(2))
        u, i = f"u{g}-{rng.integers(25)}", f"g{g}-i{rng.integers(30)}"
        if (u, i) in seen:
            continue
        seen.add((u, i))
        out.append({"event_id": f"e{t}", "user_id": u, "item_id": i, "type": "view", "ts": 1.7e9 + t})
    return out


@pytest.fixture
def events_file(tmp_path):
    path = tmp_path / "events.jsonl"
    with open(path, "w") as fh:
        for e in planted():
            fh.write(json.dumps(e) + "\n")
    return path


def test_parse_models_and_refit():
    assert parse_models("all")[0] == "infogap"
    assert parse_models("als,pop,als") == ("implicit-als", "popularity")
    with pytest.raises(ValueError, match="unknown model"):
        parse_models("svd")
    assert parse_refit(["500", "knn=200"]) == (500, {"implicit-itemknn": 200})
    for bad in (["x"], ["pop=3"], ["als=three"]):
        with pytest.raises(ValueError, match="--refit-every"):
            parse_refit(bad)
    with pytest.raises(ValueError):
        EvalOptions(default_refit_every=0)
    assert EvalOptions(refit_every={"implicit-als": 5000}).refit_for("implicit-als") == 5000


def test_event_file_is_validated_deduplicated_and_sorted(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join([
        '{"event_id": "b", "user_id": "u1", "item_id": "i2", "type": "click", "ts": "2024-11-24T12:00:01Z"}',
        'not json',
        '{"event_id": "a", "user_id": "u1", "item_id": "i1", "type": "view", "ts": 1732449600, "email": "x@y.z"}',
        '{"event_id": "a", "user_id": "u1", "item_id": "i1", "type": "view", "ts": 1732449600}',
        '{"event_id": "c", "user_id": "u2", "type": "view", "ts": 1732449600}',
        '', '{"event_id": "d", "user_id": "u2", "item_id": "i3", "type": "impression", "ts": 1732449700}',
    ]) + "\n")
    ds = read_event_file(path)
    assert [e["event_id"] for e in ds.events] == ["a", "b", "d"]
    assert ds.events[0]["ts"] < ds.events[1]["ts"] and "email" not in ds.events[0]
    assert ds.n_invalid == 2 and ds.n_duplicates == 1 and "item_id" in ds.invalid_examples[1]
    assert ds.catalog == {"i1", "i2"}  # impressions are not interactions


def test_itemknn_peer_refits_and_serves_from_the_right_pool():
    stream = planted()
    peer = make_model("implicit-itemknn", EvalOptions(default_refit_every=200, knn_neighbours=20), [])
    assert isinstance(peer, ImplicitPeer)
    r = prequential(peer, stream)
    assert peer.fits == len(stream) // 200
    assert r.n_excluded_returned == 0
    assert r.hr > 2 * prequential(make_model("popularity", EvalOptions(), []), stream).hr
    user = stream[-1]["user_id"]
    recs = peer.recommend(user, 10, exclude=set())
    assert len(recs) == 10 and all(i.startswith(user.split("-")[0].replace("u", "g")) for i in recs[:5])


def test_peer_before_its_first_fit_falls_back_to_popularity():
    peer = make_model("implicit-als", EvalOptions(default_refit_every=10_000, als_factors=4), [])
    for e in planted(50):
        peer.learn_one(e)
    assert peer.fits == 0 and len(peer.recommend("nobody", 5)) == 5


def test_als_peer_is_deterministic():
    opts = EvalOptions(default_refit_every=300, als_factors=8, als_iterations=3)
    stream = planted(800)
    with threadpool_limits(limits=1):  # as run_model does
        a, b = (prequential(make_model("implicit-als", opts, []), stream) for _ in range(2))
    assert a.ranks.tolist() == b.ranks.tolist() and a.n_excluded_returned == 0


def test_run_model_in_process_reports_memory_and_fits(events_file):
    opts = EvalOptions(events_file=events_file, default_refit_every=250)
    ds = load_dataset(opts)
    out = run_model("implicit-itemknn", opts, dataset=ds)
    assert out["fits"] == len(ds.events) // 250 and out["events_per_s"] > 0 and out["peak_rss_delta_mb"] >= 0
    assert len(out["ranks"]) == out["n_evaluated"] and out["config"]["refit_every"] == 250


def test_infogap_ranks_the_same_with_or_without_reasons(events_file):
    ds = load_dataset(EvalOptions(events_file=events_file))
    plain, explained = (run_model("infogap", EvalOptions(events_file=events_file, reasons=r), dataset=ds)
                        for r in (False, True))
    assert plain["ranks"] == explained["ranks"] and plain["hr@10"] > 0.3  # two planted groups: easy hits
    assert (plain["config"]["reasons"], explained["config"]["reasons"]) == (False, True)
    assert plain["learn_many_events_per_s"] > 0  # issue 3 measures learn_many alone too
    assert explained["config"]["half_life_days"] == 7.0


def test_evaluate_command_end_to_end(events_file, tmp_path):
    from typer.testing import CliRunner

    from infogap.stream.tools.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["evaluate", "--events-file", str(events_file), "--models", "pop,knn",
                                   "--refit-every", "knn=300", "--out", str(out), "--no-progress", "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "HR@10" in res.output and "implicit-itemknn" in res.output
    report = json.loads((out / "evaluation.json").read_text())
    assert list(report["models"]) == ["popularity", "implicit-itemknn"]
    knn = report["models"]["implicit-itemknn"]
    assert knn["config"]["refit_every"] == 300 and knn["curve"]["x"] and 0 < knn["hr@10"] <= 1
    assert (out / "hr_curve.png").stat().st_size > 10_000
    # the child process measured exactly what an in-process run measures
    same = prequential(make_model("popularity", EvalOptions(), []), read_event_file(events_file).events)
    assert report["models"]["popularity"]["hits"] == same.hits


def test_evaluate_command_rejects_bad_options(events_file):
    from typer.testing import CliRunner

    from infogap.stream.tools.cli import app

    res = CliRunner().invoke(app, ["evaluate", "--events-file", str(events_file), "--models", "svd"])
    assert res.exit_code == 2 and "unknown model" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--dataset", "netflix"])
    assert res.exit_code == 2


def test_table_names_the_ratio_to_the_best_peer():
    from rich.console import Console

    row = {"k": 10, "hr@10": 0.3, "ndcg@10": 0.1, "coverage": 0.5, "n_evaluated": 10, "events_per_s": 1.0,
           "peak_rss_delta_mb": 1.0, "seconds": 1.0}
    models = {"infogap": dict(row), "implicit-als": {**row, "hr@10": 0.2, "fits": 1, "fit_seconds": 0.1,
                                                      "config": {"refit_every": 1000}}}
    console = Console(width=80, record=True)
    console.print(table(Report("d", 10, 5, {"k": 10, "window": 5}, models, 1.0)))
    text = console.export_text()
    assert "= 1.50x" in text and "implicit-als" in text


def test_evaluate_repeats_each_model_and_reports_its_median_run(events_file, tmp_path):
    from typer.testing import CliRunner

    from infogap.stream.tools.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["evaluate", "--events-file", str(events_file), "--models", "infogap,pop",
                                   "--repeat", "3", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["options"]["repeat"] == 3
    for r in report["models"].values():
        runs = r["runs_events_per_s"]
        assert len(runs) == 3 and r["events_per_s"] == sorted(runs)[1]
    infogap = report["models"]["infogap"]["runs_events_per_s"]
    printed = " ".join(res.output.split())  # the table's caption wraps
    assert "median run of 3 by events/s; infogap's runs: " + ", ".join(f"{v:,.0f}" for v in infogap) in printed
    res = CliRunner().invoke(app, ["evaluate", "--events-file", str(events_file), "--repeat", "0"])
    assert res.exit_code == 2 and "--repeat must be >= 1" in res.output


def test_parse_tradeoff():
    from infogap.stream.tools.evaluate import DEFAULT_TRADEOFF, parse_tradeoff

    assert parse_tradeoff("pop_exponent") == ("pop_exponent", DEFAULT_TRADEOFF["pop_exponent"])
    assert parse_tradeoff(" pop_exponent = 0, 0.5,0.5 ") == ("pop_exponent", (0.0, 0.5))
    assert parse_tradeoff("w_global=0.01,0.1") == ("w_global", (0.01, 0.1))
    for bad, why in (("popexponent", "not a numeric EngineConfig setting"), ("seed", "give the values"),
                     ("pop_exponent=a,b", "expected KEY=V1,V2"), ("window=0,8", "window must be >= 1"),
                     ("pop_exponent=", "no values"), ("event_weights=1", "not a numeric")):
        with pytest.raises(ValueError, match=why):
            parse_tradeoff(bad)


def users_of(stream):
    """Group 0's users are 'F', group 1's 'M'; ages on both sides of 25."""
    return [{"user_id": u, "gender": "F" if u.startswith("u0") else "M", "age": 20 + 3 * int(u.split("-")[1]) % 40,
             "occupation": "student"} for u in sorted({e["user_id"] for e in stream})]


def test_run_model_reports_fairness_figures_and_group_hit_rates(events_file):
    from dataclasses import replace

    opts = EvalOptions(events_file=events_file, min_group_events=100)
    ds = load_dataset(opts)
    ds = replace(ds, items=[{"item_id": i, "tags": [i.split("-")[0]]} for i in sorted(ds.catalog)],
                 users=users_of(ds.events))
    out = run_model("popularity", opts, dataset=ds)
    assert 0 < out["exposure_gini"] < 1 and 0 <= out["long_tail_share"] <= 1 and out["novelty"] > 0
    assert out["ild"] is not None and 0 <= out["ild"] <= 1
    g = out["group_hr"]["gender"]
    assert sum(v["n"] for v in g["groups"].values()) == out["n_evaluated"]
    assert sum(v["hits"] for v in g["groups"].values()) == out["hits"]
    assert g["min_n"] == 100 and (g["gap"] is None or g["gap"]["abs"] >= 0)
    assert list(out["group_hr"]) == ["gender", "age", "occupation"]
    assert out["group_hr"]["occupation"]["gap"] is None  # one group: nothing to compare


def test_fairness_tables_fit_in_80_columns():
    from rich.console import Console

    from infogap.stream.tools.evaluate import fairness_table, group_table, tradeoff_table

    groups = {"gender": {"groups": {"F": {"n": 25_467, "hits": 5600, "hr": 0.2199, "ci95": [0.2148, 0.2250]},
                                    "M": {"n": 73_590, "hits": 16212, "hr": 0.2203, "ci95": [0.2173, 0.2233]}},
                         "gap": {"best": "M", "worst": "F", "abs": 0.0004, "ratio": 1.002, "groups_compared": 2},
                         "min_n": 1000, "skipped": []},
              "occupation": {"groups": {"entertainment": {"n": 2077, "hits": 520, "hr": 0.2504,
                                                          "ci95": [0.232, 0.269]},
                                        "homemaker": {"n": 292, "hits": 111, "hr": 0.3801, "ci95": [0.33, 0.43]}},
                             "gap": None, "min_n": 1000, "skipped": ["homemaker"]}}
    row = {"k": 10, "hr@10": 0.2202, "ndcg@10": 0.11, "coverage": 0.94, "exposure_gini": 0.8469,
           "long_tail_share": 0.6009, "novelty": 2.254, "ild": 0.7438, "head_items": 60, "group_hr": groups}
    models = {m: dict(row) for m in ("infogap", "popularity", "decayed-popularity", "implicit-itemknn",
                                     "implicit-als")}
    point = {"value": 0.2, "hr@10": 0.2202, "ndcg@10": 0.11, "coverage": 0.94, "exposure_gini": 0.85,
             "long_tail_share": 0.6, "novelty": 2.25, "ild": 0.74, "events_per_s": 1.0}
    report = Report("d", 10, 5, {"k": 10, "window": 5, "min_group_events": 1000}, models, 1.0,
                    tradeoff={"setting": "pop_exponent", "default": 0.2, "points": [point]})
    console = Console(width=80, record=True)
    for t in (fairness_table(report), group_table(report), tradeoff_table(report)):
        console.print(t)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "0.847" in text and "0.000 1.0x" in text and "0.220±.003" in text and "homemaker*" in text
    assert "0.2 (default)" in text and "infogap's best / worst: gender M / F" in " ".join(text.split())


def test_tradeoff_option_writes_the_curve_and_its_points(events_file, tmp_path):
    from typer.testing import CliRunner

    from infogap.stream.tools.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["evaluate", "--events-file", str(events_file), "--models", "pop",
                                   "--tradeoff", "pop_exponent=0,0.6", "--out", str(out), "--no-progress",
                                   "--jobs", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "evaluation.json").read_text())
    tr = report["tradeoff"]
    assert tr["setting"] == "pop_exponent" and tr["default"] == 0.2
    assert [p["value"] for p in tr["points"]] == [0.0, 0.6]
    for p in tr["points"]:
        assert 0 < p["hr@10"] <= 1 and 0 <= p["exposure_gini"] <= 1 and p["long_tail_share"] is not None
    assert tr["points"][0]["exposure_gini"] != tr["points"][1]["exposure_gini"]  # the knob moves exposure
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "Trade-off" in res.output and "tradeoff.png" in " ".join(res.output.split())
    assert list(report["models"]) == ["popularity"] and "exposure_gini" in report["models"]["popularity"]
    res = CliRunner().invoke(app, ["evaluate", "--events-file", str(events_file), "--tradeoff", "nope=1"])
    assert res.exit_code == 2 and "'nope' is not a numeric" in res.output
