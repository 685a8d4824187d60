"""Serving throughput: 1, 4 and 16 concurrent streaming clients against `r1lab serve`.

The server runs as its own process (`python -m r1lab.cli serve`, the command users run) on
127.0.0.1; the clients are asyncio + httpx in this process, reading the SSE stream of
`/v1/chat/completions`. Every client generates exactly `--tokens` tokens: each request sends
`max_tokens=N` and `"ignore_eos": true`, r1lab's request extension (named as vLLM names it) that
bans the end-of-sequence token, so each level does a fixed amount of work; the token count is
checked against `usage` (`stream_options.include_usage`). Sampling at temperature 1.

Reported per level: aggregate tokens/s (all completion tokens / wall time from the first request
to the last byte), per-client tokens/s, and time to first token p50/p99, measured from sending the
request to the first chunk that carries generated text (what a user sees; the role chunk that
opens every stream is not counted). The headline is the aggregate ratio at 16 clients against 1:
concurrent requests share the engine's decode batch, so it should be well above 1 (target >= 4x).

Without `--model` it serves the `tiny` preset with random weights and a BPE trained on a few
sentences (written to a temporary checkpoint).

    python benchmarks/bench_serve.py [--model DIR] [--tokens 128] [--levels 1 4 16] [--rounds 2] [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "A train leaves at 3 pm and travels 60 km/h for 2.5 hours. How far does it go? Think step by step."


def make_checkpoint(directory: Path) -> Path:
    import torch

    from r1lab.checkpoint import save_checkpoint
    from r1lab.config import model_preset
    from r1lab.model import Transformer
    from r1lab.tokenizer import Tokenizer

    corpus = [QUESTION, "The distance is speed times time: 60 x 2.5 = 150 km.",
              "Let me check the units again; hours times km per hour gives km."] * 50
    tokenizer = Tokenizer.train(corpus, vocab_size=model_preset("tiny").vocab_size)
    torch.manual_seed(0)
    model = Transformer(model_preset("tiny")).eval()
    return save_checkpoint(directory / "tiny-random", model, tokenizer, metadata={"template": "r1"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "r1lab.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", "bench", "--max-concurrency", "256"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not come up within 120 s")


async def one_client(http: httpx.AsyncClient, tokens: int, seed: int) -> tuple[float, float, int]:
    """(time to first text, total time, completion tokens) of one streamed request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "max_tokens": tokens, "ignore_eos": True, "temperature": 1.0, "top_p": 1.0, "seed": seed,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage = None, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (first if first is not None else total), total, usage["completion_tokens"]


async def run_level(url: str, clients: int, tokens: int, seed: int) -> tuple[float, list[float], list[float]]:
    """(wall seconds, per-client TTFTs, per-client tokens/s) for `clients` concurrent streams."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, tokens, seed + i) for i in range(clients)))
        wall = time.perf_counter() - start
    for _, _, n in results:
        if n != tokens:
            raise RuntimeError(f"a client got {n} tokens, expected {tokens}")
    return wall, [r[0] for r in results], [n / r[1] for r in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint to serve (default: tiny preset, random weights)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens each client generates (default 128)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per level, after one warm-up request")
    parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_checkpoint(Path(tmp))
        port = free_port()
        server = start_server(model_dir, port)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_level(url, 1, 8, seed=0))  # warm-up
            rows, throughput = [], {}
            for clients in args.levels:
                walls, ttfts, rates = [], [], []
                for r in range(args.rounds):
                    wall, level_ttfts, level_rates = asyncio.run(run_level(url, clients, args.tokens, seed=1000 * r))
                    walls.append(wall)
                    ttfts += level_ttfts
                    rates += level_rates
                agg = clients * args.tokens / statistics.mean(walls)
                throughput[clients] = agg
                rows.append(f"| {clients} | {args.tokens} | {agg:.1f} | {statistics.mean(rates):.1f} | "
                            f"{1000 * percentile(ttfts, 50):.0f} | {1000 * percentile(ttfts, 99):.0f} |")
                print(rows[-1], flush=True)
            health = httpx.get(url + "/health").json()
        finally:
            server.terminate()
            server.wait(30)

    model_name = str(args.model) if args.model else "tiny preset, random weights"
    lines = [f"r1lab serve ({model_name}) as a subprocess on 127.0.0.1; clients stream /v1/chat/completions with "
             f"max_tokens={args.tokens} and ignore_eos, temperature 1; {args.rounds} rounds per level. TTFT: request "
             f"sent to the first chunk with generated text.",
             "",
             "| clients | tokens each | aggregate tok/s | per-client tok/s | TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---|---|---|---|", *rows, ""]
    low, high = min(throughput), max(throughput)
    if low != high:
        lines.append(f"Aggregate tokens/s at {high} clients vs {low}: {throughput[high] / throughput[low]:.1f}x "
                     f"(target >= 4x); the engine's largest decode batch was {health['max_batch']} samples.")
    body = "\n".join(lines)
    print("\n" + body)
    if not args.no_append:
        append_results("serve: concurrent streaming clients", body, packages=("torch", "fastapi", "uvicorn", "httpx"))


if __name__ == "__main__":
    main()
