"""The code task family graded by the sandbox: right programs score 1, wrong and hostile ones 0,
the gold program really passes its tests, and GRPO accepts `code` as a reward."""

import random
import threading
from pathlib import Path

import pytest

from r1lab import rewards
from r1lab.config import ConfigError
from r1lab.recipe import GRPOConfig, load_recipe
from r1lab.rewards import REWARD_FUNCTIONS, accuracy_reward, code_reward, score_batch
from r1lab.tasks import code
from r1lab.tasks.base import completion_text

RECIPE = Path(code.__file__).parents[1] / "recipes" / "code-tiny.toml"


def answer(program: str) -> str:
    return completion_text("write it", program)


def trusted_share(program: str, example: dict) -> float:
    """The share of tests a program this module wrote passes, run here: the program is our own
    text (a slip of the family's generator), never a model's."""
    scope: dict = {}
    exec(program, scope)  # noqa: S102 - trusted test data
    passed = 0
    for test in example["tests"]:
        try:
            passed += eval(test["call"], scope) == test["expected"]  # noqa: S307 - trusted test data
        except Exception:  # noqa: BLE001 - a slip may fail on an input (max of an empty list)
            pass
    return passed / len(example["tests"])


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return [ex for d in range(1, code.MAX_DIFFICULTY + 1) for kind in code.KINDS
            for ex in code.generate(2, seed=7, split="test", difficulty=d, kinds=(kind,))]


def test_gold_programs_pass_their_tests_in_the_sandbox(examples):
    scored = score_batch([(code_reward, 1.0)], [answer(ex["answer"]) for ex in examples], examples)
    assert scored.totals == [1.0] * len(examples), [ex["answer"] for ex, s in zip(examples, scored.totals) if s != 1]
    assert not scored.errors


def test_a_right_program_written_differently_is_run_and_passes(examples, monkeypatch):
    runs = []
    monkeypatch.setattr(code, "run_python", lambda *a, **kw: runs.append(a[0]) or real_run(*a, **kw))
    ex = examples[0]
    body = ex["answer"].split(": return ", 1)[1]
    arg = ex["answer"][len("def f("):ex["answer"].index(")")]
    rewritten = f"def f({arg}):\n    result = {body}\n    return result\n"
    assert code.verify(rewritten, ex) and runs == [rewritten.strip()]
    assert code.verify(f"```python\n{rewritten}```", ex)
    assert accuracy_reward(answer(ex["answer"]), ex) == 1.0
    assert code.verify(f"\\boxed{{{ex['answer']}}}", ex) and len(runs) == 2  # the gold tree: no run


real_run = code.run_python


def test_slipped_programs_fail_and_earn_their_share_of_the_tests():
    rng = random.Random(0)
    checked = 0
    for ex in code.generate(40, seed=3, difficulty=1):
        _, program = code.solution_with_slips(ex, rng, 1.0, kind="operator")
        share = trusted_share(program, ex)
        if share == 1.0:  # a slip that happens to agree on every input (rare)
            continue
        assert code_reward(answer(program), ex) == pytest.approx(share)
        assert accuracy_reward(answer(program), ex) == 0.0
        checked += 1
        if checked == 6:
            break
    assert checked == 6
    ex = code.generate(1, seed=0)[0]
    assert code_reward(answer("def f(x): return 'no'"), ex) == 0.0  # a wrong program: reward 0
    assert code_reward(answer("def f(xs): return 'no'"), ex) == 0.0


HOSTILE = [
    "class Yes:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Yes()\n",
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "def f(x):\n    raise SystemExit(0)\n",
    "print('all tests passed')\n",
    "import builtins\nbuiltins.isinstance = lambda *a: True\ndef f(x):\n    return float('nan')\n",
    "def f(x):\n    while True:\n        pass\n",
]


