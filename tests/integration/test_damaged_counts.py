"""Counts in Redis that no worker writes (not a number, infinite, negative, a bitmap of -1, returns above the users,
bytes that are not UTF-8, a negative epsilon) against the real Redis: ``infogap report`` and the console's
experiments page leave out the cell that holds one and show the rest; before, one such field made the report
print a traceback and the page answer 500, and a ``users`` field of -1 read as 64 users passed the privacy floor."""
from __future__ import annotations

import asyncio

import orjson
from typer.testing import CliRunner

from infogap.stream import connections
from infogap.stream.store import open_store
from tests.unit.test_console_pages import _client as console_client

FIVE_USERS = str(0b11111).encode()


def _cell(channel: str, n_clicks: int, **damaged: bytes) -> dict[bytes, bytes]:
    """One segment's hash fields: 100 sent, ``n_clicks`` clicks, five users; ``damaged`` replaces some."""
    fields = {"sent": b"100", "clicks": str(n_clicks).encode(), "users": FIVE_USERS, **damaged}
    return {f"0|recs|{channel}|{k}".encode(): v for k, v in fields.items()}


async def test_damaged_counts_hide_their_cell_never_the_report_or_the_page(settings, monkeypatch):
    from infogap.stream.tools.cli import app

    s = settings.model_copy(update={"engine": {}})  # the default privacy floor: 5 users
    store, r = open_store(s), connections.redis_async(s)
    try:
        for variant, clicks in (("A", 10), ("B", 30)):
            await r.hset(store.keys.experiment("exp1", variant), mapping={
                **_cell("email", clicks),
                **_cell("app", 5, sent=b"inf"),  # not a count
                **_cell("ads", 50, users=b"-1"),  # would read as 64 users: above any floor
                **_cell("sms", 5, clicks=b"\xff\xfe")})  # not UTF-8
        treated = {"entered": b"40", "d1_users": b"40", "d1_returned": b"20", "d7_users": b"40", "d7_returned": b"10"}
        await r.hset(store.keys.retention("exp1"), mapping={
            **{f"0|recs|email|B|treated|{k}".encode(): v for k, v in treated.items()},
            **{f"0|recs|email|B|control|{k}".encode(): v for k, v in {**treated, "d1_returned": b"10"}.items()},
            **{f"0|recs|app|B|treated|{k}".encode(): v for k, v in {**treated, "d1_returned": b"400"}.items()},
            **{f"0|recs|app|B|control|{k}".encode(): v for k, v in {**treated, "d7_users": b"-5"}.items()}})
        await r.set(store.keys.privacy(0), orjson.dumps({"days": {"2026-12-07": {"trending": [0.5, 5]}}}))
        await r.set(store.keys.privacy(1), orjson.dumps({"days": {"2026-12-07": {"trending": [-1e300, 1]}}}))

        monkeypatch.setenv("INFOGAP_REDIS_URL", s.redis_url)
        monkeypatch.setenv("INFOGAP_REDIS_PREFIX", s.redis_prefix)
        monkeypatch.setenv("COLUMNS", "160")
        res = await asyncio.to_thread(CliRunner().invoke, app, ["report"])
        assert res.exit_code == 0, res.output
        out = res.output
        assert "email" in out and "30.0%" in out and "10.0%" in out, out  # the sound cells, with their CTRs
        assert not any(ch in out for ch in (" app ", " ads ", " sms ")), out
        assert "a privacy ledger in Redis cannot be read" in out and "partition 1" in out, out
        assert "0.5" in out, out  # partition 0's spending is still shown

        client = await console_client(s, store)
        try:
            page = await client.get("/experiments")
            html = await page.text()
        finally:
            await client.close()
        assert page.status == 200 and "30.0%" in html and ">ads<" not in html and ">app<" not in html, html[:2000]
    finally:
        await store.close()
        await r.aclose()
