"""Task families: determinism, disjoint splits, graders that accept gold and reject the invalid."""

import random

import pytest

from r1lab.tasks import FAMILIES, arithmetic, countdown, get_family, linear, sorting
from r1lab.tasks.base import split_of


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_same_seed_same_problems_and_other_seed_differs(name):
    family = FAMILIES[name]
    a = family.generate(20, seed=3, difficulty=2)
    assert a == family.generate(20, seed=3, difficulty=2)
    assert [e["id"] for e in a] != [e["id"] for e in family.generate(20, seed=4, difficulty=2)]
    assert all(e["family"] == name and e["split"] == "train" for e in a)
    assert len({e["id"] for e in a}) == 20


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_verifier_accepts_every_gold_answer_at_every_difficulty(name):
    family = FAMILIES[name]
    for difficulty in range(1, family.MAX_DIFFICULTY + 1):
        for split, n in (("train", 60), ("test", 8)):
            for ex in family.generate(n, seed=1, split=split, difficulty=difficulty):
                assert family.verify(ex["answer"], ex), ex
                assert family.verify(f" \\boxed{{{ex['answer']}}} ", ex), ex
                assert ex["solution"] and ex["prompt"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_train_and_test_splits_never_overlap(name):
    family = FAMILIES[name]
    difficulty = 2
    train, test = set(), set()
    for seed in range(4):
        train |= {e["id"] for e in family.generate(150, seed=seed, split="train", difficulty=difficulty)}
        test |= {e["id"] for e in family.generate(15, seed=seed, split="test", difficulty=difficulty)}
    assert len(test) > 15 and len(train) > 150
    assert not train & test


def test_split_is_a_stable_hash():
    shares = sum(split_of(f"p{i}") == "test" for i in range(20000)) / 20000
    assert 0.08 < shares < 0.12
    # pinned: sha256 gives the same split in every process and Python version, hash() would not
    assert [i for i in range(60) if split_of(f"{i}+{i}") == "test"] == [0, 2, 8, 18, 20, 32, 35, 39, 51, 58]


def test_difficulty_changes_problem_size():
    for d in (1, 3, 5):
        for ex in arithmetic.generate(30, seed=0, difficulty=d):
            assert len(str(ex["a"])) == d or (d == 1 and ex["a"] < 10)
    for d in (1, 2, 3, 4):
        assert all(len(ex["numbers"]) == d + 2 for ex in countdown.generate(20, seed=0, difficulty=d))
    for d in (1, 3, 5):
        assert all(len(ex["items"]) == 2 + 2 * d for ex in sorting.generate(20, seed=0, difficulty=d))
    sizes = [max(abs(int(ex["answer"])) for ex in linear.generate(100, seed=0, difficulty=d)) for d in (1, 2, 3)]
    assert sizes[0] <= 10 < sizes[1] <= 100 < sizes[2]
    assert all(ex["d"] != 0 for ex in linear.generate(20, seed=0, difficulty=3))  # x on both sides


def test_arithmetic_scratchpad_ends_with_a_copyable_answer():
    for ex in arithmetic.generate(200, seed=5, difficulty=3):
        lines = ex["solution"].splitlines()
        assert lines[-1] == f"result: {ex['answer']}"
        assert int(ex["answer"]) == eval(f"{ex['a']}{ex['op']}{ex['b']}")  # trusted test data
    ex = {"a": 478, "b": 356, "op": "+"}
    solution, answer = arithmetic.solution_with_slips(ex, random.Random(0), 0.0)
    assert answer == "834"
    assert "col 1: 8 + 6 = 14, write 4 carry 1 -> 4" in solution
    assert solution.splitlines()[-2].endswith("-> 834")
    _, answer = arithmetic.solution_with_slips({"a": 503, "b": 278, "op": "-"}, random.Random(0), 0.0)
    assert answer == "225"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_slips_give_wrong_answers_that_the_solution_itself_states(name):
    family = FAMILIES[name]
    examples = family.generate(100, seed=2, difficulty=2)
    rng = random.Random(0)
    clean = [family.solution_with_slips(ex, rng, 0.0) for ex in examples]
    assert all(family.verify(ans, ex) for (_, ans), ex in zip(clean, examples, strict=True))
    slipped = [family.solution_with_slips(ex, rng, 0.5) for ex in examples]
    wrong = sum(not family.verify(ans, ex) for (_, ans), ex in zip(slipped, examples, strict=True))
    assert 20 <= wrong < 100
    for solution, ans in slipped:
        assert ans in solution.splitlines()[-1]  # the reasoning commits to the answer it gives


COUNTDOWN = {"family": "countdown", "numbers": [25, 3, 4, 7, 3], "target": 29}


@pytest.mark.parametrize("expr", ["25 + 4", "4 + 25", "(25 + 4)", "25 + 7 - 3", "(25 - 3) + 7",
                                  "7 * 4 + 3 / 3", "(7 - 4) / 3 + 25 + 3", "25 + 4 = 29",
                                  "\\boxed{25+4}", "7 \u00d7 4 + 3 \u00f7 3", " 25+4. "])
def test_countdown_accepts_any_valid_expression(expr):
    assert countdown.verify(expr, COUNTDOWN)


@pytest.mark.parametrize("expr", ["25 + 3", "25 + 4 = 30", "25 + 4 + 4 - 4", "25 + 2 + 2", "7 / (3 - 3) + 25 + 4",
                                  "__import__('os').system('true')", "25 + 4.0", "29", "2 ** 5 - 3",
                                  "-(3 - 7) + 25", "25 + abs(4)", "", "25 +", "(" * 400 + "25" + ")" * 400,
                                  "[25, 4]", "25 + 4 if True else 0", "x = 25 + 4"])
def test_countdown_rejects_invalid_expressions(expr):
    assert not countdown.verify(expr, COUNTDOWN)


def test_countdown_uses_exact_fractions():
    ex = {"numbers": [3, 4, 8], "target": 6}
    assert countdown.verify("8 * 3 / 4", ex)
    assert countdown.verify("3 / 4 * 8", ex)  # 0.75 * 8, exact
    assert countdown.evaluate("1 / 3 * 3", [1, 3, 3]) == 1
    assert countdown.evaluate("4 / (8 - 8)", [4, 8, 8]) is None


def test_other_graders_parse_reasonable_answer_forms():
    lin = {"answer": "-3"}
    assert all(linear.verify(a, lin) for a in ["-3", "x = -3", "x=-3", "-3.0", "-6/2", "$-3$", "\u22123"])
    assert not any(linear.verify(a, lin) for a in ["3", "-3 + 0", "x = -3, y = 1", "", "-3/0"])
    ar = {"answer": "12345"}
    assert all(arithmetic.verify(a, ar) for a in ["12345", "12,345", "12345.0", "\\boxed{12345}"])
    assert not any(arithmetic.verify(a, ar) for a in ["12346", "1234 5x", "12345.5", "twelve"])
    so = {"items": ["pear", "apple", "fig"]}
    assert all(sorting.verify(a, so) for a in ["apple, fig, pear", "[apple, fig, pear]", "Apple Fig Pear",
                                               "'apple', 'fig', 'pear'"])
    assert not any(sorting.verify(a, so) for a in ["fig, apple, pear", "apple, fig", "apple, fig, pear, kiwi"])


def test_registry_and_argument_errors():
    assert get_family("linear") is linear
    with pytest.raises(ValueError, match="arithmetic, countdown, linear, sorting"):
        get_family("chess")
    with pytest.raises(ValueError, match="split"):
        arithmetic.generate(1, seed=0, split="validation")
    with pytest.raises(ValueError, match="difficulty"):
        sorting.generate(1, seed=0, difficulty=sorting.MAX_DIFFICULTY + 1)
    with pytest.raises(ValueError, match="distinct test problems"):
        arithmetic.generate(500, seed=0, split="test", difficulty=1)


def test_carry_slips_forget_carries_and_borrows():
    import random

    from r1lab.tasks import arithmetic

    solution, answer = arithmetic.solution_with_slips({"a": 478, "b": 356, "op": "+"}, random.Random(0), 1.0, kind="carry")
    assert answer == "724" and "carry 1" not in solution  # every carry dropped: 8+6, 7+5, 4+3 without carries
    solution, answer = arithmetic.solution_with_slips({"a": 402, "b": 156, "op": "-"}, random.Random(0), 1.0, kind="carry")
    assert answer == "356" and "borrow 1" not in solution
    clean, answer = arithmetic.solution_with_slips({"a": 478, "b": 356, "op": "+"}, random.Random(0), 0.0, kind="carry")
    assert answer == "834" and "carry 1" in clean
    rates = [arithmetic.solution_with_slips({"a": 999, "b": 1, "op": "+"}, random.Random(s), 0.3, kind="carry")[1] == "1000"
             for s in range(400)]
    assert 0.25 < sum(rates) / 400 < 0.45  # three carries kept with probability 0.7^3 = 0.34


def test_compact_notation_has_the_same_steps_and_answers_in_fewer_characters():
    import random

    from r1lab.tasks import arithmetic

    long = arithmetic.generate(300, seed=3, difficulty=3)
    compact = arithmetic.generate(300, seed=3, difficulty=3, notation="compact")
    for a, b in zip(long, compact, strict=True):
        assert (a["prompt"], a["answer"], a["id"]) == (b["prompt"], b["answer"], b["id"])
        assert len(a["solution"].splitlines()) == len(b["solution"].splitlines())
        assert len(b["solution"]) < 0.6 * len(a["solution"])
        assert b["solution"].splitlines()[-1] == f"={b['answer']}"
    ex = {"a": 478, "b": 356, "op": "+", "notation": "compact"}
    solution, answer = arithmetic.solution_with_slips(ex, random.Random(0), 0.0)
    assert (solution, answer) == ("478+356\n8+6=14 c1 4\n7+5+1=13 c1 34\n4+3+1=8 c0 834\n=834", "834")
    solution, answer = arithmetic.solution_with_slips(ex, random.Random(0), 1.0, kind="carry")
    assert (solution, answer) == ("478+356\n8+6=14 c0 4\n7+5=12 c0 24\n4+3=7 c0 724\n=724", "724")
    for op in "-*":
        for ex in arithmetic.generate(100, seed=1, difficulty=2, ops=(op,), notation="compact"):
            assert arithmetic.solution_with_slips(ex, random.Random(0), 0.0)[1] == ex["answer"]
    with pytest.raises(ValueError, match="notation"):
        arithmetic.generate(3, seed=0, notation="terse")
