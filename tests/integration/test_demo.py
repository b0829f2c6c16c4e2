"""README's first command: `infogap demo` replays MovieLens through a worker and shows what came out."""
from __future__ import annotations

import re
import socket

from typer.testing import CliRunner

from infogap.stream.tools.cli import app
from tests.conftest import _delete_topics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_shows_named_recommendations_from_redis_and_a_push_message(settings, monkeypatch):
    for name, value in (("INFOGAP_TOPIC_PREFIX", settings.topic_prefix), ("INFOGAP_REDIS_PREFIX", settings.redis_prefix),
                        ("INFOGAP_CONSUMER_GROUP", settings.consumer_group), ("INFOGAP_HTTP_HOST", "127.0.0.1"),
                        ("INFOGAP_HTTP_PORT", str(_free_port())), ("COLUMNS", "200")):
        monkeypatch.setenv(name, value)
    try:
        res = CliRunner().invoke(app, ["demo", "--limit", "4000", "--users", "2", "--no-console"])
    finally:  # the demo's own topics, beside the fixture's
        _delete_topics(settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}demo."}))
    assert res.exit_code == 0, res.output
    assert "worker processed 4000 events" in res.output and "0 to DLQ" in res.output
    # two users' top-10 read back from Redis, each item named by its MovieLens title, with a reason
    rows = re.findall(r"│ +(\d+) │ (.+?) \((m\d+)\) +│ +(\d+\.\d{3}) │ (.+?) +│", res.output)
    assert len(rows) == 20 and all(title.strip() and reason for _, title, _, _, reason in rows), res.output
    # and the newest message on the push topic, its items named for the person who receives it
    assert re.search(r"the newest of \d+ messages on the `\S+push` topic", res.output), res.output
    assert '"title":' in res.output and '"reason": "new picks for you: ' in res.output


def test_the_demo_ends_in_front_of_the_console_and_ctrl_c_ends_it(settings):
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    env = {**os.environ, "INFOGAP_TOPIC_PREFIX": settings.topic_prefix, "INFOGAP_REDIS_PREFIX": settings.redis_prefix,
           "INFOGAP_CONSUMER_GROUP": settings.consumer_group, "INFOGAP_HTTP_HOST": "127.0.0.1",
           "INFOGAP_HTTP_PORT": str(_free_port()), "INFOGAP_CONSOLE_PORT": str(port), "COLUMNS": "200"}
    demo = subprocess.Popen([sys.executable, "-m", "infogap.stream.tools.cli", "demo", "--limit", "2000", "--users", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while not any("the console:" in line for line in lines):
            line = demo.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", lines[-1])[1]
        assert url == f"http://127.0.0.1:{port}/"
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        events = int(re.search(r'id="events-total">([\d,]+)<', page)[1].replace(",", ""))
        assert events == 2000, page[:2000]
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0, demo.stdout.read()
    finally:
        if demo.poll() is None:
            demo.kill()
        _delete_topics(settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}demo."}))
