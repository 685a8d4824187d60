"""The R1-Zero loop: rollouts from the engine (or vLLM), rule-based rewards, group advantages, clipped updates.

Per step: P train-split prompts (a function of seed and step) x G samples, sampled (by r1lab's engine or,
with `grpo.rollout_backend = "vllm"`, by `vllm_rollout.VLLMRollout`) and graded by `r1lab.sampling` (one
prefill per prompt, shared by its G samples; the template's stop rule; accuracy + format by default,
weights from the recipe; a completion cut by the length limit has no valid format) ->
optional dynamic sampling (drop all-equal groups, refill) -> advantages within each group -> old
log-probs recomputed by the current policy before the first pass (none on policy: one pass in one
minibatch takes them from its own forward, detached) -> `epochs` passes of minibatch updates with
the chosen loss (`train/grpo.py`) -> aux-loss-free bias update -> metrics, periodic held-out
evaluation and checkpoints. Killed and resumed, it continues with the numbers an
uninterrupted run would have had.

With more than one process (`train/distributed.py`), every rank draws the step's P prompts and
samples its contiguous share of them, whole groups, with the seeds one process would have used for
them; advantages stay group-local. Each sample keeps its position in the step's global batch, so
the minibatches are the single-process ones; a rank scales its loss by its share of the
minibatch's denominator (sequences, or tokens for DAPO) and gradients are summed. Metrics are
computed over every rank's samples; only rank 0 logs, evaluates and writes checkpoints.
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
from r1lab.train.common import StageResult, StageRun, lr_at, set_lr
from r1lab.train.distributed import World, gather, shard, sum_floats, sync_expert_load, sync_gradients
from r1lab.train.grpo import AVERAGED_OVER, LOSSES, group_advantages, keep_informative_groups
from r1lab.train.vllm_rollout import VLLMRollout

@dataclass
class Rollout:
    samples: list[Sampled]        # the kept groups' graded samples, G consecutive ones per prompt
    generated: list[Group]        # every group sampled (more than P under dynamic sampling)
    n_all_equal: int              # of those, groups whose rewards were all equal
    positions: list[int] | None = None  # each sample's row in the step's batch over all processes (None: 0..)
    total: int | None = None      # rows in that batch (None: len(samples))

    def __post_init__(self):
        if self.positions is None:
            self.positions = list(range(len(self.samples)))
        if self.total is None:
            self.total = len(self.samples)

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([s.reward for s in self.samples])  # (N,) weighted totals


def rollout(engine: Engine | VLLMRollout, tokenizer: Tokenizer, pool: list[dict], cfg: GRPOConfig, step: int, template: str,
            world: World = World()) -> Rollout:
    """P groups of G samples; with dynamic sampling, informative groups only (refilled). With more
    than one process, this rank's share of them, placed where one process would have had them."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            n=cfg.group_size)
    mine = shard(cfg.prompts_per_step, world)
    kept: list[tuple[int, list[Sampled]]] = []  # (the group's place among all ranks' kept groups, its samples)
    n_kept = 0  # kept groups over all ranks, in earlier rounds
    generated: list[Group] = []
    all_equal = 0
    for round_ in range(1 + (cfg.max_refill_rounds if cfg.dynamic_sampling else 0)):
        examples = [pool[rng.randrange(len(pool))] for _ in range(cfg.prompts_per_step)]
        groups = sample(engine, tokenizer, examples[mine.start:mine.stop], replace(params, seed=rng.randrange(2**62)),
                        template, first_index=mine.start)
        generated += groups
        round_kept = []
        for group in groups:
            with record_function("grpo.reward"):
                graded = grade(group.samples, cfg.reward_weights, think_opened=template == R1,
                               max_new_tokens=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer)
            informative = bool(keep_informative_groups(torch.tensor([s.reward for s in graded]), cfg.group_size)[0])
            all_equal += not informative
            if informative or not cfg.dynamic_sampling:
                round_kept.append(graded)
        counts = gather(len(round_kept), world)  # ranks hold consecutive prompts: rank order is prompt order
        first = n_kept + sum(counts[:world.rank])
        kept += [(first + j, group) for j, group in enumerate(round_kept)]
        n_kept += sum(counts)
        if n_kept >= cfg.prompts_per_step:
            break
    kept = [(place, group) for place, group in kept if place < cfg.prompts_per_step]
    return Rollout([s for _, group in kept for s in group], generated, all_equal,
                   [place * cfg.group_size + j for place, group in kept for j in range(len(group))],
                   min(n_kept, cfg.prompts_per_step) * cfg.group_size)


