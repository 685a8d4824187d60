"""The R1-Zero loop: rollouts from the engine, rule-based rewards, group advantages, clipped updates.

Per step: P train-split prompts (a function of seed and step) x G samples from `Engine` (one
prefill per prompt, shared by its G samples) -> rewards from `r1lab.rewards` (accuracy + format by
default, weights from the recipe; a completion cut by the length limit has no valid format) ->
optional dynamic sampling (drop all-equal groups, refill) -> advantages within each group -> old
log-probs recomputed by the current policy before the first pass -> `epochs` passes of minibatch
updates with the chosen loss (`train/grpo.py`) -> aux-loss-free bias update -> metrics,
periodic held-out evaluation and checkpoints. Killed and resumed, it continues with the numbers an
uninterrupted run would have had.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from r1lab.cost import StageCost, generate_flops_per_token, train_flops_per_token
from r1lab.device import bf16_autocast
from r1lab.engine import Engine, SamplingParams
from r1lab.model import Transformer
from r1lab.recipe import CostConfig, GRPOConfig
from r1lab.rewards import REWARD_FUNCTIONS, overlong_penalty, score_batch
from r1lab.tokenizer import ANSWER_CLOSE, R1, Tokenizer, render_prompt
from r1lab.train.common import MetricsLog, Progress, lr_at, make_optimizer, resume_into, save_stage, set_lr, stage_cost
from r1lab.train.grpo import LOSSES, group_advantages, keep_informative_groups

@dataclass
class Rollout:
    examples: list[dict]          # one per sequence (each prompt's example repeated G times)
    prompts: list[list[int]]      # prompt ids per sequence
    completions: list[list[int]]  # generated ids per sequence (stop token included)
    texts: list[str]
    truncated: list[bool]
    rewards: torch.Tensor         # (N,) weighted total
    parts: dict[str, list[float]]  # reward name -> per sequence
    n_groups_sampled: int         # groups generated (more than P under dynamic sampling)
    n_all_equal: int              # of those, groups whose rewards were all equal


def stop_ids(tokenizer: Tokenizer, template: str) -> tuple[int, ...]:
    """R1-Zero completions end at `</answer>` (or EOS): nothing may follow the answer."""
    close = tokenizer.token_to_id(ANSWER_CLOSE)
    return (close,) if template != R1 and close is not None else ()


def longest_prompt(tokenizer: Tokenizer, pool: list[dict], template: str) -> int:
    """Tokens in the longest rendered prompt of the pool: what the engine's context must hold."""
    return max(len(render_prompt(tokenizer, ex["prompt"], template)) for ex in pool)


def score(cfg: GRPOConfig, texts: list[str], examples: list[dict], truncated: list[bool], lengths: list[int],
          think_opened: bool) -> tuple[torch.Tensor, dict[str, list[float]]]:
    names = [name for name in cfg.reward_weights if name in REWARD_FUNCTIONS]  # the recipe checked every name
    scored = score_batch([(REWARD_FUNCTIONS[n], cfg.reward_weights[n]) for n in names], texts,
                         [{**ex, "think_opened": think_opened} for ex in examples])
    parts = {name: list(scored.per_function[REWARD_FUNCTIONS[name].__name__]) for name in names}
    totals = list(scored.totals)
    if "format" in parts:  # a completion the length limit cut off has no valid format
        for i, cut in enumerate(truncated):
            if cut and parts["format"][i]:
                totals[i] -= cfg.reward_weights["format"] * parts["format"][i]
                parts["format"][i] = 0.0
    if cfg.overlong_buffer:
        penalty = [overlong_penalty(n, cfg.max_new_tokens, cfg.overlong_buffer) for n in lengths]
        parts["overlong"] = penalty
        totals = [t + cfg.reward_weights.get("overlong", 1.0) * p for t, p in zip(totals, penalty)]
    return torch.tensor(totals), parts


