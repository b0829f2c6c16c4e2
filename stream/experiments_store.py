"""Experiment metrics in the store: one hash per experiment and variant, absolute values; and the settings
that say which segments are counted.

Layout (``RedisKeys.experiment``)::

    ig:exp:{experiment}:{variant}     a hash; one field per shard, campaign, channel and count:
        "{shard}|{campaign}|{channel}|{count}" -> number
    e.g. HGETALL ig:exp:ranker-v2:B  ->  0|recs|email|sent 120, 0|recs|email|clicks 9, 0|recs|email|revenue 310.5, ...

``count`` is one of :data:`infogap.models.experiments.COUNT_FIELDS` (sent, impressions, opens, clicks,
conversions, revenue, revenue_sq, cost): additive sums only; rates, ROI and intervals are derived
when read (:func:`infogap.models.experiments.summarize`), so every reader computes them the same way.

Values are written with HSET, never HINCRBY: a batch replayed after a crash rewrites the same
absolute values instead of counting twice. The shard (a partition of ``events``, see
``MetricsConfig.shards``) gives every field a single writer when several workers share the topic;
readers sum over shards. Campaign, channel and variant are escaped (``%``, ``:`` and ``|`` as
``%25``, ``%3A``, ``%7C``), so no value is misread however it is spelt.

Only known segments reach the store: :func:`metrics_config` gives the worker's metrics the push
campaign, ``INFOGAP_EXPERIMENT_CAMPAIGNS`` and the experiment's variants, and at most
``INFOGAP_EXPERIMENT_MAX_SEGMENTS`` segments per partition are made from feedback contexts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from infogap.models.experiments import (COUNT_FIELDS, NO_VARIANT, Counts, Experiment, MetricsConfig, Segment,
                                validate_overrides)
from infogap.models.push_policy import PushConfig
from infogap.stream.settings import TOPIC_PARTITIONS, Settings

_SEP = "|"
_ESCAPES = {"%": "%25", ":": "%3A", "|": "%7C"}


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
        f = f.decode() if isinstance(f, bytes) else f
        v = v.decode() if isinstance(v, bytes) else v
        shard, sep, rest = f.partition(_SEP)
        campaign, sep2, tail = rest.rpartition(_SEP)
        campaign, sep3, channel = campaign.rpartition(_SEP)
        if not (sep and sep2 and sep3 and shard.isdigit() and tail in COUNT_FIELDS):
            continue
        grouped.setdefault(Segment(int(shard), unescape(campaign), unescape(channel), variant), {})[tail] = v
    return {seg: Counts.from_dict(d) for seg, d in grouped.items()}


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
