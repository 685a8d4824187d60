"""`r1lab demo --quick`: the whole pipeline end to end, small enough for the default suite."""

import json
import os
import subprocess
import sys

import pytest

from r1lab.cli import main
from r1lab.tasks.benchmarks import load_benchmark


def test_quick_demo_writes_report_summary_plots_and_checkpoints(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--run", str(run), "--cost.peak_gflops=100"]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "r1lab chat --model" in out
    summary = json.loads((run / "summary.json").read_text())
    k = summary["eval"]["k"]
    assert k == 4
    for stage in ("base", "rl", "control"):
        h = summary["heldout"][stage]
        for part in ("greedy", "sampled"):
            for key in ("pass@1", "format_rate", "truncated_share"):
                assert 0 <= h[part][key] <= 1
            assert 0 < h[part]["mean_response_tokens"] <= 48
        assert set(h["sampled"]["pass@k"]) == {"1", "2", "4"}
        curve = [h["sampled"]["pass@k"][j] for j in ("1", "2", "4")]
        assert curve == sorted(curve) and curve[0] == h["sampled"]["pass@1"]  # pass@k never falls with k
        assert 0 <= h["sampled"][f"cons@{k}"] <= 1
        best = h["best"]
        assert best["pass@1"] == max(h["greedy"]["pass@1"], h["sampled"]["pass@1"])
        assert best["decoding"] == ("greedy" if h["greedy"]["pass@1"] >= h["sampled"]["pass@1"] else "sampled")
        assert (run / stage / "checkpoint" / "model.safetensors").exists()
        assert (run / "eval" / stage / "greedy" / "samples.jsonl").exists()
    heldout = load_benchmark(str(run / "heldout.jsonl"))  # what `r1lab eval --bench` reads
    assert len(heldout) == summary["eval"]["problems"] == 8
    graded = (run / "eval" / "rl" / "greedy" / "samples.jsonl").read_text().splitlines()
    assert [ex["prompt"] for ex in heldout] == [json.loads(line)["prompt"] for line in graded]
    for name, v in summary["verdicts"].items():
        assert v["beat"] == (v["margin"] > 0 and v["margin"] > 2 * v["stderr"]), name
    rl_vs_control = summary["verdicts"]["rl_vs_control"]
    assert summary["rl_beats_control"] == rl_vs_control["beat"]
    assert rl_vs_control["margin"] == pytest.approx(summary["heldout"]["rl"]["best"]["pass@1"]
                                                    - summary["heldout"]["control"]["best"]["pass@1"])
    # The control spent the RL stage's FLOPs (to within one of its steps).
    flops = summary["stage_flops"]
    per_step = flops["control"] / summary["control_steps"]
    assert abs(flops["control"] - flops["rl"]) <= per_step / 2 + 1
    assert set(summary["wall_seconds"]) >= {"pretrain", "rl", "control", "eval base", "eval rl", "eval control"}
    assert summary["cost"]["flops"] > 0 and summary["cost"]["dollars"] > 0
    cost = json.loads((run / "cost.json").read_text())
    assert [s["stage"] for s in cost["stages"]][:2] == ["pretrain", "rl"]
    report = (run / "report.md").read_text()
    assert "| R1-Zero (GRPO) |" in report and "| **total** |" in report
    assert ("**RL beat the control**" in report) != ("**RL did not beat the control**" in report)
    assert report.count("<th>base</th><th>RL</th>") == 2  # eval.samples_shown in the quick recipe
    for png in ("pass_at_k.png", "reward_mean.png", "accuracy.png", "response_length_mean.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_mean", "accuracy", "format_rate", "kl", "entropy", "clip_fraction", "all_equal_group_share",
            "rollout_tokens_per_s", "train_tokens_per_s"} <= set(rows[-1])


@pytest.mark.slow
def test_same_seed_same_final_numbers(tmp_path):
    summaries = []
    for name in ("a", "b"):
        run = tmp_path / name
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        subprocess.run([sys.executable, "-m", "r1lab.cli", "demo", "--quick", "--quiet", "--run", str(run),
                        "--cost.peak_gflops=100"], check=True, env=env, timeout=600)
        summary = json.loads((run / "summary.json").read_text())
        heldout = {stage: {k: v for k, v in h.items() if k != "eval_seconds"} for stage, h in summary["heldout"].items()}
        summaries.append((heldout, summary["verdicts"], summary["stage_flops"], summary["control_steps"]))
    assert summaries[0] == summaries[1]


def test_demo_bad_override_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-m", "r1lab.cli", "demo", "--quick", "--run", str(tmp_path),
                             "--grpo.group_size=1"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "group_size must be >= 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
