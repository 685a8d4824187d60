"""A GRPO step: r1lab's `train_grpo` against TRL's `GRPOTrainer` on the same work, in the same run.

The work (one optimizer step per rollout): 8 prompts x 8 samples of 2-digit addition, `--lengths` new
tokens at most, sampling at temperature 1, the DAPO token-mean loss with beta 0 (no reference model),
one pass, AdamW, float32, no vLLM, no gradient checkpointing. Random weights, so nearly every
completion runs to the length cap and every reward is 0 (backward and the optimizer still run in full).
Both sides use one tokenizer (r1lab's BPE, 382 ids, trained here) and prompts rendered with r1lab's R1
template, and score with r1lab's accuracy + format rewards. Pairs:
  dense  r1lab's dense shape of `bench_generate.DENSE` vs a Qwen2 with the same FLOPs per token;
  moe    r1lab's `tiny` MoE preset vs HF `DeepseekV3ForCausalLM` exported from the same weights.
r1lab runs with eager and with compiled rollouts (`grpo.compile_rollouts`). Each run is a fresh process
of `--steps` steps; the sides run back to back per pair and length, `--reps` times in alternating order.
Seconds per step are the median over the steps after the first (which pays for lazy set-up and, compiled,
for compiling). GFLOP/s counts matmul FLOPs one convention for both sides: forward FLOPs per token x 64 x
(prompt + longest completion) x 4 passes (rollout, forward and backward of the update); set against the
fp32 matmul peak measured in this run with the same threads. Under the table, each pair and length's
ceiling: r1lab's own matmul FLOPs for a step at that peak, the least time a step can take, so TRL's time
over it is the largest speed-up the machine allows, and the target's share of the peak follows.

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo.py [--lengths 64 128] [--pairs dense moe] [--steps 6]
        [--reps 1] [--no-compile] [--no-append]      # needs `pip install -e .[bench]` (trl)
    python benchmarks/bench_grpo.py --profile [--pair dense] [--length 64]   # torch.profiler on one r1lab step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DENSE, QWEN2  # noqa: E402
from common import append_results  # noqa: E402

from r1lab.config import model_preset  # noqa: E402
from r1lab.cost import generate_flops_per_token  # noqa: E402
from r1lab.hardware import measure_matmul_peak  # noqa: E402
from r1lab.recipe import CostConfig, GRPOConfig, OptimConfig  # noqa: E402
from r1lab.tasks import get_family  # noqa: E402
from r1lab.tokenizer import R1, Tokenizer, render_prompt  # noqa: E402

PROMPTS, GROUP, N_POOL = 8, 8, 256
WEIGHTS = {"accuracy": 1.0, "format": 0.5}
TARGETS = {"dense": 2.0, "moe": 5.0}  # issue [I]: the speed-ups over TRL a step must reach


def pool() -> list[dict]:
    return get_family("arithmetic").generate(N_POOL, seed=1, split="train", difficulty=2, ops=["+"])


def make_tokenizer(out: Path) -> Path:
    """r1lab's BPE on addition prompts and worked answers: 382 ids, as the baseline's vocabulary."""
    texts = [f"{ex['prompt']} <think>\n{ex['solution']}\n</think>\n<answer>{ex['answer']}</answer>"
             for ex in get_family("arithmetic").generate(2000, seed=7, split="train", difficulty=2, ops=["+"])]
    tokenizer = Tokenizer.train(texts, DENSE.vocab_size)
    return tokenizer.save(out)


def model_config(pair: str):
    return DENSE if pair == "dense" else model_preset("tiny")


def flops_per_token(pair: str, trl_model=None) -> float:
    """Forward matmul FLOPs per token: r1lab's count (active experts only); a dense HF model's 2 x weights."""
    if pair == "dense" and trl_model is not None:
        return 2 * sum(p.numel() for p in trl_model.parameters())  # the head is tied to the embedding
    return generate_flops_per_token(model_config(pair), 0)


def grpo_config(length: int, steps: int, compile_rollouts: bool) -> GRPOConfig:
    return GRPOConfig(steps=steps, prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=length, loss="dapo",
                      epochs=1, minibatch_size=PROMPTS * GROUP, eps_low=0.2, eps_high=0.2, beta=0.0,
                      reward_weights=dict(WEIGHTS), save_every=0, compile_rollouts=compile_rollouts,
                      optim=OptimConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, beta2=0.999))


# -- workers: one side, one pair, one length, in a fresh process ----------------------------------------------
def r1lab_worker(spec: dict) -> dict:
    from r1lab.model import Transformer
    from r1lab.train.rl import train_grpo

    tokenizer = Tokenizer.load(spec["tok"])
    torch.manual_seed(0)
    model = Transformer(model_config(spec["pair"]))
    cfg = grpo_config(spec["length"], spec["steps"], spec["compile"])
    run = Path(spec["dir"]) / f"r1lab-{spec['pair']}-{spec['length']}-{spec['compile']}"
    train_grpo(model, tokenizer, pool(), cfg, run, R1, CostConfig(), 1e9, quiet=True)
    prompt_len = len(render_prompt(tokenizer, pool()[0]["prompt"], R1))
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        tokens = m["response_length_mean"] * PROMPTS * GROUP
        steps.append(dict(seconds=m["step_seconds"], rollout=tokens / m["rollout_tokens_per_s"],
                          tokens=tokens, longest=m["response_length_max"]))
    return dict(steps=steps, prompt_len=prompt_len, flops_per_token=flops_per_token(spec["pair"]))


def trl_worker(spec: dict) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from r1lab.sampling import Sampled, grade

    tokenizer = Tokenizer.load(spec["tok"])
    hf_tok = AutoTokenizer.from_pretrained(spec["tok"])
    hf_tok.padding_side = "left"
    torch.manual_seed(0)
    if spec["pair"] == "dense":
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                                             bos_token_id=tokenizer.bos_id)).float()
    else:  # r1lab's tiny MoE, exported: the same weights as the r1lab side's
        from r1lab.hf import export_hf
        from r1lab.model import Transformer

        out = export_hf(Transformer(model_config("moe")), Path(spec["dir"]) / f"hf-moe-{spec['length']}", tokenizer)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tokenizer.pad_id, tokenizer.eos_id
    examples = pool()
    rendered = [render_prompt(tokenizer, ex["prompt"], R1) for ex in examples]
    texts = [tokenizer.decode(ids) for ids in rendered]
    same = sum(hf_tok(t, add_special_tokens=False)["input_ids"] == ids for t, ids in zip(texts, rendered))
    rows = [{"prompt": t, "example": json.dumps(ex)} for t, ex in zip(texts, examples)]

    def reward(completions, example, **_):
        samples = [Sampled(json.loads(e), [], [], text, "stop") for e, text in zip(example, completions)]
        return [s.reward for s in grade(samples, WEIGHTS, think_opened=True)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.logs, self.begin = [], {}, 0.0

        def on_train_begin(self, args, state, control, **_):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **_):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **_):
            if logs and "completions/mean_length" in logs:
                self.logs[state.global_step] = logs

    n = PROMPTS * GROUP
    args = TRLConfig(output_dir=str(Path(spec["dir"]) / "trl-out"), use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
                     num_generations=GROUP, max_completion_length=spec["length"], max_steps=spec["steps"],
                     learning_rate=1e-5, beta=0.0, loss_type="dapo", use_vllm=False, gradient_checkpointing=False,
                     temperature=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     dataloader_pin_memory=False, disable_tqdm=True, model_init_kwargs=None)
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=hf_tok, callbacks=[timer])
    trainer.train()
    starts = [timer.begin] + timer.ends[:-1]
    steps = []
    for i, (start, end) in enumerate(zip(starts, timer.ends), start=1):
        log = timer.logs.get(i, {})
        steps.append(dict(seconds=end - start, rollout=None, tokens=log.get("completions/mean_length", 0.0) * n,
                          longest=log.get("completions/max_length", spec["length"])))
    return dict(steps=steps, prompt_len=len(rendered[0]), flops_per_token=flops_per_token(spec["pair"], model),
                same_prompt_ids=f"{same}/{len(rendered)}")


def run_worker(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['side']} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the profile of one r1lab step ---------------------------------------------------------------------------------
PHASES = ("grpo.rollout", "grpo.reward", "grpo.logprob_forward", "grpo.backward", "grpo.optimizer")


def profile(pair: str, length: int, tok: Path, work: Path, top: int = 15) -> str:
    """One r1lab GRPO step under torch.profiler, after a warm-up step: its phases (the record_function
    ranges `train/rl.py` marks), then the operators that took the most time of their own."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from r1lab.model import Transformer
    from r1lab.train.rl import train_grpo

    tokenizer = Tokenizer.load(tok)
    torch.manual_seed(0)
    model = Transformer(model_config(pair))
    examples = pool()
    cfg = grpo_config(length, 1, False)
    train_grpo(model, tokenizer, examples, cfg, work / "warm-up", R1, CostConfig(), 1e9, quiet=True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train_grpo(model, tokenizer, examples, cfg, work / "profiled", R1, CostConfig(), 1e9, quiet=True)
        total = time.perf_counter() - start
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    lines = [f"{pair} model, {length} new tokens, {torch.get_num_threads()} thread(s): one step {total:.2f} s "
             f"(under the profiler)", "", "| phase | s | share |", "|---|---|---|"]
    for name in PHASES:
        if name in by_name:
            t = by_name[name].cpu_time_total / 1e6
            lines.append(f"| {name} | {t:.3f} | {100 * t / total:.0f}% |")
    lines += ["", "| operator | self s | calls |", "|---|---|---|"]
    ops = sorted((e for e in events if not e.key.startswith("grpo.")), key=lambda e: -e.self_cpu_time_total)
    lines += [f"| {e.key} | {e.self_cpu_time_total / 1e6:.3f} | {e.count} |" for e in ops[:top]]
    padded, shared = prompt_pass_timings(model, tokenizer, examples, length)
    lines += ["", f"Policy forward + backward on one rollout-sized batch, in this process, alternated (median of "
                  f"5): every row's prompt in one padded forward {padded:.3f} s, each group's prompt once "
                  f"{shared:.3f} s: {padded / shared:.2f}x."]
    return "\n".join(lines)


def prompt_pass_timings(model, tokenizer: Tokenizer, examples: list[dict], length: int) -> tuple[float, float]:
    """Seconds of forward + backward over 8 prompts x 8 completions of up to `length` tokens: (every row's
    prompt + completion in one padded forward, each distinct prompt once then the completions over its cache)."""
    from r1lab.train.rl import completion_logprobs, completion_mask, padded_logits

    g = torch.Generator().manual_seed(0)
    prompts = [render_prompt(tokenizer, ex["prompt"], R1) for ex in examples[:PROMPTS] for _ in range(GROUP)]
    completions = [torch.randint(10, tokenizer.vocab_size, (length - int(torch.randint(0, 8, (), generator=g)),),
                                 generator=g).tolist() for _ in prompts]
    width = max(map(len, completions))
    comp = torch.full((len(prompts), width), tokenizer.pad_id)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c)
    real = completion_mask(completions, width).bool()
    model.train()

    def padded():
        padded_logits(model, prompts, comp, tokenizer.pad_id, real).float().log_softmax(-1).gather(-1, comp[..., None]).sum().backward()

    def shared():
        completion_logprobs(model, prompts, completions, tokenizer.pad_id, width, torch.device("cpu"))[0].sum().backward()

    times: dict = {padded: [], shared: []}
    for _ in range(6):
        for fn in times:
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[padded][1:]), statistics.median(times[shared][1:])


