"""The OpenAI-compatible HTTP API and the web chat, as a FastAPI app: `create_app(model, settings)`.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health`,
`GET /openapi.json` (the API's OpenAPI schema: request bodies as `schemas.py` validates them, with
this server's model id and limits), and the web chat at `/` (static files under `/static`). Chat
replies carry the chain of thought in `message.reasoning_content` (streaming:
`delta.reasoning_content` chunks first, then `delta.content`), as DeepSeek's API does;
`usage.completion_tokens_details.reasoning_tokens` counts the tokens spent thinking.
`/v1/completions` is plain text continuation (BOS + prompt, no template, no tag handling).

Limits and their errors (OpenAI's error JSON, never a 500 for anything a client sends):
  400 invalid JSON (NaN and lone UTF-16 surrogates included), an unrenderable conversation, a prompt
      longer than the server takes (`context_length_exceeded`, as OpenAI answers it), max_tokens over
      the cap, n over the limit, a request the engine refuses;
  401 missing or wrong `Authorization: Bearer KEY` when the server has an API key (every API route
      and the schema; `/health` and the web chat's static files are public: the page asks for the key);
  404 unknown model or route; 413 body too large; 422 a field of the wrong type or range;
  429 more than `max_concurrency` requests in flight.
A 500 is the server's fault: the engine failed (its message says how), or a bug, whose traceback
goes to the log under the request's id (`observe.py`: request ids, the access log, the 500 JSON).
CORS is off (browsers may call the API only from the page it serves) unless `cors_origins` names
the origins allowed to.

Defaults differ from OpenAI's where R1 differs: temperature 0.6 and top_p 0.95 (DeepSeek's
recommendation for R1) unless the request says otherwise; max_tokens defaults to what is left of
the context (capped), and to 16 for `/v1/completions` as OpenAI's legacy endpoint does. Stop
strings apply to the whole completion, reasoning included; the stop string itself is not returned.

It knows HTTP: routes, limits, streaming and disconnects. Request and response objects are
`schemas.py`'s, generation is the engine thread's (`worker.py`), text handling `assistant.py`'s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1lab.config import ConfigError
from r1lab.engine import SamplingParams, StepEvent
from r1lab.serve.assistant import RAW, ServedModel, chat_prompt, make_engine, text_prompt
from r1lab.serve.observe import REQUEST_ID_HEADER, CatchErrors, RequestLog, request_id
from r1lab.serve.schemas import (APIError, ChatCompletionRequest, CompletionRequest, ReplyBuilder, decode_json,
                                 error_body, openapi_schema, parse_request)
from r1lab.serve.worker import EngineWorker, Generation, GenerationError, GenerationRefused
from r1lab.tokenizer import template_stop_ids

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger(__name__)
# An origin as browsers send it: scheme://host[:port], no path and no trailing slash.
_ORIGIN = re.compile(r"https?://[^/\s]+")


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None
    """Require `Authorization: Bearer <api_key>` on every API route (None: open)."""
    max_tokens_cap: int | None = None
    """Largest max_tokens a request may ask for (None: the model's context length)."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted, in tokens (None: the context length minus one)."""
    max_concurrency: int = 64
    """Requests in flight at once; more get 429."""
    max_n: int = 16
    """Most choices per request."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body; more gets 413 before any parsing."""
    max_batch_size: int = 256
    """The engine's running batch, in samples."""
    compile: bool = False
    """Run the engine on the CPU backend (`Engine(compile=True)`): the first requests in each batch-size
    class wait while its steps compile, later steps are much cheaper."""
    temperature: float = 0.6
    """Default sampling temperature (DeepSeek's recommendation for R1)."""
    top_p: float = 0.95
    """Default nucleus mass."""
    cors_origins: tuple[str, ...] = ()
    """Origins (e.g. "http://localhost:3000", or "*" for any) whose pages may call the API from a browser;
    empty: CORS off, no Access-Control-Allow-Origin header is ever sent."""

    def __post_init__(self):
        for name in ("max_tokens_cap", "max_prompt_tokens", "max_concurrency", "max_n", "max_body_bytes",
                     "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"serve {name} must be >= 1, got {value}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve api_key must not be empty")
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ConfigError(f"serve cors origin {origin!r} is not an origin: write scheme://host[:port] "
                                  "(no path, no trailing slash), or * for any")


class _Counter:
    """Requests in flight. Touched only on the event loop, so no lock."""

    def __init__(self):
        self.value = 0


def create_app(model: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving `model`; its engine thread starts with the app (or at the first request)."""
    settings = settings or ServeSettings()
    worker = EngineWorker(lambda: make_engine(model, settings.max_batch_size, compile=settings.compile))
    in_flight = _Counter()
    created = int(time.time())
    cap = settings.max_tokens_cap or model.max_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="r1lab", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.in_flight = in_flight
    _install_error_handlers(app)
    # Outermost last: every request gets its id and access line, even a CORS preflight; a 500 made by
    # CatchErrors still passes through CORS, so a browser can read it.
    app.add_middleware(CatchErrors)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
                           expose_headers=[REQUEST_ID_HEADER])
    app.add_middleware(RequestLog)

    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = credentials.credentials.strip() if credentials else ""
        if not hmac.compare_digest(key.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                           code="invalid_api_key")

    api = APIRouter(dependencies=[Depends(authorize)] if settings.api_key is not None else [])

    def model_card() -> dict:
        return {"id": model.name, "object": "model", "created": created, "owned_by": "r1lab",
                "context_length": model.max_len, "max_tokens_cap": cap, "template": model.template}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app.routes, model.name, cap, settings.max_n)
        return JSONResponse(app.openapi_schema)

    @api.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    def check_model(name: str) -> None:
        if name != model.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model.name!r}",
                           param="model", code="model_not_found")

    def sampling(req, prompts: list[list[int]], param: str, max_tokens: int | None, default_max: int | None,
                 template: str | None) -> SamplingParams:
        """The engine's parameters for `req`, once its prompts (the field `param`) are within the limits."""
        longest = max(len(p) for p in prompts)
        prompt_limit = min(settings.max_prompt_tokens or model.max_len - 1, model.max_len - 1)
        if longest > prompt_limit:
            raise APIError(400, f"the prompt has {longest} tokens; this server accepts at most {prompt_limit} "
                                f"(the model's context is {model.max_len})",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's cap of {cap}",
                           param="max_tokens", code="max_tokens_exceeded")
        if req.n > settings.max_n:
            raise APIError(400, f"n={req.n} is over this server's limit of {settings.max_n}", param="n",
                           code="invalid_value")
        return SamplingParams(
            max_new_tokens=min(max_tokens or default_max or cap, cap, model.max_len - longest),
            temperature=settings.temperature if req.temperature is None else req.temperature,
            top_p=settings.top_p if req.top_p is None else req.top_p,
            # top_k past the vocabulary means all of it; the engine keeps it in an int64 tensor, where a
            # larger value would not fit
            top_k=min(req.top_k or 0, model.decoder.config.vocab_size), n=req.n, seed=req.seed,
            stop_strings=req.stop_strings(), ignore_eos=req.ignore_eos,
            stop_token_ids=() if template is RAW else template_stop_ids(model.tokenizer, template))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(ChatCompletionRequest, await _read_json(request, settings.max_body_bytes))
        check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = await asyncio.to_thread(chat_prompt, model, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        params = sampling(req, [prompt], "messages", req.max_completion_tokens or req.max_tokens, None, model.template)
        return await respond(request, req, [prompt], params, model.template)

    @api.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(CompletionRequest, await _read_json(request, settings.max_body_bytes))
        check_model(req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts or len(texts) > settings.max_n:
            raise APIError(400, f"prompt must be a string or a list of 1 to {settings.max_n} strings",
                           param="prompt", code="invalid_value")
        prompts = [await asyncio.to_thread(text_prompt, model, t) for t in texts]
        return await respond(request, req, prompts, sampling(req, prompts, "prompt", req.max_tokens, 16, RAW), RAW)

    async def respond(request: Request, req, prompts: list[list[int]], params: SamplingParams,
                      template: str | None) -> Response:
        """Generate under `template` (a chat reply), or `RAW` (a text completion)."""
        if in_flight.value >= settings.max_concurrency:
            raise APIError(429, f"too many requests in flight (limit {settings.max_concurrency}); retry shortly",
                           code="rate_limit_exceeded")
        in_flight.value += 1
        rid = request_id(request.scope)
        generations = [worker.submit(p, params, label=rid) for p in prompts]
        reply = ReplyBuilder(model, template, params.stop_strings, prompts, params.n)
        finished = False

        def release() -> None:
            nonlocal finished
            if not finished:
                finished = True
                in_flight.value -= 1
                for g in generations:
                    worker.cancel(g)

        try:
            # The engine checks a request as it takes it: a refusal is the client's error, answered as
            # one before any stream starts. (Any other failure reaches the reply below.)
            await asyncio.gather(*(g.admitted() for g in generations))
        except GenerationRefused as e:
            release()
            raise APIError(400, f"the engine refused the request: {e}", code="invalid_value") from None
        except GenerationError:
            pass
        except BaseException:
            release()
            raise

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def sse() -> AsyncIterator[str]:
                try:
                    if opening := "".join(_sse(chunk) for chunk in reply.opening()):
                        yield opening
                    async for prompt_index, events in _merged(generations):
                        if text := "".join(_sse(chunk) for chunk in reply.events(prompt_index, events)):
                            yield text
                    if include_usage:
                        yield _sse(reply.usage_chunk())
                except GenerationError as e:
                    log.error("%s (mid-stream)", e, extra={"request_id": rid})
                    yield _sse(error_body(str(e)))
                finally:
                    release()
                yield "data: [DONE]\n\n"

            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(sse(), media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(release))

        async def collect() -> None:
            async for prompt_index, events in _merged(generations):
                reply.events(prompt_index, events)  # decodes into the samples; the chunks go unused

        try:
            work = asyncio.ensure_future(collect())
            gone = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not work.done():  # the client left: stop generating for it
                work.cancel()
                return Response(status_code=499)
            try:
                work.result()
            except GenerationError as e:
                log.error("%s", e, extra={"request_id": rid})
                return JSONResponse(error_body(str(e)), status_code=500)
            return JSONResponse(reply.whole())
        finally:
            release()

    @app.get("/health")
    async def health():
        ok = worker.alive or not worker.started
        body = {"status": "ok" if ok else "engine thread stopped", "model": model.name,
                "in_flight": in_flight.value, "generating": worker.active, "requests": worker.stats.requests,
                "cancelled": worker.stats.cancelled,
                "max_batch": worker.stats.max_batch}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, list[StepEvent]]]:
    """(prompt index, events) from several generations as they arrive."""
    if len(generations) == 1:
        async for events in generations[0]:
            yield 0, events
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for events in generation:
                queue.put_nowait((index, events))
            queue.put_nowait((index, None))
        except GenerationError as e:
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        open_ = len(tasks)
        while open_:
            index, item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    return decode_json(bytes(body))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message, code=str(e.status_code)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(422, str(e.errors()[:1]), code="invalid_value").body(), status_code=422)

