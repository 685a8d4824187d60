"""The `r1lab` command: argparse -> config -> one library call per subcommand.

User-caused errors (bad recipe, missing file, malformed data, corrupt checkpoint, a full disk) print
one line and exit 2, as argparse does for usage errors; `--debug` shows the traceback instead. The
library checks what it is given before any expensive work (a training stage measures the matmul
peak only after its checks), so a mistake costs seconds, not a run. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path

from r1lab.checkpoint import CheckpointError
from r1lab.config import ConfigError, check_range
from r1lab.recipe import Recipe, load_recipe
from r1lab.tasks.benchmarks import BenchmarkDataError

# Errors a user causes (bad recipe, missing or corrupt file, malformed data): one line, exit 2.
# ConfigError covers DataError (a data file's line) and eval's EvalError.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, BenchmarkDataError, FileNotFoundError,
                                                 IsADirectoryError, NotADirectoryError, PermissionError)
# What the machine refuses rather than the code gets wrong: a full disk, a quota, a read-only mount.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# Commands every option of which is a flag: a dotted override given to one is a mistake.
NO_OVERRIDES = frozenset({"eval", "generate", "serve", "chat", "export", "import"})


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    """Parameters, active parameters, KV-cache size and FLOPs per token of a model shape."""
    import torch

    from r1lab.cost import count_parameters, generate_flops_per_token, kv_cache_bytes, train_flops_per_token
    from r1lab.model import Transformer

    _check_flags(args, context=">= 1")
    recipe = load_recipe(args.recipe, overrides, preset=args.preset)  # no --preset: the recipe's, else tiny
    cfg = recipe.model
    counts = count_parameters(cfg)
    with torch.device("meta"):  # the shape only: no memory, even for 671B
        model = Transformer(cfg)
    built_main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    built_mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    if (built_main, built_mtp) != (counts.total, counts.mtp):
        raise RuntimeError(f"parameter formula disagrees with the built model: {counts} vs {built_main}, {built_mtp}")
    cache = kv_cache_bytes(cfg, bytes_per_value=2)
    ctx = args.context or cfg.max_seq_len
    rows = [
        ("preset", recipe.preset if args.recipe is None else f"{args.recipe} (from {recipe.preset})"),
        ("total parameters (main model)", f"{_human(counts.total)} ({counts.total:,})"),
        ("MTP modules (D={})".format(cfg.n_mtp_modules), f"{_human(counts.mtp)} ({counts.mtp:,}), sharing embedding and head"),
        ("active parameters per token", f"{_human(counts.active)} ({counts.active:,}), embedding lookup excluded"),
        ("routed experts", f"{cfg.n_activated_experts} of {cfg.n_routed_experts} + {cfg.n_shared_experts} shared, "
                           f"{cfg.n_moe_layers} MoE layers" if cfg.n_routed_experts else "none (dense)"),
        ("KV cache per token per layer", f"{cache.mla_values_per_layer} values (MLA latent {cfg.kv_lora_rank} + RoPE key "
                                         f"{cfg.qk_rope_head_dim}) vs {cache.mha_values_per_layer:,} for multi-head "
                                         f"attention ({cache.mha_values_per_layer / cache.mla_values_per_layer:.1f}x)"),
        ("KV cache per token, bf16", f"{cache.bytes_per_token:,} bytes vs {cache.mha_bytes_per_token:,} bytes MHA; "
                                     f"naive MLA would cache {cache.naive_values_per_layer:,} values/layer"),
        (f"training FLOPs per token (seq {ctx})", f"{_human(train_flops_per_token(cfg, ctx))} (fwd+bwd, MTP included)"),
        (f"inference FLOPs per token (ctx {ctx})", f"{_human(generate_flops_per_token(cfg, ctx))} (decode, absorbed MLA)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    """Evaluate a model directory or an OpenAI-compatible endpoint with the R1 protocol, or compare two runs."""
    from r1lab.eval import evaluate_checkpoint
    from r1lab.evalapi import evaluate_endpoint_bench
    from r1lab.evalreport import compare_results

    if args.compare:
        print(compare_results(*args.compare), end="")
        return 0
    if not args.bench or bool(args.model) == bool(args.api_base) or bool(args.api_base) != bool(args.api_model):
        raise ConfigError("eval needs --bench and either --model DIR or --api-base URL --api-model NAME "
                          "(or --compare A B)")
    _check_flags(args, k=">= 1", temperature=">= 0", top_p="in (0, 1]", max_new_tokens=">= 1", concurrency=">= 1",
                 peak_gflops="> 0")
    common = {"k": args.k, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
              "limit": args.limit, "seed": args.seed, "difficulty": args.difficulty, "out_dir": args.out, "ks": args.ks,
              "resume": not args.fresh, "instruction": args.instruction, "grade": args.grade, "greedy": args.greedy,
              "progress": lambda done, total: print(f"r1lab eval: {done}/{total} items", file=sys.stderr)}
    if args.model:
        result = evaluate_checkpoint(args.model, args.bench, template=args.template, peak_gflops=args.peak_gflops,
                                     device=_device(args), **common)
    else:
        result = evaluate_endpoint_bench(args.api_base, args.api_model, args.bench, api_key=args.api_key,
                                         concurrency=args.concurrency, **common)
    runs = [result] + ([result.greedy] if result.greedy is not None else [])
    resumed = sum(r.cost.get("resumed_items", 0) for r in runs)
    if resumed:  # an endpoint's model may have changed since: say the samples are not all new
        print(f"r1lab eval: {resumed} of {sum(len(r.items) for r in runs)} evaluations were an earlier run's, read "
              f"from the output directory (--fresh samples them again)", file=sys.stderr)
    print(result.markdown(), end="")
    return 0


def _check_flags(args: argparse.Namespace, **limits: str) -> None:
    """Numeric flags a user can get wrong, named as typed, before a model is loaded.

    `limits` maps a flag's dest to its range, as `check_range` takes it: ">= 1", "in (0, 1]", ..."""
    for dest, want in limits.items():
        if getattr(args, dest) is not None:
            check_range(f"{args.command} --{dest.replace('_', '-')}", getattr(args, dest), want)


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """k samples per prompt from a model or an endpoint, graded, filtered, written as SFT JSONL."""
    from r1lab.checkpoint import model_metadata
    from r1lab.config import from_dict
    from r1lab.recipe import GenerateConfig
    from r1lab.train.generate import load_prompts, sample_endpoint, sample_model, summary_line, write_generated

    if bool(args.model) == bool(args.api_base) or bool(args.api_base) != bool(args.api_model):
        raise ConfigError("generate needs either --model DIR or --api-base URL --api-model NAME")
    _check_flags(args, limit=">= 1", difficulty=">= 1", concurrency=">= 1")
    cfg = from_dict(GenerateConfig, {"k": args.k, "temperature": args.temperature, "top_p": args.top_p,
                                     "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                                     "max_tokens": args.max_tokens, "min_language": args.min_language,
                                     "per_prompt": args.per_prompt}, prefix="generate")
    meta = model_metadata(args.model) if args.model and args.model.is_dir() else {}
    own = meta.get("task") == args.prompts  # the model's own task: its difficulty and options
    difficulty = args.difficulty or (int(meta.get("difficulty", 1)) if own else 1)
    examples = load_prompts(args.prompts, limit=args.limit, seed=args.seed, difficulty=difficulty,
                            task_options=meta.get("task_options") if own else None)
    if args.model:
        graded = sample_model(args.model, examples, cfg, template=args.template, instruction=args.instruction,
                              device=_device(args))
        source = {"model": str(args.model)}
    else:
        graded = sample_endpoint(args.api_base, args.api_model, examples, cfg, instruction=args.instruction,
                                 api_key=args.api_key, concurrency=args.concurrency)
        source = {"api_base": args.api_base, "api_model": args.api_model}
    stats = write_generated(graded, cfg, args.out, {**source, "prompts": args.prompts})
    print(f"r1lab generate: {summary_line(stats)}", file=sys.stderr)
    return 0