# -- the parent: alternate the sides, summarise, append ----------------------------------------------------------
def summarise(label: str, pair: str, length: int, results: list[dict], peak: float) -> dict:
    later = [s for r in results for s in (r["steps"][1:] or r["steps"])]
    fpt, prompt_len = results[0]["flops_per_token"], results[0]["prompt_len"]
    work = [fpt * PROMPTS * GROUP * (prompt_len + s["longest"]) * 4 for s in later]
    seconds = [s["seconds"] for s in later]
    rollout = [s["rollout"] for s in later if s["rollout"] is not None]
    return dict(label=label, pair=pair, length=length, seconds=statistics.median(seconds),
                spread=f"{min(seconds):.2f}-{max(seconds):.2f}", rollout=statistics.median(rollout) if rollout else None,
                tps=statistics.median(s["tokens"] / s["seconds"] for s in later),
                gflops=statistics.median(w / s / 1e9 for w, s in zip(work, seconds)),
                first=statistics.median(r["steps"][0]["seconds"] for r in results), prompt_len=prompt_len,
                same=results[0].get("same_prompt_ids", ""), peak=peak)


def format_row(r: dict, trl_seconds: float) -> str:
    rollout = "-" if r["rollout"] is None else f"{r['rollout']:.2f}"
    ratio = "1.00x" if r["label"] == "TRL" else f"**{trl_seconds / r['seconds']:.2f}x**"
    return (f"| {r['pair']} | {r['length']} | {r['label']} | {r['seconds']:.2f} | {r['spread']} | {rollout} | "
            f"{r['tps']:,.0f} | {r['gflops']:.1f} | {100 * r['gflops'] / r['peak']:.0f}% | {r['first']:.1f} | {ratio} |")


