"""What a channel worker needs beyond the Kafka connection: its provider, its pace, its unsubscribe endpoint."""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from infogap.models.push_policy import CHANNELS
from infogap.stream.settings import Settings

#: The web port of each channel's worker (the email worker's unsubscribe endpoint; every worker's /stats).
DEFAULT_WEB_PORTS = {"email": 6070, "app": 6071, "ads": 6072}


@dataclass(frozen=True)
class ChannelConfig:
    """One channel worker's configuration (``channel_*`` settings; see docs/channels.md).

    >>> ChannelConfig(channel="email").web_port, ChannelConfig(channel="app", rate_per_s=5).rate_per_s
    (6070, 5.0)
    """

    channel: str
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_timeout_s: float = 10.0
    email_from: str = "infogap@example.invalid"
    email_domain: str = "example.invalid"
    status_url: str | None = None  # the email service's status API: GET {status_url}{message_id} -> 200 / 404
    app_url: str = "http://127.0.0.1:8025/v1/app/send"
    ads_url: str = "http://127.0.0.1:8025/v1/ads/send"
    http_timeout_s: float = 10.0
    open_rate: float = 0.0  # simulation: share of delivered messages reported opened (0: off)
    click_rate: float = 0.0  # simulation: share of opened messages reported clicked
    skip_expired: bool = True  # False: deliver messages past expires_at too (replays of historical data)
    rate_per_s: float = 50.0  # messages per second this worker hands to the provider at most
    max_attempts: int = 6  # tries of a message failing transiently before it goes to push.dlq
    retry_base_s: float = 0.5  # backoff between tries: base * 2^try, at most 30 s
    instance_id: str | None = None  # static group membership: a restart takes its partitions back at once
    batch_max_records: int = 200
    batch_within_s: float = 0.2
    web_host: str = "127.0.0.1"
    web_port: int | None = None  # None: DEFAULT_WEB_PORTS[channel]
    unsubscribe_url: str | None = None  # None: http://{web_host}:{web_port} (a real deployment sets its https URL)
    unsubscribe_ttl_s: float = 60 * 86_400.0
    unsubscribe_key: bytes = field(default=b"", repr=False)  # HMAC key of unsubscribe tokens

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"unknown channel {self.channel!r}; use one of {', '.join(CHANNELS)}")
        for name in ("open_rate", "click_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")
        if not self.rate_per_s > 0:
            raise ValueError(f"rate_per_s must be above 0, got {self.rate_per_s!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts!r}")
        object.__setattr__(self, "rate_per_s", float(self.rate_per_s))
        if self.web_port is None:
            object.__setattr__(self, "web_port", DEFAULT_WEB_PORTS[self.channel])
        if self.unsubscribe_url is None:
            object.__setattr__(self, "unsubscribe_url", f"http://{self.web_host}:{self.web_port}")
        if not self.unsubscribe_key:
            object.__setattr__(self, "unsubscribe_key", secrets.token_bytes(32))

    @classmethod
    def from_settings(cls, settings: Settings, channel: str, **overrides) -> ChannelConfig:
        """From ``channel_*`` settings, then explicit ``overrides`` (None values ignored).

        The unsubscribe key is ``unsubscribe_key``, else ``state_key``, else ``pseudonym_key``, else a random
        key kept in ``{local_dir}/unsubscribe.key``: tokens in mails already sent must verify after a restart.
        """
        names = {f.name for f in fields(cls)} - {"channel", "rate_per_s", "unsubscribe_key"}
        values = {n: getattr(settings, f"channel_{n}") for n in names if hasattr(settings, f"channel_{n}")}
        values = {k: v for k, v in values.items() if v is not None}
        rates = settings.channel_rate_per_s
        if channel in rates:
            values["rate_per_s"] = rates[channel]
        values["unsubscribe_key"] = unsubscribe_key(settings)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(channel=channel, **values)


def unsubscribe_key(settings: Settings) -> bytes:
    """The HMAC key of unsubscribe tokens (see :meth:`ChannelConfig.from_settings`)."""
    for key in (settings.unsubscribe_key, settings.state_key, settings.pseudonym_key):
        if key is not None:
            return key.get_secret_value().encode()
    path = Path(settings.local_dir).expanduser() / "unsubscribe.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # created once (O_EXCL): workers started together must not each write a key of their own
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(32).hex())
    for _ in range(50):  # a worker that lost the race may read before the winner wrote
        try:
            key = bytes.fromhex(path.read_text().strip())
        except ValueError:
            key = b""
        if len(key) >= 16:
            return key
        time.sleep(0.02)
    raise ValueError(f"{path} does not hold an unsubscribe key (hex, at least 16 bytes); delete it to make a new "
                     "one, or set INFOGAP_UNSUBSCRIBE_KEY")
