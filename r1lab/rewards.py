"""Rule-based rewards: plain functions `(completion, example) -> float`, shared by RL and eval.

A completion is the generated text only (the caller strips an EOS token); an example is a dict
with at least "answer" (task families add "family" and their fields; code examples carry "tests",
see `code_tests`).
  accuracy_reward             1.0 when the extracted final answer is right (mathcheck or the
                              example's task family grader), else 0.0; never hangs (time limit)
  format_reward               1.0 for exactly `<think>...</think> <answer>...</answer>`
  language_consistency_reward share of the chain of thought written in the target language
  code_reward                 share of the example's tests the extracted program passes, its
                              values judged here, outside the sandbox that ran it
  overlong_penalty            DAPO's soft length penalty, from a token count
`score_batch` applies weighted reward functions to a batch; a function that raises (or returns
something that is not a finite number) scores 0 and is reported, never propagated. The rewards that
may run a program (`code_reward`, and `accuracy_reward` for a family such as `code` whose grader
runs one) grade a batch's distinct answers once each, up to `SANDBOX_WORKERS` at a time in threads;
every run is still its own sandboxed process.

Rewards know only text: this module imports no model code and no torch; it uses
`r1lab.mathcheck` (answer equivalence), `r1lab.sandbox` (running code) and `r1lab.tasks`.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from r1lab.mathcheck import CheckTimeout, answer_block, answers_equal, extract_answer
from r1lab.sandbox import plain_data, run_python, values_equal
from r1lab.tasks import FAMILIES

log = logging.getLogger(__name__)

RewardFn = Callable[[str, dict], float]
MAX_ANSWER_CHARS = 2000  # a longer extracted answer is wrong by definition (and cheap to reject)
SANDBOX_WORKERS = 8
"""Sandboxed runs `score_batch` keeps going at once. A run mostly waits for its interpreter to start,
so runs overlap well past the core count: on the 2-core reference machine 8 at a time cost 37 ms of
wall clock per run, against 115 ms one after another."""
LANGUAGE_SCRIPTS = {"en": "LATIN", "fr": "LATIN", "de": "LATIN", "es": "LATIN", "ru": "CYRILLIC",
                    "zh": "CJK"}


def accuracy_reward(completion: str, example: dict) -> float:
    """1.0 if the final answer (extracted as in `mathcheck.extract_answer`) is right, else 0.0.

    Task-family examples (`example["family"]` registered in `r1lab.tasks.FAMILIES`) are graded by
    their family's `verify`; all others by `mathcheck.answers_equal` against `example["answer"]`.
    A check that exceeds the time limit scores 0.0 and is logged.
    """
    answer = extract_answer(completion)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    family = example.get("family")
    if family in FAMILIES:
        return float(FAMILIES[family].verify(answer, example))
    try:
        return float(answers_equal(answer, str(example["answer"])))
    except CheckTimeout as exc:
        log.warning("accuracy_reward: %s", exc)
        return 0.0


def format_reward(completion: str, example: dict | None = None, think_opened: bool | None = None) -> float:
    """1.0 for the R1-Zero shape `<think>...</think><answer>...</answer>`, else 0.0.

    Exactly one of each tag, in that order, with only whitespace before `<think>`, between
    `</think>` and `<answer>`, and after `</answer>`; the answer must not be empty. When the
    prompt already ended with `<think>` (the R1 chat template does), pass `think_opened=True` or
    set `example["think_opened"]`; the completion must then not open another `<think>`.
    """
    if think_opened is None:
        think_opened = bool((example or {}).get("think_opened", False))
    text = "<think>" + completion if think_opened else completion
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(text.count(tag) != 1 for tag in tags):
        return 0.0
    starts = [text.find(tag) for tag in tags]
    if starts != sorted(starts):
        return 0.0
    close_think, open_answer, close_answer = starts[1] + len("</think>"), starts[2], starts[3]
    ok = (not text[:starts[0]].strip() and not text[close_think:open_answer].strip()
          and not text[close_answer + len("</answer>"):].strip()
          and bool(text[open_answer + len("<answer>"):close_answer].strip()))
    return float(ok)


def chain_of_thought(completion: str) -> str:
    """The reasoning part: after `<think>` (if any) and before `</think>`, else before `<answer>`."""
    start = completion.find("<think>")
    text = completion[start + len("<think>"):] if start >= 0 else completion
    for end_tag in ("</think>", "<answer>"):
        end = text.find(end_tag)
        if end >= 0:
            return text[:end]
    return text


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return "CJK" if name.startswith("CJK UNIFIED") else name.split(" ", 1)[0]


def language_units(text: str) -> list[str]:
    """The script of each language unit of `text`.

    Units: every CJK ideograph is one unit; every other run of two or more letters is a word,
    whose script is that of its first letter. LaTeX commands (`\\frac`), single letters (math
    variables), digits, punctuation and symbols are not units.
    """
    text = re.sub(r"\\[A-Za-z]+", " ", text)
    units: list[str] = []
    word = ""
    for ch in text + " ":
        if ch.isalpha() and _script(ch) != "CJK":
            word += ch
            continue
        if len(word) >= 2:
            units.append(_script(word[0]))
        word = ""
        if ch.isalpha():
            units.append("CJK")
    return units


def language_consistency_reward(completion: str, example: dict) -> float:
    """Share of the chain of thought's units (see `language_units`) in the target script.

    The target is `example.get("language", "en")`: "en" (and fr/de/es) count Latin-script words,
    "zh" counts CJK ideographs, "ru" Cyrillic words. A chain of thought with no units scores 0.0.
    """
    language = example.get("language", "en")
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"language {language!r} not supported; known: {', '.join(LANGUAGE_SCRIPTS)}")
    units = language_units(chain_of_thought(completion))
    if not units:
        return 0.0
    return sum(u == LANGUAGE_SCRIPTS[language] for u in units) / len(units)


def overlong_penalty(length_tokens: int, max_len: int, buffer: int) -> float:
    """DAPO overlong shaping: 0 up to max_len - buffer, then linear down to -1 at max_len (and beyond)."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    free = max_len - buffer
    if length_tokens <= free:
        return 0.0
    return -min(1.0, (length_tokens - free) / buffer)


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(completion: str) -> str | None:
    """The program in a completion: the last fenced block of the answer part (inside `<answer>`,
    else after `</think>`, else anywhere); without a fence, the bare `<answer>` text."""
    block = answer_block(completion)
    after = completion.rsplit("</think>", 1)[-1]
    for region in (block, after, completion):
        if region is None:
            continue
        fences = _FENCE.findall(region)
        if fences:
            return fences[-1]
    if block is not None and block.strip():
        return block.strip()
    return None


