"""The R1-Zero loop: rollouts from the engine, rule-based rewards, group advantages, clipped updates.

Per step: P train-split prompts (a function of seed and step) x G samples, sampled and graded by
`r1lab.sampling` (one prefill per prompt, shared by its G samples; the template's stop rule;
accuracy + format by default, weights from the recipe; a completion cut by the length limit has
no valid format) ->
optional dynamic sampling (drop all-equal groups, refill) -> advantages within each group -> old
log-probs recomputed by the current policy before the first pass (none on policy: one pass in one
minibatch takes them from its own forward, detached) -> `epochs` passes of minibatch updates with
the chosen loss (`train/grpo.py`) -> aux-loss-free bias update -> metrics, periodic held-out
evaluation and checkpoints. Killed and resumed, it continues with the numbers an
uninterrupted run would have had.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.profiler import record_function

from r1lab.cost import train_flops_per_token
from r1lab.device import bf16_autocast
from r1lab.engine import Engine, SamplingParams
from r1lab.model import Transformer
from r1lab.recipe import CostConfig, GRPOConfig
from r1lab.sampling import Group, Sampled, grade, longest_prompt, sample, sized_engine
from r1lab.tokenizer import R1, Tokenizer
from r1lab.train.common import (MetricsLog, Progress, StageResult, lr_at, make_optimizer, resume_into, save_stage,
                                set_lr, stage_cost)
from r1lab.train.grpo import LOSSES, group_advantages, keep_informative_groups

@dataclass
class Rollout:
    samples: list[Sampled]        # the kept groups' graded samples, G consecutive ones per prompt
    generated: list[Group]        # every group sampled (more than P under dynamic sampling)
    n_all_equal: int              # of those, groups whose rewards were all equal

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([s.reward for s in self.samples])  # (N,) weighted totals


def rollout(engine: Engine, tokenizer: Tokenizer, pool: list[dict], cfg: GRPOConfig, step: int, template: str) -> Rollout:
    """P groups of G samples; with dynamic sampling, informative groups only (refilled)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            n=cfg.group_size)
    kept: list[list[Sampled]] = []
    generated: list[Group] = []
    all_equal = 0
    for round_ in range(1 + (cfg.max_refill_rounds if cfg.dynamic_sampling else 0)):
        examples = [pool[rng.randrange(len(pool))] for _ in range(cfg.prompts_per_step)]
        groups = sample(engine, tokenizer, examples, replace(params, seed=rng.randrange(2**62)), template)
        generated += groups
        for group in groups:
            with record_function("grpo.reward"):
                graded = grade(group.samples, cfg.reward_weights, think_opened=template == R1,
                               max_new_tokens=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer)
            informative = bool(keep_informative_groups(torch.tensor([s.reward for s in graded]), cfg.group_size)[0])
            all_equal += not informative
            if informative or not cfg.dynamic_sampling:
                kept.append(graded)
        if len(kept) >= cfg.prompts_per_step:
            break
    return Rollout([s for group in kept[:cfg.prompts_per_step] for s in group], generated, all_equal)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (N, L-1), targets (N, L-1), completion mask (N, L-1)) for prompt + completion rows."""
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    seqs = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L - 1)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seqs[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) - 1:len(p) - 1 + len(c)] = 1.0  # the positions whose next token is a completion token
    return seqs[:, :-1], seqs[:, 1:], mask


def token_logprobs(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) (N, T), the logits' log-softmax (N, T, V)) under `model`."""
    logp_all = model(inputs).float().log_softmax(dim=-1)
    return logp_all.gather(-1, targets[..., None])[..., 0], logp_all


@torch.no_grad()
def reference_logprobs(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                       chunk: int) -> tuple[torch.Tensor, float]:
    """Log-probs of the sampled tokens and the mean token entropy, in eval mode, chunked."""
    was_training = model.training
    model.eval()
    out, entropy_sum = [], 0.0
    for s in range(0, len(inputs), chunk):
        lp, lp_all = token_logprobs(model, inputs[s:s + chunk], targets[s:s + chunk])
        out.append(lp)
        entropy_sum += entropy_total(lp_all, mask[s:s + chunk])
    model.train(was_training)
    return torch.cat(out), entropy_sum / float(mask.sum().clamp(min=1))


