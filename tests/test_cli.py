import os
import subprocess
import sys

import pytest

from r1lab.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "r1lab.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_info_v3_reports_published_shape(capsys):
    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "576 values" in out and "32,768" in out
    assert "36.63B" in out  # active per token, within 3% of the reported 37B


def test_info_from_recipe_with_override(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "tiny"\n[model]\nn_layers = 2\n')
    assert main(["info", "--recipe", str(recipe), "--model.n_routed_experts=0"]) == 0
    out = capsys.readouterr().out
    assert "none (dense)" in out


@pytest.mark.parametrize("args, message", [
    (["info", "--model.dim=abc"], "model.dim must be an int"),
    (["info", "--recipe", "/no/such/recipe.toml"], "recipe file not found"),
    (["info", "--preset", "nope"], "unknown preset 'nope'"),
    (["sft", "--run", "/nonexistent/run"], "sft needs data.sft_files"),  # before the matmul peak is measured
])
def test_user_errors_are_one_line_with_exit_code_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("r1lab: error:")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = run_cli("--debug", "info", "--model.dim=abc")
    assert result.returncode != 0 and "Traceback" in result.stderr
