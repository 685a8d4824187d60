"""Every user error of a training or evaluation command is one line naming the problem and exit 2,
found before the matmul peak is measured, a tokenizer trained or a model built."""

import json
import shutil

import pytest

from r1lab.checkpoint import save_checkpoint
from r1lab.cli import main
from r1lab.config import ConfigError
from r1lab.model import Transformer
from r1lab.recipe import load_recipe
from r1lab.train import stages
from r1lab.train.stages import run_pretrain

TINY = """preset = "tiny"
[model]
dim = 64
n_layers = 2
n_dense_layers = 1
n_heads = 2
inter_dim = 128
moe_inter_dim = 32
kv_lora_rank = 32
qk_nope_head_dim = 16
qk_rope_head_dim = 8
v_head_dim = 16
n_routed_experts = 4
n_activated_experts = 2
max_seq_len = 192
original_seq_len = 192
vocab_size = 400
[data]
vocab_size = 400
n_problems = 300
difficulty = 2
seq_len = 64
task_options = {ops = ["+"]}
[pretrain]
steps = 2
batch_size = 2
log_every = 1
eval_every = 0
eval_batches = 1
save_every = 1
[grpo]
steps = 1
prompts_per_step = 2
group_size = 2
max_new_tokens = 12
minibatch_size = 4
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished tiny pretraining run (its recipe asks to measure the peak: cost.peak_gflops = 0)."""
    root = tmp_path_factory.mktemp("errors")
    (root / "tiny.toml").write_text(TINY)
    run_pretrain(load_recipe(root / "tiny.toml"), root / "run", peak_flops=100e9, quiet=True)
    return root


@pytest.fixture
def work(base, tmp_path, monkeypatch):
    """tmp_path holding tiny.toml, a copy of the finished run and data files; expensive work forbidden."""
    shutil.copytree(base / "run", tmp_path / "run")
    shutil.copy(base / "tiny.toml", tmp_path / "tiny.toml")
    shutil.copytree(base / "run" / "tokenizer", tmp_path / "tokenizer_only" / "tokenizer")
    files = {
        "broken.jsonl": '{"text": "1 + 1 = 2"}\nnot json\n',
        "fieldless.jsonl": '{"text": "1 + 1 = 2"}\n{"body": "2 + 2 = 4"}\n',
        "user_last.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
        "no_messages.jsonl": json.dumps({"prompt": "hi"}) + "\n",
        "chat.jsonl": json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                               {"role": "assistant", "content": "<think>\n2 + 2\n</think>\n"
                                                                                "<answer>4</answer>"}]}) + "\n",
        "section_typo.toml": TINY.replace("[pretrain]", "[pretrian]"),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    save_checkpoint(tmp_path / "no_tokenizer", Transformer(load_recipe(tmp_path / "tiny.toml").model))
    (tmp_path / "a_file").write_text("not a run")

    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work before the input was checked")

    import r1lab.hardware
    monkeypatch.setattr(r1lab.hardware, "measure_matmul_peak", forbidden)
    monkeypatch.setattr(stages.Tokenizer, "train", forbidden)
    monkeypatch.setattr(stages, "Transformer", forbidden)
    monkeypatch.setattr(stages, "load_checkpoint", forbidden)
    monkeypatch.chdir(tmp_path)
    return tmp_path


