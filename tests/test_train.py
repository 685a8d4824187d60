import json
import re

import pytest
import torch
from safetensors import safe_open

from r1lab.cost import CostLedger, StageCost
from r1lab.engine import Completion
from r1lab.model import Transformer
from r1lab.recipe import OptimConfig, load_recipe
from r1lab.sampling import Sampled
from r1lab.tokenizer import R1_ZERO, Tokenizer, render_conversation
from r1lab.train import data as data_mod
from r1lab.train.common import lr_at
from r1lab.train.data import ConversationSet
from r1lab.train.rl import Rollout, _optimise, rollout
from r1lab.train.stages import rl_pool, run_grpo, run_pretrain

SMALL = ["--model.dim=64", "--model.n_layers=2", "--model.n_dense_layers=1", "--model.n_heads=2", "--model.inter_dim=128",
         "--model.moe_inter_dim=32", "--model.kv_lora_rank=32", "--model.qk_nope_head_dim=16",
         "--model.qk_rope_head_dim=8", "--model.v_head_dim=16", "--model.n_routed_experts=4",
         "--model.n_activated_experts=2", "--model.max_seq_len=192", "--model.original_seq_len=192",
         "--model.vocab_size=400", "--data.vocab_size=400", "--data.n_problems=300", "--data.difficulty=2",
         "--data.seq_len=64", "--data.task_options={ops = [\"+\"]}", "--data.slip_rate=0.3",
         "--data.slip_options={kind = \"carry\"}", "--pretrain.batch_size=4", "--pretrain.log_every=1",
         "--pretrain.eval_every=0", "--pretrain.eval_batches=1", "--cost.peak_gflops=100"]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    optim = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, optim) == pytest.approx(0.1)
    assert lr_at(9, 100, optim) == pytest.approx(1.0)
    assert lr_at(10, 100, optim) == pytest.approx(1.0)
    assert lr_at(55, 100, optim) == pytest.approx(0.55)
    assert lr_at(100, 100, optim) == pytest.approx(0.1)


