"""Supervised training: next-token pretraining (and, with a loss mask, SFT) in one loop.

The loop reads top to bottom: batch -> loss (next token + MTP + balance) -> backward -> clip ->
AdamW step -> aux-loss-free bias update -> log / held-out loss / checkpoint. Batches are a function
of (seed, step), and the checkpoint carries the optimizer, the step and the RNG states, so a run
killed at any point and resumed continues with exactly the numbers it would have had.

With more than one process (`train/distributed.py`), every rank draws the step's whole batch and
keeps its own contiguous rows; its loss is scaled by its share of the batch's loss tokens and the
gradients summed, so the step is the single-process step over the same rows (exactly so for the
next-token term; SFT's MTP and balance terms are weighted by the same token share). Router loads
are summed before the bias update. Only rank 0 writes the log, the progress and checkpoints.
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
from r1lab.train.common import StageResult, StageRun, loss_fn, lr_at, set_lr
from r1lab.train.distributed import World, shard, sum_floats, sync_expert_load, sync_gradients

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
                     optimizer_state: dict | None = None, world: World = World()) -> StageResult:
    """Train `model` for cfg.steps optimizer steps, resuming from stage_dir's checkpoint if it has one.

    batch_fn(step, micro, batch_size) gives a micro-batch. `optimizer_state` continues an earlier
    stage's AdamW moments (the control's continued pretraining). `world`: this process's rank among
    the run's (cfg.batch_size, the global micro-batch, a multiple of their number).
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    run = StageRun(model, tokenizer, cfg, stage_dir, stage, metadata, quiet, world, optimizer_state)
    optimizer = run.optimizer
    rows = shard(cfg.batch_size, world)
    seq_len = batch_fn(0, 0, 1)[0].shape[1]
    flops_per_token = train_flops_per_token(model.config, seq_len)
    model.train()
    loss = loss_fn(model, cfg.compile)  # held-out losses stay eager: no second compile for eval mode
    flops, seconds = run.flops, run.seconds
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(run.start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.optim)
        set_lr(optimizer, lr)
        parts = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        tokens = 0
        for micro in range(cfg.grad_accum):
            inputs, targets, mask = (t[rows.start:rows.stop].to(device) if t is not None else None
                                     for t in batch_fn(step, micro, cfg.batch_size))
            share = _token_share(mask, world)
            with bf16_autocast(device, cfg.bf16_autocast):
                out = loss(inputs, targets, mask)
            (out.loss * share / cfg.grad_accum).backward()
            for key in parts:
                parts[key] += getattr(out, key).item() * share / cfg.grad_accum
            tokens += inputs.numel()
        sync_gradients(model, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync_expert_load(model, world)
        balance = model.update_expert_bias()
        tokens, *summed = sum_floats([tokens, *parts.values()], world)
        parts = dict(zip(parts, summed))
        step_seconds = time.perf_counter() - t0
        seconds += step_seconds
        flops += flops_per_token * tokens
        window_tokens += tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {**parts, "lr": lr, "grad_norm": grad_norm, **balance,
                       "tokens_per_s": window_tokens / elapsed,
                       "mfu": flops_per_token * window_tokens / elapsed / (peak_flops * world.size) if peak_flops else 0.0,
                       "seconds": seconds}
            window_tokens, window_start = 0, time.perf_counter()
            if world.is_main and (cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps):
                metrics["heldout_loss"] = heldout_loss(model, heldout)
            run.log.log(done, metrics)
            run.progress.update(done, f"loss {parts['loss']:.3f} | {metrics['tokens_per_s']:,.0f} tok/s | "
                                      f"MFU {100 * metrics['mfu']:.1f}%")
        run.save_if_due(done, seconds, flops)
    return run.finish(stage, seconds, flops, cost, peak_flops)


def _token_share(mask: torch.Tensor | None, world: World) -> float:
    """This rank's part of the global micro-batch's loss: its rows' share of the loss tokens (1 in one process)."""
    if world.size == 1:
        return 1.0
    if mask is None:  # equal rows of equal length
        return 1.0 / world.size
    local = float(mask.sum())
    total = sum_floats([local], world)[0]
    return local / total if total else 1.0 / world.size