def rollout(engine: Engine, tokenizer: Tokenizer, pool: list[dict], cfg: GRPOConfig, step: int, template: str) -> Rollout:
    """P groups of G samples; with dynamic sampling, informative groups only (refilled)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            n=cfg.group_size, stop_token_ids=stop_ids(tokenizer, template))
    think_opened = template == R1
    kept: list[tuple] = []
    sampled = all_equal = 0
    for round_ in range(1 + (cfg.max_refill_rounds if cfg.dynamic_sampling else 0)):
        examples = [pool[rng.randrange(len(pool))] for _ in range(cfg.prompts_per_step)]
        prompts = [render_prompt(tokenizer, ex["prompt"], template) for ex in examples]
        outs = engine.generate(prompts, replace(params, seed=rng.randrange(2**62)))
        G = cfg.group_size
        for p, ex in enumerate(examples):
            group = outs[p * G:(p + 1) * G]
            texts = [tokenizer.decode(o.token_ids, skip_special=True) for o in group]
            truncated = [o.finish_reason == "length" for o in group]
            totals, parts = score(cfg, texts, [ex] * G, truncated, [len(o.token_ids) for o in group], think_opened)
            sampled += 1
            informative = bool(keep_informative_groups(totals, G)[0])
            all_equal += not informative
            if informative or not cfg.dynamic_sampling:
                kept.append((ex, prompts[p], group, texts, truncated, totals, parts))
        if len(kept) >= cfg.prompts_per_step:
            break
    kept = kept[:cfg.prompts_per_step] if kept else []
    G = cfg.group_size
    return Rollout(
        examples=[k[0] for k in kept for _ in range(G)], prompts=[k[1] for k in kept for _ in range(G)],
        completions=[o.token_ids for k in kept for o in k[2]], texts=[t for k in kept for t in k[3]],
        truncated=[t for k in kept for t in k[4]],
        rewards=torch.cat([k[5] for k in kept]) if kept else torch.zeros(0),
        parts={name: [v for k in kept for v in k[6][name]] for name in (kept[0][6] if kept else {})},
        n_groups_sampled=sampled, n_all_equal=all_equal)


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
        entropy = -(lp_all.exp() * lp_all).sum(-1)
        entropy_sum += float((entropy * mask[s:s + chunk]).sum())
    model.train(was_training)
    return torch.cat(out), entropy_sum / float(mask.sum().clamp(min=1))


@dataclass
class RLResult:
    model: Transformer
    seconds: float
    flops: float
    cost: StageCost
    last: dict


def train_grpo(model: Transformer, tokenizer: Tokenizer, pool: list[dict], cfg: GRPOConfig, stage_dir: Path,
               template: str, cost: CostConfig, peak_flops: float, reference: Transformer | None = None,
               evaluate=None, metadata: dict | None = None, quiet: bool = False,
               max_prompt_len: int | None = None) -> RLResult:
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
    engine = Engine(model, eos_id=tokenizer.eos_id, max_batch_size=cfg.prompts_per_step * cfg.group_size,
                    max_len=min(model.config.max_seq_len,
                                (max_prompt_len or longest_prompt(tokenizer, pool, template)) + cfg.max_new_tokens + 8))
    log = MetricsLog(stage_dir / "metrics.jsonl", resume_step=start if resumed is not None else None)
    progress = Progress("grpo", cfg.steps, start, quiet)
    last: dict = {}
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        model.eval()
        batch = rollout(engine, tokenizer, pool, cfg, step, template)
        t_rollout = time.perf_counter() - t0
        gen_tokens = sum(len(c) for c in batch.completions)
        metrics = {"reward_mean": float(batch.rewards.mean()) if len(batch.rewards) else 0.0,
                   "reward_std": float(batch.rewards.std()) if len(batch.rewards) > 1 else 0.0,
                   "accuracy": _mean(batch.parts.get("accuracy", [])), "format_rate": _mean(batch.parts.get("format", [])),
                   "response_length_mean": gen_tokens / max(1, len(batch.completions)),
                   "response_length_max": max((len(c) for c in batch.completions), default=0),
                   "truncated_share": _mean([float(t) for t in batch.truncated]),
                   "all_equal_group_share": batch.n_all_equal / max(1, batch.n_groups_sampled),
                   "rollout_tokens_per_s": gen_tokens / t_rollout}
        flops += _generation_flops(model, batch, cfg.group_size)
        if batch.completions:
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
        last = metrics
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            save_stage(stage_dir, model, tokenizer, optimizer, done, done == cfg.steps,
                       {"seconds": seconds, "flops": flops}, metadata)
    progress.close()
    log.close()
    return RLResult(model, seconds, flops, stage_cost("rl", flops, seconds, cost, peak_flops, device), last)


def _optimise(model, reference, optimizer, batch: Rollout, cfg: GRPOConfig, loss_fn, scale: bool, lr: float,
              pad_id: int, step: int) -> tuple[dict, float]:
    """epochs x minibatches of clipped-objective steps on one rollout batch."""
    device = next(model.parameters()).device
    inputs, targets, mask = (t.to(device) for t in pack(batch.prompts, batch.completions, pad_id))
    advantages = group_advantages(batch.rewards, cfg.group_size, scale).to(device)
    with bf16_autocast(device, cfg.bf16_autocast):  # the ratio compares log-probs of one precision
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
            with bf16_autocast(device, cfg.bf16_autocast):
                logp, _ = token_logprobs(model, inputs[idx], targets[idx])
            out = loss_fn(logp, old_logp[idx], advantages[idx], mask[idx],
                          ref_logp=None if ref_logp is None else ref_logp[idx], beta=cfg.beta,
                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, max_tokens=cfg.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            for key, value in (("loss", out.loss), ("kl", out.kl), ("clip_fraction", out.clip_fraction), ("grad_norm", grad_norm)):
                stats[key] += float(value.detach() if torch.is_tensor(value) else value)
            n_updates += 1
    result = {k: v / max(1, n_updates) for k, v in stats.items()}
    result["entropy"] = entropy
    result["_tokens"] = float(inputs.numel() * cfg.epochs)
    fwd = train_flops_per_token(model.config, inputs.shape[1], with_mtp=False) / 3
    passes = 3 * cfg.epochs + 1 + (1 if ref_logp is not None else 0)  # training passes, old log-probs, reference
    return result, fwd * passes * inputs.numel()


def _generation_flops(model: Transformer, batch: Rollout, group_size: int) -> float:
    cfg = model.config
    total = 0.0
    for i, (p, c) in enumerate(zip(batch.prompts, batch.completions)):
        if i % group_size == 0:  # the prompt is prefilled once per group
            total += len(p) * generate_flops_per_token(cfg, len(p) / 2)
        total += len(c) * generate_flops_per_token(cfg, len(p) + len(c) / 2)
    return total


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