def cmd_distill(args: argparse.Namespace, overrides: list[str]) -> int:
    """A teacher's verified samples, then SFT of the student recipe's model on them, into <run>/sft."""
    from r1lab.train.distill import run_distill
    from r1lab.train.generate import summary_line

    _check_flags(args, k=">= 1")
    recipe = load_recipe(args.student_recipe, overrides + (["--generate.k=%d" % args.k] if args.k else [])
                         + _device_override(args))
    result = run_distill(recipe, args.run, args.teacher, args.prompts, quiet=args.quiet)
    print(f"r1lab distill: {'generated' if result.generated else 'reused'}: {summary_line(result.stats)}",
          file=sys.stderr)
    print(f"distilled into {result.sft.steps} SFT steps in {result.sft.seconds:.0f} s: {args.run / 'sft' / 'checkpoint'}")
    return 0


def cmd_pipeline(args: argparse.Namespace, overrides: list[str]) -> int:
    """R1's four stages (cold start, reasoning RL, rejection sampling + SFT, final RL), resumable."""
    from r1lab.pipeline import COMPARED, LABELS, run_pipeline

    recipe = _training_recipe(args, overrides)
    summary = run_pipeline(recipe, args.run, quiet=args.quiet)
    t = summary["eval"]["temperature"]
    rows = [(LABELS[name], s, "") for name, s in summary["stages"].items()]
    for label, s, what in rows + [(COMPARED[role], s, "eval ") for role, s in summary["compared"].items()]:
        print(f"  {label:<40} greedy pass@1 {100 * s['greedy_pass@1']:5.1f}%, T={t} "
              f"{100 * s['sampled_pass@1']:5.1f}%, format {100 * s['format_rate']:5.1f}%, "
              f"{s['mean_tokens']:.0f} tokens, {what}${s['cost_dollars']:.4f}")
    print(f"r1lab pipeline finished: ${summary['cost']['dollars']:.4f} in total; report: {args.run / 'report.md'}")
    return 0


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """OpenAI-compatible API (reasoning_content) and web chat for a model directory."""
    from r1lab.serve import ServeSettings, create_app, load_served_model
    from r1lab.serve.server import run

    settings = ServeSettings(api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                             max_prompt_tokens=args.max_prompt_tokens, max_concurrency=args.max_concurrency,
                             max_batch_size=args.max_batch_size, compile=args.compile,
                             cors_origins=tuple(args.cors_origin or ()))
    device = _device(args)
    if args.compile and device.type != "cpu":
        raise ConfigError(f"serve --compile runs the CPU backend; drop it to serve on --device {args.device}")
    model = load_served_model(args.model, name=args.served_model_name, device=device)
    print(f"r1lab: serving {model.name!r} ({model.template} template, context {model.max_len}) on "
          f"http://{args.host}:{args.port}/ (web chat) and /v1 (API)", file=sys.stderr)
    run(create_app(model, settings), host=args.host, port=args.port)
    return 0


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> int:
    """Terminal chat with a model directory, reasoning shown dimmed."""
    from r1lab.chat import run_chat
    from r1lab.serve import load_served_model

    _check_flags(args, temperature=">= 0", top_p="in (0, 1]", max_tokens=">= 1")
    model = load_served_model(args.model, device=_device(args))
    return run_chat(model, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)


