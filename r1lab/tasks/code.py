"""Small Python functions with tests, graded by running the answer's program in the sandbox.

A problem is a pipeline of steps applied to an integer `x` or to a list of integers `xs`, stated in
words ("add 4, then multiply by 3"); the answer is a one-line program, `def f(x): return (x+4)*3`.
`difficulty` d (1..MAX_DIFFICULTY) gives d + 1 steps. Integer steps: add, subtract, multiply,
floor-divide, remainder, square, absolute value, at least k (max), at most k (min). List steps: sort,
reverse, keep or drop the first k, and the reductions sum, length, largest, smallest, first and last
item, after which integer steps may follow. Adjacent steps that repeat or undo each other are not
drawn (x+3-5, sorted(xs[::-1])), nor pipelines whose value is the same for every test input or that
fail on one (`max` of an empty list).

Every example carries "tests" in the sandbox's format, `{"call": "f(2)", "expected": 18}`: five
calls, the first shown in the prompt as an example, four held out. The expected values come from
the steps' own Python functions in this module (trusted code); no program text is run to make them.
Train and test splits are decided by the gold program's text.

The worked solution restates the steps in the prompt's words, writes the expression after each step
with the parentheses precedence needs, and ends with the program:

    x: add 4, then multiply by 3
    add 4: x+4
    multiply by 3: (x+4)*3
    def f(x): return (x+4)*3

`solution_with_slips` goes wrong at each step with probability `slip_rate`, the way a programmer
does: kind "constant" writes a constant off by one, "operator" the neighbouring operation (x-4 for
x+4, x*2 for x**2, min for max, forgetting abs), "parens" leaves out parentheses precedence needs
(x+4*3); "any" picks one of those that apply. Later steps build on the slip.

Grading: `verify` runs the answer's program in `r1lab.sandbox` with the example's calls and compares
the values here, as `rewards.code_reward` does; it is True only when every test passes. An answer
whose syntax tree equals the gold program's is the gold program, whose values are the expected ones
by construction, so it is accepted without a run: that keeps corpus building and tests fast, and no
answer text is ever executed outside the sandbox. This module knows no rewards and no model.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from r1lab.sandbox import run_python, values_equal
from r1lab.tasks.base import generate_split

NAME = "code"
MAX_DIFFICULTY = 4
KINDS = ("int", "list")
SLIP_KINDS = ("any", "constant", "operator", "parens")
N_TESTS = 5  # calls per problem: the first is the prompt's example, the others are held out
TIMEOUT = 5.0  # wall-clock seconds of one sandboxed run of all the calls
MAX_PROGRAM_CHARS = 2000  # a longer answer is not parsed for the gold comparison (it still runs)

# Python's precedence levels that matter here; higher binds tighter.
SUM, PRODUCT, POWER, ATOM = 5, 6, 8, 10


@dataclass(frozen=True)
class Op:
    """One step: its words, its code, its precedence and its meaning."""

    name: str
    takes: str  # "int" or "list"
    gives: str
    words: str  # the step in words, "{k}" standing for the constant
    code: str  # the expression, "{e}" standing for the operand and "{k}" for the constant
    binds: int  # precedence of the result
    needs: int  # the operand is parenthesised when its precedence is below this
    fn: Callable  # (value, k) -> value: the step's meaning, used to compute expected values
    ks: tuple[int, ...] = ()  # the constants it is drawn with (empty: it takes none)
    swap: str = ""  # the op an "operator" slip writes instead ("" forgets the step)


_OPS = {op.name: op for op in (
    Op("add", "int", "int", "add {k}", "{e}+{k}", SUM, SUM, lambda v, k: v + k, tuple(range(1, 21)), "sub"),
    Op("sub", "int", "int", "subtract {k}", "{e}-{k}", SUM, SUM, lambda v, k: v - k, tuple(range(1, 21)), "add"),
    Op("mul", "int", "int", "multiply by {k}", "{e}*{k}", PRODUCT, PRODUCT, lambda v, k: v * k,
       tuple(range(2, 13)), "div"),
    Op("div", "int", "int", "floor-divide by {k}", "{e}//{k}", PRODUCT, PRODUCT, lambda v, k: v // k,
       tuple(range(2, 13)), "mul"),
    Op("mod", "int", "int", "take the remainder mod {k}", "{e}%{k}", PRODUCT, PRODUCT, lambda v, k: v % k,
       tuple(range(2, 13)), "div"),
    Op("square", "int", "int", "square it", "{e}**2", POWER, POWER + 1, lambda v, k: v**2, (), "double"),
    Op("abs", "int", "int", "take the absolute value", "abs({e})", ATOM, 0, lambda v, k: abs(v)),
    Op("atleast", "int", "int", "make it at least {k}", "max({e},{k})", ATOM, 0, lambda v, k: max(v, k),
       tuple(range(-5, 16)), "atmost"),
    Op("atmost", "int", "int", "make it at most {k}", "min({e},{k})", ATOM, 0, lambda v, k: min(v, k),
       tuple(range(-5, 16)), "atleast"),
    Op("sort", "list", "list", "sort it", "sorted({e})", ATOM, 0, lambda v, k: sorted(v), (), "reverse"),
    Op("reverse", "list", "list", "reverse it", "{e}[::-1]", ATOM, ATOM, lambda v, k: v[::-1], (), "sort"),
    Op("take", "list", "list", "keep the first {k}", "{e}[:{k}]", ATOM, ATOM, lambda v, k: v[:k], (1, 2, 3), "drop"),
    Op("drop", "list", "list", "drop the first {k}", "{e}[{k}:]", ATOM, ATOM, lambda v, k: v[k:], (1, 2), "take"),
    Op("sum", "list", "int", "sum it", "sum({e})", ATOM, 0, lambda v, k: sum(v), (), "len"),
    Op("len", "list", "int", "count the items", "len({e})", ATOM, 0, lambda v, k: len(v), (), "sum"),
    Op("largest", "list", "int", "take the largest", "max({e})", ATOM, 0, lambda v, k: max(v), (), "smallest"),
    Op("smallest", "list", "int", "take the smallest", "min({e})", ATOM, 0, lambda v, k: min(v), (), "largest"),
    Op("first", "list", "int", "take the first item", "{e}[0]", ATOM, ATOM, lambda v, k: v[0], (), "last"),
    Op("last", "list", "int", "take the last item", "{e}[-1]", ATOM, ATOM, lambda v, k: v[-1], (), "first"),
    # only ever written by a slip (x*2 for x**2), never drawn
    Op("double", "int", "int", "double it", "{e}*2", PRODUCT, PRODUCT, lambda v, k: v * 2),
)}
_DRAWN = [op for op in _OPS.values() if op.name != "double"]
# adjacent steps that repeat or undo each other, or make the first one pointless
_REDUNDANT = frozenset({("add", "sub"), ("sub", "add"), ("reverse", "sort"), ("abs", "square"), ("square", "abs")})
_ARG = {"int": "x", "list": "xs"}
_ARG_WORDS = {"int": "an integer x", "list": "a list of integers xs"}


def _words(name: str, k: int | None) -> str:
    return _OPS[name].words.format(k=k)


def _render(name: str, k: int | None, expr: str, binds: int, parens: bool = True) -> tuple[str, int]:
    """The expression after step `name` and its precedence; parens=False forgets needed parentheses."""
    op = _OPS[name]
    if binds < op.needs and parens:
        expr = f"({expr})"
    elif binds < op.needs:  # written without them, the step's operator binds only the operand's last term
        return op.code.format(e=expr, k=k), min(op.binds, binds)
    return op.code.format(e=expr, k=k), op.binds


def _slip(name: str, k: int | None, binds: int, rng: random.Random, kind: str) -> tuple[str, int | None, bool]:
    """What a slipped step writes instead: (op name, constant, parenthesise)."""
    op = _OPS[name]
    choices = []
    if op.ks:
        choices.append("constant")
    choices.append("operator")
    if binds < op.needs:
        choices.append("parens")
    if kind != "any":
        if kind not in choices:
            return name, k, True
        choices = [kind]
    chosen = rng.choice(choices)
    if chosen == "constant":
        wrong = k + rng.choice([-1, 1])
        if wrong < min(op.ks) and name not in ("atleast", "atmost"):  # x*1 or x%1 is no plausible slip
            wrong = k + 1
        return name, wrong, True
    if chosen == "parens":
        return name, k, False
    if not op.swap:
        return "", None, True
    return op.swap, k if _OPS[op.swap].ks else None, True


def _write(kind: str, steps: list[tuple[str, int | None]], rng: random.Random | None = None, rate: float = 0.0,
           slip_kind: str = "any") -> tuple[str, str]:
    """(worked solution, program) for the steps, each slipping with probability `rate`."""
    arg = _ARG[kind]
    expr, binds = arg, ATOM
    lines = [f"{arg}: {', then '.join(_words(n, k) for n, k in steps)}"]  # the prompt's words, verbatim
    for name, k in steps:
        wrote, wk, parens = name, k, True
        if rng is not None and rate > 0 and rng.random() < rate:
            wrote, wk, parens = _slip(name, k, binds, rng, slip_kind)
        if wrote:
            expr, binds = _render(wrote, wk, expr, binds, parens)
        lines.append(f"{_words(name, k)}: {expr}")
    program = f"def f({arg}): return {expr}"
    lines.append(program)
    return "\n".join(lines), program


def _inputs(kind: str, rng: random.Random) -> list:
    if kind == "int":
        return rng.sample(range(-10, 21), N_TESTS)
    return [[rng.randint(-9, 20) for _ in range(rng.randint(4, 7))] for _ in range(N_TESTS)]


def _expected(steps: list[tuple[str, int | None]], inputs: list) -> list | None:
    """The pipeline's value on each input (trusted code: the steps' functions), or None when a
    step fails on an input or every input gives the same value."""
    values = []
    for value in inputs:
        try:
            for name, k in steps:
                value = _OPS[name].fn(value, k)
        except (ValueError, IndexError, ZeroDivisionError):
            return None
        values.append(value)
    return values if any(v != values[0] for v in values) else None


def _steps(kind: str, n: int, rng: random.Random) -> list[tuple[str, int | None]]:
    steps: list[tuple[str, int | None]] = []
    current = kind
    for _ in range(n):
        last = steps[-1][0] if steps else ""
        ops = [op for op in _DRAWN if op.takes == current and op.name != last and (last, op.name) not in _REDUNDANT]
        op = rng.choice(ops)
        steps.append((op.name, rng.choice(op.ks) if op.ks else None))
        current = op.gives
    return steps


def _draw(rng: random.Random, difficulty: int, kinds: tuple[str, ...]) -> tuple[str, dict]:
    while True:
        kind = rng.choice(kinds)
        steps = _steps(kind, difficulty + 1, rng)
        inputs = _inputs(kind, rng)
        expected = _expected(steps, inputs)
        if expected is not None:
            break
    solution, program = _write(kind, steps)
    calls = [f"f({value!r})" for value in inputs]
    tests = [{"call": c, "expected": v} for c, v in zip(calls, expected, strict=True)]
    prompt = (f"Write a Python function f({_ARG[kind]}) for {_ARG_WORDS[kind]} that does: "
              f"{', then '.join(_words(n, k) for n, k in steps)}. Example: {calls[0]} == {expected[0]!r}")
    fields = {"prompt": prompt, "answer": program, "solution": solution, "tests": tests, "kind": kind,
              "steps": [[n, k] for n, k in steps]}
    return program, fields


def generate(n: int, seed: int, split: str = "train", difficulty: int = 1,
             kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """n distinct problems of difficulty + 1 steps on the given argument kinds ("int", "list")."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    return generate_split(NAME, MAX_DIFFICULTY, _draw, n, seed, split, difficulty, kinds=tuple(kinds))


