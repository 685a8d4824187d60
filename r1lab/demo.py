"""`r1lab demo`: from nothing to a reasoner on this machine, judged honestly, and what it cost.

Stages (each resumes if the run directory already holds it):
  1. tokenizer + synthetic corpus from the recipe's task family (worked solutions, some of which
     slip the way real scratch work does);
  2. pretraining of a tiny DeepSeek-V3-shaped base (MLA, MoE, MTP);
  3. R1-Zero GRPO from the base, rewarded only by rules (accuracy + format);
  4. the control: the same base pretrained further on the same corpus for the FLOPs the RL stage
     spent (`control.match = "flops"`), so RL is measured against imitation given the same compute;
  5. held-out evaluation of base, RL and control, each greedy and with R1's sampling (k samples at
     temperature 0.6, top-p 0.95: pass@1, cons@k, pass@j for j = 1, 2, 4, ... k), then the verdicts
     (each model at its best decoding, `evalreport.verdict`), report.md, summary.json, cost.json and
     plots (training curves, pass@k curves).

A gain that greedy decoding gives for free is no gain: every comparison here is made at each
model's best decoding, and the report says in words which held.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from dataclasses import replace
from html import escape
from importlib.resources import files
from pathlib import Path

import torch

from r1lab.checkpoint import load_checkpoint
from r1lab.cost import CostLedger
from r1lab.device import resolve_device
from r1lab.eval import EvalResult
from r1lab.evalreport import GREEDY, BestDecoding, Verdict, best_decoding, item_scores, verdict
from r1lab.hardware import describe_machine, measure_matmul_peak
from r1lab.recipe import Recipe, load_recipe, save_recipe
from r1lab.rewards import chain_of_thought
from r1lab.train.common import CHECKPOINT, read_metrics, stage_cost
from r1lab.train.data import task_documents
from r1lab.train.stages import evaluate_heldout, heldout_examples, run_control, run_grpo, run_pretrain

STAGES = ("base", "rl", "control")
HELDOUT_FILE = "heldout.jsonl"
LABELS = {"base": "base (pretrained)", "rl": "R1-Zero (GRPO)", "control": "control (pretrained, same FLOPs as RL)"}
QUICK = ["--data.n_problems=600", "--pretrain.steps=12", "--pretrain.log_every=4", "--pretrain.eval_every=12",
         "--pretrain.batch_size=8", "--grpo.steps=2", "--grpo.prompts_per_step=4", "--grpo.group_size=4",
         "--grpo.max_new_tokens=48", "--control.batch_size=8", "--eval.problems=8", "--eval.k=4",
         "--eval.max_new_tokens=48", "--eval.samples_shown=2"]


EVAL_ROWS = 1024
"""Rows the evaluation engine decodes at once (32 prompts x k = 32 samples): the tiny model's decode step
is overhead-bound, so wider steps are cheaper per token; the engine's tokens do not depend on it."""


def demo_recipe(path: str | Path | None, overrides: list[str], quick: bool) -> Recipe:
    default = files("r1lab").joinpath("recipes/r1-zero-tiny.toml")
    return load_recipe(path or str(default), (QUICK if quick else []) + overrides)


def write_heldout(examples: list[dict], path: Path) -> None:
    """The held-out problems as a benchmark JSONL, so any endpoint can be asked exactly these
    (`r1lab eval --api-base URL --bench runs/demo/heldout.jsonl --instruction ''`)."""
    rows = ({"id": ex["id"], "prompt": ex["prompt"], "answer": ex["answer"]} for ex in examples)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def corpus_summary(recipe: Recipe) -> dict:
    """What the pretraining corpus teaches: how often a problem is worked out, and how often right."""
    docs = [] if recipe.data.files else task_documents(recipe.data)
    worked = [d for d in docs if d.worked]
    direct = [d for d in docs if not d.worked]
    share = lambda part: len(part) / len(docs) if docs else 0.0  # noqa: E731
    right = lambda part: sum(d.correct for d in part) / len(part) if part else None  # noqa: E731
    return {"documents": len(docs), "worked_share": share(worked), "direct_share": share(direct),
            "worked_correct": right(worked), "direct_correct": right(direct)}


def uses_scratchpad(text: str) -> bool:
    """A worked solution: the chain of thought has more than the one line restating the problem."""
    return sum(1 for line in chain_of_thought(text).splitlines() if line.strip()) >= 2