CASES = [
    # pretrain: the recipe and its data
    (["pretrain", "--run", "fresh", "--data.task=nope"], "data.task: unknown task family 'nope'; known: arithmetic"),
    (["pretrain", "--run", "fresh", "--pretrain.steps=-1"], "pretrain.steps must be >= 1, got -1"),
    (["pretrain", "--run", "fresh", "--pretrain.log_every=0"], "pretrain.log_every must be >= 1, got 0"),
    (["pretrain", "--run", "fresh", "--pretrain.optim.lr=-1"], "pretrain.optim.lr must be > 0, got -1.0"),
    (["pretrain", "--run", "fresh", "--data.difficulty=9"], "data.difficulty must be in 1..6 for task 'arithmetic'"),
    (["pretrain", "--run", "fresh", "--data.task_options={foo = 1}"], "generate takes no option 'foo'; it takes: ops"),
    (["pretrain", "--run", "fresh", '--data.task_options={ops = ["^"]}'], "ops must be a non-empty subset"),
    (["pretrain", "--run", "fresh", '--data.slip_options={kind = "typo"}'], "slip kind must be one of"),
    (["pretrain", "--run", "fresh", "--data.difficulty=1", "--data.n_problems=500"],
     "data.n_problems: arithmetic: only 90 distinct train problems"),
    (["pretrain", "--run", "fresh", '--data.files=["broken.jsonl"]'], "broken.jsonl:2: not valid JSON"),
    (["pretrain", "--run", "fresh", '--data.files=["fieldless.jsonl"]'], "fieldless.jsonl:2: missing string field 'text'"),
    (["pretrain", "--run", "fresh", '--data.files=["absent.txt"]'], "data.files: absent.txt: no such file"),
    (["pretrain", "--run", "fresh", "--data.seq_len=300"], "data.seq_len (300) exceeds model.max_seq_len (192)"),
    (["pretrain", "--run", "run", "--model.vocab_size=350", "--data.vocab_size=350"],
     "holds a pretrain model with vocab_size 400 (now 350)"),
    (["pretrain", "--run", "tokenizer_only", "--model.vocab_size=350", "--data.vocab_size=350"],
     "the tokenizer in tokenizer_only/tokenizer has 400 ids but model.vocab_size is 350"),
    (["pretrain", "--run", "run", "--model.dim=32"], "run/base/checkpoint holds a pretrain model with dim 64 (now 32)"),
    (["pretrain", "--run", "run", "--data.difficulty=3"], "was trained with data difficulty 2 (now 3)"),
    (["pretrain", "--run", "run", "--pretrain.steps=1"], "run/base/checkpoint is at step 2, past pretrain.steps = 1"),
    (["pretrain", "--run", "tokenizer_only", "--data.slip_rate=0.5"],
     "tokenizer_only/tokenizer was trained for another corpus: data.slip_rate 0.0 (now 0.5)"),
    (["pretrain", "--run", "a_file"], "--run a_file is a file, not a run directory"),
    (["pretrain", "--run", "fresh", "--recipe", "section_typo.toml"], "unknown key 'pretrian'"),
    # sft
    (["sft", "--run", "fresh"], "sft needs data.sft_files"),
    (["sft", "--run", "fresh", '--data.sft_files=["chat.jsonl"]'], "sft needs sft.init_from"),
    (["sft", "--run", "fresh", '--data.sft_files=["chat.jsonl"]', "--sft.init_from=nowhere"],
     "sft.init_from: nowhere: no such model directory"),
    (["sft", "--run", "fresh", '--data.sft_files=["chat.jsonl"]', "--sft.init_from=no_tokenizer"],
     "sft.init_from: no_tokenizer has no tokenizer"),
    (["sft", "--run", "fresh", '--data.sft_files=["absent.jsonl"]', "--sft.init_from=run/base/checkpoint"],
     "data.sft_files: absent.jsonl: no such file"),
    (["sft", "--run", "fresh", '--data.sft_files=["broken.jsonl"]', "--sft.init_from=run/base/checkpoint"],
     "broken.jsonl:2: not valid JSON"),
    (["sft", "--run", "fresh", '--data.sft_files=["no_messages.jsonl"]', "--sft.init_from=run/base/checkpoint"],
     "no_messages.jsonl:1: needs 'messages'"),
    (["sft", "--run", "fresh", '--data.sft_files=["user_last.jsonl"]', "--sft.init_from=run/base/checkpoint"],
     "user_last.jsonl:1: the last message must be from the assistant"),
    (["sft", "--run", "fresh", '--data.sft_files=["chat.jsonl"]', "--sft.init_from=run/base/checkpoint",
      "--data.seq_len=8"], "no conversation fits data.seq_len=8"),
    (["sft", "--run", "fresh", "--data.sft_task_examples=-3", "--sft.init_from=run/base/checkpoint"],
     "data.sft_task_examples must be >= 0, got -3"),
    (["sft", "--run", "fresh", "--data.sft_task_examples=500", "--data.difficulty=1",
      "--sft.init_from=run/base/checkpoint"],
     "data.sft_task_examples: arithmetic: only 90 distinct train problems"),
    # grpo
    (["grpo", "--run", "run", "--grpo.reward_weights={acuracy = 1.0}"],
     "grpo.reward_weights: unknown reward 'acuracy'; known: accuracy, format, language, code, overlong"),
    (["grpo", "--run", "run", "--grpo.reward_weights={accuracy = 1.0, code = 1.0}"],
     "grpo.reward_weights.code needs examples with tests to run, and data.task 'arithmetic' has none"),
    (["grpo", "--run", "run", "--grpo.reward_weights={overlong = 1.0}"], "set grpo.overlong_buffer > 0"),
    (["grpo", "--run", "run", "--data.rl_fields={promt = \"q\"}"], "data.rl_fields: unknown key 'promt'"),
    (["grpo", "--run", "run", "--data.rl_files=[\"no/such.jsonl\"]", "--grpo.reward_weights={code = 1.0}"],
     "data.rl_files lines have only a prompt and an answer"),
    (["grpo", "--run", "run", "--grpo.reward_weights={accuracy = 0.0}"], "every sample would score 0"),
    (["grpo", "--run", "run", "--grpo.top_p=0"], "grpo.top_p must be in (0, 1], got 0.0"),
    (["grpo", "--run", "fresh"], "grpo starts from fresh/base/checkpoint, which does not exist"),
    (["grpo", "--run", "run", "--grpo.init_from=no_tokenizer"], "grpo.init_from: no_tokenizer has no tokenizer"),
    (["grpo", "--run", "run", "--grpo.max_new_tokens=150"],
     "plus grpo.max_new_tokens (150) exceeds the max_seq_len (192) of run/base/checkpoint"),
    # evaluation, chat and info flags
    (["eval", "--model", "run/base/checkpoint", "--bench", "arithmetic", "--k", "0"], "eval --k must be >= 1, got 0"),
    (["eval", "--model", "run/base/checkpoint", "--bench", "arithmetic", "--temperature", "-1"],
     "eval --temperature must be >= 0"),
    (["eval", "--model", "run/base/checkpoint", "--bench", "no-such-bench"], "unknown bench 'no-such-bench'"),
    (["eval", "--model", "a_file", "--bench", "arithmetic"], "a_file"),
    (["chat", "--model", "run/base/checkpoint", "--top-p", "0"], "chat --top-p must be in (0, 1], got 0.0"),
    (["chat", "--model", "nowhere"], "nowhere: no such model directory"),
    (["info", "--context", "0"], "info --context must be >= 1, got 0"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:1] + a[3:])[:60] for a, _ in CASES])