_BOXED = re.compile(r"\\boxed\{(.*)\}", re.S)
_FENCED = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)


def program_of(answer_text: str) -> str | None:
    """The program in a final answer: the text itself, unwrapped from `\\boxed{}` or a code fence."""
    text = answer_text.strip()
    for pattern in (_BOXED, _FENCED):
        match = pattern.fullmatch(text)
        if match:
            text = match.group(1).strip()
    return text or None


def same_program(program: str, gold: str) -> bool:
    """Whether `program` parses to the gold program's syntax tree (spacing and comments aside).
    Parsing runs nothing."""
    if len(program) > MAX_PROGRAM_CHARS:
        return False
    try:
        return ast.dump(ast.parse(program)) == ast.dump(ast.parse(gold))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def passed_tests(program: str, example: dict) -> list[bool]:
    """Whether each of the example's tests passes, the program run once in the sandbox for all of
    them. Raises `sandbox.SandboxError` when no sandbox can be set up."""
    tests = example["tests"]
    run = run_python(program, [t["call"] for t in tests], timeout=float(example.get("timeout", TIMEOUT)))
    return [r.ok and values_equal(r.value, t["expected"]) for r, t in zip(run.calls, tests, strict=True)]


def verify(answer_text: str, example: dict) -> bool:
    """True when the answer's program passes every test (the gold program itself is not rerun)."""
    program = program_of(answer_text)
    if program is None:
        return False
    return same_program(program, example["answer"]) or all(passed_tests(program, example))


def solution_with_slips(example: dict, rng: random.Random, slip_rate: float, kind: str = "any") -> tuple[str, str]:
    """(worked solution, the program it ends with); each step slips with `slip_rate` (see the module)."""
    if kind not in SLIP_KINDS:
        raise ValueError(f"slip kind must be one of {SLIP_KINDS}, got {kind!r}")
    steps = [(n, k) for n, k in example["steps"]]
    return _write(example["kind"], steps, rng, slip_rate, kind)
