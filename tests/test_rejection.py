"""The rejection-sampling filter keeps only verified, distinct, short enough samples, and its SFT file reads back."""

import json

import pytest

from r1lab.rewards import accuracy_reward, format_reward, language_consistency_reward
from r1lab.tasks import FAMILIES
from r1lab.tasks.coldstart import cold_start_completion
from r1lab.tokenizer import R1, R1_ZERO, Tokenizer
from r1lab.train.data import ConversationSet
from r1lab.train.rejection import DROP_REASONS, Limits, Sample, filter_samples, write_sft_jsonl


def good(prompt_id: str, text: str, n_tokens: int = 10, **changes) -> Sample:
    fields = dict(prompt_id=prompt_id, prompt=f"question {prompt_id}", completion=text, n_tokens=n_tokens,
                  accuracy=1.0, format=1.0, language=1.0)
    fields.update(changes)
    return Sample(**fields)


def test_keeps_only_verified_samples_and_counts_every_drop():
    samples = [
        good("a", "right 1"),
        good("a", "wrong", accuracy=0.0),
        good("a", "no tags", format=0.0),
        good("a", "wrong and no tags", accuracy=0.0, format=0.0),  # counted once, under the first rule
        good("b", "too long", n_tokens=65),
        good("b", "exactly at the limit", n_tokens=64),
        good("b", "mixed 中文", language=0.5),
        good("b", "mostly one language", language=0.95),
    ]
    result = filter_samples(samples, Limits(max_tokens=64, min_language=0.9))
    assert [s.completion for s in result.kept] == ["right 1", "exactly at the limit", "mostly one language"]
    assert result.dropped == {"wrong": 2, "bad_format": 1, "overlong": 1, "mixed_language": 1, "duplicate": 0,
                              "over_cap": 0}
    assert list(result.dropped) == list(DROP_REASONS)
    assert result.n_seen == len(samples) == len(result.kept) + sum(result.dropped.values())


def test_duplicates_after_whitespace_normalisation_are_dropped_per_prompt():
    samples = [good("a", "<think>\nx = 1\n</think>\n<answer>1</answer>"),
               good("a", "<think> x = 1 </think>  <answer>1</answer>\n"),
               good("a", "<think>\nx = 1\n</think>\n<answer>1</answer>", accuracy=0.0),  # wrong, not a duplicate
               good("b", "<think>\nx = 1\n</think>\n<answer>1</answer>"),  # same text, another prompt
               good("a", "<think>\nx=1\n</think>\n<answer>1</answer>")]  # differs inside a line
    result = filter_samples(samples, Limits(max_tokens=100))
    assert [(s.prompt_id, s.completion) for s in result.kept] == [
        ("a", samples[0].completion), ("b", samples[3].completion), ("a", samples[4].completion)]
    assert result.dropped["duplicate"] == 1 and result.dropped["wrong"] == 1


def test_the_per_prompt_cap_keeps_the_first_passing_samples_in_input_order():
    samples = [good(p, f"{p} answer {i}") for i in range(5) for p in ("a", "b")]  # interleaved prompts
    samples.insert(1, good("a", "a answer 0"))  # a duplicate does not use up the cap
    samples.insert(2, good("a", "a wrong", accuracy=0.0))
    result = filter_samples(samples, Limits(max_tokens=100, per_prompt=2))
    assert [s.completion for s in result.kept] == ["a answer 0", "b answer 0", "a answer 1", "b answer 1"]
    assert result.dropped == {"wrong": 1, "bad_format": 0, "overlong": 0, "mixed_language": 0, "duplicate": 1,
                              "over_cap": 6}
    assert filter_samples(samples, Limits(max_tokens=100, per_prompt=2)) == result  # deterministic
    uncapped = filter_samples(samples, Limits(max_tokens=100))
    assert len(uncapped.kept) == 10 and uncapped.dropped["over_cap"] == 0


def test_limits_are_checked_and_a_missing_language_score_is_an_error():
    for bad, message in (({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 8, "min_language": 1.5}, "min_language"),
                         ({"max_tokens": 8, "per_prompt": -1}, "per_prompt")):
        with pytest.raises(ValueError, match=message):
            Limits(**bad)
    unscored = good("a", "text", n_tokens=8, language=None)
    assert filter_samples([unscored], Limits(max_tokens=8)).kept == [unscored]  # not asked for: not needed
    with pytest.raises(ValueError, match="prompt 'a' has no language score"):
        filter_samples([unscored], Limits(max_tokens=8, min_language=0.5))


def _graded(completions: list[str], example: dict) -> list[Sample]:
    """Samples scored by the real rewards, as an R1-template run would produce them."""
    return [Sample(example["id"], example["prompt"], c, len(c.split()), accuracy_reward(c, example),
                   format_reward(c, think_opened=True), language_consistency_reward(c, example)) for c in completions]


@pytest.mark.parametrize("template", [R1, R1_ZERO])
def test_kept_samples_round_trip_through_an_sft_file(tmp_path, template):
    examples = FAMILIES["arithmetic"].generate(4, seed=5, split="train", difficulty=2)
    samples = []
    for ex in examples:
        right = cold_start_completion(ex)[len("<think>\n"):]  # what the model writes after the r1 prompt
        samples += _graded([right, right.replace(f"<answer>{ex['answer']}", "<answer>999"),
                            right.replace("</think>\n", ""), " " + right.replace("\n", "\n ")], ex)
    result = filter_samples(samples, Limits(max_tokens=200, min_language=0.9, per_prompt=1))
    assert result.dropped["wrong"] == 4 and result.dropped["bad_format"] == 4 and result.dropped["duplicate"] == 4
    assert [s.prompt_id for s in result.kept] == [ex["id"] for ex in examples]

    path = write_sft_jsonl(result.kept, tmp_path / "rs" / "kept.jsonl", think_opened=True)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [m["messages"][0]["content"] for m in lines] == [ex["prompt"] for ex in examples]
    assert all(m["messages"][1]["content"].startswith("<think>\n") for m in lines)
    tokenizer = Tokenizer.train([s.prompt + s.completion for s in samples], 400)
    data = ConversationSet.from_jsonl(tokenizer, [str(path)], template, seq_len=384, seed=0)
    assert len(data.items) == len(result.kept) and data.too_long == 0
    eos = tokenizer.decode([tokenizer.eos_id])
    for (ids, mask), sample in zip(data.items, result.kept, strict=True):
        trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
        # r1: exactly the generated text; r1-zero: the whole turn, <think> included
        assert trained == (sample.completion if template == R1 else "<think>\n" + sample.completion) + eos
