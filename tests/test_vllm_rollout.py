"""GRPO rollouts on vLLM, checked against a fake vllm package (vLLM needs a CUDA GPU, which these tests never have).

`FakeVLLM` stands in for the vllm module the adapter is handed: its `LLM` records the constructor's arguments,
every `generate` call (prompts and sampling params) and every weight push, and it builds a transformers model
from the config directory it is given, loads the pushed weights into it by name (strictly) and samples from
that copy. So a rollout from the fake equals one from the policy only if the right weights arrived.
"""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, tiny_hf_model

from r1lab.cli import main
from r1lab.config import ConfigError
from r1lab.engine import Completion, SamplingParams
from r1lab.model import Transformer
from r1lab.recipe import CostConfig, GRPOConfig, OptimConfig
from r1lab.sampling import grade, longest_prompt, question_text, sample, sized_engine
from r1lab.tokenizer import R1, R1_ZERO, render_prompt, template_stop_ids
from r1lab.train import rl
from r1lab.train.policy import load_policy
from r1lab.train.vllm_rollout import VLLMRollout, hf_weights, prompt_seed

POOL = [{"prompt": f"{i} + {i} = ?", "answer": str(2 * i)} for i in range(12)]


class WeightSink:
    """The worker's model as `LLM.apply_model` hands it over: `load_weights` of (name, tensor) pairs."""

    def __init__(self, hf_model):
        self.hf, self.loads = hf_model, []

    def load_weights(self, weights):
        pushed = {name: t.clone() for name, t in weights}
        self.loads.append(pushed)
        self.hf.load_state_dict(pushed, strict=True)  # every name a Hugging Face name, none missing
        return set(pushed)


class FakeVLLM:
    """`LLM` and `SamplingParams` as the vllm package spells them; `scripted[i]` (a list of (ids, reason))
    answers prompt i instead of the model."""

    def __init__(self, tf, scripted=None):
        self.llms, self.scripted = [], scripted
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs, self.calls, self.resets = kwargs, [], 0
                config = tf.AutoConfig.from_pretrained(kwargs["model"])
                self.model = WeightSink(tf.AutoModelForCausalLM.from_config(config).eval())
                fake.llms.append(self)

            def generate(self, prompts, sampling_params, use_tqdm=True):
                self.calls.append((prompts, sampling_params))
                return [fake.respond(self.model.hf, p["prompt_token_ids"], sp, i)
                        for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

            def apply_model(self, fn):
                return [fn(self.model)]

            def reset_prefix_cache(self):
                self.resets += 1

        self.LLM = LLM
        self.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)

    @torch.no_grad()
    def respond(self, hf, prompt, sp, i):
        samples = self.scripted[i] if self.scripted else [self.decode(hf, prompt, sp, j) for j in range(sp.n)]
        # vLLM's request outputs carry each sample's index; their order is not promised
        return SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=tuple(ids), finish_reason=reason)
                                        for j, (ids, reason) in reversed(list(enumerate(samples)))])

    @staticmethod
    def decode(hf, prompt, sp, j):
        """One sample as vLLM decides it: the length cap is checked before the stop ids."""
        gen, ids = torch.Generator().manual_seed(sp.seed + j), list(prompt)
        new = []
        while True:
            logits = hf(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax()) if sp.temperature == 0 else int(
                torch.multinomial(torch.softmax(logits / sp.temperature, -1), 1, generator=gen))
            ids.append(token)
            new.append(token)
            if len(new) >= sp.max_tokens:
                return new, "length"
            if token in sp.stop_token_ids:
                return new, "stop"


@pytest.fixture
def hf_dir(tf, tok, tmp_path) -> Path:
    return tiny_hf_model(tf, "qwen2", tmp_path / "hf", tok, max_len=512)


def grpo_cfg(**changes) -> GRPOConfig:
    base = dict(steps=2, prompts_per_step=3, group_size=4, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=5,
                epochs=1, minibatch_size=12, rollout_backend="vllm", reward_weights={"accuracy": 1.0, "language": 0.5},
                optim=OptimConfig(lr=0.01, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0), save_every=0)
    return GRPOConfig(**{**base, **changes})


