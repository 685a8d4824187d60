"""`r1lab demo`: from nothing to a reasoner on this machine, and what it cost.

Stages (each resumes if the run directory already holds it):
  1. tokenizer + synthetic corpus from the recipe's task family (worked solutions that sometimes
     slip, and direct answers);
  2. pretraining of a tiny DeepSeek-V3-shaped base (MLA, MoE, MTP);
  3. R1-Zero GRPO from the base, rewarded only by rules (accuracy + format);
  4. the honest control: the same base pretrained further for about the RL stage's wall time;
  5. held-out evaluation of base, RL and control with the R1 protocol (k samples: pass@1 as the
     mean correctness, cons@k), then report.md, summary.json, cost.json and plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import torch

from r1lab.checkpoint import load_checkpoint
from r1lab.cost import CostLedger, StageCost
from r1lab.engine import Engine, SamplingParams
from r1lab.eval import evaluate
from r1lab.hardware import describe_machine, measure_matmul_peak
from r1lab.recipe import Recipe, load_recipe, save_recipe
from r1lab.rewards import chain_of_thought
from r1lab.tasks import get_family
from r1lab.train.common import CHECKPOINT, read_metrics
from r1lab.train.stages import run_control, run_grpo, run_pretrain

STAGES = ("base", "rl", "control")
QUICK = ["--data.n_problems=600", "--pretrain.steps=12", "--pretrain.log_every=4", "--pretrain.eval_every=12",
         "--pretrain.batch_size=8", "--grpo.steps=2", "--grpo.prompts_per_step=4", "--grpo.group_size=4",
         "--grpo.max_new_tokens=48", "--control.steps=2", "--control.batch_size=8", "--eval.problems=8", "--eval.k=2",
         "--eval.max_new_tokens=48"]


def demo_recipe(path: str | Path | None, overrides: list[str], quick: bool) -> Recipe:
    default = files("r1lab").joinpath("recipes/r1-zero-tiny.toml")
    return load_recipe(path or str(default), (QUICK if quick else []) + overrides)


def heldout_examples(recipe: Recipe) -> list[dict]:
    d, e = recipe.data, recipe.eval
    return get_family(d.task).generate(e.problems, seed=e.seed, split="test", difficulty=d.difficulty, **d.task_options)


def uses_scratchpad(text: str) -> bool:
    """A worked solution: the chain of thought has more than the one line restating the problem."""
    return sum(1 for line in chain_of_thought(text).splitlines() if line.strip()) >= 2


def evaluate_stage(recipe: Recipe, run_dir: Path, stage: str, examples: list[dict], peak_gflops: float) -> dict:
    model, tokenizer, _ = load_checkpoint(run_dir / stage / CHECKPOINT)
    model.eval()
    e = recipe.eval
    engine = Engine(model, eos_id=tokenizer.eos_id, max_batch_size=256)
    params = SamplingParams(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, seed=e.seed)
    result = evaluate(engine, tokenizer, examples, k=e.k, params=params, template=recipe.data.template, instruction="",
                      out_dir=run_dir / "eval" / stage, peak_gflops=peak_gflops,
                      settings={"model": str(run_dir / stage), "bench": recipe.data.task, "difficulty": recipe.data.difficulty})
    texts = [c["text"] for item in result.items for c in item["completions"]]
    m = result.metrics
    return {"pass@1": m["pass@1"], f"cons@{e.k}": m[f"cons@{e.k}"], "format_rate": m["format_rate"],
            "mean_response_tokens": m["mean_tokens"], "truncated_share": m["truncated"],
            "scratchpad_share": sum(map(uses_scratchpad, texts)) / max(1, len(texts)),
            "eval_seconds": result.cost["wall_seconds"], "eval_flops": result.cost["flops"] or 0.0,
            "samples": [(item["prompt"], item["gold"], item["completions"][0]["text"], item["completions"][0]["correct"])
                        for item in result.items[:4]]}


def run_demo(recipe: Recipe, run_dir: Path, quiet: bool = False) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.toml")
    torch.manual_seed(recipe.pretrain.seed)
    peak = recipe.cost.peak_gflops * 1e9 or measure_matmul_peak() * 1e9
    ledger = CostLedger.empty()
    wall: dict[str, float] = {}

    def stage(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        wall[name] = time.perf_counter() - t0
        if not quiet:
            print(f"r1lab demo: {name} done in {wall[name]:.0f} s", flush=True)
        return result

    base = stage("pretrain", lambda: run_pretrain(recipe, run_dir, peak, quiet))
    ledger.add(base.cost)
    rl = stage("rl", lambda: run_grpo(recipe, run_dir, peak, quiet=quiet))
    ledger.add(rl.cost)
    control = stage("control", lambda: run_control(recipe, run_dir, peak, quiet))
    ledger.add(replace(control.cost, stage="control (not part of the recipe)"))
    examples = heldout_examples(recipe)
    results = {}
    for name in STAGES:
        results[name] = stage(f"eval {name}", lambda n=name: evaluate_stage(recipe, run_dir, n, examples, peak / 1e9))
        ledger.add(StageCost(f"eval {name}", results[name]["eval_flops"], results[name]["eval_seconds"],
                             torch.get_num_threads(), "cpu-core", peak, recipe.cost.cpu_core_hour_usd))
    summary = _summary(recipe, results, wall, base, rl, control, ledger, peak)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "cost.json").write_text(json.dumps(ledger.as_dict(), indent=2) + "\n")
    plots = _plots(run_dir)
    (run_dir / "report.md").write_text(_report(recipe, summary, results, ledger, plots, run_dir))
    return summary


def _summary(recipe, results, wall, base, rl, control, ledger, peak) -> dict:
    k = recipe.eval.k
    strip = lambda r: {key: v for key, v in r.items() if key != "samples"}  # noqa: E731
    rl_gain = results["rl"]["pass@1"] - results["base"]["pass@1"]
    return {
        "machine": describe_machine(), "peak_gflops": peak / 1e9,
        "heldout": {name: strip(results[name]) for name in STAGES},
        "rl_minus_base_pass@1": rl_gain,
        "rl_minus_control_pass@1": results["rl"]["pass@1"] - results["control"]["pass@1"],
        "rl_beats_control": results["rl"]["pass@1"] > results["control"]["pass@1"],
        "wall_seconds": wall, "stage_seconds": {"pretrain": base.seconds, "rl": rl.seconds, "control": control.seconds},
        "cost": ledger.as_dict()["totals"], "eval": {"problems": recipe.eval.problems, "k": k,
                                                    "temperature": recipe.eval.temperature, "top_p": recipe.eval.top_p},
    }


def _plots(run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "rl" / "metrics.jsonl")
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    names = []
    for key, title in (("reward_mean", "reward (mean)"), ("accuracy", "training accuracy"),
                       ("response_length_mean", "response length (tokens)")):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(steps, [r.get(key, 0.0) for r in rows], color="#1f6feb")
        if key == "accuracy" and "format_rate" in rows[0]:
            ax.plot(steps, [r["format_rate"] for r in rows], color="#9a6700", label="format rate")
            ax.legend(loc="lower right")
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{key}.png"
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _report(recipe, summary, results, ledger, plots, run_dir) -> str:
    k = recipe.eval.k
    h = summary["heldout"]
    lines = ["# r1lab demo: R1-Zero on a laptop CPU", "",
             f"Machine: {summary['machine']}; fp32 matmul peak {summary['peak_gflops']:.0f} GFLOP/s.",
             f"Task: {recipe.data.task} (difficulty {recipe.data.difficulty}, options {recipe.data.task_options}); "
             f"corpus of {recipe.data.n_problems} problems, {_pct(recipe.data.scratchpad_share)} worked solutions "
             f"of which a share slips ({recipe.data.slip_rate} per {recipe.data.slip_options or 'digit'}), the rest direct answers.",
             "", f"## Held-out results ({recipe.eval.problems} problems, k={k}, temperature {recipe.eval.temperature}, "
             f"top-p {recipe.eval.top_p})", "",
             f"| model | pass@1 | cons@{k} | format | mean response tokens | scratchpad share | truncated |",
             "|---|---|---|---|---|---|---|"]
    labels = {"base": "base (pretrained)", "rl": "R1-Zero (GRPO)", "control": "control (pretrained longer)"}
    for name in STAGES:
        r = h[name]
        lines.append(f"| {labels[name]} | {_pct(r['pass@1'])} | {_pct(r[f'cons@{k}'])} | {_pct(r['format_rate'])} | "
                     f"{r['mean_response_tokens']:.1f} | {_pct(r['scratchpad_share'])} | {_pct(r['truncated_share'])} |")
    verdict = ("**RL beat the control**" if summary["rl_beats_control"] else "**RL did not beat the control**")
    lines += ["", f"RL changed held-out pass@1 by {100 * summary['rl_minus_base_pass@1']:+.1f} points over the base. "
              f"{verdict}: {100 * summary['rl_minus_control_pass@1']:+.1f} points against the same base pretrained "
              f"for {summary['stage_seconds']['control']:.0f} s (the RL stage took {summary['stage_seconds']['rl']:.0f} s).",
              "", "## What it cost", "", ledger.table(), "",
              f"Prices: ${recipe.cost.cpu_core_hour_usd} per CPU core-hour (a cloud vCPU-hour), "
              f"${recipe.cost.gpu_hour_usd} per GPU-hour (the V3 report's H800 price). FLOPs count matmuls.", ""]
    if plots:
        lines += ["## Training curves", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Sample completions, before and after RL", ""]
    for (prompt, gold, before, ok_b), (_, _, after, ok_a) in zip(results["base"]["samples"], results["rl"]["samples"]):
        lines += [f"**{prompt}** (answer {gold})", "", f"base ({'right' if ok_b else 'wrong'}):", "```", before.strip(), "```",
                  f"RL ({'right' if ok_a else 'wrong'}):", "```", after.strip(), "```", ""]
    lines += ["## Chat with it", "", "```", f"r1lab chat --model {run_dir / 'rl' / CHECKPOINT}",
              f"r1lab serve --model {run_dir / 'rl' / CHECKPOINT}   # then open http://127.0.0.1:8000/", "```", ""]
    return "\n".join(lines)
