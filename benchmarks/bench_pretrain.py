"""Pretraining throughput: training tokens/s and MFU of r1lab's presets, against the peak of the same run.

One optimizer step is what `r1lab pretrain` runs per step (`train/pretrain.py`): the loss (next token
+ MTP + balance), backward, gradient clipping, AdamW, the aux-loss-free bias update. The batch is
a fixed random token batch whose targets are the inputs shifted by one, so the loss falls and the
router's loads move as in training. FLOPs per step come from `cost.train_flops_per_token` (matmuls,
3x forward, causal attention over the mean key count), the figure every r1lab run reports as MFU;
the fp32 matmul peak (`hardware.measure_matmul_peak`) is measured before and after the timed steps
and the larger reading is the bar. Median step time of `--steps` timed steps after `--warmup`.

Each preset runs twice from the same initialisation: eager (`model.loss`) and with the loss compiled
(`train.common.loss_fn(model, compile=True)`, what `pretrain.compile` turns on). The compiled run's
first step, which compiles, is timed on its own ("compile s": that step minus an eager step), and the
table gives the compiled over eager ratio of step time.

With `--profile`, one eager step of each preset also runs under torch.profiler after the timed ones: its
phases (loss forward, backward, clipping + AdamW + bias update) and the operators that took the most time of
their own, with the share the matrix products (mm, bmm, baddbmm, grouped mm) take of the step. That share,
against what the counted FLOPs would take at the peak, says where an MFU short of the peak goes.

    python benchmarks/bench_pretrain.py [--presets tiny small] [--steps 20] [--warmup 5] [--profile] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from r1lab.config import model_preset  # noqa: E402
from r1lab.cost import count_parameters, train_flops_per_token  # noqa: E402
from r1lab.hardware import measure_matmul_peak  # noqa: E402
from r1lab.model import Transformer  # noqa: E402
from r1lab.recipe import OptimConfig  # noqa: E402
from r1lab.train.common import loss_fn, make_optimizer  # noqa: E402

# (batch size, sequence length) per preset: the demo's pretraining shape for tiny, a CPU-sized one for small.
SHAPES = {"tiny": (16, 128), "small": (4, 256)}


MATMULS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::_grouped_mm")


def setup(preset: str, compile: bool):
    """(config, a training step function returning the loss) on a fixed random batch of the preset's shape."""
    batch, seq_len = SHAPES[preset]
    cfg = replace(model_preset(preset), max_seq_len=max(seq_len, 128), original_seq_len=max(seq_len, 128))
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.train()
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3))
    loss = loss_fn(model, compile)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        with record_function("pretrain.forward"):
            out = loss(inputs, targets)
        with record_function("pretrain.backward"):
            out.loss.backward()
        with record_function("pretrain.optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_expert_bias()
        return out.loss.item()

    return cfg, step


def time_steps(preset: str, steps: int, warmup: int, compile: bool) -> dict:
    batch, seq_len = SHAPES[preset]
    cfg, step_fn = setup(preset, compile)
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step_fn())
        times.append(time.perf_counter() - start)
    step = statistics.median(times[warmup:])
    flops = train_flops_per_token(cfg, seq_len) * batch * seq_len
    return {"preset": preset, "mode": "compiled" if compile else "eager", "batch": batch, "seq_len": seq_len,
            "params": count_parameters(cfg).total, "step_ms": 1000 * step, "first_s": times[0],
            "tokens_per_s": batch * seq_len / step, "gflops": flops / step / 1e9,
            "loss_first": losses[0], "loss_last": losses[-1]}


