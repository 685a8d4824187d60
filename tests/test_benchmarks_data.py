"""Benchmark loaders on the real files, and accuracy_reward graded on every real gold answer.

The data is read where it lives (R1LAB_DATA_DIR or ../shared/data/benchmarks); tests skip when it
is absent. The sweep logic is `benchmarks/bench_rewards.py`'s own, so the printed table and these
assertions measure the same thing.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from r1lab.tasks.benchmarks import (BenchmarkDataError, BenchmarkNotFoundError, candidate_dirs,
                                    load_benchmark)

REPO = Path(__file__).resolve().parents[1]
DATA = next((d for d in candidate_dirs() if (d / "math500_test.jsonl").is_file()), None)
needs_data = pytest.mark.skipif(DATA is None, reason="benchmark data dir not found "
                                "(set R1LAB_DATA_DIR or place it at ../shared/data/benchmarks)")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_rewards", REPO / "benchmarks" / "bench_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_data
def test_known_benchmarks_load_with_clean_answers():
    sizes = {"gsm8k": 1319, "math500": 500, "aime24": 30, "amc23": 40}
    for name, size in sizes.items():
        examples = load_benchmark(name)
        assert len(examples) == size
        assert all(ex["prompt"] and ex["answer"] and ex["id"] for ex in examples)
        assert len({ex["id"] for ex in examples}) == size
    gsm = load_benchmark("gsm8k")
    assert gsm[0]["answer"] == "18" and all("," not in ex["answer"] for ex in gsm)
    assert all(ex["answer"].lstrip("-").isdigit() for ex in gsm)
    assert "114200" in {ex["answer"] for ex in gsm}  # "114,200" in the file
    math500 = load_benchmark("math500", limit=5)
    assert len(math500) == 5 and math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[0]["subject"] == "Precalculus" and math500[0]["level"] == 2
    assert all(ex["answer"].isdigit() for ex in load_benchmark("aime24"))
    amc = load_benchmark("amc23")
    assert amc[0]["answer"] == "27" and amc[0]["prompt"].startswith("Cities")


def test_jsonl_path_with_field_mapping_and_clear_errors(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"q": "1+1?", "a": 2}) + "\n\n" + json.dumps({"q": "2+2?", "a": 4.0}) + "\n")
    examples = load_benchmark(good, prompt_field="q", answer_field="a")
    assert [(ex["prompt"], ex["answer"], ex["id"]) for ex in examples] == [
        ("1+1?", "2", "mine-1"), ("2+2?", "4", "mine-3")]
    with pytest.raises(BenchmarkDataError, match=r"mine\.jsonl:1: missing field 'prompt'"):
        load_benchmark(good)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"bad\.jsonl:2: missing field 'answer'"):
        load_benchmark(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not valid JSON"):
        load_benchmark(broken)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_benchmark(tmp_path / "missing.jsonl")
    with pytest.raises(BenchmarkNotFoundError, match=str(tmp_path)):
        load_benchmark("gsm8k", data_dir=tmp_path)
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"gsm8k_test\.jsonl:1: .*####"):
        load_benchmark("gsm8k", data_dir=tmp_path)


def _check_rates(golds: list[str]) -> None:
    r = _bench().measure(golds, hostile=False, pairs_per_gold=1)
    for case, (ok, n) in ((k, r[k]) for k in ("gold in <answer>", "gold in \\boxed")):
        assert ok == n, (case, r["failures"][case][:5])
    ok, n = r["wrong pairs rejected"]
    assert n >= 0.9 * len(golds) and ok / n >= 0.99, r["failures"]["wrong pairs rejected"][:5]
    ok, n = r["rewrites accepted"]
    assert n >= len(golds) and ok / n >= 0.98, r["failures"]["rewrites accepted"][:5]


@needs_data
def test_every_real_gold_answer_is_graded_right():
    """All 1819 MATH-500 and GSM8K answers (about 15 s on 2 cores)."""
    for name in ("math500", "gsm8k"):
        _check_rates([ex["answer"] for ex in load_benchmark(name)])


def test_rewrites_are_real_rewrites():
    bench = _bench()
    assert set(bench.rewrites("\\frac{3}{8}")) >= {"\\dfrac{3}{8}", "3/8", "0.375", "x = \\frac{3}{8}"}
    assert set(bench.rewrites("1000")) >= {"1,000", "1000.0", "x = 1000"}
    assert "5" in bench.rewrites("x=5") and "30" in bench.rewrites("30^\\circ")
    assert "Evelyn" in bench.rewrites("\\text{Evelyn}") and "C" in bench.rewrites("\\text{(C)}")
    pairs = bench.wrong_pairs(["1", "1.0", "\\frac{1}{2}", "0.5", "x=1"], per_gold=8)
    assert pairs and all(bench.plain_number(a) != bench.plain_number(b) for a, b in pairs)
    assert ("1", "x=1") not in pairs and ("1", "1.0") not in pairs
