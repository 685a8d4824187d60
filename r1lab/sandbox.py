"""Run untrusted Python in a throw-away subprocess and bring back, as plain data, what it computes.

`run_python(source, calls)` starts `python -I -c HARNESS` in a new session (its own process group)
with a fresh private work dir; the harness, before any of the program runs:
  - when root: enters new network and mount namespaces (no network at all, not even loopback),
    mounts size-limited private tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock, binds the Python
    install back read-only wherever it lives (under /tmp, or behind a directory closed to others
    such as /root), makes `/` read-only, then forks into a new pid namespace and drops to a fresh,
    unused uid/gid, so root-only files cannot be read, nothing outside can be signalled, and
    RLIMIT_NPROC (which root ignores) stops fork bombs;
  - when not root: tries unprivileged user, network and pid namespaces; RLIMIT_NPROC applies as is;
  - always: rlimits on address space, CPU seconds, file size, open files and processes, no core
    files, and `socket` functions replaced if no network namespace could be made.
Then it executes the source as `__main__` and evaluates each call expression (`solve(2)`) in the
program's globals. A value leaves the sandbox only as plain data (`plain_data`: None, bool, int,
float, str, lists, dicts with str keys; tuples become lists), one JSON line per call on a private
pipe; an exception, or anything else (an object whose `__eq__` always says yes), is an error for
that call. The caller compares values with what it expects, and the expected values never enter
the sandbox, so forging the pipe gains a program nothing over returning the value itself. The
parent enforces a wall-clock limit, keeps at most `max_output` bytes of stdout and of stderr
(stopping the program once it floods past that), and at the end SIGKILLs the pid namespace, the
process group and, when a uid was assigned, every process of that uid. The temp dir is removed.

Known limits: the rest of the filesystem stays readable (read-only) to the program, so data the
other users may read (a test set with its answers) is readable to it; without root the program
runs as the caller, so it can read what the caller can, and without a pid namespace children that
call setsid() can outlive the run; a host without namespaces has no filesystem or network
isolation beyond the rlimits and the socket patch. `SandboxResult.isolation` says what was in
force. A sandbox that cannot be set up raises `SandboxError`, never a silent score. This module
knows nothing about rewards, expected values or models.
"""

from __future__ import annotations

import inspect
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

UID_BASE = 1 << 20  # fresh uids are drawn from [UID_BASE, 2 * UID_BASE): far from real accounts
MAX_DEPTH = 100  # plain data nested deeper than this is refused (and cannot exhaust a recursion limit)


def plain_data(value, depth: int = 0):
    """`value` as plain data: None, bool, int, float, str, lists, dicts with str keys (tuples
    become lists); anything else raises ValueError. Types are checked by identity, so no subclass
    and no look-alike passes. The sandbox runs this very function on every value it returns."""
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if depth >= MAX_DEPTH:
        raise ValueError(f"not plain data: nested deeper than {MAX_DEPTH}")
    if kind is list or kind is tuple:
        return [plain_data(item, depth + 1) for item in value]
    if kind is dict and all(type(key) is str for key in value):
        return {key: plain_data(item, depth + 1) for key, item in value.items()}
    raise ValueError("not plain data: " + ("dict with a non-str key" if kind is dict else kind.__name__))


def values_equal(got, want) -> bool:
    """Equality of plain data, stricter than `==`: a bool equals only a bool (True is not 1),
    numbers compare by value (4 == 4.0), lists and dicts element by element."""
    if type(got) is bool or type(want) is bool:
        return type(got) is type(want) and got == want
    if type(got) in (int, float) and type(want) in (int, float):
        return got == want
    if type(got) is not type(want):
        return False
    if type(got) is list:
        return len(got) == len(want) and all(map(values_equal, got, want))
    if type(got) is dict:
        return got.keys() == want.keys() and all(values_equal(got[k], want[k]) for k in got)
    return got == want


