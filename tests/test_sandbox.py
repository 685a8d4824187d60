"""The code sandbox against hostile programs: each scores 0, in time, and leaves the host as it was."""

import os
import socket
import stat
import time
import uuid

import pytest

from r1lab.rewards import code_reward
from r1lab.sandbox import run_python

ISOLATION = run_python("pass").isolation  # what this host allows: "net", "fs", "uid"
needs_uid = pytest.mark.skipif("uid" not in ISOLATION, reason="running as a fresh uid needs root")
needs_fs = pytest.mark.skipif("fs" not in ISOLATION, reason="a private mount namespace needs root with namespaces")
TESTS = ["assert square(3) == 9", "assert square(-2) == 4"]
GOOD = "def square(x):\n    return x * x\n"


def _proc_stat(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def leftovers(result) -> list[int]:
    """Live processes still in the run's session or process group, or running as its uid."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = _proc_stat(pid)
        if fields is None or fields[0] == "Z":
            continue
        pgrp, session = int(fields[2]), int(fields[3])
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if result.pid in (pgrp, session) or (result.uid is not None and uid == result.uid):
            found.append(int(pid))
    return found


def run_hostile(source: str, timeout: float = 2.0, **kwargs):
    t0 = time.monotonic()
    result = run_python(GOOD + source, TESTS, timeout=timeout, **kwargs)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 1.0, f"took {elapsed:.2f} s"
    assert result.passed == 0 and result.failed == len(TESTS), result
    assert leftovers(result) == []
    return result


def test_correct_solution_scores_one_and_reports_output():
    result = run_python(GOOD + "print('ready')", TESTS)
    assert (result.passed, result.failed, result.returncode, result.timed_out) == (2, 0, 0, False)
    assert result.stdout == "ready\n" and result.ok
    assert result.isolation == ISOLATION
    assert code_reward(f"<answer>```python\n{GOOD}```</answer>", {"tests": TESTS}) == 1.0
    assert leftovers(result) == []


def test_partial_and_crashing_solutions():
    result = run_python("def square(x):\n    return 9\n", TESTS)
    assert (result.passed, result.failed) == (1, 1)
    result = run_python("raise SystemExit(3)", TESTS)
    assert (result.passed, result.failed) == (0, 2)
    result = run_python("def square(x) return", TESTS)
    assert result.passed == 0 and "SyntaxError" in result.stderr


def test_infinite_loop_times_out():
    result = run_hostile("while True:\n    pass\n", timeout=1.0)
    assert result.timed_out


@pytest.mark.skipif(os.geteuid() == 0 and "uid" not in ISOLATION,
                    reason="root without a fresh uid ignores RLIMIT_NPROC: a fork bomb would be real")
def test_fork_bomb_is_contained_and_reaped():
    result = run_hostile("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                         timeout=1.5)
    assert result.timed_out


@needs_uid
def test_children_that_escape_the_process_group_are_killed():
    source = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
              "        time.sleep(60)\n        os._exit(0)\nraise SystemExit(1)\n")
    run_hostile(source)


def test_memory_bomb_fails_fast():
    result = run_hostile("block = bytearray(8 * 1024 ** 3)\n")
    assert "MemoryError" in result.stderr and not result.timed_out


def test_disk_bombs_hit_limits():
    big = run_hostile("with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2 ** 20)\n")
    assert "File too large" in big.stderr or big.returncode not in (0, None)
    if "fs" not in big.isolation:
        pytest.skip("no private tmpfs here: a many-files bomb would fill the real disk")
    many = run_hostile("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2 ** 20)\n    i += 1\n",
                       timeout=5.0)
    assert not many.timed_out  # stopped by a limit, not by the clock


def test_huge_output_is_capped():
    result = run_hostile("while True:\n    print('x' * 10000)\n", max_output=50_000)
    assert result.output_limited and len(result.stdout) <= 50_000


def test_deep_recursion_scores_zero():
    run_hostile("def f(n):\n    return f(n + 1)\nf(0)\n")
    run_hostile("import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1)\nf(0)\n")


@needs_uid
def test_cannot_read_private_files(tmp_path):
    private = tmp_path / "secret"
    private.write_text("TOKEN-1234")
    os.chmod(tmp_path, 0o700)
    os.chmod(private, 0o600)
    for path in (private, "/etc/shadow"):
        if os.path.exists(path):
            result = run_hostile(f"print(open({str(path)!r}).read())\n")
            assert "TOKEN-1234" not in result.stdout and "root:" not in result.stdout
            assert "PermissionError" in result.stderr or "FileNotFoundError" in result.stderr


def test_network_connection_never_arrives():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        result = run_hostile("import socket\ns = socket.create_connection(('127.0.0.1', %d), timeout=1)\n"
                             "s.sendall(b'hello')\n" % port)
        if "net" in result.isolation:  # a network namespace also stops the low-level module
            run_hostile("import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', %d))\n" % port)
        time.sleep(0.1)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@needs_uid
def test_killing_the_parent_fails():
    result = run_hostile("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert "PermissionError" in result.stderr


@needs_fs
def test_no_files_written_outside_the_temp_dir():
    name = f"r1lab-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.join(os.getcwd(), name),
               f"/{name}", f"../{name}"]
    attempts = "".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets)
    source = attempts + "raise SystemExit(1)\n"
    before = set(os.listdir("/tmp"))
    run_hostile(source)
    assert not any(os.path.exists(t) for t in targets[:-1])
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith("r1lab-")]  # temp dir removed


def test_sandbox_temp_dir_is_removed_and_private():
    result = run_python("import os, stat\nprint(oct(stat.S_IMODE(os.stat('.').st_mode)), len(os.listdir('.')))")
    mode, count = result.stdout.split()
    assert stat.S_IMODE(int(mode, 8)) & 0o077 == 0 and int(count) <= 1