def _parse_assert(test: str) -> tuple[str, object]:
    """`assert <expression> == <literal>` (either side) as (expression, literal); else ValueError."""
    try:
        body = ast.parse(test).body
    except SyntaxError as exc:
        raise ValueError(f"code test {test!r} is not Python: {exc.msg}") from None
    compare = body[0].test if len(body) == 1 and isinstance(body[0], ast.Assert) else None
    if not (isinstance(compare, ast.Compare) and len(compare.ops) == 1 and isinstance(compare.ops[0], ast.Eq)):
        raise ValueError(f"code test {test!r} is not of the form `assert <call> == <literal>`")
    sides = [compare.left, compare.comparators[0]]
    for literal, call in (sides, sides[::-1]):
        try:
            expected = ast.literal_eval(literal)
        except (ValueError, TypeError):
            continue
        try:
            ast.literal_eval(call)
        except (ValueError, TypeError):
            return ast.unparse(call), expected
    raise ValueError(f"code test {test!r} must compare one expression with one literal")


def code_tests(tests: Sequence) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """An example's code tests as (call, expected value) pairs and (stdin, stdout) cases.

    Each test is one of
      {"call": "solve(2)", "expected": 4}  an expression evaluated after the program; its value
                                           comes back as plain data and is compared here
      "assert solve(2) == 4"               the same, read with `ast` (the only statement form)
      {"input": "1 2\n", "output": "3"}    a run of its own with that stdin, passing when it exits
                                           0 and prints "output" (compared up to whitespace)
    Expected values must be plain data (`sandbox.plain_data`). A malformed test raises ValueError.
    """
    calls, cases = [], []
    for test in tests:
        if isinstance(test, str):
            call, expected = _parse_assert(test)
        elif isinstance(test, dict) and test.keys() == {"call", "expected"} and isinstance(test["call"], str):
            call, expected = test["call"], test["expected"]
            try:
                ast.parse(call, mode="eval")
            except SyntaxError as exc:
                raise ValueError(f"code test call {call!r} is not a Python expression: {exc.msg}") from None
        elif isinstance(test, dict) and test.keys() == {"input", "output"}:
            cases.append((str(test["input"]), str(test["output"])))
            continue
        else:
            raise ValueError(f"code test {test!r} is none of: an assert string, {{'call', 'expected'}}, "
                             "{'input', 'output'}")
        try:
            calls.append((call, plain_data(expected)))
        except ValueError as exc:
            raise ValueError(f"code test {test!r}: the expected value is {exc}") from None
    return calls, cases


