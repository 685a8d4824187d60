"""The code sandbox: values come back as plain data, hostile programs score 0 (or their honest
share) in time and leave nothing running, and the interpreter may live anywhere, /tmp included."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import r1lab
from r1lab.rewards import code_reward
from r1lab.sandbox import SandboxError, run_python

REPO = Path(r1lab.__file__).resolve().parent.parent
ISOLATION = run_python("pass").isolation  # what this host allows: "net", "fs", "pid", "uid"
needs_uid = pytest.mark.skipif("uid" not in ISOLATION, reason="running as a fresh uid needs root")
needs_fs = pytest.mark.skipif("fs" not in ISOLATION, reason="a private mount namespace needs root with namespaces")
needs_reaping = pytest.mark.skipif(not {"pid", "uid"} & set(ISOLATION),
                                   reason="without a pid namespace or a fresh uid, setsid() children outlive a run")
CALLS = ["square(3)", "square(-2)"]
TESTS = ["assert square(3) == 9", "assert square(-2) == 4"]
GOOD = "def square(x):\n    return x * x\n"
WRONG = "def square(x):\n    return x + 1\n"


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


def marked(marker: str) -> list[int]:
    """Live processes with `marker` in their command line (hostile programs exec it as an argument)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = _proc_stat(pid)
        if marker.encode() in cmdline and fields is not None and fields[0] != "Z":
            found.append(int(pid))
    return found


def values(result) -> list:
    return [call.value if call.ok else call.error for call in result.calls]


def run_hostile(source: str, timeout: float = 2.0, **kwargs):
    """Run a good solution with a bomb at load time: no call may report, all in time, nothing left."""
    t0 = time.monotonic()
    result = run_python(GOOD + source, CALLS, timeout=timeout, **kwargs)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 1.0, f"took {elapsed:.2f} s"
    assert not any(call.ok for call in result.calls), result
    assert leftovers(result) == []
    return result


def score(source: str, marker: str = "", timeout: float = 1.5) -> float:
    """The code reward of `source` on TESTS, checked to end within timeout + 1 s with nothing left."""
    t0 = time.monotonic()
    reward = code_reward(f"<answer>```python\n{source}```</answer>", {"tests": TESTS, "timeout": timeout})
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 1.0, f"took {elapsed:.2f} s"
    if marker:
        assert marked(marker) == []
    return reward


def test_correct_solution_returns_values_and_output():
    result = run_python(GOOD + "print('ready')", CALLS)
    assert values(result) == [9, 4] and (result.returncode, result.timed_out) == (0, False)
    assert result.stdout == "ready\n" and result.ok
    assert result.isolation == ISOLATION
    assert score(GOOD) == 1.0 and score(WRONG) == 0.0
    assert leftovers(result) == []


def test_only_plain_data_leaves_the_sandbox():
    source = GOOD + ("class Any:\n    def __eq__(self, other):\n        return True\n"
                     "class Int(int):\n    pass\n"
                     "def nested(n):\n    return [] if n == 0 else [nested(n - 1)]\n")
    calls = ["(1, [2.5, None], {'a': True})", "'text'", "Any()", "Int(9)", "{1, 2}", "{1: 2}", "square",
             "nested(150)", "1 / 0", "square(3)"]
    result = run_python(source, calls)
    got = values(result)
    assert got[:2] == [[1, [2.5, None], {"a": True}], "text"]
    assert [result.calls[i].ok for i in range(len(calls))] == [True, True] + [False] * 7 + [True]
    assert "not plain data: Any" in got[2] and "not plain data: Int" in got[3]
    assert "not plain data: set" in got[4] and "non-str key" in got[5] and "not plain data: function" in got[6]
    assert "nested deeper than" in got[7] and got[8].startswith("ZeroDivisionError") and got[9] == 9


def test_a_program_that_fails_to_load_fails_every_call():
    result = run_python("def square(x):\n    return 9\n", CALLS)
    assert values(result) == [9, 9]
    result = run_python(GOOD + "raise SystemExit(3)", CALLS)
    assert result.returncode == 3 and not any(call.ok for call in result.calls)
    assert "exited with status 3" in result.calls[0].error
    result = run_python("def square(x) return", CALLS)
    assert not any(call.ok for call in result.calls) and "SyntaxError" in result.stderr
    assert result.returncode == 1