def ceiling(pair: str, length: int, r1lab: list[dict], trl_seconds: float, peak: float, target: float) -> str:
    """What the machine allows: r1lab's own matmul FLOPs per step (a rollout: each distinct prompt once, then
    every sampled token; the update's forward and backward, 3x: each distinct prompt once, then each row's
    completion less its last token, padded to the longest) at the peak of this run is the least time a step
    can take; TRL's median over it bounds any r1lab speed-up, and the target needs that share of the peak."""
    steps = [s for r in r1lab for s in (r["steps"][1:] or r["steps"])]
    fpt, prompt_len, rows = r1lab[0]["flops_per_token"], r1lab[0]["prompt_len"], PROMPTS * GROUP
    flops = statistics.median(fpt * (PROMPTS * prompt_len + s["tokens"])
                              + 3 * fpt * (PROMPTS * prompt_len + rows * (s["longest"] - 1)) for s in steps)
    floor = flops / (peak * 1e9)
    return (f"{pair}, {length} new tokens: r1lab's matmul work {flops / 1e9:.1f} GFLOP a step; at the peak "
            f"{floor:.2f} s, so no r1lab step can beat TRL's {trl_seconds:.2f} s by more than "
            f"{trl_seconds / floor:.1f}x; {target:g}x needs {100 * target * floor / trl_seconds:.0f}% of the peak "
            f"over the whole step.")