def completion_mask(completions: list[list[int]], width: int) -> torch.Tensor:
    """(N, width) 1.0 on each row's completion tokens: the positions log-probs are taken at."""
    return (torch.arange(width) < torch.tensor([len(c) for c in completions], dtype=torch.long)[:, None]).float()


def _padded(rows: list[list[int]], width: int, pad_id: int) -> torch.Tensor:
    """The rows of token ids right-padded with pad_id to `width` (N, width)."""
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, width: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(completion token) (N, width), the log-softmax there (N, width, V)) under `model`.

    Rows that share a prompt (a group's samples, consecutive) share its forward: r1lab's Transformer runs
    each distinct prompt once into a KV cache, repeats the cache rows for its samples, and runs the
    completions over it, so a group's prompt is computed (and back-propagated) once instead of G times.
    Other decoders run every row's prompt + completion in one padded forward. Padding adds nothing to
    the experts' loads (`Transformer.trunk`'s `count`)."""
    starts = [0] + [i for i in range(1, len(prompts)) if prompts[i] != prompts[i - 1]]
    counts = torch.tensor([b - a for a, b in zip(starts, starts[1:] + [len(prompts)])], device=device)
    comp, real = _padded(completions, width, pad_id).to(device), completion_mask(completions, width).bool().to(device)
    if isinstance(model, Transformer):
        logits = shared_prompt_logits(model, [prompts[a] for a in starts], counts, comp, pad_id, real)
    else:
        logits = padded_logits(model, prompts, comp, pad_id, real)
    logp_all = logits.float().log_softmax(dim=-1)
    return logp_all.gather(-1, comp[..., None])[..., 0], logp_all


def shared_prompt_logits(model: Transformer, prompts: list[list[int]], counts: torch.Tensor, comp: torch.Tensor,
                         pad_id: int, real: torch.Tensor) -> torch.Tensor:
    """Logits (N, W, V) predicting each completion token: the distinct prompts (P, Tp) prefilled into a cache
    whose rows are then repeated `counts` (P,) times, the completions' first W-1 tokens run over it.
    `real` (N, W) marks the completion tokens; only the tokens a row's own unpadded forward would run
    (its prompt, its completion less the last token) count towards the experts' loads."""
    device, W = comp.device, comp.shape[1]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    Tp = int(lengths.max())
    tokens = _padded(prompts, Tp, pad_id)
    cache = model.new_cache(len(prompts), Tp + W)
    positions = torch.arange(Tp, device=device).expand(len(prompts), Tp)
    hidden, _ = model.trunk(tokens.to(device), positions=positions, cache=cache, n_slots=Tp,
                            count=positions < lengths[:, None])  # (P, Tp, D)
    first = model.logits(hidden[torch.arange(len(prompts), device=device), lengths - 1])  # (P, V): completion token 0
    first = first.repeat_interleave(counts, dim=0)[:, None]  # (N, 1, V)
    if W == 1:
        return first
    # A new tensor per layer: the prompt pass's saved activations are not overwritten by the writes below.
    cache.select(torch.arange(len(prompts), device=device).repeat_interleave(counts))
    positions = lengths.repeat_interleave(counts)[:, None] + torch.arange(W - 1, device=device)  # (N, W-1)
    # Input token t counts when the token it predicts, t + 1, is a completion token.
    hidden, _ = model.trunk(comp[:, :-1], positions=positions, cache=cache, count=real[:, 1:])  # (N, W-1, D)
    return torch.cat([first, model.logits(hidden)], dim=1)  # (N, W, V)


