"""One validated settings object for every infogap process.

Values come from the environment (prefix ``INFOGAP_``), read when a process is
wired (:func:`load`), never at import time.

>>> s = Settings(kafka_bootstrap="127.0.0.1:19092", topic_prefix="t1.")
>>> s.topics.events, s.kafka_port
('t1.events', 19092)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Partition counts of the contract topics (events is keyed by user_id; 6 lets up to 6 workers share it).
TOPIC_PARTITIONS = {"events": 6, "events.dlq": 1, "items": 3, "users": 6, "cooc": 6, "push": 6, "push.dlq": 1,
                    "state.users": 6, "state.items": 6, "erasures": 1, "suppressions": 1}
COMPACTED_TOPICS = ("items", "users", "state.users", "state.items", "erasures", "suppressions")
#: Extra topic configs: state snapshots (one compressed record per partition) can be large.
#: Segments roll every minute and the cleaner may take a closed one at once, so a superseded snapshot (which may
#: hold a user erased since) stops being readable about a minute plus one cleaner pass after (docs/operations.md).
_SNAPSHOT_CONFIG = {"max.message.bytes": str(64 * 1024 * 1024), "segment.ms": str(60 * 1000),
                    "min.cleanable.dirty.ratio": "0.1", "min.compaction.lag.ms": "0"}
TOPIC_CONFIGS = {"state.users": _SNAPSHOT_CONFIG, "state.items": _SNAPSHOT_CONFIG}


@dataclass(frozen=True)
class Topics:
    """Topic names after the configured prefix is applied."""

    events: str
    dlq: str
    items: str
    users: str
    cooc: str
    push: str
    push_dlq: str  # push messages a channel could not deliver, with the reason (stream/channels/)
    state_users: str
    state_items: str
    erasures: str  # the erased users' digests (stream/core/erasures.py), compacted, kept for good
    suppressions: str  # the channels' suppression list (stream/channels/permissions.py), compacted, kept for good

    def all(self) -> dict[str, str]:
        """Contract name -> real topic name."""
        return {"events": self.events, "events.dlq": self.dlq, "items": self.items,
                "users": self.users, "cooc": self.cooc, "push": self.push, "push.dlq": self.push_dlq,
                "state.users": self.state_users, "state.items": self.state_items, "erasures": self.erasures,
                "suppressions": self.suppressions}


class Settings(BaseSettings):
    """Everything an infogap process can be told; see docs/configuration.md."""

    # hide_input_in_errors: a validation error must not echo a password given in the environment
    model_config = SettingsConfigDict(env_prefix="INFOGAP_", extra="ignore", hide_input_in_errors=True)

    # --- connections
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "ig:"
    topic_prefix: str = ""
    consumer_group: str = "infogap-workers"

    # --- local servers (infogap up / down)
    local_dir: Path = Field(default_factory=lambda: Path.home() / ".infogap")
    maven_repo: Path | None = None  # None: Maven's own default (~/.m2/repository)
    kafka_controller_port: int = 9093
    kafka_heap: str = "512m"

    # --- ingest
    max_event_bytes: int = 16_384
    min_event_ts: float = 631_152_000.0  # 1990-01-01T00:00:00Z; older is taken for a unit mistake
    max_future_s: float = 300.0  # events more than this ahead of the worker's clock are rejected
    # an event moves its partition's lateness watermark and dedupe horizon by at most its record's timestamp
    # (or the worker's clock) plus this: one clock-skewed event cannot make the next good events late
    max_clock_skew_s: float = Field(300.0, ge=0)
    allow_unknown_types: bool = False
    max_lateness_s: float = 86_400.0  # out-of-order events within this are applied; older ones go to the DLQ
    unknown_items: Literal["accept", "dlq"] = "accept"  # "dlq": events for items not on the items topic
    dedupe_window_s: float = 86_400.0
    dedupe_max_ids: int = 2_000_000

    # --- health and metrics (None: no HTTP server)
    http_host: str = "127.0.0.1"  # containers set 0.0.0.0 (probes, Prometheus); /inspect then needs console_token
    http_port: int | None = 8080
    # /health fails (503, with the reason) when no batch completed for this long while input waits
    stall_s: float = Field(30.0, gt=0)

    # --- processing
    stages: str = "users,items"  # which stages this process runs: users, items, or both (docs/architecture.md)
    batch_max_records: int = 20_000  # under a backlog: a user's events in one batch are ranked once (docs/architecture.md)
    batch_timeout_ms: int = 100
    # bytes of records a worker's producer packs per partition batch; at most the brokers' message.max.bytes
    # (1 MiB by default), and above a cooc record (~450 kB) so that several share a produce request (docs/architecture.md)
    produce_batch_bytes: int = Field(1_000_000, ge=512 * 1024)
    top_n: int = 10
    half_life_days: float = 7.0
    recs_ttl_s: int = Field(7 * 86_400, gt=0)  # seconds; Redis refuses a TTL of 0
    # how often a worker reads {prefix}generation (one GET): gone or changed, Redis lost its data (a restart
    # without persistence, a flush) and the worker writes every key it holds state for again (docs/operations.md)
    redis_check_interval_s: float = Field(2.0, gt=0)
    model_version: str = "v1"
    # ig:similar, ig:nbrow of changed items and ig:trending are rewritten at most this often (and user stages
    # reload the population as often). ~4k changed rows a second at 2,000 events/s cost an item stage 15-20 %
    # of a core; every 2 s halves that: in one process freshness p99 went 600-800 -> 416-472 ms
    publish_interval_s: float = 2.0
    # the population learner's review models (sentiment and topics, JSON, a few MB at most) are written for the user
    # stages at most this often, and the user stages read them as often
    review_models_publish_s: float = Field(30.0, ge=0)
    # ...and under a backlog further apart: the next publish waits at least (the CPU time the last one took /
    # this share), so publishing takes at most about this share of an item stage's time (a backlog's rows
    # coalesce into fewer, larger publishes; one process draining a backlog: +14-38 % events/s)
    publish_max_share: float = Field(0.1, gt=0, le=1)
    similar_n: int = 20
    neighbour_cache_items: int = 10_000  # neighbour rows a user stage holds, ~21 kB each at 400 neighbours (LRU)
    neighbour_max_age_s: float = 2.0  # a cached neighbour row older than this is read again from Redis
    # ... if its shard has published since; and later under a backlog, so that loading rows takes at most
    # about this share of a user stage's time (the max age grows up to 30 s; docs/architecture.md)
    neighbour_read_max_share: float = Field(0.05, gt=0, le=1)
    trending_n: int = 100
    #: models.EngineConfig fields over its defaults (JSON), the same for every worker of a group, e.g.
    #: {"door_bits": 22}: the admission door for catalogs with many one-off pairs (docs/configuration.md)
    engine: dict[str, Any] = Field(default_factory=dict)
    # Laplace noise on the counts the item stage publishes (ig:similar support, trending scores) and on those
    # infogap report shows, epsilon per publish (per report run); None: no noise. Each publish's epsilon is entered per UTC day in ig:privacy:{partition} and shown by
    # infogap report (docs/privacy.md). The privacy floor itself is the engine's min_users (INFOGAP_ENGINE).
    privacy_epsilon: float | None = Field(None, gt=0)
    # the most one event changes a published count, the noise's scale is sensitivity / epsilon
    privacy_sensitivity: float = Field(1.0, gt=0)

    snapshot_interval_s: float = 10.0  # state snapshot + offset commit cadence; 0: commit every batch, no snapshots

    # --- per-user memory (stream/core/user_partition.py): users leave the worker's memory, not Redis (recs expire
    # with recs_ttl_s); not an erasure; a user who comes back starts fresh
    user_idle_evict_s: float = Field(30 * 86_400.0, ge=0)  # event time without an event before eviction; 0: never
    # past it the least recent go first (down to 90 %); 0: no cap. ~3 kB a user: at most ~150 MB a partition,
    # ~0.9 GB for a worker holding all six
    max_users_per_partition: int = Field(50_000, ge=0)
    user_evict_every_s: float = Field(3_600.0, ge=0)  # event time between sweeps for idle users

    # --- push
    push_enabled: bool = True
    push_min_new_items: int = 3  # top-N "changed materially": at least this many new items
    push_daily_cap: dict[str, int] = Field(default_factory=lambda: {"email": 1, "app": 3, "ads": 5})
    push_repeat_window_s: float = 7 * 86_400.0
    push_ttl_s: float = 86_400.0
    push_items: int = 5
    # each user's push decisions (sent, or the rule that held it back) in Redis, for the console: the newest
    # decision_log_max, kept decision_log_ttl_s after the last; 0 keeps no log
    decision_log_max: int = Field(50, ge=0, le=1_000)
    decision_log_ttl_s: int = Field(7 * 86_400, gt=0)

    # --- the console (infogap console; docs/console.md)
    console_host: str = "127.0.0.1"  # bound elsewhere, the console needs console_token
    console_port: int = 8090
    # the workers the console reads (/stats, /health, /inspect): their base URLs
    console_workers: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8080"])
    console_refresh_s: float = Field(2.0, gt=0)  # how often the console samples the workers and pages refresh

    # --- security (docs/security.md; secrets are SecretStr: repr, str and dumps show '**********')
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None  # None with SSL/SASL_SSL: the system's CA store
    kafka_ssl_certfile: Path | None = None  # client certificate (mutual TLS), PEM
    kafka_ssl_keyfile: Path | None = None  # its private key, PEM (may also sit in the certfile)
    kafka_ssl_key_password: SecretStr | None = None
    redis_username: str | None = None  # an ACL user; None: the "default" user
    redis_password: SecretStr | None = None  # credentials inside redis_url are moved here
    redis_ssl_cafile: Path | None = None  # rediss:// only
    redis_ssl_certfile: Path | None = None
    redis_ssl_keyfile: Path | None = None
    # the console's login, and the workers' /inspect routes' (stream/web_access.py): required where either is
    # bound to a non-loopback address
    console_token: SecretStr | None = None
    pseudonym_key: SecretStr | None = None  # HMAC key of user ids (stream/pseudonym.py); None: ids as given
    state_key: SecretStr | None = None  # HMAC-SHA256 key of state snapshots (stream/snapshots.py); None: SHA-256 only

    @field_validator("kafka_security_protocol", mode="before")
    @classmethod
    def _protocol_spelling(cls, v: object) -> object:
        return v.strip().upper().replace("-", "_") if isinstance(v, str) else v  # sasl_ssl, SASL-SSL -> SASL_SSL

    @field_validator("kafka_sasl_mechanism", mode="before")
    @classmethod
    def _mechanism_spelling(cls, v: object) -> object:
        return v.strip().upper().replace("_", "-") if isinstance(v, str) else v  # scram_sha_256 -> SCRAM-SHA-256

    @field_validator("pseudonym_key", "state_key", "unsubscribe_key", "console_token")
    @classmethod
    def _key_long_enough(cls, v: SecretStr | None, info) -> SecretStr | None:
        if info.field_name == "console_token" and v is not None and not v.get_secret_value().strip():
            return None  # compose passes it empty when unset
        if v is not None and len(v.get_secret_value().encode()) < 16:
            unset = {"pseudonym_key": "to keep user ids as given", "state_key": "to check snapshots by SHA-256 only",
                     "unsubscribe_key": "to use the state or pseudonym key",
                     "console_token": "to serve per-user pages on loopback only"}[info.field_name]
            raise ValueError(f"INFOGAP_{info.field_name.upper()} must be at least 16 bytes long (unset it {unset}); "
                             "generate one with: python -c 'import secrets; print(secrets.token_hex(32))'")
        return v

    @model_validator(mode="after")
    def _security_consistent(self) -> Settings:
        errors: list[str] = []
        proto = self.kafka_security_protocol
        sasl, tls = proto.startswith("SASL_"), proto.endswith("SSL")
        if sasl and not self.kafka_username:
            errors.append(f"INFOGAP_KAFKA_SECURITY_PROTOCOL={proto} needs INFOGAP_KAFKA_USERNAME")
        if sasl and (self.kafka_password is None or not self.kafka_password.get_secret_value()):
            errors.append(f"INFOGAP_KAFKA_SECURITY_PROTOCOL={proto} needs INFOGAP_KAFKA_PASSWORD")
        if not sasl and (self.kafka_username or self.kafka_password is not None):
            errors.append(f"INFOGAP_KAFKA_USERNAME/INFOGAP_KAFKA_PASSWORD are set but "
                          f"INFOGAP_KAFKA_SECURITY_PROTOCOL={proto} does not authenticate; use SASL_SSL "
                          f"(or SASL_PLAINTEXT on a trusted network)")
        kafka_files = {"INFOGAP_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
                       "INFOGAP_KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
                       "INFOGAP_KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile}
        if not tls and (any(kafka_files.values()) or self.kafka_ssl_key_password is not None):
            errors.append(f"Kafka TLS files are set but INFOGAP_KAFKA_SECURITY_PROTOCOL={proto} does not use TLS; "
                          f"use SSL or SASL_SSL")
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            errors.append("INFOGAP_KAFKA_SSL_KEYFILE needs INFOGAP_KAFKA_SSL_CERTFILE (the client certificate)")

        # credentials inside the URL move to redis_username / redis_password, so that no secret is in redis_url
        url = urlparse(self.redis_url)
        query = parse_qsl(url.query, keep_blank_values=True)
        url_user = unquote(url.username) if url.username else dict(query).get("username") or None
        url_pw = unquote(url.password) if url.password else dict(query).get("password") or None
        if url_pw is not None and self.redis_password is not None and url_pw != self.redis_password.get_secret_value():
            errors.append("INFOGAP_REDIS_URL and INFOGAP_REDIS_PASSWORD give different passwords; set only one")
        elif url_pw is not None:
            self.redis_password = SecretStr(url_pw)
        if url_user is not None and self.redis_username is not None and url_user != self.redis_username:
            errors.append("INFOGAP_REDIS_URL and INFOGAP_REDIS_USERNAME give different users; set only one")
        elif url_user is not None:
            self.redis_username = url_user
        if url_user is not None or url_pw is not None:
            netloc = url.netloc.rpartition("@")[2]  # host:port (several, comma-separated, for a cluster)
            kept = urlencode([(k, v) for k, v in query if k not in ("username", "password")])
            self.redis_url = f"{url.scheme}://{netloc}{url.path}" + (f"?{kept}" if kept else "")
        if self.redis_username and self.redis_password is None:
            errors.append(f"INFOGAP_REDIS_USERNAME={self.redis_username} needs INFOGAP_REDIS_PASSWORD")
        redis_files = {"INFOGAP_REDIS_SSL_CAFILE": self.redis_ssl_cafile,
                       "INFOGAP_REDIS_SSL_CERTFILE": self.redis_ssl_certfile,
                       "INFOGAP_REDIS_SSL_KEYFILE": self.redis_ssl_keyfile}
        if any(redis_files.values()) and url.scheme not in ("rediss", "rediss+cluster"):
            errors.append("Redis TLS files are set but INFOGAP_REDIS_URL does not start with rediss:// "
                          "(or rediss+cluster://)")
        if self.redis_ssl_keyfile and not self.redis_ssl_certfile:
            errors.append("INFOGAP_REDIS_SSL_KEYFILE needs INFOGAP_REDIS_SSL_CERTFILE (the client certificate)")
        for name, path in {**kafka_files, **redis_files}.items():
            if path is not None and not Path(path).expanduser().is_file():
                errors.append(f"{name}={path} is not a readable file")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # --- experiments (docs/experiments.md)
    experiment: dict | None = None  # {"name": "recs-v2", "variants": {"A": 0.5, "B": 0.5}, "overrides": {"B": {...}}}
    experiment_cost_per_message: dict[str, float] = Field(
        default_factory=lambda: {"email": 0.001, "app": 0.0005, "ads": 0.01})
    experiment_attribution_window_s: float = 86_400.0
    experiment_message_ttl_s: float = 259_200.0
    experiment_max_messages: int = 500_000
    # campaigns, besides the push campaign, whose feedback is counted from its context alone (no sent message);
    # feedback naming any other campaign, or a variant the experiment lacks, is not counted (``unattributed``)
    experiment_campaigns: list[str] = Field(default_factory=list)
    # segments (campaign, channel, variant) made from feedback contexts per partition; past it: ``overflow``
    experiment_max_segments: int = Field(1_000, ge=1)
    # the global control group (docs/experiments.md, "Control group and retention"): this share of users is never
    # pushed (rule control_group) but ghost-pushed, so that retention and ROI can be measured on the increment; 0
    # (the default: it stops pushes to that share of users, a choice for each deployment) turns it and the cohorts off. Cohort records are kept retention_horizon_s of event time after entry (the
    # figures are of the cohorts that entered within it), at most retention_max_records per events partition.
    control_share: float = Field(0.0, ge=0.0, lt=1.0)
    retention_horizon_s: float = Field(30 * 86_400.0, ge=8 * 86_400.0)
    retention_max_records: int = Field(500_000, ge=1)
    # DEPRECATED alias of INFOGAP_EXPERIMENT's "overrides" (variant -> ranker settings), merged into them with
    # a warning; keys: infogap.models.experiments.RANKER_OVERRIDES, checked here so that a typo stops the process at start
    experiment_overrides: dict[str, dict[str, float]] = Field(default_factory=dict)

    @field_validator("experiment_overrides", mode="before")
    @classmethod
    def _overrides_allowed(cls, v: object) -> object:
        # before pydantic's coercion to float, so that booleans and strings are refused too
        return _checked_overrides(v) if isinstance(v, dict) else v  # not a dict: pydantic reports the type

    @field_validator("experiment_overrides")
    @classmethod
    def _overrides_normalised(cls, v: dict) -> dict:
        return _checked_overrides(v)  # integer settings (query_len, ...) back to int after the float coercion

    def engine_config(self):
        """The workers' :class:`models.EngineConfig`: its defaults, ``half_life_days``, ``top_n``, ``engine``."""
        from infogap.models.engine import EngineConfig

        return EngineConfig(**{"half_life_days": self.half_life_days, "top_n": self.top_n, **self.engine})

    @model_validator(mode="after")
    def _engine_is_valid(self) -> Settings:
        try:
            self.engine_config()
        except (TypeError, ValueError) as e:
            raise ValueError(f"INFOGAP_ENGINE: {e}") from None
        return self

    @model_validator(mode="after")
    def _overrides_match_experiment(self) -> Settings:
        if not self.experiment_overrides:
            return self
        base = self.engine_config()  # the checks that need a whole config (query_len <= history_len)
        for variant, overrides in self.experiment_overrides.items():
            try:
                replace(base, **overrides)
            except ValueError as e:
                raise ValueError(f"INFOGAP_EXPERIMENT_OVERRIDES: variant {variant!r}: {e}") from None
        variants = (self.experiment or {}).get("variants") if isinstance(self.experiment, dict) else None
        if isinstance(variants, dict):
            unknown = sorted(set(self.experiment_overrides) - set(variants))
            if unknown:
                raise ValueError(f"INFOGAP_EXPERIMENT_OVERRIDES names variants {unknown} that INFOGAP_EXPERIMENT "
                                 f"does not have (variants: {', '.join(map(str, variants))})")
        return self

    @model_validator(mode="after")
    def _experiment_is_valid(self) -> Settings:
        """INFOGAP_EXPERIMENT (with its variants' "overrides", the one way to set them) checked at start."""
        from infogap.stream.experiments_store import experiment_from_settings

        if self.experiment_overrides:
            warnings.warn("INFOGAP_EXPERIMENT_OVERRIDES is deprecated: put the variants' ranker settings in "
                          "INFOGAP_EXPERIMENT, e.g. {\"name\": ..., \"variants\": {...}, \"overrides\": {\"B\": {...}}}"
                          + ("" if self.experiment else "; without INFOGAP_EXPERIMENT they have no effect"),
                          FutureWarning, stacklevel=2)
        try:
            experiment = experiment_from_settings(self)
        except ValueError as e:
            raise ValueError(f"INFOGAP_EXPERIMENT: {e}") from None
        if experiment is not None:
            base = self.engine_config()  # the checks that need a whole config (query_len <= history_len)
            for variant, overrides in experiment.overrides.items():
                try:
                    replace(base, **overrides)
                except ValueError as e:
                    raise ValueError(f"INFOGAP_EXPERIMENT: variant {variant!r}: {e}") from None
        return self

    # --- channel workers (infogap channel email|app|ads)
    channel_smtp_host: str = "127.0.0.1"
    channel_smtp_port: int = 1025
    channel_smtp_timeout_s: float = 10.0
    channel_email_from: str = "infogap@example.invalid"
    channel_email_domain: str = "example.invalid"
    channel_open_rate: float = 0.0
    channel_click_rate: float = 0.0
    channel_skip_expired: bool = True
    channel_rate_per_s: dict[str, float] = Field(default_factory=lambda: {"email": 50.0, "app": 200.0, "ads": 200.0})
    channel_max_attempts: int = 6  # transient failures (SMTP 4xx, HTTP 429/5xx, timeouts): tries before push.dlq
    channel_retry_base_s: float = 0.5  # backoff: base * 2^attempt, at most 30 s
    channel_status_url: str | None = "http://127.0.0.1:8025/v1/messages/"  # the email service status API, {url}{message_id}
    channel_app_url: str = "http://127.0.0.1:8025/v1/app/send"  # the app-push service
    channel_ads_url: str = "http://127.0.0.1:8025/v1/ads/send"  # the ad platform
    channel_http_timeout_s: float = 10.0
    channel_web_host: str = "127.0.0.1"  # the email worker's unsubscribe endpoint and every worker's /stats
    channel_web_port: int | None = None  # None: 6070 email, 6071 app, 6072 ads
    channel_instance_id: str | None = None  # a stable id unique per worker (e.g. the pod name): restarts rejoin at once
    channel_unsubscribe_url: str | None = None  # the public https base of the unsubscribe endpoint
    channel_unsubscribe_ttl_s: float = 60 * 86_400.0
    unsubscribe_key: SecretStr | None = None  # HMAC key of unsubscribe tokens; None: state_key, pseudonym_key or a local file

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, v: str) -> str:
        for part in v.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"kafka_bootstrap must be host:port[,host:port], got {v!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        scheme = urlparse(v).scheme
        if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            # the scheme only: the URL may carry a password
            raise ValueError(f"redis_url must start with redis://, rediss://, unix://, redis+cluster:// or "
                             f"rediss+cluster://, got {scheme!r}://...")
        if scheme.endswith("+cluster"):
            redis_nodes(v)  # host:port[,host:port...], each checked
        return v

    @property
    def topics(self) -> Topics:
        p = self.topic_prefix
        return Topics(events=f"{p}events", dlq=f"{p}events.dlq", items=f"{p}items",
                      users=f"{p}users", cooc=f"{p}cooc", push=f"{p}push", push_dlq=f"{p}push.dlq",
                      state_users=f"{p}state.users", state_items=f"{p}state.items", erasures=f"{p}erasures",
                      suppressions=f"{p}suppressions")

    @property
    def kafka_host(self) -> str:
        return self.kafka_bootstrap.split(",")[0].strip().rpartition(":")[0]

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].strip().rpartition(":")[2])

    @property
    def redis_cluster(self) -> bool:
        """Whether ``redis_url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
        return urlparse(self.redis_url).scheme.endswith("+cluster")

    @property
    def redis_port(self) -> int:
        return redis_nodes(self.redis_url)[0][1] if self.redis_cluster else urlparse(self.redis_url).port or 6379

    @property
    def redis_host(self) -> str:
        if self.redis_cluster:
            return redis_nodes(self.redis_url)[0][0]
        return urlparse(self.redis_url).hostname or "127.0.0.1"


def redis_nodes(url: str) -> list[tuple[str, int]]:
    """The (host, port) of each node a ``redis+cluster://`` URL names (Gorse's form).

    >>> redis_nodes("redis+cluster://user:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    [('10.0.0.1', 7000), ('10.0.0.2', 7001), ('::1', 7002)]
    """
    hosts = urlparse(url).netloc.rpartition("@")[2]
    nodes = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a Redis Cluster URL names nodes as host:port[,host:port...], got {part.strip()!r}")
        nodes.append((host, int(port)))
    return nodes


def _checked_overrides(v: dict) -> dict:
    from infogap.models.experiments import validate_overrides
    out = {}
    for variant, overrides in v.items():
        try:
            out[variant] = validate_overrides(overrides)
        except ValueError as e:
            raise ValueError(f"INFOGAP_EXPERIMENT_OVERRIDES: variant {variant!r}: {e}") from None
    return out


def load(**overrides) -> Settings:
    """Read the environment now and apply explicit overrides on top."""
    return Settings(**overrides)
