"""Rewards and answer checking: extraction policy, equivalence, time limits, batch error handling."""

import math
import multiprocessing
import time

import pytest

from r1lab import mathcheck
from r1lab.mathcheck import CheckTimeout, MathChecker, answers_equal, extract_answer, normalize
from r1lab.rewards import (accuracy_reward, chain_of_thought, code_reward, code_tests, extract_code, format_reward,
                           language_consistency_reward, overlong_penalty, score_batch, values_equal)


@pytest.mark.parametrize("text, want", [
    ("<think>so 3</think> <answer>7</answer>", "7"),
    ("<answer>1</answer> later <answer> $\\frac{1}{2}$ </answer>", "\\frac{1}{2}"),
    ("<answer>The result is \\boxed{\\{1, 2\\}}.</answer>", "\\{1, 2\\}"),
    ("we get \\boxed{\\frac{\\sqrt{3}}{2}} and then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
     "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\fbox{42} is it", "42"),
    ("\\boxed 5", "5"),
    ("unclosed \\boxed{7 and then 12", "12"),
    ("costs 1,234 dollars, or -3.5 per day", "-3.5"),
    ("ratio is 7/2", "7/2"),
    ("<answer>open but never closed", None),
    ("no answer here", None),
    ("<answer>   </answer>", None),
])
def test_extraction_policy(text, want):
    assert extract_answer(text) == want


def test_extraction_is_linear_on_hostile_text():
    t0 = time.perf_counter()
    for text in ("<answer>" * 50_000, "\\boxed{" * 50_000, "1," * 100_000, "{" * 100_000 + "\\boxed{"):
        extract_answer(text)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("pred, gold", [
    ("1,000", "1000"), ("1000", "1,000"), ("10,080", "10,\\!080"), ("x = 5", "5"), ("5", "x=5"),
    ("0.5", "\\frac12"), ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("1/2", "\\frac{1}{2}"), ("0.75", "\\tfrac34"),
    ("30", "30^\\circ"), ("30^{\\circ}", "30^\\circ"), ("Evelyn", "\\text{Evelyn}"), ("C", "\\text{(C)}"),
    ("(C)", "\\text{(C)}"), ("\\$18.90", "18.90"), ("18.9", "\\$18.90"), ("5.4", "5.4 \\text{ cents}"),
    ("\\frac{\\pi}{2}", "\\pi/2"), ("2\\sqrt{5}", "\\sqrt{20}"), ("11\\sqrt{2}", "11\\sqrt2"),
    ("(2, \\infty)", "(2,\\infty)"), ("[-2, 7]", "x \\in [-2,7]"), ("(-\\infty,0]", "(-\\infty, 0]"),
    ("7, 5, 3", "3, 5, 7"),
    ("\\begin{pmatrix} 0.2 \\\\ -3.6 \\end{pmatrix}", "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}"),
    ("-q + p", "p - q"), ("25\\%", "25"), ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
    ("1.8", "1\\frac{4}{5}"), ("0.333333", "\\frac{1}{3}"), ("y = 2x+3", "y = 2x + 3"),
])
def test_equivalent_answers_are_equal(pred, gold):
    assert answers_equal(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("1001", "1000"), ("0.33", "\\frac{1}{3}"), ("-5", "5"), ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("B", "\\text{(C)}"), ("3", "\\text{(C)}"), ("Nelyve", "\\text{Evelyn}"), ("(2, \\infty)", "[2,\\infty)"),
    ("\\sqrt{3}", "\\sqrt{2}"), ("3, 5", "3, 5, 7"), ("\\pi", "3.14159"), ("x = 6", "5"), ("", "5"),
    ("\\frac{1}{0}", "5"), ("}{", "\\frac{1}{2}"),
])
def test_different_answers_are_not_equal(pred, gold):
    assert not answers_equal(pred, gold)


def test_normalize_makes_cheap_cases_certain():
    assert normalize("\\left( 1, \\dfrac{3}{4} \\right)") == normalize("(1,\\frac{3}{4})")
    assert mathcheck.quick_equal("12", "13") is False  # two plain numbers: decided in-process
    assert mathcheck.quick_equal("\\sqrt{20}", "2\\sqrt{5}") is None  # needs the worker


