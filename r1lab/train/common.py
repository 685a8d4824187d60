"""What every training stage shares: the optimizer and its schedule, metrics, progress, checkpoints
with trainer state (so an interrupted run resumes exactly), and the stage's line in the cost ledger.

A stage killed at any point (even mid-save, or mid-line in metrics.jsonl) resumes from its last
committed checkpoint: metrics rows written after it are dropped, so the log reads as if the run had
never stopped. Resuming a stage with a recipe it was not started with is refused.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from r1lab.checkpoint import (committed_checkpoint, read_model_metadata, read_trainer_state, read_trainer_summary,
                              rng_state, set_rng_state, write_text_atomic)
from r1lab.config import ConfigError, ModelConfig
from r1lab.cost import StageCost
from r1lab.model import LossOutput, Transformer
from r1lab.recipe import CostConfig, OptimConfig
from r1lab.tokenizer import Tokenizer
from r1lab.train.distributed import World, barrier, broadcast_model
from r1lab.train.policy import load_weights_into, model_shape, save_policy

CHECKPOINT = "checkpoint"


@dataclass
class StageResult:
    """What a training stage (pretraining, SFT, the control, RL) hands back."""
    model: Transformer
    steps: int
    seconds: float               # wall time of this process's part of the stage (resumed runs: the sum)
    flops: float
    cost: StageCost
    is_main: bool = True         # the process that wrote the checkpoint (rank 0 of a multi-process run)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (2-D parameters), not on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=1e-8)


def loss_fn(model: Transformer, compile: bool) -> Callable[..., LossOutput]:
    """`model.loss`, or it compiled (`torch.compile`, Inductor, static shapes) when `compile`.

    The compiled function wraps the bound method, not the module: the model, its state dict and its
    checkpoints stay those of the eager model (no `_orig_mod.` prefixes). Each new input shape (and
    the first call with and without a loss mask) compiles once more; packed pretraining batches have
    one shape. The MoE's expert dispatch runs eagerly inside it (`Experts.forward`)."""
    if not compile:
        return model.loss
    return torch.compile(model.loss, dynamic=False)