def code_reward(completion: str, example: dict) -> float:
    """Share of `example["tests"]` (see `code_tests`) the extracted program passes.

    The program runs in the sandbox; call tests are judged here, outside it: a value counts only
    when it came back as plain data equal to the expected one, so exceptions, exits, forged output
    and objects that claim equality with anything all fail. `example.get("timeout", 5.0)` is the
    wall-clock limit per run (one run for all call tests, one per stdin case).
    """
    calls, cases = code_tests(example["tests"])
    code = extract_code(completion)
    if code is None or not (calls or cases):
        return 0.0
    timeout = float(example.get("timeout", 5.0))
    passed = 0
    if calls:
        result = run_python(code, [call for call, _ in calls], timeout=timeout)
        passed += sum(r.ok and values_equal(r.value, want) for r, (_, want) in zip(result.calls, calls, strict=True))
    for stdin, want in cases:
        result = run_python(code, stdin=stdin, timeout=timeout)
        passed += result.ok and result.stdout.split() == want.split()
    return passed / (len(calls) + len(cases))


@dataclass
class BatchScores:
    totals: list[float]  # weighted sum per completion
    per_function: dict[str, list[float]]  # unweighted score of each function per completion
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (index, function, error)


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))


def _score_one(fn: RewardFn, completion: str, example: dict) -> tuple[float, str | None]:
    try:
        score = float(fn(completion, example))
        if not math.isfinite(score):
            raise ValueError(f"non-finite reward {score}")
        return score, None
    except Exception as exc:  # noqa: BLE001 - a broken reward must not stop training
        return 0.0, repr(exc)


def _graded_part(fn: RewardFn) -> Callable[[str], str | None] | None:
    """The part of a completion that a reward which may run a program depends on (with the
    example), or None for the rewards that run nothing."""
    return {code_reward: extract_code, accuracy_reward: extract_answer}.get(fn)


def _scores(fn: RewardFn, completions: Sequence[str], examples: Sequence[dict],
            workers: int) -> list[tuple[float, str | None]]:
    """(score, error) per pair. A reward that may run a program grades equal (graded part, example)
    pairs once (a group of samples often repeats one answer) and the distinct ones concurrently:
    each run waits on its own process, so threads overlap them."""
    part = _graded_part(fn)
    if part is None or workers <= 1 or len(completions) < 2:
        return [_score_one(fn, c, ex) for c, ex in zip(completions, examples, strict=True)]
    owner: list[int] = []  # the index whose score each pair takes
    first: dict[str, int] = {}
    for i, (completion, example) in enumerate(zip(completions, examples, strict=True)):
        try:
            key = json.dumps([part(completion), example], sort_keys=True, default=repr)
        except (TypeError, ValueError):  # not text, or an example JSON cannot hold: graded on its own
            key = f"#{i}"
        owner.append(first.setdefault(key, i))
    unique = sorted(first.values())
    with ThreadPoolExecutor(min(workers, len(unique))) as pool:
        graded = dict(zip(unique, pool.map(lambda i: _score_one(fn, completions[i], examples[i]), unique)))
    return [graded[i] for i in owner]


def score_batch(funcs_with_weights: Sequence[tuple[RewardFn, float]], completions: Sequence[str],
                examples: Sequence[dict], workers: int = SANDBOX_WORKERS) -> BatchScores:
    """Apply each (reward function, weight) to every (completion, example) pair.

    A function that raises, or returns a non-finite or non-numeric value, scores 0 for that
    completion; the failure is logged and listed in `errors`, and scoring goes on. Rewards that may
    run a program grade each distinct (answer, example) once, `workers` at a time (see `_graded_part`).
    """
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    totals = [0.0] * len(completions)
    per_function: dict[str, list[float]] = {}
    errors: list[tuple[int, str, str]] = []
    for fn, weight in funcs_with_weights:
        name = _name(fn)
        while name in per_function:
            name += "'"
        scores = per_function[name] = []
        for i, (score, error) in enumerate(_scores(fn, completions, examples, workers)):
            if error is not None:
                log.warning("reward %s failed on completion %d: %s", name, i, error)
                errors.append((i, name, error))
            scores.append(score)
            totals[i] += weight * score
    return BatchScores(totals, per_function, errors)


REWARD_FUNCTIONS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward,
                                         "language": language_consistency_reward, "code": code_reward}
"""The text rewards by the name `grpo.reward_weights` gives them."""
REWARD_NAMES = (*REWARD_FUNCTIONS, "overlong")
"""Every name `grpo.reward_weights` may use; `overlong` weighs `overlong_penalty`, which reads a
token count rather than text, so the RL loop computes it."""
