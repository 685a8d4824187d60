"""Training a Hugging Face causal LM: the loss and FLOPs seam, `r1lab sft` / `grpo` / `eval` on tiny random
Qwen2 and Llama directories, the result saved in their own format, and resume after a kill.

Every model here is tiny and randomly initialised in the test; nothing comes from a hub.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import HF_VOCAB, tiny_hf_model

from r1lab.cli import main
from r1lab.cost import dense_shape, generate_flops_per_token, train_flops_per_token
from r1lab.recipe import load_recipe
from r1lab.train import data as data_mod
from r1lab.train.policy import HFPolicy, load_policy
from r1lab.train.stages import run_sft

KINDS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module", params=list(KINDS))
def hf_dir(request, tf, tok, tmp_path_factory) -> Path:
    return tiny_hf_model(tf, request.param, tmp_path_factory.mktemp(request.param, numbered=False) / "hf", tok, max_len=128)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def user_data(root: Path) -> tuple[Path, Path]:
    """(SFT conversations, RL questions with reference answers), as a user would write them."""
    sft = write_jsonl(root / "sft.jsonl", [
        {"messages": [{"role": "user", "content": f"{i} + {i}"},
                      {"role": "assistant", "content": f"<think> the cat sat </think> {2 * i}"}]} for i in range(8)])
    rl = write_jsonl(root / "rl.jsonl", [{"prompt": f"{i} + {i} = ?", "answer": str(2 * i)} for i in range(8)])
    return sft, rl


def write_recipe(root: Path, sft: Path, rl: Path, init_from: Path) -> Path:
    # The language reward scores the random text of an untrained model unevenly, so that the groups'
    # advantages are not all zero and two GRPO steps move the weights; accuracy grades rl.jsonl's answers.
    text = f"""
