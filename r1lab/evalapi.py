"""The evaluation harness against any OpenAI-compatible chat endpoint (r1lab's server, vLLM, DeepSeek).

Each item is one chat completion request with `n=k` (or k requests of n=1 when the endpoint
refuses n > 1 or returns fewer choices), carrying temperature, top_p, max_tokens and a seed derived
from the run seed and the item id. Requests run in a bounded thread pool; 429, 5xx, timeouts and
refused connections are retried with exponential backoff (honouring Retry-After); 401, 403 and 404
stop the run with a message saying what to check.

A reply's `reasoning_content` (or vLLM's `reasoning`), when present, is the chain of thought: the
whole text is rebuilt as `<think>\\n{reasoning}\\n</think>\\n\\n{content}`, so the graded answer
(what follows `</think>`) is `content`. Token counts come from
`usage.completion_tokens` (reasoning included): a choice cut for "length" used max_tokens, the
rest are shared among the other choices by characters (exact for n=1, apportioned for n > 1).
This module knows HTTP and the OpenAI schema; grading and files are `r1lab.eval`'s.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from r1lab.eval import (
    DEFAULT_K,
    DEFAULT_MAX_NEW_TOKENS,
    MATH_INSTRUCTION,
    R1_TEMPERATURE,
    R1_TOP_P,
    EvalError,
    EvalResult,
    bench_label,
    load_examples,
    run_evaluation,
    with_greedy,
)
from r1lab.sampling import Group, Sampled, question_text
from r1lab.tasks import FAMILIES


class EndpointError(EvalError):
    """The endpoint refused the run (bad key, unknown model or URL) or stayed unavailable."""


def item_seed(seed: int, item_id: str, sample: int = -1) -> int:
    """The request seed of one item (and one sample, for n=1 requests): stable, below 2**31."""
    return int.from_bytes(hashlib.sha256(f"r1lab-api:{seed}:{item_id}:{sample}".encode()).digest()[:4], "big") >> 1


class ChatSampler:
    """Samples k chat completions per item from one endpoint; callable as an `eval.SampleChunk`."""

    def __init__(self, api_base: str, api_model: str, *, k: int, max_tokens: int, temperature: float,
                 top_p: float, seed: int, instruction: str, api_key: str | None = None, concurrency: int = 8,
                 max_retries: int = 6, backoff: float = 1.0, timeout: float = 600.0):
        if concurrency < 1:
            raise EvalError(f"concurrency must be >= 1, got {concurrency}")
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"  # local servers often want no key
        self.client = openai.OpenAI(base_url=api_base, api_key=key, max_retries=0, timeout=timeout)
        self.api_base, self.api_model = api_base, api_model
        self.k, self.seed, self.instruction = k, seed, instruction
        self.request = {"model": api_model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.n_supported: bool | None = None if k > 1 else True  # learnt from the first reply
        self._lock = threading.Lock()

    def __call__(self, examples: list[dict], start: int) -> list[Group]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(examples))) as pool:
            return list(pool.map(self.sample_item, examples))

    def sample_item(self, example: dict) -> Group:
        """The k samples of one example; no ids, the endpoint's token counts (`usage_tokens`)."""
        messages = [{"role": "user", "content": question_text(example, self.instruction)}]
        item_id = str(example["id"])
        samples: list[Sampled] = []
        prompt_tokens = 0
        if self.k > 1 and self.n_supported is not False:
            try:
                reply = self._create(messages, n=self.k, seed=item_seed(self.seed, item_id))
            except (openai.BadRequestError, openai.UnprocessableEntityError):
                reply = None  # the endpoint refuses n > 1: ask k times instead
            with self._lock:
                self.n_supported = reply is not None and len(reply.choices) >= self.k
            if reply is not None:
                samples, prompt_tokens = _samples(reply, self.request["max_tokens"], example)[:self.k], _prompt_tokens(reply)
        while len(samples) < self.k:
            j = len(samples)
            reply = self._create(messages, n=1, seed=item_seed(self.seed, item_id, j))
            if not reply.choices:
                raise EndpointError(f"{self.api_base}: a reply with no choices for model {self.api_model!r}")
            samples.append(_samples(reply, self.request["max_tokens"], example)[0])
            prompt_tokens = prompt_tokens or _prompt_tokens(reply)
        return Group(example, [], samples, usage_prompt_tokens=prompt_tokens)

    def _create(self, messages: list[dict], n: int, seed: int):
        for attempt in range(self.max_retries + 1):
            try:
                return self.client.chat.completions.create(messages=messages, n=n, seed=seed, **self.request)
            except openai.AuthenticationError as e:
                raise EndpointError(f"{self.api_base}: 401 unauthorized ({_message(e)}); check --api-key "
                                    f"or OPENAI_API_KEY") from None
            except openai.PermissionDeniedError as e:
                raise EndpointError(f"{self.api_base}: 403 forbidden ({_message(e)}); the key may not use "
                                    f"model {self.api_model!r}") from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if n > 1:
                    raise  # the caller falls back to n=1 requests
                raise EndpointError(f"{self.api_base}: {e.status_code} bad request ({_message(e)})") from None
            except openai.NotFoundError as e:
                raise EndpointError(f"{self.api_base}: 404 not found ({_message(e)}); check --api-base (it "
                                    f"usually ends in /v1) and --api-model {self.api_model!r}") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                if attempt == self.max_retries:
                    raise EndpointError(f"{self.api_base}: still failing after {attempt + 1} attempts: "
                                        f"{_message(e)}") from None
                time.sleep(_retry_after(e) or self.backoff * 2 ** attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")


def _message(e: Exception) -> str:
    return str(getattr(e, "message", None) or e).splitlines()[0][:200]


def _retry_after(e: Exception) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), capped at a minute."""
    response = getattr(e, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        seconds = when.timestamp() - time.time() if when else 0.0
    return min(max(seconds, 0.0), 60.0)


def _field(message: Any, name: str) -> str | None:
    value = getattr(message, name, None)
    if value is None:
        value = (getattr(message, "model_extra", None) or {}).get(name)
    return value if isinstance(value, str) else None


def _samples(reply: Any, max_tokens: int, example: dict) -> list[Sampled]:
    """One Sampled per choice. A choice cut for "length" used exactly max_tokens; the rest of
    `usage.completion_tokens` is shared among the other choices in proportion to their characters."""
    choices = sorted(reply.choices, key=lambda c: c.index)
    parts = []
    for choice in choices:
        content = choice.message.content or ""
        reasoning = _field(choice.message, "reasoning_content") or _field(choice.message, "reasoning")
        if reasoning is None:
            parts.append((content, len(content)))
        elif not content and choice.finish_reason == "length":  # cut off inside the reasoning
            parts.append((f"<think>\n{reasoning}", len(reasoning)))
        else:
            parts.append((f"<think>\n{reasoning}\n</think>\n\n{content}", len(reasoning) + len(content)))
    cut = [choice.finish_reason == "length" for choice in choices]
    total = getattr(getattr(reply, "usage", None), "completion_tokens", None)
    rest = None if total is None else max(total - max_tokens * sum(cut), 0)
    chars = sum(p[1] for p, was_cut in zip(parts, cut) if not was_cut) or 1
    out = []
    for choice, (text, n_chars), was_cut in zip(choices, parts, cut):
        if was_cut:
            tokens = max_tokens
        else:
            tokens = round(rest * n_chars / chars) if rest is not None else len(text) // 4
        out.append(Sampled(example, [], [], text, str(choice.finish_reason), usage_tokens=int(tokens)))
    return out


def _prompt_tokens(reply: Any) -> int:
    return int(getattr(getattr(reply, "usage", None), "prompt_tokens", 0) or 0)


def evaluate_endpoint(api_base: str, api_model: str, examples: list[dict], *, k: int = DEFAULT_K,
                      temperature: float = R1_TEMPERATURE, top_p: float = R1_TOP_P,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0, api_key: str | None = None,
                      instruction: str | None = None, ks: Sequence[int] | None = None,
                      out_dir: str | os.PathLike | None = None, resume: bool = True, grade: str = "answer",
                      concurrency: int = 8, chunk_size: int | None = None, max_retries: int = 6,
                      backoff: float = 1.0, settings: dict[str, Any] | None = None,
                      progress: Callable[[int, int], None] | None = None, greedy: bool = False) -> EvalResult:
    """Evaluate the model behind an OpenAI-compatible endpoint on `examples`, k samples each.

    The question (with the R1 math instruction unless `instruction=""`) is the only user message;
    the server applies its own chat template. Cost figures are wall time only (no FLOPs, no cores).
    With `greedy`, the items are also asked once at temperature 0 (into `out_dir/greedy`), as
    `r1lab.eval.evaluate` does.
    """
    instruction = MATH_INSTRUCTION if instruction is None else instruction
    sampler = ChatSampler(api_base, api_model, k=k, max_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, instruction=instruction, api_key=api_key,
                          concurrency=concurrency, max_retries=max_retries, backoff=backoff)
    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    settings = {"model": None, "bench": None, "difficulty": None, **(settings or {}), "api_base": api_base,
                "api_model": api_model, "template": "endpoint", "instruction": instruction, "sampling": sampling,
                "length_unit": "usage.completion_tokens, apportioned by characters when n > 1"}
    result = run_evaluation(sampler, examples, k=k, settings=settings, ks=ks, out_dir=out_dir, resume=resume,
                            chunk_size=chunk_size or 4 * concurrency, grade=grade, think_opened=False,
                            progress=progress)
    if not greedy:
        return result
    greedy_run = result if temperature == 0 else evaluate_endpoint(  # a greedy run is its own greedy twin
        api_base, api_model, examples, k=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed,
        api_key=api_key, instruction=instruction, out_dir=None if out_dir is None else Path(out_dir) / "greedy",
        resume=resume, grade=grade, concurrency=concurrency, chunk_size=chunk_size, max_retries=max_retries,
        backoff=backoff, settings=settings, progress=progress)
    return with_greedy(result, greedy_run, out_dir)


def evaluate_endpoint_bench(api_base: str, api_model: str, bench: str, *, limit: int | None = None,
                            seed: int = 0, difficulty: int | None = None, out_dir: str | os.PathLike | None = None,
                            **options: Any) -> EvalResult:
    """`r1lab eval --api-base URL --api-model NAME --bench B`: results default to ./eval/<model>/<bench>."""
    difficulty = 1 if difficulty is None else difficulty
    examples = load_examples(bench, limit, seed, difficulty)
    label = bench_label(bench, difficulty)
    safe_model = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in api_model)
    out = Path(out_dir) if out_dir is not None else Path("eval") / safe_model / label
    settings = {"model": f"{api_model} @ {api_base}", "bench": label, "limit": limit,
                "difficulty": difficulty if bench in FAMILIES else None}
    return evaluate_endpoint(api_base, api_model, examples, seed=seed, out_dir=out, settings=settings, **options)
