"""Clients that vanish: `r1lab serve` in a subprocess (a tiny random checkpoint, real uvicorn on a free
port) takes 200 chat and completion requests, streaming and not, whose clients hang up at random
points: halfway through sending the body, right after sending it, halfway through the reply, or
never. Afterwards the server must be healthy, answer a normal request, hold no request in the
engine, have logged no error, and use no more memory than after a warm-up of the same traffic
(RSS within 10%).

The RSS is the server process's own (`/proc/PID/status`), so the test runs where /proc exists.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_config
from test_serve import ask, train_tokenizer
from test_serve_observe import parse_logfmt

from r1lab.checkpoint import save_checkpoint
from r1lab.model import Transformer

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")

REQUESTS, WARMUP, CONCURRENCY = 200, 60, 8
CUTS = ("in the body", "after the request", "in the reply", "never")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = train_tokenizer()
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, max_seq_len=64, original_seq_len=64,
                                    init_std=0.1)).eval()
    root = tmp_path_factory.mktemp("disconnects")
    save_checkpoint(root / "tiny", model, tok, metadata={"template": "r1"})
    port = free_port()
    log = (root / "stderr.log").open("w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: one thread each is faster and frugal
    proc = subprocess.Popen([sys.executable, "-m", "r1lab.cli", "serve", "--model", str(root / "tiny"),
                             "--port", str(port), "--max-tokens-cap", "24"], stderr=log, stdout=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"r1lab serve did not start:\n{log.read()}")
        time.sleep(0.2)
    yield proc, url, Path(log.name)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


async def one_request(port: int, rng: random.Random, seed: int) -> str:
    """Send one request and hang up where `rng` says; returns where."""
    stream, chat = rng.random() < 0.5, rng.random() < 0.7
    sampling = {"model": "tiny", "stream": stream, "max_tokens": rng.randint(4, 24), "ignore_eos": True,
                "temperature": 1.0, "seed": seed}
    path, body = (("/v1/chat/completions", {**sampling, "messages": ask(f"question {seed}: what is {seed} plus 1?")})
                  if chat else ("/v1/completions", {**sampling, "prompt": f"count {seed} then"}))
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    cut = rng.choice(CUTS)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if cut == "in the body":
            writer.write(head + data[:rng.randrange(len(data))])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.02))
            return cut
        writer.write(head + data)
        await writer.drain()
        if cut == "after the request":
            await asyncio.sleep(rng.uniform(0, 0.05))
            return cut
        if cut == "in the reply":
            want, got = rng.randint(1, 2500), 0
            while got < want and (chunk := await reader.read(want - got)):
                got += len(chunk)
            return cut
        reply = await reader.read()  # to the end: Connection: close
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert not stream or (b"data: [DONE]" in reply and reply.endswith(b"\r\n0\r\n\r\n")), reply[-300:]  # chunked
        return cut
    finally:
        writer.transport.abort()  # gone at once, no goodbye


async def traffic(port: int, n: int, seed: int) -> Counter:
    rng = random.Random(seed)
    plans = [random.Random(rng.random()) for _ in range(n)]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def limited(i: int) -> str:
        async with gate:
            return await one_request(port, plans[i], seed * 10_000 + i)

    return Counter(await asyncio.gather(*(limited(i) for i in range(n))))


def settle(url: str) -> dict:
    """/health once nothing is in flight (the server notices a hang-up at its next step or read)."""
    deadline = time.monotonic() + 30
    while True:
        health = httpx.get(url + "/health", timeout=5).json()
        if (health["in_flight"] == 0 and health["generating"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_random_disconnects_leave_the_server_healthy_with_flat_memory(server):
    proc, url, log_path = server
    port = int(url.rsplit(":", 1)[1])
    asyncio.run(traffic(port, WARMUP, seed=1))
    settle(url)
    warm = rss_kib(proc.pid)
    cuts = asyncio.run(traffic(port, REQUESTS, seed=2))
    health = settle(url)
    after = rss_kib(proc.pid)

    assert set(cuts) == set(CUTS) and sum(cuts.values()) == REQUESTS
    assert health["status"] == "ok" and health["in_flight"] == 0 and health["generating"] == 0, health
    assert health["cancelled"] > 0  # hang-ups reached the engine and stopped generations
    assert after <= 1.10 * warm, f"RSS grew from {warm} KiB after the warm-up to {after} KiB"
    reply = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"X-Request-ID": "still-there"},
                       json={"model": "tiny", "messages": ask("still there?"), "max_tokens": 5, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5

    deadline = time.monotonic() + 10  # the access line is written just after the reply is sent
    while "request_id=still-there" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [parse_logfmt(line) for line in log_path.read_text().splitlines() if "logger=" in line]
    access = [f for f in lines if f["logger"] == "r1lab.serve.access"]
    posts = [f for f in access if f["method"] == "POST"]
    assert len(posts) == WARMUP + REQUESTS + 1 and posts[-1]["request_id"] == "still-there"
    assert all(len(f["request_id"]) == 32 and float(f["latency_ms"]) >= 0 for f in posts[:-1])
    assert {f["status"] for f in posts} <= {"200", "499"}
    gone = Counter(f["status"] for f in posts if f.get("client_gone") == "true")
    assert gone["499"] == sum(f["status"] == "499" for f in posts) and gone["200"] > 0  # cut replies are marked too
    assert sum(gone.values()) >= cuts["in the body"]
    assert not [f for f in lines if f["level"] in ("error", "critical")], [f for f in lines if f["level"] != "info"]
