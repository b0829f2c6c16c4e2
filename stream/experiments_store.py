"""Experiment metrics in the store: one hash per experiment and variant, absolute values; and the settings
that say which segments are counted.

Layout (``RedisKeys.experiment``)::

    ig:exp:{experiment}:{variant}     a hash; one field per shard, campaign, channel and count:
        "{shard}|{campaign}|{channel}|{count}" -> number
    e.g. HGETALL ig:exp:ranker-v2:B  ->  0|recs|email|sent 120, 0|recs|email|clicks 9, 0|recs|email|revenue 310.5, ...

``count`` is one of :data:`infogap.models.experiments.COUNT_FIELDS` (sent, impressions, opens, clicks,
conversions, revenue, revenue_sq, cost): additive sums only; rates, ROI and intervals are derived
when read (:func:`infogap.models.experiments.summarize`), so every reader computes them the same way.
And ``users``: a 64-bit bitmap of the users behind the segment's counts (decimal; readers combine shards with
OR, not +), by which a report shows a cell only once ``min_users`` distinct users stand behind it
(:mod:`infogap.models.privacy`).

Values are written with HSET, never HINCRBY: a batch replayed after a crash rewrites the same
absolute values instead of counting twice. The shard (a partition of ``events``, see
``MetricsConfig.shards``) gives every field a single writer when several workers share the topic;
readers sum over shards. Campaign, channel and variant are escaped (``%``, ``:`` and ``|`` as
``%25``, ``%3A``, ``%7C``), so no value is misread however it is spelt.

Cohort figures of the control group (:mod:`infogap.models.retention`) go beside them, one hash per experiment
(``RedisKeys.retention``)::

    ig:ret:{experiment}               a hash; one field per shard, campaign, channel, variant, arm and count:
        "{shard}|{campaign}|{channel}|{variant}|{arm}|{count}" -> number
    e.g. HGETALL ig:ret:ranker-v2  ->  0|recs|email|B|treated|entered 950, 0|recs|email|B|control|entered 48, ...

``count`` is one of :data:`infogap.models.retention.RETENTION_FIELDS`, written the same way (HSET of absolute
values, one writer per shard); a cohort whose records all left (erased, past the horizon) is written as zeros.

Only known segments reach the store: :func:`metrics_config` gives the worker's metrics the push
campaign, ``INFOGAP_EXPERIMENT_CAMPAIGNS`` and the experiment's variants, and at most
``INFOGAP_EXPERIMENT_MAX_SEGMENTS`` segments per partition are made from feedback contexts.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

from infogap.models.experiments import (COUNT_FIELDS, NO_VARIANT, Counts, Experiment, MetricsConfig, Segment,
                                validate_overrides)
from infogap.models.push_policy import PushConfig
from infogap.models.retention import ARMS, RETENTION_FIELDS, Cohort, CohortCounts, RetentionConfig
from infogap.stream.settings import TOPIC_PARTITIONS, Settings

_SEP = "|"
_ESCAPES = {"%": "%25", ":": "%3A", "|": "%7C"}

log = logging.getLogger("infogap.experiments")


def escape(value: str) -> str:
    """``value`` with the store's separators escaped (``%`` first, so that it reads back exactly).

    >>> escape("a:b|c%"), unescape(escape("a:b|c%3A")) == "a:b|c%3A"
    ('a%3Ab%7Cc%25', True)
    """
    if "%" not in value and ":" not in value and "|" not in value:
        return value
    return "".join(_ESCAPES.get(ch, ch) for ch in value)


def unescape(value: str) -> str:
    """The inverse of :func:`escape`."""
    if "%" not in value:
        return value
    return value.replace("%3A", ":").replace("%7C", "|").replace("%25", "%")


def field_name(seg: Segment, count: str) -> str:
    """The hash field of one count of one segment (the variant is in the key).

    >>> field_name(Segment(0, "recs", "email", "B"), "sent"), field_name(Segment(1, "a|b", "x:y", "B"), "sent")
    ('0|recs|email|sent', '1|a%7Cb|x%3Ay|sent')
    """
    return f"{seg.shard}{_SEP}{escape(seg.campaign)}{_SEP}{escape(seg.channel)}{_SEP}{count}"


def parse_fields(variant: str, raw: Mapping) -> dict[Segment, Counts]:
    """A hash as HGETALL returns it (bytes or str) -> counts per segment; unknown fields ignored.

    >>> got = parse_fields("B", {b"0|recs|email|sent": b"3", b"0|recs|email|revenue": b"12.5", b"junk": b"1"})
    >>> [(seg, c.sent, c.revenue) for seg, c in got.items()]
    [(Segment(shard=0, campaign='recs', channel='email', variant='B'), 3, 12.5)]
    """
    grouped: dict[Segment, dict[str, str]] = {}
    for f, v in raw.items():
        f = f.decode(errors="replace") if isinstance(f, bytes) else f
        shard, sep, rest = f.partition(_SEP)
        campaign, sep2, tail = rest.rpartition(_SEP)
        campaign, sep3, channel = campaign.rpartition(_SEP)
        if not (sep and sep2 and sep3 and _is_shard(shard) and tail in COUNT_FIELDS):
            continue
        grouped.setdefault(Segment(int(shard), unescape(campaign), unescape(channel), variant), {})[tail] = v
    return _readable(grouped, Counts.from_dict)


def cohort_field(cohort: Cohort, count: str) -> str:
    """The hash field of one count of one cohort (the experiment is in the key).

    >>> cohort_field(Cohort(2, "recs", "e|mail", "B", "control"), "entered")
    '2|recs|e%7Cmail|B|control|entered'
    """
    return _SEP.join((str(cohort.shard), escape(cohort.campaign), escape(cohort.channel), escape(cohort.variant),
                      cohort.arm, count))


def parse_cohort_fields(raw: Mapping) -> dict[Cohort, CohortCounts]:
    """A retention hash as HGETALL returns it (bytes or str) -> counts per cohort; unknown fields ignored.

    >>> got = parse_cohort_fields({b"0|recs|email|B|treated|entered": b"3", b"0|recs|email|B|treated|revenue": b"2.5",
    ...                            "0|recs|email|B|nope|entered": "1", "junk": "1"})
    >>> [(k.arm, c.entered, c.revenue) for k, c in got.items()]
    [('treated', 3, 2.5)]
    """
    grouped: dict[Cohort, dict[str, str]] = {}
    for f, v in raw.items():
        f = f.decode(errors="replace") if isinstance(f, bytes) else f
        parts = f.split(_SEP)
        if len(parts) != 6 or not _is_shard(parts[0]) or parts[4] not in ARMS or parts[5] not in RETENTION_FIELDS:
            continue
        cohort = Cohort(int(parts[0]), unescape(parts[1]), unescape(parts[2]), unescape(parts[3]), parts[4])
        grouped.setdefault(cohort, {})[parts[5]] = v
    return _readable(grouped, CohortCounts.from_dict)


def _is_shard(text: str) -> bool:
    """A shard number as workers write it (ASCII digits, a few of them: ``int`` of "²" or of 5,000 digits raises)."""
    return text.isascii() and text.isdigit() and len(text) <= 6


def _readable(grouped: dict, read) -> dict:
    """Each group's counts read with ``read``; a group holding a value no worker writes (not a number, negative,
    out of range: :func:`infogap.models.experiments.stored_value`) is left out and logged, so one damaged field
    hides one cell, never the page or the report."""
    out = {}
    for key, d in grouped.items():
        try:
            out[key] = read(d)
        except ValueError as exc:
            log.warning("left out the counts of %s: %s", key, exc)
    return out


def retention_config(settings: Settings, shard: int = 0) -> RetentionConfig:
    """The cohorts' settings (``retention_*``, and the cost per message of the experiments) for one shard.

    >>> from types import SimpleNamespace
    >>> cfg = retention_config(SimpleNamespace(retention_horizon_s=864000.0, retention_max_records=10), shard=3)
    >>> cfg.horizon_s, cfg.max_records, cfg.shard, cfg.cost_per_message["email"]
    (864000.0, 10, 3, 0.001)
    """
    values: dict = {"shard": shard}
    for name, attr in (("horizon_s", "retention_horizon_s"), ("max_records", "retention_max_records"),
                       ("cost_per_message", "experiment_cost_per_message")):
        v = getattr(settings, attr, None)
        if v is not None:
            values[name] = dict(v) if name == "cost_per_message" else v
    return replace(RetentionConfig(), **values)


def experiment_from_settings(settings: Settings) -> Experiment | None:
    """The configured experiment (``INFOGAP_EXPERIMENT``, a JSON object), or None.

    Its variants' ranker settings are its ``"overrides"``, the one place to set them. The deprecated
    ``INFOGAP_EXPERIMENT_OVERRIDES`` still adds to them (a variant given in both, differently: error).

    >>> from types import SimpleNamespace
    >>> exp = experiment_from_settings(SimpleNamespace(experiment={"name": "x", "variants": {"A": 1, "B": 1},
    ...                                                            "overrides": {"B": {"w_segment": 0.5}}}))
    >>> exp.assign("u1"), exp.overrides
    ('B', {'B': {'w_segment': 0.5}})
    """
    spec = getattr(settings, "experiment", None)
    if not spec:
        return None
    legacy = getattr(settings, "experiment_overrides", None)
    if legacy and isinstance(spec, Mapping):
        own = dict(spec.get("overrides") or {})
        for variant, overrides in legacy.items():
            if variant in own and validate_overrides(own[variant]) != validate_overrides(overrides):
                raise ValueError(f"variant {variant!r} has ranker settings in both INFOGAP_EXPERIMENT (\"overrides\") "
                                 f"and INFOGAP_EXPERIMENT_OVERRIDES, different ones; keep them in INFOGAP_EXPERIMENT")
            own.setdefault(variant, overrides)
        spec = {**spec, "overrides": own}
    return Experiment.from_spec(spec)


def metrics_config(settings: Settings, shards: int | None = None, shard: int | None = None) -> MetricsConfig:
    """Attribution and cost settings (``experiment_*``; defaults of :class:`MetricsConfig` where absent).

    ``shards`` should be the partition count of ``events`` (default: what ``infogap up`` creates);
    ``shard``: a fixed shard, for one metrics object per input partition. Feedback attributed by its
    context alone counts only for the push campaign and ``experiment_campaigns``, and the experiment's
    variants.

    >>> from types import SimpleNamespace
    >>> cfg = metrics_config(SimpleNamespace(experiment={"name": "x", "variants": {"A": 1, "B": 1}}), shard=2)
    >>> sorted(cfg.campaigns), sorted(cfg.variants), cfg.shard
    (['recs'], ['A', 'B', 'none'], 2)
    """
    values = {"shards": shards or TOPIC_PARTITIONS["events"], "shard": shard}
    for name in ("cost_per_message", "attribution_window_s", "message_ttl_s", "max_messages", "max_segments"):
        v = getattr(settings, f"experiment_{name}", None)
        if v is not None:
            values[name] = dict(v) if name == "cost_per_message" else v
    values["campaigns"] = frozenset({PushConfig().campaign, *(getattr(settings, "experiment_campaigns", None) or ())})
    experiment = experiment_from_settings(settings)
    values["variants"] = frozenset({NO_VARIANT, *(experiment.variants if experiment else ())})
    return replace(MetricsConfig(), **values)


def glob_escape(s: str) -> str:
    """``s`` matched literally in a SCAN pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)
