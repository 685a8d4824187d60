"""Final-answer extraction and math-answer equivalence, with a hard time limit on every check.

Extraction policy (`extract_answer`), first that applies:
  1. the text inside the last `<answer>...</answer>`; if that holds a `\\boxed{...}`, its content;
  2. else the content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces, `\\{ \\}` skipped);
  3. else the last plain number in the text (`1,234`, `-3.5`, `7/2`).

Equivalence (`answers_equal(pred, gold)`), cheapest first:
  1. in-process, certain: equal after `normalize` (spacing, `\\dfrac`, `\\left`, `\\text{}`, units
     in `\\text`/`\\mbox`, `^\\circ`, `\\%`, `\\$`, thousands separators, a leading `x=`);
     both sides plain numbers (exact `Fraction` comparison); word and multiple-choice answers
     (`\\text{Evelyn}`, `\\text{(C)}`: case-insensitive string comparison only);
  2. otherwise math-verify (sympy) in a persistent worker process, killed and replaced when a
     check outlives its time limit, so no input can hang or crash the caller. The worker is started
     with fork+exec (`subprocess`), so a parent that has loaded torch and its threads is safe.

This module imports only the standard library; math-verify is imported inside the worker.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3.0  # seconds per heavy check
STARTUP_TIMEOUT = 60.0  # seconds a new worker may take to import math-verify and warm up
MAX_PRED_CHARS = 1000  # longer extracted answers are judged by the in-process checks only
WORKER_MEMORY_BYTES = 2 << 30  # RLIMIT_AS of the worker: a hostile power tower fails, not swaps

# ---------------------------------------------------------------------------- extraction

def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the `{...}` opening at text[start], with nesting; None if unbalanced."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) in text."""
    starts = list(re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text))
    for m in reversed(starts[-8:]):  # a bound: each unbalanced candidate costs a scan to the end
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            got = _braced(text, i)
            if got is not None:
                return got[0].strip()
        elif i > m.end():
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


