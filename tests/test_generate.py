"""`r1lab generate`: k samples per prompt from a checkpoint or an OpenAI-compatible endpoint, graded,
filtered (only verified, well-formed, non-duplicate samples) and written as SFT JSONL that `r1lab sft` trains on."""

import json
import re
import socket
import threading
import time

import pytest
import torch
import uvicorn
from fastapi import FastAPI

from r1lab.checkpoint import read_trainer_summary
from r1lab.cli import main
from r1lab.recipe import load_recipe
from r1lab.tasks import get_family
from r1lab.rewards import accuracy_reward, format_reward
from r1lab.train.data import read_conversations
from r1lab.train.generate import is_complete, stats_path
from r1lab.train.stages import run_pretrain

RECIPE = ["--model.dim=64", "--model.inter_dim=128", "--model.moe_inter_dim=32", "--model.n_layers=2",
          "--model.n_routed_experts=4", "--model.kv_lora_rank=32", "--model.qk_nope_head_dim=16",
          "--model.qk_rope_head_dim=8", "--model.v_head_dim=16", "--model.max_seq_len=128",
          "--model.original_seq_len=128", "--model.vocab_size=512", "--data.task=arithmetic", "--data.difficulty=2",
          "--data.n_problems=48", "--data.scratchpad_share=0.0", "--data.seq_len=64", "--data.template=r1",
          "--data.task_options={ops = [\"+\"]}", "--pretrain.steps=200", "--pretrain.batch_size=16",
          "--pretrain.log_every=50", "--pretrain.eval_every=0", "--pretrain.save_every=0",
          "--pretrain.optim.warmup_steps=10"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A checkpoint that has half learnt 48 two-digit additions (the first of the train split), answering
    directly: a few samples right, most wrong."""
    run = tmp_path_factory.mktemp("teacher")
    run_pretrain(load_recipe(None, RECIPE), run, peak_flops=1e11, quiet=True)
    return run / "base" / "checkpoint"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_keeps_only_verified_unique_samples_and_sft_trains_on_them(teacher, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    code = main(["generate", "--model", str(teacher), "--prompts", "arithmetic", "--limit", "24", "--k", "8",
                 "--max-new-tokens", "24", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    stats = json.loads(stats_path(out).read_text())
    assert stats["prompts"] == 24 and stats["samples"] == 24 * 8
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["samples"]
    assert 0 < stats["kept"] < stats["samples"] and stats["dropped"]["wrong"] > 0
    assert re.search(rf"kept {stats['kept']} of 192 samples .*dropped: .*wrong {stats['dropped']['wrong']}", err)
    rows = _lines(out)
    assert len(rows) == stats["kept"] and is_complete(out)
    seen = set()
    for row in rows:
        user, assistant = row["messages"]
        question = user["content"]
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", question).groups())
        example = {"answer": str(a + b), "think_opened": False}
        assert accuracy_reward(assistant["content"], example) == 1.0  # only verified answers
        assert format_reward(assistant["content"], example) == 1.0 and assistant["content"].startswith("<think>")
        key = (question, " ".join(assistant["content"].split()))
        assert key not in seen  # no duplicate per prompt
        seen.add(key)

    # The file is SFT data as it stands: two steps of `r1lab sft` on it.
    run = tmp_path / "sft"
    code = main(["sft", "--run", str(run), f"--sft.init_from={teacher}", f"--data.sft_files=[\"{out}\"]",
                 "--data.template=r1", "--data.seq_len=64", "--sft.steps=2", "--sft.batch_size=4",
                 "--sft.eval_batches=1", "--sft.log_every=1", "--sft.optim.warmup_steps=0", "--cost.peak_gflops=100"])
    assert code == 0, capsys.readouterr().err
    assert read_trainer_summary(run / "sft" / "checkpoint")["step"] == 2
    assert len(read_conversations([str(out)])[0]) == stats["kept"]


def test_generate_per_prompt_cap_and_user_prompt_file(teacher, tmp_path, capsys):
    prompts = tmp_path / "mine.jsonl"
    problems = get_family("arithmetic").generate(24, seed=0, split="train", difficulty=2, ops=["+"])
    prompts.write_text("".join(json.dumps({"question": ex["prompt"], "answer": f"work\n#### {ex['answer']}"}) + "\n"
                               for ex in problems))  # GSM8K's form, as data.rl_files reads it
    out = tmp_path / "capped.jsonl"
    code = main(["generate", "--model", str(teacher), "--prompts", str(prompts), "--k", "8", "--per-prompt", "1",
                 "--instruction", "", "--max-new-tokens", "24", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    stats = json.loads(stats_path(out).read_text())
    rows = _lines(out)
    questions = [row["messages"][0]["content"] for row in rows]
    assert stats["prompts"] == 24 and stats["samples"] == 192 and len(rows) == stats["kept"] > 0
    assert len(set(questions)) == len(questions)  # at most one per prompt
    assert stats["kept_prompts"] == len(questions)


@pytest.mark.parametrize("args, message", [
    (["--prompts", "nosuchfamily"], "--prompts nosuchfamily: no such file, and not a task family"),
    (["--prompts", "arithmetic", "--k", "0"], "generate.k must be >= 1, got 0"),
    (["--prompts", "arithmetic", "--api-base", "http://127.0.0.1:9/v1"], "either --model DIR or --api-base"),
])
def test_generate_bad_input_is_one_line_and_exit_2(teacher, tmp_path, capsys, args, message):
    code = main(["generate", "--model", str(teacher), "--out", str(tmp_path / "x.jsonl"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_generate_bad_prompt_line_names_file_and_line(teacher, tmp_path, capsys):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "What is 2 + 2?"}\n')
    code = main(["generate", "--model", str(teacher), "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"r1lab: error: {prompts}:2:")


# ------------------------------------------------------------------------------- the endpoint path
def _endpoint_double() -> FastAPI:
    """An OpenAI-style chat endpoint that answers "What is A + B?" with five scripted choices: right, the
    same right one again (a duplicate), wrong, right with other reasoning, and right but unformatted."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        a, b = _operands(body["messages"][-1]["content"])
        script = [(f"{a} plus {b}", f"<answer>{a + b}</answer>"), (f"{a} plus {b}", f"<answer>{a + b}</answer>"),
                  (f"{a} plus {b}", f"<answer>{a + b + 1}</answer>"), (f"add {b} to {a}", f"<answer>{a + b}</answer>"),
                  (None, f"{a + b}")]
        choices = [{"index": i, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content,
                                **({"reasoning_content": reasoning} if reasoning else {})}}
                   for i, (reasoning, content) in enumerate(script[:body.get("n", 1)])]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 5, "completion_tokens": 10 * len(choices), "total_tokens": 99}}

    return app


