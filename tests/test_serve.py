"""The OpenAI-compatible server: replies read by the real `openai` SDK, streaming order, batching,
cancellation, limits and errors.

Most tests serve `ScriptedDecoder`: a decoder with the engine's protocol whose logits spell out a
fixed reply for each question, token by token, in a real r1lab Tokenizer trained here; so the text
the server must split into reasoning and answer is known exactly. One test serves a real tiny
random `Transformer` checkpoint for the loading and sampling plumbing.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from r1lab.checkpoint import save_checkpoint
from r1lab.model import Transformer
from r1lab.serve import ServedModel, ServeSettings, create_app, load_served_model
from r1lab.serve.assistant import ReplyParser, SampleDecoder
from r1lab.serve.server import BackgroundServer
from r1lab.tokenizer import USER, Tokenizer, split_reasoning

CORPUS = ["The answer is 42. Let me think step by step about it. What is 6 times 7? Hello, world!",
          "one two three four five six seven eight nine ten plus minus times equals"] * 40
ANSWER_42 = "step\n</think>\n\nThe answer is 42."


def train_tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=320)


def scripted_reply(prompt: str) -> str:
    """The fake model's reply to a rendered prompt (it answers the last user message)."""
    question = prompt.rsplit(USER, 1)[-1]
    if m := re.search(r"What is (\d+) plus 1", question):
        n = int(m.group(1))
        return f"{n} plus one.\n</think>\n\nThe answer is {n + 1}."
    if "markup" in question:
        return "Testing markup.\n</think>\n\n<script>alert(1)</script> and <b>bold</b> as text."
    if "ramble" in question:
        return "and so on " * 200
    if "unicode" in question:
        return "Café, naïve, 🙂 and 数学.\n</think>\n\n🙂 done."
    if "zero" in question:
        return " <think> a b </think> <answer> 7 </answer>"
    if "crash" in question:
        raise RuntimeError("the decoder broke")
    return ANSWER_42


class ScriptCache:
    """Per row: the tokens at each position, and the prompt length (set at prefill)."""

    def __init__(self, batch_size: int, max_len: int):
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long)
        self.prompt_len = torch.zeros(batch_size, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    def select(self, rows) -> None:
        self.tokens, self.prompt_len = self.tokens[rows], self.prompt_len[rows]

    def repeat_interleave(self, n: int) -> None:
        self.tokens = self.tokens.repeat_interleave(n, dim=0)
        self.prompt_len = self.prompt_len.repeat_interleave(n, dim=0)

    def extend(self, other: ScriptCache) -> None:  # the shorter cache's rows padded to the longer's slots
        width = max(self.max_len, other.max_len)
        self.tokens = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in (self.tokens, other.tokens)])
        self.prompt_len = torch.cat([self.prompt_len, other.prompt_len])


class ScriptedDecoder(torch.nn.Module):
    """Logits one-hot (+30) on the next token of `reply(prompt text)` + EOS, at any temperature.

    Prompts start with BOS and never contain it again, so at prefill (position 0) a row's prompt
    ends where the right-padding (id 0 = BOS) starts. `delay` seconds per call make requests
    overlap in time; `decode_batches` records the rows of every one-token call.
    """

    def __init__(self, tokenizer: Tokenizer, reply=scripted_reply, max_seq_len: int = 256, delay: float = 0.0):
        super().__init__()
        self.tok, self.reply, self.delay = tokenizer, reply, delay
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.decode_batches: list[int] = []
        self.prompts: list[str] = []
        self._scripts: dict[tuple[int, ...], list[int]] = {}

    def new_cache(self, batch_size: int, max_len: int | None = None) -> ScriptCache:
        return ScriptCache(batch_size, max_len or self.config.max_seq_len)

    def forward(self, tokens, positions=None, cache=None, n_slots=None):
        B, T = tokens.shape
        if self.delay:
            time.sleep(self.delay)
        if T == 1:
            self.decode_batches.append(B)
        cache.tokens[torch.arange(B)[:, None].expand(B, T), positions] = tokens
        for b in range(B):
            if int(positions[b, 0]) == 0:
                pad = (tokens[b, 1:] == self.tok.bos_id).nonzero()
                cache.prompt_len[b] = 1 + int(pad[0]) if len(pad) else T
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            n_prompt = int(cache.prompt_len[b])
            script = self._script(tuple(cache.tokens[b, :n_prompt].tolist()))
            for t in range(T):
                generated = int(positions[b, t]) + 1 - n_prompt
                if generated >= 0:
                    logits[b, t, script[min(generated, len(script) - 1)]] = 30.0
        return logits

    def _script(self, prompt: tuple[int, ...]) -> list[int]:
        if prompt not in self._scripts:
            text = self.tok.decode(prompt, skip_special=True)
            self.prompts.append(text)
            self._scripts[prompt] = self.tok.encode(self.reply(text)) + [self.tok.eos_id]
        return self._scripts[prompt]