def test_pretraining_killed_and_resumed_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    recipe = load_recipe(None, SMALL + ["--pretrain.steps=6", "--pretrain.save_every=3"])
    run_pretrain(recipe, tmp_path / "a", 100e9, quiet=True)
    original = data_mod.PackedStream.batch

    def killed_at_step_4(self, step, micro, batch_size):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step, micro, batch_size)

    monkeypatch.setattr(data_mod.PackedStream, "batch", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(recipe, tmp_path / "b", 100e9, quiet=True)
    monkeypatch.setattr(data_mod.PackedStream, "batch", original)
    run_pretrain(recipe, tmp_path / "b", 100e9, quiet=True)
    a, b = rows(tmp_path / "a" / "base" / "metrics.jsonl"), rows(tmp_path / "b" / "base" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[3:], b[3:]):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"])
    assert a[-1]["loss"] < a[0]["loss"]


def _compiled_pretraining_matches_eager(tmp_path, monkeypatch, backend):
    """3 compiled steps give eager's losses; the checkpoint is an ordinary one that resumes (step 4)."""
    if backend != "inductor":  # trace and run the graphs without generating code (seconds, not minutes)
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": backend}))
    eager = load_recipe(None, SMALL + ["--pretrain.steps=4"])
    run_pretrain(eager, tmp_path / "eager", 100e9, quiet=True)
    compiled = load_recipe(None, SMALL + ["--pretrain.steps=3", "--pretrain.compile=true"])
    run_pretrain(compiled, tmp_path / "compiled", 100e9, quiet=True)
    a, b = rows(tmp_path / "eager" / "base" / "metrics.jsonl"), rows(tmp_path / "compiled" / "base" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):  # float32 sums in another order: see tests/test_compile.py for the tolerance
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), key
    weights = safe_open(str(tmp_path / "compiled" / "base" / "checkpoint" / "model.safetensors"), "pt").keys()
    assert not [k for k in weights if "_orig_mod" in k]
    assert set(weights) == set(safe_open(str(tmp_path / "eager" / "base" / "checkpoint" / "model.safetensors"), "pt").keys())
    run_pretrain(load_recipe(None, SMALL + ["--pretrain.steps=4"]), tmp_path / "compiled", 100e9, quiet=True)
    b = rows(tmp_path / "compiled" / "base" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert b[3]["loss"] == pytest.approx(a[3]["loss"], rel=1e-4)


def test_traced_pretraining_matches_eager_and_its_checkpoint_resumes(tmp_path, monkeypatch):
    _compiled_pretraining_matches_eager(tmp_path, monkeypatch, "aot_eager")


@pytest.mark.slow
def test_compiled_pretraining_matches_eager_and_its_checkpoint_resumes(tmp_path, monkeypatch):
    _compiled_pretraining_matches_eager(tmp_path, monkeypatch, "inductor")


def test_grpo_killed_and_resumed_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    grpo = ["--grpo.steps=3", "--grpo.save_every=1", "--grpo.prompts_per_step=2", "--grpo.group_size=2",
            "--grpo.max_new_tokens=12", "--grpo.minibatch_size=4", "--pretrain.steps=2", "--grpo.optim.lr=1e-3"]
    recipe = load_recipe(None, SMALL + grpo)
    run_pretrain(recipe, tmp_path / "a", 100e9, quiet=True)
    (tmp_path / "b").mkdir()
    import shutil
    shutil.copytree(tmp_path / "a" / "base", tmp_path / "b" / "base")
    shutil.copytree(tmp_path / "a" / "tokenizer", tmp_path / "b" / "tokenizer")
    run_grpo(recipe, tmp_path / "a", 100e9, quiet=True)
    from r1lab.train import rl as rl_mod

    original = rl_mod.rollout
    calls = {"n": 0}

    def killed_on_third_rollout(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(rl_mod, "rollout", killed_on_third_rollout)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(recipe, tmp_path / "b", 100e9, quiet=True)
    monkeypatch.setattr(rl_mod, "rollout", original)
    run_grpo(recipe, tmp_path / "b", 100e9, quiet=True)
    a, b = rows(tmp_path / "a" / "rl" / "metrics.jsonl"), rows(tmp_path / "b" / "rl" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    keys = ("reward_mean", "response_length_mean", "loss", "entropy", "grad_norm")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


@pytest.fixture
def tokenizer():
    texts = [f"What is {a} + {b}? <think>\ncol 1\n</think>\n<answer>{a + b}</answer>" for a in range(10, 60) for b in range(3)]
    return Tokenizer.train(texts, 400)


def test_one_grpo_step_changes_every_trainable_parameter(tokenizer, make_config):
    model = Transformer(make_config(vocab_size=400, max_seq_len=128, n_mtp_modules=1))
    for p in model.mtp.parameters():
        p.requires_grad_(False)
    cfg = load_recipe(None, ["--grpo.group_size=4", "--grpo.minibatch_size=16", "--grpo.epochs=1",
                             "--grpo.optim.lr=1e-2"]).grpo
    g = torch.Generator().manual_seed(0)
    prompts = [tokenizer.encode(f"What is {i} + 1?") for i in range(16)]
    completions = [torch.randint(0, 400, (30,), generator=g).tolist() for _ in range(16)]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0] * 4)
    batch = Rollout([Sampled({}, p, c, "", "stop", float(r)) for p, c, r in zip(prompts, completions, rewards)], [], 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    from r1lab.train.grpo import grpo_loss
    _optimise(model, None, optimizer, batch, cfg, grpo_loss, True, 1e-2, tokenizer.pad_id, step=0)
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, unchanged
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("mtp.") and torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)


def test_on_policy_step_needs_one_forward_and_matches_the_two_pass_step(tokenizer, make_config, monkeypatch):
    """epochs 1, one minibatch: old log-probs are the current ones, so the loss, entropy and gradients
    equal those of the step that recomputes them in a forward of its own; that forward is skipped."""
    from r1lab.train import rl as rl_mod
    from r1lab.train.grpo import LOSSES

    real_on_policy, real_logprobs = rl_mod.on_policy, rl_mod.completion_logprobs
    base = Transformer(make_config(vocab_size=400, max_seq_len=128, n_mtp_modules=0))
    g = torch.Generator().manual_seed(1)
    prompts = [tokenizer.encode(f"What is {i} + 1?") for i in range(8)]
    completions = [torch.randint(0, 400, (int(torch.randint(5, 30, (), generator=g)),), generator=g).tolist()
                   for _ in range(8)]
    rewards = [1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25]
    batch = Rollout([Sampled({}, p, c, "", "stop", r) for p, c, r in zip(prompts, completions, rewards)], [], 0)
    for loss in ("grpo", "dr_grpo", "dapo"):
        cfg = load_recipe(None, ["--grpo.group_size=4", "--grpo.minibatch_size=8", "--grpo.epochs=1",
                                 f"--grpo.loss={loss}", "--grpo.optim.grad_clip=0"]).grpo
        results = {}
        for single in (True, False):
            model = Transformer(base.config)
            model.load_state_dict(base.state_dict())
            forwards = []
            monkeypatch.setattr(rl_mod, "completion_logprobs",
                                lambda *a, **k: forwards.append(1) or real_logprobs(*a, **k))
            monkeypatch.setattr(rl_mod, "on_policy", lambda *_, single=single: single)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights: compare gradients
            stats, flops = _optimise(model, None, optimizer, batch, cfg, *LOSSES[loss], 0.0, tokenizer.pad_id, step=0)
            results[single] = (stats, flops, len(forwards), {n: p.grad.clone() for n, p in model.named_parameters()})
        (one, one_flops, one_fwd, one_grad), (two, two_flops, two_fwd, two_grad) = results[True], results[False]
        assert (one_fwd, two_fwd) == (1, 2)
        assert one_flops == pytest.approx(two_flops * 3 / 4)
        assert one["loss"] != 0.0 and one["clip_fraction"] == two["clip_fraction"] == 0.0
        for key in ("loss", "entropy", "grad_norm"):
            assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), (loss, key)
        for name, grad in one_grad.items():
            torch.testing.assert_close(grad, two_grad[name], rtol=1e-4, atol=1e-7, msg=f"{loss}: {name}")
    from dataclasses import replace
    assert real_on_policy(cfg, 8) and not real_on_policy(cfg, 9) and not real_on_policy(replace(cfg, epochs=2), 8)


