"""Run untrusted Python in a throw-away subprocess and count the tests it passes.

`run_python(source, tests)` starts `python -I -c BOOTSTRAP` in a new session (its own process
group) with a fresh temp dir as cwd; the bootstrap, before any user code runs:
  - when root: enters new network and mount namespaces (no network at all, not even loopback),
    makes `/` read-only and mounts size-limited private tmpfs on /tmp, /var/tmp, /dev/shm and
    /run/lock, so writes land only in memory that vanishes with the run (the work dir is on that
    tmpfs); then drops to a fresh, unused uid/gid, so root-only files cannot be read, the parent
    cannot be signalled, and RLIMIT_NPROC (which root ignores) stops fork bombs;
  - when not root: tries an unprivileged user + network namespace; RLIMIT_NPROC applies as is;
  - always: rlimits on address space, CPU seconds, file size, open files and processes, no core
    files, and `socket` functions replaced if no network namespace could be made.
It then executes the source as `__main__`, then each test statement (usually an `assert`), and
reports pass/fail counts on a private pipe, prefixed by a per-run secret from a root-only config
file, so nothing the program prints or writes blindly can pass for results. The parent enforces
a wall-clock limit, keeps at most `max_output` bytes of stdout and of stderr (stopping the
program once it floods past that), and at the end SIGKILLs the whole process group plus, when a
uid was assigned, every process of that uid (which catches children that called setsid). The
temp dir is removed.

Known limits: the tests run in the program's own interpreter, so code that goes looking (gc,
`sys.modules["__main__"]`) can find the harness and forge its counts; without root the config is
readable and children that call setsid() can outlive the run; a host without namespaces has no
filesystem or network isolation beyond the rlimits and the socket patch. `SandboxResult.isolation`
says what was in force. This module knows nothing about rewards or models.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

UID_BASE = 1 << 20  # fresh uids are drawn from [UID_BASE, 2 * UID_BASE): far from real accounts

_BOOTSTRAP = r'''
import ctypes, json, os, resource, sys, traceback
with open(sys.argv[1], encoding="utf-8") as f:
    cfg = json.load(f)
with open(cfg["source_path"], encoding="utf-8") as f:
    source = f.read()
tests, nonce = cfg["tests"], cfg["nonce"].encode()
isolation, workdir, uid = [], os.getcwd(), cfg["uid"]
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWNET, NEWUSER = 0x00020000, 0x40000000, 0x10000000
RDONLY, NOSUID, NODEV, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), "mount " + target)

PREFIXES = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)})

def first_closed(path):
    parts = path.split("/")
    return next((d for d in ("/".join(parts[:k]) for k in range(2, len(parts) + 1))
                 if not os.stat(d).st_mode & 0o001), None)

def expose(prefixes):
    # The new uid must read the Python install; if a parent dir (e.g. /root) is closed to
    # others, hide that dir behind an empty tmpfs and bind only the install back into it.
    staged = []
    for i, prefix in enumerate(prefixes):
        closed = first_closed(prefix)
        if closed is not None:
            stage = "/tmp/.python%d" % i
            os.mkdir(stage)
            mount(prefix, stage, None, BIND | REC)
            staged.append((closed, prefix, stage))
    for closed in sorted({c for c, _, _ in staged}):
        mount("tmpfs", closed, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
    for closed, prefix, stage in staged:
        os.makedirs(prefix, 0o755, exist_ok=True)
        mount(stage, prefix, None, BIND | REC)
        libc.umount2(stage.encode(), 2)
        os.rmdir(stage)

def isolate():
    global workdir
    if libc.unshare(NEWNET) == 0:
        isolation.append("net")
    if libc.unshare(NEWNS) != 0:
        return False
    mount("none", "/", None, REC | PRIVATE)
    for path in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", NOSUID | NODEV, "size=%dm,mode=1777" % cfg["disk_mb"])
    expose(PREFIXES)
    mount(None, "/", None, REMOUNT | BIND | RDONLY)
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    isolation.append("fs")
    return True

if os.geteuid() == 0:
    try:
        fs_ok = isolate()
    except OSError as exc:
        print("r1lab sandbox: filesystem isolation failed:", exc, file=sys.stderr)
        fs_ok = False
    # without the mount namespace the new uid can only run if it can read the Python install
    if uid is not None and (fs_ok or not any(first_closed(p) for p in PREFIXES)):
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        isolation.append("uid")
elif libc.unshare(NEWUSER | NEWNET) == 0:
    isolation.append("net")
for name, soft in (("RLIMIT_AS", cfg["memory_mb"] << 20), ("RLIMIT_FSIZE", cfg["file_mb"] << 20),
                   ("RLIMIT_CPU", cfg["cpu_s"]), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0),
                   ("RLIMIT_NPROC", cfg["nproc"])):
    hard = soft + 1 if name == "RLIMIT_CPU" else soft
    resource.setrlimit(getattr(resource, name), (soft, hard))
os.chdir(workdir)
os.environ["HOME"] = workdir
if "net" not in isolation:
    import socket
    def _no_network(*args, **kwargs):
        raise PermissionError("network access is disabled in the r1lab sandbox")
    for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, _name, _no_network)
results_fd = cfg["results_fd"]
del cfg, libc, f  # what the program may find: less to find, less to forge
sys.argv = ["solution.py"]
user = {"__name__": "__main__", "__builtins__": __builtins__}
passed = failed = 0
try:
    exec(compile(source, "solution.py", "exec"), user)
    loaded = True
except SystemExit as exc:
    loaded = exc.code in (None, 0)
except BaseException:
    traceback.print_exc()
    loaded = False
for test in tests:
    try:
        if not loaded:
            raise RuntimeError("the program did not load")
        exec(compile(test, "test", "exec"), user)
        passed += 1
    except BaseException:
        failed += 1
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except BaseException:
        pass
os.write(results_fd, nonce + json.dumps({"passed": passed, "failed": failed, "loaded": loaded,
                                         "isolation": isolation}).encode())
os._exit(0)
'''


@dataclass
class SandboxResult:
    """What one sandboxed run did. `passed + failed == len(tests)` even when the run died."""

    passed: int
    failed: int
    returncode: int | None
    timed_out: bool
    output_limited: bool  # stdout or stderr passed max_output and the program was stopped
    stdout: str  # at most max_output bytes, decoded with replacement
    stderr: str
    duration: float  # seconds of wall clock
    pid: int  # pid of the run's session leader (= its process group and session id)
    uid: int | None  # the uid the program ran as, None when it kept the caller's
    isolation: list[str] = field(default_factory=list)  # "net", "fs", "uid": what was in force

    @property
    def total(self) -> int:
        return self.passed + self.failed

    @property
    def ok(self) -> bool:
        """Ran to the end in time with every test passing."""
        return not self.timed_out and self.failed == 0 and self.returncode == 0


def _uid_processes(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`, found by scanning /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(name))
    return pids


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for _ in range(100 if uid is not None else 0):
        pids = _uid_processes(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _pump(proc, stdin_data: bytes, results_fd: int, timeout: float, max_output: int):
    """Feed stdin and collect capped stdout/stderr/results until exit, flood or the deadline."""
    deadline = time.monotonic() + timeout
    outs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), results_fd: bytearray()}
    open_fds = set(outs)
    stdin_fd = proc.stdin.fileno()
    pending = memoryview(stdin_data)
    if not pending:
        proc.stdin.close()
    pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    timed_out = limited = False
    try:
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            readers = list(open_fds) + ([pidfd] if pidfd is not None else [])
            writers = [stdin_fd] if pending else []
            wait = remaining if pidfd is not None else min(remaining, 0.05)  # no pidfd: poll for exit
            ready_r, ready_w, _ = select.select(readers, writers, [], wait)
            if ready_w:
                try:
                    pending = pending[os.write(stdin_fd, pending[:65536]):]
                except (BrokenPipeError, OSError):
                    pending = memoryview(b"")
                if not pending:
                    proc.stdin.close()
            exited = proc.poll() is not None
            for fd in [fd for fd in open_fds if fd in ready_r or exited]:
                # while running, one read per ready pipe; once exited, drain what is buffered
                while fd in open_fds and not limited and select.select([fd], [], [], 0)[0]:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        open_fds.discard(fd)
                    outs[fd] += chunk
                    if fd != results_fd and len(outs[fd]) > max_output:
                        limited = True
                    elif fd == results_fd and len(outs[fd]) > 65536:
                        open_fds.discard(fd)
                    if not exited:
                        break
            if exited or limited:
                break
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return outs, timed_out, limited


def run_python(source: str, tests: Sequence[str] = (), *, stdin: str = "", timeout: float = 5.0,
               memory_mb: int = 512, max_output: int = 64_000, file_mb: int = 16, disk_mb: int = 64,
               max_processes: int = 32) -> SandboxResult:
    """Run `source` then each statement in `tests` in a sandbox; see the module docstring.

    A test passes when it runs without raising (so `assert f(2) == 4` works); if the program
    itself fails to load, every test fails. `timeout` is wall-clock seconds for the whole run.
    """
    start = time.monotonic()
    uid = UID_BASE + secrets.randbelow(UID_BASE) if os.geteuid() == 0 else None
    tmp = tempfile.mkdtemp(prefix="r1lab-sandbox-")
    read_fd, write_fd = os.pipe()
    proc = None
    try:
        source_path = os.path.join(tmp, "solution.py")
        with open(source_path, "w", encoding="utf-8") as f:
            f.write(source)
        nonce = secrets.token_hex(16)
        cfg = {"source_path": source_path, "tests": list(tests), "nonce": nonce, "uid": uid,
               "results_fd": write_fd, "memory_mb": memory_mb, "file_mb": file_mb, "disk_mb": disk_mb,
               "cpu_s": int(timeout) + 1, "nproc": max_processes}
        config_path = os.path.join(tmp, "config.json")
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, config_path],
            cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        outs, timed_out, limited = _pump(proc, stdin.encode("utf-8"), read_fd, timeout, max_output)
        _kill_all(proc, uid)
        out, err = (bytes(outs[s.fileno()][:max_output]).decode("utf-8", "replace") for s in (proc.stdout, proc.stderr))
        raw = bytes(outs[read_fd])
        try:  # the nonce is never visible to the program's output, so a printed report is ignored
            report = json.loads(raw[len(nonce):]) if raw.startswith(nonce.encode()) else {}
        except ValueError:
            report = {}
        passed = min(int(report.get("passed", 0)), len(tests)) if not (timed_out or limited) else 0
        return SandboxResult(
            passed=passed, failed=len(tests) - passed,
            returncode=None if timed_out or limited else proc.returncode, timed_out=timed_out,
            output_limited=limited, stdout=out, stderr=err, duration=time.monotonic() - start,
            pid=proc.pid, uid=uid, isolation=list(report.get("isolation", [])))
    finally:
        if proc is not None and proc.returncode is None:
            _kill_all(proc, uid)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