def test_hostile_answers_time_out_and_the_checker_recovers():
    checker = MathChecker(timeout=1.0)
    try:
        assert checker.check("1/2", "\\frac{1}{2}")
        for hostile in ("9^{9^{9^{9}}}", "(10^{10})!"):
            t0 = time.monotonic()
            with pytest.raises(CheckTimeout):
                checker.check(hostile, "5")
            assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        assert checker.check("\\sqrt{8}", "2\\sqrt{2}")  # the warm spare answers at once
        assert time.monotonic() - t0 < 1.0
        assert checker.restarts == 2
    finally:
        checker.close()


def test_accuracy_reward_scores_a_hang_as_zero_within_the_limit():
    t0 = time.monotonic()
    assert accuracy_reward("<answer>10^{10^{10}}</answer>", {"answer": "5"}) == 0.0
    assert time.monotonic() - t0 < mathcheck.DEFAULT_TIMEOUT + 1.0
    assert accuracy_reward("<answer>\\frac{\\sqrt{8}}{2}</answer>", {"answer": "\\sqrt{2}"}) == 1.0


def _heavy_check_in_child(queue):
    queue.put(answers_equal("\\sqrt{8}", "2\\sqrt{2}"))


def test_a_forked_child_gets_its_own_worker():
    assert answers_equal("\\sqrt{12}", "2\\sqrt{3}")  # the parent's worker is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_heavy_check_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) is True
    child.join(10)
    assert child.exitcode == 0
    assert answers_equal("\\sqrt{18}", "3\\sqrt{2}")  # and the parent's still works


def test_accuracy_reward_uses_the_family_grader_for_task_examples():
    ex = {"family": "countdown", "numbers": [25, 4, 3], "target": 29, "answer": "25 + 4"}
    assert accuracy_reward("<think>x</think><answer>4 + 25</answer>", ex) == 1.0
    assert accuracy_reward("<think>x</think><answer>29</answer>", ex) == 0.0
    assert accuracy_reward("no tags, the answer is \\boxed{25 + 4}", ex) == 1.0
    assert accuracy_reward("nothing at all", ex) == 0.0
    assert accuracy_reward("<answer>" + "1" * 5000 + "</answer>", {"answer": "1"}) == 0.0


@pytest.mark.parametrize("completion, opened, want", [
    ("<think>a</think><answer>5</answer>", False, 1.0),
    ("  <think>\nlong\nthought\n</think>\n\n<answer> 5 </answer>\n", False, 1.0),
    ("\nthought</think> <answer>5</answer>", True, 1.0),
    ("<think>a</think><answer>5</answer>", True, 0.0),  # a second <think>
    ("thought</think> <answer>5</answer>", False, 0.0),
    ("<think>a</think> x <answer>5</answer>", False, 0.0),
    ("<think>a</think><answer>5</answer> trailing", False, 0.0),
    ("<think>a</think><answer>5</answer><answer>6</answer>", False, 0.0),
    ("<think>a</think><answer> </answer>", False, 0.0),
    ("<answer>5</answer><think>a</think>", False, 0.0),
    ("hello <think>a</think><answer>5</answer>", False, 0.0),
    ("<think>a<think>b</think><answer>5</answer>", False, 0.0),
])
def test_format_reward(completion, opened, want):
    assert format_reward(completion, {}, think_opened=opened) == want
    assert format_reward(completion, {"think_opened": opened}) == want


def test_language_consistency_reward():
    en = {"language": "en"}
    assert language_consistency_reward("<think>We add the two numbers.</think><answer>5</answer>", en) == 1.0
    mixed = "<think>We add 两个数 then check</think><answer>5</answer>"
    assert language_consistency_reward(mixed, en) == pytest.approx(4 / 7)  # 4 words, 3 ideographs
    assert language_consistency_reward(mixed, {"language": "zh"}) == pytest.approx(3 / 7)
    assert language_consistency_reward("<think>\\frac{a}{b} = x + 2</think>", en) == 0.0  # no units
    assert language_consistency_reward("<think>我们先把两个数相加</think>", {"language": "zh"}) == 1.0
    assert chain_of_thought("opened already</think><answer>1</answer>") == "opened already"
    with pytest.raises(ValueError, match="klingon"):
        language_consistency_reward("<think>hi there</think>", {"language": "klingon"})


