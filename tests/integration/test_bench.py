"""``infogap bench`` end to end on the real servers, small: every measurement repeated, the median run kept."""
from __future__ import annotations

import orjson
import pytest

from infogap.stream.tools.bench import run, summary_rows


async def test_bench_repeats_each_measurement_and_reports_its_median_run(settings, tmp_path):
    res = await run(settings, events=2_000, rate=500, seconds=2, out=tmp_path, users=300, items=100, memory=False,
                    repeat=2)
    tp, flood, fr = res["throughput"], res["flood"], res["freshness"]
    # every run drained everything it was given, and the lower of two runs is the one reported
    assert tp["events"] == 2_000 and tp["recs_written"] > 0
    # 2,000 events fit in the worker's first batch: the rate is that batch's, not 0 for want of a second
    assert tp["one_batch"] and tp["seconds"] > 0
    assert tp["events_per_s"] == pytest.approx(2_000 / tp["seconds"], rel=0.01)
    assert len(tp["runs_events_per_s"]) == 2 and tp["events_per_s"] == min(tp["runs_events_per_s"])
    assert flood["dead_letters"] == 2_000 and flood["bad_per_good"] == 10  # 200 good events, 10 bad after each
    assert 0 < flood["good_events_per_s"] == min(flood["runs_good_events_per_s"])
    assert fr["events"] == 1_000 and fr["freshness_ms"]["p99"] == min(fr["runs_p99_ms"])
    assert 0 < fr["freshness_ms"]["p50"] <= fr["freshness_ms"]["p99"]
    assert orjson.loads((tmp_path / "bench.json").read_bytes()) == orjson.loads(orjson.dumps(res))
    assert all((tmp_path / f"run-{r}" / "bench-worker-freshness.log").exists() for r in (1, 2))  # each run's logs
    rows = dict(summary_rows(res))
    runs = ", ".join(f"{v:,}" for v in tp["runs_events_per_s"])
    assert rows["throughput, one worker"].endswith(f"(median of 2: {runs})")
    assert "ms p99)" in rows["freshness at 500 ev/s p50/p95/p99"]
