"""Generate, grade, filter, write: the SFT sets of rejection sampling and distillation.

k samples per prompt come from a model directory (an r1lab checkpoint or a local Hugging Face
model, through `sampling.sample`) or from an OpenAI-compatible endpoint (through evalapi's
`ChatSampler`, whose `reasoning_content` becomes the `<think>` part). Every sample is graded by
the accuracy, format and language-consistency rewards (`sampling.grade`), filtered by
`rejection.filter_samples` (correct, well formed, not over-long, one language, no duplicate, a
per-prompt cap) and the kept ones written as `{"messages": [...]}` lines `r1lab sft` reads, with a
sidecar `FILE.stats.json` saying what was kept and why the rest was dropped. The stats file is
written last: its presence says the JSONL beside it is complete.

Prompts are a task family's train split or the JSONL forms `data.rl_files` accepts (the same
reader and field mapping). This module knows models, endpoints, rewards and files; it knows no
training step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from r1lab.checkpoint import model_metadata, model_template, write_text_atomic
from r1lab.config import ConfigError, ModelConfig
from r1lab.device import resolve_device
from r1lab.cost import DenseShape
from r1lab.engine import SamplingParams
from r1lab.eval import default_instruction
from r1lab.hf import load_causal_lm
from r1lab.recipe import GenerateConfig, Recipe
from r1lab.sampling import Sampled, grade, longest_prompt, question_text, sample, sized_engine
from r1lab.tasks import FAMILIES, get_family
from r1lab.tokenizer import R1, TEMPLATES
from r1lab.train.data import rl_examples
from r1lab.train.rejection import DROP_REASONS, Filtered, Limits, Sample, filter_samples, write_sft_jsonl

WEIGHTS = {"accuracy": 1.0, "format": 1.0, "language": 1.0}
"""The rewards every sample is graded by (unweighted parts are what the filter reads)."""


def stats_path(out: str | Path) -> Path:
    """The sidecar of an SFT file: FILE.stats.json."""
    out = Path(out)
    return out.with_name(out.name + ".stats.json")


def is_complete(out: str | Path) -> bool:
    """The SFT file at `out` was written to the end (its stats sidecar exists)."""
    return Path(out).is_file() and stats_path(out).is_file()


def load_prompts(source: str, *, limit: int | None = None, seed: int = 0, difficulty: int = 1,
                 task_options: dict | None = None, fields: dict[str, str] | None = None) -> list[dict]:
    """Prompts with reference answers: a task family's train split (`limit` problems, default 256),
    or a JSONL file in a form `data.rl_files` accepts (its first `limit` lines, all by default)."""
    if source in FAMILIES:
        try:
            return get_family(source).generate(limit or GenerateConfig.prompts, seed=seed, split="train",
                                               difficulty=difficulty, **(task_options or {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--prompts {source}: {e}") from None
    if not Path(source).is_file():
        raise ConfigError(f"--prompts {source}: no such file, and not a task family "
                          f"({', '.join(sorted(FAMILIES))})")
    examples = rl_examples([source], fields)
    return examples[:limit] if limit else examples


@dataclass
class Graded:
    """Graded samples of every prompt and what generating them cost."""
    samples: list[Sampled]
    instruction: str
    think_opened: bool
    flops: float | None = None
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # ids of prompts that did not fit the context


def sample_model(model_dir: str | Path, examples: list[dict], cfg: GenerateConfig, *, template: str | None = None,
                 instruction: str | None = None, device: torch.device | None = None) -> Graded:
    """k samples per example from the model at `model_dir`, graded.

    `template` defaults to the model's own (metadata), `instruction` to the one it was trained with
    (metadata), else `eval.default_instruction(template)`.
    """
    if template is not None and template not in TEMPLATES:
        raise ConfigError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    template = template or model_template(model_dir)
    if instruction is None:
        instruction = model_metadata(model_dir).get("instruction")
        instruction = default_instruction(template) if instruction is None else instruction
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(model_dir, device=device)
    if tokenizer is None:
        raise ConfigError(f"{model_dir}: has no tokenizer.json to prompt it with")
    model.eval()
    engine = sized_engine(model, tokenizer, longest_prompt(tokenizer, examples, template, instruction),
                          cfg.max_new_tokens, cfg.batch_size)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p if cfg.temperature > 0 else 1.0, n=cfg.k, seed=cfg.seed)
    with torch.inference_mode():
        groups = sample(engine, tokenizer, examples, params, template, instruction)
    shape = model.config if isinstance(model.config, (ModelConfig, DenseShape)) else None
    think_opened = template == R1
    samples = [s for g in groups for s in g.samples]
    graded = grade(samples, WEIGHTS, think_opened=think_opened)
    return Graded(graded, instruction, think_opened,
                  flops=sum(g.flops(shape) for g in groups) if shape is not None else None,
                  seconds=time.perf_counter() - started,
                  skipped=[str(g.example["id"]) for g in groups if g.skipped])


def sample_endpoint(api_base: str, api_model: str, examples: list[dict], cfg: GenerateConfig, *,
                    instruction: str | None = None, api_key: str | None = None, concurrency: int = 8) -> Graded:
    """k samples per example from an OpenAI-compatible endpoint, graded. The reply's
    `reasoning_content` is the `<think>` part; the server applies its own chat template."""
    from r1lab.evalapi import ChatSampler

    instruction = default_instruction(R1) if instruction is None else instruction
    started = time.perf_counter()
    sampler = ChatSampler(api_base, api_model, k=cfg.k, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, seed=cfg.seed, instruction=instruction, api_key=api_key,
                          concurrency=concurrency)
    samples = [s for group in sampler(examples, 0) for s in group.samples]
    graded = grade(samples, WEIGHTS, think_opened=False)  # the text carries its own <think>
    return Graded(graded, instruction, False, seconds=time.perf_counter() - started)


def filter_graded(graded: Graded, limits: Limits) -> tuple[Filtered, list[Sample]]:
    """(the filter's result, every sample as the filter saw it), in generation order."""
    candidates = [Sample(prompt_id=str(s.example["id"]), prompt=question_text(s.example, graded.instruction),
                         completion=s.text, n_tokens=s.n_tokens, accuracy=s.rewards["accuracy"],
                         format=s.rewards["format"], language=s.rewards["language"])
                  for s in graded.samples]
    return filter_samples(candidates, limits), candidates


def write_generated(graded: Graded, cfg: GenerateConfig, out: str | Path, source: dict) -> dict:
    """Filter `graded`, write the kept samples to `out` (SFT JSONL) and the stats to FILE.stats.json; return the stats."""
    kept, seen = filter_graded(graded, Limits(max_tokens=cfg.max_tokens or cfg.max_new_tokens,
                                              min_language=cfg.min_language, per_prompt=cfg.per_prompt))
    out = Path(out)
    stats_path(out).unlink(missing_ok=True)  # an old sidecar must not vouch for the file being rewritten
    write_sft_jsonl(kept.kept, out, graded.think_opened)
    n = max(1, len(seen))
    stats = {
        "source": source, "out": str(out), "settings": asdict(cfg),
        "instruction": graded.instruction, "prompts": len({s.prompt_id for s in seen}) + len(graded.skipped),
        "skipped_prompts": graded.skipped, "samples": len(seen), "kept": len(kept.kept),
        "kept_prompts": len({s.prompt_id for s in kept.kept}),
        "dropped": {reason: kept.dropped[reason] for reason in DROP_REASONS},
        "accuracy": sum(s.accuracy for s in seen) / n, "format_rate": sum(s.format for s in seen) / n,
        "language": sum(s.language or 0.0 for s in seen) / n, "mean_tokens": sum(s.n_tokens for s in seen) / n,
        "kept_mean_tokens": sum(s.n_tokens for s in kept.kept) / max(1, len(kept.kept)),
        "seconds": graded.seconds, "flops": graded.flops,
    }
    write_text_atomic(stats_path(out), json.dumps(stats, indent=2) + "\n")
    return stats


def generate_step(recipe: Recipe, teacher: str | Path, out: Path, examples_of, *, template: str | None = None,
                  instruction: str | None = None) -> tuple[dict, bool]:
    """(stats, whether it ran): the teacher's kept samples in `out`, unless a finished file with the same
    teacher and settings is there. `examples_of()` gives the prompts (called only when generating)."""
    source = {"model": str(Path(teacher).resolve())}
    if is_complete(out):
        stats = json.loads(stats_path(out).read_text())
        if stats.get("source", {}).get("model") != source["model"] or stats.get("settings") != asdict(recipe.generate):
            raise ConfigError(f"{out} was generated by another teacher or with other [generate] settings; "
                              f"use another --run, or delete {out} to generate it again")
        return stats, False
    graded = sample_model(teacher, examples_of(), recipe.generate, template=template, instruction=instruction,
                          device=resolve_device(recipe.device))
    return write_generated(graded, recipe.generate, out, source), True


def summary_line(stats: dict) -> str:
    """One line: kept / seen, then the drop counts by reason."""
    dropped = ", ".join(f"{reason} {n}" for reason, n in stats["dropped"].items() if n) or "none"
    return (f"kept {stats['kept']} of {stats['samples']} samples ({stats['kept_prompts']} of {stats['prompts']} "
            f"prompts); dropped: {dropped}; accuracy {stats['accuracy']:.1%}: {stats['out']}")