def test_a_group_shares_its_prompt_pass_and_gets_the_plain_forward_log_probs(make_config):
    """Ragged prompts, each shared by a group of ragged completions (and one prompt alone): the log-probs and
    gradients of the prompt-once forward equal those of one padded forward over every prompt + completion."""
    from r1lab.train.rl import padded_logits, completion_logprobs, fed_tokens

    torch.manual_seed(0)
    model = Transformer(make_config(n_mtp_modules=0, init_std=0.1))
    g = torch.Generator().manual_seed(3)
    groups = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26], [30, 31, 32]]
    prompts = [p for p, n in zip(groups, (3, 3, 1, 4)) for _ in range(n)]
    completions = [torch.randint(1, 97, (int(torch.randint(1, 9, (), generator=g)),), generator=g).tolist()
                   for _ in prompts]
    width = max(map(len, completions))
    mask = torch.zeros(len(prompts), width)
    for i, c in enumerate(completions):
        mask[i, :len(c)] = 1.0
    weights = torch.randn(len(prompts), width, generator=g)

    def grads(logp):
        model.zero_grad()
        (logp * mask * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, _ = completion_logprobs(model, prompts, completions, 0, width, torch.device("cpu"))
    shared_grads = grads(shared)
    comp = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c)
    plain = padded_logits(model, prompts, comp, 0, mask.bool()).float().log_softmax(-1).gather(-1, comp[..., None])[..., 0]
    plain_grads = grads(plain)
    torch.testing.assert_close(shared * mask, plain * mask, rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == plain_grads.keys() and len(shared_grads) > 10
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)
    assert fed_tokens(prompts, width) == 4 * 7 + len(prompts) * (width - 1)  # each prompt once, not per row


def test_grpo_log_probs_count_the_expert_loads_of_the_unpadded_rows(make_config):
    """Ragged prompts and completions, padded into one update batch: the experts' loads are those of each
    row's own unpadded forward (prompt + completion less its last token), on both log-prob paths."""
    from r1lab.train.rl import completion_logprobs, completion_mask, padded_logits

    model = Transformer(make_config(n_mtp_modules=0, init_std=0.2)).train()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 2, 7, 3)]
    completions = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (6, 1, 3, 8)]
    width = max(map(len, completions))

    def loads(run) -> list[torch.Tensor]:
        for gate in model.moe_gates():
            gate.expert_load.zero_()
        run()
        return [gate.expert_load.clone() for gate in model.moe_gates()]

    alone = [loads(lambda: model(torch.tensor([p + c[:-1]]))) for p, c in zip(prompts, completions)]
    unpadded = [sum(per_row) for per_row in zip(*alone)]
    shared = loads(lambda: completion_logprobs(model, prompts, completions, 0, width, torch.device("cpu")))
    comp = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, :len(c)] = torch.tensor(c)
    padded = loads(lambda: padded_logits(model, prompts, comp, 0, completion_mask(completions, width).bool()))
    assert float(unpadded[0].sum()) == (17 + 18 - 4) * model.config.n_activated_experts
    for a, b, c in zip(unpadded, shared, padded):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.slow
