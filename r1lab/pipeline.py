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
eval.k samples (RUN/<stage>/eval), and its cost line. Models of other runs named in pipeline.compare
(R1-Zero, a compute-matched SFT control, a teacher, a student's base, the distilled student, RL on the
student) are evaluated the
same way (RUN/compare/<role>/eval) and become rows of the same table, with the margins their pairs
decide at each model's best decoding (the higher of greedy and sampled pass@1). `RUN/pipeline.json`, written atomically after
each stage, records the finished ones; a second invocation skips them and resumes the first
unfinished one (whose training resumes from its own last checkpoint). At the end `report.md` and
`summary.json` put the stages side by side; `cost.json` holds the ledger.

This module knows the order of the stages and what each starts from; training, sampling, grading
and evaluation are the stages', `generate`'s and `eval`'s.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from r1lab.checkpoint import read_trainer_summary, write_text_atomic
from r1lab.config import ConfigError
from r1lab.cost import CostLedger, StageCost
from r1lab.device import resolve_device
from r1lab.eval import EvalResult
from r1lab.evalreport import best_decoding, item_scores, verdict
from r1lab.hardware import measure_matmul_peak
from r1lab.hf import load_causal_lm
from r1lab.recipe import COMPARE_ROLES, Recipe, save_recipe
from r1lab.rewards import language_consistency_reward
from r1lab.train.common import CHECKPOINT, stage_cost
from r1lab.train.generate import generate_step
from r1lab.train.stages import evaluate_heldout, heldout_examples, rl_pool, run_grpo, run_pretrain, run_sft

STAGES = ("base", "cold_start", "reasoning_rl", "rejection_sft", "final_rl")
LABELS = {"base": "base", "cold_start": "1. cold-start SFT", "reasoning_rl": "2. reasoning RL",
          "rejection_sft": "3. rejection sampling + SFT of the base", "final_rl": "4. final RL"}
COMPARED = {"r1_zero": "R1-Zero (GRPO from a base, no SFT)",
            "control": "SFT control (cold-start SFT for the FLOPs of stages 1-4)", "teacher": "teacher",
            "student_base": "student's base", "student": "distilled student", "student_rl": "RL on the student"}
MARGINS = (("reasoning_rl", "cold_start"), ("final_rl", "rejection_sft"), ("final_rl", "cold_start"),
           ("final_rl", "base"), ("final_rl", "r1_zero"), ("final_rl", "control"), ("student", "student_base"), ("student", "student_rl"),
           ("student", "teacher"))
"""Pairs (a, b) whose margin a - b at each one's best decoding the report states when both rows exist: each RL
stage against the model it starts from, what stages 2-4 add to the cold start, the final stage against the base
and R1-Zero and its compute-matched control, the distilled student against its base, RL on the student and the teacher."""
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


def cold_start_data(recipe: Recipe) -> dict:
    """The [data] fields the cold start (and its compute-matched control) sets on top of the recipe's: only
    pipeline.cold_start_examples task conversations, at pipeline.sft_seq_len when given."""
    p = recipe.pipeline
    return {"sft_files": [], "sft_task_examples": p.cold_start_examples,
            "seq_len": p.sft_seq_len or recipe.data.seq_len}


def _train(recipe: Recipe, run_dir: Path, stage: str, peak: float, quiet: bool) -> list[StageCost]:
    """Run one stage's training (and, for stage 3, its sampling); return its cost lines."""
    p, d = recipe.pipeline, recipe.data
    base = str(checkpoint_of(run_dir, "base")) if p.pretrain_base else p.init_from
    sft_data = replace(d, seq_len=p.sft_seq_len or d.seq_len)
    cold = replace(d, **cold_start_data(recipe))
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
    return evaluate_heldout(recipe, model, tokenizer, examples, out_dir, peak / 1e9, 256, str(checkpoint))


