"""Every user error is a 4xx with one clear line, never a 500: a prompt too long for the server or for
the engine, JSON that is not JSON, out-of-range sampling values; and CORS, off unless asked for."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from conftest import tiny_config
from test_serve import ask, fake_model, train_tokenizer

import r1lab.serve.app as app_module
from r1lab.checkpoint import save_checkpoint
from r1lab.cli import main
from r1lab.config import ConfigError
from r1lab.engine import Engine
from r1lab.model import Transformer
from r1lab.serve import ServeSettings, create_app, load_served_model
from r1lab.serve.server import BackgroundServer

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, max_seq_len=64, original_seq_len=64,
                                    init_std=0.1)).eval()
    path = tmp_path_factory.mktemp("limits") / "tiny"
    save_checkpoint(path, model, tok, metadata={"template": "r1"})
    return path


def one_line_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and "\n" not in error["message"] and "Traceback" not in r.text
    return error["message"]


def test_a_prompt_too_long_for_the_model_is_a_400_naming_the_limit(checkpoint):
    with BackgroundServer(create_app(load_served_model(checkpoint))) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        long = "one two three four five six seven eight nine ten " * 20
        message = one_line_error(http.post(CHAT, json={"model": "tiny", "messages": ask(long)}), 400,
                                 "context_length_exceeded")
        assert "at most 63" in message and "context is 64" in message
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": ["short", long], "max_tokens": 2})
        one_line_error(r, 400, "context_length_exceeded")
        assert r.json()["error"]["param"] == "prompt"
        ok = http.post(CHAT, json={"model": "tiny", "messages": ask("one two"), "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_request_the_engine_refuses_is_a_400_before_any_stream_starts(checkpoint, monkeypatch):
    """An engine with a shorter context than the server checks for refuses a prompt the server let through:
    the refusal reaches the client as a 400, streaming or not, and the server stays well."""
    model = load_served_model(checkpoint)
    monkeypatch.setattr(app_module, "make_engine", lambda served, max_batch_size, compile: Engine(
        served.decoder, served.tokenizer.eos_id, max_batch_size=max_batch_size, max_len=16))
    app = create_app(model)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        body = {"model": "tiny", "messages": ask("one two three four five six seven eight nine ten")}
        for stream in (False, True):
            message = one_line_error(http.post(CHAT, json={**body, "stream": stream}), 400, "invalid_value")
            assert "engine refused" in message and "max_len 16" in message
        assert http.post(CHAT, json={"model": "tiny", "messages": ask("hi"), "max_tokens": 2}).status_code == 200
        assert app.state.in_flight.value == 0 and app.state.worker.active == 0


@pytest.mark.parametrize("body,code", [
    (b'{"model": "fake-r1", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_json"),
    (b'{"model": "fake-r1", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "invalid_json"),
    (b'{"model": "fake-r1", "messages": [{"role": "user", "content": "lone \\ud800 half"}]}', "invalid_json"),
], ids=["NaN", "Infinity", "lone surrogate"])
def test_json_that_is_not_json_is_a_400(tok, body, code):
    with BackgroundServer(create_app(fake_model(tok))) as srv:
        one_line_error(httpx.post(srv.url + CHAT, content=body), 400, code)


def test_values_json_allows_are_taken_as_json_means_them(tok):
    """4.0 is the integer 4; a top_k past any vocabulary means all of it; a 100-bit seed is a seed."""
    app = create_app(fake_model(tok))
    with BackgroundServer(app) as srv:
        base = {"model": "fake-r1", "messages": ask("What is 6 times 7?")}
        r = httpx.post(srv.url + CHAT, json={**base, "n": 2.0, "top_k": 2**70, "seed": 2**100, "temperature": 1.0})
        assert r.status_code == 200, r.text
        assert [c["message"]["content"] for c in r.json()["choices"]] == ["The answer is 42."] * 2
        escaped = json.dumps({**base, "messages": ask("say something in unicode \U0001F642")})
        assert "\\ud83d\\ude42" in escaped  # a surrogate pair: one character, valid JSON
        assert httpx.post(srv.url + CHAT, content=escaped).status_code == 200
        assert app.state.worker.stats.failures == 0


# ---------------------------------------------------------------------------------------------
# CORS

ORIGIN = "http://localhost:3000"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default(tok):
    with BackgroundServer(create_app(fake_model(tok))) as srv:
        preflight = httpx.options(srv.url + CHAT, headers=PREFLIGHT)
        simple = httpx.get(srv.url + "/v1/models", headers={"Origin": ORIGIN})
    assert preflight.status_code == 405 and simple.status_code == 200
    assert not [h for r in (preflight, simple) for h in r.headers if h.lower().startswith("access-control-")]


def test_cors_allows_exactly_the_given_origins(tok):
    settings = ServeSettings(cors_origins=(ORIGIN, "https://chat.example.org"))
    with BackgroundServer(create_app(fake_model(tok), settings)) as srv:
        preflight = httpx.options(srv.url + CHAT, headers=PREFLIGHT)
        simple = httpx.post(srv.url + CHAT, headers={"Origin": ORIGIN},
                            json={"model": "fake-r1", "messages": ask("hi")})
        other = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://evil.example"})
        other_preflight = httpx.options(srv.url + CHAT, headers={**PREFLIGHT, "Origin": "http://evil.example"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in other.headers and other_preflight.status_code == 400


@pytest.mark.parametrize("origin", ["localhost:3000", "http://localhost:3000/", "http://host/path", "", "ftp://x"])
def test_a_malformed_cors_origin_is_refused_by_name(origin):
    with pytest.raises(ConfigError, match="not an origin"):
        ServeSettings(cors_origins=(origin,))
    assert ServeSettings(cors_origins=("*", "https://a.example:8443")).cors_origins[0] == "*"


def test_serve_cli_takes_repeated_cors_origins_and_rejects_a_bad_one_in_one_line(tmp_path, capsys):
    code = main(["serve", "--model", str(tmp_path / "never-loaded"), "--cors-origin", ORIGIN,
                 "--cors-origin", "http://localhost:3000/"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'http://localhost:3000/' is not an origin" in err
