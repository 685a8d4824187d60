"""What the server logs: request ids in and out, one access line per request, a bug's traceback in the
log under its request id and never in the response, engine failures with the ids they failed, and
the key=value line format."""

from __future__ import annotations

import logging
import re
import sys
import time

import httpx
import pytest
from test_serve import ask, fake_model, train_tokenizer

import r1lab.serve.app as app_module
from r1lab.serve import create_app
from r1lab.serve.observe import KeyValueFormatter
from r1lab.serve.server import BackgroundServer

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture
def served(tok):
    app = create_app(fake_model(tok))
    with BackgroundServer(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            yield app, http


def access_lines(caplog, request_ids: set[str] = frozenset(), timeout: float = 10.0) -> list[logging.LogRecord]:
    """The access lines logged so far, waiting (up to `timeout`) for those of `request_ids`: the line is
    written once the app returns, which may be just after the client has the whole response."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [r for r in caplog.records if r.name == "r1lab.serve.access"]
        if request_ids <= {r.request_id for r in lines} or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def test_every_request_has_an_id_and_one_access_line(served, caplog):
    app, http = served
    caplog.set_level(logging.INFO, logger="r1lab.serve")
    given = http.post(CHAT, json={"model": "fake-r1", "messages": ask("What is 6 times 7?")},
                      headers={"X-Request-ID": "client-id.42"})
    made = http.get("/v1/models/fake-r1")
    forged = http.get("/health", headers={"X-Request-ID": "two words"})
    missing = http.get("/v1/nowhere")
    assert given.status_code == made.status_code == forged.status_code == 200 and missing.status_code == 404
    assert given.headers["X-Request-ID"] == "client-id.42"
    ids = [r.headers["X-Request-ID"] for r in (made, forged, missing)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 3  # made here, not taken
    lines = {r.request_id: r for r in access_lines(caplog, {"client-id.42", *ids})}
    assert set(lines) == {"client-id.42", *ids}
    chat = lines["client-id.42"]
    assert (chat.method, chat.path, chat.route, chat.status) == ("POST", CHAT, CHAT, 200)
    assert chat.latency_ms > 0 and not hasattr(chat, "client_gone")
    assert (lines[ids[0]].route, lines[ids[0]].path) == ("/v1/models/{model_id:path}", "/v1/models/fake-r1")
    assert (lines[ids[2]].route, lines[ids[2]].status) == (None, 404)


def test_a_bug_is_a_500_without_traceback_and_a_logged_traceback(served, caplog, monkeypatch):
    app, http = served
    caplog.set_level(logging.INFO, logger="r1lab.serve")

    def broken(model, messages):
        raise KeyError("secret internal detail")

    monkeypatch.setattr(app_module, "chat_prompt", broken)
    r = http.post(CHAT, json={"model": "fake-r1", "messages": ask("hi")})
    rid = r.headers["X-Request-ID"]
    assert r.status_code == 500
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "internal_error"
    assert rid in error["message"]
    assert "secret" not in r.text and "Traceback" not in r.text and "KeyError" not in r.text
    [logged] = [rec for rec in caplog.records if rec.name == "r1lab.serve.errors"]
    assert logged.levelno == logging.ERROR and logged.request_id == rid
    assert logged.exc_info[0] is KeyError
    written = KeyValueFormatter().format(logged)
    assert "Traceback" in written and "secret internal detail" in written and f"request_id={rid}" in written
    assert [a.status for a in access_lines(caplog, {rid}) if a.request_id == rid] == [500]
    monkeypatch.undo()  # and the server goes on
    assert http.post(CHAT, json={"model": "fake-r1", "messages": ask("What is 2 plus 1?")}).status_code == 200


def test_an_engine_failure_logs_its_traceback_with_the_request_ids_it_failed(served, caplog):
    app, http = served
    caplog.set_level(logging.INFO, logger="r1lab.serve")
    r = http.post(CHAT, json={"model": "fake-r1", "messages": ask("crash now")}, headers={"X-Request-ID": "doomed"})
    assert r.status_code == 500 and "the decoder broke" in r.json()["error"]["message"]
    [step] = [rec for rec in caplog.records if rec.name == "r1lab.serve.worker"]
    assert step.request_ids == "doomed" and step.exc_info[0] is RuntimeError
    [reply] = [rec for rec in caplog.records if rec.name == "r1lab.serve.app"]
    assert reply.request_id == "doomed" and "the decoder broke" in reply.getMessage()
    assert "Traceback" not in r.text


def test_a_client_that_leaves_mid_stream_is_logged_as_gone_not_as_an_error(tok, caplog):
    caplog.set_level(logging.INFO)
    app = create_app(fake_model(tok, delay=0.01))
    with BackgroundServer(app) as srv:
        body = {"model": "fake-r1", "messages": ask("please ramble"), "stream": True, "max_tokens": 200}
        with httpx.stream("POST", srv.url + CHAT, json=body, headers={"X-Request-ID": "leaver"}, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    # The server saw the request end (it stopped for the exit above)
    [line] = [a for a in access_lines(caplog, {"leaver"}) if a.request_id == "leaver"]
    assert line.status == 200 and line.client_gone is True
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_logfmt(line: str) -> dict[str, str]:
    return {k: v[1:-1].encode().decode("unicode_escape") if v.startswith('"') else v for k, v in LOGFMT.findall(line)}


def test_key_value_lines_hold_fields_and_tracebacks_on_one_line():
    try:
        raise ValueError('bad "thing"\nsecond line')
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("r1lab.serve.errors", logging.ERROR, __file__, 1, "unhandled %s", ("ValueError",),
                               exc_info)
    record.request_id, record.latency_ms, record.client_gone, record.route = "abc", 12.5, True, None
    line = KeyValueFormatter().format(record)
    assert "\n" not in line
    fields = parse_logfmt(line)
    assert (fields["level"], fields["logger"], fields["msg"]) == ("error", "r1lab.serve.errors", "unhandled ValueError")
    assert (fields["request_id"], fields["latency_ms"], fields["client_gone"], fields["route"]) == \
        ("abc", "12.5", "true", "-")
    assert fields["traceback"].startswith("Traceback") and 'ValueError: bad "thing"\nsecond line' in fields["traceback"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", fields["ts"])
