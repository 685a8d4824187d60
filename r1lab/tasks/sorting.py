"""Sorting words alphabetically: a non-math family whose grader is exact list equality.

Words are made-up, pronounceable lowercase strings (consonant-vowel syllables), so the skill is the
comparison itself, not memorised vocabulary. `difficulty` d (1..MAX_DIFFICULTY) gives 2 + 2 d
words, and from difficulty 3 on the words share prefixes so that later letters decide the order.
The worked solution is a selection sort: list what is left, pick the first word, repeat.
`solution_with_slips` sometimes picks the second word instead, giving a wrongly ordered answer.
The grader accepts the words separated by commas or spaces, in any letter case, with optional
brackets or quotes.
"""

from __future__ import annotations

import random
import re

from r1lab.tasks.base import generate_split, strip_wrappers

NAME = "sorting"
MAX_DIFFICULTY = 5
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


def _word(rng: random.Random, syllables: int) -> str:
    parts = []
    for _ in range(syllables):
        part = rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
        if rng.random() < 0.3:
            part += rng.choice(_CONSONANTS)
        parts.append(part)
    return "".join(parts)


def _words(rng: random.Random, count: int, difficulty: int) -> list[str]:
    prefixes = [_word(rng, 1) for _ in range(2)] if difficulty >= 3 else [""]
    words: list[str] = []
    while len(words) < count:
        w = rng.choice(prefixes) + _word(rng, rng.randint(1, 1 + difficulty // 2))
        if w not in words:
            words.append(w)
    return words


def _selection(words: list[str], rng: random.Random | None, slip_rate: float) -> tuple[str, list[str]]:
    lines = [f"Words: {', '.join(words)}", "Take the alphabetically first word each time."]
    left, done = list(words), []
    while left:
        ordered = sorted(left)
        pick = ordered[0]
        if rng is not None and len(ordered) > 1 and rng.random() < slip_rate:
            pick = ordered[1]
        lines.append(f"left: {', '.join(left)} -> {pick}")
        left.remove(pick)
        done.append(pick)
    lines.append(f"Sorted: {', '.join(done)}")
    return "\n".join(lines), done


def _draw(rng: random.Random, difficulty: int) -> tuple[str, dict]:
    words = _words(rng, 2 + 2 * difficulty, difficulty)
    solution, ordered = _selection(words, None, 0.0)
    fields = {"prompt": f"Sort these words in alphabetical order: {', '.join(words)}",
              "answer": ", ".join(ordered), "solution": solution, "items": words}
    return " ".join(words), fields


def generate(n: int, seed: int, split: str = "train", difficulty: int = 1) -> list[dict]:
    """n distinct word lists of the given split with 2 + 2 * difficulty words each."""
    return generate_split(NAME, MAX_DIFFICULTY, _draw, n, seed, split, difficulty)


def parse_list(answer_text: str) -> list[str]:
    text = strip_wrappers(answer_text).strip("[]() ")
    parts = re.split(r"[,\s]+", text) if "," in text else text.split()
    return [p.strip("'\"`").lower() for p in parts if p.strip("'\"`")]


def verify(answer_text: str, example: dict) -> bool:
    """True when the answer lists exactly the given words in alphabetical order."""
    return parse_list(answer_text) == sorted(example["items"])


def solution_with_slips(example: dict, rng: random.Random, slip_rate: float) -> tuple[str, str]:
    """(worked solution, final answer); each pick takes the second word with slip_rate."""
    solution, ordered = _selection(list(example["items"]), rng, slip_rate)
    return solution, ", ".join(ordered)
