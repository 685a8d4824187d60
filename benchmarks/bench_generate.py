"""Generation throughput: r1lab's engine against Hugging Face `generate`, in the same run.

(a) r1lab's `tiny` MoE preset against `DeepseekV3ForCausalLM` built from the same shapes;
(b) a dense r1lab config against the baseline's dense Qwen2 (hidden 256, 4 layers, intermediate
    1024, vocab 382) with the same FLOPs per token (within a few percent, printed).
Random weights, 29-token prompts, exactly `--new-tokens` generated per sequence (EOS is banned on
both sides), sampling at temperature 1. r1lab runs twice: eager, and on the CPU backend
(`Engine(compile=True)`: steps compiled ahead of time per row class; the one-off compile time is reported). Median of `--runs` timed runs after
a warm-up, all sides interleaved so that machine noise hits each. A decode step's time is the call's
less the same engine's one-token call (its prefill), over the remaining steps; its achieved GFLOP/s is
set against this machine's fp32 matmul peak, measured in the same run.

    python benchmarks/bench_generate.py [--batches 1 8 64] [--new-tokens 128] [--runs 5] [--no-compile] [--no-append]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from r1lab.config import ModelConfig, model_preset  # noqa: E402
from r1lab.cost import generate_flops_per_token  # noqa: E402
from r1lab.engine import Engine, SamplingParams  # noqa: E402
from r1lab.hardware import measure_matmul_peak  # noqa: E402
from r1lab.model import Transformer  # noqa: E402

PROMPT_LEN = 29

# Dense r1lab shape matched to the baseline Qwen2's FLOPs per token: MLA widths chosen so the
# attention weights (202,752 per layer) are within 3% of Qwen2's GQA (196,608).
DENSE = ModelConfig(vocab_size=382, dim=256, inter_dim=1024, n_layers=4, n_dense_layers=4, n_heads=4,
                    n_routed_experts=0, n_shared_experts=0, kv_lora_rank=96, qk_nope_head_dim=48,
                    qk_rope_head_dim=16, v_head_dim=64, max_seq_len=512, original_seq_len=512,
                    n_mtp_modules=0)
QWEN2 = dict(vocab_size=382, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=1024, max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-6)


def hf_models(moe_cfg: ModelConfig):
    from transformers import DeepseekV3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from r1lab.hf import hf_config_from_model_config

    torch.manual_seed(0)
    deepseek = DeepseekV3ForCausalLM(hf_config_from_model_config(moe_cfg)).float().eval()
    qwen = Qwen2ForCausalLM(Qwen2Config(**QWEN2, pad_token_id=0, eos_token_id=1, bos_token_id=None)).float().eval()
    return deepseek, qwen


def hf_flops_per_token(model) -> float:
    """Matmul FLOPs per generated token of the dense HF model: 2 x (non-embedding weights + head);
    its head is tied to the embedding, so that is 2 x all parameters (norms are negligible)."""
    return 2 * sum(p.numel() for p in model.parameters())


def time_hf(model, prompts: torch.Tensor, new_tokens: int) -> float:
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, use_cache=True, pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **kw)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
    return elapsed


def time_r1lab(engine: Engine, prompts: torch.Tensor, new_tokens: int, seed: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=seed, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts.tolist(), params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


def run_pair(name: str, ours: Transformer, theirs, batches: list[int], new_tokens: int, runs: int,
             compile: bool) -> list[dict]:
    """Timings of r1lab (eager, compiled) and HF at each batch size, interleaved run by run."""
    cfg = ours.config
    engines = {"eager": Engine(ours, eos_id=1)}
    if compile:
        engines["compiled"] = Engine(ours, eos_id=1, compile=True)
    flops_ours = generate_flops_per_token(cfg, PROMPT_LEN + new_tokens / 2)
    g = torch.Generator().manual_seed(0)
    records = []
    for batch in batches:
        prompts = torch.randint(2, cfg.vocab_size, (batch, PROMPT_LEN), generator=g)
        warmup = {}
        for label, engine in engines.items():  # the first call at a new shape compiles
            warmup[label] = time_r1lab(engine, prompts, 4, seed=0)
        time_hf(theirs, prompts, 4)
        ours_t = {label: [] for label in engines}
        prefill_t = {label: [] for label in engines}  # each engine's own prefill (a compiled engine compiles it too)
        hf_t = []
        for r in range(runs):
            for label, engine in engines.items():
                ours_t[label].append(time_r1lab(engine, prompts, new_tokens, seed=r))
            hf_t.append(time_hf(theirs, prompts, new_tokens))
            for label, engine in engines.items():
                prefill_t[label].append(time_r1lab(engine, prompts, 1, seed=r))
        hf_s = statistics.median(hf_t)
        hf_tps = batch * new_tokens / hf_s
        for label in engines:
            ours_s = statistics.median(ours_t[label])
            decode_s = max(ours_s - statistics.median(prefill_t[label]), 1e-9)
            per_run = [h / o for h, o in zip(hf_t, ours_t[label])]  # each run's ratio, the two sides back to back
            records.append(dict(name=name, label=label, batch=batch, ours_tps=batch * new_tokens / ours_s, hf_tps=hf_tps,
                                spread=f"{min(per_run):.2f}-{max(per_run):.2f}x", step_ms=1000 * decode_s / (new_tokens - 1),
                                gflops=flops_ours * batch * (new_tokens - 1) / decode_s / 1e9,
                                first=f"{warmup[label]:.0f} s" if label == "compiled" else "-"))
            r = records[-1]
            print(f"{name} {label} batch {batch}: {r['ours_tps']:,.0f} vs HF {hf_tps:,.0f} tok/s "
                  f"({r['ours_tps'] / hf_tps:.2f}x), {r['step_ms']:.2f} ms/step", flush=True)
    return records


def format_row(r: dict, peak: float) -> str:
    return (f"| {r['name']} | {r['label']} | {r['batch']} | {r['ours_tps']:,.0f} | {r['hf_tps']:,.0f} | "
            f"**{r['ours_tps'] / r['hf_tps']:.2f}x** | {r['spread']} | {r['step_ms']:.2f} | {r['gflops']:.1f} | "
            f"{100 * r['gflops'] / peak:.0f}% | {r['first']} |")


def speculative_rows(new_tokens: int, runs: int, compile: bool, rows: list[str]) -> None:
    """MTP self-speculative decoding on a tiny model trained briefly on a learnable pattern."""
    cfg = model_preset("tiny")
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        start = torch.randint(0, cfg.vocab_size, (16, 1), generator=g)
        stride = torch.randint(1, 6, (16, 1), generator=g)
        seq = (start + stride * torch.arange(65)) % cfg.vocab_size
        loss = model.loss(seq[:, :-1], seq[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    for compiled in (False, True) if compile else (False,):
        engines = {spec: Engine(model, eos_id=None, speculative=spec, compile=compiled) for spec in (False, True)}
        for batch in (1, 8):
            prompts = [[(s + k * 3) % cfg.vocab_size for k in range(8)] for s in range(batch)]
            times: dict[bool, list[float]] = {False: [], True: []}
            for engine in engines.values():  # warm-up (and, compiled, the compile at this batch shape)
                engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0))
            speculation = engines[True].speculation
            speculation.drafted = speculation.accepted = 0
            for _ in range(runs):
                for spec, engine in engines.items():
                    start = time.perf_counter()
                    engine.generate(prompts, params)
                    times[spec].append(time.perf_counter() - start)
            plain, spec = statistics.median(times[False]), statistics.median(times[True])
            rows.append(f"| {'compiled' if compiled else 'eager'} | {batch} | {batch * new_tokens / plain:,.0f} | "
                        f"{batch * new_tokens / spec:,.0f} | {plain / spec:.2f}x | {100 * speculation.acceptance_rate:.0f}% |")
            print(rows[-1], flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode step (saves minutes)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use torch's on-disk compile cache (default: a fresh one, so compile times are cold)")
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    args = parser.parse_args(argv)

    if not args.warm_cache:
        cold = tempfile.mkdtemp(prefix="r1lab-bench-inductor-")
        atexit.register(shutil.rmtree, cold, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold
    peak = measure_matmul_peak()
    print(f"fp32 matmul peak (median, square 1024/2048): {peak:.1f} GFLOP/s")
    moe_cfg = model_preset("tiny")
    torch.manual_seed(0)
    tiny, dense = Transformer(moe_cfg).eval(), Transformer(DENSE).eval()
    deepseek, qwen = hf_models(moe_cfg)
    flops_dense = generate_flops_per_token(DENSE, 0)
    flops_qwen = hf_flops_per_token(qwen)
    header = ["| pair | r1lab decode | batch | r1lab tok/s | HF tok/s | ratio | ratio per run | r1lab ms/decode step "
              "| decode GFLOP/s | of peak | first call (compile) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    compile = not args.no_compile
    records = run_pair("(a) tiny MoE vs HF DeepseekV3", tiny, deepseek, args.batches, args.new_tokens, args.runs, compile)
    records += run_pair("(b) dense vs HF Qwen2", dense, qwen, args.batches, args.new_tokens, args.runs, compile)
    peak_after = measure_matmul_peak()
    print(f"fp32 matmul peak again after the runs: {peak_after:.1f} GFLOP/s")
    peak_used = max(peak, peak_after)  # the machine's speed drifts; the larger reading is the stricter bar
    rows = [format_row(r, peak_used) for r in records]
    print("\n" + "\n".join(header + rows))
    spec_header = ["| decode | batch | plain tok/s | MTP speculative tok/s | speed-up | draft acceptance |",
                   "|---|---|---|---|---|---|"]
    print("\n" + "\n".join(spec_header))
    spec: list[str] = []
    speculative_rows(args.new_tokens, args.runs, compile, spec)

    body = (f"fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s before the runs, {peak_after:.1f} after "
            f"(\"of peak\" uses the larger). Compile times are "
            f"{'warm (torch on-disk cache)' if args.warm_cache else 'cold (a fresh inductor cache)'}; "
            f"compiled: the CPU backend's steps, one package per row class of its table (r1lab/backends/cpu). "
            f"Prompts {PROMPT_LEN} tokens, "
            f"{args.new_tokens} new tokens, sampling at temperature 1, median of {args.runs} runs (ratio: of the medians; "
            f"ratio per run: the range of each run's HF time over r1lab's, taken back to back).\n"
            f"Matmul FLOPs per token (no attention): r1lab dense {flops_dense / 1e6:.2f}M vs Qwen2 {flops_qwen / 1e6:.2f}M; "
            f"r1lab tiny MoE {generate_flops_per_token(moe_cfg, 0) / 1e6:.2f}M active.\n\n"
            + "\n".join(header + rows)
            + "\n\nMTP self-speculative decoding (greedy, the tiny preset trained 150 steps on stride sequences):\n\n"
            + "\n".join(spec_header + spec))
    if not args.no_append:
        append_results("generate: r1lab engine vs Hugging Face generate", body, ("torch", "transformers"))


if __name__ == "__main__":
    main()
