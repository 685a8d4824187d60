"""Cold-start conversations: readable R1-format reasoning that the rewards accept and `r1lab sft` trains on."""

import json
import re

import pytest
import torch

from r1lab.checkpoint import load_checkpoint, save_checkpoint
from r1lab.cli import main
from r1lab.config import ConfigError, DataError
from r1lab.model import Transformer
from r1lab.recipe import load_recipe
from r1lab.rewards import accuracy_reward, format_reward, language_consistency_reward
from r1lab.tasks import FAMILIES
from r1lab.tasks.coldstart import (READABLE, STYLES, cold_start_completion, cold_start_conversations, corpus_reasoning,
                                   readable_reasoning)
from r1lab.tokenizer import R1, R1_ZERO, Tokenizer, render_conversation
from r1lab.train.data import ConversationSet, task_conversations

LOW_DIFFICULTY = {"arithmetic": 2, "code": 1, "countdown": 1, "linear": 1, "sorting": 1}


def _examples(family: str, n: int = 12, difficulty: int | None = None, **options) -> list[dict]:
    difficulty = difficulty or LOW_DIFFICULTY[family]
    return FAMILIES[family].generate(n, seed=7, split="train", difficulty=difficulty, **options)


def _generated_part(completion: str) -> str:
    """What a model prompted with the r1 template writes: the prompt already opened `<think>\\n`."""
    assert completion.startswith("<think>\n")
    return completion[len("<think>\n"):]


def test_every_family_has_a_readable_rendering():
    assert set(READABLE) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_cold_start_turn_scores_full_accuracy_format_and_language(family):
    for ex in _examples(family):
        completion = cold_start_completion(ex)
        generated = _generated_part(completion)
        assert accuracy_reward(generated, ex) == 1.0, completion
        assert format_reward(generated, think_opened=True) == 1.0, completion
        assert format_reward(completion) == 1.0, completion
        assert language_consistency_reward(generated, ex) == 1.0, completion
        # the summary is the last line of the reasoning and states the answer
        reasoning = completion.split("</think>")[0]
        summary = reasoning.strip().splitlines()[-1]
        assert summary.startswith("So ") and ex["answer"] in summary, summary
        # a wrong answer in the same shape is graded wrong: the score comes from the answer, not the shape
        wrong = generated.replace(f"<answer>{ex['answer']}</answer>", "<answer>7 7</answer>")
        assert accuracy_reward(wrong, ex) == 0.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_corpus_style_turn_keeps_the_worked_solution_and_scores_full_rewards(family):
    for ex in _examples(family):
        completion = cold_start_completion(ex, "corpus")
        generated = _generated_part(completion)
        assert accuracy_reward(generated, ex) == 1.0, completion
        assert format_reward(generated, think_opened=True) == 1.0, completion
        assert language_consistency_reward(generated, ex) == 1.0, completion
        # the corpus's solution verbatim where the corpus has it, right after <think>, then the stated result
        assert generated.startswith(ex["solution"] + "\n"), completion
        assert corpus_reasoning(ex).splitlines() == [*ex["solution"].splitlines(), f"So the answer is {ex['answer']}."]


def test_corpus_style_arithmetic_is_the_compact_scratchpad_then_an_english_summary():
    ex = _examples("arithmetic", 1, 2, notation="compact", ops=("+",))[0]
    ex = {**ex, "a": 68, "b": 69, "answer": "137", "prompt": "What is 68 + 69?",
          "solution": "68+69\n8+9=17 c1 7\n6+6+1=13 c1 37\nc1 137\n=137"}
    assert corpus_reasoning(ex) == "68+69\n8+9=17 c1 7\n6+6+1=13 c1 37\nc1 137\n=137\nSo the answer is 137."
    assert STYLES == ("readable", "corpus")
    with pytest.raises(ValueError, match="cold-start style must be one of readable, corpus, got 'terse'"):
        cold_start_completion(ex, "terse")


def test_the_style_key_picks_the_conversations():
    recipe = load_recipe(None, ["--data.sft_task_examples=4", "--data.difficulty=2", "--data.sft_task_style=corpus",
                                '--data.task_options={notation = "compact"}'])
    conversations = task_conversations(recipe.data)
    examples = FAMILIES["arithmetic"].generate(4, seed=recipe.data.seed + 2, split="train", difficulty=2,
                                               notation="compact")
    assert [c[1]["content"] for c in conversations] == [cold_start_completion(ex, "corpus") for ex in examples]
    assert load_recipe(None, []).data.sft_task_style == "readable"
    with pytest.raises(ConfigError, match="sft_task_style"):
        load_recipe(None, ["--data.sft_task_style=terse"])


def test_arithmetic_reasoning_is_sentences_whatever_the_corpus_notation():
    compact = _examples("arithmetic", 20, 3, notation="compact")
    long = _examples("arithmetic", 20, 3, notation="long")
    assert [e["prompt"] for e in compact] == [e["prompt"] for e in long]
    for c, lo in zip(compact, long, strict=True):
        text = readable_reasoning(c)
        assert text == readable_reasoning(lo)
        assert not re.search(r"\bc\d\b|\bb\d\b|->|^=|\bp\d=|<<", text, flags=re.M), text  # no corpus shorthand
        assert all(line.endswith(".") for line in text.splitlines()), text
        assert len(text.splitlines()) <= 7