_HARNESS = r'''
import ctypes, json, os, resource, signal, sys, traceback
with open(sys.argv[1], encoding="utf-8") as f:
    cfg = json.load(f)
with open(cfg["source_path"], encoding="utf-8") as f:
    source = f.read()
calls, uid, results_fd, workdir = cfg["calls"], cfg["uid"], cfg["results_fd"], cfg["workdir"]
isolation, fs_ok = [], False
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWNET, NEWPID, NEWUSER = 0x00020000, 0x40000000, 0x20000000, 0x10000000
RDONLY, NOSUID, NODEV, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
HIDDEN = sorted({os.path.realpath(p) for p in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(p)})

def send(**line):
    data = (json.dumps(line) + "\n").encode()
    while data:
        data = data[os.write(results_fd, data):]

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), "mount %s on %s: %s" % (src, target, os.strerror(ctypes.get_errno())))

def install_paths():
    # what this interpreter reads after start-up: the venv, the base install (stdlib and
    # site-packages live under the prefixes) and the real executable's directory
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                           os.path.dirname(os.path.realpath(sys.executable)))}
    return sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths))

def first_closed(path):
    # the first existing directory above path that others may not enter (a missing one will be
    # created open)
    parts = path.split("/")
    for k in range(2, len(parts)):
        d = "/".join(parts[:k])
        try:
            mode = os.stat(d).st_mode
        except FileNotFoundError:
            return None
        if not mode & 0o001:
            return d
    return None

def isolate_fs():
    # False when no mount namespace can be had; OSError when it was made but not set up
    global workdir
    if libc.unshare(NEWNS) != 0:
        return False
    mount("none", "/", None, REC | PRIVATE)
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in install_paths()}  # before the tmpfs hide them
    for path in HIDDEN:
        mount("tmpfs", path, "tmpfs", NOSUID | NODEV, "size=%dm,mode=1777" % cfg["disk_mb"])
    os.umask(0o022)  # the directories made on the way to the install must be open to the fresh uid
    for path, fd in keep.items():
        closed = first_closed(path)
        if closed is not None:  # e.g. /root: hide what else is in it, bind the install back below
            mount("tmpfs", closed, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
        seen = os.fstat(fd)
        try:
            here = os.stat(path)
            visible = (here.st_dev, here.st_ino) == (seen.st_dev, seen.st_ino)
        except FileNotFoundError:
            visible = False
        if not visible:
            os.makedirs(path, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, path, None, BIND | REC)
            mount(None, path, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
        os.close(fd)
    mount(None, "/", None, REMOUNT | BIND | RDONLY)
    workdir = "/tmp/work-" + os.urandom(8).hex()
    os.mkdir(workdir, 0o700)
    return True

def enter_pid_namespace():
    # every process of a pid namespace dies with its first one: fork it and wait outside
    if libc.unshare(NEWPID) != 0:
        return False
    child = os.fork()
    if child == 0:
        return True
    status = os.waitpid(child, 0)[1]
    if os.WIFSIGNALED(status):  # die the same way, so the caller sees the program's own end
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    if os.geteuid() == 0:
        if libc.unshare(NEWNET) == 0:
            isolation.append("net")
        fs_ok = isolate_fs()
        isolation += ["fs"] if fs_ok else []
    elif libc.unshare(NEWUSER) == 0:
        isolation += ["net"] if libc.unshare(NEWNET) == 0 else []
    if enter_pid_namespace():
        isolation.append("pid")
    # without the mount namespace the new uid can only run if it can read the Python install
    if uid is not None and (fs_ok or not any(first_closed(p) for p in install_paths())):
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        isolation.append("uid")
    for name, soft in (("RLIMIT_AS", cfg["memory_mb"] << 20), ("RLIMIT_FSIZE", cfg["file_mb"] << 20),
                       ("RLIMIT_CPU", cfg["cpu_s"]), ("RLIMIT_NOFILE", 64), ("RLIMIT_NPROC", cfg["nproc"])):
        hard = soft + 1 if name == "RLIMIT_CPU" else soft
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(workdir)
except OSError as exc:
    send(error="r1lab sandbox: isolation failed: %s" % exc)
    os._exit(1)
os.environ["HOME"] = workdir
if "net" not in isolation:
    import socket
    def _no_network(*args, **kwargs):
        raise PermissionError("network access is disabled in the r1lab sandbox")
    for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, _name, _no_network)
send(isolation=isolation)
del cfg, libc, f
sys.argv = ["solution.py"]
user = {"__name__": "__main__", "__builtins__": __builtins__}
failure, status = None, 0  # the exit status is the program's own, as if it ran alone
try:
    exec(compile(source, "solution.py", "exec"), user)
except SystemExit as exc:
    if exc.code not in (None, 0):
        failure = "the program exited with status %r" % (exc.code,)
        status = exc.code if type(exc.code) is int else 1
        if type(exc.code) is not int:
            print(exc.code, file=sys.stderr)
except BaseException:
    traceback.print_exc()
    failure, status = "the program raised while loading", 1
for call in calls:
    if failure is not None:
        send(error=failure)
        continue
    try:
        send(value=plain_data(eval(compile(call, "call", "eval"), user)))
    except BaseException as exc:
        try:
            send(error="%s: %s" % (type(exc).__name__, str(exc)[:300]))
        except BaseException:
            send(error="an exception that cannot be described")
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except BaseException:
        pass
os._exit(status & 0xFF)
'''