def test_one_generate_call_carries_the_prompts_group_size_sampling_stops_and_seeds(tf, tok, hf_dir):
    policy, cfg, fake = load_policy(hf_dir, tokenizer=tok), grpo_cfg(), FakeVLLM(tf)
    longest = longest_prompt(tok, POOL, R1_ZERO)
    source = VLLMRollout.for_grpo(policy, tok, cfg, longest, fake)
    batch = rl.rollout(source, tok, POOL, cfg, 3, R1_ZERO)
    (llm,) = fake.llms
    assert {k: v for k, v in llm.kwargs.items() if k != "model"} == {
        "dtype": "float32", "seed": 5, "gpu_memory_utilization": 0.3, "max_model_len": longest + 8,
        "skip_tokenizer_init": True, "load_format": "dummy"}
    assert json.loads((Path(llm.kwargs["model"]) / "config.json").read_text())["vocab_size"] == policy.vocab_size
    (prompts, params), = llm.calls
    drawn = [g.example for g in batch.generated]
    assert prompts == [{"prompt_token_ids": render_prompt(tok, question_text(ex), R1_ZERO)} for ex in drawn]
    stops = [*template_stop_ids(tok, R1_ZERO), tok.eos_id]
    assert len(stops) == 2
    rng = random.Random(cfg.seed * 1_000_003 + 3)  # the rollout's draws: 3 examples, then the step's seed
    for _ in drawn:
        rng.randrange(len(POOL))
    step_seed = rng.randrange(2**62)
    for i, sp in enumerate(params):
        assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.stop_token_ids, sp.detokenize, sp.ignore_eos) == (
            4, 0.7, 0.9, 8, stops, False, False)
        assert sp.seed == prompt_seed(step_seed, i) and not hasattr(sp, "top_k")
    assert len({sp.seed for sp in params}) == 3
    assert [len(g.samples) for g in batch.generated] == [4, 4, 4]
    again = FakeVLLM(tf)
    repeat = rl.rollout(VLLMRollout.for_grpo(policy, tok, cfg, longest, again), tok, POOL, cfg, 3, R1_ZERO)
    assert [s.token_ids for s in repeat.samples] == [s.token_ids for s in batch.samples]


class ScriptedEngine:
    """What r1lab's `Engine.generate` returns for given token ids: prompt i's sample j at i * n + j."""

    def __init__(self, max_len, scripted):
        self.max_len, self.scripted = max_len, scripted

    def generate(self, prompts, params, first_index=0):
        return [Completion(i, j, ids, reason, []) for i in range(len(prompts))
                for j, (ids, reason) in enumerate(self.scripted[i])]


def test_vllm_outputs_become_the_records_and_rewards_of_the_engine_path(tf, tok, hf_dir):
    policy, examples, eos, limit = load_policy(hf_dir, tokenizer=tok), POOL[1:3], tok.eos_id, 24
    def answer(a):
        ids = tok.encode(f"the sum is {a}\n</think>\n<answer>{a}</answer>") + [eos]
        assert len(ids) < limit and eos not in ids[:-1]
        return ids

    right, wrong = [answer(ex["answer"]) for ex in examples], [answer(int(ex["answer"]) + 1) for ex in examples]
    cut = tok.encode("the cat sat on the mat " * 8)[:limit]
    at_the_limit = cut[:-1] + [eos]  # the stop id as the last token allowed
    assert len(cut) == limit and eos not in cut
    vllm_said = [[(right[0], "stop"), (wrong[0], "stop"), (cut, "length")],
                 [(at_the_limit, "length"), (right[1], "stop"), (wrong[1], "stop")]]
    engine_said = [[(right[0], "stop"), (wrong[0], "stop"), (cut, "length")],
                   [(at_the_limit, "stop"), (right[1], "stop"), (wrong[1], "stop")]]  # r1lab: a stop is a stop
    params = SamplingParams(max_new_tokens=limit, temperature=0.6, top_p=0.95, n=3, seed=11)
    source = VLLMRollout(policy, tok, 100, dtype="float32", seed=0, gpu_memory_utilization=0.5,
                         vllm=FakeVLLM(tf, scripted=vllm_said))
    ours, theirs = (sample(e, tok, examples, params, R1) for e in (source, ScriptedEngine(100, engine_said)))
    weights = {"accuracy": 1.0, "format": 0.5}
    for a, b in zip(ours, theirs):
        assert a.flops(policy.config) == b.flops(policy.config) > 0
        graded_a, graded_b = (grade(g.samples, weights, think_opened=True, max_new_tokens=limit) for g in (a, b))
        assert graded_a == graded_b
    rewards = [s.reward for s in grade(ours[1].samples, weights, think_opened=True)]
    assert rewards[1] > rewards[2] and ours[1].samples[0].finish_reason == "stop"  # graded, not all equal
    assert ours[0].samples[2].truncated