def test_compiled_rollouts_give_the_eager_tokens_and_losses(tokenizer, make_config, tmp_path, monkeypatch):
    """Two GRPO steps with grpo.compile_rollouts on and off from the same weights: the same completions and
    the same losses, the second step sampling from weights the first updated in place (a few compiles)."""
    from dataclasses import replace

    from r1lab.backends import cpu
    from r1lab.recipe import CostConfig
    from r1lab.train import rl as rl_mod

    if cpu.unsupported(Transformer(make_config(n_mtp_modules=0))) is not None:
        pytest.skip("the CPU backend's kernels need an AVX2 CPU and a C++ compiler")
    recipe = load_recipe(None, SMALL + ["--grpo.prompts_per_step=3", "--grpo.group_size=4", "--grpo.epochs=1",
                                        "--grpo.minibatch_size=12", "--grpo.max_new_tokens=10", "--grpo.steps=2",
                                        "--grpo.optim.lr=3e-2", "--grpo.save_every=0", "--data.template=r1"])
    pool = rl_pool(recipe, 50)
    base = Transformer(make_config(vocab_size=400, max_seq_len=192, n_layers=1, n_dense_layers=0, n_mtp_modules=0,
                                   init_std=0.1))
    original = rl_mod.rollout
    runs = {}
    for compiled in (False, True):
        model = Transformer(base.config)
        model.load_state_dict(base.state_dict())
        seen, engines = [], []
        monkeypatch.setattr(rl_mod, "rollout", lambda engine, *a, **k: _record(original, seen, engines, engine, *a, **k))
        cfg = replace(recipe.grpo, compile_rollouts=compiled)
        torch.manual_seed(0)
        result = rl_mod.train_grpo(model, tokenizer, pool, cfg, tmp_path / str(compiled), recipe.data.template,
                                   CostConfig(), 100e9, quiet=True)
        assert isinstance(engines[0].steps, cpu.CpuBackend) == compiled
        runs[compiled] = (seen, rows(tmp_path / str(compiled) / "metrics.jsonl"), result.model)
    (eager_seen, eager_rows, eager_model), (comp_seen, comp_rows, comp_model) = runs[False], runs[True]
    assert eager_seen == comp_seen and eager_seen[0] != eager_seen[1]
    for key in ("loss", "reward_mean", "grad_norm", "entropy"):
        assert [r[key] for r in comp_rows] == pytest.approx([r[key] for r in eager_rows], rel=1e-4, abs=1e-6), key
    for (name, a), b in zip(eager_model.named_parameters(), comp_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _record(original, seen, engines, engine, *args, **kwargs):
    engines.append(engine)
    batch = original(engine, *args, **kwargs)
    seen.append([s.token_ids for s in batch.samples])
    return batch


class ScriptedEngine:
    """Answers prompt p of each call: even p -> G identical right answers (no signal), odd p -> mixed."""

    max_len = 1 << 20  # any prompt fits

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def generate(self, prompts, params, first_index=0):
        self.calls += 1
        out = []
        for p, ids in enumerate(prompts):
            a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", self.tokenizer.decode(ids)).groups())
            for j in range(params.n):
                answer = a + b if (p % 2 == 0 or j == 0) else a + b + 1
                text = f"<think>\nadd\n</think>\n<answer>{answer}</answer>"
                out.append(Completion(p, j, self.tokenizer.encode(text), "stop", []))
        return out


def test_dynamic_sampling_drops_all_equal_groups_and_refills(tokenizer):
    recipe = load_recipe(None, SMALL + ["--grpo.prompts_per_step=4", "--grpo.group_size=3", "--grpo.dynamic_sampling=true",
                                        "--grpo.loss=dapo"])
    pool = rl_pool(recipe, 50)
    engine = ScriptedEngine(tokenizer)
    batch = rollout(engine, tokenizer, pool, recipe.grpo, step=0, template=R1_ZERO)
    assert engine.calls == 2  # 2 informative groups per call: one refill round fills the batch
    assert len(batch.samples) == 4 * 3
    assert len(batch.generated) == 8 and batch.n_all_equal == 4
    assert bool(torch.all(torch.tensor([len(set(batch.rewards[i:i + 3].tolist())) > 1 for i in range(0, 12, 3)])))
    no_refill = load_recipe(None, SMALL + ["--grpo.prompts_per_step=4", "--grpo.group_size=3"]).grpo
    plain = rollout(ScriptedEngine(tokenizer), tokenizer, pool, no_refill, step=0, template=R1_ZERO)
    assert len(plain.generated) == 4 and plain.n_all_equal == 2 and len(plain.samples) == 12


def test_sft_masks_everything_but_the_assistant_turn(tokenizer):
    conversations = [[{"role": "user", "content": f"What is {i} + 2?"},
                      {"role": "assistant", "content": f"<think>\nadd\n</think>\n<answer>{i + 2}</answer>"}] for i in range(5)]
    data = ConversationSet(tokenizer, conversations, R1_ZERO, seq_len=512, seed=0)
    assert data.too_long == 0
    with pytest.raises(ValueError, match="no conversation fits"):
        ConversationSet(tokenizer, conversations, R1_ZERO, seq_len=64, seed=0)
    inputs, targets, mask = data.batch(0, 0, 3)
    for b in range(3):
        kept = targets[b][mask[b] > 0].tolist()
        text = tokenizer.decode(kept)
        assert text.startswith("<think>") and text.endswith("</answer>" + tokenizer.decode([tokenizer.eos_id]))
        ids, m = render_conversation(tokenizer, conversations[0], R1_ZERO)
        assert int(mask[b].sum()) == sum(m)  # every conversation has the same shape here
        assert "What is" not in text


def test_cost_ledger_totals_and_table():
    ledger = CostLedger.empty()
    ledger.add(StageCost("pretrain", 6e12, 3600, 2, "cpu-core", 100e9, 0.05))
    ledger.add(StageCost("rl", 1e12, 1800, 2, "cpu-core", 100e9, 0.05))
    totals = ledger.totals()
    assert totals["device_hours"] == pytest.approx(3.0)
    assert totals["dollars"] == pytest.approx(0.15)
    assert totals["mfu"] == pytest.approx(7e12 / (5400 * 100e9))
    assert ledger.stages[0].mfu == pytest.approx(6e12 / (3600 * 100e9))
    assert "| **total** |" in ledger.table() and "CPU core-hours" in ledger.table()
    assert CostLedger.from_dict(ledger.as_dict()).totals() == totals


# ------------------------------------------------------------------ data.rl_files: the user's GRPO prompts
def _benchmark_lines(name: str, n: int) -> list[str]:
    from r1lab.tasks.benchmarks import BenchmarkNotFoundError, find_benchmark_file

    try:
        return find_benchmark_file(name).read_text(encoding="utf-8").splitlines()[:n]
    except BenchmarkNotFoundError:
        pytest.skip(f"{name} benchmark file not present")


def test_rl_files_read_gsm8k_and_math_lines_graded_by_the_accuracy_reward(tmp_path):
    from r1lab.rewards import accuracy_reward

    gsm8k, math500 = tmp_path / "gsm8k.jsonl", tmp_path / "math.jsonl"
    gsm8k.write_text("\n".join(_benchmark_lines("gsm8k", 3)) + "\n")
    math500.write_text("\n".join(_benchmark_lines("math500", 3)) + "\n")
    examples = data_mod.rl_examples([str(gsm8k), str(math500)])
    assert len(examples) == 6
    first_gsm8k, first_math = json.loads(gsm8k.read_text().splitlines()[0]), json.loads(math500.read_text().splitlines()[0])
    assert examples[0]["prompt"] == first_gsm8k["question"].strip() and examples[3]["prompt"] == first_math["problem"].strip()
    assert examples[0]["answer"] == first_gsm8k["answer"].rsplit("####", 1)[1].strip()
    assert examples[0]["id"] == "gsm8k.jsonl:1"
    for ex in examples:  # graded by math-verify against the reference, not by a task family
        assert accuracy_reward(f"<think>ok</think>\n<answer>\\boxed{{{ex['answer']}}}</answer>", ex) == 1.0
        assert accuracy_reward("<think>ok</think>\n<answer>\\boxed{-987654}</answer>", ex) == 0.0
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"q": "What is 6 * 7?", "a": 42, "prompt": "ignored"}) + "\n")
    (ex,) = data_mod.rl_examples([str(custom)], {"prompt": "q", "answer": "a"})
    assert (ex["prompt"], ex["answer"]) == ("What is 6 * 7?", "42")