def test_user_error_is_one_line_and_exit_2(work, capsys, args, message):
    if args[0] in ("pretrain", "sft", "grpo") and "--recipe" not in args:
        args = [*args, "--recipe", "tiny.toml"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1lab: error: ") and "\n" not in err, err
    assert message in err, err


def test_a_refused_recipe_leaves_the_run_as_it_was(work, capsys):
    before = {p: p.read_bytes() for p in (work / "run").rglob("*") if p.is_file()}
    assert main(["pretrain", "--recipe", "tiny.toml", "--run", "run", "--model.dim=32"]) == 2
    assert {p: p.read_bytes() for p in (work / "run").rglob("*") if p.is_file()} == before


def test_debug_raises_instead(work):
    with pytest.raises(ConfigError, match="unknown reward 'acuracy'"):
        main(["--debug", "grpo", "--recipe", "tiny.toml", "--run", "run", "--grpo.reward_weights={acuracy = 1.0}"])


def test_valid_input_gets_past_the_checks_to_the_expensive_work(work):
    """The other side of the cases above: with nothing wrong, each stage reaches the forbidden work."""
    for args in (["pretrain", "--run", "fresh"], ["grpo", "--run", "run"],
                 ["sft", "--run", "fresh", '--data.sft_files=["chat.jsonl"]', "--sft.init_from=run/base/checkpoint",
                  "--data.seq_len=128"],
                 ["sft", "--run", "fresh", "--data.sft_task_examples=8", "--data.difficulty=1",
                  "--sft.init_from=run/base/checkpoint", "--data.seq_len=192"]):
        with pytest.raises(AssertionError, match="expensive work before the input was checked"):
            main([*args, "--recipe", "tiny.toml"])
