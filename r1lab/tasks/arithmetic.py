"""Multi-digit arithmetic: addition, subtraction and multiplication with carries and borrows.

`difficulty` is the number of digits of each operand (1..MAX_DIFFICULTY). Subtraction keeps the
larger operand first, so answers are never negative. The worked solution is a column scratchpad
that works from the right and, on every line, prepends the new digit to the result so far; the last
line holds the whole answer, so the final read-back is a copy, not a reversal:

    478 + 356
    col 1: 8 + 6 = 14, write 4 carry 1 -> 4
    col 2: 7 + 5 + 1 = 13, write 3 carry 1 -> 34
    col 3: 4 + 3 + 1 = 8, write 8 carry 0 -> 834
    result: 834

The same steps in `notation="compact"` (about half the tokens, for small CPU runs):

    478+356
    8+6=14 c1 4
    7+5+1=13 c1 34
    4+3+1=8 c0 834
    =834

`solution_with_slips` writes the same scratchpad but, with probability `slip_rate` per column,
writes a wrong digit (kind "digit") or forgets a carry or borrow (kind "carry") and carries on from
it, so the final answer is wrong the way real scratch work goes wrong. The grader is exact integer
comparison.
"""

from __future__ import annotations

import random
from itertools import zip_longest

from r1lab.tasks.base import digits, generate_split, parse_int, strip_wrappers

NAME = "arithmetic"
MAX_DIFFICULTY = 6
OPS = ("+", "-", "*")


class _Slips:
    """Where a worked solution goes wrong: `digit` writes a digit off by one; `carry` forgets a
    carry (or borrow) that should have moved to the next column. Each with probability `rate`."""

    def __init__(self, rng: random.Random | None = None, rate: float = 0.0, kind: str = "digit"):
        if kind not in SLIP_KINDS:
            raise ValueError(f"slip kind must be one of {SLIP_KINDS}, got {kind!r}")
        self.rng, self.rate, self.kind = rng, rate, kind

    def _hit(self, kind: str) -> bool:
        return self.kind == kind and self.rng is not None and self.rate > 0 and self.rng.random() < self.rate

    def digit(self, digit: int) -> int:
        return (digit + self.rng.choice([1, 9])) % 10 if self._hit("digit") else digit

    def carry(self, carry: int) -> int:
        return 0 if carry and self._hit("carry") else carry


SLIP_KINDS = ("digit", "carry")
_NO_SLIPS = _Slips()


class _Notation:
    """How the scratchpad's lines are written; the steps are the same in every notation."""

    def __init__(self, long: bool):
        self.long = long

    def op(self, x: int, sign: str, y: int) -> str:
        return f"{x} {sign} {y}" if self.long else f"{x}{sign}{y}"

    def column(self, i: int, terms: str, total: int, digit: int, written: int, sofar: str, word: str = "carry") -> str:
        if self.long:
            return f"col {i + 1}: {terms} = {total}, write {digit} {word} {written} -> {sofar}"
        return f"{terms}={total} {word[0]}{written} {sofar}"

    def borrowed(self, i: int, terms: str, dx: int, taken: int, digit: int, written: int, sofar: str) -> str:
        if self.long:
            return (f"col {i + 1}: {terms} is negative, borrow: {dx + 10} - {taken} = "
                    f"{digit}, write {digit} borrow {written} -> {sofar}")
        return f"{terms}<0: {dx + 10}-{taken}={digit} b{written} {sofar}"

    def last_carry(self, carry: int, sofar: str) -> str:
        return f"carry {carry} -> {sofar}" if self.long else f"c{carry} {sofar}"

    def result(self, value: int) -> str:
        return f"result: {value}" if self.long else f"={value}"

    def partial(self, index: int, value: int) -> str:
        return f"partial {index}: {value}" if self.long else f"p{index}={value}"


NOTATIONS = {"long": _Notation(True), "compact": _Notation(False)}


def _terms(note: _Notation, *parts: int | str) -> str:
    return (" " if note.long else "").join(str(p) for p in parts)