@pytest.mark.parametrize("op", ["+", "*"])
def test_column_steps_write_the_digits_of_the_answer(op):
    """Read back the digits written column by column (and the last carry): they spell the answer."""
    for ex in _examples("arithmetic", 30, 3, ops=(op,)):
        if op == "*" and ex["b"] >= 10:
            continue  # written as partial products, checked below
        text = readable_reasoning(ex)
        digits = re.findall(r"write (\d)", text)
        last = re.search(r"The last carry (\d) is the leading digit", text)
        value = int((last.group(1) if last else "") + "".join(reversed(digits)))
        assert value == int(ex["answer"]), text


def test_partial_products_and_borrows_add_up():
    for ex in _examples("arithmetic", 30, 3, ops=("*",)):
        text = readable_reasoning(ex)
        parts = re.search(r"Add the partial products: (.*) = (\d+)\.", text)
        assert sum(map(int, parts.group(1).split(" + "))) == int(parts.group(2)) == int(ex["answer"])
    for ex in _examples("arithmetic", 30, 3, ops=("-",)):
        text = readable_reasoning(ex)
        digits = re.findall(r"= (\d+)\.$|(\d) comes down\.$", text, flags=re.M)[:-1]  # the last line is the summary
        written = [int(a or b) % 10 for a, b in digits]
        assert int("".join(map(str, reversed(written)))) == int(ex["answer"]), text


def test_conversations_parse_and_only_the_assistant_turn_is_trained_on():
    conversations = cold_start_conversations("arithmetic", 16, seed=3, difficulty=2)
    assert len(conversations) == 16 and len({c[0]["content"] for c in conversations}) == 16
    tokenizer = Tokenizer.train([c[0]["content"] + c[1]["content"] for c in conversations], 400)
    data = ConversationSet(tokenizer, conversations, R1, seq_len=384, seed=0)
    assert data.too_long == 0 and len(data.items) == 16
    eos = tokenizer.decode([tokenizer.eos_id])
    for (ids, mask), conv in zip(data.items, conversations, strict=True):
        trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert trained == _generated_part(conv[1]["content"]) + eos
        untrained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m])
        assert conv[0]["content"] in untrained and "Ones" not in untrained
    # the r1-zero template trains on the whole turn, <think> included
    ids, mask = render_conversation(tokenizer, conversations[0], R1_ZERO)
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == conversations[0][1]["content"] + eos


def test_the_recipe_key_is_validated_and_a_too_small_problem_space_is_one_error():
    assert load_recipe(None, ["--data.sft_task_examples=5"]).data.sft_task_examples == 5
    with pytest.raises(ConfigError, match="data.sft_task_examples must be >= 0, got -1"):
        load_recipe(None, ["--data.sft_task_examples=-1"])
    recipe = load_recipe(None, ["--data.sft_task_examples=500", "--data.difficulty=1"])
    with pytest.raises(DataError, match="data.sft_task_examples: arithmetic: only"):
        task_conversations(recipe.data)


def test_from_data_adds_generated_conversations_to_the_files(tmp_path):
    line = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                         {"role": "assistant", "content": "<think>\n2 + 2 = 4\n</think>\n<answer>4</answer>"}]}
    (tmp_path / "mine.jsonl").write_text(json.dumps(line) + "\n")
    recipe = load_recipe(None, [f'--data.sft_files=["{tmp_path / "mine.jsonl"}"]', "--data.sft_task_examples=6",
                                "--data.difficulty=2", "--data.template=r1", "--data.seq_len=384"])
    generated = task_conversations(recipe.data)
    tokenizer = Tokenizer.train([c[1]["content"] for c in generated], 400)
    data = ConversationSet.from_data(tokenizer, recipe.data, seed=0)
    expected = [render_conversation(tokenizer, c, R1)[0] for c in [line["messages"], *generated]]
    assert [ids for ids, _ in data.items] == expected


def test_sft_trains_on_cold_start_data_without_a_file(tmp_path, capsys, make_config):
    conversations = cold_start_conversations("arithmetic", 64, seed=0, difficulty=2, ops=("+",))
    tokenizer = Tokenizer.train([c[0]["content"] + c[1]["content"] for c in conversations], 400)
    config = make_config(vocab_size=tokenizer.vocab_size, max_seq_len=256, original_seq_len=256)
    base = save_checkpoint(tmp_path / "base", Transformer(config), tokenizer)
    before = {k: v.clone() for k, v in load_checkpoint(base)[0].state_dict().items()}
    args = ["sft", "--run", str(tmp_path / "run"), "--data.sft_task_examples=32", "--data.difficulty=2",
            '--data.task_options={ops = ["+"]}', "--data.template=r1", "--data.seq_len=256",
            f"--sft.init_from={base}", "--sft.steps=2", "--sft.batch_size=4", "--sft.eval_batches=1",
            "--sft.log_every=1", "--sft.optim.warmup_steps=0", "--cost.peak_gflops=100"]
    assert main(args) == 0, capsys.readouterr().err
    assert "fine-tuned 2 steps" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    after = load_checkpoint(tmp_path / "run" / "sft" / "checkpoint")[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