HEADER = ["| pair | new tokens | side | s/step (median) | s/step range | rollout s | completion tok/s | GFLOP/s "
          "| of peak | first step s | speed-up vs TRL |", "|---|---|---|---|---|---|---|---|---|---|---|"]


def compare(args, tok: Path, work: Path, peak: float) -> tuple[list[str], list[str]]:
    """The table's rows and, per pair and length, the `ceiling` line."""
    sides = [("r1lab eager", "r1lab", False)] + ([] if args.no_compile else [("r1lab compiled", "r1lab", True)])
    sides.append(("TRL", "trl", False))
    rows, ceilings = [], []
    for pair in args.pairs:
        for length in args.lengths:
            results: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
            for rep in range(args.reps):
                for label, side, compiled in (sides if rep % 2 == 0 else sides[::-1]):
                    spec = dict(side=side, pair=pair, length=length, compile=compiled, steps=args.steps,
                                tok=str(tok), dir=str(work))
                    start = time.perf_counter()
                    results[label].append(run_worker(spec, args.threads))
                    print(f"{pair} {length} {label} rep {rep}: {time.perf_counter() - start:.0f} s, steps "
                          + ", ".join(f"{s['seconds']:.2f}" for s in results[label][-1]["steps"]), flush=True)
            summaries = [summarise(label, pair, length, results[label], peak) for label, _, _ in sides]
            trl = summaries[-1]["seconds"]
            rows += [format_row(s, trl) for s in summaries]
            print("\n".join(HEADER + rows[-len(sides):]), flush=True)
            ceilings.append(ceiling(pair, length, results["r1lab eager"], trl, peak, TARGETS[pair]))
            print(ceilings[-1], flush=True)
            if summaries[-1]["same"]:
                print(f"prompt ids TRL's tokenizer gives the same as r1lab's: {summaries[-1]['same']}; "
                      f"prompt {summaries[-1]['prompt_len']} tokens", flush=True)
    return rows, ceilings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--pairs", nargs="+", choices=["dense", "moe"], default=["dense", "moe"])
    parser.add_argument("--steps", type=int, default=6, help="steps per process (the first is not timed)")
    parser.add_argument("--reps", type=int, default=1, help="fresh processes per side, pair and length")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--no-compile", action="store_true", help="skip r1lab's compiled rollouts")
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    parser.add_argument("--profile", action="store_true", help="profile one r1lab step instead (eager rollouts)")
    parser.add_argument("--pair", choices=["dense", "moe"], default="dense", help="--profile: the model")
    parser.add_argument("--length", type=int, default=64, help="--profile: new tokens")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps((r1lab_worker if spec["side"] == "r1lab" else trl_worker)(spec)))
        return
    with tempfile.TemporaryDirectory(prefix="r1lab-bench-grpo-") as tmp:
        tok = make_tokenizer(Path(tmp) / "tok")
        if args.profile:
            print(profile(args.pair, args.length, tok, Path(tmp)))
            return
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # compiled runs share one cache
        peak = measure_matmul_peak()
        print(f"fp32 matmul peak, {args.threads} thread(s): {peak:.1f} GFLOP/s", flush=True)
        rows, ceilings = compare(args, tok, Path(tmp), peak)
        peak_after = measure_matmul_peak()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        profiled = subprocess.run([sys.executable, __file__, "--profile", "--pair", "dense", "--length", "64"], env=env,
                                  capture_output=True, text=True, check=True).stdout.strip()
        print(profiled, flush=True)
    print(f"fp32 matmul peak again after the runs: {peak_after:.1f} GFLOP/s")
    body = (f"OMP_NUM_THREADS={args.threads} for both sides. fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s "
            f"before, {peak_after:.1f} after (\"of peak\" uses the first). {PROMPTS} prompts x {GROUP} samples, "
            f"DAPO loss, beta 0, one pass, one AdamW step per rollout; {args.steps} steps per fresh process, "
            f"{args.reps} process(es) per side; median over the steps after the first. Rollout s: r1lab's rollout "
            f"(generation and rewards) within the step. First step s: set-up and, compiled, compiling (the inductor "
            f"cache is shared within the run). Speed-up: TRL's median s/step over the side's.\n\n"
            + "\n".join(HEADER + rows)
            + "\n\nThe most the machine allows (`ceiling`):\n\n" + "\n".join(f"- {c}" for c in ceilings)
            + "\n\nOne r1lab step under torch.profiler (eager rollouts; `--profile`):\n\n" + profiled)
    print("\n" + body)
    if not args.no_append:
        append_results("grpo: r1lab train_grpo vs TRL GRPOTrainer", body, ("torch", "transformers", "trl"))


if __name__ == "__main__":
    main()
