"""More than one process: the helpers of r1lab.train.distributed in one process (a world of one,
every helper the identity), then two CPU processes launched by torchrun (gloo) against one process.

Tolerance of the two-process comparisons: each rank computes the same rows as one process does, in
matmuls of half the batch, so float sums run in another order (float32: ~1e-7 relative per op); a
relative 1e-4 after 3 steps is far above that drift and far below any normalisation mistake (a
share off by the number of ranks changes the loss by 2x; a wrong DAPO token share moves it ~5%).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from r1lab.checkpoint import load_checkpoint
from r1lab.config import ConfigError
from r1lab.recipe import load_recipe
from r1lab.train.distributed import World, check_divisible, gather, join, shard, sum_floats
from r1lab.train.stages import run_grpo, run_pretrain

HERE = os.path.dirname(__file__)
TINY = ["--model.dim=64", "--model.n_layers=2", "--model.n_dense_layers=1", "--model.n_heads=2",
        "--model.inter_dim=128", "--model.moe_inter_dim=32", "--model.kv_lora_rank=32", "--model.qk_nope_head_dim=16",
        "--model.qk_rope_head_dim=8", "--model.v_head_dim=16", "--model.n_routed_experts=4",
        "--model.n_activated_experts=2", "--model.max_seq_len=192", "--model.original_seq_len=192",
        "--model.vocab_size=400", "--data.vocab_size=400", "--data.n_problems=300", "--data.difficulty=2",
        "--data.seq_len=64", "--data.task_options={ops = [\"+\"]}", "--data.template=r1", "--cost.peak_gflops=100",
        "--pretrain.steps=3", "--pretrain.batch_size=8", "--pretrain.log_every=1", "--pretrain.eval_every=0",
        "--pretrain.eval_batches=1",
        # GRPO: the language reward varies between a random model's samples, so advantages are not all zero
        "--grpo.steps=3", "--grpo.prompts_per_step=4", "--grpo.group_size=2", "--grpo.max_new_tokens=12",
        "--grpo.minibatch_size=4", "--grpo.epochs=2", "--grpo.optim.lr=1e-3", "--grpo.reward_weights={language = 1.0}"]


def test_without_torchrun_a_process_is_a_world_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    device = torch.device("cpu")
    world, same = join(device)
    assert world == World() and world.is_main and same == device
    assert shard(8, world) == range(8)
    assert sum_floats([1.5, 2.0], world) == [1.5, 2.0] and gather({"a": 1}, world) == [{"a": 1}]


def test_shards_are_contiguous_and_cover_the_batch_once():
    parts = [shard(12, World(rank, 3)) for rank in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ConfigError, match=r"grpo.prompts_per_step \(10\) must be a multiple of .* \(3\)"):
        check_divisible(10, World(0, 3), "grpo.prompts_per_step")


def test_joining_checks_the_environment_and_the_device(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="RANK='zero'"):
        join(torch.device("cpu"))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="'mps': more than one process runs on cpu"):
        join(torch.device("mps"))


def torchrun(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_ranks_sum_gradients_and_router_loads_and_take_the_single_process_grpo_steps():
    report = json.loads(torchrun(os.path.join(HERE, "distributed_worker.py")).strip().splitlines()[-1])
    assert report["world"] == 2
    sup = report["supervised"]
    assert sup["broadcast_diff"] == 0.0
    assert sup["grad_diff"] < 1e-5 * sup["grad_scale"]
    assert not sup["unsynced_ranks_agree"]  # half the loads each: the ranks' biases drift apart
    assert sup["synced_ranks_agree"] and sup["synced_bias_diff"] == 0.0
    for loss, r in report["grpo"].items():
        assert r["moved"] > 1e-3, loss  # the step did something to compare
        assert r["weight_diff"] < 1e-4 * r["moved"], (loss, r)
        assert r["loss_diff"] < 1e-4 * abs(r["loss"]) + 1e-8, (loss, r)
        for key in ("kl_diff", "clip_fraction_diff", "entropy_diff", "grad_norm_diff"):
            assert r[key] < 1e-6, (loss, key, r)


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_pretrain_and_grpo_on_two_processes_match_one_and_their_checkpoints_load_in_one(tmp_path):
    recipe = load_recipe(None, TINY)
    one, two = tmp_path / "one", tmp_path / "two"
    run_pretrain(recipe, one, quiet=True)
    two.mkdir()
    shutil.copytree(one / "tokenizer", two / "tokenizer")  # (saves rank 0 training the same BPE again)
    out = torchrun("-m", "r1lab", "--", "pretrain", "--run", str(two), *TINY)
    assert out.count("pretrained 3 steps") == 1  # rank 0 alone reports
    a, b = metrics(one / "base" / "metrics.jsonl"), metrics(two / "base" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "expert_load_max_over_mean"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), (ra["step"], key)
    assert b[-1]["heldout_loss"] == pytest.approx(a[-1]["heldout_loss"], rel=1e-4)
    (m1, _, _), (m2, _, state) = (load_checkpoint(d / "base" / "checkpoint", torch.device("cpu")) for d in (one, two))
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert list(s2) == list(s1) and state["step"] == 3  # an ordinary checkpoint: no wrapper prefixes
    for name, value in s1.items():
        torch.testing.assert_close(s2[name], value, rtol=1e-4, atol=1e-6, msg=name)
    for g1, g2 in zip(m1.moe_gates(), m2.moe_gates()):  # summed loads: the single-process biases exactly
        assert torch.equal(g1.expert_bias, g2.expert_bias)

    # GRPO from the two-process base: one process loads it as it is, and two processes match it.
    base = str(two / "base" / "checkpoint")
    run_grpo(load_recipe(None, TINY + [f"--grpo.init_from={base}"]), one, quiet=True)
    out = torchrun("-m", "r1lab", "--", "grpo", "--run", str(two), f"--grpo.init_from={base}", *TINY)
    assert out.count("GRPO 3 steps") == 1
    a, b = metrics(one / "rl" / "metrics.jsonl"), metrics(two / "rl" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert any(r["loss"] != 0.0 for r in a)  # rewards varied within groups: there was a gradient
    for ra, rb in zip(a, b):
        for key in ("reward_mean", "reward_std", "response_length_mean", "loss", "entropy", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-7), (ra["step"], key)
    (r1, _, _), (r2, _, _) = (load_checkpoint(d / "rl" / "checkpoint", torch.device("cpu")) for d in (one, two))
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r2.eval()(tokens), r1.eval()(tokens), rtol=1e-4, atol=1e-5)
