"""The GRPO family's loss math, pure functions over tensors.

Shapes: N sequences (P prompts x G samples, grouped consecutively), T completion tokens.
  logp, old_logp, ref_logp   (N, T) log-probabilities of the sampled tokens
  mask                       (N, T) 1 on completion tokens, 0 on padding
  advantages                 (N,)   one per sequence, broadcast over its tokens

Variants are separate functions over shared helpers (no string switch inside a loss):
  grpo_loss     R1's GRPO: std-normalised group advantages, mean over each sequence's tokens,
                then over sequences; clip [1-eps, 1+eps]; optional k3 KL to a reference.
  dr_grpo_loss  Dr. GRPO: advantages without the std; token sums divided by a constant (the
                generation budget) instead of each sequence's length.
  dapo_loss     DAPO: token mean over the whole batch; clip-higher (eps_low < eps_high).
All return a `PolicyLoss` whose `loss` is minimised (the negated objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i - mean(group) (divided by the group's std when `scale`); zero for all-equal groups."""
    grouped = rewards.float().view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased KL estimator pi_ref/pi - log(pi_ref/pi) - 1 (>= 0, 0 when equal)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor           # scalar to minimise
    kl: torch.Tensor             # mean per-token k3 KL (0 without a reference)
    clip_fraction: torch.Tensor  # share of tokens where the clipped branch was taken


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and where clipping bound it."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return torch.minimum(unclipped, clipped), (clipped < unclipped)


def _per_token(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high):
    objective, was_clipped = clipped_objective(logp, old_logp, advantages, eps_low, eps_high)
    kl = k3_kl(logp, ref_logp) if (ref_logp is not None and beta > 0) else torch.zeros_like(logp)
    return objective - beta * kl, kl, was_clipped


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, **_) -> PolicyLoss:
    per_token, kl, clipped = _per_token(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high)
    per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return PolicyLoss(-per_sequence.mean(), _token_mean(kl, mask), _token_mean(clipped.float(), mask))


def dr_grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, beta: float = 0.0, eps_low: float = 0.2,
                 eps_high: float = 0.2, max_tokens: int = 1, **_) -> PolicyLoss:
    per_token, kl, clipped = _per_token(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high)
    loss = -(per_token * mask).sum() / (mask.shape[0] * max_tokens)
    return PolicyLoss(loss, _token_mean(kl, mask), _token_mean(clipped.float(), mask))


def dapo_loss(logp, old_logp, advantages, mask, ref_logp=None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.28, **_) -> PolicyLoss:
    per_token, kl, clipped = _per_token(logp, old_logp, advantages, ref_logp, beta, eps_low, eps_high)
    return PolicyLoss(-_token_mean(per_token, mask), _token_mean(kl, mask), _token_mean(clipped.float(), mask))


# name -> (loss function, whether advantages are divided by the group std)
LOSSES = {"grpo": (grpo_loss, True), "dr_grpo": (dr_grpo_loss, False), "dapo": (dapo_loss, True)}


def keep_informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose rewards are not all equal (they carry a learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 1e-6


# name -> what the loss averages over: a minibatch split over processes weighs each part by its share of it
AVERAGED_OVER = {"grpo": "sequences", "dr_grpo": "sequences", "dapo": "tokens"}