def test_greedy_vllm_rollouts_sample_what_the_engine_samples_from_the_policy(tf, tok, hf_dir):
    policy, fake = load_policy(hf_dir, tokenizer=tok), FakeVLLM(tf)
    longest, params = longest_prompt(tok, POOL, R1), SamplingParams(max_new_tokens=6, temperature=0.0, n=2, seed=1)
    source = VLLMRollout(policy, tok, longest + 6, dtype="float32", seed=0, gpu_memory_utilization=0.5, vllm=fake)
    engine = sized_engine(policy.eval(), tok, longest, 6, max_batch_size=8)
    ours, theirs = (sample(e, tok, POOL[:4], params, R1) for e in (source, engine))
    def records(groups):
        return [[(s.token_ids, s.finish_reason, s.text) for s in g.samples] for g in groups]

    assert records(ours) == records(theirs)
    assert fake.llms[0].model.loads and len({tuple(s.token_ids) for g in ours for s in g.samples}) > 1


def test_weights_are_pushed_by_name_after_an_optimizer_step_and_only_then(tf, tok, hf_dir):
    policy, fake, cfg = load_policy(hf_dir, tokenizer=tok), FakeVLLM(tf), grpo_cfg()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.01)
    source = rl.rollout_engine(policy, tok, cfg, longest_prompt(tok, POOL, R1), optimizer, fake)
    params = SamplingParams(max_new_tokens=4, n=2, seed=0)
    assert not fake.llms  # built on first use
    sample(source, tok, POOL[:2], params, R1)
    sample(source, tok, POOL[:2], params, R1)
    (llm,) = fake.llms
    first = llm.model.loads[0]
    assert len(llm.model.loads) == 1 and llm.resets == 1  # the second rollout found the weights unchanged
    expected = dict(policy.hf_model.named_parameters())
    assert set(first) == set(expected) and all(not k.startswith("hf_model.") for k in first)
    policy.train()
    loss = policy(torch.tensor([render_prompt(tok, "1 + 1 = ?", R1)])).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    sample(source, tok, POOL[:2], params, R1)
    assert len(llm.model.loads) == 2 and llm.resets == 2
    second = llm.model.loads[1]
    for name, param in policy.hf_model.named_parameters():
        assert torch.equal(second[name], param.detach()) and not second[name].requires_grad
    assert all(not torch.equal(first[n], second[n]) for n in first)  # every parameter moved, every one was sent
    assert [name for name, _ in hf_weights(policy)] == list(expected)


def test_two_grpo_steps_run_on_the_vllm_backend_and_sample_the_updated_policy(tf, tok, hf_dir, tmp_path):
    def run(steps, name):
        torch.manual_seed(0)
        policy, fake = load_policy(hf_dir, tokenizer=tok), FakeVLLM(tf)
        result = rl.train_grpo(policy, tok, POOL, grpo_cfg(steps=steps), tmp_path / name, R1, CostConfig(), 1e10,
                               quiet=True, vllm=fake)
        return policy, fake, result

    policy, fake, result = run(2, "two")
    (llm,) = fake.llms
    assert len(llm.calls) == 2 and len(llm.model.loads) == 2  # the start, then after step 1's update
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and result.flops > 0
    start = {k: v for k, v in tf.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict().items()}
    assert all(torch.equal(llm.model.loads[0][k], start[k]) for k in start)
    after_one, _, _ = run(1, "one")  # the same seed for one step: what the second rollout must have sampled from
    for name, param in after_one.hf_model.named_parameters():
        torch.testing.assert_close(llm.model.loads[1][name], param.detach(), rtol=0, atol=0)
    assert any(not torch.equal(llm.model.loads[1][n], p) for n, p in policy.hf_model.named_parameters())
    assert (tmp_path / "two" / "checkpoint" / "config.json").is_file()  # saved in the policy's own format


