"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

`difficulty` d gives d + 2 numbers (1..MAX_DIFFICULTY). Every problem is built from a hidden
expression over some of the numbers whose intermediate results are positive integers, so it is
solvable; the gold answer is that expression, but ANY valid expression is accepted.

The grader parses the answer with `ast` (never `eval`): only integer literals, parentheses and the
four binary operators are allowed, each literal must be one of the given numbers (a number given
twice may be used twice), and the value is computed with exact `Fraction` arithmetic, so
`(7 / 2) * 4 = 14` is exact and division by zero is a rejection. A trailing `= target` is allowed.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from r1lab.tasks.base import generate_split, strip_wrappers

NAME = "countdown"
MAX_DIFFICULTY = 4
MAX_ANSWER_CHARS = 300  # longer answers are rejected before parsing
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_SMALL = list(range(1, 11))
_LARGE = [25, 50, 75, 100]


def _apply(op: str, x: Fraction, y: Fraction) -> Fraction | None:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return None if y == 0 else x / y


def _build(numbers: list[int], rng: random.Random) -> tuple[str, int]:
    """Combine the numbers pairwise at random, keeping every intermediate a positive integer.

    Returns (expression, value). Pairs that would leave the positive integers are redrawn.
    """
    items = [(str(x), x) for x in numbers]
    while len(items) > 1:
        for _ in range(50):
            i, j = rng.sample(range(len(items)), 2)
            (ex, x), (ey, y) = items[i], items[j]
            op = rng.choice("+-*/")
            if op == "-" and x <= y or op == "/" and (y == 1 or x % y) or op == "*" and 1 in (x, y):
                continue
            value = int(_apply(op, Fraction(x), Fraction(y)))
            break
        else:
            op, value = "+", x + y
        rest = [it for k, it in enumerate(items) if k not in (i, j)]
        items = rest + [(f"({ex} {op} {ey})", value)]
    expr, value = items[0]
    if expr.startswith("(") and expr.endswith(")"):
        expr = expr[1:-1]
    return expr, value


def _draw(rng: random.Random, difficulty: int) -> tuple[str, dict]:
    count = difficulty + 2
    while True:
        n_large = rng.choice([0, 1]) if count < 5 else rng.choice([0, 1, 2])
        numbers = rng.sample(_LARGE, n_large) + [rng.choice(_SMALL) for _ in range(count - n_large)]
        rng.shuffle(numbers)
        used = rng.sample(numbers, rng.randint(max(2, count - 1), count))
        expr, target = _build(used, rng)
        if 10 <= target <= 999 and target not in numbers:
            break
    canonical = ",".join(map(str, sorted(numbers))) + f"->{target}"
    listed = ", ".join(map(str, numbers))
    solution = _worked(f"Numbers: {listed}. Target: {target}.", expr, target)
    fields = {"prompt": f"Using the numbers {listed}, each at most once, and + - * /, make {target}.",
              "answer": expr, "solution": solution, "numbers": numbers, "target": target}
    return canonical, fields


def generate(n: int, seed: int, split: str = "train", difficulty: int = 1) -> list[dict]:
    """n distinct countdown problems of the given split with difficulty + 2 numbers each."""
    return generate_split(NAME, MAX_DIFFICULTY, _draw, n, seed, split, difficulty)


def evaluate(expression: str, numbers: list[int]) -> Fraction | None:
    """The exact value of an arithmetic expression over the given numbers, or None if invalid.

    Invalid: not parseable, any node other than +, -, *, / on integer literals, a literal that is
    not among the numbers (or used more often than given), division by zero, or too long.
    """
    text = expression.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-")
    if len(text) > MAX_ANSWER_CHARS:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    available = Counter(numbers)

    def walk(node: ast.AST) -> Fraction | None:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            return _apply(_OPS[type(node.op)], left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if available[node.value] <= 0:
                return None
            available[node.value] -= 1
            return Fraction(node.value)
        return None

    return walk(tree.body)


def verify(answer_text: str, example: dict) -> bool:
    """True when the answer is an expression over the given numbers equal to the target."""
    text = strip_wrappers(answer_text)
    target = int(example["target"])
    if "=" in text:
        head, _, tail = text.rpartition("=")
        if tail.strip() != str(target):
            return False
        text = head
    value = evaluate(text, list(example["numbers"]))
    return value is not None and value == target


def _steps(expression: str) -> list[tuple[str, Fraction]]:
    """The binary operations of a valid expression in evaluation order: (text, value) pairs."""
    steps: list[tuple[str, Fraction]] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        op = _OPS[type(node.op)]
        value = _apply(op, left, right)
        steps.append((f"{left} {op} {right}", value))
        return value

    walk(ast.parse(expression, mode="eval").body)
    return steps


def _worked(head: str, expression: str, target: int) -> str:
    """The head line, one line per step (the last one claiming the target) and the closing line."""
    *steps, (last, _) = _steps(expression)
    return "\n".join([head, *(f"{text} = {value}" for text, value in steps), f"{last} = {target}",
                      f"That reaches {target}: {expression} = {target}"])


def solution_with_slips(example: dict, rng: random.Random, slip_rate: float) -> tuple[str, str]:
    """(worked solution, final expression). With probability slip_rate one operator is
    miswritten; the steps follow the wrong expression honestly until the last, whose result is
    misreported as the target, so the reasoning looks done but the answer is wrong."""
    expr, target = example["answer"], example["target"]
    if rng.random() >= slip_rate:
        return example["solution"], expr
    spots = [k for k, ch in enumerate(expr) if ch in "+-*"]
    if not spots:
        return example["solution"], expr
    k = rng.choice(spots)
    wrong = expr[:k] + rng.choice([op for op in "+-*" if op != expr[k]]) + expr[k + 1:]
    value = evaluate(wrong, list(example["numbers"]))
    if value is None or value == target:
        return example["solution"], expr
    return _worked(example["solution"].splitlines()[0], wrong, target), wrong
