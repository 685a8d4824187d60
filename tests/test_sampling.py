import pytest
import torch
from conftest import tiny_config

from r1lab.cost import generation_flops
from r1lab.engine import Completion, Engine, SamplingParams
from r1lab.model import Transformer
from r1lab.rewards import accuracy_reward, format_reward, overlong_penalty
from r1lab.sampling import Sampled, grade, longest_prompt, sample, sized_engine, with_stop_rule
from r1lab.tokenizer import ANSWER_CLOSE, R1, R1_ZERO, Tokenizer, render_prompt, template_stop_ids

RIGHT = "<think>\n2 plus 2\n</think>\n<answer>4</answer>"
WRONG = "<think>\nguess\n</think>\n<answer>5</answer>"
UNTAGGED = "the answer is 4"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"What is {a} + {b}? <think>\n{a} plus {b}\n</think>\n<answer>{a + b}</answer>"
             for a in range(10, 40) for b in range(3)]
    return Tokenizer.train(texts, 300)


def examples(n: int) -> list[dict]:
    # growing prompts, so the longest one is the last
    return [{"id": f"q{i}", "prompt": "What is 2 + 2?" + " Please." * i, "answer": "4"} for i in range(n)]


class RecordingEngine:
    """Answers every prompt with scripted texts and finish reasons; keeps the params it was given."""

    def __init__(self, tokenizer, replies: list[tuple[str, str]], max_len: int = 1 << 20):
        self.tokenizer, self.replies, self.max_len, self.params = tokenizer, replies, max_len, []

    def generate(self, prompts, params, first_index=0):
        self.params.append(params)
        return [Completion(p, j, self.tokenizer.encode(text), reason, [])
                for p in range(len(prompts)) for j, (text, reason) in enumerate(self.replies[:params.n])]


def test_stop_rule_per_template(tokenizer):
    close = tokenizer.token_to_id(ANSWER_CLOSE)
    assert template_stop_ids(tokenizer, R1_ZERO) == (close,)
    assert template_stop_ids(tokenizer, R1) == ()  # R1 ends at EOS, which the engine always stops at
    own = SamplingParams(stop_token_ids=(7, close))
    assert with_stop_rule(own, tokenizer, R1_ZERO).stop_token_ids == (7, close)  # each id once
    assert with_stop_rule(SamplingParams(stop_token_ids=(7,)), tokenizer, R1_ZERO).stop_token_ids == (7, close)
    assert with_stop_rule(own, tokenizer, R1).stop_token_ids == (7, close)
    for template, want in ((R1_ZERO, (close,)), (R1, ())):
        engine = RecordingEngine(tokenizer, [(RIGHT, "stop")])
        sample(engine, tokenizer, examples(2), SamplingParams(n=1), template)
        assert engine.params[0].stop_token_ids == want


def test_records_carry_the_example_prompt_and_truncation(tokenizer):
    engine = RecordingEngine(tokenizer, [(RIGHT, "stop"), (UNTAGGED, "length"), (WRONG, "stop")])
    exs = examples(2)
    groups = sample(engine, tokenizer, exs, SamplingParams(n=3), R1_ZERO, instruction="Be brief.")
    assert [g.example for g in groups] == exs and all(g.skipped is None for g in groups)
    for g, ex in zip(groups, exs):
        assert g.prompt_ids == render_prompt(tokenizer, f"{ex['prompt']}\nBe brief.", R1_ZERO)
        assert tokenizer.decode(g.prompt_ids).count("Be brief.") == 1
        assert [s.text for s in g.samples] == [RIGHT, UNTAGGED, WRONG]
        assert [s.truncated for s in g.samples] == [False, True, False]
        assert all(s.example is ex and s.prompt_ids == g.prompt_ids for s in g.samples)
        assert g.flops(tiny_config()) == generation_flops(tiny_config(), len(g.prompt_ids),
                                                          [len(s.token_ids) for s in g.samples])


