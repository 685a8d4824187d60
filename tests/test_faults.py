"""Faults: `r1lab pretrain` and `r1lab grpo` killed with SIGKILL at seeded random points (and inside a
checkpoint save), then resumed until done, end with the metrics and the weights of a run that was
never interrupted, bit for bit; a disk that fills up during a save gives one line, exit 2, and
leaves the previous checkpoint whole.

The commands run as subprocesses of a small launcher that can hold the N-th checkpoint save at a
chosen point (weights written but nothing else, or the old checkpoint moved aside but the new one
not yet in place) and announce it, so a kill lands there for certain.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from r1lab import checkpoint
from r1lab.checkpoint import read_trainer_state
from r1lab.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = """preset = "tiny"
[model]
dim = 64
n_layers = 2
n_dense_layers = 1
n_heads = 2
inter_dim = 128
moe_inter_dim = 32
kv_lora_rank = 32
qk_nope_head_dim = 16
qk_rope_head_dim = 8
v_head_dim = 16
n_routed_experts = 4
n_activated_experts = 2
max_seq_len = 192
original_seq_len = 192
vocab_size = 400
[data]
vocab_size = 400
n_problems = 300
difficulty = 2
seq_len = 48
slip_rate = 0.3
template = "r1"
task_options = {ops = ["+"]}
slip_options = {kind = "carry"}
[pretrain]
steps = 6
batch_size = 2
log_every = 1
eval_every = 3
eval_batches = 1
save_every = 2
[grpo]
steps = 5
prompts_per_step = 2
group_size = 3
max_new_tokens = 12
minibatch_size = 3
save_every = 1
[grpo.optim]
lr = 1e-3
[cost]
peak_gflops = 100
"""
# Wall-clock figures differ between any two runs; everything else must not.
TIMING = {"tokens_per_s", "mfu", "seconds", "step_seconds", "rollout_tokens_per_s", "train_tokens_per_s"}

LAUNCHER = """
import os, sys, time
from pathlib import Path

hold = os.environ.get("FAULT_HOLD")  # "write:N" or "swap:N": the N-th save of this process stops there
if hold:
    from r1lab import checkpoint
    where, nth = hold.split(":")
    saves = []

    def stop_here():
        Path(os.environ["FAULT_MARKER"]).write_text(where)
        while True:
            time.sleep(1)

    if where == "write":  # the weights are in the temp dir; config and trainer state are not
        real_save_file = checkpoint.save_file
        def save_file(*args, **kwargs):
            real_save_file(*args, **kwargs)
            saves.append(1)
            if len(saves) == int(nth):
                stop_here()
        checkpoint.save_file = save_file
    if where == "swap":  # the old checkpoint is moved aside, the complete new one not yet in its place
        real_rename = checkpoint.os.rename
        def rename(src, dst):
            if ".tmp-" in str(src) and ".checkpoint" in str(src):
                saves.append(1)
                if len(saves) == int(nth):
                    stop_here()
            real_rename(src, dst)
        checkpoint.os.rename = rename

