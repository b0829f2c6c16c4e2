"""The pure parts of the channel workers and of the experiment store's layout."""
from __future__ import annotations

import math
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given, strategies as st

from infogap.models.events import parse_event
from infogap.models.experiments import COUNT_FIELDS, Counts, Segment
from infogap.stream.channels import ChannelConfig, address_for, check_message, email_for, feedback_events
from infogap.stream.experiments_store import field_name, metrics_config, parse_fields
from infogap.stream.settings import Settings

NOW = 1_732_460_000.0


def msg(i, **kw):
    return {"message_id": f"m-{i}", "user_id": f"u{i}", "channel": "email", "campaign": "recs", "variant": "B",
            "items": [{"item_id": "sku-1", "reason": "popular"}, {"item_id": "sku-2"}], "reason": "new picks",
            "created_at": NOW, "expires_at": NOW + 86400, **kw}


def test_reported_events_are_valid_contract_events_with_the_context():
    for i in range(50):
        for e in feedback_events(msg(i), NOW, 1.0, 1.0):
            parsed = parse_event(orjson.dumps(e), now=NOW)
            assert dict(parsed.context) == {"channel": "email", "campaign": "recs", "variant": "B",
                                            "message_id": f"m-{i}"}
            assert parsed.user_id == f"u{i}"


def test_null_variant_is_left_out_of_the_context():
    (imp,) = feedback_events(msg(1, variant=None), NOW)
    assert imp["context"] == {"channel": "email", "campaign": "recs", "message_id": "m-1"}
    assert imp["type"] == "impression" and imp["item_id"] == "sku-1"


def test_simulated_rates_are_deterministic_and_close_to_the_rate():
    n = 4000
    runs = [[feedback_events(msg(i), NOW, 0.3, 0.2) for i in range(n)] for _ in range(2)]
    assert runs[0] == runs[1]
    opens = sum(any(e["type"] == "push_open" for e in evs) for evs in runs[0])
    clicks = sum(any(e["type"] == "push_click" for e in evs) for evs in runs[0])
    assert abs(opens - 0.3 * n) < 4 * math.sqrt(n * 0.3 * 0.7)
    assert abs(clicks - 0.06 * n) < 4 * math.sqrt(n * 0.06 * 0.94)
    assert all(len(evs) >= 1 for evs in runs[0])
    assert feedback_events(msg(1), NOW, 0.0, 1.0) == feedback_events(msg(1), NOW)  # no opens, no clicks


def test_checks_and_email():
    assert check_message(msg(1)) is None
    assert "items" in check_message(msg(1, items=[]))
    assert "message_id" in check_message({k: v for k, v in msg(1).items() if k != "message_id"})
    assert check_message([1]) is not None
    em = email_for(msg(7), ChannelConfig(channel="email"), NOW)
    assert em["To"] == "u7@example.invalid" and em["X-Infogap-Message-Id"] == "m-7"
    assert "- sku-1: popular" in em.get_content() and "- sku-2" in em.get_content()
    titled = email_for(msg(7, items=[{"item_id": "sku-1", "title": "Red shoes", "reason": "popular"}]),
                       ChannelConfig(channel="email"), NOW)
    assert "- Red shoes: popular" in titled.get_content() and "sku-1" not in titled.get_content()
    assert address_for("..", "d.invalid") == "_@d.invalid"


def test_channel_config_from_settings_and_validation(tmp_path):
    s = Settings(local_dir=tmp_path, channel_smtp_port=2525, channel_open_rate=0.5, channel_rate_per_s={"app": 7})
    cfg = ChannelConfig.from_settings(s, "app", click_rate=0.1, web_port=9999)
    assert (cfg.smtp_port, cfg.open_rate, cfg.click_rate, cfg.rate_per_s) == (2525, 0.5, 0.1, 7.0)
    assert cfg.unsubscribe_url == "http://127.0.0.1:9999"
    key = cfg.unsubscribe_key  # no key in the settings: one kept in the local dir, the same after a restart
    assert len(key) == 32 and ChannelConfig.from_settings(s, "email").unsubscribe_key == key
    assert (tmp_path / "unsubscribe.key").stat().st_mode & 0o777 == 0o600
    keyed = Settings(local_dir=tmp_path, unsubscribe_key="a" * 32)
    assert ChannelConfig.from_settings(keyed, "email").unsubscribe_key == b"a" * 32
    with pytest.raises(ValueError, match="unknown channel"):
        ChannelConfig(channel="sms")
    with pytest.raises(ValueError, match="open_rate"):
        ChannelConfig(channel="app", open_rate=2.0)


@given(st.text(min_size=0, max_size=20).filter(lambda c: "\x00" not in c),
       st.sampled_from(["email", "app", "ads"]), st.integers(0, 63), st.sampled_from(["A", "B", "none"]))
def test_store_fields_round_trip(campaign, channel, shard, variant):
    seg = Segment(shard, campaign, channel, variant)
    c = Counts(sent=3, clicks=1, revenue=2.5, revenue_sq=6.25, cost=0.3)
    raw = {field_name(seg, k).encode(): str(v).encode() for k, v in c.to_dict().items()}
    assert parse_fields(variant, raw) == {seg: c}
    assert set(COUNT_FIELDS) == set(c.to_dict())


def test_metrics_config_reads_optional_settings():
    cfg = metrics_config(SimpleNamespace(experiment_cost_per_message={"email": 1.0}, experiment_max_messages=10),
                         shards=3)
    assert (cfg.cost_per_message, cfg.max_messages, cfg.shards, cfg.attribution_window_s) == (
        {"email": 1.0}, 10, 3, 86_400.0)
