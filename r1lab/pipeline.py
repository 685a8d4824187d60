"""`r1lab pipeline`: DeepSeek-R1's four stages on one recipe, each a call of the library's own stages.

    base          pretrain the base ([pretrain], data.task's corpus), or take pipeline.init_from
    cold_start    (1) SFT of the base on pipeline.cold_start_examples readable R1-format conversations
    reasoning_rl  (2) GRPO from the cold-start model, rewarded by [grpo] reward_weights (accuracy, format,
                  language consistency)
    rejection_sft (3) generate.k samples of each of generate.prompts train prompts from stage 2, kept by
                  `rejection.py`, then SFT of the BASE (not stage 2) on them (+ the cold-start set when
                  pipeline.rejection_cold_start)
    final_rl      (4) GRPO from stage 3

Each stage writes RUN/<stage>/ (the stage's own run directory: checkpoint, metrics.jsonl), an
evaluation of its checkpoint on eval.problems held-out problems greedy and at eval.temperature with
eval.k samples (RUN/<stage>/eval), and its cost line. `RUN/pipeline.json`, written atomically after
each stage, records the finished ones; a second invocation skips them and resumes the first
unfinished one (whose training resumes from its own last checkpoint). At the end `report.md` and
`summary.json` put the stages side by side; `cost.json` holds the ledger.

This module knows the order of the stages and what each starts from; training, sampling, grading
and evaluation are the stages', `generate`'s and `eval`'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from r1lab.checkpoint import write_text_atomic
from r1lab.config import ConfigError
from r1lab.cost import CostLedger, StageCost
from r1lab.device import resolve_device
from r1lab.engine import SamplingParams
from r1lab.eval import EvalResult, evaluate
from r1lab.hardware import measure_matmul_peak
from r1lab.hf import load_causal_lm
from r1lab.recipe import Recipe, save_recipe
from r1lab.rewards import language_consistency_reward
from r1lab.sampling import longest_prompt, sized_engine
from r1lab.train.common import CHECKPOINT, stage_cost
from r1lab.train.generate import generate_step
from r1lab.train.stages import heldout_examples, rl_pool, run_grpo, run_pretrain, run_sft

STAGES = ("base", "cold_start", "reasoning_rl", "rejection_sft", "final_rl")
LABELS = {"base": "base", "cold_start": "1. cold-start SFT", "reasoning_rl": "2. reasoning RL",
          "rejection_sft": "3. rejection sampling + SFT of the base", "final_rl": "4. final RL"}
STATE_FILE = "pipeline.json"
KEPT_FILE = "generate/kept.jsonl"


def checkpoint_of(run_dir: Path, stage: str) -> Path:
    """Where a stage's model is saved (each stage is a run directory of the stage function it calls)."""
    sub = {"base": "base", "cold_start": "sft", "reasoning_rl": "rl", "rejection_sft": "sft", "final_rl": "rl"}[stage]
    return run_dir / ("." if stage == "base" else stage) / sub / CHECKPOINT


def read_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}); delete it to run every stage's last step again") from None


