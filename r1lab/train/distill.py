"""Distillation in one command: a teacher's verified samples, then SFT of the student on them.

`run_distill` asks the teacher (an r1lab checkpoint or a local Hugging Face model) for
`generate.k` samples per prompt (a prompt file, else the recipe's data.rl_files, else
`generate.prompts` problems of data.task's train split), keeps the verified ones
(`r1lab.train.generate`: graded, filtered by `rejection.py`) in `RUN/generate/distill.jsonl`,
and fine-tunes the recipe's student (`sft.init_from`, the recipe's [sft] section) on that file
alone: it becomes `data.sft_files`. A finished generate step (its stats sidecar is written last)
is not redone; one made with other settings is refused rather than silently reused. The SFT
stage resumes as `r1lab sft` does.

It knows the order of the two steps and their files; sampling is `generate`'s and training
`stages.run_sft`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from r1lab.config import ConfigError
from r1lab.device import resolve_device
from r1lab.recipe import Recipe, save_recipe
from r1lab.train.common import StageResult
from r1lab.train.data import rl_examples
from r1lab.train.generate import generate_step, load_prompts, stats_path
from r1lab.train.policy import policy_dir
from r1lab.train.stages import run_sft

DISTILL_FILE = "generate/distill.jsonl"


@dataclass
class DistillResult:
    stats: dict              # what the generate step kept and dropped (FILE.stats.json)
    generated: bool          # False: an earlier run's finished generate step was reused
    sft: StageResult


def distill_prompts(recipe: Recipe, prompts: str | None = None) -> list[dict]:
    """The prompts the teacher answers: `prompts` (a file or a task family), else data.rl_files, else
    generate.prompts problems of data.task's train split."""
    d, g = recipe.data, recipe.generate
    if prompts:
        own = prompts == d.task
        return load_prompts(prompts, limit=g.prompts if own else None, seed=g.seed,
                            difficulty=d.difficulty if own else 1, task_options=d.task_options if own else None,
                            fields=d.rl_fields)
    if d.rl_files:
        return rl_examples(d.rl_files, d.rl_fields)
    return load_prompts(d.task, limit=g.prompts, seed=g.seed, difficulty=d.difficulty, task_options=d.task_options)


def run_distill(recipe: Recipe, run_dir: Path, teacher: str | Path, prompts: str | None = None,
                quiet: bool = False) -> DistillResult:
    """Generate + filter + SFT of the student into run_dir/sft (see the module docstring)."""
    if not recipe.sft.init_from:
        raise ConfigError("distill needs sft.init_from in the student recipe: the student model to fine-tune")
    policy_dir(recipe.sft.init_from, "sft.init_from")
    teacher = policy_dir(teacher, "--teacher")
    resolve_device(recipe.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / DISTILL_FILE
    stats, generated = generate_step(recipe, teacher, out, lambda: distill_prompts(recipe, prompts))
    if not stats["kept"]:
        raise ConfigError(f"the teacher {teacher} gave no sample worth keeping ({stats['samples']} seen, dropped "
                          f"{stats['dropped']}): nothing to distill; see {stats_path(out)}")
    student = replace(recipe, data=replace(recipe.data, sft_files=[str(out)], sft_task_examples=0))
    save_recipe(student, run_dir / "recipe.toml")
    return DistillResult(stats, generated, run_sft(student, run_dir, quiet=quiet))
