"""Verifiable task families: seeded problem generators, each with its own exact grader.

Every family module offers the same functions:

    generate(n, seed, split="train", difficulty=1) -> list[dict]
        examples {"prompt", "answer", "family", "solution", "split", "difficulty", "id", ...}
    verify(answer_text, example) -> bool
        the family's grader, given the extracted final answer text
    solution_with_slips(example, rng, slip_rate) -> (solution, final_answer)
        a worked solution that sometimes goes wrong, for imitation-vs-verifier corpora
    MAX_DIFFICULTY

Train and test splits are decided by a stable hash of each problem and never overlap
(see `r1lab.tasks.base`). `rewards.accuracy_reward` grades an example with its family's `verify`
when `example["family"]` is a name in `FAMILIES`. Benchmark loaders live in `tasks.benchmarks`.
"""

from __future__ import annotations

from types import ModuleType

from r1lab.tasks import arithmetic, code, countdown, linear, sorting

FAMILIES: dict[str, ModuleType] = {
    "arithmetic": arithmetic,
    "code": code,
    "countdown": countdown,
    "linear": linear,
    "sorting": sorting,
}


def get_family(name: str) -> ModuleType:
    """The family module registered under `name`; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
