"""The delivery-service stand-in (infogap.stream.tools.provider_standin) over real sockets: SMTP and HTTP."""
from __future__ import annotations

import smtplib
import urllib.error
import urllib.request
import uuid
from email.message import EmailMessage

import orjson
import pytest

from infogap.stream.tools import provider_standin
from infogap.stream.tools.provider_standin import ProviderStandIn
from tests.integration.kafka_helpers import free_port


@pytest.fixture(scope="module")
def providers():
    with ProviderStandIn() as p:
        yield p


@pytest.fixture(autouse=True)
def _no_rules(providers):
    providers.clear_rules()
    yield
    providers.clear_rules()


def _id(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _mail(user: str, message_id: str, *, own_header: bool = True) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "recs@example.invalid"
    mail["To"] = f"{user}@example.invalid"
    mail["Subject"] = "Three picks for you"
    mail["Message-ID"] = f"<{message_id}@infogap.invalid>"
    if own_header:
        mail["X-Infogap-Message-Id"] = message_id
    mail["List-Unsubscribe"] = f"<https://example.invalid/unsubscribe/{user}>"
    mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    mail["X-Other"] = "not kept"
    mail.set_content("Item 1\nItem 2\n")
    return mail


def _send(providers: ProviderStandIn, mail: EmailMessage) -> dict:
    with smtplib.SMTP(providers.host, providers.smtp_port, local_hostname="localhost", timeout=5) as smtp:
        return smtp.send_message(mail)


def _http(url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None):
    """(status, headers, JSON) of a GET (no body) or POST; error statuses are returned, not raised."""
    data = orjson.dumps(body) if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, orjson.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, orjson.loads(err.read())


def _push(user: str, message_id: str) -> dict:
    return {"message_id": message_id, "user_id": user, "channel": "app", "items": [{"item_id": "i1", "score": 0.9}]}


def test_an_email_is_recorded_with_the_headers_the_worker_sets(providers):
    mid, user = _id(), _id("u")
    assert _send(providers, _mail(user, mid)) == {}
    assert providers.count(mid) == 1
    [rec] = [r for r in providers.accepted("email") if r["message_id"] == mid]
    assert rec["channel"] == "email" and rec["user_id"] == user and rec["to"] == f"{user}@example.invalid"
    assert rec["headers"] == {
        "Message-ID": f"<{mid}@infogap.invalid>", "X-Infogap-Message-Id": mid,
        "List-Unsubscribe": f"<https://example.invalid/unsubscribe/{user}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click", "Subject": "Three picks for you",
        "From": "recs@example.invalid", "To": f"{user}@example.invalid"}
    assert rec["body"] == "Item 1\nItem 2\n"
    assert rec["accepted_at"] > 0
    assert all(r["channel"] == "email" for r in providers.accepted("email"))


def test_the_same_email_twice_counts_twice(providers):
    mid, user = _id(), _id("u")
    _send(providers, _mail(user, mid))
    _send(providers, _mail(user, mid))
    assert providers.count(mid) == 2
    assert len([r for r in providers.accepted("email") if r["message_id"] == mid]) == 2


def test_without_the_infogap_header_the_message_id_comes_from_message_id(providers):
    mid = _id()
    _send(providers, _mail(_id("u"), mid, own_header=False))
    assert providers.count(mid) == 1


def test_a_rejected_recipient_gets_550_and_nothing_is_recorded(providers):
    mid, user = _id(), _id("u")
    providers.reject(user)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        _send(providers, _mail(user, mid))
    code, text = err.value.recipients[f"{user}@example.invalid"]
    assert code == 550 and b"user unknown" in text
    assert providers.count(mid) == 0
    assert [a["outcome"] for a in providers.attempts if a["user_id"] == user] == ["rejected"]

    providers.reject(user, code=554, text="5.7.1 blocked by policy")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
        _send(providers, _mail(user, mid))
    assert err.value.recipients[f"{user}@example.invalid"] == (554, b"5.7.1 blocked by policy")
    with pytest.raises(ValueError):
        providers.reject(user, code=451)


def test_a_deferred_recipient_gets_451_twice_then_the_mail_is_accepted(providers):
    mid, user = _id(), _id("u")
    providers.defer(user, 2)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            _send(providers, _mail(user, mid))
        assert err.value.recipients[f"{user}@example.invalid"][0] == 451
        assert providers.count(mid) == 0
    assert _send(providers, _mail(user, mid)) == {}
    assert providers.count(mid) == 1
    mine = [a for a in providers.attempts if a["user_id"] == user]
    assert [(a["outcome"], a["code"]) for a in mine] == [("deferred", 451), ("deferred", 451), ("accepted", 250)]
    assert mine[-1]["message_id"] == mid


def test_the_status_url_knows_accepted_messages_only(providers):
    mid = _id()
    _send(providers, _mail(_id("u"), mid))
    status, _, body = _http(providers.status_url + mid)
    assert status == 200
    assert body["message_id"] == mid and body["channel"] == "email" and body["status"] == "accepted"
    assert body["count"] == 1 and body["accepted_at"] > 0
    unknown = _id()
    assert _http(providers.status_url + unknown)[::2] == (404, {"message_id": unknown, "status": "unknown"})
    status, _, listed = _http(providers.status_url.rstrip("/") + "?channel=email")
    assert status == 200 and mid in [r["message_id"] for r in listed]
    assert all(r["channel"] == "email" and "body" not in r for r in listed)


def test_an_app_push_is_accepted_once_per_idempotency_key(providers):
    mid, user = _id(), _id("u")
    push = _push(user, mid)
    assert _http(providers.app_url, push, {"Idempotency-Key": mid})[::2] == (
        200, {"status": "accepted", "duplicate": False})
    assert _http(providers.app_url, push, {"Idempotency-Key": mid})[::2] == (
        200, {"status": "accepted", "duplicate": True})
    assert providers.count(mid) == 1
    [rec] = [r for r in providers.accepted("app") if r["message_id"] == mid]
    assert rec["user_id"] == user and rec["body"] == push
    assert _http(providers.status_url + mid)[2]["channel"] == "app"
    _http(providers.app_url, push)
    assert providers.count(mid) == 2


def test_app_push_rejected_is_404_and_deferred_is_503_with_retry_after(providers):
    gone, busy = _id("u"), _id("u")
    providers.reject(gone, "app")
    status, _, body = _http(providers.app_url, _push(gone, _id()))
    assert (status, body) == (404, {"error": "unregistered"})

    mid = _id()
    providers.defer(busy, 1, "app")
    status, headers, body = _http(providers.app_url, _push(busy, mid), {"Idempotency-Key": mid})
    assert (status, headers["Retry-After"], body) == (503, "1", {"error": "unavailable"})
    assert providers.count(mid) == 0
    assert _http(providers.app_url, _push(busy, mid), {"Idempotency-Key": mid})[0] == 200
    assert providers.count(mid) == 1

    providers.defer(busy, 1, "app", code=429)
    status, headers, _ = _http(providers.app_url, _push(busy, _id()))
    assert (status, headers["Retry-After"]) == (429, "1")


def test_ads_rejected_is_404(providers):
    user, mid = _id("u"), _id()
    providers.reject(user, "ads")
    status, _, body = _http(providers.ads_url, _push(user, mid))
    assert (status, body) == (404, {"error": "unknown audience member"})
    assert providers.count(mid) == 0
    assert _http(providers.app_url, _push(user, mid))[0] == 200


def test_a_bad_request_is_400_and_the_server_serves_the_next_one(providers):
    for bad in (b"{not json", b"[1, 2]", orjson.dumps({"message_id": "m"}), orjson.dumps({"user_id": "u"}),
                orjson.dumps({"message_id": 7, "user_id": "u"})):
        status, _, body = _http(providers.app_url, bad)
        assert status == 400 and body["error"]
    status, _, body = _http(providers.app_url, b"x" * (provider_standin.MAX_BODY + 1))
    assert status == 413
    mid = _id()
    assert _http(providers.ads_url, _push(_id("u"), mid))[0] == 200
    assert providers.count(mid) == 1
    assert any(a["outcome"] == "invalid" for a in providers.attempts)


def test_a_hostile_email_does_not_break_the_smtp_server(providers):
    user, mid = _id("u"), _id()
    to = f"{user}@example.invalid"
    hostile = (b"To: <<<@@>>>, \"\r\nFrom: =?x?q?\xff?=\r\nMessage-ID: <<>>@\r\n"
               b"Content-Type: text/plain; charset=nope\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\xfe=\r\n")
    with smtplib.SMTP(providers.host, providers.smtp_port, local_hostname="localhost", timeout=5) as smtp:
        assert smtp.sendmail("a@example.invalid", [to], hostile) == {}
    with smtplib.SMTP(providers.host, providers.smtp_port, local_hostname="localhost", timeout=5) as smtp:
        smtp.helo()  # no ESMTP, so no SIZE announced: the limit bites at DATA
        with pytest.raises(smtplib.SMTPDataError) as err:
            smtp.sendmail("a@example.invalid", [to], (b"x" * 900 + b"\r\n") * (provider_standin.MAX_BODY // 900))
        assert err.value.smtp_code == 552
    assert _send(providers, _mail(user, mid)) == {}
    assert providers.count(mid) == 1


def test_explicit_ports_and_the_spool(tmp_path):
    smtp_port, http_port = free_port(), free_port()
    spool = tmp_path / "spool"
    with ProviderStandIn(smtp_port=smtp_port, http_port=http_port, spool=spool) as p:
        assert (p.smtp_port, p.http_port) == (smtp_port, http_port)
        assert p.app_url == f"http://127.0.0.1:{http_port}/v1/app/send"
        _send(p, _mail("u1", "m-1"))
        _http(p.ads_url, _push("u2", "m-2"))
    lines = [orjson.loads(line) for line in (spool / "email.jsonl").read_bytes().splitlines()]
    assert [(r["message_id"], r["user_id"]) for r in lines] == [("m-1", "u1")]
    assert orjson.loads((spool / "ads.jsonl").read_bytes())["body"]["user_id"] == "u2"


def test_command_line_rules():
    assert provider_standin._parse_reject("u1") == ("u1", "email")
    assert provider_standin._parse_reject("u1:app") == ("u1", "app")
    assert provider_standin._parse_defer("u1:3") == ("u1", 3, "email")
    assert provider_standin._parse_defer("u1:3:ads") == ("u1", 3, "ads")
    with pytest.raises(Exception):
        provider_standin._parse_defer("u1")