def eval_row(result: EvalResult, k: int) -> dict:
    """What the report compares: pass@1 greedy and sampled (k samples), cons@k, format rate, mean length,
    language consistency; and each item's greedy and sampled score, which decide the margins' verdicts."""
    s, g = result.metrics, result.greedy.metrics
    texts = [c["text"] for item in result.items for c in item["completions"]]
    return {"greedy_pass@1": g["pass@1"], "sampled_pass@1": s["pass@1"], "cons@k": s[f"cons@{k}"],
            "format_rate": s["format_rate"], "mean_tokens": s["mean_tokens"],
            "language_consistency": sum(language_consistency_reward(t, {}) for t in texts) / max(1, len(texts)),
            **result.spent(),
            "scores": {"greedy": item_scores(result.greedy.items), "sampled": item_scores(result.items)}}


def run_pipeline(recipe: Recipe, run_dir: Path, quiet: bool = False) -> dict:
    """Every unfinished stage in order (see the module docstring); returns summary.json's content."""
    device = resolve_device(recipe.device)
    if not recipe.pipeline.pretrain_base and not Path(recipe.pipeline.init_from).is_dir():
        raise ConfigError(f"pipeline.init_from: {recipe.pipeline.init_from}: no such model directory")
    for role, path in recipe.pipeline.compare.items():
        if not Path(path).is_dir():
            raise ConfigError(f"pipeline.compare.{role}: {path}: no such model directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.toml")
    state = read_state(run_dir)
    peak = state.get("peak_flops") or recipe.cost.peak_gflops * 1e9 or measure_matmul_peak(device=device) * 1e9
    state["peak_flops"] = peak
    examples = heldout_examples(recipe)
    for stage in STAGES:
        if stage in state["stages"]:
            if "scores" not in state["stages"][stage]["eval"]:  # written before per-item scores were kept
                _reevaluate(recipe, run_dir, state, stage, examples, peak, device)
            continue
        if stage == "base" and not recipe.pipeline.pretrain_base:
            checkpoint = Path(recipe.pipeline.init_from)
        else:
            checkpoint = checkpoint_of(run_dir, stage)
        started = time.perf_counter()
        costs = [replace(c, stage=c.stage if c.stage == "rejection sampling" else stage)
                 for c in _train(recipe, run_dir, stage, peak, quiet)]
        row = eval_row(evaluate_stage(recipe, checkpoint, run_dir / stage / "eval", examples, peak, device),
                       recipe.eval.k)
        costs.append(stage_cost(f"eval {stage}", row["eval_flops"], row["eval_seconds"], recipe.cost, peak, device))
        state["stages"][stage] = {"checkpoint": str(checkpoint), "eval": row, "cost": [c.as_dict() for c in costs],
                                  "wall_seconds": time.perf_counter() - started,
                                  "finished_at": datetime.now(timezone.utc).isoformat()}
        write_text_atomic(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
        if not quiet:
            print(f"r1lab pipeline: {LABELS[stage]} done: greedy pass@1 {row['greedy_pass@1']:.1%}, "
                  f"T={recipe.eval.temperature} {row['sampled_pass@1']:.1%}", flush=True)
    evaluate_compared(recipe, run_dir, state, examples, peak, device, quiet)
    summary = summarize(recipe, state)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(run_dir / "cost.json", json.dumps(ledger_of(state).as_dict(), indent=2) + "\n")
    write_text_atomic(run_dir / "report.md", report(recipe, summary, ledger_of(state)))
    return summary


def _reevaluate(recipe: Recipe, run_dir: Path, state: dict, stage: str, examples: list[dict], peak: float,
                device: torch.device) -> None:
    """Evaluate a finished stage again, in place of an evaluation that kept no per-item scores."""
    done = state["stages"][stage]
    out = run_dir / stage / "eval"
    shutil.rmtree(out, ignore_errors=True)
    row = eval_row(evaluate_stage(recipe, Path(done["checkpoint"]), out, examples, peak, device), recipe.eval.k)
    cost = stage_cost(f"eval {stage}", row["eval_flops"], row["eval_seconds"], recipe.cost, peak, device)
    done["eval"] = row
    done["cost"] = [c for c in done["cost"] if c["stage"] != f"eval {stage}"] + [cost.as_dict()]
    write_text_atomic(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def evaluate_compared(recipe: Recipe, run_dir: Path, state: dict, examples: list[dict], peak: float,
                      device: torch.device, quiet: bool) -> None:
    """Evaluate each pipeline.compare model not yet evaluated from that directory; record it in `state`."""
    done = state.setdefault("compared", {})
    for role, path in recipe.pipeline.compare.items():
        out = run_dir / "compare" / role / "eval"
        if role in done:
            if done[role]["checkpoint"] == str(path):
                continue
            del done[role]
            shutil.rmtree(out, ignore_errors=True)  # another model's samples must not be resumed from
        row = eval_row(evaluate_stage(recipe, Path(path), out, examples, peak, device), recipe.eval.k)
        cost = stage_cost(f"eval {role}", row["eval_flops"], row["eval_seconds"], recipe.cost, peak, device)
        trained = read_trainer_summary(path)  # {} for a directory without r1lab's trainer state (an HF model)
        done[role] = {"checkpoint": str(path), "eval": row, "cost": [cost.as_dict()],
                      "training": {k: trained[k] for k in ("step", "seconds", "flops") if k in trained},
                      "finished_at": datetime.now(timezone.utc).isoformat()}
        write_text_atomic(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
        if not quiet:
            print(f"r1lab pipeline: {COMPARED[role]} ({path}): greedy pass@1 {row['greedy_pass@1']:.1%}, "
                  f"T={recipe.eval.temperature} {row['sampled_pass@1']:.1%}", flush=True)


def ledger_of(state: dict) -> CostLedger:
    lines = [c for s in STAGES for c in state["stages"].get(s, {}).get("cost", [])]
    lines += [c for role in COMPARE_ROLES for c in state.get("compared", {}).get(role, {}).get("cost", [])]
    return CostLedger.from_dict({"stages": lines})


def _best(done: dict):
    scores = done["eval"]["scores"]
    return best_decoding(scores["greedy"], scores["sampled"])


def _row(done: dict, compared: bool = False) -> dict:
    """A summary row: the evaluation (without its per-item scores), its best decoding, its cost, and the
    FLOPs that trained it: a stage's own (training and sampling, not evaluation), or for a compared model
    those its checkpoint records for the training stage that wrote it (None when it records none)."""
    cost = CostLedger.from_dict({"stages": done["cost"]}).totals()
    best = _best(done)
    if compared:
        training_flops = done.get("training", {}).get("flops")
    else:  # None for a base given by pipeline.init_from: it was trained elsewhere
        training_flops = sum(c["flops"] for c in done["cost"] if not c["stage"].startswith("eval ")) or None
    return {**{k: v for k, v in done["eval"].items() if k != "scores"}, "best_pass@1": best.pass1,
            "best_decoding": best.decoding, "checkpoint": done["checkpoint"], "finished_at": done["finished_at"],
            "cost_dollars": cost["dollars"], "cost_seconds": cost["seconds"], "cost_flops": cost["flops"],
            "training_flops": training_flops}


def control_sft_steps(recipe: Recipe, stages: dict) -> int | None:
    """How many steps the cold start's SFT runs for to spend the training FLOPs of stages 1-4 (its FLOPs per
    step times the steps equal to their sum): the compute-matched control the final stage must beat."""
    flops = [stages[name]["training_flops"] for name in STAGES[1:]]
    if None in flops or not flops[0]:
        return None
    return round(sum(flops) / (flops[0] / recipe.sft.steps))


def summarize(recipe: Recipe, state: dict) -> dict:
    """summary.json: each stage's and each compared model's row, the verdicts of MARGINS' pairs (each model
    at its best decoding, `evalreport.verdict`: a margin beyond two paired standard errors), the cost totals."""
    done = {**state["stages"], **{role: state["compared"][role] for role in COMPARE_ROLES
                                  if role in recipe.pipeline.compare}}
    stages = {name: _row(done[name]) for name in STAGES}
    compared = {role: _row(done[role], compared=True) for role in COMPARE_ROLES if role in recipe.pipeline.compare}
    margins = [verdict(a, _best(done[a]), b, _best(done[b])).as_dict() for a, b in MARGINS if a in done and b in done]
    e = recipe.eval
    return {"stages": stages, "compared": compared, "margins": margins, "cost": ledger_of(state).totals(),
            "control_sft_steps": control_sft_steps(recipe, stages),
            "eval": {"problems": e.problems, "k": e.k, "temperature": e.temperature, "top_p": e.top_p,
                     "max_new_tokens": e.max_new_tokens, "task": recipe.data.task,
                     "difficulty": recipe.data.difficulty}}


def _label(name: str) -> str:
    return LABELS.get(name) or COMPARED[name]


def report(recipe: Recipe, summary: dict, ledger: CostLedger) -> str:
    """report.md: the stages and the compared models side by side, the margins, the cost ledger."""
    e, compared = summary["eval"], summary.get("compared", {})
    k, pct = e["k"], lambda x: f"{100 * x:.1f}%"
    lines = ["# r1lab pipeline", "",
             f"R1's four stages on {e['task']} (difficulty {e['difficulty']}), judged on {e['problems']} held-out "
             f"problems: greedy, and {k} samples at T={e['temperature']}, top-p {e['top_p']}; best = the higher "
             f"of the two (each model at its best decoding).", "",
             f"| model | greedy pass@1 | pass@1, T={e['temperature']} | best | cons@{k} | format rate | mean tokens | "
             "language consistency | training FLOPs | cost |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = ["base", *[r for r in ("r1_zero",) if r in compared], *STAGES[1:],
             *[r for r in COMPARE_ROLES if r != "r1_zero" and r in compared]]
    for name in order:
        s = summary["stages"].get(name) or compared[name]
        cost = f"${s['cost_dollars']:.4f}" if name in summary["stages"] else "its own run's"
        flops = "-" if s.get("training_flops") is None else f"{s['training_flops']:.3g}"
        lines.append(f"| {_label(name)} | {pct(s['greedy_pass@1'])} | {pct(s['sampled_pass@1'])} | "
                     f"**{pct(s['best_pass@1'])}** | {pct(s['cons@k'])} | {pct(s['format_rate'])} | "
                     f"{s['mean_tokens']:.1f} | {pct(s['language_consistency'])} | {flops} | {cost} |")
    lines += ["", "Training FLOPs are each row's own stage (a stage's training, and stage 3's sampling), not "
              "the stages before it."]
    if summary.get("control_sft_steps"):
        data = [f"--data.{k}={json.dumps(v)}" for k, v in cold_start_data(recipe).items()
                if getattr(recipe.data, k) != v]
        lines += ["", f"The compute-matched control is the cold start's SFT run for {summary['control_sft_steps']} "
                  f"steps instead of {recipe.sft.steps}, the training FLOPs of stages 1-4: `r1lab sft --recipe RECIPE "
                  f"--sft.init_from={summary['stages']['base']['checkpoint']} --sft.steps={summary['control_sft_steps']} "
                  f"{' '.join(data)} --run CONTROL_RUN`, then `--pipeline.compare='{{control = "
                  f"\"CONTROL_RUN/sft/checkpoint\"}}'`."]
    if compared:
        lines += ["", "Rows with \"its own run's\" cost are models of other runs (pipeline.compare), evaluated here "
                  "on the same problems with the same settings; their training FLOPs are those their checkpoint "
                  "records for the stage that wrote it (\"-\": none recorded, as for a Hugging Face model), their "
                  "dollars are in their own run, their evaluation's in the ledger below."]
        lines += [f"- {_label(role)}: `{compared[role]['checkpoint']}`" for role in compared]
    if summary.get("margins"):
        lines += ["", "## Margins at each model's best decoding", ""]
        for m in summary["margins"]:
            verb = "beats" if m["beat"] else "does not beat"
            lines.append(f"- {_label(m['a'])} {verb} {_label(m['b'])}: {100 * m['margin']:+.1f} points (paired "
                         f"standard error {100 * m['stderr']:.1f}; a win needs more than two)")
    lines += ["", "## Cost", "", ledger.table(), ""]
    return "\n".join(lines)