from r1lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(tmp: Path, command: str, run: Path, hold: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAULT_MARKER": str(tmp / "held")}
    if hold:
        env["FAULT_HOLD"] = hold
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, command, "--recipe", str(tmp / "tiny.toml"),
                             "--run", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(tmp: Path, command: str, run: Path) -> None:
    proc = launch(tmp, command, run)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def logged_steps(metrics: Path) -> int:
    """The last step with a whole line in metrics.jsonl (0 when none)."""
    if not metrics.exists():
        return 0
    lines = metrics.read_text().split("\n")[:-1]
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def kill_after(proc: subprocess.Popen, metrics: Path, step: int, delay: float) -> bool:
    """SIGKILL `proc` `delay` seconds after metrics.jsonl reaches `step`; False if it finished first.

    Rows an earlier, killed process wrote past its checkpoint are still there until this one drops
    them, so the step waited for is past them."""
    step = max(step, logged_steps(metrics) + 1)
    while logged_steps(metrics) < step:
        if exited(proc):
            return False
        time.sleep(0.02)
    time.sleep(delay)
    return kill(proc)


def step_seconds(metrics: Path) -> float:
    """The longest step of an uninterrupted run: a random delay below it lands before the run ends."""
    seconds = [0.0] + [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]  # cumulative
    return max(b - a for a, b in zip(seconds, seconds[1:]))


def kill_when_held(proc: subprocess.Popen, marker: Path) -> bool:
    while not marker.exists():
        if exited(proc):
            return False
        time.sleep(0.02)
    marker.unlink()
    return kill(proc)


def exited(proc: subprocess.Popen) -> bool:
    """True when `proc` ended by itself, which it may only do by finishing the run."""
    if proc.poll() is None:
        return False
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return True


def kill(proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode == -signal.SIGKILL


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics rows (wall-clock figures aside), same weights and optimizer state, bit for bit."""
    rows_a, rows_b = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in rb.items() if k not in TIMING} == {k: v for k, v in ra.items() if k not in TIMING}
    wa, wb = (load_file(d / "checkpoint" / "model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].numpy().tobytes() == wb[name].numpy().tobytes(), name
    sa, sb = (read_trainer_state(d / "checkpoint") for d in (a, b))
    assert (sa["step"], sa["done"]) == (sb["step"], sb["done"])
    for (i, ma), mb in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].values()):
        for key in ma:
            assert ma[key].numpy().tobytes() == mb[key].numpy().tobytes(), (i, key)
    assert [p.name for p in b.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted pretraining and GRPO run of the tiny recipe."""
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "tiny.toml").write_text(TINY)
    finish(tmp, "pretrain", tmp / "ref")
    finish(tmp, "grpo", tmp / "ref")
    return tmp


def test_pretraining_killed_anywhere_resumes_bit_identically(reference):
    tmp, run = reference, reference / "killed-pretrain"
    rng = random.Random(20240607)
    metrics = run / "base" / "metrics.jsonl"
    kills = []
    # A kill with the weights of the run's first checkpoint half written (so there is none yet),
    # then one at a random point.
    if kill_when_held(launch(tmp, "pretrain", run, hold="write:1"), tmp / "held"):
        kills.append("mid-save")
        assert [p.name[:16] for p in (run / "base").iterdir() if p.name != "metrics.jsonl"] == [".checkpoint.tmp-"]
    delay = rng.uniform(0.0, step_seconds(tmp / "ref" / "base" / "metrics.jsonl"))
    if kill_after(launch(tmp, "pretrain", run), metrics, rng.randint(1, 4), delay):
        kills.append("random")
    assert kills == ["mid-save", "random"], kills  # the run did not outpace a kill
    finish(tmp, "pretrain", run)
    assert_same_run(tmp / "ref" / "base", run / "base")


def test_grpo_killed_anywhere_resumes_bit_identically(reference):
    tmp, run = reference, reference / "killed-grpo"
    shutil.copytree(tmp / "ref" / "base", run / "base")
    shutil.copytree(tmp / "ref" / "tokenizer", run / "tokenizer")
    rng = random.Random(7)
    metrics = run / "rl" / "metrics.jsonl"
    kills = []
    # A kill with the step-1 checkpoint moved aside and the step-2 one not yet in its place, then one
    # at a random point of the resumed run (a delay within one step, so the run cannot outpace it).
    if kill_when_held(launch(tmp, "grpo", run, hold="swap:2"), tmp / "held"):
        kills.append("between the renames")
        assert not (run / "rl" / "checkpoint").exists()  # the old one is aside, the new one not yet in place
    delay = rng.uniform(0.0, step_seconds(tmp / "ref" / "rl" / "metrics.jsonl"))
    if kill_after(launch(tmp, "grpo", run), metrics, rng.randint(1, 3), delay):
        kills.append("random")
    assert kills == ["between the renames", "random"], kills
    finish(tmp, "grpo", run)
    assert_same_run(tmp / "ref" / "rl", run / "rl")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pretraining_killed_many_times_resumes_bit_identically(reference, seed):
    tmp, run = reference, reference / f"many-{seed}"
    rng = random.Random(seed)
    kills = kill_repeatedly(tmp, "pretrain", run, run / "base" / "metrics.jsonl", rng, sorted(rng.sample(range(1, 6), 4)))
    assert len(kills) >= 3, kills
    finish(tmp, "pretrain", run)
    assert_same_run(tmp / "ref" / "base", run / "base")


@pytest.mark.slow
def test_grpo_killed_many_times_resumes_bit_identically(reference):
    tmp, run = reference, reference / "many-grpo"
    shutil.copytree(tmp / "ref" / "base", run / "base")
    shutil.copytree(tmp / "ref" / "tokenizer", run / "tokenizer")
    kills = kill_repeatedly(tmp, "grpo", run, run / "rl" / "metrics.jsonl", random.Random(11), [1, 1, 2, 2])
    assert len(kills) >= 3, kills
    finish(tmp, "grpo", run)
    assert_same_run(tmp / "ref" / "rl", run / "rl")


def kill_repeatedly(tmp: Path, command: str, run: Path, metrics: Path, rng: random.Random, targets: list[int]) -> list:
    """One launch per target: held in a save (write or swap) or killed after that step, as `rng` picks.

    A kill after a step waits a random part of the reference run's longest step: a fixed delay let a
    fast machine finish the whole run before the kill, leaving the later launches nothing to hold."""
    kills = []
    longest = step_seconds(tmp / "ref" / metrics.parent.name / "metrics.jsonl")
    for target in targets:
        hold = rng.choice([None, "write:1", "swap:1"])
        proc = launch(tmp, command, run, hold=hold)
        if kill_when_held(proc, tmp / "held") if hold else kill_after(proc, metrics, target, rng.uniform(0.0, longest)):
            kills.append(hold or f"after step {target}")
    return kills


def test_a_torn_metrics_line_and_rows_past_the_checkpoint_are_dropped(tmp_path):
    from r1lab.train.common import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    log = MetricsLog(path, resume_step=2)
    log.log(3, {"loss": 1.25})
    log.close()
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}]
    assert [p.name for p in tmp_path.iterdir() if p.name != "tensorboard"] == ["metrics.jsonl"]