@torch.no_grad()
def entropy_total(logp_all: torch.Tensor, mask: torch.Tensor) -> float:
    """The sum over masked positions of each position's entropy, from log-softmaxed logits (N, T, V)."""
    return float(((-(logp_all.exp() * logp_all).sum(-1)) * mask).sum())


def on_policy(cfg: GRPOConfig, n_sequences: int) -> bool:
    """One pass in one minibatch: the policy that sampled is the one updated, so old log-probs are the
    current ones (detached) and need no forward of their own."""
    return cfg.epochs == 1 and cfg.minibatch_size >= n_sequences


def train_grpo(model: Transformer, tokenizer: Tokenizer, pool: list[dict], cfg: GRPOConfig, stage_dir: Path,
               template: str, cost: CostConfig, peak_flops: float, reference: Transformer | None = None,
               evaluate=None, metadata: dict | None = None, quiet: bool = False,
               max_prompt_len: int | None = None) -> StageResult:
    """R1-Zero GRPO from `model` (the base) on prompts drawn from `pool`.

    `reference` is the frozen policy for the KL term (needed only when cfg.beta > 0). `evaluate`
    (model -> dict of held-out metrics) runs every cfg.eval_every steps. `max_prompt_len` is the
    pool's `longest_prompt` when the caller has it (rendering thousands of prompts takes a second).
    """
    loss_fn, scale = LOSSES[cfg.loss]
    device = next(model.parameters()).device
    for p in model.mtp.parameters():  # the policy is the main model; RL does not train the MTP drafter
        p.requires_grad_(False)
    optimizer = make_optimizer(model, cfg.optim)
    resumed = resume_into(stage_dir, model, optimizer)
    start, seconds, flops = resumed or (0, 0.0, 0.0)
    if cfg.beta > 0 and reference is None:
        raise ValueError("grpo.beta > 0 needs a reference model")
    # The engine reads the model's own tensors (a compiled one takes them as inputs of each step), which the
    # optimizer updates in place: each rollout samples from the current policy.
    engine = sized_engine(model, tokenizer, max_prompt_len or longest_prompt(tokenizer, pool, template),
                          cfg.max_new_tokens, max_batch_size=cfg.prompts_per_step * cfg.group_size,
                          compile=cfg.compile_rollouts)
    log = MetricsLog(stage_dir / "metrics.jsonl", resume_step=start if resumed is not None else None)
    progress = Progress("grpo", cfg.steps, start, quiet)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        model.eval()
        with record_function("grpo.rollout"):
            batch = rollout(engine, tokenizer, pool, cfg, step, template)
        t_rollout = time.perf_counter() - t0
        lengths = [len(s.token_ids) for s in batch.samples]
        metrics = {"reward_mean": float(batch.rewards.mean()) if len(batch.rewards) else 0.0,
                   "reward_std": float(batch.rewards.std()) if len(batch.rewards) > 1 else 0.0,
                   "accuracy": _mean([s.rewards.get("accuracy", 0.0) for s in batch.samples]),
                   "format_rate": _mean([s.rewards.get("format", 0.0) for s in batch.samples]),
                   "response_length_mean": sum(lengths) / max(1, len(lengths)),
                   "response_length_max": max(lengths, default=0),
                   "truncated_share": _mean([float(s.truncated) for s in batch.samples]),
                   "all_equal_group_share": batch.n_all_equal / max(1, len(batch.generated)),
                   "rollout_tokens_per_s": sum(lengths) / t_rollout}
        flops += sum(group.flops(model.config) for group in batch.generated)
        if batch.samples:
            t1 = time.perf_counter()
            train_metrics, train_flops = _optimise(model, reference, optimizer, batch, cfg, loss_fn, scale,
                                                   lr_at(step, cfg.steps, cfg.optim), tokenizer.pad_id, step)
            train_tokens = train_metrics.pop("_tokens")
            metrics.update(train_metrics)
            metrics["train_tokens_per_s"] = train_tokens / (time.perf_counter() - t1)
            flops += train_flops
        metrics.update(model.update_expert_bias())
        step_seconds = time.perf_counter() - t0
        seconds += step_seconds
        metrics.update({"step_seconds": step_seconds, "seconds": seconds})
        done = step + 1
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            metrics.update({f"heldout_{k}": v for k, v in evaluate(model).items()})
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.log(done, metrics)
        progress.update(done, f"reward {metrics['reward_mean']:.2f} | acc {metrics['accuracy']:.2f} | "
                              f"len {metrics['response_length_mean']:.0f}", force=True)
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            save_stage(stage_dir, model, tokenizer, optimizer, done, done == cfg.steps,
                       {"seconds": seconds, "flops": flops}, metadata)
    progress.close()
    log.close()
    return StageResult(model, cfg.steps, seconds, flops, stage_cost("rl", flops, seconds, cost, peak_flops, device))