def padded_logits(model, prompts: list[list[int]], comp: torch.Tensor, pad_id: int, real: torch.Tensor) -> torch.Tensor:
    """Logits (N, W, V) predicting each completion token, from one forward over prompt + completion rows;
    `real` (N, W) and the experts' loads of r1lab's Transformer as in `shared_prompt_logits`."""
    N, W = comp.shape
    lengths = torch.tensor([len(p) for p in prompts], device=comp.device)
    L = int(lengths.max()) + W
    seqs = _padded([p + row for p, row in zip(prompts, comp.tolist())], L, pad_id).to(comp.device)
    fed = torch.arange(L, device=comp.device) < (lengths + real.sum(dim=1))[:, None]  # prompt and completion tokens
    # Input token t counts when the token it predicts, t + 1, is a prompt or completion token.
    logits = model(seqs[:, :-1], count=fed[:, 1:]) if isinstance(model, Transformer) else model(seqs[:, :-1])
    at = (lengths - 1)[:, None] + torch.arange(W, device=comp.device)  # the positions predicting completion tokens
    return logits.gather(1, at[..., None].expand(N, W, logits.shape[-1]))


@torch.no_grad()
def reference_logprobs(model, prompts: list[list[int]], completions: list[list[int]], mask: torch.Tensor,
                       chunk: int, pad_id: int) -> tuple[torch.Tensor, float]:
    """Log-probs of the sampled tokens (N, W) and the token entropy summed over `mask`, in eval mode, in
    chunks of rows."""
    was_training = model.training
    model.eval()
    out, entropy_sum = [], 0.0
    for s in range(0, len(prompts), chunk):
        lp, lp_all = completion_logprobs(model, prompts[s:s + chunk], completions[s:s + chunk], pad_id,
                                         mask.shape[1], mask.device)
        out.append(lp)
        entropy_sum += entropy_total(lp_all, mask[s:s + chunk])
    model.train(was_training)
    return torch.cat(out), entropy_sum


def fed_tokens(prompts: list[list[int]], width: int) -> int:
    """Tokens a `completion_logprobs` call runs: each distinct prompt (padded) once, then width - 1 per row."""
    distinct = 1 + sum(prompts[i] != prompts[i - 1] for i in range(1, len(prompts)))
    return distinct * max(len(p) for p in prompts) + len(prompts) * (width - 1)


@torch.no_grad()
def entropy_total(logp_all: torch.Tensor, mask: torch.Tensor) -> float:
    """The sum over masked positions of each position's entropy, from log-softmaxed logits (N, T, V)."""
    return float(((-(logp_all.exp() * logp_all).sum(-1)) * mask).sum())


def rollout_engine(model, tokenizer: Tokenizer, cfg: GRPOConfig, longest: int, optimizer,
                   vllm=None) -> Engine | VLLMRollout:
    """What samples the rollouts, chosen once by cfg.rollout_backend. r1lab's engine reads the model's own
    tensors (a compiled one takes them as inputs of each step), which the optimizer updates in place; vLLM
    holds a copy, sent the new weights before it samples after an optimizer step moved them."""
    if cfg.rollout_backend == "vllm":
        source = VLLMRollout.for_grpo(model, tokenizer, cfg, longest, vllm)
        optimizer.register_step_post_hook(source.weights_changed)
        return source
    return sized_engine(model, tokenizer, longest, cfg.max_new_tokens,
                        max_batch_size=cfg.prompts_per_step * cfg.group_size, compile=cfg.compile_rollouts)


def on_policy(cfg: GRPOConfig, n_sequences: int) -> bool:
    """One pass in one minibatch: the policy that sampled is the one updated, so old log-probs are the
    current ones (detached) and need no forward of their own."""
    return cfg.epochs == 1 and cfg.minibatch_size >= n_sequences


