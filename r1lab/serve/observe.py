"""What the server tells its operator: request ids, one access line per request, and tracebacks kept
in the log rather than in responses.

Two ASGI middlewares wrap the app (outermost first):

* `RequestLog` gives every HTTP request an id (the client's `X-Request-ID` when it is a plain token of
  at most 128 characters, else a fresh one), returns it in the `X-Request-ID` response header, and
  logs one line on `r1lab.serve.access` when the request ends: request_id, method, path, route (the
  matched route template), status, latency_ms, and `client_gone=true` when the client hung up
  before the response was complete. A request whose client left before any response is logged
  with status 499, as nginx does.
* `CatchErrors` turns an exception no handler took into a 500 with OpenAI's error JSON that names
  the request id and holds no traceback; the traceback goes to `r1lab.serve.errors` with that id. A
  client that leaves while its body is read is not an error.

`KeyValueFormatter` writes records as one key=value line each (logfmt: values with spaces, quotes or
newlines are quoted, with backslash escapes, so a traceback stays on its record's line), and
`logging_config` is the `logging.config.dictConfig` that `server.run` hands uvicorn so that r1lab's
and uvicorn's records reach stderr in that format.

It knows ASGI and the standard `logging` module; it does not know routes, models or the engine.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r1lab.serve.schemas import error_body

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is echoed into logs and headers, so only plain tokens are taken (no spaces, quotes or
# newlines that could forge a log line).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CLIENT_CLOSED = 499
"""The status logged for a request whose client left before it was answered (nginx's convention)."""


def request_id(scope: Scope) -> str | None:
    """The id `RequestLog` gave this request (None outside it)."""
    return scope.get("state", {}).get("request_id")


class RequestLog:
    """Request ids and the access log; see the module docstring."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.log = logging.getLogger("r1lab.serve.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = incoming if _CLIENT_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status: int | None = None
        complete = gone = False

        async def receive_watched() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not complete)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True  # before sending: a server reports "disconnect" to readers once it is out
            await send(message)

        try:
            await self.app(scope, receive_watched, send_with_id)
        finally:
            route = scope.get("route")
            fields = {"request_id": rid, "method": scope.get("method"), "path": scope.get("path"),
                      "route": getattr(route, "path", None), "status": status or CLIENT_CLOSED,
                      "latency_ms": round((time.perf_counter() - start) * 1000, 1)}
            if gone or not complete:
                fields["client_gone"] = True
            self.log.info("%s %s %s %.1f ms", fields["method"], fields["path"], fields["status"],
                          fields["latency_ms"], extra=fields)


class CatchErrors:
    """The last handler: an exception becomes a logged traceback and a 500 without one."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.log = logging.getLogger("r1lab.serve.errors")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except ClientDisconnect:
            return  # the client left while its body was read: nobody to answer, nothing broken
        except Exception as e:  # noqa: BLE001 - the point of this class: every error is logged, none leaks
            rid = request_id(scope)
            self.log.exception("unhandled %s in %s %s", type(e).__name__, scope.get("method"), scope.get("path"),
                               extra={"request_id": rid})
            if started:  # the status line is out; the server closes the connection on the half response
                return
            body = error_body(f"internal error (request id {rid}); the server log has the details",
                              code="internal_error")
            await JSONResponse(body, status_code=500)(scope, receive, send)


# The attributes every LogRecord has; anything else on a record came in through `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message",
                                                                          "taskName"}
_BARE = re.compile(r"[^\s\"=\\]+")


def _value(value: object) -> str:
    text = "true" if value is True else "false" if value is False else "-" if value is None else str(value)
    if _BARE.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... msg=... <extra fields> traceback=...`, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        fields.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def logging_config(level: str = "info") -> dict:
    """A `dictConfig` sending r1lab's and uvicorn's records to stderr as key=value lines."""
    handler = {"class": "logging.StreamHandler", "formatter": "kv", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"kv": {"()": KeyValueFormatter}},
            "handlers": {"stderr": handler},
            "loggers": {"r1lab": logger, "uvicorn": logger, "uvicorn.error": {"level": level.upper()}}}
