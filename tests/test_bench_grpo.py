"""benchmarks/bench_grpo.py's own pieces: both sides see the same prompt ids, and the summary is the
median over the steps after the first with the ratio taken against TRL."""

import pytest
from conftest import bench_module


@pytest.fixture(scope="module")
def bench():
    return bench_module("bench_grpo")


def test_trl_tokenizer_gives_r1lab_prompt_ids(bench, tmp_path, tf):
    from r1lab.tokenizer import R1, Tokenizer, render_prompt

    directory = bench.make_tokenizer(tmp_path / "tok")
    ours, theirs = Tokenizer.load(directory), tf.AutoTokenizer.from_pretrained(directory)
    assert ours.vocab_size <= bench.DENSE.vocab_size
    for ex in bench.pool()[:32]:
        ids = render_prompt(ours, ex["prompt"], R1)
        assert theirs(ours.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_summary_is_the_median_after_the_first_step(bench):
    def run(seconds, longest=64):
        return dict(steps=[dict(seconds=s, rollout=s / 4, tokens=64 * 60, longest=longest) for s in seconds],
                    prompt_len=15, flops_per_token=1e6)

    ours = bench.summarise("r1lab eager", "dense", 64, [run([9.0, 1.0, 3.0]), run([9.0, 2.0, 2.5])], peak=100.0)
    assert ours["seconds"] == 2.25 and ours["first"] == 9.0 and ours["spread"] == "1.00-3.00"
    work = 1e6 * 64 * (15 + 64) * 4 / 1e9  # GFLOP a step: 4 passes over 64 rows of prompt + longest completion
    assert ours["gflops"] == pytest.approx((work / 2 + work / 2.5) / 2)  # the median of the steps' rates
    assert ours["tps"] == pytest.approx((64 * 60 / 2 + 64 * 60 / 2.5) / 2)
    row = bench.format_row(ours, trl_seconds=4.5)
    assert "**2.00x**" in row and "| 2.25 |" in row


def test_ceiling_is_trl_time_over_r1lab_flops_at_the_peak(bench):
    steps = [dict(seconds=s, rollout=0.1, tokens=64 * 60, longest=64) for s in (9.0, 1.0, 1.0)]
    line = bench.ceiling("dense", 64, [dict(steps=steps, prompt_len=15, flops_per_token=1e6)], trl_seconds=4.0,
                         peak=100.0, target=2.0)
    # rollout: 8 prompts once + 3,840 sampled tokens; update: 3 x (8 prompts once + 64 rows x 63 inputs)
    flops = 1e6 * (8 * 15 + 64 * 60) + 3e6 * (8 * 15 + 64 * 63)
    floor = flops / 100e9
    assert f"{flops / 1e9:.1f} GFLOP" in line and f"{floor:.2f} s" in line
    assert f"more than {4.0 / floor:.1f}x" in line and f"needs {100 * 2 * floor / 4.0:.0f}% of the peak" in line
