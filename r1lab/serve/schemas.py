"""The wire format of the OpenAI-compatible API: request bodies as strict pydantic models, the
response objects (built as plain dicts, chunk by chunk), the error JSON, and the OpenAPI schema.

Validation is strict (JSON types as written: "0.7" is not a number; but 4.0 is the integer 4, as
JSON has one number type and JSON Schema counts it an integer) and unknown fields are ignored,
as OpenAI clients send many optional ones (`user`, `presence_penalty`, ...) that r1lab does not
use. Two extensions beyond OpenAI's fields, named as vLLM names them: `top_k`, and
`ignore_eos` (generate past the end-of-sequence token, for benchmarks of a fixed amount of work).

The handlers read their bodies themselves (to bound their size before parsing and to answer in
OpenAI's error shape), so FastAPI cannot see them; `openapi_schema` adds the request models to the
schema FastAPI makes from the routes, with the one served model id and the server's limits, so a
client or a fuzzer reading `/openapi.json` knows what a valid request is.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from itertools import groupby
from operator import itemgetter
from typing import Annotated, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.routing import BaseRoute

from r1lab.engine import StepEvent
from r1lab.serve.assistant import CONTENT, RAW, SampleDecoder, ServedModel


class APIError(Exception):
    """An error the client caused (or a limit it hit), sent as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        type = {401: "authentication_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return error_body(self.message, type, self.param, self.code)


def error_body(message: str, type: str = "server_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


INTEGRAL = BeforeValidator(_integral)
"""Makes an int field take a JSON integer as 4 or 4.0, never 4.5 or "4". It goes after the field's
constraints in `Annotated`, so they stay on the int and reach the JSON schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Annotated[int, Field(ge=0), INTEGRAL] | None = None
    n: Annotated[int, Field(ge=1), INTEGRAL] = 1
    seed: Annotated[int, INTEGRAL] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop", code="invalid_value")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must be non-empty", param="stop", code="invalid_value")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def decode_json(body: bytes) -> object:
    """A request body as JSON; a 400 if it is not JSON, NaN and Infinity included."""
    try:
        data = json.loads(body, parse_constant=_not_json)
        # A \uD800-\uDFFF escape outside a pair parses to a string no text encoder takes (the tokenizer
        # would fail on it deep inside the handler): refuse it here, where the reason is known.
        if _SURROGATE_ESCAPE.search(body):
            json.dumps(data, ensure_ascii=False).encode()
        return data
    except (ValueError, UnicodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def parse_request(model: type[_Strict], data: object) -> _Strict:
    """Validate a decoded JSON body; a violation is a 422 naming the first offending field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        field = str(first["loc"][0]) if first["loc"] else None
        code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
        raise APIError(422, f"{loc or 'body'}: {first['msg']}", param=field, code=code) from None


BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
"""The request model of each route that takes a JSON body."""


def openapi_schema(routes: list[BaseRoute], model_name: str, max_tokens_cap: int, max_n: int) -> dict:
    """The OpenAPI document of `routes`, with the request bodies of `BODIES` and this server's limits."""
    doc = get_openapi(title="r1lab", version="1", routes=routes,
                      description="OpenAI-compatible chat and completions; replies carry reasoning_content.")
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    # Errors are OpenAI's JSON, not FastAPI's validation detail: say so for every operation.
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    field = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    components["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": field, "code": field}}}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for operations in doc["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            operation["responses"]["4XX"] = {"description": "the request's fault (OpenAI's error JSON)", **error}
            operation["responses"]["5XX"] = {"description": "the server's fault (OpenAI's error JSON)", **error}
    for path, request_model in BODIES.items():
        operation = doc["paths"][path]["post"]
        body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        props = body["properties"]
        props["model"] = {"type": "string", "enum": [model_name], "description": "the served model's id"}
        props["n"]["maximum"] = max_n
        for name in ("max_tokens", "max_completion_tokens"):
            for option in props.get(name, {}).get("anyOf", ()):
                if option.get("type") == "integer":
                    option["maximum"] = max_tokens_cap
        if "prompt" in props:
            for option in props["prompt"]["anyOf"]:
                if option.get("type") == "array":
                    option.update(minItems=1, maxItems=max_n)
        components[request_model.__name__] = body
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}}}}
    return doc


class ReplyBuilder:
    """OpenAI response objects built from engine events: stream chunks as they come, the whole reply at the end.

    Choice `p * n + s` is sample s of prompt p, as OpenAI numbers them.
    """

    def __init__(self, model: ServedModel, template: str | None, stops: tuple[str, ...], prompts: list[list[int]],
                 n: int):
        self.chat, self.model, self.n = template is not RAW, model, n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.samples = [SampleDecoder(model.tokenizer, template, stops) for _ in range(len(prompts) * n)]
        self.finish: list[str | None] = [None] * len(self.samples)
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"

    def _object(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model.name,
                "choices": choices, **extra}

    def _chunk(self, index: int, kind: str, text: str, finish: str | None = None) -> dict:
        """A stream chunk of choice `index`: new text all of one kind, or (empty, with `finish`) its end."""
        if not self.chat:
            return self._object(self.chunk_object, [_choice(index, finish, text=text)])
        delta = {"content" if kind == CONTENT else "reasoning_content": text} if text else {}
        return self._object(self.chunk_object, [_choice(index, finish, delta=delta)])

    def opening(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._object(self.chunk_object, [_choice(i, delta={"role": "assistant", "content": ""})])
                for i in range(len(self.samples))]

    def events(self, prompt_index: int, events: list[StepEvent]) -> list[dict]:
        """Stream chunks for events of one prompt (one or more engine steps): per choice, its new text
        in order (one chunk per run of reasoning or answer), then its finish chunk if it ended."""
        pieces: dict[int, list[tuple[str, str]]] = {}
        ended: list[int] = []
        for ev in events:
            index = prompt_index * self.n + ev.sample_index
            sample, out = self.samples[index], pieces.setdefault(index, [])
            for token in ev.token_ids:
                out += sample.push(token)
            if ev.finish_reason is not None:
                out += sample.finish()
                self.finish[index] = "stop" if sample.parser.stopped else ev.finish_reason
                ended.append(index)
        chunks = []
        for index, out in pieces.items():
            # one chunk per run of one kind, so no chunk mixes reasoning and answer
            for kind, run in groupby(out, key=itemgetter(0)):
                chunks.append(self._chunk(index, kind, "".join(text for _, text in run)))
            if index in ended:
                chunks.append(self._chunk(index, CONTENT, "", self.finish[index]))
        return chunks

    def usage(self) -> dict:
        completion = sum(s.tokens for s in self.samples)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        if self.chat:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(s.reasoning_tokens for s in self.samples)}
        return usage

    def usage_chunk(self) -> dict:
        return self._object(self.chunk_object, [], usage=self.usage())

    def whole(self) -> dict:
        choices = []
        for i, sample in enumerate(self.samples):
            if self.chat:
                field = {"message": {"role": "assistant", "content": sample.content_text,
                                     "reasoning_content": sample.reasoning_text}}
            else:
                field = {"text": sample.content_text}
            choices.append(_choice(i, self.finish[i], **field))
        return self._object("chat.completion" if self.chat else "text_completion", choices, usage=self.usage())


def _choice(index: int, finish: str | None = None, **field) -> dict:
    """One choice of a reply or a chunk; `field` is its `delta`, `message` or `text`."""
    return {"index": index, **field, "logprobs": None, "finish_reason": finish}