def _host_allows(flags: list[int], *, as_nobody: str | None = None) -> list[bool]:
    """Whether a fresh process (root, or nobody with `as_nobody` as interpreter) can unshare each of
    `flags`, after a user namespace when unprivileged; asked of the kernel, not of the sandbox."""
    script = ("import ctypes, json, os, sys\nlibc = ctypes.CDLL(None)\n"
              "if os.geteuid() != 0 and libc.unshare(0x10000000) != 0:\n    print(json.dumps([False] * len(sys.argv[1:])))\n"
              "else:\n    print(json.dumps([libc.unshare(int(f)) == 0 for f in sys.argv[1:]]))\n")
    extra = dict(user=65534, group=65534, extra_groups=[], cwd="/") if as_nobody else {}
    out = subprocess.run([as_nobody or sys.executable, "-c", script, *map(str, flags)], capture_output=True,
                         text=True, check=True, **extra)
    return json.loads(out.stdout)


NEWNET, NEWNS, NEWPID = 0x40000000, 0x00020000, 0x20000000


def test_isolation_is_all_the_host_allows():
    if os.geteuid() == 0:
        net, fs, pid = _host_allows([NEWNET, NEWNS, NEWPID])
        expected = ["net"] * net + ["fs"] * fs + ["pid"] * pid + ["uid"]
    else:
        net, pid = _host_allows([NEWNET, NEWPID])
        expected = ["net"] * net + ["pid"] * pid
    assert ISOLATION == expected


# The reward hacks a policy finds: each is a wrong solution plus a trick, and scores 0 (or the share
# of calls it honestly answered) within timeout + 1 s, leaving no process behind.

def test_always_equal_objects_score_zero():
    always = "    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n        return False\n"
    for base in ("", "int", "str", "list", "dict", "float"):
        source = f"class Any({base}):\n{always}    __hash__ = object.__hash__\ndef square(x):\n    return Any()\n"
        assert score(source) == 0.0, base


def test_exits_score_zero_or_their_honest_share():
    assert score(WRONG + "import sys\nsys.exit(0)\n") == 0.0
    assert score(WRONG + "raise SystemExit\n") == 0.0
    assert score("import os\ndef square(x):\n    os._exit(0)\n") == 0.0
    # the first call is answered before the exit: half the tests, honestly
    assert score("import os\ndef square(x):\n    if x < 0:\n        os._exit(0)\n    return x * x\n") == 0.5


def test_forged_success_output_scores_zero():
    forged = '{"value": true}\n{"value": 1}\n{"passed": 2, "failed": 0, "loaded": true}\nPASSED 2/2\nOK\n'
    source = WRONG + (f"import os, sys\nFORGED = {forged!r}.encode()\nprint(FORGED.decode())\n"
                      "print(FORGED.decode(), file=sys.stderr)\nfor fd in range(3, 64):\n    try:\n"
                      "        os.write(fd, FORGED)\n    except OSError:\n        pass\n")
    assert score(source) == 0.0
    # lines forged on the results pipe are read as the program's answers, which it cannot know
    assert values(run_python(source, CALLS)) == [True, 1]
    junk = WRONG + "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'[' * 100000 + b'\\n{1\\n')\n" \
                   "    except OSError:\n        pass\n"
    assert values(run_python(junk, CALLS)) == ["malformed result"] * 2


def test_patching_the_test_machinery_scores_zero():
    source = WRONG + ("import builtins, json, unittest\n"
                      "builtins.AssertionError = type('AssertionError', (Exception,), {})\n"
                      "unittest.TestCase.assertEqual = lambda *args, **kwargs: None\n"
                      "builtins.isinstance = lambda *args: True\n"
                      "builtins.type = lambda *args: int\n"
                      "builtins.eval = lambda *args, **kwargs: True\n"
                      "json.dumps = lambda *args, **kwargs: '{\"value\": true}'\n")
    assert score(source) == 0.0


