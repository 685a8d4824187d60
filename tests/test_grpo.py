import pytest
import torch

from r1lab.train.grpo import (LOSSES, dapo_loss, dr_grpo_loss, group_advantages, grpo_loss, k3_kl,
                              keep_informative_groups)


def test_advantages_are_zero_mean_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])
    for scale in (True, False):
        adv = group_advantages(rewards, 4, scale).view(3, 4)
        torch.testing.assert_close(adv.mean(dim=1), torch.zeros(3))
    adv = group_advantages(rewards, 4, scale=True).view(3, 4)
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no signal
    assert adv[0].std().item() == pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False).view(3, 4)[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    logp = torch.log(torch.rand(50, 7).clamp(min=1e-3))
    ref = torch.log(torch.rand(50, 7).clamp(min=1e-3))
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))


def toy_batch():
    # Two sequences of lengths 2 and 3 (padded to 3).
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.9], [0.2, 0.3, 0.6]]))
    old = torch.log(torch.tensor([[0.25, 0.4, 0.9], [0.4, 0.3, 0.5]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    return logp, old, mask, adv


def hand_terms(eps_low, eps_high):
    # ratios: seq 0: 2.0, 1.0, (pad); seq 1: 0.5, 1.0, 1.2
    # seq 0, A=+1: min(r*A, clip(r)*A) -> 2.0 clipped to 1+eps_high; 1.0 -> 1.0
    # seq 1, A=-2: min(-2r, -2 clip(r)): r=0.5 -> clip 1-eps_low -> min(-1.0, -2(1-eps_low)) = -2(1-eps_low) when eps_low < 0.5
    #              r=1.0 -> -2.0 ; r=1.2 -> min(-2.4, -2*min(1.2, 1+eps_high)) = -2.4
    s0 = [1 + eps_high, 1.0]
    s1 = [-2 * (1 - eps_low), -2.0, -2.4]
    return s0, s1


def test_grpo_loss_hand_value():
    logp, old, mask, adv = toy_batch()
    s0, s1 = hand_terms(0.2, 0.2)
    expected = -((sum(s0) / 2 + sum(s1) / 3) / 2)
    out = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(2 / 5)  # r=2.0 (A>0) and r=0.5 (A<0) were clipped
    assert out.kl.item() == 0.0


def test_dr_grpo_loss_hand_value():
    logp, old, mask, adv = toy_batch()
    s0, s1 = hand_terms(0.2, 0.2)
    expected = -(sum(s0) + sum(s1)) / (2 * 10)
    assert dr_grpo_loss(logp, old, adv, mask, max_tokens=10).loss.item() == pytest.approx(expected, abs=1e-6)


def test_dapo_loss_hand_value_with_clip_higher():
    logp, old, mask, adv = toy_batch()
    s0, s1 = hand_terms(0.2, 0.28)
    expected = -(sum(s0) + sum(s1)) / 5
    assert dapo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28).loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_term_enters_with_beta():
    logp, old, mask, adv = toy_batch()
    ref = old + 0.1
    plain = grpo_loss(logp, old, adv, mask)
    with_kl = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.5)
    kl = k3_kl(logp, ref)
    per_seq = torch.stack([(kl[0] * mask[0]).sum() / 2, (kl[1] * mask[1]).sum() / 3])
    assert with_kl.loss.item() == pytest.approx(plain.loss.item() + 0.5 * per_seq.mean().item(), abs=1e-6)
    assert with_kl.kl.item() > 0


def test_gradient_flows_only_through_the_policy():
    logp, old, mask, adv = toy_batch()
    logp = logp.clone().requires_grad_(True)
    grpo_loss(logp, old, adv, mask).loss.backward()
    assert logp.grad[0, 2] == 0  # padding
    assert logp.grad[0, 0] == 0  # clipped above with a positive advantage: no gradient
    assert logp.grad[0, 1] != 0


def test_informative_groups_and_registry():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert keep_informative_groups(rewards, 2).tolist() == [False, True, False]
    assert set(LOSSES) == {"grpo", "dr_grpo", "dapo"}
    assert LOSSES["dr_grpo"][1] is False and LOSSES["grpo"][1] is True
