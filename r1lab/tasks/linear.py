"""Linear equations in one unknown with an integer solution.

`difficulty` d (1..MAX_DIFFICULTY) sets the size of the numbers: the coefficient lies in
[2, 9 * d] and the solution and constants grow with 10**d. From difficulty 3 on, x appears on both
sides (`a x + b = d x + e`). The worked solution moves the constant, collects x and divides;
`solution_with_slips` may get one subtraction wrong by a digit, after which the division is done
honestly, so the final answer is wrong (and possibly a fraction). The grader accepts `5`, `x = 5`,
`5.0`, `10/2` and compares exactly with `Fraction`.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from r1lab.tasks.base import generate_split, slipped, strip_wrappers

NAME = "linear"
MAX_DIFFICULTY = 4
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(/[+-]?\d+)?")


def _term(coef: int) -> str:
    if coef == 1:
        return "x"
    if coef == -1:
        return "-x"
    return f"{coef}x"


def _side(coef: int, const: int) -> str:
    if coef == 0:
        return str(const)
    if const == 0:
        return _term(coef)
    return f"{_term(coef)} {'+' if const > 0 else '-'} {abs(const)}"


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _solve(a: int, b: int, d: int, e: int, rng: random.Random | None = None, slip_rate: float = 0.0) -> tuple[str, str]:
    """Worked solution of a x + b = d x + e; returns (text, final answer)."""
    lines = [f"Solve {_side(a, b)} = {_side(d, e)}."]
    coef = a - d
    if d != 0:
        move = f"Subtract {_term(d)} from" if d > 0 else f"Add {_term(-d)} to"
        lines.append(f"{move} both sides: {_side(coef, b)} = {e}.")
    rhs = slipped(e - b, rng, slip_rate)  # never touches rng when slip_rate is 0
    if b != 0:
        move = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
        op = "-" if b > 0 else "+"
        lines.append(f"{move} both sides: {_term(coef)} = {e} {op} {abs(b)} = {rhs}.")
    x = Fraction(rhs, coef)
    lines.append(f"Divide both sides by {coef}: x = {rhs} / {coef} = {_fraction_text(x)}.")
    return "\n".join(lines), _fraction_text(x)


def _draw(rng: random.Random, difficulty: int) -> tuple[str, dict]:
    big = 10**difficulty
    a = rng.randint(2, 9 * difficulty) * rng.choice([1, 1, -1])
    d = 0
    if difficulty >= 3:
        d = rng.randint(1, 9 * difficulty) * rng.choice([1, -1])
        if a - d in (0, 1):
            d = a - 2 if a - 2 != 0 else a + 3
    x = rng.randint(-big, big)
    b = rng.randint(-5 * big, 5 * big)
    e = (a - d) * x + b
    solution, answer = _solve(a, b, d, e)
    fields = {"prompt": f"Solve for x: {_side(a, b)} = {_side(d, e)}", "answer": answer,
              "solution": solution, "a": a, "b": b, "d": d, "e": e}
    return f"{a},{b},{d},{e}", fields


def generate(n: int, seed: int, split: str = "train", difficulty: int = 1) -> list[dict]:
    """n distinct equations of the given split, each with an integer solution."""
    return generate_split(NAME, MAX_DIFFICULTY, _draw, n, seed, split, difficulty)


def parse_value(answer_text: str) -> Fraction | None:
    """The number in `5`, `x = 5`, `x=-3/2`, `5.0`; None if it is anything else."""
    text = strip_wrappers(answer_text).replace(" ", "").replace("\u2212", "-")
    text = re.sub(r"^x=", "", text)
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def verify(answer_text: str, example: dict) -> bool:
    """True when the answer is exactly the solution x."""
    value = parse_value(answer_text)
    return value is not None and value == Fraction(example["answer"])


def solution_with_slips(example: dict, rng: random.Random, slip_rate: float) -> tuple[str, str]:
    """(worked solution, final answer); the subtraction step slips by a digit with slip_rate."""
    return _solve(example["a"], example["b"], example["d"], example["e"], rng, slip_rate)
