"""The run's device: names checked, absent devices refused before any work, bf16 autocast only on CUDA."""

import os
import subprocess
import sys
import time

import pytest
import torch

from r1lab import device as device_mod
from r1lab.cli import main
from r1lab.config import ConfigError
from r1lab.device import bf16_autocast, resolve_device
from r1lab.recipe import load_recipe

NO_CUDA = not torch.cuda.is_available()


def test_cpu_resolves_and_bad_names_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("gpu", "cuda:", "cuda:x", "CPU", "tpu", ""):
        with pytest.raises(ConfigError, match="must be cpu, cuda, cuda:N or mps"):
            resolve_device(name)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_absent_cuda_is_a_config_error(name):
    with pytest.raises(ConfigError, match=f"device '{name}': not available on this machine"):
        resolve_device(name)


def test_mps_off_apple_silicon_is_a_config_error():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match="'mps': not available"):
        resolve_device("mps")


def test_bf16_autocast_only_on_cuda_and_only_when_enabled(monkeypatch):
    calls = []
    monkeypatch.setattr(device_mod.torch, "autocast", lambda kind, dtype, enabled: calls.append((kind, dtype, enabled)))
    bf16_autocast(torch.device("cuda", 1), True)
    bf16_autocast(torch.device("cuda"), False)
    bf16_autocast(torch.device("cpu"), True)
    assert calls == [("cuda", torch.bfloat16, True), ("cuda", torch.bfloat16, False), ("cpu", torch.bfloat16, False)]


def test_training_on_cpu_stays_float32_with_the_default_recipe():
    recipe = load_recipe(None)
    assert recipe.device == "cpu" and recipe.pretrain.bf16_autocast and recipe.grpo.bf16_autocast
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with bf16_autocast(resolve_device(recipe.device), recipe.pretrain.bf16_autocast):
        assert (a @ b).dtype == torch.float32


def test_recipe_device_is_checked_and_overridable(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('device = "cuda:1"\n')
    assert load_recipe(path).device == "cuda:1"  # the form only: whether it exists is the stage's question
    assert load_recipe(path, ["--device=cpu"]).device == "cpu"
    path.write_text('device = "gpu0"\n')
    with pytest.raises(ConfigError, match="device must be cpu, cuda, cuda:N or mps, got 'gpu0'"):
        load_recipe(path)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [
    ["pretrain", "--run", "{run}"],
    ["sft", "--run", "{run}", "--data.sft_files=[\"x.jsonl\"]", "--sft.init_from=nowhere"],
    ["grpo", "--run", "{run}"],
    ["demo", "--quick", "--run", "{run}"],
    ["eval", "--model", "{run}", "--bench", "gsm8k"],
    ["serve", "--model", "{run}"],
    ["chat", "--model", "{run}"],
])
def test_absent_device_fails_every_command_in_one_line_before_any_work(tmp_path, capsys, argv):
    run = tmp_path / "run"
    start = time.perf_counter()
    code = main([a.replace("{run}", str(run)) for a in argv] + ["--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("r1lab: error:") and "'cuda': not available on this machine" in err
    assert len(err.strip().splitlines()) == 1
    assert not run.exists()  # nothing written: no recipe.toml, no tokenizer, no peak measured
    assert time.perf_counter() - start < 5


def test_absent_device_from_the_command_line_process():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "r1lab.cli", "pretrain", "--device", "tpu"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        "r1lab: error: device must be cpu, cuda, cuda:N or mps, got 'tpu'")
