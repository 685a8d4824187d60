"""The `r1lab` command: argparse -> config -> one library call per subcommand.

User-caused errors (bad recipe, missing file, corrupt checkpoint) print one line and exit 2, as
argparse does for usage errors; `--debug` shows the traceback instead. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from r1lab.checkpoint import CheckpointError
from r1lab.config import ConfigError
from r1lab.recipe import Recipe, load_recipe
from r1lab.tasks.benchmarks import BenchmarkDataError

# Errors a user causes (bad recipe, missing or corrupt file, malformed data): one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, BenchmarkDataError, FileNotFoundError,
                                                 IsADirectoryError, NotADirectoryError, PermissionError)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _recipe_from_args(args: argparse.Namespace, overrides: list[str]) -> Recipe:
    return load_recipe(args.recipe, overrides, preset=args.preset if args.recipe is None or args.preset_given else None)


def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    """Parameters, active parameters, KV-cache size and FLOPs per token of a model shape."""
    import torch

    from r1lab.cost import count_parameters, generate_flops_per_token, kv_cache_bytes, train_flops_per_token
    from r1lab.model import Transformer

    recipe = _recipe_from_args(args, overrides)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1lab", description="Build, train, evaluate and serve R1-style reasoning models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="parameters, active parameters, KV cache and FLOPs of a model shape",
                          description="Overrides: --model.FIELD=VALUE, e.g. --model.n_layers=8.")
    info.add_argument("--preset", default="tiny", help="tiny, small, v2-lite or v3 (default tiny)")
    info.add_argument("--recipe", type=Path, help="a TOML recipe; its [model] table overrides its preset")
    info.add_argument("--context", type=int, help="sequence length for the FLOPs figures (default: the model's max_seq_len)")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Dotted overrides (--model.dim=64) are typed by the recipe dataclasses, not by argparse.
    overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.preset_given = any(a == "--preset" or a.startswith("--preset=") for a in argv)
    try:
        return args.func(args, overrides)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"r1lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r1lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