@pytest.mark.parametrize("program", HOSTILE)
def test_hostile_programs_score_zero(program):
    ex = {**code.generate(1, seed=0)[0], "timeout": 1.0}
    assert code_reward(answer(program), ex) == 0.0
    assert not code.verify(program, ex)


def test_graders_never_run_the_answer_in_this_process(tmp_path):
    marker = tmp_path / "ran-here"
    program = f"open({str(marker)!r}, 'w').write('x')\ndef f(x):\n    return x\n"
    ex = code.generate(1, seed=0)[0]
    assert not code.verify(program, ex)
    assert accuracy_reward(answer(program), ex) == 0.0 and code_reward(answer(program), ex) == 0.0
    assert not marker.exists()  # the sandbox's /tmp is its own and `/` is read-only there


def test_a_batch_runs_each_distinct_program_once_and_several_at_a_time(monkeypatch):
    ex = code.generate(1, seed=0, kinds=("int",))[0]
    slow = "import time\ntime.sleep(0.3)\n" + ex["answer"]
    programs = [ex["answer"], slow, ex["answer"], "def f(x): return 0", slow, "def f(x): return x",
                "def f(x): return x", "def f(x): return 1"]
    active, peak, runs, lock = [0], [0], [], threading.Lock()

    def counting_run(source, *args, **kwargs):
        with lock:
            runs.append(source)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real_reward_run(source, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(rewards, "run_python", counting_run)
    texts = [answer(p) for p in programs]
    exs = [dict(ex) for _ in programs]
    batch = score_batch([(code_reward, 1.0)], texts, exs)
    assert sorted(runs) == sorted(set(programs))
    assert peak[0] >= 2
    runs.clear()
    one_by_one = score_batch([(code_reward, 1.0)], texts, exs, workers=1)
    assert len(runs) == len(programs) and one_by_one.totals == batch.totals
    assert batch.totals[:3] == [1.0, 1.0, 1.0] and batch.totals[3] < 1.0


real_reward_run = rewards.run_python


def test_a_failing_grader_scores_zero_for_every_copy_in_a_batch():
    ex = code.generate(1, seed=0)[0]
    broken = {**ex, "tests": [{"call": "f(", "expected": 1}]}
    scored = score_batch([(code_reward, 1.0)], [answer(ex["answer"])] * 3, [ex, broken, broken])
    assert scored.totals == [1.0, 0.0, 0.0]
    assert [i for i, _, _ in scored.errors] == [1, 2] and "not a Python expression" in scored.errors[0][2]


def test_grpo_takes_code_as_a_reward_and_the_recipe_uses_it():
    from r1lab.sampling import Sampled, grade

    ex = code.generate(1, seed=0)[0]
    texts = [answer(ex["answer"]), answer("def f(x): return 'no'"), "<answer>" + ex["answer"]]
    samples = [Sampled(ex, [], [0] * 10, text, reason) for text, reason in zip(texts, ["stop", "stop", "length"])]
    graded = grade(samples, GRPOConfig(reward_weights={"code": 1.0, "format": 0.5}).reward_weights, think_opened=False)
    assert [s.rewards["code"] for s in graded] == [1.0, 0.0, 0.0]
    assert [s.rewards["format"] for s in graded] == [1.0, 1.0, 0.0]
    assert [s.reward for s in graded] == [1.5, 0.5, 0.0]
    recipe = load_recipe(RECIPE)
    assert recipe.data.task == "code" and recipe.grpo.reward_weights == {"code": 1.0, "format": 0.5}


def test_a_code_reward_weight_passes_recipe_checks_for_the_code_family_only():
    assert REWARD_FUNCTIONS["code"] is code_reward
    weights = "--grpo.reward_weights={code = 1.0}"
    recipe = load_recipe(None, ["--data.task=code", '--data.task_options={kinds = ["list"]}', weights])
    assert recipe.grpo.reward_weights == {"code": 1.0}
    with pytest.raises(ConfigError, match="data.task 'arithmetic' has none"):
        load_recipe(None, ["--data.task=arithmetic", weights])
