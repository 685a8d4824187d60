"""Shared pieces of the verifiable task families: the example type, the train/test split and helpers.

Every family draws problems from a seeded `random.Random`, writes each problem in a canonical form,
and decides train or test membership from a stable hash of that form (sha256, never Python's
`hash()`, which changes per process). A generator asked for one split rejects problems of the
other, so the splits cannot overlap whatever the seed. This module knows no family and no model.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from typing import TypedDict

SPLITS = ("train", "test")
TEST_FRACTION = 0.1  # share of each family's problem space held out for evaluation
MAX_TRIES_PER_EXAMPLE = 200  # draws allowed per requested example before the space counts as too small


class Example(TypedDict, total=False):
    """One generated problem. Families add their own fields (numbers, target, items, ...)."""

    prompt: str  # the question, without any chat template
    answer: str  # the gold final answer, as text a verifier accepts
    family: str  # registry name of the family that made it and grades it
    solution: str  # worked step-by-step reasoning (the text that goes inside <think>)
    split: str  # "train" or "test"
    difficulty: int
    id: str  # stable id: family plus a short hash of the canonical form


def split_of(canonical: str) -> str:
    """The split a problem belongs to, from a stable hash of its canonical form."""
    digest = hashlib.sha256(b"r1lab-split\0" + canonical.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < TEST_FRACTION else "train"


def generate_split(family: str, max_difficulty: int, draw: Callable[..., tuple[str, dict]], n: int, seed: int,
                   split: str, difficulty: int, **options) -> list[dict]:
    """Check the arguments, then draw distinct problems of one split until there are n.

    `draw(rng, difficulty, **options)` returns (canonical form, example fields). The generator is
    seeded by the family, seed, split and difficulty (string seeds are stable across processes).
    Problems whose hash puts them in the other split are rejected, as are repeats within this call.
    Raises ValueError when the problem space of this difficulty is too small to give n distinct
    problems of the split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= difficulty <= max_difficulty:
        raise ValueError(f"difficulty must be in 1..{max_difficulty}, got {difficulty}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"r1lab:{family}:{seed}:{split}:{difficulty}")
    seen: set[str] = set()
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > MAX_TRIES_PER_EXAMPLE * max(n, 10):
            raise ValueError(
                f"{family}: only {len(out)} distinct {split} problems found at difficulty "
                f"{difficulty} after {tries - 1} draws; ask for fewer or raise the difficulty"
            )
        canonical, fields = draw(rng, difficulty, **options)
        if canonical in seen or split_of(canonical) != split:
            continue
        seen.add(canonical)
        problem_id = f"{family}-{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:12]}"
        out.append({"family": family, "split": split, "difficulty": difficulty, "id": problem_id, **fields})
    return out


_INT_RE = re.compile(r"[+-]?\d+")


def parse_int(text: str) -> int | None:
    """An integer written plainly: optional sign, optional thousands commas, optional '.0'.

    Returns None for anything else, so a verifier never guesses.
    """
    s = text.strip().strip("$").strip()
    s = s.replace(",", "").replace(" ", "").replace("\\!", "")
    if s.endswith(".0"):
        s = s[:-2]
    s = s.replace("\u2212", "-")
    return int(s) if _INT_RE.fullmatch(s) else None


def strip_wrappers(text: str) -> str:
    """Remove a surrounding \\boxed{...}, $...$ or trailing period a model may add to an answer."""
    s = text.strip()
    m = re.fullmatch(r"\\boxed\{(.*)\}", s, flags=re.S)
    if m:
        s = m.group(1).strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    return s.rstrip(".").strip()


def digits(x: int) -> list[int]:
    """The digits of x from the right (ones first), as the column methods visit them."""
    return [int(ch) for ch in str(x)[::-1]]


def slipped(value: int, rng: random.Random, slip_rate: float) -> int:
    """With probability slip_rate, a nearby wrong value (a plausible one-digit slip), else value."""
    if slip_rate <= 0 or rng.random() >= slip_rate:
        return value
    delta = rng.choice([-1, 1]) * (10 if rng.random() < 0.25 and abs(value) >= 10 else 1)
    wrong = value + delta
    return wrong if wrong >= 0 or value < 0 else value + 1


def completion_text(solution: str, answer: str) -> str:
    """The R1-Zero completion shape that `rewards.format_reward` accepts."""
    return f"<think>\n{solution}\n</think>\n<answer>{answer}</answer>"
