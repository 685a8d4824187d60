"""`r1lab demo --quick`: the whole pipeline end to end, small enough for the default suite."""

import json
import os
import subprocess
import sys

import pytest

from r1lab.cli import main


def test_quick_demo_writes_report_summary_plots_and_checkpoints(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--run", str(run), "--cost.peak_gflops=100"]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "r1lab chat --model" in out
    summary = json.loads((run / "summary.json").read_text())
    for stage in ("base", "rl", "control"):
        h = summary["heldout"][stage]
        for key in ("pass@1", "cons@2", "format_rate", "mean_response_tokens", "scratchpad_share"):
            assert 0 <= h[key] <= (1 if key != "mean_response_tokens" else 48)
        assert (run / stage / "checkpoint" / "model.safetensors").exists()
    assert set(summary["wall_seconds"]) >= {"pretrain", "rl", "control", "eval base", "eval rl", "eval control"}
    assert summary["cost"]["flops"] > 0 and summary["cost"]["dollars"] > 0
    cost = json.loads((run / "cost.json").read_text())
    assert [s["stage"] for s in cost["stages"]][:2] == ["pretrain", "rl"]
    report = (run / "report.md").read_text()
    assert "| R1-Zero (GRPO) |" in report and "| **total** |" in report
    assert ("RL beat the control" in report) != ("RL did not beat the control" in report)
    for png in ("reward_mean.png", "accuracy.png", "response_length_mean.png"):
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
        heldout = json.loads((run / "summary.json").read_text())["heldout"]
        summaries.append({stage: {k: v for k, v in h.items() if k != "eval_seconds"} for stage, h in heldout.items()})
    assert summaries[0] == summaries[1]


def test_demo_bad_override_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-m", "r1lab.cli", "demo", "--quick", "--run", str(tmp_path),
                             "--grpo.group_size=1"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "group_size must be >= 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