def test_an_r1lab_transformer_policy_is_refused_in_one_line(tok):
    with pytest.raises(ConfigError, match="r1lab export"):
        VLLMRollout(Transformer(tiny_config()), tok, 64, dtype="float32", seed=0, gpu_memory_utilization=0.5,
                    vllm=SimpleNamespace())


def write_recipe(tmp_path: Path, hf_dir: Path, device: str) -> Path:
    rl_file = tmp_path / "rl.jsonl"
    rl_file.write_text("".join(json.dumps(ex) + "\n" for ex in POOL))
    recipe = tmp_path / "vllm.toml"
    recipe.write_text(f'device = "{device}"\n[data]\ntemplate = "r1"\nrl_files = ["{rl_file}"]\n'
                      f'[grpo]\nrollout_backend = "vllm"\ninit_from = "{hf_dir}"\nmax_new_tokens = 8\n'
                      f'[cost]\npeak_gflops = 10.0\n')
    return recipe


@pytest.mark.parametrize("device, says", [("cuda", "pip install 'r1lab[scale]'"), ("cpu", "device is 'cpu'"),
                                          ("cuda:1", "CUDA_VISIBLE_DEVICES")])
def test_vllm_without_the_package_or_a_gpu_is_one_line_and_exit_2(tok, hf_dir, tmp_path, capsys, device, says):
    try:
        import vllm  # noqa: F401
        if device == "cuda":
            pytest.skip("vllm is installed here")
    except ImportError:
        pass
    run = tmp_path / "run"
    assert main(["grpo", "--recipe", str(write_recipe(tmp_path, hf_dir, device)), "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "rollout_backend" in err
    assert not (run / "rl").exists()


def test_dry_run_lists_a_missing_vllm_and_refuses_a_cpu_device(tok, hf_dir, tmp_path, capsys):
    recipe, run = write_recipe(tmp_path, hf_dir, "cuda"), str(tmp_path / "run")
    assert main(["grpo", "--recipe", str(recipe), "--run", run, "--dry-run"]) == 0
    out = capsys.readouterr().out
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert "missing: grpo.rollout_backend = \"vllm\" needs the vllm package" in out
    assert main(["grpo", "--recipe", str(recipe), "--run", run, "--dry-run", "--device=cpu"]) == 2
    assert "device is 'cpu'" in capsys.readouterr().err


def test_an_unknown_rollout_backend_is_one_line_and_exit_2(tok, hf_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path, hf_dir, "cpu")
    assert main(["grpo", "--recipe", str(recipe), "--run", str(tmp_path / "run"), "--grpo.rollout_backend=sglang"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "grpo.rollout_backend" in err and "'vllm'" in err
    bad = recipe.read_text().replace('rollout_backend = "vllm"', "vllm_gpu_memory_utilization = 1.5")
    recipe.write_text(bad)
    assert main(["grpo", "--recipe", str(recipe), "--run", str(tmp_path / "run")]) == 2
    assert "grpo.vllm_gpu_memory_utilization" in capsys.readouterr().err


def test_a_call_split_at_first_index_seeds_its_prompts_as_the_whole_call(tf, tok, hf_dir):
    policy, fake = load_policy(hf_dir, tokenizer=tok), FakeVLLM(tf)
    source = VLLMRollout(policy, tok, 64, dtype="float32", seed=0, gpu_memory_utilization=0.5, vllm=fake)
    prompts = [render_prompt(tok, question_text(ex), R1_ZERO) for ex in POOL[:3]]
    params = SamplingParams(max_new_tokens=4, temperature=0.7, n=2, seed=9)
    whole = source.generate(prompts, params)
    part = source.generate(prompts[1:], params, first_index=1)
    (llm,) = fake.llms
    assert [sp.seed for sp in llm.calls[1][1]] == [sp.seed for sp in llm.calls[0][1]][1:]
    assert [c.token_ids for c in part] == [c.token_ids for c in whole[2:]]
