"""`--dry-run` of the train commands: every packaged recipe is valid on this CPU, and what a machine
lacks (a GPU, a model directory, data files) is listed one line each without loading anything."""

import json
from pathlib import Path

import pytest
from conftest import tiny_hf_model

import r1lab
from r1lab.cli import main

RECIPES = Path(r1lab.__file__).parent / "recipes"
# the commands each packaged recipe is written for; a new recipe must be added here
STAGES = {"r1-zero-tiny": ["pretrain", "grpo"], "code-tiny": ["pretrain", "grpo"],
          "r1-zero-qwen2.5-0.5b": ["grpo"], "distill-qwen2.5-1.5b": ["sft"],
          "distill-tiny": [],  # r1lab distill writes its own sft_files: no train command runs it alone
          "r1-tiny": ["pretrain"]}  # r1lab pipeline; its first stage is `r1lab pretrain`
GPU_RECIPES = {"r1-zero-qwen2.5-0.5b": "grpo.init_from: models/Qwen2.5-0.5B: no such model directory",
               "distill-qwen2.5-1.5b": "sft.init_from: models/Qwen2.5-1.5B: no such model directory"}


def dry_run(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main([*argv, "--dry-run"])
    out = capsys.readouterr()
    return code, [line.strip() for line in out.out.splitlines()[1:]], out.err


def test_every_packaged_recipe_is_known_here():
    assert {p.stem for p in RECIPES.glob("*.toml")} == set(STAGES)


@pytest.mark.parametrize("name, command", [(n, c) for n, cs in STAGES.items() for c in cs])
def test_every_packaged_recipe_dry_runs_on_a_cpu(name, command, tmp_path, capsys):
    code, missing, err = dry_run(capsys, command, "--recipe", str(RECIPES / f"{name}.toml"), "--run", str(tmp_path))
    assert code == 0, err
    if name in GPU_RECIPES:
        assert missing[0] == "missing: device 'cuda': not available on this machine (this torch build has no CUDA); use cpu"
        assert f"missing: {GPU_RECIPES[name]}" in missing
        assert any(line.startswith("missing: data.") and "no such file" in line for line in missing)
        assert len(missing) == 3
    elif command == "grpo":  # the tiny recipes' GRPO starts from the run's own pretrained base
        assert len(missing) == 1 and "run `r1lab pretrain" in missing[0]
    else:
        assert missing == []
    assert not list(tmp_path.iterdir())  # nothing written


def test_dry_run_finds_nothing_missing_when_all_is_there(tf, tok, tmp_path, capsys):
    model = tiny_hf_model(tf, "qwen2", tmp_path / "model", tok)
    rl = tmp_path / "rl.jsonl"
    rl.write_text(json.dumps({"question": "1 + 1", "answer": "#### 2"}) + "\n")
    code, missing, _ = dry_run(capsys, "grpo", "--recipe", str(RECIPES / "r1-zero-qwen2.5-0.5b.toml"),
                               "--run", str(tmp_path / "run"), "--device", "cpu", "--model", str(model),
                               f"--data.rl_files=[\"{rl}\"]")
    assert (code, missing) == (0, [])


@pytest.mark.parametrize("override, message", [
    ("--grpo.group_size=1", "group_size must be >= 2"),
    ("--device=gpu", "device"),
    ("--grpo.lossy=1", "lossy"),
])
def test_an_invalid_recipe_fails_the_dry_run(override, message, tmp_path, capsys):
    code, _, err = dry_run(capsys, "grpo", "--recipe", str(RECIPES / "r1-zero-qwen2.5-0.5b.toml"), "--run",
                           str(tmp_path), override)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_bad_data_line_fails_the_dry_run(tmp_path, capsys):
    rl = tmp_path / "rl.jsonl"
    rl.write_text(json.dumps({"question": "1 + 1"}) + "\n")
    code, _, err = dry_run(capsys, "grpo", "--recipe", str(RECIPES / "r1-zero-qwen2.5-0.5b.toml"), "--run",
                           str(tmp_path / "run"), f"--data.rl_files=[\"{rl}\"]")
    assert code == 2 and f"{rl}:1: needs a non-empty text answer" in err


def test_sft_from_task_examples_alone_dry_runs(tmp_path, capsys):
    """`r1lab sft` accepts cold-start conversations generated from data.task without any sft_files, so
    its dry run must too; with neither, both refuse with the same line."""
    base = tmp_path / "run" / "base" / "checkpoint"
    code, missing, err = dry_run(capsys, "sft", "--run", str(tmp_path / "run"), f"--sft.init_from={base}",
                                 "--data.sft_task_examples=64")
    assert code == 0, err
    assert len(missing) == 1 and "sft.init_from" in missing[0]
    code, _, err = dry_run(capsys, "sft", "--run", str(tmp_path / "run"), f"--sft.init_from={base}")
    assert code == 2 and "sft needs data.sft_files" in err and "sft_task_examples" in err
