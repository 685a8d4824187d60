"""Supervised training: next-token pretraining (and, with a loss mask, SFT) in one loop.

The loop reads top to bottom: batch -> loss (next token + MTP + balance) -> backward -> clip ->
AdamW step -> aux-loss-free bias update -> log / held-out loss / checkpoint. Batches are a function
of (seed, step), and the checkpoint carries the optimizer, the step and the RNG states, so a run
killed at any point and resumed continues with exactly the numbers it would have had.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from r1lab.cost import train_flops_per_token
from r1lab.device import bf16_autocast
from r1lab.model import Transformer
from r1lab.recipe import CostConfig, TrainConfig
from r1lab.tokenizer import Tokenizer
from r1lab.train.common import (MetricsLog, Progress, StageResult, lr_at, make_optimizer, resume_into, save_stage,
                                set_lr, stage_cost)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, targets, loss mask (None: all)


@torch.no_grad()
def heldout_loss(model: Transformer, batches: list[Batch]) -> float:
    was_training = model.training
    model.eval()
    losses = [model.loss(x, y, mask).lm_loss.item() for x, y, mask in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train_supervised(model: Transformer, tokenizer: Tokenizer | None, batch_fn: Callable[[int, int, int], Batch],
                     heldout: list[Batch], cfg: TrainConfig, stage_dir: Path, stage: str, cost: CostConfig,
                     peak_flops: float, metadata: dict | None = None, quiet: bool = False,
                     optimizer_state: dict | None = None) -> StageResult:
    """Train `model` for cfg.steps optimizer steps, resuming from stage_dir's checkpoint if it has one.

    batch_fn(step, micro, batch_size) gives a micro-batch. `optimizer_state` continues an earlier
    stage's AdamW moments (the control's continued pretraining).
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg.optim)
    resumed = resume_into(stage_dir, model, optimizer)
    start, seconds_before, flops_before = resumed or (0, 0.0, 0.0)
    if resumed is None and optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    log = MetricsLog(stage_dir / "metrics.jsonl", resume_step=start if resumed is not None else None)
    progress = Progress(stage, cfg.steps, start, quiet)
    seq_len = batch_fn(0, 0, 1)[0].shape[1]
    flops_per_token = train_flops_per_token(model.config, seq_len)
    model.train()
    flops, seconds = flops_before, seconds_before
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.optim)
        set_lr(optimizer, lr)
        parts = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        tokens = 0
        for micro in range(cfg.grad_accum):
            inputs, targets, mask = (t.to(device) if t is not None else None for t in batch_fn(step, micro, cfg.batch_size))
            with bf16_autocast(device, cfg.bf16_autocast):
                out = model.loss(inputs, targets, mask)
            (out.loss / cfg.grad_accum).backward()
            for key in parts:
                parts[key] += getattr(out, key).item() / cfg.grad_accum
            tokens += inputs.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balance = model.update_expert_bias()
        step_seconds = time.perf_counter() - t0
        seconds += step_seconds
        flops += flops_per_token * tokens
        window_tokens += tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {**parts, "lr": lr, "grad_norm": grad_norm, **balance,
                       "tokens_per_s": window_tokens / elapsed,
                       "mfu": flops_per_token * window_tokens / elapsed / peak_flops if peak_flops else 0.0,
                       "seconds": seconds}
            window_tokens, window_start = 0, time.perf_counter()
            if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
                metrics["heldout_loss"] = heldout_loss(model, heldout)
            log.log(done, metrics)
            progress.update(done, f"loss {parts['loss']:.3f} | {metrics['tokens_per_s']:,.0f} tok/s | "
                                  f"MFU {100 * metrics['mfu']:.1f}%", force=True)
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            save_stage(stage_dir, model, tokenizer, optimizer, done, done == cfg.steps,
                       {"seconds": seconds, "flops": flops}, metadata)
    progress.close()
    log.close()
    return StageResult(model, cfg.steps, seconds, flops, stage_cost(stage, flops, seconds, cost, peak_flops, device))