_LAST_NUMBER = re.compile(r"[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _unwrap_math(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left):len(s) - len(right)].strip()
    return s


def answer_block(text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>`, or None (linear time)."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    return None if start < 0 else text[start + len("<answer>"):end]


def extract_answer(text: str) -> str | None:
    """The final answer a completion commits to, by the policy in the module docstring."""
    block = answer_block(text)
    if block is not None:
        boxed = last_boxed(block)
        inner = _unwrap_math(boxed if boxed is not None else block)
        return inner or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None

# ---------------------------------------------------------------------------- normalisation

_UNWRAP = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize(answer: str) -> str:
    """A canonical spelling: equal normal forms mean equal answers (the converse need not hold)."""
    s = _unwrap_math(answer)
    s = s.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\b|\\right\b|\\displaystyle\b", "", s)
    s = re.sub(r"\\[!,;:> ]|~", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\u00b0|\\%|%|\\?\$", "", s)  # degrees, percent, dollars, stray $
    s = re.sub(r"\\text\s*\{\s*(?:degrees?|cents?|units?|dollars?|inches|cm|m|meters?)\s*\}(\^\d)?",
               "", s)
    s = re.sub(r"\\mbox\s*\{[^{}]*\}(\^\d)?", "", s)
    s = _UNWRAP.sub(r"\1", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"[a-zA-Z]=[^=]+", s):
        s = s[2:]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    return s


_PLAIN = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")


def plain_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is only a number (`1,000`, `-2.5`, `3/4`, `\\frac{3}{4}`)."""
    s = _unwrap_math(answer).replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+|\\!|\\,|\{,\}|\\?\$", lambda m: "," if m.group(0) == "{,}" else "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _FRAC.fullmatch(s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        return Fraction(s) if _PLAIN.fullmatch(s) else None
    except (ValueError, ZeroDivisionError):
        return None


def _decimals(answer: str) -> int:
    m = re.search(r"\.(\d+)", answer)
    return len(m.group(1)) if m else 0


_CHOICE = re.compile(r"\(?([A-Ea-e])\)?")


def _word_answer(answer: str) -> str | None:
    """Lower-cased words of a text or multiple-choice answer (`\\text{(C)}` -> `c`), else None."""
    s = normalize(answer)
    m = _CHOICE.fullmatch(s)
    if m and ("\\text" in answer or "(" in s):
        return m.group(1).lower()
    s = _unwrap_math(answer)
    m = re.fullmatch(r"\\text(?:bf)?\s*\{\s*([A-Za-z][A-Za-z '\-]*[A-Za-z])\s*\}", s)
    return re.sub(r"\s+", " ", m.group(1)).lower() if m else None


def quick_equal(pred: str, gold: str) -> bool | None:
    """True/False when cheap in-process rules are certain, None when a heavy check is needed."""
    if normalize(pred) == normalize(gold):
        return True
    gold_words = _word_answer(gold)
    if gold_words is not None:
        m = _CHOICE.fullmatch(normalize(pred))
        pred_words = m.group(1).lower() if m and len(gold_words) == 1 else _word_answer(pred)
        if pred_words is None:
            pred_words = normalize(pred).lower()
        return pred_words.replace(" ", "") == gold_words.replace(" ", "")
    a, b = plain_number(pred), plain_number(gold)
    if a is not None and b is not None:
        if a == b:
            return True
        if max(_decimals(pred), _decimals(gold)) < 6:
            return False  # long decimals may be roundings of fractions: ask the heavy check
    return None

# ---------------------------------------------------------------------------- the checker worker

class CheckTimeout(RuntimeError):
    """A heavy equivalence check outlived its time limit (its worker was killed and replaced)."""


class _Worker:
    """One math-verify worker process and its line-oriented reply pipe."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        self.ready = False
        self.buf = b""

    def read_line(self, deadline: float) -> bytes | None:
        """The next reply line, None if the deadline passes first; EOFError if the worker died."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError("math check worker exited")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class MathChecker:
    """Persistent math-verify worker processes with a per-call time limit.

    `check(pred, gold)` sends one request down a pipe and waits for the reply with `select`. If
    the limit passes, the worker's process group is killed, an already warm spare takes its place
    (so the next call does not wait for math-verify to import) and `CheckTimeout` is raised; a
    worker that dies is replaced the same way. Thread-safe. After `os.fork`, a child process
    starts its own workers instead of sharing its parent's pipes.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._active: _Worker | None = None
        self._spare: _Worker | None = None
        self.restarts = 0

    def _replace(self) -> None:
        if self._active is not None:
            self._active.kill()
        self._active, self._spare = self._spare, None
        self.restarts += 1

    def check(self, pred: str, gold: str, timeout: float | None = None) -> bool:
        """Heavy equivalence of two answer strings (math-verify); CheckTimeout past the limit."""
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            if self._owner != os.getpid():  # forked: the workers belong to the parent
                self._active = self._spare = None
                self._owner = os.getpid()
            if self._active is None:
                self._active = _Worker()
            if self._spare is None:
                self._spare = _Worker()
            worker = self._active
            try:
                if not worker.ready:
                    if worker.read_line(time.monotonic() + STARTUP_TIMEOUT) != b"ready":
                        raise EOFError("math check worker did not start")
                    worker.ready = True
                os.write(worker.proc.stdin.fileno(), json.dumps({"pred": pred, "gold": gold}).encode() + b"\n")
                reply = worker.read_line(time.monotonic() + limit)
            except (EOFError, OSError) as exc:
                self._replace()
                raise CheckTimeout(f"math check worker failed: {exc}") from None
            if reply is None:
                self._replace()
                raise CheckTimeout(f"math check exceeded {limit:.1f} s on pred {pred[:80]!r}")
            return reply == b"1"

    def close(self) -> None:
        with self._lock:
            if self._owner == os.getpid():
                for worker in (self._active, self._spare):
                    if worker is not None:
                        worker.kill()
            self._active = self._spare = None


@functools.cache
def default_checker() -> MathChecker:
    """The process-wide checker that `answers_equal` uses unless given one (closed at exit)."""
    import atexit

    checker = MathChecker()
    atexit.register(checker.close)
    return checker


def answers_equal(pred: str, gold: str, timeout: float | None = None,
                  checker: MathChecker | None = None) -> bool:
    """Whether a predicted final answer equals the gold one. Raises CheckTimeout past the limit."""
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold:
        return False
    verdict = quick_equal(pred, gold)
    if verdict is not None:
        return verdict
    if len(pred) > MAX_PRED_CHARS:
        return False
    return (checker or default_checker()).check(pred, gold, timeout)

# ---------------------------------------------------------------------------- worker side

def _heavy_equal(pred: str, gold: str, parsed_gold: dict) -> bool:
    from math_verify import parse, verify

    if gold not in parsed_gold:
        if len(parsed_gold) > 4096:
            parsed_gold.clear()
        parsed_gold[gold] = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    target = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    reference = parsed_gold[gold]
    return bool(reference and target and verify(reference, target, timeout_seconds=None))


def _worker_main() -> None:
    """Serve one JSON request per line on stdin with `1` or `0` on stdout until EOF."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    logging.disable(logging.CRITICAL)
    parsed_gold: dict = {}
    out = sys.stdout.buffer
    try:
        _heavy_equal("1/2", "\\frac{1}{2}", parsed_gold)  # import and warm up before "ready"
    except Exception:
        pass
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            ok = _heavy_equal(request["pred"], request["gold"], parsed_gold)
        except Exception:  # noqa: BLE001 - any failure to parse or compare means "not shown equal"
            ok = False
        out.write(b"1\n" if ok else b"0\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
