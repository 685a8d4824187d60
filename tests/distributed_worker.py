"""Run under torchrun by tests/test_distributed.py (2 CPU processes, gloo): each rank takes its part
of a batch through r1lab.train.distributed, and also computes what one process would have done with
the whole batch on a copy of the model; rank 0 prints one JSON line of the differences it found.

Checks: `broadcast_model` makes every rank start from rank 0's weights; `sync_gradients` turns
half-batch gradients (losses scaled by 1/2) into the whole batch's; summed router loads move the
expert biases exactly as one process does, and unsummed ones let ranks drift apart; GRPO's
`_optimise` on each rank's whole groups (completions of unequal lengths, several minibatches,
two epochs) takes the single-process steps for every loss (grpo, dr_grpo, dapo). Those steps use
SGD: AdamW would hide a gradient off by a constant factor.
"""

import copy
import json

import torch

from r1lab.config import ModelConfig
from r1lab.model import Transformer
from r1lab.recipe import load_recipe
from r1lab.sampling import Sampled
from r1lab.train.distributed import World, broadcast_model, gather, join, leave, shard, sync_expert_load, sync_gradients
from r1lab.train.grpo import LOSSES
from r1lab.train.rl import Rollout, _optimise

CONFIG = ModelConfig(vocab_size=97, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
                     n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, kv_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64, original_seq_len=64,
                     n_mtp_modules=1, init_std=0.02, bias_update_speed=0.01)


def max_diff(a: Transformer, b: Transformer) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def biases(model: Transformer) -> list[list[float]]:
    return [g.expert_bias.tolist() for g in model.moe_gates()]


def supervised_checks(world: World) -> dict:
    torch.manual_seed(world.rank)  # different inits on purpose: broadcast_model must fix them
    model = Transformer(CONFIG)
    broadcast_model(model, world)
    torch.manual_seed(0)
    reference = Transformer(CONFIG)  # rank 0's init, rebuilt from its seed
    out = {"broadcast_diff": max_diff(model, reference)}
    tokens = torch.randint(0, CONFIG.vocab_size, (8, 17), generator=torch.Generator().manual_seed(5))
    rows = shard(8, world)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    (reference.loss(inputs, targets).loss).backward()
    (model.loss(inputs[rows.start:rows.stop], targets[rows.start:rows.stop]).loss / world.size).backward()
    sync_gradients(model, world)
    out["grad_diff"] = max(float((p.grad - q.grad).abs().max())
                           for p, q in zip(model.parameters(), reference.parameters()) if q.grad is not None)
    out["grad_scale"] = max(float(q.grad.abs().max()) for q in reference.parameters() if q.grad is not None)
    unsynced = copy.deepcopy(model)
    unsynced.update_expert_bias()  # this rank's half of the loads only
    sync_expert_load(model, world)
    model.update_expert_bias()
    reference.update_expert_bias()
    out["unsynced_ranks_agree"] = len({json.dumps(b) for b in gather(biases(unsynced), world)}) == 1
    out["synced_ranks_agree"] = len({json.dumps(b) for b in gather(biases(model), world)}) == 1
    out["synced_bias_diff"] = max(abs(x - y) for a, b in zip(biases(model), biases(reference)) for x, y in zip(a, b))
    return out


def grpo_checks(world: World) -> dict:
    out = {}
    g = torch.Generator().manual_seed(3)
    P, G = 4, 3
    prompts = [torch.randint(0, CONFIG.vocab_size, (int(torch.randint(4, 9, (), generator=g)),), generator=g).tolist()
               for _ in range(P)]
    samples = [Sampled({}, prompts[i // G], torch.randint(1, CONFIG.vocab_size, (int(torch.randint(2, 14, (), generator=g)),),
                                                          generator=g).tolist(), "", "stop", float(torch.rand((), generator=g)))
               for i in range(P * G)]
    mine = shard(P, world)
    rows = range(mine.start * G, mine.stop * G)
    for loss in LOSSES:
        cfg = load_recipe(None, [f"--grpo.loss={loss}", f"--grpo.group_size={G}", "--grpo.minibatch_size=5",
                                 "--grpo.epochs=2"]).grpo
        torch.manual_seed(0)
        one = Transformer(CONFIG)
        split, init = copy.deepcopy(one), copy.deepcopy(one)
        results = []
        for model, batch, w in ((one, Rollout(samples, [], 0), World()),
                                (split, Rollout([samples[i] for i in rows], [], 0, list(rows), len(samples)), world)):
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
            stats, _ = _optimise(model, None, optimizer, batch, cfg, *LOSSES[loss], 1.0, 0, step=0, world=w)
            results.append(stats)
        out[loss] = {"weight_diff": max_diff(one, split),
                     "moved": max(float((p - q).detach().abs().max()) for p, q in
                                  zip(one.parameters(), init.parameters())),
                     **{f"{k}_diff": abs(results[0][k] - results[1][k]) for k in ("loss", "kl", "clip_fraction",
                                                                                    "entropy", "grad_norm")},
                     "loss": results[0]["loss"]}
    return out


def main() -> None:
    world, _ = join(torch.device("cpu"))
    report = {"world": world.size, "supervised": supervised_checks(world), "grpo": grpo_checks(world)}
    if world.is_main:
        print(json.dumps(report))
    leave()


if __name__ == "__main__":
    main()
