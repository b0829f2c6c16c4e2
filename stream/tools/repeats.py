"""Repeated measurements on a machine whose speed drifts: report the median run, and every run's figure.

``infogap bench --repeat K`` and ``infogap evaluate --repeat K`` run each measurement K times in turn
(so a drift in the machine's speed reaches each alike) and keep, per measurement, the run whose
headline figure is the median: one run's figures, consistent with each other.
"""
from __future__ import annotations

from collections.abc import Callable


def median_run(runs: list[dict], figure: str, value: Callable[[dict], float]) -> dict:
    """The run whose ``value(run)`` is the median (of an even count, the lower middle one), with every
    run's value under ``figure`` (in run order): one run's figures, consistent with each other, and
    their spread over the repeats.

    >>> runs = [{"events_per_s": 19_000}, {"events_per_s": 21_000}, {"events_per_s": 15_000}]
    >>> median_run(runs, "runs_events_per_s", lambda r: r["events_per_s"])
    {'events_per_s': 19000, 'runs_events_per_s': [19000, 21000, 15000]}
    """
    values = [value(r) for r in runs]
    middle = sorted(range(len(runs)), key=values.__getitem__)[(len(runs) - 1) // 2]
    return {**runs[middle], figure: values}
