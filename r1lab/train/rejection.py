"""Rejection sampling's filter: which graded samples become SFT data, and why the others did not.

R1's third stage samples k completions per prompt from the reasoning-RL checkpoint and keeps only
the good ones as SFT data: correct, well formed, not over-long, not repeating another kept sample,
written in one language, and at most a few per prompt so easy prompts do not crowd out hard ones.
`filter_samples` applies those rules to samples that were already generated and graded elsewhere
and returns the kept ones with a count of the reason each dropped one was dropped; `write_sft_jsonl`
writes the kept ones as the `{"messages": [...]}` lines `r1lab sft` reads (data.sft_files).

A sample is checked in a fixed order and counted under the first rule it breaks: wrong, bad format,
over-long, mixed language, duplicate (the same completion for the same prompt once whitespace is
normalised, against samples already kept), over the per-prompt cap. Samples are visited in the order
given, so the output is deterministic and the cap keeps a prompt's first passing samples, not its
shortest (preferring short ones would teach the SFT model to cut its reasoning short).

This module is pure: it knows the reward parts as numbers and completions as text. It generates
nothing, grades nothing and imports no model, tokenizer or torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DROP_REASONS = ("wrong", "bad_format", "overlong", "mixed_language", "duplicate", "over_cap")
"""Why a sample is dropped, in the order the rules are checked."""


@dataclass(frozen=True)
class Sample:
    """One graded completion of one prompt."""

    prompt_id: str
    """Groups the k samples of one prompt (an example id)."""
    prompt: str
    """The user message the completion answers (no chat template)."""
    completion: str
    """The generated text, without EOS."""
    n_tokens: int
    """Length of the completion in tokens."""
    accuracy: float
    """Accuracy reward: 1.0 when the final answer is right."""
    format: float
    """Format reward: 1.0 for a well-formed completion."""
    language: float | None = None
    """Language-consistency reward, when it was computed (needed when a minimum is set)."""


@dataclass(frozen=True)
class Limits:
    """What a sample must satisfy to be kept."""

    max_tokens: int
    """Longest completion kept, in tokens."""
    min_language: float = 0.0
    """Least language consistency kept (0: not checked)."""
    per_prompt: int = 0
    """Most samples kept per prompt (0: no cap)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_language <= 1:
            raise ValueError(f"min_language must be in [0, 1], got {self.min_language}")
        if self.per_prompt < 0:
            raise ValueError(f"per_prompt must be >= 0 (0: no cap), got {self.per_prompt}")


@dataclass
class Filtered:
    """The kept samples, in input order, and how many samples each rule dropped."""

    kept: list[Sample]
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    @property
    def n_seen(self) -> int:
        return len(self.kept) + sum(self.dropped.values())


def normalise_whitespace(text: str) -> str:
    """Runs of whitespace as one space, none at the ends: two samples equal under it are duplicates."""
    return " ".join(text.split())


def drop_reason(sample: Sample, limits: Limits) -> str | None:
    """The first per-sample rule `sample` breaks (wrong, bad_format, overlong, mixed_language), or None.

    Duplicates and the per-prompt cap depend on the other samples; `filter_samples` checks those.
    """
    if sample.accuracy < 1.0:
        return "wrong"
    if sample.format < 1.0:
        return "bad_format"
    if sample.n_tokens > limits.max_tokens:
        return "overlong"
    if limits.min_language > 0:
        if sample.language is None:
            raise ValueError(f"sample of prompt {sample.prompt_id!r} has no language score, and "
                             f"min_language={limits.min_language} needs one")
        if sample.language < limits.min_language:
            return "mixed_language"
    return None


def filter_samples(samples: Iterable[Sample], limits: Limits) -> Filtered:
    """Keep the samples that pass every rule (see the module docstring), in the order given."""
    result = Filtered(kept=[])
    seen: set[tuple[str, str]] = set()
    per_prompt: dict[str, int] = {}
    for sample in samples:
        reason = drop_reason(sample, limits)
        key = (sample.prompt_id, normalise_whitespace(sample.completion))
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is None and limits.per_prompt and per_prompt.get(sample.prompt_id, 0) >= limits.per_prompt:
            reason = "over_cap"
        if reason is not None:
            result.dropped[reason] += 1
            continue
        seen.add(key)
        per_prompt[sample.prompt_id] = per_prompt.get(sample.prompt_id, 0) + 1
        result.kept.append(sample)
    return result


def assistant_turn(completion: str, think_opened: bool) -> str:
    """The completion as a whole assistant message: under a template whose prompt opened ``<think>``
    (the "r1" one) the generated text lacks it, and an SFT line must carry it to read the same under
    either template (`tokenizer.render_conversation` drops it again for "r1")."""
    return "<think>\n" + completion if think_opened and not completion.lstrip().startswith("<think>") else completion


def sft_lines(samples: Iterable[Sample], think_opened: bool) -> list[str]:
    """One JSON line {"messages": [user, assistant]} per sample."""
    return [json.dumps({"messages": [{"role": "user", "content": s.prompt},
                                     {"role": "assistant", "content": assistant_turn(s.completion, think_opened)}]},
                       ensure_ascii=False) for s in samples]


def write_sft_jsonl(samples: Iterable[Sample], path: str | Path, think_opened: bool) -> Path:
    """Write the samples as SFT-ready JSONL (what data.sft_files reads); return the path.

    `think_opened` says the completions were generated after a prompt that opened ``<think>``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = sft_lines(samples, think_opened)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a file
    return path