@pytest.fixture
def grpo_base(tmp_path, tokenizer, make_config):
    from r1lab.checkpoint import save_checkpoint

    model = Transformer(make_config(vocab_size=400, max_seq_len=128))
    return save_checkpoint(tmp_path / "base", model, tokenizer)


GRPO_FAST = ["--data.template=r1", "--grpo.steps=2", "--grpo.prompts_per_step=2", "--grpo.group_size=2",
             "--grpo.max_new_tokens=8", "--grpo.minibatch_size=4", "--grpo.epochs=1", "--cost.peak_gflops=100"]


def test_grpo_command_trains_on_prompts_from_a_user_jsonl(tmp_path, grpo_base, monkeypatch, capsys):
    from r1lab.checkpoint import read_metadata, read_trainer_summary
    from r1lab.cli import main
    from r1lab.train import rl as rl_mod

    user = tmp_path / "mine.jsonl"
    user.write_text("".join(json.dumps({"question": f"What is {a} + {a}?", "solution": str(2 * a)}) + "\n"
                            for a in range(10, 20)))
    seen = []
    original = rl_mod.rollout

    def spy(engine, tokenizer, pool, cfg, step, template, **kwargs):
        batch = original(engine, tokenizer, pool, cfg, step, template, **kwargs)
        seen.extend(s.example for s in batch.samples)
        return batch

    monkeypatch.setattr(rl_mod, "rollout", spy)
    run = tmp_path / "run"
    code = main(["grpo", "--run", str(run), f"--grpo.init_from={grpo_base}", f"--data.rl_files=[\"{user}\"]",
                 "--data.rl_fields={answer = \"solution\"}", *GRPO_FAST])
    assert code == 0, capsys.readouterr().err
    assert len(seen) == 2 * 2 * 2  # steps x prompts x group
    assert all(ex["id"].startswith("mine.jsonl:") and ex["answer"] == str(2 * int(ex["prompt"].split()[2]))
               for ex in seen)
    assert "family" not in seen[0]  # graded by the accuracy reward's math check, not a task family
    assert read_trainer_summary(run / "rl" / "checkpoint")["step"] == 2
    assert read_metadata(run / "rl" / "checkpoint")["rl_files"] == [str(user)]