def evaluate_stage(recipe: Recipe, run_dir: Path, stage: str, examples: list[dict], peak_gflops: float,
                   device: torch.device | None = None) -> EvalResult:
    """The stage's checkpoint on the held-out examples, sampled (k per item) and greedy."""
    model, tokenizer, _ = load_checkpoint(run_dir / stage / CHECKPOINT, device)
    return evaluate_heldout(recipe, model, tokenizer, examples, run_dir / "eval" / stage, peak_gflops, EVAL_ROWS,
                            str(run_dir / stage))


def stage_summary(result: EvalResult) -> dict:
    """What summary.json keeps of one model's evaluation: greedy, sampled and its best decoding."""
    k = result.settings["k"]
    g, s = result.greedy.metrics, result.metrics
    texts = [c["text"] for item in result.items for c in item["completions"]]

    def shape(m: dict) -> dict:
        return {"pass@1": m["pass@1"], "format_rate": m["format_rate"], "mean_response_tokens": m["mean_tokens"],
                "truncated_share": m["truncated"]}

    return {"greedy": shape(g),
            "sampled": {**shape(s), f"cons@{k}": s[f"cons@{k}"],
                        "pass@k": {str(j): s[f"pass@{j}"] if j > 1 else s["pass@1"] for j in result.settings["ks"]},
                        "scratchpad_share": sum(map(uses_scratchpad, texts)) / max(1, len(texts))},
            "best": result.best(), **result.spent()}


def best_of(result: EvalResult) -> BestDecoding:
    return best_decoding(item_scores(result.greedy.items), item_scores(result.items))


def greedy_of(result: EvalResult) -> BestDecoding:
    scores = item_scores(result.greedy.items)
    return BestDecoding(GREEDY, sum(scores.values()) / len(scores), scores)


def verdicts(results: dict[str, EvalResult]) -> dict[str, Verdict]:
    """The comparisons the demo claims, each decided on the same held-out items."""
    return {"rl_vs_control": verdict("RL", best_of(results["rl"]), "control", best_of(results["control"])),
            "rl_vs_base": verdict("RL", best_of(results["rl"]), "base", best_of(results["base"])),
            "rl_greedy_vs_base_greedy": verdict("RL", greedy_of(results["rl"]), "base", greedy_of(results["base"]),
                                                basis="with both decoding greedily")}


def run_demo(recipe: Recipe, run_dir: Path, quiet: bool = False) -> dict:
    started = time.perf_counter()
    device = resolve_device(recipe.device)  # before anything is written or measured
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.toml")
    torch.manual_seed(recipe.pretrain.seed)
    peak = recipe.cost.peak_gflops * 1e9 or measure_matmul_peak(device=device) * 1e9
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
    control = stage("control", lambda: run_control(recipe, run_dir, peak, quiet, rl_flops=rl.flops))
    ledger.add(replace(control.cost, stage="control (not part of the recipe)"))
    examples = heldout_examples(recipe)
    write_heldout(examples, run_dir / HELDOUT_FILE)
    results: dict[str, EvalResult] = {}
    for name in STAGES:
        results[name] = stage(f"eval {name}",
                              lambda n=name: evaluate_stage(recipe, run_dir, n, examples, peak / 1e9, device))
        s = stage_summary(results[name])
        ledger.add(stage_cost(f"eval {name}", s["eval_flops"], s["eval_seconds"], recipe.cost, peak, device))
    judged = verdicts(results)
    wall["total"] = time.perf_counter() - started
    summary = _summary(recipe, results, judged, wall, base, rl, control, ledger, peak)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "cost.json").write_text(json.dumps(ledger.as_dict(), indent=2) + "\n")
    plots = _plots(run_dir, summary)
    (run_dir / "report.md").write_text(_report(recipe, summary, results, judged, ledger, plots, run_dir))
    return summary