def profile(preset: str, peak: float, warmup: int = 3, top: int = 12) -> str:
    """One eager step under torch.profiler after `warmup` steps: phases, the top operators by own time, and
    the matrix products' share of the step beside the time the counted FLOPs take at `peak` GFLOP/s."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch, seq_len = SHAPES[preset]
    cfg, step_fn = setup(preset, compile=False)
    for _ in range(warmup):
        step_fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step_fn()
        total = time.perf_counter() - start
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    lines = [f"{preset}, {batch} x {seq_len}, {torch.get_num_threads()} thread(s): one eager step {total * 1e3:.0f} ms "
             "(under the profiler)", "", "| phase | ms | share |", "|---|---|---|"]
    for name in ("pretrain.forward", "pretrain.backward", "pretrain.optimizer"):
        if name in by_name:
            t = by_name[name].cpu_time_total / 1e6
            lines.append(f"| {name} | {t * 1e3:.0f} | {100 * t / total:.0f}% |")
    lines += ["", "| operator | self ms | share | calls |", "|---|---|---|---|"]
    ops = sorted((e for e in events if not e.key.startswith("pretrain.")), key=lambda e: -e.self_cpu_time_total)
    lines += [f"| {e.key} | {e.self_cpu_time_total / 1e3:.1f} | {100 * e.self_cpu_time_total / 1e6 / total:.0f}% | "
              f"{e.count} |" for e in ops[:top]]
    products = sum(by_name[k].self_cpu_time_total for k in MATMULS if k in by_name) / 1e6
    at_peak = train_flops_per_token(cfg, seq_len) * batch * seq_len / (peak * 1e9)
    lines += ["", f"Matrix products ({', '.join(MATMULS)}) took {products * 1e3:.0f} ms of the {total * 1e3:.0f} ms "
                  f"step ({100 * products / total:.0f}%); the step's counted FLOPs take {at_peak * 1e3:.0f} ms at the "
                  f"{peak:.1f} GFLOP/s peak, so the products ran at {100 * at_peak / products:.0f}% of it and the "
                  f"other {(total - products) * 1e3:.0f} ms are element-wise ops, reductions, copies and the "
                  "optimizer."]
    return "\n".join(lines)


def table(records: list[dict], bar: float) -> str:
    """One row per preset and mode; compiled rows give their step time over eager's and the compile seconds."""
    eager = {r["preset"]: r for r in records if r["mode"] == "eager"}
    rows = ["| preset | params | batch x seq | mode | step (median) | train tokens/s | GFLOP/s | MFU | "
            "compiled / eager step | compile s | loss first -> last |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        base = eager.get(r["preset"])
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}" if base and r["mode"] == "compiled" else ""
        compile_s = f"{r['first_s'] - base['step_ms'] / 1000:.1f}" if base and r["mode"] == "compiled" else ""
        rows.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['seq_len']} | {r['mode']} | "
                    f"{r['step_ms']:.0f} ms | {r['tokens_per_s']:,.0f} | {r['gflops']:.1f} | "
                    f"{100 * r['gflops'] / bar:.0f}% | {ratio} | {compile_s} | "
                    f"{r['loss_first']:.2f} -> {r['loss_last']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mode", choices=["both", "eager", "compiled"], default="both",
                        help="eager and compiled training steps in the same run (default), or one of them")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one eager step of each preset (phases, top operators, products' share)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    peak = measure_matmul_peak()
    print(f"fp32 matmul peak before the runs: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    modes = {"both": (False, True), "eager": (False,), "compiled": (True,)}[args.mode]
    records = [time_steps(p, args.steps, args.warmup, c) for p in args.presets for c in modes]
    peak_after = measure_matmul_peak()
    print(f"fp32 matmul peak after the runs: {peak_after:.1f} GFLOP/s")
    result = table(records, max(peak, peak_after))
    if args.profile:
        result += "\n\nOne eager step under torch.profiler (`--profile`):\n\n" + "\n\n".join(
            profile(p, max(peak, peak_after)) for p in args.presets)
    print(result)
    if not args.no_append:
        body = (f"bench_pretrain.py --steps {args.steps} --warmup {args.warmup}, {torch.get_num_threads()} torch "
                f"threads. fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s before, {peak_after:.1f} after "
                f"(MFU uses the larger). FLOPs: `cost.train_flops_per_token` (matmuls only). Load average before the run: "
                f"{load:.2f}.\n\n{result}")
        append_results("pretrain: training tokens/s and MFU", body, ("torch",))


if __name__ == "__main__":
    main()