def _device_override(args: argparse.Namespace) -> list[str]:
    """`--device X` as the recipe override it is, so that the run's recipe.toml records it."""
    return [f"--device={args.device}"] if args.device else []


def _device(args: argparse.Namespace):
    """The `torch.device` of `--device` (eval, serve, chat), checked before a model is loaded."""
    from r1lab.device import resolve_device

    return resolve_device(args.device, "--device")


def _training_recipe(args: argparse.Namespace, overrides: list[str]):
    if args.run.exists() and not args.run.is_dir():
        raise ConfigError(f"--run {args.run} is a file, not a run directory")
    model = [f"--{args.command}.init_from={args.model}"] if getattr(args, "model", None) else []
    return load_recipe(args.recipe, overrides + _device_override(args) + model)


def _dry_run(args: argparse.Namespace, recipe: Recipe) -> int:
    """`--dry-run`: the recipe is valid (else it raised); print what this machine lacks, one line each."""
    from r1lab.train.stages import dry_run

    missing = dry_run(recipe, args.command, args.run)
    print(f"r1lab {args.command}: recipe {args.recipe or '(defaults)'} is valid; "
          f"{len(missing) or 'nothing'} missing on this machine{':' if missing else ''}")
    for line in missing:
        print(f"  missing: {line}")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """One training stage into <run>/base (pretrain), <run>/sft or <run>/rl (grpo); resumes if interrupted."""
    from r1lab.train.distributed import leave
    from r1lab.train.stages import run_grpo, run_pretrain, run_sft

    run_stage, done, out = {"pretrain": (run_pretrain, "pretrained", "base"), "sft": (run_sft, "fine-tuned", "sft"),
                            "grpo": (run_grpo, "GRPO", "rl")}[args.command]
    recipe = _training_recipe(args, overrides)
    if args.dry_run:
        return _dry_run(args, recipe)
    try:
        result = run_stage(recipe, args.run)
    finally:  # leave torchrun's process group (if the stage joined one) however the stage ends
        leave()
    if result.is_main:
        print(f"{done} {result.steps} steps in {result.seconds:.0f} s: {args.run / out / 'checkpoint'}")
    return 0


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    """An r1lab checkpoint -> a Hugging Face DeepseekV3 directory."""
    from r1lab.convert import export_checkpoint

    out = export_checkpoint(args.model, args.out)
    print(f"exported {args.model} to {out} (Hugging Face DeepseekV3ForCausalLM)")
    return 0