def _operands(question: str) -> tuple[int, int]:
    return tuple(map(int, re.search(r"What is (\d+) \+ (\d+)\?", question).groups()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_from_an_openai_compatible_endpoint(tmp_path, capsys):
    prompts = tmp_path / "sums.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {a} + {a + 1}?", "answer": 2 * a + 1}) + "\n"
                               for a in range(10, 16)))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_endpoint_double(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        out = tmp_path / "api.jsonl"
        code = main(["generate", "--api-base", f"http://127.0.0.1:{port}/v1", "--api-model", "teacher",
                     "--prompts", str(prompts), "--k", "5", "--instruction", "",
                     "--out", str(out)])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert code == 0, capsys.readouterr().err
    stats = json.loads(stats_path(out).read_text())
    assert stats["samples"] == 30 and stats["kept"] == 12
    assert {k: v for k, v in stats["dropped"].items() if v} == {"wrong": 6, "duplicate": 6, "bad_format": 6}
    rows = _lines(out)
    for i, row in enumerate(rows):
        a, b = _operands(row["messages"][0]["content"])
        reasoning = f"{a} plus {b}" if i % 2 == 0 else f"add {b} to {a}"
        assert row["messages"][1]["content"] == f"<think>\n{reasoning}\n</think>\n\n<answer>{a + b}</answer>"


# ------------------------------------------------------------------------------------- r1lab distill
def _student_recipe(tmp_path, teacher) -> "Path":
    from r1lab.checkpoint import load_tokenizer, save_checkpoint
    from r1lab.config import ModelConfig
    from r1lab.model import Transformer

    shape = ModelConfig(vocab_size=512, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1,
                        n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=8, max_seq_len=128, original_seq_len=128)
    student = save_checkpoint(tmp_path / "student", Transformer(shape), load_tokenizer(teacher))
    recipe = tmp_path / "student.toml"
    recipe.write_text(f"""
[data]
task = "arithmetic"
difficulty = 2
task_options = {{ops = ["+"]}}
template = "r1"
seq_len = 64

[sft]
init_from = "{student}"
steps = 2
batch_size = 4
eval_batches = 1
log_every = 1

[sft.optim]
warmup_steps = 0

[generate]
k = 8
prompts = 24
max_new_tokens = 24

[cost]
peak_gflops = 100.0
""")
    return recipe


def test_distill_generates_filters_and_fine_tunes_the_student_and_resumes(teacher, tmp_path, capsys):
    from r1lab.checkpoint import load_checkpoint
    from r1lab.train.distill import DISTILL_FILE

    recipe, run = _student_recipe(tmp_path, teacher), tmp_path / "run"
    started = time.perf_counter()
    code = main(["distill", "--teacher", str(teacher), "--student-recipe", str(recipe), "--run", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert time.perf_counter() - started < 30
    data = run / DISTILL_FILE
    stats = json.loads(stats_path(data).read_text())
    assert stats["samples"] == 24 * 8 and 0 < stats["kept"] == len(_lines(data))
    assert "r1lab distill: generated: kept" in err
    assert read_trainer_summary(run / "sft" / "checkpoint")["step"] == 2
    before = load_checkpoint(tmp_path / "student")[0].state_dict()
    after = load_checkpoint(run / "sft" / "checkpoint")[0].state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert load_recipe(run / "recipe.toml").data.sft_files == [str(data)]

    # A second invocation does not generate again; other [generate] settings are refused.
    mtime = data.stat().st_mtime_ns
    code = main(["distill", "--teacher", str(teacher), "--student-recipe", str(recipe), "--run", str(run), "--quiet"])
    assert code == 0 and "r1lab distill: reused: kept" in capsys.readouterr().err
    assert data.stat().st_mtime_ns == mtime
    code = main(["distill", "--teacher", str(teacher), "--student-recipe", str(recipe), "--run", str(run), "--k", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "other [generate] settings" in err and len(err.strip().splitlines()) == 1


def test_distill_without_a_student_is_one_line(teacher, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[data]\ntemplate = \"r1\"\n")
    code = main(["distill", "--teacher", str(teacher), "--student-recipe", str(recipe), "--run", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "sft.init_from" in err and len(err.strip().splitlines()) == 1


def test_the_packaged_distill_recipe_reads_the_demo_runs_student(tmp_path, capsys):
    from importlib.resources import files

    path = str(files("r1lab").joinpath("recipes/distill-tiny.toml"))
    recipe = load_recipe(path)
    assert recipe.sft.init_from == "runs/demo/base/checkpoint" and recipe.generate.per_prompt == 2
    code = main(["distill", "--teacher", str(tmp_path / "nope"), "--student-recipe", path, "--run", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "no such model directory" in err and not (tmp_path / "r").exists()