@pytest.mark.parametrize("line, field", [
    ('{"question": "What is 1 + 1?"}', "answer"),
    ('{"answer": "2"}', "prompt"),
    ('{"question": "", "answer": "2"}', "prompt"),
    ('[1, 2]', "JSON object"),
    ('{"question": "What is 1 + 1?", "answer": 2', "not valid JSON"),
])
def test_a_bad_rl_files_line_is_one_line_naming_file_and_line(tmp_path, grpo_base, capsys, line, field):
    from r1lab.cli import main

    user = tmp_path / "bad.jsonl"
    user.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n\n' + line + "\n")
    code = main(["grpo", "--run", str(tmp_path / "run"), f"--grpo.init_from={grpo_base}",
                 f"--data.rl_files=[\"{user}\"]", *GRPO_FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"r1lab: error: {user}:3:") and field in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "rl").exists()


def test_grpo_eval_every_logs_held_out_greedy_accuracy(tmp_path, grpo_base, capsys, monkeypatch):
    from r1lab.cli import main
    from r1lab.train import stages as stages_mod

    graded = []
    original = stages_mod.grade

    def spy(samples, weights, **kwargs):
        out = original(samples, weights, **kwargs)
        graded.append([s.rewards["accuracy"] for s in out])
        return out

    monkeypatch.setattr(stages_mod, "grade", spy)
    run = tmp_path / "run"
    code = main(["grpo", "--run", str(run), f"--grpo.init_from={grpo_base}", "--data.task=arithmetic",
                 "--data.difficulty=2", "--grpo.eval_every=1", "--eval.problems=6", *GRPO_FAST])
    assert code == 0, capsys.readouterr().err
    logged = rows(run / "rl" / "metrics.jsonl")
    assert len(graded) == 1 and len(graded[0]) == 6  # after step 1 of 2 (the last step is the final eval's)
    assert logged[0]["heldout_greedy_pass@1"] == sum(graded[0]) / 6
    assert 0.0 <= logged[0]["heldout_format_rate"] <= 1.0
    assert "heldout_greedy_pass@1" not in logged[1]


def test_grpo_eval_every_with_user_prompts_is_one_line(tmp_path, grpo_base, capsys):
    from r1lab.cli import main

    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    code = main(["grpo", "--run", str(tmp_path / "run"), f"--grpo.init_from={grpo_base}",
                 f"--data.rl_files=[\"{user}\"]", "--grpo.eval_every=1", *GRPO_FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "grpo.eval_every" in err
    assert not (tmp_path / "run" / "rl").exists()