def train_grpo(model: Transformer, tokenizer: Tokenizer, pool: list[dict], cfg: GRPOConfig, stage_dir: Path,
               template: str, cost: CostConfig, peak_flops: float, reference: Transformer | None = None,
               evaluate=None, metadata: dict | None = None, quiet: bool = False,
               max_prompt_len: int | None = None, world: World = World(), vllm=None) -> StageResult:
    """R1-Zero GRPO from `model` (the base) on prompts drawn from `pool`.

    `reference` is the frozen policy for the KL term (needed only when cfg.beta > 0). `evaluate`
    (model -> dict of held-out metrics) runs every cfg.eval_every steps. `max_prompt_len` is the
    pool's `longest_prompt` when the caller has it (rendering thousands of prompts takes a second).
    `world`: this process's rank among the run's (cfg.prompts_per_step a multiple of their number).
    `vllm`: what provides `LLM` and `SamplingParams` for cfg.rollout_backend = "vllm" (default: the vllm
    package; tests hand in a fake).
    """
    loss_fn, scale = LOSSES[cfg.loss]
    for p in model.mtp.parameters():  # the policy is the main model; RL does not train the MTP drafter
        p.requires_grad_(False)
    if cfg.beta > 0 and reference is None:
        raise ValueError("grpo.beta > 0 needs a reference model")
    run = StageRun(model, tokenizer, cfg, stage_dir, "grpo", metadata, quiet, world)
    optimizer, seconds, flops = run.optimizer, run.seconds, run.flops
    engine = rollout_engine(model, tokenizer, cfg, max_prompt_len or longest_prompt(tokenizer, pool, template),
                            optimizer, vllm)
    for step in range(run.start, cfg.steps):
        t0 = time.perf_counter()
        model.eval()
        with record_function("grpo.rollout"):
            batch = rollout(engine, tokenizer, pool, cfg, step, template, world=world)
        t_rollout = time.perf_counter() - t0
        metrics, step_flops = _rollout_metrics(batch, model.config, t_rollout, world)
        flops += step_flops
        if batch.total:
            t1 = time.perf_counter()
            train_metrics, train_flops = _optimise(model, reference, optimizer, batch, cfg, loss_fn, scale,
                                                   lr_at(step, cfg.steps, cfg.optim), tokenizer.pad_id, step,
                                                   world=world)
            train_tokens = train_metrics.pop("_tokens")
            metrics.update(train_metrics)
            metrics["train_tokens_per_s"] = train_tokens / (time.perf_counter() - t1)
            flops += train_flops
        sync_expert_load(model, world)
        metrics.update(model.update_expert_bias())
        step_seconds = time.perf_counter() - t0
        seconds += step_seconds
        metrics.update({"step_seconds": step_seconds, "seconds": seconds})
        done = step + 1
        if world.is_main and evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            metrics.update({f"heldout_{k}": v for k, v in evaluate(model).items()})
        if done % cfg.log_every == 0 or done == cfg.steps:
            run.log.log(done, metrics)
        run.progress.update(done, f"reward {metrics['reward_mean']:.2f} | acc {metrics['accuracy']:.2f} | "
                                  f"len {metrics['response_length_mean']:.0f}")
        run.save_if_due(done, seconds, flops)
    return run.finish("rl", seconds, flops, cost, peak_flops)


def _rollout_metrics(batch: Rollout, config, seconds: float, world: World) -> tuple[dict, float]:
    """The step's rollout metrics over every rank's samples, and the FLOPs all ranks spent sampling."""
    mine = ([(s.reward, s.rewards.get("accuracy", 0.0), s.rewards.get("format", 0.0), len(s.token_ids),
              float(s.truncated)) for s in batch.samples],
            batch.n_all_equal, len(batch.generated), sum(group.flops(config) for group in batch.generated))
    ranks = gather(mine, world)
    rows = [row for rank in ranks for row in rank[0]]
    rewards = torch.tensor([r[0] for r in rows])
    lengths = [r[3] for r in rows]
    n_all_equal, n_generated, flops = (sum(rank[i] for rank in ranks) for i in (1, 2, 3))
    return {"reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "accuracy": _mean([r[1] for r in rows]),
            "format_rate": _mean([r[2] for r in rows]),
            "response_length_mean": sum(lengths) / max(1, len(lengths)),
            "response_length_max": max(lengths, default=0),
            "truncated_share": _mean([r[4] for r in rows]),
            "all_equal_group_share": n_all_equal / max(1, n_generated),
            "rollout_tokens_per_s": sum(lengths) / seconds}, flops


