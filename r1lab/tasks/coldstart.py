"""Cold-start conversations: a family's worked solutions rewritten for a human reader, R1-style.

R1's first stage fine-tunes the base on a few thousand long, readable chains of thought before any
RL, so that what RL starts from already writes reasoning a person can follow. Here the chains come
from the task families' own worked solutions: `readable_reasoning(example)` renders one in short
English sentences (arithmetic's column scratchpad becomes "Tens: 7 + 5 + 1 = 13, write 3, carry 1.",
whatever notation the corpus used), and `cold_start_completion` wraps it as

    <think>
    {readable reasoning}
    {a one-line summary}
    </think>
    <answer>{answer}</answer>

With style "corpus" the reasoning is instead the family's own worked solution, in the notation the
pretraining corpus used (arithmetic's compact `68+69`, `8+9=17 c1 7`, ...), right after `<think>` as
in the corpus, then one English sentence that states the result (`So the answer is 137.`): every
word of the chain of thought is English, while a base pretrained on that notation keeps the method
it learned. A tiny base does not survive anything else. With sentences before the work ("Add 20 and
87 column by column") 100 SFT steps taught it to miscopy the operands ("Add 30 and 27"), and greedy
pass@1 fell from 22% to 1%, as with the readable style. A summary that restated the problem
(`So 68 + 69 = 137.`) had the same fault at the end: the tiny model wrote made-up operands in all
200 held-out greedy replies and copied its answer from that line, wrongly in 42% of them (greedy
pass@1 39%); stating only the result (`So the sum is 137.`), the same base and SFT reached 75%.

The summary closes the think block instead of following it, as R1's own template does: the format
reward (`rewards.format_reward`, shared by R1-Zero RL and evaluation) accepts only whitespace
between ``</think>`` and ``<answer>``, and a cold-start model must score on the rewards its later
RL stage and evaluation use. Under the "r1" chat template the prompt already opens ``<think>\\n``;
`tokenizer.render_conversation` drops that prefix from the assistant turn, so what the model learns
to write scores 1 on format (with ``think_opened``) and on accuracy.

This module knows the task families and text; it knows no tokenizer, no template ids and no model.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import zip_longest

from r1lab.tasks import get_family
from r1lab.tasks.base import digits

_PLACES = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands")


def _place(i: int) -> str:
    return _PLACES[i] if i < len(_PLACES) else f"Column {i + 1}"


def _carried(intro: str, xs: list[int], sign: str, ys: list[int]) -> list[str]:
    """An addition (sign "+") or a one-digit multiplication (sign "*") column by column: each column's
    sum, the digit written and the carry."""
    lines, carry = [intro], 0
    for i, (dx, dy) in enumerate(zip_longest(xs, ys, fillvalue=0)):
        total = (dx + dy if sign == "+" else dx * dy) + carry
        terms = f"{dx} {sign} {dy}" + (f" + {carry}" if carry else "")
        carried = f", carry {total // 10}." if total >= 10 else "."
        lines.append(f"{_place(i)}: {terms} = {total}, write {total % 10}{carried}")
        carry = total // 10
    if carry:
        lines.append(f"The last carry {carry} is the leading digit.")
    return lines


def _add_steps(a: int, b: int) -> list[str]:
    return _carried(f"Add {a} and {b} column by column, from the right.", digits(a), "+", digits(b))


def _sub_steps(a: int, b: int) -> list[str]:
    xs, ys = digits(a), digits(b)
    lines, borrow = [f"Subtract {b} from {a} column by column, from the right."], 0
    for i, dx in enumerate(xs):
        dy = ys[i] if i < len(ys) else 0
        if i >= len(ys) and not borrow:
            lines.append(f"{_place(i)}: {dx} comes down.")
            continue
        rest = f" - {dy}" + (f" - {borrow}" if borrow else "")
        value = dx - dy - borrow
        if value < 0:
            lines.append(f"{_place(i)}: {dx}{rest} is below 0, so borrow 10: {dx + 10}{rest} = {value + 10}.")
            borrow = 1
        else:
            lines.append(f"{_place(i)}: {dx}{rest} = {value}.")
            borrow = 0
    return lines


def _mul_steps(a: int, b: int) -> list[str]:
    if b < 10:
        return _carried(f"Multiply {a} by {b} digit by digit, from the right.", digits(a), "*", [b] * len(str(a)))
    lines, partials = [f"Multiply {a} by each digit of {b}, from the right."], []
    for shift, d in enumerate(digits(b)):
        partial = a * d
        partials.append(partial * 10**shift)
        scaled = f", times {10**shift} is {partial * 10**shift}" if shift and partial else ""
        lines.append(f"{a} * {d} = {partial}{scaled}.")
    lines.append(f"Add the partial products: {' + '.join(map(str, partials))} = {sum(partials)}.")
    return lines


def _arithmetic(ex: dict) -> tuple[list[str], str]:
    a, op, b = ex["a"], ex["op"], ex["b"]
    steps = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[op](a, b)
    return steps, f"So {a} {op} {b} = {ex['answer']}."


def _countdown(ex: dict) -> tuple[list[str], str]:
    # The worked solution is "Numbers: ... Target: T.", one "x op y = v" line per step, "That reaches T: ...".
    steps = ex["solution"].splitlines()[1:-1]
    lines = [f"Make {ex['target']} from {', '.join(map(str, ex['numbers']))}, each number at most once."]
    for i, step in enumerate(steps):
        word = "First" if i == 0 else "Finally" if i == len(steps) - 1 else "Then"
        lines.append(f"{word}, {step}." if len(steps) > 1 else f"{step}.")
    return lines, f"So {ex['answer']} = {ex['target']}."


def _linear(ex: dict) -> tuple[list[str], str]:
    # Already sentences ("Add 14 to both sides: -7x = -84 + 14 = -70.").
    return ex["solution"].splitlines(), f"So x = {ex['answer']}."


def _sorting(ex: dict) -> tuple[list[str], str]:
    left, ordered = list(ex["items"]), [w.strip() for w in ex["answer"].split(",")]
    lines = ["Take the alphabetically first word each time."]
    for pick in ordered:
        lines.append(f"Of {', '.join(left)}, {pick} comes first." if len(left) > 1 else f"{pick} is last.")
        left.remove(pick)
    return lines, f"So the order is {ex['answer']}."


def _code(ex: dict) -> tuple[list[str], str]:
    # The worked solution is "x: step, then step", one "step words: expression" line per step, the program.
    head, *steps, program = ex["solution"].splitlines()
    arg = head.split(":", 1)[0]
    lines = [f"Start from {arg} and apply the steps in order."]
    lines += [f"{s[0].upper()}{s[1:]}." for s in steps]
    return lines, f"So the function is {program}."


READABLE: dict[str, Callable[[dict], tuple[list[str], str]]] = {
    "arithmetic": _arithmetic,
    "code": _code,
    "countdown": _countdown,
    "linear": _linear,
    "sorting": _sorting,
}
"""Per family: example -> (reasoning lines, one-line summary). Every family in `FAMILIES` has one."""


STYLES = ("readable", "corpus")
"""How a cold-start turn reasons: in sentences, or in the corpus's own worked solution (module docstring)."""


