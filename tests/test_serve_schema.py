"""The server against its own `/openapi.json`: schemathesis generates requests from the schema (valid
ones, and invalid ones in its negative mode) and sends them to the ASGI app in-process; no answer
may be a 5xx (schemathesis' `not_a_server_error` check). The served model is a tiny random
`Transformer` checkpoint, so every valid request really runs the engine; `max_tokens_cap` and
`max_n` keep each one cheap.

Each operation and mode draws a bounded number of examples, derandomised, so the run is the same in
CI and takes seconds. The cases come from schemathesis' Hypothesis strategies (`as_strategy`) under
a plain `@given`, which keeps the test independent of its pytest plugin.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from test_serve import train_tokenizer

from r1lab.checkpoint import save_checkpoint
from r1lab.model import Transformer
from r1lab.serve import ServeSettings, create_app, load_served_model

EXAMPLES = 100
"""Cases per operation and mode: enough to reach every field's edge values, under a minute on 2 cores."""


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    # One thread: the tiny model gains nothing from two, and on a busy 2-core machine two spin-wait
    # against each other (a request then takes ten times as long).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = train_tokenizer()
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, max_seq_len=64, original_seq_len=64,
                                    init_std=0.1)).eval()
    path = tmp_path_factory.mktemp("served") / "tiny"
    save_checkpoint(path, model, tok, metadata={"template": "r1"})
    app = create_app(load_served_model(path), ServeSettings(max_tokens_cap=8, max_n=4))
    yield app
    app.state.worker.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def api_schema(served_app):
    return schemathesis.openapi.from_asgi("/openapi.json", served_app)


def operations(api_schema) -> dict[str, object]:
    return {f"{op.method.upper()} {op.path}": op for op in (result.ok() for result in api_schema.get_all_operations())}


def test_the_schema_has_every_route_and_describes_the_bodies(api_schema):
    assert set(operations(api_schema)) == {"GET /health", "GET /v1/models", "GET /v1/models/{model_id}",
                                           "POST /v1/chat/completions", "POST /v1/completions"}
    components = api_schema.raw_schema["components"]["schemas"]
    chat = components["ChatCompletionRequest"]
    assert chat["properties"]["model"]["enum"] == ["tiny"] and set(chat["required"]) == {"model", "messages"}
    assert chat["properties"]["n"]["maximum"] == 4
    assert {"type": "integer", "minimum": 1, "maximum": 8} in chat["properties"]["max_tokens"]["anyOf"]
    assert "prompt" in components["CompletionRequest"]["required"]
    assert set(components["Error"]["properties"]["error"]["required"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_generated_request_gets_a_server_error(served_app, api_schema, mode):
    statuses: dict[str, set[int]] = {}
    for name, operation in operations(api_schema).items():
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # no input that could be invalid: a path parameter here is any string
        seen = statuses.setdefault(name, set())

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            seen.add(case.call_and_validate(checks=[not_a_server_error]).status_code)

        check()
    assert all(seen and max(seen) < 500 for seen in statuses.values()), statuses
    if mode is GenerationMode.POSITIVE:  # valid requests were answered, so the engine ran
        assert 200 in statuses["POST /v1/chat/completions"] and 200 in statuses["POST /v1/completions"]
        assert served_app.state.worker.stats.requests > 0
    else:
        assert statuses["POST /v1/chat/completions"] & {400, 413, 422}
    # The engine thread drops a finished request's route just after the reply went out: wait for it.
    deadline = time.monotonic() + 10
    while served_app.state.worker.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served_app.state.in_flight.value == 0 and served_app.state.worker.active == 0