def _optimise(model, reference, optimizer, batch: Rollout, cfg: GRPOConfig, loss_fn, scale: bool, lr: float,
              pad_id: int, step: int, world: World = World()) -> tuple[dict, float]:
    """epochs x minibatches of clipped-objective steps on one rollout batch (this rank's rows of it)."""
    device = next(model.parameters()).device
    prompts, completions = [s.prompt_ids for s in batch.samples], [s.token_ids for s in batch.samples]
    width = max((len(c) for c in completions), default=1)
    mask = completion_mask(completions, width).to(device)
    advantages = group_advantages(batch.rewards, cfg.group_size, scale).to(device)
    single = on_policy(cfg, batch.total)
    old_logp = ref_logp = None
    entropy_sum = 0.0  # over this rank's completion tokens
    with bf16_autocast(device, cfg.bf16_autocast):  # the ratio compares log-probs of one precision
        if not single and completions:
            old_logp, entropy_sum = reference_logprobs(model, prompts, completions, mask, cfg.minibatch_size, pad_id)
        if cfg.beta > 0 and completions:
            ref_logp = reference_logprobs(reference, prompts, completions, mask, cfg.minibatch_size, pad_id)[0]
    set_lr(optimizer, lr)
    model.train()
    stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
    n_updates, tokens = 0, 0
    local_row = {place: i for i, place in enumerate(batch.positions)}  # global row -> this rank's row
    over_tokens = AVERAGED_OVER[cfg.loss] == "tokens"
    order_rng = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for _ in range(cfg.epochs):
        order = torch.randperm(batch.total, generator=order_rng)
        for s in range(0, batch.total, cfg.minibatch_size):
            members = order[s:s + cfg.minibatch_size].tolist()
            # (a group's rows stay together: one prompt pass)
            rows = sorted(local_row[m] for m in members if m in local_row)
            idx = torch.tensor(rows, device=device, dtype=torch.long)
            n_tokens = float(mask[idx].sum())
            all_tokens = max(1.0, sum_floats([n_tokens], world)[0])
            # This rank's part of the minibatch's denominator: exactly 1 in one process.
            share = (n_tokens / all_tokens if over_tokens else len(rows) / len(members)) if world.size > 1 else 1.0
            token_share = n_tokens / all_tokens if world.size > 1 else 1.0
            optimizer.zero_grad(set_to_none=True)
            parts = [0.0, 0.0, 0.0]
            if rows:
                mb_prompts = [prompts[i] for i in rows]
                with bf16_autocast(device, cfg.bf16_autocast), record_function("grpo.logprob_forward"):
                    logp, logp_all = completion_logprobs(model, mb_prompts, [completions[i] for i in rows], pad_id,
                                                         width, device)
                tokens += fed_tokens(mb_prompts, width)
                if single:  # the ratio is exp(logp - logp.detach()): 1, with the gradient of logp
                    entropy_sum = entropy_total(logp_all, mask[idx])
                out = loss_fn(logp, logp.detach() if single else old_logp[idx], advantages[idx], mask[idx],
                              ref_logp=None if ref_logp is None else ref_logp[idx], beta=cfg.beta,
                              eps_low=cfg.eps_low, eps_high=cfg.eps_high, max_tokens=cfg.max_new_tokens)
                with record_function("grpo.backward"):
                    (out.loss * share).backward()
                parts = [float(out.loss.detach()) * share, float(out.kl.detach()) * token_share,
                         float(out.clip_fraction.detach()) * token_share]
            with record_function("grpo.optimizer"):
                sync_gradients(model, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
                optimizer.step()
            for key, value in zip(("loss", "kl", "clip_fraction", "grad_norm"),
                                  sum_floats(parts, world) + [float(grad_norm)]):
                stats[key] += value
            n_updates += 1
    result = {k: v / max(1, n_updates) for k, v in stats.items()}
    flops = 0.0
    if completions:
        fwd = train_flops_per_token(model.config, max(len(p) for p in prompts) + width, with_mtp=False) / 3
        forwards = (0 if single else 1) + (1 if ref_logp is not None else 0)  # old log-probs, reference
        flops = fwd * (3 * tokens + forwards * fed_tokens(prompts, width))
    all_entropy, all_tokens, all_fed, all_flops = sum_floats([entropy_sum, float(mask.sum()), tokens, flops], world)
    result["entropy"] = all_entropy / max(1.0, all_tokens)
    result["_tokens"] = float(all_fed)
    return result, all_flops


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