def test_a_prompt_that_does_not_fit_is_skipped_with_the_reason(tokenizer):
    exs = examples(3)
    longest = longest_prompt(tokenizer, exs, R1_ZERO)
    engine = RecordingEngine(tokenizer, [(RIGHT, "stop")], max_len=longest)
    groups = sample(engine, tokenizer, exs, SamplingParams(n=1), R1_ZERO)
    assert [g.skipped is None for g in groups] == [True, True, False]
    assert groups[2].samples == [] and f"does not fit max_len {longest}" in groups[2].skipped
    assert groups[2].flops(tiny_config()) == 0.0


def test_cache_sizing_covers_the_longest_prompt(tokenizer):
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=256, original_seq_len=256)).eval()
    exs = examples(4)
    longest = longest_prompt(tokenizer, exs, R1)
    lengths = [len(render_prompt(tokenizer, ex["prompt"], R1)) for ex in exs]
    assert longest == max(lengths) == lengths[-1]
    engine = sized_engine(model, tokenizer, longest, 9, max_batch_size=8)
    assert engine.max_len == longest + 9
    params = SamplingParams(max_new_tokens=9, temperature=1.0, n=2, seed=3, ignore_eos=True)
    groups = sample(engine, tokenizer, exs, params, R1)
    # every sample, the longest prompt's included, gets all its tokens and reports the cut
    assert all(len(s.token_ids) == 9 and s.truncated for g in groups for s in g.samples)
    short = Engine(model, tokenizer.eos_id, max_len=longest + 8)  # one slot too few for the longest
    assert [len(s.token_ids) for s in sample(short, tokenizer, exs, params, R1)[-1].samples] == [8, 8]
    assert sized_engine(model, tokenizer, 250, 9, 8).max_len == 256  # never past the model's positions


def test_grading_matches_the_reward_functions(tokenizer):
    ex = {"id": "q", "prompt": "What is 2 + 2?", "answer": "4"}
    texts = [(RIGHT, "stop"), (WRONG, "stop"), (UNTAGGED, "stop"), (RIGHT, "length")]
    samples = [Sampled(ex, [1], tokenizer.encode(t), t, reason) for t, reason in texts]
    weights = {"accuracy": 1.0, "format": 0.5}
    graded = grade(samples, weights, think_opened=False)
    for s in graded:
        context = {**ex, "think_opened": False}
        fmt = 0.0 if s.truncated else format_reward(s.text, context)
        assert s.rewards == {"accuracy": accuracy_reward(s.text, context), "format": fmt}
        assert s.reward == pytest.approx(s.rewards["accuracy"] + 0.5 * fmt)
    assert [s.reward for s in graded] == [1.5, 0.5, 1.0, 1.0]  # the cut-off right answer loses its format
    assert samples[0].reward == 0.0 and samples[0].rewards == {}  # the inputs are left as they were
    n = [len(s.token_ids) for s in samples]
    shaped = grade(samples, {**weights, "overlong": 2.0}, think_opened=False, max_new_tokens=max(n),
                   overlong_buffer=max(n) - min(n) + 1)
    for plain, s, length in zip(graded, shaped, n):
        penalty = overlong_penalty(length, max(n), max(n) - min(n) + 1)
        assert s.rewards["overlong"] == penalty and s.reward == pytest.approx(plain.reward + 2.0 * penalty)
    assert any(s.rewards["overlong"] < 0 for s in shaped)


def test_sampling_is_reproducible_for_a_seed(tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=256, original_seq_len=256)).eval()
    exs = examples(3)
    engine = sized_engine(model, tokenizer, longest_prompt(tokenizer, exs, R1), 12, max_batch_size=16)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=11)
    runs = [[[s.token_ids for s in g.samples] for g in sample(engine, tokenizer, exs, params, R1)] for _ in range(2)]
    assert runs[0] == runs[1] and len({tuple(t) for group in runs[0] for t in group}) > 1