def _train(recipe: Recipe, run_dir: Path, stage: str, peak: float, quiet: bool) -> list[StageCost]:
    """Run one stage's training (and, for stage 3, its sampling); return its cost lines."""
    p, d = recipe.pipeline, recipe.data
    base = str(checkpoint_of(run_dir, "base")) if p.pretrain_base else p.init_from
    sft_data = replace(d, seq_len=p.sft_seq_len or d.seq_len)
    cold = replace(sft_data, sft_files=[], sft_task_examples=p.cold_start_examples)
    if stage == "base":
        return [run_pretrain(recipe, run_dir, peak, quiet).cost] if p.pretrain_base else []
    if stage == "cold_start":
        r = replace(recipe, data=cold, sft=replace(recipe.sft, init_from=base))
        return [run_sft(r, run_dir / stage, peak, quiet).cost]
    if stage == "reasoning_rl":
        r = replace(recipe, grpo=replace(recipe.grpo, init_from=str(checkpoint_of(run_dir, "cold_start"))))
        return [run_grpo(r, run_dir / stage, peak, quiet=quiet).cost]
    if stage == "rejection_sft":
        teacher = checkpoint_of(run_dir, "reasoning_rl")
        kept = run_dir / stage / KEPT_FILE
        stats, _ = generate_step(recipe, teacher, kept, lambda: rl_pool(recipe)[:recipe.generate.prompts],
                                 template=d.template, instruction="")
        if not stats["kept"] and not p.rejection_cold_start:
            raise ConfigError(f"stage 3 kept none of the {stats['samples']} samples of {teacher} (dropped "
                              f"{stats['dropped']}) and pipeline.rejection_cold_start is false: nothing to "
                              f"fine-tune on; see {kept}.stats.json")
        data = replace(sft_data, sft_files=[str(kept)] if stats["kept"] else [],
                       sft_task_examples=p.cold_start_examples if p.rejection_cold_start else 0)
        r = replace(recipe, data=data, sft=replace(recipe.sft, init_from=base,
                                                   steps=p.rejection_sft_steps or recipe.sft.steps))
        sampling = stage_cost("rejection sampling", stats["flops"] or 0.0, stats["seconds"], recipe.cost, peak,
                              resolve_device(recipe.device))
        return [sampling, run_sft(r, run_dir / stage, peak, quiet).cost]
    r = replace(recipe, grpo=replace(recipe.grpo, init_from=str(checkpoint_of(run_dir, "rejection_sft")),
                                     steps=p.final_grpo_steps or recipe.grpo.steps))
    return [run_grpo(r, run_dir / stage, peak, quiet=quiet).cost]


def evaluate_stage(recipe: Recipe, checkpoint: Path, out_dir: Path, examples: list[dict], peak: float,
                   device: torch.device) -> EvalResult:
    """The checkpoint on the held-out examples, greedy and sampled (eval.k at eval.temperature)."""
    model, tokenizer = load_causal_lm(checkpoint, device=device)
    if tokenizer is None:
        raise ConfigError(f"{checkpoint}: has no tokenizer.json to prompt it with")
    model.eval()
    e, template = recipe.eval, recipe.data.template
    engine = sized_engine(model, tokenizer, longest_prompt(tokenizer, examples, template), e.max_new_tokens, 256)
    params = SamplingParams(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=e.seed)
    return evaluate(engine, tokenizer, examples, k=e.k, params=params, template=template, instruction="",
                    out_dir=out_dir, peak_gflops=peak / 1e9, greedy=True,
                    settings={"model": str(checkpoint), "bench": recipe.data.task,
                              "difficulty": recipe.data.difficulty})


def eval_row(result: EvalResult) -> dict:
    """What the report compares: pass@1 greedy and sampled, format rate, mean length, language consistency."""
    s, g = result.metrics, result.greedy.metrics
    texts = [c["text"] for item in result.items for c in item["completions"]]
    return {"greedy_pass@1": g["pass@1"], "sampled_pass@1": s["pass@1"], "format_rate": s["format_rate"],
            "mean_tokens": s["mean_tokens"],
            "language_consistency": sum(language_consistency_reward(t, {}) for t in texts) / max(1, len(texts)),
            "eval_seconds": result.cost["wall_seconds"] + result.greedy.cost["wall_seconds"],
            "eval_flops": (result.cost["flops"] or 0.0) + (result.greedy.cost["flops"] or 0.0)}


