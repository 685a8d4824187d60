"""The engine thread: one thread owns the `Engine`; asyncio request handlers talk to it by messages.

The engine is not thread-safe and a decode step blocks for milliseconds, so it cannot run on the
event loop. `EngineWorker` runs this loop on its own thread:

    take every queued command (add a request, cancel one) and apply it to the engine;
    if the engine has work: one `engine.step()`, then hand each request its events;
    else sleep until a command arrives.

Requests that arrive while a step runs are added before the next step, so they join the running
batch at the step boundary (continuous batching): sixteen clients share one decode batch rather
than queueing behind each other. Events go back to the loop that submitted the request with
`loop.call_soon_threadsafe`, one call per request per step. A cancelled request (its client left)
is cancelled in the engine at the next boundary; its later events are dropped.

A request the engine refuses (`add_request` raises ValueError: the client asked for something it
cannot do) gets `GenerationRefused`, which a handler awaiting `generation.admitted()` sees before it
answers, so it can reply 400 rather than start a reply it cannot finish. If a step raises, every
request in flight receives the error, the traceback goes to the `r1lab.serve.worker` log with the
labels (request ids) of the requests it failed, and the engine is rebuilt from its factory, so one
bad step does not take the server down.

It knows the engine and asyncio; it does not know HTTP, text or templates.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from r1lab.engine import Engine, SamplingParams, StepEvent

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """The engine failed while generating this request (or refused it)."""


class GenerationRefused(GenerationError):
    """The engine would not take this request (its `add_request` raised ValueError): the client's fault."""


@dataclass
class WorkerStats:
    requests: int = 0
    cancelled: int = 0
    tokens: int = 0
    max_batch: int = 0
    """Most samples that received a token in one step (the decode batch, as the engine ran it)."""
    failures: int = 0


class Generation:
    """One request's events, delivered on the event loop that submitted it.

    `async for events in generation` yields lists of `StepEvent` (the events of every engine step
    delivered since the last iteration) until every sample has finished; it raises
    `GenerationError` if the engine failed.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 label: str | None = None):
        self.prompt = prompt
        self.params = params
        self.label = label                   # names the request in the log (the HTTP request id)
        self.request_id: int | None = None   # set by the engine thread
        self._loop = loop
        self._admission = loop.create_future()  # settled by the engine thread: None, or the refusal
        self._items: deque = deque()   # lists of events, or an exception; touched only on the loop
        self._ready = asyncio.Event()
        self._open = params.n
        self.done = False

    def _deliver(self, item) -> None:  # on the loop
        self._items.append(item)
        self._ready.set()

    def _settle(self, error: BaseException | None) -> None:  # on the loop
        if not self._admission.done():
            self._admission.set_result(error)

    def _post(self, item, call=None) -> bool:  # on the engine thread
        try:
            self._loop.call_soon_threadsafe(call or self._deliver, item)
            return True
        except RuntimeError:  # the loop is closed: nobody is listening
            return False

    def _fail(self, error: GenerationError) -> None:  # on the engine thread, before it was admitted
        self._post(error, self._settle)
        if not self.done:
            self._post(error)

    async def admitted(self) -> None:
        """Returns once the engine has taken the request; raises `GenerationRefused` if it would not
        (and `GenerationError` if the engine failed or stopped first)."""
        error = await asyncio.shield(self._admission)
        if error is not None:
            raise error

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[StepEvent]:
        if self.done:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        # A client that fell behind takes every step waiting for it at once (fewer, larger writes).
        while self._items and not isinstance(self._items[0], BaseException):
            item = item + self._items.popleft()
        self._open -= sum(ev.finish_reason is not None for ev in item)
        if self._open <= 0:
            self.done = True
        return item


class EngineWorker:
    """Owns an engine on a background thread; `submit` and `cancel` are called from event loops."""

    def __init__(self, make_engine: Callable[[], Engine]):
        self._make_engine = make_engine
        self.engine = make_engine()
        self.stats = WorkerStats()
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._routes: dict[int, list] = {}  # engine request id -> [generation, samples still open]
        self._start_lock = threading.Lock()
        self.started = False

    # -- the event-loop side -----------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self.started = True
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="r1lab-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> int:
        """Requests the engine thread is generating for (a snapshot: it may change as you read it)."""
        return len(self._routes)

    def submit(self, prompt: list[int], params: SamplingParams, label: str | None = None) -> Generation:
        """Queue a request for the next step boundary; iterate the result for its events."""
        self.start()
        generation = Generation(prompt, params, asyncio.get_running_loop(), label)
        self._inbox.append(("add", generation))
        self._wake.set()
        return generation

    def cancel(self, generation: Generation) -> None:
        """Stop a request (its client went away). Safe to call after it finished."""
        if not generation.done:
            generation.done = True
            self._inbox.append(("cancel", generation))
            self._wake.set()

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._apply_commands()
                    if self.engine.has_work():
                        self._dispatch(self.engine.step())
                    else:
                        self._wake.wait()
                        self._wake.clear()
                except Exception as e:  # noqa: BLE001 - a failure fails the requests in flight, not the server
                    labels = [g.label for g, _ in self._routes.values()]
                    log.exception("engine step failed; failing %d requests and rebuilding the engine", len(labels),
                                  extra={"request_ids": ",".join(str(label) for label in labels)})
                    self._fail_all(e)
            self._fail_all(GenerationError("the server is shutting down"), rebuild=False)
        except BaseException:
            log.critical("the engine thread stopped; /health now reports 503", exc_info=True)
            raise

    def _apply_commands(self) -> None:
        while self._inbox:
            kind, generation = self._inbox.popleft()
            if kind == "add":
                if generation.done:  # cancelled before it reached the engine
                    generation._fail(GenerationError("cancelled before it started"))
                    continue
                try:
                    generation.request_id = self.engine.add_request(generation.prompt, generation.params)
                except ValueError as e:
                    generation._fail(GenerationRefused(str(e)))
                    continue
                generation._post(None, generation._settle)
                self._routes[generation.request_id] = [generation, generation.params.n]
                self.stats.requests += 1
            elif generation.request_id in self._routes:
                self.engine.cancel(generation.request_id)
                del self._routes[generation.request_id]
                self.stats.cancelled += 1

    def _dispatch(self, events: list[StepEvent]) -> None:
        by_request: dict[int, list[StepEvent]] = {}
        fed = 0
        for ev in events:
            if ev.token_ids:
                fed += 1
                self.stats.tokens += len(ev.token_ids)
            by_request.setdefault(ev.request_id, []).append(ev)
        self.stats.max_batch = max(self.stats.max_batch, fed)
        for request_id, evs in by_request.items():
            route = self._routes.get(request_id)
            if route is None:  # cancelled: its abort events have no listener
                continue
            route[1] -= sum(ev.finish_reason is not None for ev in evs)
            if route[1] <= 0:
                del self._routes[request_id]
            if not route[0]._post(evs) and request_id in self._routes:
                self.engine.cancel(request_id)
                del self._routes[request_id]

    def _fail_all(self, error: BaseException, rebuild: bool = True) -> None:
        self.stats.failures += rebuild
        failure = error if isinstance(error, GenerationError) else GenerationError(
            f"generation failed: {type(error).__name__}: {error}")
        for generation, _ in self._routes.values():
            generation._post(failure)
        self._routes.clear()
        while self._inbox:
            kind, generation = self._inbox.popleft()
            if kind == "add":
                generation._fail(failure)
        if rebuild:
            self.engine = self._make_engine()