def readable_reasoning(example: dict) -> str:
    """The example's worked solution as short sentences, ending in a one-line summary."""
    family = example.get("family")
    if family not in READABLE:
        raise ValueError(f"no readable reasoning for task family {family!r}; known: {', '.join(sorted(READABLE))}")
    lines, summary = READABLE[family](example)
    return "\n".join([*lines, summary])


def corpus_reasoning(example: dict) -> str:
    """The example's worked solution as the corpus writes it, then a sentence stating its result."""
    return "\n".join([*example["solution"].splitlines(), f"So the answer is {example['answer']}."])


def cold_start_completion(example: dict, style: str = "readable") -> str:
    """The R1-format assistant turn: the reasoning (in `style`) and its summary in <think>, then the answer."""
    if style not in STYLES:
        raise ValueError(f"cold-start style must be one of {', '.join(STYLES)}, got {style!r}")
    reasoning = readable_reasoning(example) if style == "readable" else corpus_reasoning(example)
    return f"<think>\n{reasoning}\n</think>\n<answer>{example['answer']}</answer>"


def cold_start_conversations(task: str, n: int, seed: int, difficulty: int = 1, style: str = "readable",
                             **options) -> list[list[dict[str, str]]]:
    """n conversations [user prompt, cold-start assistant turn in `style`] from the family's train split.

    `options` are the family's `generate` options (data.task_options). A problem space too small for
    n distinct problems raises the family's ValueError.
    """
    examples = get_family(task).generate(n, seed=seed, split="train", difficulty=difficulty, **options)
    return [[{"role": "user", "content": ex["prompt"]},
             {"role": "assistant", "content": cold_start_completion(ex, style)}] for ex in examples]