def cmd_import(args: argparse.Namespace, overrides: list[str]) -> int:
    """A Hugging Face DeepseekV3 directory -> an r1lab checkpoint."""
    from r1lab.convert import import_checkpoint

    out = import_checkpoint(args.model, args.out)
    print(f"imported {args.model} to {out} (r1lab checkpoint)")
    return 0


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    """Tokenizer, corpus, pretraining, R1-Zero GRPO, the control, evaluation, report."""
    from r1lab.demo import demo_recipe, run_demo

    recipe = demo_recipe(args.recipe, overrides + _device_override(args), args.quick)
    run_dir = args.run or Path("runs") / ("demo-quick" if args.quick else "demo")
    start = time.perf_counter()
    summary = run_demo(recipe, run_dir, quiet=args.quiet)
    h, k = summary["heldout"], summary["eval"]["k"]
    print(f"\nr1lab demo finished in {(time.perf_counter() - start) / 60:.1f} min; report: {run_dir / 'report.md'}")
    for name in ("base", "rl", "control"):
        best = h[name]["best"]
        print(f"  {name:<8} held-out pass@1: greedy {100 * h[name]['greedy']['pass@1']:5.1f}%, "
              f"T={summary['eval']['temperature']} {100 * h[name]['sampled']['pass@1']:5.1f}% "
              f"(best: {best['decoding']}); pass@{k} {100 * h[name]['sampled']['pass@k'][str(k)]:5.1f}%")
    for v in summary["verdicts"].values():
        print(f"  {'held' if v['beat'] else 'did not hold'}: {v['a']} beat {v['b']} {v['basis']}: "
              f"{100 * v['margin']:+.1f} points")
    print(f"  cost ${summary['cost']['dollars']:.4f}, peak memory {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"chat with it:  r1lab chat --model {run_dir / 'rl' / 'checkpoint'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1lab", description="Build, train, evaluate and serve R1-style reasoning models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="parameters, active parameters, KV cache and FLOPs of a model shape",
                          description="Overrides: --model.FIELD=VALUE, e.g. --model.n_layers=8.")
    info.add_argument("--preset", help="tiny, small, v2-lite or v3 (default tiny)")
    info.add_argument("--recipe", type=Path, help="a TOML recipe; its [model] table overrides its preset")
    info.add_argument("--context", type=int, help="sequence length for the FLOPs figures (default: the model's max_seq_len)")
    info.set_defaults(func=cmd_info)

    for name, what in (("pretrain", "next-token pretraining (resumable) into RUN/base"),
                       ("sft", "supervised fine-tuning on JSONL conversations into RUN/sft"),
                       ("grpo", "R1-Zero GRPO from RUN/base into RUN/rl")):
        p = sub.add_parser(name, help=what, description=f"{what}. Overrides: --SECTION.FIELD=VALUE.")
        p.add_argument("--recipe", type=Path, help="TOML recipe (default: the tiny preset's defaults)")
        p.add_argument("--run", type=Path, default=Path("runs/default"), help="run directory (default runs/default)")
        p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the recipe's device, else cpu)")
        p.add_argument("--dry-run", action="store_true",
                       help="validate the recipe and list what this machine lacks (device, model dir, data files); "
                            "load and write nothing; exit 0 when the recipe is valid")
        if name != "pretrain":
            p.add_argument("--model", type=Path, help=f"the model to start from: an r1lab checkpoint or a local Hugging "
                                                      f"Face model directory (sets {name}.init_from)")
        p.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="pretrain a tiny base, R1-Zero GRPO, the control, evaluate, report",
                          description="From nothing to a reasoner on this machine. Overrides: --SECTION.FIELD=VALUE.")
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    demo.add_argument("--recipe", type=Path, help="TOML recipe (default: the packaged r1-zero-tiny)")
    demo.add_argument("--run", type=Path, help="run directory (default runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the recipe's device, else cpu)")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="pass@1, pass@k, cons@k, format, length and cost with the R1 protocol",
                        description="Evaluate a model directory (--model) or an OpenAI-compatible endpoint "
                                    "(--api-base, --api-model) on a benchmark, a task family's held-out split or a "
                                    "JSONL file; an interrupted run resumes. --compare A B prints two runs side by side.")
    ev.add_argument("--model", type=Path, help="an r1lab checkpoint or a local Hugging Face model directory")
    ev.add_argument("--bench", help="math500, gsm8k, aime24, amc23, a task family (arithmetic, ...) or FILE.jsonl")
    ev.add_argument("--k", type=int, default=4, help="samples per question (default 4; the R1 report uses 4-64)")
    ev.add_argument("--ks", type=int, nargs="+", metavar="J", help="report pass@J for each J (default: 1, 2, 4, ... up to k)")
    ev.add_argument("--temperature", type=float, default=0.6, help="default 0.6 (R1)")
    ev.add_argument("--top-p", type=float, default=0.95, help="default 0.95 (R1)")
    ev.add_argument("--max-new-tokens", type=int, default=512, help="default 512")
    ev.add_argument("--limit", type=int, help="first M items (task families: M held-out problems, default 200)")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (and task-family problem seed), default 0")
    ev.add_argument("--difficulty", type=int, help="task-family difficulty (default: the checkpoint's own task's, else 1)")
    ev.add_argument("--template", choices=["r1-zero", "r1"], help="default: the checkpoint metadata's, else r1")
    ev.add_argument("--instruction", help="text appended to each question (default: R1's \\boxed{} instruction, "
                                          "none under r1-zero); '' for none")
    ev.add_argument("--grade", choices=["answer", "completion"], default="answer",
                    help="grade the text after </think> (default, what an endpoint returns as content) or all of it")
    ev.add_argument("--out", type=Path, help="output directory (default <model>/eval/<bench> or ./eval/<api-model>/<bench>)")
    ev.add_argument("--no-greedy", dest="greedy", action="store_false",
                    help="skip the greedy run (by default the items are also decoded greedily, into OUT/greedy, and "
                         "the report gives the better of greedy and sampled pass@1: the model's best decoding)")
    ev.add_argument("--fresh", action="store_true", help="discard the samples of an earlier run in --out")
    ev.add_argument("--peak-gflops", type=float, help="known matmul peak for MFU (default: measured once)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps for --model (default cpu)")
    ev.add_argument("--api-base", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    ev.add_argument("--api-model", help="model name at the endpoint")
    ev.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY)")
    ev.add_argument("--concurrency", type=int, default=8, help="parallel requests to the endpoint (default 8)")
    ev.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two result dirs or results.json files")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="k samples per prompt, graded and filtered into SFT JSONL",
                         description="Sample k completions per prompt from a model directory (--model) or an "
                                     "OpenAI-compatible endpoint (--api-base, --api-model), grade them (accuracy, "
                                     "format, language), keep the correct, well-formed, non-duplicate ones and write "
                                     "them as JSONL conversations `r1lab sft` reads (data.sft_files), with "
                                     "OUT.stats.json beside it.")
    gen.add_argument("--model", type=Path, help="an r1lab checkpoint or a local Hugging Face model directory")
    gen.add_argument("--api-base", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    gen.add_argument("--api-model", help="model name at the endpoint")
    gen.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY)")
    gen.add_argument("--concurrency", type=int, default=8, help="parallel requests to the endpoint (default 8)")
    gen.add_argument("--prompts", required=True,
                     help="a task family (arithmetic, ...: its train split) or a JSONL file of prompts with answers "
                          "(the forms data.rl_files reads)")
    gen.add_argument("--out", type=Path, required=True, help="the SFT JSONL file to write")
    gen.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    gen.add_argument("--limit", type=int, help="prompts used (task families: default 256; files: all)")
    gen.add_argument("--difficulty", type=int, help="task-family difficulty (default: the model's own task's, else 1)")
    gen.add_argument("--template", choices=["r1-zero", "r1"], help="default: the checkpoint metadata's, else r1")
    gen.add_argument("--instruction", help="text appended to each question (default: the model's own, else R1's "
                                           "\\boxed{} instruction, none under r1-zero); '' for none")
    gen.add_argument("--temperature", type=float, default=0.6, help="default 0.6 (R1)")
    gen.add_argument("--top-p", type=float, default=0.95, help="default 0.95 (R1)")
    gen.add_argument("--max-new-tokens", type=int, default=160, help="default 160")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (and task-family problem seed), default 0")
    gen.add_argument("--max-tokens", type=int, default=0, help="longest completion kept (default: --max-new-tokens)")
    gen.add_argument("--min-language", type=float, default=0.0,
                     help="least language consistency kept, in [0, 1] (default 0: not checked)")
    gen.add_argument("--per-prompt", type=int, default=0, help="most samples kept per prompt (default 0: no cap)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps for --model (default cpu)")
    gen.set_defaults(func=cmd_generate)

    dis = sub.add_parser("distill", help="a teacher's verified samples, then SFT of a student on them",
                         description="Generate k samples per prompt from --teacher, keep the verified ones "
                                     "(RUN/generate/distill.jsonl) and fine-tune the student recipe's sft.init_from "
                                     "on them into RUN/sft. A finished generate step is not redone. "
                                     "Overrides: --SECTION.FIELD=VALUE (e.g. --generate.per_prompt=2).")
    dis.add_argument("--teacher", type=Path, required=True, help="an r1lab checkpoint or a local Hugging Face model")
    dis.add_argument("--student-recipe", type=Path, required=True,
                     help="TOML recipe whose [sft] section (sft.init_from: the student) and [generate] section apply")
    dis.add_argument("--prompts", help="a task family or a JSONL file of prompts with answers (default: the "
                                       "recipe's data.rl_files, else generate.prompts problems of data.task)")
    dis.add_argument("--k", type=int, help="samples per prompt (default: generate.k)")
    dis.add_argument("--run", type=Path, default=Path("runs/distill"), help="run directory (default runs/distill)")
    dis.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the recipe's device, else cpu)")
    dis.add_argument("--quiet", action="store_true", help="no progress lines")
    dis.set_defaults(func=cmd_distill)

    pipe = sub.add_parser("pipeline", help="R1's four stages: cold start, reasoning RL, rejection sampling, final RL",
                          description="Pretrain (or take pipeline.init_from), cold-start SFT, GRPO, rejection "
                                      "sampling + SFT of the base, a final GRPO; each stage evaluated and costed; "
                                      "RUN/report.md puts them side by side. A second call resumes at the first "
                                      "unfinished stage. Overrides: --SECTION.FIELD=VALUE.")
    pipe.add_argument("--recipe", type=Path, required=True, help="TOML recipe, e.g. r1lab/recipes/r1-tiny.toml")
    pipe.add_argument("--run", type=Path, default=Path("runs/pipeline"), help="run directory (default runs/pipeline)")
    pipe.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the recipe's device, else cpu)")
    pipe.add_argument("--quiet", action="store_true", help="no progress lines")
    pipe.set_defaults(func=cmd_pipeline)

    srv = sub.add_parser("serve", help="OpenAI-compatible API with reasoning_content, and a web chat",
                         description="Serve a checkpoint: /v1/chat/completions, /v1/completions, /v1/models, "
                                     "/health, and the web chat at /.")
    srv.add_argument("--model", type=Path, required=True, help="an r1lab checkpoint or a local Hugging Face model dir")
    srv.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="default 8000")
    srv.add_argument("--api-key", help="require Authorization: Bearer KEY on every API route")
    srv.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    srv.add_argument("--max-tokens-cap", type=int, help="largest max_tokens a request may ask (default: the context)")
    srv.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: the context - 1)")
    srv.add_argument("--max-concurrency", type=int, default=64, help="requests in flight before 429 (default 64)")
    srv.add_argument("--max-batch-size", type=int, default=256, help="samples decoded together (default 256)")
    srv.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                     help="let pages from this origin (scheme://host[:port], or * for any) call the API from a "
                          "browser; repeatable (default: CORS off)")
    srv.add_argument("--compile", action="store_true",
                     help="decode on the CPU backend: steps compiled ahead of time (AOTInductor) and C++ kernels, "
                          "after a one-off compile per batch-size class (README: Generation speed)")
    srv.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="terminal chat with a model, reasoning shown dimmed",
                          description="Type a message per line; /reset starts over, /exit leaves. Reads stdin "
                                      "until EOF when it is not a terminal.")
    chat.add_argument("--model", type=Path, required=True, help="an r1lab checkpoint or a local Hugging Face model dir")
    chat.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    chat.add_argument("--temperature", type=float, default=0.6, help="default 0.6 (R1)")
    chat.add_argument("--top-p", type=float, default=0.95, help="default 0.95 (R1)")
    chat.add_argument("--max-tokens", type=int, help="per reply (default: what the context leaves)")
    chat.add_argument("--seed", type=int, help="sampling seed (default: random)")
    chat.set_defaults(func=cmd_chat)

    exp = sub.add_parser("export", help="write an r1lab checkpoint as a Hugging Face DeepseekV3 directory",
                         description="Write config.json, model.safetensors and the tokenizer in the format "
                                     "transformers loads as DeepseekV3ForCausalLM (MTP modules are not exported).")
    exp.add_argument("--model", type=Path, required=True, help="an r1lab checkpoint directory")
    exp.add_argument("--out", type=Path, required=True, help="a new (or empty) directory to write")
    exp.set_defaults(func=cmd_export)

    imp = sub.add_parser("import", help="turn a Hugging Face DeepseekV3 directory into an r1lab checkpoint",
                         description="Read a local DeepseekV3-format model (single or sharded safetensors) and "
                                     "save it as an r1lab checkpoint; other architectures are refused.")
    imp.add_argument("--model", type=Path, required=True, help="a local Hugging Face model directory")
    imp.add_argument("--out", type=Path, required=True, help="a new (or empty) directory for the checkpoint")
    imp.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Dotted overrides (--model.dim=64) are typed by the recipe dataclasses, not by argparse.
    overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    args = parser.parse_args([a for a in argv if a not in overrides])
    try:
        if overrides and args.command in NO_OVERRIDES:
            raise ConfigError(f"{args.command} takes no dotted overrides, got {' '.join(overrides)}")
        return args.func(args, overrides)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"r1lab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug or e.errno not in DISK_ERRNOS:
            raise
        print(f"r1lab: error: {e.filename or 'writing'}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r1lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