def lr_at(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warmup to optim.lr, then cosine down to optim.lr * min_lr_ratio at `total`."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) plus TensorBoard events when installed."""

    def __init__(self, path: Path, resume_step: int | None = None, write: bool = True):
        """`write` False (every process of a run but the first): touch no file, log nothing."""
        self.path, self.write, self.writer = path, write, None
        if not write:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a cut killed before its rename
            stale.unlink()
        if resume_step is not None and path.exists():
            # Rows written after the checkpoint we resume from would be duplicated: drop them.
            rows = [line for line in _whole_lines(path) if json.loads(line).get("step", -1) <= resume_step]
            write_text_atomic(path, "".join(r + "\n" for r in rows))
        elif path.exists():
            path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def log(self, step: int, values: dict) -> None:
        if not self.write:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _whole_lines(path: Path) -> list[str]:
    """The log's complete lines: a process killed mid-write leaves a last line without its newline."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # whatever follows the last newline is torn (or empty)
    return [line for line in lines if line.strip()]


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in _whole_lines(path)]


class Progress:
    """A progress line: a rich bar on a terminal, plain periodic lines otherwise (CI, pipes)."""

    def __init__(self, label: str, total: int, start: int = 0, quiet: bool = False):
        self.label, self.total, self.quiet = label, total, quiet
        self.start_time, self.start_step = time.perf_counter(), start
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif not self.quiet:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(done, 1) * (self.total - step)
            print(f"[{self.label}] {step}/{self.total} {info} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def check_resumable(stage_dir: Path, stage: str, config: ModelConfig | dict, steps: int, metadata: dict | None) -> None:
    """Refuse to resume a stage's checkpoint that another recipe made (another model, task or length).

    `config` is the model the stage starts from: a ModelConfig, or `policy.model_shape` of its directory.
    Cheap (config.json and trainer_state.json only), so a stage calls it before any expensive work."""
    path = committed_checkpoint(stage_dir / CHECKPOINT)
    if path is None:
        return
    hint = f"use another --run, or delete {stage_dir} to start {stage} over"
    want = asdict(config) if isinstance(config, ModelConfig) else config
    saved = model_shape(path)
    if saved != want:
        changed = [f"{k} {saved.get(k)} (now {v})" for k, v in want.items() if saved.get(k) != v]
        raise ConfigError(f"{path} holds a {stage} model with {', '.join(changed) or 'another kind of model'}; {hint}")
    saved_meta = read_model_metadata(path)  # config.json's, or r1lab_metadata.json beside an HF model
    if metadata is not None and saved_meta != metadata:
        changed = [f"{k} {saved_meta.get(k)!r} (now {v!r})" for k, v in metadata.items() if saved_meta.get(k) != v]
        raise ConfigError(f"{path} was trained with data {', '.join(changed)}; {hint}")
    step = read_trainer_summary(path).get("step", 0)
    if step > steps:
        raise ConfigError(f"{path} is at step {step}, past {stage}.steps = {steps}; {hint}")


class StageRun:
    """The frame of a training loop: the model, AdamW and the RNG states resumed from the stage's last
    committed checkpoint (on a fresh start, AdamW continued from `optimizer_state` if given), rank 0's
    weights on every rank, the metrics log and the progress line; then the checkpoints and, at the end,
    the stage's result. `start`, `seconds` and `flops` are where a resumed run left off (0 on a fresh start:
    also when a save was killed before the stage's first checkpoint was committed)."""

    def __init__(self, model, tokenizer: Tokenizer | None, cfg, stage_dir: Path, label: str,
                 metadata: dict | None, quiet: bool, world: World, optimizer_state: dict | None = None):
        """`cfg`: the stage's section (its optim, steps and save_every)."""
        self.model, self.tokenizer, self.cfg, self.stage_dir = model, tokenizer, cfg, stage_dir
        self.metadata, self.world = metadata, world
        self.optimizer = make_optimizer(model, cfg.optim)
        path = committed_checkpoint(stage_dir / CHECKPOINT)
        state = None if path is None else read_trainer_state(path)
        self.start, self.seconds, self.flops = 0, 0.0, 0.0
        if state is not None:
            load_weights_into(path, model)
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            self.start, self.seconds, self.flops = state["step"], state["seconds"], state["flops"]
        elif optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        broadcast_model(model, world)
        self.log = MetricsLog(stage_dir / "metrics.jsonl", resume_step=None if state is None else self.start,
                              write=world.is_main)
        self.progress = Progress(label, cfg.steps, self.start, quiet or not world.is_main)

    def save_if_due(self, done: int, seconds: float, flops: float) -> None:
        """On rank 0, every cfg.save_every steps and after the last: an atomic checkpoint, in the model's own
        format, with everything needed to resume the stage exactly."""
        steps, every = self.cfg.steps, self.cfg.save_every
        if self.world.is_main and (done == steps or (every and done % every == 0)):
            state = {"step": done, "done": done == steps, "optimizer": self.optimizer.state_dict(),
                     "rng": rng_state(), "seconds": seconds, "flops": flops}
            save_policy(self.stage_dir / CHECKPOINT, self.model, self.tokenizer, state, self.metadata)

    def finish(self, stage: str, seconds: float, flops: float, cost: CostConfig, peak_flops: float) -> StageResult:
        self.progress.close()
        self.log.close()
        barrier(self.world)  # every rank returns once the final checkpoint is committed
        device = next(self.model.parameters()).device
        return StageResult(self.model, self.cfg.steps, seconds, flops,
                           stage_cost(stage, flops, seconds, cost, peak_flops, device, self.world.size),
                           self.world.is_main)


def stage_cost(stage: str, flops: float, seconds: float, cost: CostConfig, peak_flops: float,
               device: torch.device | None = None, processes: int = 1) -> StageCost:
    """The ledger line of a stage run on `device` (CPU: priced per core-hour of torch's threads) by
    `processes` processes alike (`flops`: all of theirs; `peak_flops`: one device's)."""
    if device is not None and device.type == "cuda":
        return StageCost(stage, flops, seconds, processes, torch.cuda.get_device_name(device), peak_flops * processes,
                         cost.gpu_hour_usd)
    return StageCost(stage, flops, seconds, processes * torch.get_num_threads(), "cpu-core", peak_flops * processes,
                     cost.cpu_core_hour_usd)