def run_pipeline(recipe: Recipe, run_dir: Path, quiet: bool = False) -> dict:
    """Every unfinished stage in order (see the module docstring); returns summary.json's content."""
    device = resolve_device(recipe.device)
    if not recipe.pipeline.pretrain_base and not Path(recipe.pipeline.init_from).is_dir():
        raise ConfigError(f"pipeline.init_from: {recipe.pipeline.init_from}: no such model directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.toml")
    state = read_state(run_dir)
    peak = state.get("peak_flops") or recipe.cost.peak_gflops * 1e9 or measure_matmul_peak(device=device) * 1e9
    state["peak_flops"] = peak
    examples = heldout_examples(recipe)
    for stage in STAGES:
        if stage in state["stages"]:
            continue
        if stage == "base" and not recipe.pipeline.pretrain_base:
            checkpoint = Path(recipe.pipeline.init_from)
        else:
            checkpoint = checkpoint_of(run_dir, stage)
        started = time.perf_counter()
        costs = [replace(c, stage=c.stage if c.stage == "rejection sampling" else stage)
                 for c in _train(recipe, run_dir, stage, peak, quiet)]
        row = eval_row(evaluate_stage(recipe, checkpoint, run_dir / stage / "eval", examples, peak, device))
        costs.append(stage_cost(f"eval {stage}", row["eval_flops"], row["eval_seconds"], recipe.cost, peak, device))
        state["stages"][stage] = {"checkpoint": str(checkpoint), "eval": row, "cost": [c.as_dict() for c in costs],
                                  "wall_seconds": time.perf_counter() - started,
                                  "finished_at": datetime.now(timezone.utc).isoformat()}
        write_text_atomic(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
        if not quiet:
            print(f"r1lab pipeline: {LABELS[stage]} done: greedy pass@1 {row['greedy_pass@1']:.1%}, "
                  f"T={recipe.eval.temperature} {row['sampled_pass@1']:.1%}", flush=True)
    summary = summarize(recipe, state)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(run_dir / "cost.json", json.dumps(ledger_of(state).as_dict(), indent=2) + "\n")
    write_text_atomic(run_dir / "report.md", report(recipe, summary, ledger_of(state)))
    return summary


def ledger_of(state: dict) -> CostLedger:
    return CostLedger.from_dict({"stages": [c for s in STAGES for c in state["stages"].get(s, {}).get("cost", [])]})


def summarize(recipe: Recipe, state: dict) -> dict:
    stages = {}
    for name in STAGES:
        done = state["stages"][name]
        cost = CostLedger.from_dict({"stages": done["cost"]}).totals()
        stages[name] = {**done["eval"], "checkpoint": done["checkpoint"], "finished_at": done["finished_at"],
                        "cost_dollars": cost["dollars"], "cost_seconds": cost["seconds"], "cost_flops": cost["flops"]}
    e = recipe.eval
    return {"stages": stages, "cost": ledger_of(state).totals(),
            "eval": {"problems": e.problems, "k": e.k, "temperature": e.temperature, "top_p": e.top_p,
                     "max_new_tokens": e.max_new_tokens, "task": recipe.data.task,
                     "difficulty": recipe.data.difficulty}}


def report(recipe: Recipe, summary: dict, ledger: CostLedger) -> str:
    e = summary["eval"]
    lines = ["# r1lab pipeline", "",
             f"R1's four stages on {e['task']} (difficulty {e['difficulty']}), judged on {e['problems']} held-out "
             f"problems: greedy, and {e['k']} samples at T={e['temperature']}, top-p {e['top_p']}.", "",
             f"| stage | greedy pass@1 | pass@1, T={e['temperature']} | format rate | mean tokens | "
             "language consistency | cost |", "|---|---|---|---|---|---|---|"]
    for name in STAGES:
        s = summary["stages"][name]
        lines.append(f"| {LABELS[name]} | {100 * s['greedy_pass@1']:.1f}% | {100 * s['sampled_pass@1']:.1f}% | "
                     f"{100 * s['format_rate']:.1f}% | {s['mean_tokens']:.1f} | "
                     f"{100 * s['language_consistency']:.1f}% | ${s['cost_dollars']:.4f} |")
    lines += ["", "## Cost", "", ledger.table(), ""]
    return "\n".join(lines)
