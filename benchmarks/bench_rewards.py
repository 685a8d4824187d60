"""Grade the real MATH-500 and GSM8K gold answers with `accuracy_reward` and time every call.

Rates measured (each call is one `accuracy_reward(completion, example)`):
  gold in <answer>   every gold answer inside `<answer>` tags must score 1
  gold in \\boxed     every gold answer as `\\boxed{}` in free text with distractor numbers must score 1
  wrong pairs        another problem's gold (different after normalisation and not numerically
                     equal) must score 0
  rewrites           equivalent spellings of each gold (`\\dfrac`/`\\frac`, `a/b`, decimals,
                     `1,000`, `x = 5`, degrees, `\\text{}`, spacing) must score 1
  hostile            answers that make sympy hang or explode must score 0 within the time limit
Prints a markdown table and appends it, with date, machine and versions, to benchmarks/RESULTS.md.

    python benchmarks/bench_rewards.py [--limit N] [--no-append]

`tests/test_benchmarks_data.py` imports `rewrites`, `wrong_pairs` and `measure` from here, so the
test and the table agree on what is measured.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from fractions import Fraction

from r1lab.mathcheck import DEFAULT_TIMEOUT, extract_answer, normalize, plain_number, quick_equal
from r1lab.rewards import accuracy_reward
from r1lab.tasks.benchmarks import load_benchmark

HOSTILE = ["9^{9^{9^{9}}}", "(10^{10})!", "10^{10^{10}}", "\\binom{10^{12}}{10^{6}}",
           "2^{2^{2^{2^{2^{2}}}}}", "\\boxed{" * 2000 + "1"]


def _decimal(value: Fraction) -> str | None:
    """A terminating decimal spelling of value with at most 8 places, else None."""
    for places in range(1, 9):
        scaled = value * 10**places
        if scaled.denominator == 1:
            sign = "-" if value < 0 else ""
            digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
            return f"{sign}{digits[:-places]}.{digits[-places:]}"
    return None


def rewrites(gold: str) -> list[str]:
    """Equivalent spellings of a gold answer that a sound checker must accept."""
    g = gold.strip()
    out = []
    if "\\dfrac" in g:
        out.append(g.replace("\\dfrac", "\\frac"))
    elif "\\frac" in g:
        out.append(g.replace("\\frac", "\\dfrac"))
    value = plain_number(g)
    if value is not None:
        if value.denominator != 1:
            out.append(f"{value.numerator}/{value.denominator}")
            if "\\frac" in g or "/" in g:
                out.append(_decimal(value) or f"\\frac{{{value.numerator}}}{{{value.denominator}}}")
            else:
                out.append(f"\\frac{{{value.numerator}}}{{{value.denominator}}}")
        else:
            n = value.numerator
            out += [str(n), f"{n}.0", f"\\${n}"] + ([f"{n:,}"] if abs(n) >= 1000 else [])
        out.append(f"x = {g}")
    m = re.fullmatch(r"[a-z]\s*=\s*([^=]+)", g)
    if m:
        out.append(m.group(1).strip())
    m = re.fullmatch(r"(.+?)\s*\^\s*\{?\\circ\}?", g)
    if m:
        out += [m.group(1), m.group(1) + "^{\\circ}"]
    m = re.fullmatch(r"\\text\{\s*\(?([^{}()]+?)\)?\s*\}", g)
    if m:
        out.append(m.group(1))
    if g.startswith("\\$"):
        out.append(g[2:])
    if value is None and "\\frac" in g and not re.search(r"\d\s*\\d?frac", g):  # not mixed numbers
        out.append(re.sub(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", g))
    if value is None and re.match(r"-?\d+\s*\\(?:sqrt|pi)", g):
        out.append(re.sub(r"^(-?\d+)\s*", r"\1 \\cdot ", g))
    if "\\left" in g:
        out.append(g.replace("\\left", "").replace("\\right", ""))
    out.append(re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", g))
    if value is None and "," in g and "\\!" not in g:
        out.append(re.sub(r",\s*", ", ", g))
    return [r for r in dict.fromkeys(out) if r and r != g]


def numerically_equal(a: str, b: str) -> bool:
    x, y = plain_number(a), plain_number(b)
    return x is not None and x == y


def wrong_pairs(golds: list[str], per_gold: int = 1, seed: int = 0) -> list[tuple[str, str]]:
    """(gold, another problem's gold) pairs that differ after normalisation and in value."""
    rng = random.Random(seed)
    pairs = []
    for i, gold in enumerate(golds):
        for _ in range(per_gold):
            other = golds[(i + rng.randrange(1, len(golds))) % len(golds)]
            if normalize(other) != normalize(gold) and not numerically_equal(other, gold):
                pairs.append((gold, other))
    return pairs


def in_answer(ans: str) -> str:
    return f"<think>\nLet me work it out: 12 + 30 = 42, then check.\n</think>\n<answer>{ans}</answer>"


def in_boxed(ans: str) -> str:
    return f"First 12 + 30 = 42, and 7 more steps give the result 3.5. The final answer is $\\boxed{{{ans}}}$. Done."


def measure(golds: list[str], seed: int = 0, hostile: bool = True, pairs_per_gold: int = 3) -> dict:
    """Run every case on `golds`; returns rates, failures and per-call times in seconds."""
    times: list[float] = []
    heavy: list[float] = []  # calls the in-process rules could not decide (math-verify worker)

    def score(completion: str, gold: str) -> float:
        t0 = time.perf_counter()
        r = accuracy_reward(completion, {"answer": gold})
        times.append(time.perf_counter() - t0)
        pred = extract_answer(completion)
        if pred is not None and quick_equal(pred, gold) is None:
            heavy.append(times[-1])
        return r

    out: dict = {"failures": {}}
    cases = {
        "gold in <answer>": ([(g, in_answer(g)) for g in golds], 1.0),
        "gold in \\boxed": ([(g, in_boxed(g)) for g in golds], 1.0),
        "wrong pairs rejected": ([(g, in_answer(o)) for g, o in wrong_pairs(golds, pairs_per_gold, seed)], 0.0),
        "rewrites accepted": ([(g, in_answer(r)) for g in golds for r in rewrites(g)], 1.0),
    }
    if hostile:
        cases["hostile rejected"] = ([("5", in_answer(h)) for h in HOSTILE], 0.0)
    for name, (pairs, want) in cases.items():
        fails = [(g, c) for g, c in pairs if score(c, g) != want]
        out[name] = (len(pairs) - len(fails), len(pairs))
        out["failures"][name] = fails
    times.sort()
    out["calls"] = len(times)
    out["p50"], out["p99"], out["max"] = times[len(times) // 2], times[int(len(times) * 0.99)], times[-1]
    heavy.sort()
    out["heavy"], out["heavy_p50"] = len(heavy), heavy[len(heavy) // 2] if heavy else 0.0
    return out


def table(results: dict[str, dict]) -> str:
    skip = ("failures", "calls", "p50", "p99", "max", "heavy", "heavy_p50")
    names = list(dict.fromkeys(k for r in results.values() for k in r if k not in skip))
    lines = ["| set | " + " | ".join(names) + " | calls | p50 ms | p99 ms | max ms | worker calls | their p50 ms |",
             "|---" * (len(names) + 7) + "|"]
    for set_name, r in results.items():
        rates = [f"{100 * r[k][0] / max(r[k][1], 1):.2f}% ({r[k][0]}/{r[k][1]})" if k in r else "-"
                 for k in names]
        lines.append(f"| {set_name} | " + " | ".join(rates)
                     + f" | {r['calls']} | {1e3 * r['p50']:.3f} | {1e3 * r['p99']:.2f} | {1e3 * r['max']:.1f}"
                     + f" | {r['heavy']} | {1e3 * r['heavy_p50']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N answers of each set")
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    results = {}
    for name in ("math500", "gsm8k"):
        golds = [ex["answer"] for ex in load_benchmark(name, limit=args.limit)]
        results[f"{name} ({len(golds)})"] = r = measure(golds, hostile=(name == "math500"))
        for case, fails in r["failures"].items():
            for gold, completion in fails[:10]:
                print(f"FAIL {name} {case}: gold={gold!r} completion={completion[-120:]!r}", file=sys.stderr)
    text = table(results)
    body = (f"accuracy_reward on the real gold answers; time limit per heavy check {DEFAULT_TIMEOUT} s; "
            f"times are per call, in-process fast path and math-verify worker together.\n\n{text}")
    if args.no_append:
        print(body)
        return
    from common import append_results  # benchmarks/common.py: machine line, versions, RESULTS.md

    print(append_results("rewards: accuracy_reward on real benchmark answers", body,
                         packages=("math-verify", "sympy")))


if __name__ == "__main__":
    main()