def _optimise(model, reference, optimizer, batch: Rollout, cfg: GRPOConfig, loss_fn, scale: bool, lr: float,
              pad_id: int, step: int) -> tuple[dict, float]:
    """epochs x minibatches of clipped-objective steps on one rollout batch."""
    device = next(model.parameters()).device
    inputs, targets, mask = (t.to(device) for t in pack([s.prompt_ids for s in batch.samples],
                                                         [s.token_ids for s in batch.samples], pad_id))
    advantages = group_advantages(batch.rewards, cfg.group_size, scale).to(device)
    single = on_policy(cfg, len(inputs))
    old_logp = entropy = None
    with bf16_autocast(device, cfg.bf16_autocast):  # the ratio compares log-probs of one precision
        if not single:
            old_logp, entropy = reference_logprobs(model, inputs, targets, mask, cfg.minibatch_size)
        ref_logp = reference_logprobs(reference, inputs, targets, mask, cfg.minibatch_size)[0] if cfg.beta > 0 else None
    set_lr(optimizer, lr)
    model.train()
    stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
    n_updates = 0
    order_rng = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(inputs), generator=order_rng).to(device)
        for s in range(0, len(inputs), cfg.minibatch_size):
            idx = order[s:s + cfg.minibatch_size]
            with bf16_autocast(device, cfg.bf16_autocast), record_function("grpo.logprob_forward"):
                logp, logp_all = token_logprobs(model, inputs[idx], targets[idx])
            if single:  # the ratio is exp(logp - logp.detach()): 1, with the gradient of logp
                entropy = entropy_total(logp_all, mask[idx]) / float(mask.sum().clamp(min=1))
            out = loss_fn(logp, logp.detach() if single else old_logp[idx], advantages[idx], mask[idx],
                          ref_logp=None if ref_logp is None else ref_logp[idx], beta=cfg.beta,
                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, max_tokens=cfg.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            with record_function("grpo.backward"):
                out.loss.backward()
            with record_function("grpo.optimizer"):
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
                optimizer.step()
            for key, value in (("loss", out.loss), ("kl", out.kl), ("clip_fraction", out.clip_fraction), ("grad_norm", grad_norm)):
                stats[key] += float(value.detach() if torch.is_tensor(value) else value)
            n_updates += 1
    result = {k: v / max(1, n_updates) for k, v in stats.items()}
    result["entropy"] = entropy
    result["_tokens"] = float(inputs.numel() * cfg.epochs)
    fwd = train_flops_per_token(model.config, inputs.shape[1], with_mtp=False) / 3
    passes = 3 * cfg.epochs + (0 if single else 1) + (1 if ref_logp is not None else 0)  # training, old, reference
    return result, fwd * passes * inputs.numel()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