def test_overlong_penalty_is_dapo_shaping():
    assert [overlong_penalty(n, 100, 20) for n in (0, 80, 90, 95, 100, 150)] == [0.0, 0.0, -0.5, -0.75, -1.0, -1.0]
    with pytest.raises(ValueError):
        overlong_penalty(10, 100, 0)


def test_score_batch_reports_a_failing_reward_and_carries_on():
    def broken(completion, example):
        raise RuntimeError("boom")

    def not_a_number(completion, example):
        return math.nan

    completions = ["<think>a</think><answer>5</answer>", "<answer>4</answer>"]
    examples = [{"answer": "5"}, {"answer": "5"}]
    out = score_batch([(accuracy_reward, 1.0), (format_reward, 0.5), (broken, 1.0), (not_a_number, 1.0)],
                      completions, examples)
    assert out.totals == [1.5, 0.0]
    assert out.per_function["accuracy_reward"] == [1.0, 0.0]
    assert out.per_function["broken"] == [0.0, 0.0]
    assert [(i, name) for i, name, _ in out.errors] == [(0, "broken"), (1, "broken"),
                                                        (0, "not_a_number"), (1, "not_a_number")]
    assert "boom" in out.errors[0][2]
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        score_batch([(format_reward, 1.0)], completions, examples[:1])


def test_code_extraction_and_reward():
    fenced = "<think>plan</think>\n<answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>"
    assert extract_code(fenced).strip() == "def add(a, b):\n    return a + b"
    assert extract_code("<answer>def f(): return 1</answer>") == "def f(): return 1"
    assert extract_code("no code") is None
    tests = ["assert add(1, 2) == 3", {"call": "add(-1, 1)", "expected": 0}]
    assert code_reward(fenced, {"tests": tests}) == 1.0
    half = fenced.replace("a + b", "a + b if a > 0 else 7")
    assert code_reward(half, {"tests": tests}) == 0.5
    io_program = "<answer>```python\nprint(sum(map(int, input().split())))\n```</answer>"
    cases = [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10\n"}, {"input": "1 1", "output": "3"}]
    assert code_reward(io_program, {"tests": cases}) == pytest.approx(2 / 3)
    failing_exit = io_program.replace("\n```", "\nraise SystemExit(4)\n```")  # right output, failed run
    assert code_reward(failing_exit, {"tests": cases[:1]}) == 0.0
    assert code_reward("no code", {"tests": tests}) == 0.0
    tuples = "```python\ndef pair(x):\n    return (x, [x])\n```"
    assert code_reward(tuples, {"tests": ["assert pair(2) == (2, [2])", "assert (3, [3]) == pair(3)"]}) == 1.0


def test_code_tests_format():
    calls, cases = code_tests(["assert f(1, 'a') == [1, (2, None)]", "assert -3 == g ( )",
                               {"call": "h()", "expected": {"k": (1.5, True)}}, {"input": 1, "output": "2"}])
    assert calls == [("f(1, 'a')", [1, [2, None]]), ("g()", -3), ("h()", {"k": [1.5, True]})]
    assert cases == [("1", "2")]
    for bad, message in [("assert f(1)", "is not of the form"), ("import os", "is not of the form"),
                         ("assert f(1) == 2; import os", "is not of the form"),
                         ("assert f(1) != 2", "is not of the form"), ("assert 1 == 1", "one expression"),
                         ("assert f(1) == g(1)", "one literal"), ("assert f(", "is not Python"),
                         ({"call": "f(", "expected": 1}, "not a Python expression"),
                         ({"call": "f()", "expected": {1, 2}}, "not plain data: set"),
                         ({"call": "f()"}, "is none of"), (7, "is none of")]:
        with pytest.raises(ValueError, match=message):
            code_tests([bad])


def test_values_equal_is_plain_and_strict():
    assert values_equal([1, {"a": 2.0}], [1.0, {"a": 2}])
    assert not values_equal(True, 1) and not values_equal(0, False) and values_equal(False, False)
    assert not values_equal([1, 2], [1, 2, 3]) and not values_equal({"a": 1}, {"a": 1, "b": 2})
    assert not values_equal("1", 1) and not values_equal(None, 0) and not values_equal(float("nan"), float("nan"))
    assert not values_equal([[1]], [[2]]) and values_equal(None, None)