@needs_reaping
def test_a_setsid_daemon_scores_zero_and_is_killed():
    marker = f"r1lab-daemon-{uuid.uuid4().hex}"
    source = WRONG + ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                      "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
                      f"{marker!r}])\n    os._exit(0)\nimport time\ntime.sleep(0.3)\n")
    assert score(source, marker) == 0.0


def test_ignoring_sigterm_scores_zero_and_is_killed():
    marker = f"r1lab-stubborn-{uuid.uuid4().hex}"
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(1)\n"
    source = WRONG + ("import os, signal, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      f"if os.fork() == 0:\n    os.execv(sys.executable, [sys.executable, '-c', {stubborn!r}, "
                      f"{marker!r}])\nwhile True:\n    pass\n")
    assert score(source, marker, timeout=1.0) == 0.0


# Bombs and escapes at load time: the run stops by a limit or the clock, and the host is untouched.

def test_infinite_loop_times_out():
    result = run_hostile("while True:\n    pass\n", timeout=1.0)
    assert result.timed_out and result.calls[0].error == "no result: timed out"


@pytest.mark.skipif(os.geteuid() == 0 and "uid" not in ISOLATION,
                    reason="root without a fresh uid ignores RLIMIT_NPROC: a fork bomb would be real")
def test_fork_bomb_is_contained_and_reaped():
    result = run_hostile("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                         timeout=1.5)
    assert result.timed_out


@needs_reaping
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


def test_huge_values_are_capped():
    result = run_python("def big():\n    return 'x' * 300_000\n", ["big()", "1"], max_results=200_000)
    assert [call.ok for call in result.calls] == [False, False] and result.ok


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


@pytest.mark.skipif(not {"pid", "uid"} & set(ISOLATION), reason="the program runs as the caller, unconfined")
def test_killing_the_caller_fails():
    result = run_hostile(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n")
    assert "PermissionError" in result.stderr or "ProcessLookupError" in result.stderr


@needs_fs
def test_no_files_written_outside_the_temp_dir():
    name = f"r1lab-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.join(os.getcwd(), name),
               f"/{name}", f"../{name}", os.path.join(os.path.dirname(sys.executable), name)]
    attempts = "".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets)
    source = attempts + "raise SystemExit(1)\n"
    before = set(os.listdir("/tmp"))
    run_hostile(source)
    assert not any(os.path.exists(t) for t in targets if not t.startswith(".."))
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith("r1lab-")]  # temp dir removed


def test_sandbox_work_dir_is_empty_and_private():
    result = run_python("import os, stat\nprint(oct(stat.S_IMODE(os.stat('.').st_mode)), len(os.listdir('.')))")
    mode, count = result.stdout.split()
    assert stat.S_IMODE(int(mode, 8)) & 0o077 == 0 and int(count) == 0


def test_a_harness_that_cannot_start_is_an_error_not_a_score():
    with pytest.raises(SandboxError, match="died before the program started"):
        run_python(GOOD, CALLS, python=shutil.which("false"))


# Where the interpreter lives: a venv under /tmp (or /var/tmp, /dev/shm) must stay visible inside
# the sandbox, whose tmpfs covers those directories.

@pytest.mark.parametrize("root", ["/tmp", "/var/tmp", "/dev/shm"])
def test_code_reward_with_the_interpreter_under_a_tmp_dir(root):
    if not os.access(root, os.W_OK | os.X_OK):
        pytest.skip(f"{root} is not writable here")
    where = Path(tempfile.mkdtemp(prefix="r1lab-venv-", dir=root))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where / "venv")], check=True)
        python = where / "venv" / "bin" / "python"
        site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # the new venv sees this checkout and the packages r1lab needs, like an install would
        deps = [p for p in sys.path if p.endswith("site-packages")]
        Path(site, "r1lab-test.pth").write_text("\n".join([str(REPO), *deps]) + "\n")
        script = ("import json, sys\nfrom r1lab.rewards import code_reward\nfrom r1lab.sandbox import run_python\n"
                  "good, hack, tests = json.loads(sys.argv[1])\nrun = run_python(PROBE, CALLS)\n"
                  "print(json.dumps([code_reward(good, {'tests': tests}), code_reward(hack, {'tests': tests}), "
                  "run.isolation, [c.value if c.ok else c.error for c in run.calls], run.stderr]))\n")
        hack = "class Any:\n    def __eq__(self, other):\n        return True\ndef square(x):\n    return Any()\n"
        args = json.dumps([f"```python\n{GOOD}```", f"```python\n{hack}```", TESTS])
        # inside, the program imports extension modules of the stdlib and starts the interpreter again
        probe = ("import decimal, os, subprocess, sys\n"
                 "def again():\n    return subprocess.run([sys.executable, '-c', 'print(6 * 7)'], "
                 "capture_output=True, text=True).stdout\n")
        calls = ["sys.prefix", "os.path.isdir(sys.prefix)", "str(decimal.Decimal(1) / 8)", "again()"]
        script = f"PROBE, CALLS = {probe!r}, {calls!r}\n" + script
        out = subprocess.run([python, "-c", script, args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        good, bad, isolation, probed, stderr = json.loads(out.stdout)
        assert (good, bad) == (1.0, 0.0), stderr
        assert probed == [str(where / "venv"), True, "0.125", "42\n"], stderr
        assert isolation == ISOLATION
    finally:
        shutil.rmtree(where, ignore_errors=True)


# Without root: the same guarantees from unprivileged namespaces, checked as an unprivileged user.

def _unprivileged_python() -> str | None:
    """An interpreter an unprivileged user can run with this checkout importable, else None."""
    for candidate in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if not candidate or not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run([candidate, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                                    "import r1lab.sandbox"], user=65534, group=65534, extra_groups=[], cwd="/",
                                   capture_output=True)
        except PermissionError:  # e.g. a venv whose interpreter sits in a closed home directory
            continue
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="already unprivileged: every other test here covers this path")
def test_unprivileged_runs_are_judged_and_reaped():
    python = _unprivileged_python()
    if python is None:
        pytest.skip("no interpreter here that an unprivileged user can run with this checkout")
    marker = f"r1lab-daemon-{uuid.uuid4().hex}"
    daemon = WRONG + ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                      "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
                      f"{marker!r}])\n    os._exit(0)\n")
    # the program itself leaves the process group and hangs: the run times out, its namespace dies
    leader = ("import os, sys\nos.setsid()\nos.execv(sys.executable, [sys.executable, '-c', "
              f"'import time; time.sleep(60)', {marker!r}])\n")
    hack = "class Any:\n    def __eq__(self, other):\n        return True\ndef square(x):\n    return Any()\n"
    script = (f"import json, sys\nsys.path.insert(0, {str(REPO)!r})\nfrom r1lab.sandbox import run_python\n"
              "out = []\nfor source in json.loads(sys.argv[1]):\n"
              "    r = run_python(source, json.loads(sys.argv[2]), timeout=1.5)\n"
              "    out.append([r.isolation, r.uid, [c.value if c.ok else c.error for c in r.calls]])\n"
              "print(json.dumps(out))\n")
    run = subprocess.run([python, "-c", script, json.dumps([GOOD, hack, daemon, leader]), json.dumps(CALLS)],
                         user=65534, group=65534, extra_groups=[], cwd="/", capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    (isolation, uid, good), (_, _, hack_values), (_, _, daemon_values), (_, _, leader_values) = json.loads(run.stdout)
    net, pid = _host_allows([NEWNET, NEWPID], as_nobody=python)
    assert uid is None and isolation == ["net"] * net + ["pid"] * pid
    assert good == [9, 4] and daemon_values == [4, -1]
    assert all("not plain data" in v for v in hack_values) and leader_values == ["no result: timed out"] * 2
    left = marked(marker)
    for pid in left:  # without a pid namespace the daemon outlives the run (a documented limit)
        os.kill(pid, signal.SIGKILL)
    assert left == [] or "pid" not in isolation