def _summary(recipe, results, judged, wall, base, rl, control, ledger, peak) -> dict:
    heldout = {name: stage_summary(results[name]) for name in STAGES}
    k = recipe.eval.k
    return {
        "machine": describe_machine(), "peak_gflops": peak / 1e9, "corpus": corpus_summary(recipe),
        "heldout": heldout,
        "verdicts": {name: v.as_dict() for name, v in judged.items()},
        "rl_beats_control": judged["rl_vs_control"].beat,
        "rl_beats_base": judged["rl_vs_base"].beat,
        "rl_greedy_beats_base_greedy": judged["rl_greedy_vs_base_greedy"].beat,
        "rl_minus_control_best_pass@1": judged["rl_vs_control"].margin,
        "rl_minus_base_best_pass@1": judged["rl_vs_base"].margin,
        f"rl_minus_base_pass@{k}": heldout["rl"]["sampled"]["pass@k"][str(k)] - heldout["base"]["sampled"]["pass@k"][str(k)],
        "wall_seconds": wall, "stage_seconds": {"pretrain": base.seconds, "rl": rl.seconds, "control": control.seconds},
        "stage_flops": {"pretrain": base.flops, "rl": rl.flops, "control": control.flops},
        "control_steps": control.steps,
        "cost": ledger.as_dict()["totals"],
        "peak_rss_bytes": peak_rss_bytes(),
        "eval": {"problems": recipe.eval.problems, "k": k, "temperature": recipe.eval.temperature,
                 "top_p": recipe.eval.top_p, "max_new_tokens": recipe.eval.max_new_tokens, "seed": recipe.eval.seed},
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _plots(run_dir: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    colors = {"base": "#6e7781", "rl": "#1f6feb", "control": "#9a6700"}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for stage in STAGES:
        h = summary["heldout"][stage]
        curve = h["sampled"]["pass@k"]
        ks = [int(j) for j in curve]
        ax.plot(ks, [100 * curve[str(j)] for j in ks], marker="o", color=colors[stage], label=LABELS[stage])
        ax.axhline(100 * h["greedy"]["pass@1"], color=colors[stage], linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(j) for j in ks])
    ax.set_xlabel(f"k (samples at temperature {summary['eval']['temperature']}); dotted: greedy pass@1")
    ax.set_ylabel("held-out pass@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "pass_at_k.png", dpi=110)
    plt.close(fig)
    names.append("pass_at_k.png")

    rows = read_metrics(run_dir / "rl" / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    for key, title in (("reward_mean", "reward (mean)"), ("accuracy", "training accuracy"),
                       ("response_length_mean", "response length (tokens)")):
        if not rows:
            break
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(steps, [r.get(key, 0.0) for r in rows], color="#1f6feb")
        if key == "accuracy" and "format_rate" in rows[0]:
            ax.plot(steps, [r["format_rate"] for r in rows], color="#9a6700", label="format rate")
            ax.legend(loc="lower right")
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / f"{key}.png", dpi=110)
        plt.close(fig)
        names.append(f"{key}.png")
    return names


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _corpus_sentence(c: dict) -> str:
    if not c["documents"]:
        return "Pretrained on the recipe's own files."
    parts = [f"The corpus has {c['documents']:,} documents: {_pct(c['worked_share'])} worked solutions"]
    if c["worked_correct"] is not None:
        parts[0] += f" ({_pct(c['worked_correct'])} of them right)"
    if c["direct_correct"] is not None:
        parts.append(f"{_pct(c['direct_share'])} direct answers ({_pct(c['direct_correct'])} of them right)")
    return ", ".join(parts) + "."


def _pass_at_k_sentence(summary: dict) -> str:
    """What RL did to the base's pass@k, at k = 1 and at the largest k, and where the control stands at
    the largest k, in words and points."""
    return _rl_against_base(summary) + " " + _rl_against_control_at_k(summary)


def _rl_against_control_at_k(summary: dict) -> str:
    k = summary["eval"]["k"]
    rl, control = (summary["heldout"][name]["sampled"]["pass@k"][str(k)] for name in ("rl", "control"))
    at_k = f"control {_pct(control)}, RL {_pct(rl)}"
    if abs(rl - control) < 0.02:
        return f"Against the control at k = {k} the two are level ({at_k})."
    if rl > control:
        return f"Against the control at k = {k} RL is {100 * (rl - control):.1f} points higher ({at_k})."
    return (f"Against the control at k = {k} RL is {100 * (control - rl):.1f} points lower ({at_k}): given "
            f"{k} tries and a verifier to pick the right one, the imitator reaches more problems; RL's gain is "
            "in what it answers first.")


def _rl_against_base(summary: dict) -> str:
    k = summary["eval"]["k"]
    base, rl = summary["heldout"]["base"]["sampled"]["pass@k"], summary["heldout"]["rl"]["sampled"]["pass@k"]
    d1, dk = rl["1"] - base["1"], rl[str(k)] - base[str(k)]
    first = f"RL moved sampled pass@1 by {100 * d1:+.1f} points ({_pct(base['1'])} -> {_pct(rl['1'])})"
    at_k = f"pass@{k} {_pct(base[str(k)])} -> {_pct(rl[str(k)])}"
    if abs(dk) < 0.02:
        why = (f"the answers RL now gives first were already among the base's {k} samples; RL made them its "
               "first choice rather than reaching new ones" if d1 >= 0.02 else "sampling reaches as much with both")
        return f"{first}; at k = {k} the two are level ({at_k}): {why}."
    if dk > 0:
        return (f"{first}; at k = {k} RL is {100 * dk:.1f} points higher ({at_k}): it solves items that {k} "
                "samples of the base rarely solve.")
    return (f"{first}; at k = {k} RL is {100 * -dk:.1f} points lower ({at_k}): RL narrowed what the base could "
            "reach by sampling, as Yue et al. (2025) report at scale.")


def _report(recipe, summary, results, judged, ledger, plots, run_dir) -> str:
    k, e = recipe.eval.k, recipe.eval
    h = summary["heldout"]
    d = recipe.data
    lines = ["# r1lab demo: R1-Zero on a laptop CPU", "",
             f"Machine: {summary['machine']}; fp32 matmul peak {summary['peak_gflops']:.0f} GFLOP/s.",
             f"Task: {d.task} (difficulty {d.difficulty}, options {d.task_options}). "
             + _corpus_sentence(summary["corpus"]), "",
             f"## Held-out results ({e.problems} problems; greedy, and k = {k} samples at temperature "
             f"{e.temperature}, top-p {e.top_p})", "",
             f"| model | greedy pass@1 | pass@1, T={e.temperature} | best decoding | cons@{k} | pass@{k} | format "
             "(greedy) | mean response tokens (greedy) | scratchpad share (sampled) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in STAGES:
        r = h[name]
        s, g, best = r["sampled"], r["greedy"], r["best"]
        lines.append(f"| {LABELS[name]} | {_pct(g['pass@1'])} | {_pct(s['pass@1'])} | **{_pct(best['pass@1'])}** "
                     f"({best['decoding']}) | {_pct(s[f'cons@{k}'])} | {_pct(s['pass@k'][str(k)])} | "
                     f"{_pct(g['format_rate'])} | {g['mean_response_tokens']:.1f} | {_pct(s['scratchpad_share'])} |")
    lines += ["", "## Verdict (each model at its best decoding, on the same items)", ""]
    for v in judged.values():
        lines.append(f"- {'held' if v.beat else 'did not hold'}: {v.sentence()}")
    headline = ("**RL beat the control**" if judged["rl_vs_control"].beat else "**RL did not beat the control**")
    lines += ["", f"{headline}: the control is the base pretrained further on the same corpus for the FLOPs the RL "
                  f"stage spent ({summary['control_steps']} steps, {summary['stage_flops']['control']:.3g} FLOPs "
                  f"against RL's {summary['stage_flops']['rl']:.3g}; {summary['stage_seconds']['control']:.0f} s "
                  f"against RL's {summary['stage_seconds']['rl']:.0f} s). A verdict holds when the margin exceeds "
                  "two paired standard errors.",
              "", f"pass@k: {_pass_at_k_sentence(summary)}", ""]
    if "pass_at_k.png" in plots:
        lines += ["![pass@k](pass_at_k.png)", ""]
    lines += ["## What it cost", "", ledger.table(), "",
              f"Whole run: {summary['wall_seconds']['total'] / 60:.1f} min wall clock, peak memory "
              f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB.",
              "",
              f"Prices: ${recipe.cost.cpu_core_hour_usd} per CPU core-hour (a cloud vCPU-hour), "
              f"${recipe.cost.gpu_hour_usd} per GPU-hour (the V3 report's H800 price). FLOPs count matmuls.", ""]
    curves = [p for p in plots if p != "pass_at_k.png"]
    if curves:
        lines += ["## Training curves", ""] + [f"![{p}]({p})" for p in curves] + [""]
    lines += _samples_section(results, e.samples_shown, e.seed)
    lines += ["## Chat with it", "", "```", f"r1lab chat --model {run_dir / 'rl' / CHECKPOINT}",
              f"r1lab serve --model {run_dir / 'rl' / CHECKPOINT}   # then open http://127.0.0.1:8000/", "```", ""]
    return "\n".join(lines)


def _samples_section(results: dict[str, EvalResult], n: int, seed: int) -> list[str]:
    """A seeded random draw of held-out problems, base and RL greedy completions side by side."""
    base, rl = results["base"].greedy.items, results["rl"].greedy.items
    picked = sorted(random.Random(f"r1lab-demo-samples:{seed}").sample(range(len(base)), min(n, len(base))))
    lines = ["## Sample completions (a seeded random draw of held-out problems, greedy)", ""]
    for i in picked:
        b, r = base[i]["completions"][0], rl[i]["completions"][0]
        cell = lambda c: f"<td><pre>{escape(c['text'].strip())}</pre>{'right' if c['correct'] else 'wrong'}</td>"  # noqa: E731
        lines += [f"**{escape(base[i]['prompt'])}** (answer {base[i]['gold']})", "",
                  "<table><tr><th>base</th><th>RL</th></tr>", f"<tr>{cell(b)}{cell(r)}</tr></table>", ""]
    return lines
