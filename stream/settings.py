"""One validated settings object for every infogap process.

Values come from the environment (prefix ``INFOGAP_``), read when a process is
wired (:func:`load`), never at import time.

>>> s = Settings(kafka_bootstrap="127.0.0.1:19092", topic_prefix="t1.")
>>> s.topics.events, s.kafka_port
('t1.events', 19092)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Partition counts of the contract topics (events is keyed by user_id; 6 lets up to 6 workers share it).
TOPIC_PARTITIONS = {"events": 6, "events.dlq": 1, "items": 3, "users": 6, "cooc": 6, "push": 6}
COMPACTED_TOPICS = ("items", "users")


@dataclass(frozen=True)
class Topics:
    """Topic names after the configured prefix is applied."""

    events: str
    dlq: str
    items: str
    users: str
    cooc: str
    push: str

    def all(self) -> dict[str, str]:
        """Contract name -> real topic name."""
        return {"events": self.events, "events.dlq": self.dlq, "items": self.items,
                "users": self.users, "cooc": self.cooc, "push": self.push}


class Settings(BaseSettings):
    """Everything an infogap process can be told; see README "Configuration"."""

    model_config = SettingsConfigDict(env_prefix="INFOGAP_", extra="ignore")

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
    max_future_s: float = 86_400.0  # events more than a day ahead of the worker's clock are rejected
    allow_unknown_types: bool = False
    dedupe_window_s: float = 86_400.0
    dedupe_max_ids: int = 2_000_000

    # --- health and metrics (None: no HTTP server)
    http_host: str = "0.0.0.0"
    http_port: int | None = 8080

    # --- processing
    batch_max_records: int = 5_000
    batch_timeout_ms: int = 100
    top_n: int = 10
    half_life_days: float = 7.0
    recs_ttl_s: int = 7 * 86_400
    model_version: str = "v1"

    # --- push
    push_enabled: bool = True
    push_min_new_items: int = 3  # top-N "changed materially": at least this many new items
    push_daily_cap: dict[str, int] = Field(default_factory=lambda: {"email": 1, "app": 3, "ads": 5})
    push_repeat_window_s: float = 7 * 86_400.0
    push_ttl_s: float = 86_400.0
    push_items: int = 5

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
        if urlparse(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {v!r}")
        return v

    @property
    def topics(self) -> Topics:
        p = self.topic_prefix
        return Topics(events=f"{p}events", dlq=f"{p}events.dlq", items=f"{p}items",
                      users=f"{p}users", cooc=f"{p}cooc", push=f"{p}push")

    @property
    def kafka_host(self) -> str:
        return self.kafka_bootstrap.split(",")[0].strip().rpartition(":")[0]

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].strip().rpartition(":")[2])

    @property
    def redis_port(self) -> int:
        return urlparse(self.redis_url).port or 6379

    @property
    def redis_host(self) -> str:
        return urlparse(self.redis_url).hostname or "127.0.0.1"


def load(**overrides) -> Settings:
    """Read the environment now and apply explicit overrides on top."""
    return Settings(**overrides)
