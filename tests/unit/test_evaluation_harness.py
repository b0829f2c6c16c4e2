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