def fake_model(tok: Tokenizer, template: str = "r1", name: str = "fake-r1", **kw) -> ServedModel:
    return ServedModel(ScriptedDecoder(tok, **kw), tok, template, name)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    model = fake_model(tok)
    app = create_app(model, ServeSettings(max_tokens_cap=200, max_prompt_tokens=100))
    with BackgroundServer(app) as srv:
        srv.model = model
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


# ---------------------------------------------------------------------------------------------
# Reasoning / answer split, held-back text


TEXTS = [ANSWER_42, "<think>\nfirst\n\nsecond  \n</think>\n\nfinal answer\n", "no close tag at all",
         "</think>answer only", "  lead\n</think>x</think>y", "<thi", "a </thi", "multi\nline\n</think>\n\n 42 \n"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_split_equals_split_reasoning_at_every_chunking(text):
    expected = split_reasoning(text, think_opened=True)
    for step in (1, 2, 3, len(text)):
        parser = ReplyParser("r1")
        pieces = [p for i in range(0, len(text), step) for p in parser.feed(text[i:i + step])] + parser.close()
        got = ("".join(t for k, t in pieces if k == "reasoning"), "".join(t for k, t in pieces if k == "content"))
        assert got == expected, (text, step)


def test_partial_tags_are_held_back_until_decided():
    parser = ReplyParser("r1")
    assert parser.feed("reason ") == [("reasoning", "reason")]
    assert parser.feed("</thi") == []          # could be </think>: nothing shown yet
    assert parser.feed("nk>\n\nThe") == [("content", "The")]
    assert parser.feed(" end") == [("content", " end")]
    zero = ReplyParser("r1-zero")
    assert zero.feed(" <th") == []
    assert zero.feed("ink> why </think> <ans") == [("reasoning", "why")]
    assert zero.feed("wer> 7 </answ") == [("content", "7")]
    assert zero.feed("er>") + zero.close() == []


def test_stop_strings_cut_before_the_stop_and_hold_its_prefix():
    parser = ReplyParser("r1", stop=("STOP",))
    assert parser.feed("why</think>ans ST") == [("reasoning", "why"), ("content", "ans")]
    assert parser.feed("OP more") == [] and parser.stopped
    raw = ReplyParser(None, stop=("\n\n",))
    assert raw.feed(" keep spaces \n") == [("content", " keep spaces ")]
    assert raw.feed("\nafter") == [] and raw.stopped


def test_sample_decoder_never_emits_broken_utf8(tok):
    text = "Café, naïve, 🙂 and 数学.\n</think>\n\n🙂 done."
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # byte-level pieces: the emoji spans several ids
    sample = SampleDecoder(tok, "r1")
    pieces = [p for i in ids for p in sample.push(i)] + sample.finish()
    assert all("\ufffd" not in t for _, t in pieces)
    assert (sample.reasoning_text, sample.content_text) == split_reasoning(text)
    assert sample.reasoning_tokens == len(tok.encode("Café, naïve, 🙂 and 数学.\n</think>"))


# ---------------------------------------------------------------------------------------------
# The API through the openai SDK


def test_chat_non_streaming_has_reasoning_content_and_usage(client, tok):
    r = client.chat.completions.create(model="fake-r1", messages=ask("What is 6 times 7?"))
    choice = r.choices[0]
    assert choice.message.reasoning_content == "step"
    assert choice.message.content == "The answer is 42."
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    completion = len(tok.encode(ANSWER_42)) + 1  # + EOS
    assert r.usage.completion_tokens == completion
    assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode("step\n</think>"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + completion
    assert r.model == "fake-r1" and r.object == "chat.completion"


def test_chat_streaming_order_role_reasoning_content_finish_done(client, server):
    chunks = list(client.chat.completions.create(model="fake-r1", messages=ask("What is 6 times 7?"), stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    kinds = []
    for d in deltas[1:-1]:
        r, c = getattr(d, "reasoning_content", None), d.content
        assert bool(r) != bool(c)  # each chunk carries one kind
        kinds.append("r" if r else "c")
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # all reasoning, then all answer
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "step"
    assert "".join(d.content or "" for d in deltas) == "The answer is 42."
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "stop" and not last.choices[0].delta.content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0
    # The raw wire format ends with [DONE] and never shows a tag or a broken character.
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json={"model": "fake-r1", "messages": ask("say something in unicode"), "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    shown = "".join(json.dumps(p["choices"][0]["delta"], ensure_ascii=False) for p in payloads)
    assert "think>" not in shown and "\ufffd" not in shown and "🙂" in shown


def test_n2_returns_two_choices_streaming_and_not(client):
    r = client.chat.completions.create(model="fake-r1", messages=ask("What is 6 times 7?"), n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == "The answer is 42." for c in r.choices)
    seen: dict[int, str] = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="fake-r1", messages=ask("What is 5 plus 1?"), n=2, stream=True):
        for c in chunk.choices:
            seen[c.index] += c.delta.content or ""
    assert seen == {0: "The answer is 6.", 1: "The answer is 6."}


def test_earlier_reasoning_is_stripped_from_the_prompt(client, server):
    messages = [{"role": "user", "content": "What is 6 times 7?"},
                {"role": "assistant", "content": "<think>\nsecret musing\n</think>\n\nvisible reply"},
                {"role": "user", "content": "What is 2 plus 1?"}]
    r = client.chat.completions.create(model="fake-r1", messages=messages)
    assert r.choices[0].message.content == "The answer is 3."
    prompt = next(p for p in server.model.decoder.prompts if "visible reply" in p)
    assert "secret musing" not in prompt


def test_r1_zero_template_uses_the_last_user_message_and_strips_answer_tags(tok):
    model = fake_model(tok, template="r1-zero", name="zero", max_seq_len=512)
    with BackgroundServer(create_app(model)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "the zero question"}]
        r = c.chat.completions.create(model="zero", messages=messages)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="zero", messages=messages, stream=True) if ch.choices)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("a b", "7")
    assert streamed == "7"
    assert "the zero question" in model.decoder.prompts[0] and "first question" not in model.decoder.prompts[0]


def test_r1_zero_reply_ends_at_the_answer_close_tag(tok):
    """Under R1-Zero nothing may follow </answer>: the server stops there, as RL and eval do."""
    model = fake_model(tok, template="r1-zero", name="zero", max_seq_len=512,
                       reply=lambda prompt: "<think>a b</think> <answer>7</answer> and then more talk")
    with BackgroundServer(create_app(model)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="zero", messages=[{"role": "user", "content": "q"}])
        raw = c.completions.create(model="zero", prompt="q", max_tokens=40)
    full = tok.encode("<think>a b</think> <answer>7</answer> and then more talk")
    upto_close = tok.encode("<think>a b</think> <answer>7</answer>")
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("7", "stop")
    assert r.usage.completion_tokens == len(upto_close) < len(full)
    assert "and then more talk" in raw.choices[0].text  # plain completion has no template, so no tag stops it


def test_stop_and_max_tokens(client):
    r = client.chat.completions.create(model="fake-r1", messages=ask("What is 6 times 7?"), stop=["answer"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("The", "stop")
    r = client.chat.completions.create(model="fake-r1", messages=ask("What is 6 times 7?"), max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    r = client.chat.completions.create(model="fake-r1", messages=ask("What is 6 times 7?"), max_completion_tokens=3)
    assert r.usage.completion_tokens == 3


def test_text_completions(client):
    r = client.completions.create(model="fake-r1", prompt="Hello", max_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert r.choices[0].text.startswith("step")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="fake-r1", prompt="Hello", max_tokens=4, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    both = client.completions.create(model="fake-r1", prompt=["a", "b"], max_tokens=2, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]


def test_models_health_and_web_page(client, server):
    assert [m.id for m in client.models.list().data] == ["fake-r1"]
    assert client.models.retrieve("fake-r1").id == "fake-r1"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    js = httpx.get(server.url + "/static/app.js").text
    css = httpx.get(server.url + "/static/style.css")
    assert css.status_code == 200 and "textContent" in js
    assert "innerHTML" not in js and "http://" not in page.text + js and "https://" not in page.text + js


def test_real_tiny_transformer_checkpoint(tmp_path, tok, make_config):
    torch.manual_seed(0)
    model = Transformer(make_config(vocab_size=tok.vocab_size, max_seq_len=128, original_seq_len=128,
                                    init_std=0.1)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tok, metadata={"template": "r1"})
    save_checkpoint(tmp_path / "zero", model, tok, metadata={"template": "r1-zero"})
    save_checkpoint(tmp_path / "plain", model, tok)
    assert load_served_model(tmp_path / "zero").template == "r1-zero"
    assert load_served_model(tmp_path / "plain").template == "r1"
    served = load_served_model(tmp_path / "ckpt")
    assert served.name == "ckpt" and served.max_len == 128
    with BackgroundServer(create_app(served)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

        def run(**kw):
            r = c.chat.completions.create(model="ckpt", messages=ask("What is 6 times 7?"), max_tokens=12, **kw)
            return r.usage.completion_tokens, r.choices[0].message.reasoning_content, r.choices[0].message.content

        greedy = run(temperature=0)
        assert greedy == run(temperature=0)
        assert run(temperature=1.0, seed=1) == run(temperature=1.0, seed=1)
        samples = {run(temperature=1.0, seed=s) for s in range(2, 6)}
        assert len(samples) > 1  # the seed reaches the sampler
        streamed = c.chat.completions.create(model="ckpt", messages=ask("hi"), max_tokens=5, stream=True,
                                             stream_options={"include_usage": True})
        assert list(streamed)[-1].usage.completion_tokens <= 5


# ---------------------------------------------------------------------------------------------
# Bad requests, limits, failures

KEY = "sekret"
GOOD = {"model": "fake-r1", "messages": ask("What is 6 times 7?")}
BAD_REQUESTS = [
    # (name, path, body (dict or raw bytes), headers, status, code)
    ("invalid json", "/v1/chat/completions", b"{not json", None, 400, "invalid_json"),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", None, 400, "invalid_json"),
    ("messages not a list", "/v1/chat/completions", {**GOOD, "messages": "hi"}, None, 422, "invalid_type"),
    ("temperature a string", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, None, 422, "invalid_type"),
    ("temperature out of range", "/v1/chat/completions", {**GOOD, "temperature": 9}, None, 422, "invalid_value"),
    ("n zero", "/v1/chat/completions", {**GOOD, "n": 0}, None, 422, "invalid_value"),
    ("n over the limit", "/v1/chat/completions", {**GOOD, "n": 99}, None, 400, "invalid_value"),
    ("role unknown", "/v1/chat/completions", {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, None, 422,
     "invalid_value"),
    ("model missing", "/v1/chat/completions", {"messages": GOOD["messages"]}, None, 422, "invalid_value"),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-9"}, None, 404, "model_not_found"),
    ("empty messages", "/v1/chat/completions", {**GOOD, "messages": []}, None, 422, "invalid_value"),
    ("ends with assistant", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "invalid_value"),
    ("huge prompt", "/v1/chat/completions", {**GOOD, "messages": ask("seven " * 3000)}, None, 400,
     "context_length_exceeded"),
    ("body over the byte limit", "/v1/chat/completions", {**GOOD, "messages": ask("x" * 300_000)}, None, 413,
     "request_too_large"),
    ("max_tokens over the cap", "/v1/chat/completions", {**GOOD, "max_tokens": 5000}, None, 400,
     "max_tokens_exceeded"),
    ("max_tokens negative", "/v1/chat/completions", {**GOOD, "max_tokens": -1}, None, 422, "invalid_value"),
    ("five stop strings", "/v1/chat/completions", {**GOOD, "stop": list("abcde")}, None, 400, "invalid_value"),
    ("empty prompt list", "/v1/completions", {"model": "fake-r1", "prompt": []}, None, 400, "invalid_value"),
    ("missing key", "/v1/chat/completions", GOOD, {"Authorization": ""}, 401, "invalid_api_key"),
    ("wrong key", "/v1/chat/completions", GOOD, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("not bearer", "/v1/chat/completions", GOOD, {"Authorization": f"Basic {KEY}"}, 401, "invalid_api_key"),
]


@pytest.fixture(scope="module")
def keyed(tok):
    settings = ServeSettings(api_key=KEY, max_tokens_cap=200, max_prompt_tokens=100, max_body_bytes=256 * 1024)
    with BackgroundServer(create_app(fake_model(tok), settings)) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
            srv.http = http
            yield srv


@pytest.mark.parametrize("name,path,body,headers,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(keyed, name, path, body, headers, status, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = keyed.http.post(path, headers=headers, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code


def test_server_is_healthy_after_bad_requests_and_routes_need_the_key(keyed):
    for name, path, body, headers, *_ in BAD_REQUESTS:
        keyed.http.post(path, headers=headers, **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert httpx.get(keyed.url + "/health").status_code == 200  # public
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert keyed.http.get("/v1/nowhere").json()["error"]["code"] == "404"
    sdk = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert sdk.chat.completions.create(**GOOD).choices[0].message.content == "The answer is 42."
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(**{**GOOD, "model": "other"})
    assert keyed.app.state.in_flight.value == 0


def test_concurrency_limit_gives_429(tok):
    model = fake_model(tok, delay=0.01)
    with BackgroundServer(create_app(model, ServeSettings(max_concurrency=2))) as srv:
        body = {"model": "fake-r1", "messages": ask("please ramble"), "stream": True, "max_tokens": 60}
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as a, \
                    http.stream("POST", "/v1/chat/completions", json=body) as b:
                assert a.status_code == b.status_code == 200
                third = http.post("/v1/chat/completions", json=body)
                assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
                assert len(list(a.iter_lines())) > 10 and len(list(b.iter_lines())) > 10
            assert http.post("/v1/chat/completions", json={**body, "stream": False}).status_code == 200


def test_disconnected_client_stops_its_generation(tok):
    model = fake_model(tok, delay=0.01)
    app = create_app(model)
    worker = app.state.worker
    with BackgroundServer(app) as srv:
        body = {"model": "fake-r1", "messages": ask("please ramble"), "stream": True, "max_tokens": 200}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            for _ in range(5):
                next(lines)
        deadline = time.monotonic() + 5
        while (worker.stats.cancelled == 0 or worker.engine.has_work()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.stats.cancelled == 1 and not worker.engine.has_work()
        assert worker.stats.tokens < 100  # far from the 200 it asked for
        assert app.state.in_flight.value == 0
        # Non-streaming: a client that times out and leaves is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 5
        while worker.stats.cancelled < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.stats.cancelled == 2


def test_sixteen_concurrent_streams_are_batched_and_correct(tok):
    model = fake_model(tok, delay=0.004)
    app = create_app(model)
    with BackgroundServer(app) as srv:
        async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str, str | None]:
            reasoning, content, finish = "", "", None
            stream = await c.chat.completions.create(model="fake-r1", messages=ask(f"What is {i} plus 1?"),
                                                     stream=True, temperature=0.7)
            async for chunk in stream:
                for ch in chunk.choices:
                    reasoning += getattr(ch.delta, "reasoning_content", None) or ""
                    content += ch.delta.content or ""
                    finish = ch.finish_reason or finish
            return reasoning, content, finish

        async def main():
            async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
                return await asyncio.gather(*(one(c, i) for i in range(16)))

        results = asyncio.run(main())
    assert results == [(f"{i} plus one.", f"The answer is {i + 1}.", "stop") for i in range(16)]
    assert max(model.decoder.decode_batches) > 1
    assert app.state.worker.stats.max_batch > 1
    assert app.state.worker.stats.requests == 16


def test_engine_failure_is_an_error_reply_and_the_server_recovers(tok):
    app = create_app(fake_model(tok))
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "fake-r1", "messages": ask("crash now")})
        assert r.status_code == 500 and "the decoder broke" in r.json()["error"]["message"]
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                          json={"model": "fake-r1", "messages": ask("crash again"), "stream": True}) as resp:
            lines = [line for line in resp.iter_lines() if line]
        assert "error" in json.loads(lines[-2][len("data: "):]) and lines[-1] == "data: [DONE]"
        ok = httpx.post(srv.url + "/v1/chat/completions", json={"model": "fake-r1", "messages": ask("What is 1 plus 1?")})
        assert ok.json()["choices"][0]["message"]["content"] == "The answer is 2."
        assert httpx.get(srv.url + "/health").status_code == 200


def test_worker_thread_is_the_only_engine_user(tok):
    """The event loop never touches the engine: every decoder call happens on the worker thread."""
    model = fake_model(tok)
    threads = set()
    forward = model.decoder.forward
    model.decoder.forward = lambda *a, **k: (threads.add(threading.current_thread().name), forward(*a, **k))[1]
    with BackgroundServer(create_app(model)) as srv:
        httpx.post(srv.url + "/v1/chat/completions", json={"model": "fake-r1", "messages": ask("hi")})
    assert threads == {"r1lab-engine"}