def test_disk_full_during_a_save_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """The writer fails with ENOSPC on the second save (injected): exit 2, the step-2 checkpoint intact."""
    (tmp_path / "tiny.toml").write_text(TINY)
    real_save_file, saves = checkpoint.save_file, []

    def save_file(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 2:
            Path(filename).write_bytes(b"\0" * 1000)  # a partial file, as a full disk leaves one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    args = ["pretrain", "--recipe", str(tmp_path / "tiny.toml"), "--run", str(tmp_path / "run"), "--pretrain.steps=4"]
    assert main(args) == 2
    err = capsys.readouterr().err  # progress lines, then the error
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"r1lab: error: {tmp_path / 'run' / 'base' / 'checkpoint'}: cannot save "
                                    f"(No space left on device); the previous checkpoint is unchanged")
    assert read_trainer_state(tmp_path / "run" / "base" / "checkpoint")["step"] == 2
    assert not [p for p in (tmp_path / "run" / "base").iterdir() if p.name.startswith(".")]  # no partial save left
    monkeypatch.undo()
    assert main(args) == 0  # with room again, the run resumes from step 2 and finishes
    assert read_trainer_state(tmp_path / "run" / "base" / "checkpoint")["step"] == 4


def test_a_really_full_disk_during_a_save(tmp_path, capsys):
    """The same on a small tmpfs filled up after the first checkpoint (needs root to mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    try:
        (tmp_path / "tiny.toml").write_text(TINY)
        run = mnt / "run"
        args = ["pretrain", "--recipe", str(tmp_path / "tiny.toml"), "--run", str(run)]
        assert main([*args, "--pretrain.steps=2"]) == 0
        before = {p.name: p.read_bytes() for p in (run / "base" / "checkpoint").iterdir()}
        stat = os.statvfs(mnt)
        free = stat.f_bavail * stat.f_frsize
        (mnt / "filler").write_bytes(b"\0" * (free - 256 * 1024))  # room for log lines, not for weights
        capsys.readouterr()
        assert main([*args, "--pretrain.steps=4"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.splitlines()[-1] == (f"r1lab: error: {run / 'base' / 'checkpoint'}: cannot save "
                                        f"(No space left on device); the previous checkpoint is unchanged")
        assert {p.name: p.read_bytes() for p in (run / "base" / "checkpoint").iterdir()} == before
        assert read_trainer_state(run / "base" / "checkpoint")["step"] == 2
        assert not [p for p in (run / "base").iterdir() if p.name.startswith(".")]  # the partial save is gone
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
