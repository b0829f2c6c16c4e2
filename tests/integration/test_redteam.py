"""The red-team run of issue 18 ("Done when"), at a small scale: hostile records of every shape on every input
topic, faults in Redis and Kafka, crashes around erasure, against real worker processes (``infogap redteam``,
:mod:`infogap.stream.tools.redteam`). Every check must pass: no worker crashed, no good event lost or applied twice, no code
run from a record, no erased user back."""
from __future__ import annotations

import orjson
import pytest

from infogap.stream.tools.redteam import run

pytestmark = pytest.mark.slow


async def test_a_red_team_run_finds_nothing(local_stack, tmp_path):
    result = await run(local_stack, scale=1, out=tmp_path)
    failed = [f"{c['check']}: {c['detail']}" for c in result["checks"] if not c["ok"]]
    assert not failed, "red-team checks failed (worker logs and redteam.json in {}):\n{}".format(
        tmp_path, "\n".join(failed))
    assert result["ok"]
    counts = result["counts"]
    assert counts["hostile"] >= 250 and counts["good_events"] >= 300
    families = counts["families"]
    # every input topic got hostile records of several families, each dead-lettered as expected
    for topic in ("events", "items", "users", "cooc", "erasures", "state.users", "state.items"):
        assert len([f for f in families.values() if f["topic"] == topic and f["family"] != "good"]) >= 2, topic
    assert all(f["dlq"] == f["sent"] for f in families.values() if f["expect"] == "dlq"), orjson.dumps(families)
    assert not result["info"]["marker_exists"]
    assert (tmp_path / "redteam.json").is_file()