class SandboxError(RuntimeError):
    """The sandbox could not be set up, so nothing can be said about the program."""


@dataclass(frozen=True)
class CallResult:
    """What one call expression gave: plain data, or the reason there is none."""

    value: object = None  # plain data (see `plain_data`); meaningful only when error is None
    error: str | None = None  # the exception, "not plain data: ...", or why no result came back

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SandboxResult:
    """What one sandboxed run did. `calls` has one entry per call expression, even when the run died."""

    calls: list[CallResult]
    returncode: int | None
    timed_out: bool
    output_limited: bool  # stdout or stderr passed max_output and the program was stopped
    stdout: str  # at most max_output bytes, decoded with replacement
    stderr: str
    pid: int  # pid of the run's session leader (= its process group and session id)
    uid: int | None  # the uid the program ran as, None when it kept the caller's
    isolation: list[str] = field(default_factory=list)  # "net", "fs", "pid", "uid": what was in force

    @property
    def ok(self) -> bool:
        """Ran to its end in time, exit status 0."""
        return not self.timed_out and not self.output_limited and self.returncode == 0


def _processes(match: Callable[[dict[str, str]], bool]) -> list[int]:
    """Live (non-zombie) processes whose /proc status fields satisfy `match`."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)}
        if not fields.get("State", "").startswith("Z") and match(fields):
            pids.append(int(name))
    return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    if proc.poll() is None:
        # the leader's child is the first process of the pid namespace (it may have left the group
        # with setsid); killing it kills everything in the namespace
        for pid in _processes(lambda fields: fields.get("PPid") == str(proc.pid)):
            _kill(pid)
    try:  # what stayed in the group (a run without a pid namespace) may outlive its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for _ in range(100 if uid is not None else 0):  # a run without a pid namespace: sweep its uid
        pids = _processes(lambda fields: fields.get("Uid", "").split()[:1] == [str(uid)])
        if not pids:
            break
        for pid in pids:
            _kill(pid)
        time.sleep(0.01)


def _pump(proc, stdin_data: bytes, results_fd: int, timeout: float, max_output: int, max_results: int):
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
                    if fd != results_fd:
                        outs[fd] += chunk
                        if len(outs[fd]) > max_output:
                            limited = True
                    elif len(outs[fd]) < max_results:  # past the cap: drained, not kept
                        outs[fd] += chunk[:max_results - len(outs[fd])]
                    if not exited:
                        break
            if exited or limited:
                break
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return outs, timed_out, limited


def _call_result(line: bytes | None, missing: str) -> CallResult:
    """One line of the results pipe, checked again here: the program may have written it."""
    if line is None:
        return CallResult(error=missing)
    try:
        report = json.loads(line)
        if type(report) is dict and report.keys() == {"value"}:
            return CallResult(value=plain_data(report["value"]))
        if type(report) is dict and report.keys() == {"error"} and type(report["error"]) is str:
            return CallResult(error=report["error"])
    except (ValueError, RecursionError):
        pass
    return CallResult(error="malformed result")


def _setup(line: bytes | None, stopped: bool, stderr: str) -> list[str]:
    """The isolation the harness reports before the program starts; SandboxError if it failed."""
    if line is None:
        if stopped:  # the clock ran out before the harness got going: a timeout, not a broken sandbox
            return []
        raise SandboxError("r1lab sandbox: the harness died before the program started: "
                           + (stderr.strip().splitlines() or ["no message"])[-1])
    report = json.loads(line)
    if "error" in report:
        raise SandboxError(report["error"])
    return list(report["isolation"])


def run_python(source: str, calls: Sequence[str] = (), *, stdin: str = "", timeout: float = 5.0,
               memory_mb: int = 512, max_output: int = 64_000, max_results: int = 4_000_000,
               file_mb: int = 16, disk_mb: int = 64, max_processes: int = 32,
               python: str | None = None) -> SandboxResult:
    """Run `source`, then evaluate each expression of `calls`, in a sandbox; see the module docstring.

    If the program raises or exits non-zero while loading, every call gets that as its error.
    Calls that reported before a timeout, a flood or a crash keep their results; the others get
    an error saying the run ended. `timeout` is wall-clock seconds for the whole run;
    `max_results` caps the bytes of all returned values together; `python` is the interpreter
    (default: this one). Raises SandboxError when the sandbox itself could not be set up.
    """
    uid = UID_BASE + secrets.randbelow(UID_BASE) if os.geteuid() == 0 else None
    tmp = tempfile.mkdtemp(prefix="r1lab-sandbox-")
    read_fd, write_fd = os.pipe()
    proc = None
    try:
        source_path, workdir = os.path.join(tmp, "solution.py"), os.path.join(tmp, "work")
        with open(source_path, "w", encoding="utf-8") as f:
            f.write(source)
        os.mkdir(workdir, 0o700)
        cfg = {"source_path": source_path, "calls": list(calls), "uid": uid, "workdir": workdir,
               "results_fd": write_fd, "memory_mb": memory_mb, "file_mb": file_mb, "disk_mb": disk_mb,
               "cpu_s": int(timeout) + 1, "nproc": max_processes}
        config_path = os.path.join(tmp, "config.json")
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        harness = inspect.getsource(plain_data) + f"MAX_DEPTH = {MAX_DEPTH}\n" + _HARNESS
        proc = subprocess.Popen(
            [python or sys.executable, "-I", "-c", harness, config_path],
            cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        write_fd = -1
        outs, timed_out, limited = _pump(proc, stdin.encode("utf-8"), read_fd, timeout, max_output, max_results)
        _kill_all(proc, uid)
        out, err = (bytes(outs[s.fileno()][:max_output]).decode("utf-8", "replace") for s in (proc.stdout, proc.stderr))
        lines = bytes(outs[read_fd]).split(b"\n")[:-1]  # what follows the last newline is cut short
        setup = _setup(lines[0] if lines else None, timed_out or limited, err)
        ended = ("timed out" if timed_out else "output limit" if limited
                 else "values past max_results bytes" if len(outs[read_fd]) >= max_results
                 else f"the run ended (status {proc.returncode})")
        results = [_call_result(lines[i + 1] if i + 1 < len(lines) else None, f"no result: {ended}")
                   for i in range(len(calls))]
        return SandboxResult(
            calls=results, returncode=None if timed_out or limited else proc.returncode, timed_out=timed_out,
            output_limited=limited, stdout=out, stderr=err, pid=proc.pid, uid=uid,
            isolation=setup)
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