[data]
seq_len = 48
template = "r1"
sft_files = ["{sft}"]
rl_files = ["{rl}"]
[sft]
steps = 2
batch_size = 2
eval_batches = 1
save_every = 1
init_from = "{init_from}"
[sft.optim]
lr = 0.01
warmup_steps = 0
[grpo]
steps = 2
prompts_per_step = 2
group_size = 4
max_new_tokens = 12
minibatch_size = 8
epochs = 1
reward_weights = {{accuracy = 1.0, language = 0.5}}
[grpo.optim]
lr = 0.01
[cost]
peak_gflops = 10.0
"""
    path = root / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def weights(tf, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return type(model).__name__, {k: v.clone() for k, v in model.state_dict().items()}


def test_dense_shape_counts_what_the_module_holds(tf, hf_dir):
    policy = HFPolicy.from_pretrained(hf_dir)
    formula = dense_shape(json.loads((hf_dir / "config.json").read_text()))
    assert policy.config == formula
    # a hand count: q (32x32) + k, v (32x16 each) + o (32x32) + SwiGLU (3 x 32x64) per layer, and the head
    assert formula.matmul_params == 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64) + HF_VOCAB * 32
    attention = 2 * 4 * 10 * 2 * 8 * 2  # 2 x heads x keys x (score + value widths) x layers
    assert generate_flops_per_token(formula, 10) == 2 * formula.matmul_params + attention
    assert train_flops_per_token(formula, 19) == 3 * generate_flops_per_token(formula, 10)


def test_policy_loss_is_the_transformers_loss(tf, hf_dir):
    policy = HFPolicy.from_pretrained(hf_dir)
    seq = torch.randint(0, 300, (3, 12))
    mask = torch.ones(3, 11)
    mask[0, :5] = 0
    mask[2, 7:] = 0
    labels = seq.clone()
    labels[:, 1:][mask == 0] = -100  # transformers shifts labels itself
    with torch.no_grad():
        ours = policy.loss(seq[:, :-1], seq[:, 1:], mask)
        theirs = policy.hf_model(input_ids=seq, labels=labels).loss
        logits = policy(seq[:, :-1])
        cached = policy(seq[:, :-1], positions=torch.arange(11).expand(3, 11))  # the engine's masked path
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-5)
    assert float(ours.mtp_loss) == float(ours.aux_loss) == 0.0
    torch.testing.assert_close(logits, cached, rtol=1e-4, atol=1e-4)
    assert policy.update_expert_bias() == {} and not list(policy.mtp.parameters())


def test_sft_grpo_and_eval_train_a_hugging_face_model(tf, hf_dir, tmp_path, capsys):
    sft, rl = user_data(tmp_path)
    recipe, run = write_recipe(tmp_path, sft, rl, hf_dir), tmp_path / "run"
    kind, start = weights(tf, hf_dir)
    assert main(["sft", "--recipe", str(recipe), "--run", str(run)]) == 0
    tuned = run / "sft" / "checkpoint"
    assert main(["grpo", "--recipe", str(recipe), "--run", str(run), "--model", str(tuned)]) == 0
    final = run / "rl" / "checkpoint"
    assert main(["eval", "--model", str(final), "--bench", str(rl), "--k", "2", "--max-new-tokens", "8",
                 "--no-greedy", "--peak-gflops", "10", "--out", str(tmp_path / "eval")]) == 0
    assert "| items | 8 |" in capsys.readouterr().out

    sft_kind, after_sft = weights(tf, tuned)
    rl_kind, after_rl = weights(tf, final)
    assert sft_kind == rl_kind == kind == KINDS[hf_dir.parent.name]
    assert after_sft.keys() == start.keys() == after_rl.keys()
    matrices = [k for k, v in start.items() if v.dim() == 2]
    assert all(not torch.equal(after_sft[k], start[k]) for k in matrices)  # SFT trained every matrix
    assert all(not torch.equal(after_rl[k], after_sft[k]) for k in matrices)  # and so did GRPO
    for stage, path in (("sft", tuned), ("rl", final)):
        state = json.loads((path / "trainer_state.json").read_text())
        assert (state["step"], state["done"]) == (2, True)
        assert json.loads((path / "r1lab_metadata.json").read_text())["template"] == "r1"
        assert tf.AutoTokenizer.from_pretrained(path).encode("12 + 7") is not None
    grpo_rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo_rows] == [1, 2] and all(r["reward_std"] > 0 for r in grpo_rows)


def test_hf_sft_killed_and_resumed_matches_an_uninterrupted_run(tf, tok, tmp_path, monkeypatch):
    hf = tiny_hf_model(tf, "qwen2", tmp_path / "hf", tok, max_len=128)
    sft, rl = user_data(tmp_path)
    recipe = load_recipe(write_recipe(tmp_path, sft, rl, hf), ["--sft.steps=3"])
    run_sft(recipe, tmp_path / "a", 10e9, quiet=True)
    original = data_mod.ConversationSet.batch

    def killed_at_step_2(self, step, micro, batch_size):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step, micro, batch_size)

    monkeypatch.setattr(data_mod.ConversationSet, "batch", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_sft(recipe, tmp_path / "b", 10e9, quiet=True)
    assert json.loads((tmp_path / "b" / "sft" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(data_mod.ConversationSet, "batch", original)
    run_sft(recipe, tmp_path / "b", 10e9, quiet=True)
    a, b = (weights(tf, tmp_path / r / "sft" / "checkpoint")[1] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = [json.loads((tmp_path / r / "sft" / "metrics.jsonl").read_text().splitlines()[-1]) for r in "ab"]
    assert last[0]["step"] == last[1]["step"] == 3
    assert (last[0]["loss"], last[0]["heldout_loss"]) == (last[1]["loss"], last[1]["heldout_loss"])


def test_a_tokenizer_larger_than_the_embedding_grows_it(tf, tok, tmp_path):
    small = tmp_path / "hf"
    tiny_hf_model(tf, "llama", small, tok, max_len=128)
    config = json.loads((small / "config.json").read_text())
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**config, "vocab_size": 256}))
    model.save_pretrained(small)
    policy = load_policy(small, torch.device("cpu"), tok)
    assert tok.vocab_size > 256 and policy.vocab_size == tok.vocab_size
    assert policy.hf_model.get_input_embeddings().weight.shape[0] == tok.vocab_size
    assert policy.config.matmul_params == dense_shape({**config, "vocab_size": tok.vocab_size}).matmul_params


def test_resuming_with_another_model_is_refused(tf, tok, tmp_path, capsys):
    sft, rl = user_data(tmp_path)
    first = tiny_hf_model(tf, "qwen2", tmp_path / "a", tok, max_len=128)
    recipe = load_recipe(write_recipe(tmp_path, sft, rl, first), ["--sft.steps=1"])
    run_sft(recipe, tmp_path / "run", 10e9, quiet=True)
    other = tiny_hf_model(tf, "llama", tmp_path / "b", tok, max_len=128)
    code = main(["sft", "--recipe", str(tmp_path / "recipe.toml"), "--run", str(tmp_path / "run"),
                 "--model", str(other), "--sft.steps=3"])
    assert code == 2
    assert "holds a sft model with model_type qwen2 (now llama)" in capsys.readouterr().err


@pytest.mark.parametrize("command, init", [("sft", "--sft.init_from"), ("grpo", "--grpo.init_from")])
def test_a_missing_or_foreign_model_directory_is_one_line(tmp_path, capsys, command, init):
    sft, rl = user_data(tmp_path)
    recipe = write_recipe(tmp_path, sft, rl, tmp_path / "nowhere")
    assert main([command, "--recipe", str(recipe), "--run", str(tmp_path / "run"),
                 f"{init}={tmp_path / 'nowhere'}"]) == 2
    assert f"{init[2:]}: {tmp_path / 'nowhere'}: no such model directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([command, "--recipe", str(recipe), "--run", str(tmp_path / "run"), f"{init}={tmp_path / 'empty'}"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_eval_and_serve_prompt_a_trained_hf_model_with_its_template(tf, tok, tmp_path):
    from r1lab.eval import model_template
    from r1lab.serve import load_served_model

    model = tiny_hf_model(tf, "llama", tmp_path / "hf", tok)
    assert model_template(model) == "r1" and load_served_model(model).template == "r1"
    (model / "r1lab_metadata.json").write_text(json.dumps({"template": "r1-zero", "task": "arithmetic"}))
    assert model_template(model) == "r1-zero" and load_served_model(model).template == "r1-zero"


def test_grpo_with_a_kl_term_uses_a_frozen_copy_of_the_hf_model(tf, tok, tmp_path):
    from r1lab.train.stages import run_grpo

    hf = tiny_hf_model(tf, "qwen2", tmp_path / "hf", tok, max_len=128)
    sft, rl = user_data(tmp_path)
    recipe = load_recipe(write_recipe(tmp_path, sft, rl, hf), [f"--grpo.init_from={hf}", "--grpo.beta=0.1"])
    result = run_grpo(recipe, tmp_path / "run", 10e9, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0 < rows[1]["kl"]  # the policy equals its reference until the first update
    assert isinstance(result.model, HFPolicy) and result.flops > 0
