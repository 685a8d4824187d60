"""benchmarks/bench_pretrain.py's profile: its phases cover the step, and the products' share it reports is
the sum of the matrix-product operators' own time, next to the counted FLOPs at the given peak."""

import re

import pytest
from conftest import bench_module


@pytest.fixture(scope="module")
def bench():
    return bench_module("bench_pretrain")


def test_profile_accounts_for_the_step(bench):
    from r1lab.config import model_preset
    from r1lab.cost import train_flops_per_token

    text = bench.profile("tiny", peak=100.0, warmup=1)
    step = float(re.search(r"one eager step (\d+) ms", text).group(1))
    phases = {m[0]: float(m[1]) for m in re.findall(r"\| pretrain\.(\w+) \| (\d+) \|", text)}
    assert set(phases) == {"forward", "backward", "optimizer"}
    assert 0.8 * step <= sum(phases.values()) <= 1.05 * step + 3
    products, total, at_peak = map(float, re.search(
        r"took (\d+) ms of the (\d+) ms step \(\d+%\); the step's counted FLOPs take (\d+) ms", text).groups())
    assert total == step and 0 < products < total
    batch, seq_len = bench.SHAPES["tiny"]
    flops = train_flops_per_token(model_preset("tiny"), seq_len) * batch * seq_len
    assert at_peak == pytest.approx(flops / 100e9 * 1e3, abs=1)
    mm = float(re.search(r"\| aten::mm \| ([\d.]+) \|", text).group(1))
    assert mm <= products + 1
