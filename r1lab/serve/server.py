"""Running the app under uvicorn: in the foreground (`r1lab serve`) or on a background thread.

`run` sends r1lab's and uvicorn's log records to stderr as key=value lines (`observe.logging_config`)
and turns uvicorn's own access log off: the app writes one access line per request itself, with
its request id. `BackgroundServer` binds 127.0.0.1 on a free port and serves from a thread, for
tests and benchmarks that talk real HTTP to the app in the same process; it leaves logging as the
process has it.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from r1lab.serve.observe import logging_config


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted. Binds to loopback unless `host` says otherwise."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=logging_config(log_level),
                access_log=False, timeout_graceful_shutdown=5)


class BackgroundServer:
    """`with BackgroundServer(app) as server:` then talk to `server.url` (e.g. http://127.0.0.1:PORT)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="r1lab-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(15)