def _carried(lines: list[str], xs: list[int], sign: str, ys: list[int], slip: _Slips, note: _Notation) -> int:
    """Write the columns of an addition (sign "+") or of a one-digit multiplication (sign "*"), digits
    from the right, each written digit and carry possibly slipped; return the value written."""
    sofar, carry = "", 0
    for i, (dx, dy) in enumerate(zip_longest(xs, ys, fillvalue=0)):
        terms = _terms(note, dx, sign, dy, *(("+", carry) if carry else ()))
        total = (dx + dy if sign == "+" else dx * dy) + carry
        digit = slip.digit(total % 10)
        sofar = f"{digit}{sofar}"
        written = slip.carry(total // 10)
        lines.append(note.column(i, terms, total // 10 * 10 + digit, digit, written, sofar))
        carry = written
    if carry:
        sofar = f"{carry}{sofar}"
        lines.append(note.last_carry(carry, sofar))
    return int(sofar)


def _add_lines(x: int, y: int, slip, note: _Notation) -> tuple[list[str], int]:
    lines = [note.op(x, "+", y)]
    value = _carried(lines, digits(x), "+", digits(y), slip, note)
    lines.append(note.result(value))
    return lines, value


def _sub_lines(x: int, y: int, slip, note: _Notation) -> tuple[list[str], int]:
    xs, ys = digits(x), digits(y)
    lines, sofar, borrow = [note.op(x, "-", y)], "", 0
    for i, dx in enumerate(xs):
        dy = ys[i] if i < len(ys) else 0
        terms = _terms(note, dx, "-", dy, *(("-", borrow) if borrow else ()))
        if dx - dy - borrow < 0:
            digit = slip.digit(dx + 10 - dy - borrow)
            sofar = f"{digit}{sofar}"
            written = slip.carry(1)
            lines.append(note.borrowed(i, terms, dx, dy + borrow, digit, written, sofar))
            borrow = written
        else:
            digit = slip.digit(dx - dy - borrow)
            sofar = f"{digit}{sofar}"
            lines.append(note.column(i, terms, digit, digit, 0, sofar, word="borrow"))
            borrow = 0
    value = int(sofar)
    lines.append(note.result(value))
    return lines, value


def _mul_digit_lines(x: int, d: int, shift: int, slip, note: _Notation) -> tuple[list[str], int]:
    head = note.op(x, "*", d) + ((f", shifted by {shift}" if note.long else f" <<{shift}") if shift else "")
    if d == 0:
        return [f"{head}: 0", note.partial(shift + 1, 0)], 0
    lines = [head]
    value = _carried(lines, digits(x), "*", [d] * len(str(x)), slip, note) * 10**shift
    lines.append(note.partial(shift + 1, value))
    return lines, value


def _mul_lines(x: int, y: int, slip, note: _Notation) -> tuple[list[str], int]:
    lines = [note.op(x, "*", y)]
    partials = []
    for shift, d in enumerate(digits(y)):
        part_lines, part = _mul_digit_lines(x, d, shift, slip, note)
        lines += part_lines
        partials.append(part)
    total = partials[0]
    for part in partials[1:]:
        add, total = _add_lines(total, part, slip, note)
        lines += add
    if len(partials) == 1:
        lines.append(note.result(total))
    return lines, total


def _solve(a: int, op: str, b: int, slip, notation: str = "long") -> tuple[str, int]:
    fn = {"+": _add_lines, "-": _sub_lines, "*": _mul_lines}[op]
    lines, value = fn(a, b, slip, NOTATIONS[notation])
    return "\n".join(lines), value


def _draw(rng: random.Random, difficulty: int, ops: tuple[str, ...], notation: str) -> tuple[str, dict]:
    lo, hi = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty - 1
    op = rng.choice(ops)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "-" and a < b:
        a, b = b, a
    solution, value = _solve(a, op, b, _NO_SLIPS, notation)
    fields = {"prompt": f"What is {a} {op} {b}?", "answer": str(value), "solution": solution,
              "a": a, "b": b, "op": op, "notation": notation}
    return f"{a}{op}{b}", fields


def generate(n: int, seed: int, split: str = "train", difficulty: int = 1,
             ops: tuple[str, ...] = OPS, notation: str = "long") -> list[dict]:
    """n distinct problems `a op b` of the given split; operands have `difficulty` digits.

    `notation` is how the worked solution is written: "long" or "compact" (same steps, fewer tokens).
    """
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
    if notation not in NOTATIONS:
        raise ValueError(f"notation must be one of {tuple(NOTATIONS)}, got {notation!r}")
    return generate_split(NAME, MAX_DIFFICULTY, _draw, n, seed, split, difficulty, ops=tuple(ops), notation=notation)


def verify(answer_text: str, example: dict) -> bool:
    """True when the answer is the exact integer result (commas and '.0' tolerated)."""
    value = parse_int(strip_wrappers(answer_text))
    return value is not None and value == int(example["answer"])


def solution_with_slips(example: dict, rng: random.Random, slip_rate: float,
                        kind: str = "digit") -> tuple[str, str]:
    """(worked solution, the final answer it reaches), in the example's notation. kind "digit": each
    written digit is off by one with probability slip_rate; kind "carry": each carry or borrow is
    forgotten with it."""
    solution, value = _solve(example["a"], example["op"], example["b"], _Slips(rng, slip_rate, kind),
                             example.get("notation", "long"))
    return solution, str(value)
